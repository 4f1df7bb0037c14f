"""Attention tiles from the config table: the launchers read it per arch, and every tile
shape the autotune sweep may pick computes the float64 reference's output and gradients
(interpreter, NaN-poisoned buffers), so a measured table can never choose a wrong kernel."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from kernel_checks import check_attention_against_float64, run_with_grads
from tritonlm.kernels import attention as attn
from tritonlm.kernels import configs
from tritonlm.kernels.attention_configs import (
    OPS,
    AttentionConfig,
    KernelConfig,
    attention_class,
    attention_config,
)

TOL = (3e-5, 3e-5)  # fp32, exact dots: summation order and exp2 rounding only


def _tile_shapes(op: str) -> list[tuple[int, int]]:
    """The distinct (block_m, block_n) of an op's sweep space (warps and stages change no
    result), in a fixed order."""
    return sorted({(p["block_m"], p["block_n"]) for p in configs.sweep(op, 32)})


def test_every_tile_shape_of_the_sweep_matches_the_reference(monkeypatch):
    """Run i pairs the i-th tile shape of every op: plain rows and packed rows (a 1-token
    document, one spanning several blocks, many short ones) at T = 150, past two 64-row
    blocks and short of two 128-row ones; GQA with 2 query heads per kv head."""
    shapes = {op: _tile_shapes(op) for op in OPS}
    assert all(len(s) >= 4 for s in shapes.values()), shapes
    g = torch.Generator().manual_seed(5)
    B, H, H_kv, T, D = 1, 4, 2, 150, 32
    q, do = (torch.randn(B, H, T, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, H_kv, T, D, generator=g) for _ in range(2))
    lengths = [1, 90, *[3] * 9, 32]  # 150 tokens
    document_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    for i in range(max(map(len, shapes.values()))):
        pick = {op: KernelConfig(*s[i % len(s)], 4, 2) for op, s in shapes.items()}
        cfg = AttentionConfig(pick["attention_fwd"], attn.attention_config(D, q.dtype).preprocess,
                              pick["attention_dkdv"], pick["attention_dq"])  # fmt: skip

        def tiles(head_dim, dtype, docs=False, arch="default", path=None, grouped=False,
                  cfg=cfg, pick=pick):  # fmt: skip
            return replace(cfg, fwd=pick["attention_fwd_docs"]) if docs else cfg

        monkeypatch.setattr(attn, "attention_config", tiles)
        check_attention_against_float64(attn, q, k, v, do, TOL, TOL)
        check_attention_against_float64(attn, q, k, v, do, TOL, TOL, None, document_ids[None])


def test_tiles_come_from_the_table_per_arch_dtype_and_head_dim(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({
        "default": {"attention_dq": {"any": {"any": {"block_m": 64, "block_n": 16}}}},
        "sm90": {"attention_dq": {"bf16": {"d128": {"num_warps": 4, "num_stages": 5}}},
                 "attention_fwd_docs": {"any": {"d64": {"block_m": 64}}}},
    }))  # fmt: skip
    sm90 = attention_config(96, torch.bfloat16, arch="sm90", path=path)  # 96 -> class d128
    assert sm90.dq == KernelConfig(64, 16, 4, 5)
    assert attention_config(128, torch.float16, arch="sm90", path=path).dq == KernelConfig(
        64, 16, configs.DEFAULTS["attention_dq"]["num_warps"], 3
    )
    assert attention_config(64, torch.bfloat16, arch="sm80", path=path).dq.num_stages == 3
    assert attention_config(64, torch.bfloat16, docs=True, arch="sm90", path=path).fwd == (
        KernelConfig.of({**configs.DEFAULTS["attention_fwd_docs"], "block_m": 64})
    )
    assert sm90.fwd == KernelConfig.of(configs.DEFAULTS["attention_fwd"])  # not in the table
    assert [attention_class(d) for d in (32, 64, 96, 128)] == ["d32", "d64", "d128", "d128"]
    with pytest.raises(ValueError, match="head dims"):
        attention_config(48, torch.bfloat16)


def test_launchers_look_tiles_up_for_their_device(monkeypatch):
    seen = []
    real = configs.lookup

    def spy(op, arch, dtype, cls, path=None):
        seen.append((op, arch, cls))
        return real(op, arch, dtype, cls, path)

    monkeypatch.setattr(configs, "lookup", spy)
    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(1, 1, 20, 64, generator=g) for _ in range(4))
    run_with_grads(attn.attention_triton, [q, k, v], do)
    ops = {op for op, _, _ in seen}
    assert ops == {"attention_fwd", "attention_dkdv", "attention_dq"}
    assert {(arch, cls) for _, arch, cls in seen} == {("cpu", "d64")}


def test_shipped_half_precision_tiles_are_in_the_sweep_rules():
    """Every fp16/bf16 tile the shipped table resolves to obeys the register rule the
    sweep obeys (the build gate proves the rule spill-free on sm_80/sm_90)."""
    for arch in configs.table_archs():
        for dtype in (torch.float16, torch.bfloat16):
            for D in attn.SUPPORTED_HEAD_DIMS:
                bd = attn.block_d(D)
                for docs in (False, True):
                    cfg = attention_config(D, dtype, docs=docs, arch=arch)
                    gqa = attention_config(D, dtype, arch=arch, grouped=True)
                    fwd_op = "attention_fwd_docs" if docs else "attention_fwd"
                    for op, c in ((fwd_op, cfg.fwd), ("attention_dkdv", cfg.dkdv),
                                  ("attention_dkdv_gqa", gqa.dkdv),
                                  ("attention_dq", cfg.dq)):  # fmt: skip
                        point = {"block_m": c.block_m, "block_n": c.block_n,
                                 "num_warps": c.num_warps, "num_stages": c.num_stages}  # fmt: skip
                        assert configs.valid(op, point, bd), (arch, dtype, D, op, c)
