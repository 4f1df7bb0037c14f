"""The benchmark scripts run end to end in their CPU/quick modes (they print and write JSON).

Peers that need the `bench` extra (transformers, tokenizers) are left out here; timings are
never asserted, only what the scripts compute and record.
"""

import json
import subprocess
import sys
from pathlib import Path

from tritonlm.kernels import attention_configs

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_bench_kernels_cpu_mode_shows_the_chunked_memory_saving(tmp_path):
    out = tmp_path / "kernels.json"
    stdout = run_script("bench_kernels.py", "--quick", "--out", str(out))
    assert "No CUDA device" in stdout and "linear_cross_entropy" in stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == {
        "rmsnorm",
        "cross_entropy",
        "attention",
        "linear_cross_entropy",
    }
    unfused, chunked = [r for r in rows if r["op"] == "linear_cross_entropy"]
    assert "chunked" in chunked["impl"] and "reference" in unfused["impl"]
    assert abs(chunked["loss"] - unfused["loss"]) < 1e-3 * abs(unfused["loss"])
    assert chunked["peak_MiB"] < 0.5 * unfused["peak_MiB"]  # N=4096, V=32000: ~385 vs ~1400


def test_bench_generate_quick_records_cached_and_uncached(tmp_path):
    out = tmp_path / "gen.json"
    stdout = run_script("bench_generate.py", "--quick", "--no-peer", "--out", str(out))
    assert "cost growth" in stdout
    data = json.loads(out.read_text())
    assert [r["L"] for r in data["rows"]] == [64, 128, 256]
    for row in data["rows"]:
        assert row["new_tokens"] == row["L"] // 2 and row["ours_cached_decode_tok_s"] > 0
        assert row["ours_uncached_total_s"] > 0 and row["peer_decode_tok_s"] is None
    assert len(data["growth"]) == 2


def test_bench_decode_records_each_variant_and_token_parity(tmp_path):
    out = tmp_path / "decode.json"
    args = ["--presets", "seed", "--vocab", "256", "--parts", "step", "--modes", "eager",
            "--new-tokens", "4", "--repeats", "1", "--out", str(out)]  # fmt: skip
    run_script("bench_decode.py", *args)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["weights"], r["layout"]) for r in rows] == [
        ("eager", "fp32", "row"), ("eager", "fp32", "col"),
        ("eager", "int8", "row"), ("eager", "int8", "col"),
    ]  # fmt: skip
    assert all(r["decode_tok_s"] > 0 for r in rows)
    assert rows[0]["same_tokens_as_eager_fp32"] is True
    assert rows[1]["same_tokens_as_eager_fp32"] is True  # the layout changes no token


def test_bench_decode_streams_both_layouts(tmp_path):
    out = tmp_path / "stream.json"
    run_script("bench_decode.py", "--presets", "seed", "--vocab", "256", "--parts", "stream",
               "--repeats", "1", "--out", str(out))  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["layout"] for r in rows] == ["row", "col"]
    assert all(r["gbytes_per_s"] > 0 and r["weight_gbytes"] > 0 for r in rows)


def test_autotune_refuses_without_cuda_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "autotune_kernels.py"), "--out", str(tmp_path / "t.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "t.json").exists()


def test_autotune_merge_replaces_only_its_arch():
    sys.path.insert(0, str(BENCH))
    try:
        import autotune_kernels
    finally:
        sys.path.remove(str(BENCH))
    old = {"_about": "x", "default": {"rmsnorm_fwd": {}}, "sm90": {"cross_entropy": {}}}
    entries = [("rmsnorm_fwd", "bf16", "n1024", {"block_m": 2, "num_warps": 4}),
               ("rmsnorm_fwd", "bf16", "n2048", {"block_m": 1, "num_warps": 8})]  # fmt: skip
    new = autotune_kernels.merge(old, "sm90", entries)
    assert new["default"] == old["default"] and new["_about"] == "x"
    assert new["sm90"] == {
        "cross_entropy": {},
        "rmsnorm_fwd": {
            "bf16": {
                "n1024": {"block_m": 2, "num_warps": 4},
                "n2048": {"block_m": 1, "num_warps": 8},
            }
        },
    }
    # ops this run did not tune keep their entries; the input is not modified
    assert new["sm90"]["cross_entropy"] == {} and old["sm90"] == {"cross_entropy": {}}


def test_autotune_quick_attention_checks_times_and_writes_its_entries(tmp_path):
    """The interpreter run of the attention sweep (2 points per op): each point checked
    against the reference and timed, the fastest written for the "cpu" arch's d32 class,
    the shipped table's other entries kept."""
    table, timings = tmp_path / "t.json", tmp_path / "timings.json"
    run_script("autotune_kernels.py", "--quick", "--ops", "attention", "--dtypes", "fp16",
               "--limit", "2", "--out", str(table), "--json", str(timings))  # fmt: skip
    cpu = json.loads(table.read_text())["cpu"]
    report = json.loads(timings.read_text())["ops"]
    assert [r["op"] for r in report] == list(attention_configs.OPS)
    for r in report:
        assert len(r["timings"]) == 2 and all(t["ok"] and t["ms"] > 0 for t in r["timings"])
        assert cpu[r["op"]]["fp16"]["d32"] == r["best"]
        assert r["best"] in [{k: t[k] for k in r["best"]} for t in r["timings"]]
    assert "linear_cross_entropy" in cpu  # the arch's untuned op is kept


def test_bench_packing_records_padding_and_both_phases(tmp_path):
    out = tmp_path / "packing.json"
    args = ["--limit", "80", "--pretrain-steps", "2", "--sft-steps", "2", "--batch", "4"]
    stdout = run_script("bench_packing.py", *args, "--json", str(out))
    assert "pretraining" in stdout and "SFT" in stdout
    rep = json.loads(out.read_text())
    assert set(rep["pretrain"]) == {"no_mask", "doc_mask"}
    for name in ("chat.json", "heldout (ours)"):
        rows = rep["sft"][name]
        assert set(rows) == {"padded", "packed", "packed_equal_targets"}
        for r in rows.values():
            assert 0.0 <= r["pad_fraction"] < 1.0 and r["targets"] > 0
        assert rows["packed"]["targets_per_s"] > 0 and rows["padded"]["targets_per_s"] > 0
    assert any(
        "split at turn boundaries" in n for n in rep["sft"]["heldout (ours)"]["packed"]["notes"]
    )
