"""benchmarks/gpu_check.py: the device check's own code runs on the CPU, so it cannot rot.

The quick mode runs the same correctness, end-to-end and (with --cpu-speed) speed code as
on a GPU, through Triton's interpreter at tiny shapes; here we check what it records, that
a kernel leaving an element unwritten fails, that the budget skips work, and that the
package imports from a bare checkout (the device machine has no install of it).
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ENV = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)  # fmt: skip


def test_quick_run_checks_every_kernel_and_records_every_section(tmp_path):
    out_dir = tmp_path / "out"
    proc = _run("--quick", "--cpu-speed", "--json", str(tmp_path / "r.json"), "--out", str(out_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("RESULT: all run checks passed")  # the table is last
    report = json.loads((tmp_path / "r.json").read_text())
    assert json.loads((out_dir / "gpu_check.json").read_text()) == report
    res = report["results"]
    rows = res["correctness"]
    assert {(r["kernel"], r["dtype"]) for r in rows} == {
        (k, d)
        for k in ("attention", "rmsnorm", "cross_entropy", "linear_cross_entropy")
        for d in ("fp32", "fp16")
    }
    for r in rows:
        assert r["ok"] and r["deterministic"], r
        grads = {"attention": 3, "rmsnorm": 2, "cross_entropy": 1, "linear_cross_entropy": 2}
        assert len(r["rel_err"]) == 1 + grads[r["kernel"]]  # the output and every gradient
        assert all(0 < e <= r["tol"] for e in r["rel_err"].values()), r
    (e2e,) = res["e2e"]
    assert e2e["ok"] and len(e2e["losses"]["triton"]) == e2e["steps"]
    assert e2e["greedy_same_weights_match_fp32"] == e2e["greedy_tokens"]
    for section in (
        "ceilings",
        "attention",
        "attention_packed",
        "train",
        "profile",
        "rmsnorm",
        "lce",
    ):
        assert res[section] and all("error" not in r for r in res[section]), res[section]
    (prof,) = res["profile"]
    assert prof["time_kind"] == "cpu operator" and prof["step_ms"] > 0
    assert 0 < len(prof["top"]) <= 10 and prof["top"][0]["ms"] >= prof["top"][-1]["ms"]
    assert sum(r["share_of_busy"] for r in prof["top"]) <= 1.0 + 1e-9
    assert "profile seed triton one step" in proc.stdout
    assert res["lce"][0]["chunk_rows"] >= 1
    att = res["attention"][0]
    assert att["ours"]["fwd_bwd_ms"] > 0 and att["ours"]["fwd_bwd_tflops"] > 0
    assert att["kernel_table"].endswith("kernels/kernel_configs.json")  # no --autotune
    assert set(att["tiles"]) == {"fwd", "dkdv", "dq"} and len(att["tiles"]["fwd"]) == 4
    (gqa,) = [r for r in res["attention"] if r.get("group", 1) > 1]  # vs SDPA on expanded k/v
    assert gqa["group"] == 2 and gqa["T"] == att["T"] and gqa["ours"]["bwd_ms"] > 0
    assert gqa["ours"]["bwd_tflops"] > 0 and "kernel_table" in gqa
    packed = res["attention_packed"][0]  # packed rows: document-masked vs unmasked kernel
    assert packed["documents"] > 1 and packed["useful_flops"] > 0
    for impl in ("ours_packed", "ours_unmasked"):
        assert packed[impl]["fwd_bwd_ms"] > 0, packed
    assert packed["packed_speedup_vs_unmasked"] > 0
    train = {r["item"]: r for r in res["train"]}
    assert train["small ours triton"]["tokens_per_s"] > 0
    one, sched = res["decode"]  # no CUDA: the graphs fall back to eager, same tokens
    assert one["tokens_match"] and one["graphs_fallback"].startswith("CUDA graph capture failed")
    assert sched["streams"] == 4 and sched["eager_tok_s"] > 0 and sched["graphs_tok_s"] > 0


def test_autotune_runs_first_and_later_items_launch_with_its_table(tmp_path):
    """--autotune (quick: one point per attention op in the interpreter) writes this
    arch's table next to the JSON and the attention speed item then reads it."""
    proc = _run("--quick", "--cpu-speed", "--autotune", "--sections", "autotune,attention",
                "--json", str(tmp_path / "r.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    (tuned,) = res["autotune"]
    table = tmp_path / "kernel_configs_cpu.json"
    assert tuned["table"] == str(table) and table.exists()
    ops = {r["op"]: r for r in tuned["ops"]}
    assert set(ops) == {"attention_fwd", "attention_fwd_docs", "attention_dkdv", "attention_dq"}
    entries = json.loads(table.read_text())["cpu"]
    for op, r in ops.items():
        assert r["best_ms"] > 0 and r["shipped_ms"] > 0
        assert entries[op]["fp16"]["d32"] == r["best"]
    att = res["attention"][0]
    assert att["kernel_table"] == str(table) and att["ours"]["fwd_bwd_ms"] > 0
    assert "autotune: attention tiles" in proc.stdout


def test_budget_skips_what_does_not_fit(tmp_path):
    proc = _run("--quick", "--sections", "correctness", "--budget-s", "0", "--json",
                str(tmp_path / "r.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "r.json").read_text())["results"]["correctness"]
    assert rows and all(r["skipped"] == "budget" for r in rows)
    assert "skipped (" in proc.stdout


def test_unknown_section_is_one_clear_error(tmp_path):
    proc = _run("--sections", "nope", "--json", str(tmp_path / "r.json"), timeout=60)
    assert proc.returncode == 2 and "unknown section(s) nope" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def checks():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check_kernels

        yield gpu_check_kernels
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _fake_kernel_module(skip_last: bool, flaky: bool):
    """A 'kernel' (x * 2) whose output comes from the module's torch.empty_like, so the
    check poisons it; it can leave the last element unwritten or add run-to-run noise."""
    mod = types.ModuleType("fake_kernel")
    mod.torch = torch
    calls = []

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            out = mod.torch.empty_like(x)
            n = x.numel() - 1 if skip_last else x.numel()
            out.view(-1)[:n] = x.view(-1)[:n] * 2
            calls.append(1)
            if flaky and len(calls) % 2 == 0:
                out.view(-1)[0] += 1e-6
            return out

        @staticmethod
        def backward(ctx, g):
            return g * 2

    mod.run = Double.apply
    return mod


@pytest.mark.parametrize("skip_last,flaky", [(True, False), (False, True), (False, False)])
def test_unwritten_or_nondeterministic_output_fails(checks, skip_last, flaky):
    mod = _fake_kernel_module(skip_last, flaky)
    x = torch.randn(4, 5)
    rec = checks.check_op("fake", mod.run, lambda t: t * 2, mod, [x], torch.float32)
    assert rec["ok"] == (not skip_last and not flaky)
    assert (rec["rel_err"]["out"] == float("inf")) == skip_last
    assert rec["deterministic"] == (not flaky)


def test_package_imports_from_a_bare_checkout():
    """With the installed package hidden, the boot module maps tritonlm onto the folders."""
    code = (
        "import sys, importlib.util\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "    if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "sys.path[:] = [p for p in sys.path if '__editable__' not in p]\n"
        "assert importlib.util.find_spec('tritonlm') is None\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import gpu_check_boot\n"
        "print(gpu_check_boot.ensure_importable())\n"
        "from tritonlm.engine.model.transformer import Transformer\n"
        "from tritonlm.kernels import dispatch\n"
        "import tritonlm.engine.model.transformer as m\n"
        "print(m.__file__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=ENV, cwd="/")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    how, path = proc.stdout.split()
    assert how == "checkout" and Path(path) == ROOT / "engine" / "model" / "transformer.py"


@pytest.fixture
def boot():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    saved = list(sys.path)
    try:
        import gpu_check_boot

        yield gpu_check_boot
    finally:
        sys.path[:] = [p for p in saved if p != str(ROOT / "benchmarks")]
        sys.modules.pop("fakepeer", None)


def test_missing_peer_wheel_is_one_clear_line(boot, tmp_path):
    line = boot.peer_status("no_such_peer_module", "no_such_peer", tmp_path)
    assert line.startswith("missing: no no_such_peer wheel in ")
    assert "make gpu-check-prep" in line and "\n" not in line


def test_a_carried_peer_wheel_is_unpacked_and_importable(boot, tmp_path):
    import zipfile

    wheel = tmp_path / "fakepeer-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fakepeer/__init__.py", "VALUE = 3\n")
    assert boot.add_peer_wheels(tmp_path) == [wheel.name]
    import fakepeer

    assert fakepeer.VALUE == 3
    assert boot.peer_status("fakepeer", "fakepeer", tmp_path) == f"present ({wheel.name})"
    assert boot.add_peer_wheels(tmp_path) == [wheel.name]  # unpacked once, added once


def test_profile_table_lines():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_check_table import profile_lines
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rec = {"preset": "gpt2", "backend": "triton", "step_ms": 100.0, "busy_ms": 80.0,
           "time_kind": "cuda kernel", "top": [
               {"name": "sm90_gemm_" + "x" * 100, "calls": 24, "ms": 20.0,
                "share_of_step": 0.2, "share_of_busy": 0.25},
               {"name": "attn_bwd_dkdv", "calls": 12, "ms": 8.0, "share_of_step": 0.08,
                "share_of_busy": 0.1}]}  # fmt: skip
    lines = profile_lines(rec, width=30)
    assert lines[0] == (
        "profile gpt2 triton one step: 100.00 ms, 80.00 ms cuda kernel time; top 2:"
    )
    assert "20.00 ms" in lines[1] and "24 calls" in lines[1] and "20.0% step" in lines[1]
    assert "25.0% busy" in lines[1] and lines[1].endswith("x...") and len(lines[1]) < 100
    assert lines[2].endswith("attn_bwd_dkdv")


def test_issue_21_goals_read_attention_gqa_and_backend_rows():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_check_table import goals
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    train = [("small ours triton", 400.0), ("small ours torch", 500.0),
             ("small transformers llama sdpa", 300.0)]  # fmt: skip
    report = {"results": {
        "train": [{"item": i, "tokens_per_s": t} for i, t in train],
        "attention": [{"D": 128, "T": 1024, "ours_vs_best_sdpa": 0.95},
                      {"D": 128, "T": 4096, "group": 4, "ours_vs_best_sdpa": 0.99},
                      {"D": 64, "T": 8192, "ours_vs_best_sdpa": 1.2}],
    }}  # fmt: skip
    g = goals(report)
    assert g["#21 attention >= 0.9x best SDPA (T>=1024, D128)"] is True
    assert g["#21 GQA attention >= 1.0x SDPA on expanded k/v"] is False  # not mixed with MHA
    assert g["#21 attention >= 1.0x best SDPA (T>=1024, D64)"] is True
    assert g["#21 small triton >= torch backend"] is False
    assert g["#21 small both backends >= 1.3x transformers"] is True  # 400 >= 390
    assert goals({"results": {}})["#21 small triton >= torch backend"] is None
