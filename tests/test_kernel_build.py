"""Real-hardware build gate: every kernel, with the block sizes its launchers use, must
compile ahead of time to a cubin for sm_80 and sm_90, in fp16 and bf16 (attention: head
dims 32/64/96/128, multi-head and grouped-query variants, with and without documents).

The interpreter accepts programs a GPU compiler rejects; this test is what catches them.
One subprocess (TRITON_INTERPRET unset) compiles everything once per test session.
"""

import pytest
import torch
import triton
import triton.language as tl
from tritonlm.kernels import aot, attention, cross_entropy, rmsnorm

MODULES = {"rmsnorm": rmsnorm, "cross_entropy": cross_entropy, "attention": attention}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def builds():
    """{(module, dtype, cc): [AotResult]} for every kernel module, dtype and target."""
    jobs, specs = [], []
    for mod_name, mod in MODULES.items():
        for dt_name, dtype in DTYPES.items():
            for spec in mod.aot_specs(dtype):
                jobs.append((mod_name, dt_name))
                specs.append(spec)
    results = aot.compile_specs(specs, aot.TARGET_CCS)
    out = {}
    ccs = aot.TARGET_CCS
    for i, (mod_name, dt_name) in enumerate(jobs):
        for j, cc in enumerate(ccs):
            out.setdefault((mod_name, dt_name, cc), []).append(results[i * len(ccs) + j])
    return out


def test_every_kernel_module_exposes_aot_specs():
    for name, mod in MODULES.items():
        assert hasattr(mod, "aot_specs"), f"kernels/{name}.py has no aot_specs"
        for dtype in DTYPES.values():
            specs = mod.aot_specs(dtype)
            assert specs, name
            assert len({s.name for s in specs}) == len(specs), f"{name}: duplicate spec names"


@pytest.mark.parametrize("cc", aot.TARGET_CCS)
@pytest.mark.parametrize("dt_name", list(DTYPES))
@pytest.mark.parametrize("mod_name", list(MODULES))
def test_kernels_compile_to_cubin(builds, mod_name, dt_name, cc):
    results = builds[(mod_name, dt_name, cc)]
    assert len(results) == len(MODULES[mod_name].aot_specs(DTYPES[dt_name]))
    for r in results:
        assert r.cc == cc
        assert r.cubin[:4] == b"\x7fELF", f"{r.name}: no cubin"
        assert f".target sm_{cc}" in r.ptx, r.name


@pytest.mark.parametrize("dt_name", list(DTYPES))
def test_attention_builds_include_grouped_query_and_head_dim_96(builds, dt_name):
    """The grouped-query variants (GROUP any i32), the packed-row variants (HAS_DOCS) and
    the padded head dim 96 are built for sm_90 next to the multi-head ones, for every
    attention kernel that has them."""
    names = {r.name for r in builds[("attention", dt_name, 90)]}
    for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
        for D in (32, 64, 96, 128):
            for variant in ("", "_gqa", "_docs", "_docs_gqa"):
                assert f"attention_{kernel}{variant}_d{D}_{dt_name}" in names
    assert f"attention_bwd_preprocess_d96_{dt_name}" in names


def test_resource_usage_reports_registers_spills_shared(builds):
    r = builds[("rmsnorm", "bf16", 90)][0]
    usage = aot.resource_usage(r)
    assert 0 < usage["registers"] <= 255
    assert usage["spill_stores"] >= 0 and usage["spill_loads"] >= 0
    assert usage["shared"] >= 0


def test_specs_use_the_launchers_block_sizes():
    blocks = {s.constexprs["BLOCK_N"] for s in rmsnorm.aot_specs(torch.float16)}
    for n in rmsnorm.AOT_HIDDEN_SIZES:
        assert rmsnorm.block_config(n)[0] in blocks
    blocks = {s.constexprs["BLOCK_V"] for s in cross_entropy.aot_specs(torch.bfloat16)}
    for v in cross_entropy.AOT_VOCAB_SIZES:
        assert cross_entropy.block_config(v)[0] in blocks


@triton.jit
def _dot_on_tiny_tiles(A, B, C):
    """Accepted by the interpreter; a GPU build rejects tl.dot on 8x8 tiles."""
    i = tl.arange(0, 8)
    a = tl.load(A + i[:, None] * 8 + i[None, :])
    b = tl.load(B + i[:, None] * 8 + i[None, :])
    tl.store(C + i[:, None] * 8 + i[None, :], tl.dot(a, b))


def test_build_gate_rejects_what_only_the_interpreter_accepts():
    a = torch.randn(8, 8)
    c = torch.empty(8, 8)
    _dot_on_tiny_tiles[(1,)](a, a, c)  # the interpreter runs it
    assert torch.allclose(c, a @ a, atol=1e-4)
    spec = aot.AotSpec("tiny_dot", _dot_on_tiny_tiles, {"A": "*fp16", "B": "*fp16", "C": "*fp32"})
    with pytest.raises(aot.AotBuildError, match="tiny_dot sm_90"):
        aot.compile_spec(spec, 90)
