"""The short table gpu_check prints last, and the issue's H100 goals read off the report."""

from __future__ import annotations


def goals(report: dict) -> dict:
    """The issue's H100 goals, each True/False, or None where not measured."""
    res = report["results"]
    out: dict[str, bool | None] = {}

    def attention_ratios(D: int, t_min: int, gqa: bool = False) -> list[float]:
        rows = [r for r in res.get("attention", []) if r.get("D") == D
                and r.get("T", 0) >= t_min and (r.get("group", 1) > 1) == gqa]  # fmt: skip
        return [r["ours_vs_best_sdpa"] for r in rows if r.get("ours_vs_best_sdpa") is not None]

    def at_least(xs: list[float], bound: float) -> bool | None:
        return min(xs) >= bound if xs else None

    out["attention >= 0.9x best SDPA (T>=2048, D128)"] = at_least(attention_ratios(128, 2048), 0.9)
    out["#21 attention >= 0.9x best SDPA (T>=1024, D128)"] = at_least(
        attention_ratios(128, 1024), 0.9
    )
    d64 = attention_ratios(64, 1024)
    out["#21 attention >= 1.0x best SDPA (T>=1024, D64)"] = at_least(d64, 1.0)
    out["#21 GQA attention >= 1.0x SDPA on expanded k/v"] = at_least(
        attention_ratios(128, 1024, gqa=True), 1.0
    )
    rms_rows = [r for r in res.get("rmsnorm", []) if "ours" in r]
    fr = [r["ours"].get("frac_of_copy") for r in rms_rows]
    out["rmsnorm >= 80% of copy bandwidth"] = min(fr) >= 0.8 if fr and None not in fr else None
    comp = [r for r in rms_rows if "torch_compile" in r]
    out["rmsnorm faster than torch.compile"] = (
        all(r["ours"]["fwd_bwd_ms"] < r["torch_compile"]["fwd_bwd_ms"] for r in comp)
        if comp else None
    )  # fmt: skip
    lce = [r for r in res.get("lce", []) if r.get("mem_ratio") is not None]
    out["fused linear CE <= 25% eager memory"] = (
        all(r["mem_ratio"] <= 0.25 for r in lce) if lce else None
    )
    out["fused linear CE <= 1.1x eager time"] = (
        all(r["time_ratio"] <= 1.1 for r in lce) if lce else None
    )
    # issue #21's stricter targets, next to #10's (same runs, new names)
    wide = [r["ours"].get("frac_of_copy") for r in rms_rows if r.get("d", 0) >= 2048]
    out["#21 rmsnorm >= 70% of copy bandwidth (d >= 2048)"] = (
        min(wide) >= 0.7 if wide and None not in wide else None
    )
    out["#21 fused linear CE <= 1.0x eager time"] = (
        all(r["time_ratio"] <= 1.0 for r in lce) if lce else None
    )
    train = {r["item"]: r for r in res.get("train", []) if "tokens_per_s" in r}
    g = train.get("gpt2 ours triton")
    out["gpt2 MFU >= 45%"] = g["mfu_vs_989"] >= 0.45 if g and g["mfu_vs_989"] else None
    out["#21 gpt2 MFU >= 40%"] = g["mfu_vs_989"] >= 0.40 if g and g["mfu_vs_989"] else None
    for preset in ("gpt2", "small"):
        ours, peer = (
            train.get(f"{preset} ours triton"),
            train.get(f"{preset} transformers llama sdpa"),
        )
        ok = None
        if ours and peer and ours["tokens_per_s"] and peer["tokens_per_s"]:
            ok = ours["tokens_per_s"] >= 1.2 * peer["tokens_per_s"]
        out[f"{preset} >= 1.2x transformers tokens/s"] = ok
    # issue #21: small's Triton backend at least its torch backend, both >= 1.3x transformers
    names = ("ours triton", "ours torch", "transformers llama sdpa")
    rate = {k: train[f"small {k}"]["tokens_per_s"] for k in names if f"small {k}" in train}
    if len(rate) == 3 and all(rate.values()):
        peer = 1.3 * rate["transformers llama sdpa"]
        out["#21 small triton >= torch backend"] = rate["ours triton"] >= rate["ours torch"]
        slower = min(rate["ours triton"], rate["ours torch"])
        out["#21 small both backends >= 1.3x transformers"] = slower >= peer
    else:
        out["#21 small triton >= torch backend"] = None
        out["#21 small both backends >= 1.3x transformers"] = None
    return out


