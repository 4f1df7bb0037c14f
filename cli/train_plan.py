"""llm-train --plan: print what a run will need (engine.train.plan) instead of training,
as text or, with --json, as one JSON object per phase. And --batch-size auto."""

from __future__ import annotations

import json

AUTO_GLOBAL_BATCH = 16  # --batch-size auto: the global batch per process is 16 x --grad-accum


def _gib(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def format_plan(p: dict) -> str:
    """The plan of one phase as a few aligned lines."""
    m, fit = p["memory"], p["fit"]
    where = f"{p['device']}, {p['dtype']}, backend {p['backend']}"
    where += ", compiled" if p["compile"] else ""
    where += ", guard on" if p["guard"] else ", guard off"
    lines = [
        f"plan for {p['phase']} ({where})",
        f"  parameters        {p['parameters']:,}",
        f"  data              {p['data_tokens']:,} tokens, {p['train_examples']:,} training "
        f"examples of {p['seq_len']} tokens",
        f"  steps             {p['steps']:,} x {p['tokens_per_step']:,} tokens = "
        f"{p['epochs']:.2f} epochs",
        f"  memory per micro-batch of {p['batch_size']} x {p['seq_len']} tokens:",
    ]
    for part in ("weights", "grads", "optimizer", "guard", "activations", "ce"):
        name = {"ce": "cross-entropy", "guard": "guard snapshots"}.get(part, part)
        lines.append(f"    {name:<16}{_gib(m[part]):>12}")
    kind = "allocated" if p["device"] == "cuda" else "process RSS"
    lines.append(f"    {'peak (' + kind + ')':<16}{_gib(p['peak_bytes']):>12}")
    if fit["micro_batch"]:
        lines.append(
            f"  fits              micro-batch up to {fit['max_micro_batch']} "
            f"({_gib(fit['available_bytes'])} available); for the global batch of "
            f"{fit['global_batch']}: --batch-size {fit['micro_batch']} "
            f"--grad-accum {fit['grad_accum']}"
        )
    else:
        lines.append(
            f"  fits              no micro-batch fits in {_gib(fit['available_bytes'])}: "
            "lower --seq-len or choose a smaller model"
        )
    lines.append(
        f"  compute           {p['flops_per_token'] / 1e6:,.1f} MFLOP per token, "
        f"{p['flops_total'] / 1e12:,.2f} TFLOP in all"
    )
    if "probe" in p:
        pr = p["probe"]
        steps = ", ".join(f"{t:.2f}" for t in pr["step_seconds"])
        lines.append(
            f"  probe             {len(pr['step_seconds'])} steps of {pr['micro_batch']} x "
            f"{p['seq_len']} tokens ({steps} s): "
            f"{pr['tokens_per_second']:,.0f} tokens/s, "
            f"{pr['flops_per_second'] / 1e9:,.1f} GFLOP/s, measured peak "
            f"{_gib(pr['measured_peak_bytes'])}"
        )
        lines.append(
            f"  expected time     {_duration(pr['expected_seconds'])} for {p['steps']:,} steps "
            f"of {pr['grad_accum']} micro-batches"
        )
    ck = p["checkpoint_bytes"]
    guard = f" + {_gib(ck['guard_file'])} guard snapshots" if ck["guard_file"] else ""
    lines.append(
        f"  checkpoint        {_gib(ck['resumable'])} resumable (weights "
        f"{_gib(ck['weights'])}){guard}"
    )
    return "\n".join(lines)


def print_plans(plans: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(plans[0] if len(plans) == 1 else plans, indent=2))
    else:
        print("\n".join(format_plan(p) for p in plans))


def auto_batch(model_config, config, device, seq_len: int, grad_accum: int) -> tuple[int, int]:
    """(batch size, grad accum) for --batch-size auto: the global batch stays
    AUTO_GLOBAL_BATCH x grad_accum; the micro-batch is the largest of its divisors that
    fits (engine.train.plan.fit_batch)."""
    from tritonlm.engine.train.plan import fit_batch
    from tritonlm.engine.train.train_config import TrainingError

    want = config.replace(batch_size=AUTO_GLOBAL_BATCH, grad_accum=grad_accum)
    fit = fit_batch(model_config, want, device, seq_len)
    if not fit["micro_batch"]:
        raise TrainingError(
            f"--batch-size auto: not even one sequence of {seq_len} tokens fits in "
            f"{_gib(fit['available_bytes'])}; lower --seq-len"
        )
    return fit["micro_batch"], fit["grad_accum"]
