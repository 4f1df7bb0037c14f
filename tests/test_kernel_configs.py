"""kernels/configs.py: the launch-config table the launchers read (no GPU needed)."""

import json

import pytest
import torch
from tritonlm.kernels import configs, rmsnorm


def _write(tmp_path, table):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    return path


def test_lookup_order_defaults_then_default_arch_then_device_arch(tmp_path):
    path = _write(tmp_path, {
        "default": {"rmsnorm_fwd": {"any": {"any": {"block_m": 2}, "n1024": {"num_warps": 8}}}},
        "sm90": {"rmsnorm_fwd": {"bf16": {"n1024": {"block_m": 4}}}},
    })  # fmt: skip
    look = lambda arch, dt, cls: configs.lookup("rmsnorm_fwd", arch, dt, cls, path)  # noqa: E731
    assert look("sm90", torch.bfloat16, "n1024") == {"block_m": 4, "num_warps": 8}
    assert look("sm90", torch.float16, "n1024") == {"block_m": 2, "num_warps": 8}
    assert look("sm80", torch.bfloat16, "n1024") == {"block_m": 2, "num_warps": 8}
    assert look("cpu", torch.float32, "n2048") == {"block_m": 2, "num_warps": 4}
    # an op the table does not mention: DEFAULTS
    assert (
        configs.lookup("cross_entropy", "sm90", torch.bfloat16, "large", path)
        == (configs.DEFAULTS["cross_entropy"])
    )


def test_shipped_table_entries_are_valid_and_known():
    entries = list(configs.table_entries())
    assert entries
    for arch, op, dt, cls, cfg in entries:
        assert op in configs.DEFAULTS, op
        assert set(cfg) == set(configs.DEFAULTS[op]), (arch, op, cls)
        assert dt == "any" or dt in ("fp32", "fp16", "bf16")
        if op.startswith("rmsnorm") and cls.startswith("n"):
            assert configs.valid(op, cfg, int(cls[1:])), (arch, op, cls, cfg)
        if op == "cross_entropy":
            assert configs.valid(op, cfg), (arch, op, cls, cfg)


def test_sweep_space_respects_the_tile_limit():
    small, wide = configs.sweep("rmsnorm_fwd", 1024), configs.sweep("rmsnorm_fwd", 8192)
    assert {p["block_m"] for p in small} == {1, 2, 4, 8}
    assert {p["block_m"] for p in wide} == {1}
    assert all(p["block_m"] * 1024 <= configs.MAX_TILE for p in small)
    assert configs.sweep("rmsnorm_fwd", 1024) == configs.sweep("rmsnorm_fwd", 1024)  # ordered


def test_launchers_read_the_table(monkeypatch):
    seen = []
    real = configs.lookup

    def spy(op, arch, dtype, cls, path=None):
        seen.append((op, arch, dtype, cls))
        return real(op, arch, dtype, cls, path)

    monkeypatch.setattr(configs, "lookup", spy)
    cfg = rmsnorm.launch_config("bwd", 768, torch.float16, torch.device("cpu"))
    assert seen == [("rmsnorm_bwd", "cpu", torch.float16, "n1024")]
    assert cfg["block_n"] == 1024 and cfg["one_pass"]
    assert cfg["block_m"] == real("rmsnorm_bwd", "cpu", torch.float16, "n1024")["block_m"]


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="no Triton kernel type"):
        configs.lookup("rmsnorm_fwd", "sm90", torch.float64, "n1024")