def _f(x, fmt="{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def _correctness(res: dict) -> list[str]:
    corr = res.get("correctness", [])
    ran = [r for r in corr if "skipped" not in r]
    scored = [(max(r["rel_err"].values()) / r["tol"], r["item"]) for r in ran if "rel_err" in r]
    worst = max(scored, default=(None, "-"))
    failed = [r for r in ran if not r.get("ok")]
    nondet = sum(1 for r in ran if r.get("deterministic") is False)
    lines = [
        f"correctness: {len(ran)} run, {len(failed)} failed, {len(corr) - len(ran)} skipped; "
        f"worst err/tol {_f(worst[0])} ({worst[1]}); nondeterministic {nondet}"
    ]
    lines += [f"  FAIL {r['item']}: {r.get('error') or r.get('rel_err')}" for r in failed]
    return lines


def _e2e(res: dict) -> list[str]:
    lines = []
    for r in res.get("e2e", []):
        if "error" in r:
            lines.append(f"e2e {r['item']}: ERROR {r['error']}")
        if "losses" not in r:
            continue
        f, n = r["loss_final_mean"], r["greedy_tokens"]
        lines.append(
            f"e2e {r['item']}: final loss triton {f['triton']:.4f} torch {f['torch']:.4f}, "
            f"max 20-step avg gap {r['max_moving_avg_gap']:.3f} (tol {r['curve_tol']}): "
            + ("ok" if r["ok"] else "FAIL")
        )
        lines.append(
            f"  greedy {n} tokens, same weights triton vs torch backend: "
            f"{r['greedy_precision']} {r['greedy_same_weights_match']}/{n}, "
            f"fp32 {r['greedy_same_weights_match_fp32']}/{n}; "
            f"triton-trained vs torch-trained {r['greedy_cross_trained_match']}/{n}"
        )
    return lines


def _attention(res: dict) -> list[str]:
    rows = [r for r in res.get("attention", []) if "ours" in r]
    if not rows:
        return []
    lines = ["attention causal TFLOP/s       T    D  gqa  ours fwd  bwd  fwd+bwd  best-sdpa  ratio"]
    for r in sorted(rows, key=lambda r: (r["D"], r.get("group", 1), r["T"])):
        o = r["ours"]
        best = r.get("best_sdpa_fwd_bwd_tflops")
        lines.append(
            f"{'':25s}{r['T']:6d} {r['D']:4d} {r.get('group', 1):4d} "
            f"{_f(o.get('fwd_tflops'), '{:8.0f}')} {_f(o.get('bwd_tflops'), '{:4.0f}')} "
            f"{_f(o.get('fwd_bwd_tflops'), '{:8.0f}')} {_f(best, '{:10.0f}')}"
            f"  {_f(r.get('ours_vs_best_sdpa'), '{:.2f}')}"
        )
    return lines


def _attention_packed(res: dict) -> list[str]:
    rows = [r for r in res.get("attention_packed", []) if "ours_packed" in r]
    if not rows:
        return []
    lines = ["attention packed fwd+bwd TFLOP/s  T    D  docs~  ours  sdpa-mask  ratio  vs-unmasked"]
    for r in rows:
        ours = r["ours_packed"].get("fwd_bwd_tflops")
        best = r.get("best_sdpa_masked_fwd_bwd_tflops")
        lines.append(
            f"{'':31s}{r['T']:6d} {r['D']:4d} {r['mean_doc_len']:5d} {_f(ours, '{:5.0f}')} "
            f"{_f(best, '{:10.0f}')}  {_f(r.get('packed_vs_best_sdpa'), '{:5.2f}')}  "
            f"{_f(r.get('packed_speedup_vs_unmasked'), '{:.2f}x')}"
        )
    return lines


def _train(res: dict) -> list[str]:
    rows = [r for r in res.get("train", []) if "tokens_per_s" in r or "error" in r]
    if not rows:
        return []
    ceil = [r for r in res.get("ceilings", []) if "matmul_bf16_tflops" in r]
    mm = ceil[0]["matmul_bf16_tflops"] if ceil else None
    lines = ["training                          tok/s  MFU(989)  MFU(matmul)  peak GiB"]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['item']:30s} ERROR {r['error'][:80]}")
            continue
        mfu_mm = r["achieved_tflops"] / mm if mm and r["achieved_tflops"] else None
        lines.append(
            f"  {r['item']:30s}{_f(r['tokens_per_s'], '{:9.0f}')}  "
            f"{_f(r['mfu_vs_989'], '{:7.1%}')}  {_f(mfu_mm, '{:10.1%}')}  "
            f"{r['peak_mem_gib']:8.2f}"
        )
    return lines


def _kernels(res: dict) -> list[str]:
    lines = []
    for r in res.get("rmsnorm", []):
        if "ours" in r:
            peers = ", ".join(
                f"{k} {v['GBps']:.0f}" for k, v in r.items() if isinstance(v, dict) and k != "ours"
            )
            frac = _f(r["ours"].get("frac_of_copy"), "{:.0%}")
            lines.append(
                f"rmsnorm fwd+bwd N{r['N']} d{r['d']}: ours {r['ours']['GBps']:.0f} GB/s "
                f"({frac} of copy); {peers}"
            )
    for r in res.get("lce", []):
        if "time_ratio" in r:
            o, e = r["ours"], r["eager"]
            liger = r.get("liger")
            vs_liger = f"; liger {liger['fwd_bwd_ms']:.2f} ms" if liger else ""
            lines.append(
                f"fused linear CE V{r['V']}: memory {_f(r['mem_ratio'], '{:.0%}')} of eager "
                f"({o['peak_extra_gib']:.2f} vs {e['peak_extra_gib']:.2f} GiB), time "
                f"{r['time_ratio']:.2f}x ({o['fwd_bwd_ms']:.2f} vs {e['fwd_bwd_ms']:.2f} ms)"
                f"{vs_liger}"
            )
    return lines


def profile_lines(rec: dict, width: int = 64) -> list[str]:
    """One profiled step as a table: own time, calls, shares of the step and of the busy
    device, name (cut to `width` characters).

    Example line: "   12.31 ms   24 calls  18.2% step  20.1% busy  sm90_xmma_gemm_bf16..."
    """
    step = _f(rec.get("step_ms"), "{:.2f}")
    head = (f"profile {rec['preset']} {rec['backend']} one step: {step} ms, "
            f"{rec['busy_ms']:.2f} ms {rec['time_kind']} time; top {len(rec['top'])}:")  # fmt: skip
    lines = [head]
    for row in rec["top"]:
        name = row["name"] if len(row["name"]) <= width else row["name"][: width - 3] + "..."
        lines.append(
            f"  {row['ms']:8.2f} ms {row['calls']:5d} calls "
            f"{_f(row['share_of_step'], '{:6.1%}')} step {_f(row['share_of_busy'], '{:6.1%}')} "
            f"busy  {name}"
        )
    return lines


def _profile(res: dict) -> list[str]:
    lines = []
    for r in res.get("profile", []):
        if "top" in r:
            lines += profile_lines(r)
    return lines


def print_table(report: dict) -> None:
    """The summary, printed last (the device reply carries the end of the output)."""
    res, env = report["results"], report["env"]
    lines = [
        f"== gpu_check  {env.get('gpu', env['device'])}  torch {env['torch']}  "
        f"triton {env['triton']}  {report.get('elapsed_s', 0):.0f}s =="
    ]
    for r in res.get("ceilings", []):
        if "copy_GBps" in r:
            lines.append(
                f"ceilings: copy {r['copy_GBps']:.0f} GB/s, "
                f"matmul {r['matmul_bf16_tflops']:.0f} TFLOP/s ({r['dtype']})"
            )
    for r in res.get("autotune", []):
        if "table" in r:
            lines.append(
                f"autotune: attention tiles {r['worst_speedup']:.2f}-{r['best_speedup']:.2f}x "
                f"the shipped ones per kernel; later items ran with {r['table']}"
            )
    lines += _correctness(res) + _e2e(res) + _attention(res) + _attention_packed(res)
    lines += _train(res) + _kernels(res)
    lines += _profile(res)
    for section, rows in res.items():
        for r in rows:
            if "error" in r and section not in ("correctness", "e2e", "train"):
                lines.append(f"{section} {r['item']}: ERROR {r['error'][:100]}")
    skipped = [f"{s}:{r['item']}" for s, rows in res.items() for r in rows if "skipped" in r]
    if skipped:
        more = " ..." if len(skipped) > 8 else ""
        lines.append(f"skipped ({len(skipped)}): " + ", ".join(skipped[:8]) + more)
    for name, ok in report.get("goals", {}).items():
        lines.append(f"goal {name}: {'-' if ok is None else ('met' if ok else 'MISSED')}")
    failed = report.get("failed_checks", [])
    cut = " (cut at the hard limit)" if report.get("cut_at_hard_limit") else ""
    verdict = "FAILED " + "; ".join(failed) if failed else "all run checks passed"
    lines.append("RESULT: " + verdict + cut)
    print("\n".join(lines), flush=True)
