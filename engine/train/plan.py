"""What a training run will need, before it starts (``llm-train --plan``).

model shape + data + device --> memory per micro-batch by part (engine.model.memory)
  --> the largest micro-batch that fits and the grad-accum that keeps the global batch
  --> FLOPs per token, a measured 3-step probe on this device --> expected time
  --> checkpoint size on disk, peak memory of the process (host RSS on the CPU,
      allocated memory on CUDA)
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from tritonlm.kernels.cross_entropy import chunk_rows

from ..devices import resolve_device
from ..model.memory import CPU_RUNTIME_BYTES, available_memory, high_water_rss, step_memory
from .batches import batch_source
from .loop import Trainer
from .runtime import autocast_dtype
from .train_config import TrainConfig, TrainingError

PROBE_STEPS = 3


def resident_bytes() -> int:
    """This process's resident memory now (bytes; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _fused_ce(config: TrainConfig, device: torch.device) -> bool:
    """The Triton cross-entropy (chunked logits) runs; else the torch reference (all)."""
    return config.backend == "triton" or (config.backend == "auto" and device.type == "cuda")


def memory_at(cfg, config: TrainConfig, device: torch.device, batch: int, seq_len: int,
              resident: int) -> dict[str, int]:  # fmt: skip
    """Bytes by part for micro-batch ``batch``, with ``peak_bytes``: on the CPU the process
    RSS (``resident`` now, holding the built model, + runtime + the parts still to come);
    on CUDA the allocated memory (every part)."""
    amp = autocast_dtype(config, device)
    parts = step_memory(cfg, batch, seq_len, grad_accum=config.grad_accum,
                        amp_bytes=4 if amp is None else amp.itemsize,
                        fused_ce=_fused_ce(config, device), guard=config.guard,
                        ce_chunk_rows=chunk_rows(batch * seq_len, cfg.vocab_size))  # fmt: skip
    if device.type == "cuda":
        peak = sum(parts.values())
    else:  # the weights are already part of ``resident``
        peak = resident + CPU_RUNTIME_BYTES + sum(parts.values()) - parts["weights"]
    return {**parts, "peak_bytes": peak}


def fit_batch(cfg, config: TrainConfig, device: torch.device, seq_len: int,
              resident: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The largest micro-batch that fits this device's free memory, and the micro-batch and
    grad-accum that keep the requested global batch (batch_size x grad_accum per process):
    the largest divisor of it that fits."""
    resident = resident_bytes() if resident is None else resident
    have = available_memory(device)
    if have is not None and device.type != "cuda":
        have += resident  # MemAvailable does not count what this process already holds
    want = config.batch_size * config.grad_accum

    def fits(b: int) -> bool:
        return (
            have is None
            or memory_at(cfg, config, device, b, seq_len, resident)["peak_bytes"] <= have
        )

    if not fits(1):
        largest = 0
    else:
        lo, hi = 1, 2
        while hi <= 1 << 16 and fits(hi):
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # lo fits, hi does not (or is past the cap)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        largest = lo
    micro = max((d for d in range(1, want + 1) if want % d == 0 and d <= largest), default=0)
    return {"available_bytes": have, "max_micro_batch": largest, "global_batch": want,
            "micro_batch": micro, "grad_accum": want // micro if micro else None}  # fmt: skip


def _probe(model, data, config: TrainConfig, device: torch.device, micro: int) -> dict:
    """Train PROBE_STEPS steps of one micro-batch through the real loop (a logging boundary
    after each, so the guard takes its snapshots as in the run), timing each; the first
    includes warm-up (allocation, compilation), so the rate is the fastest other."""
    cfg = config.replace(batch_size=micro, grad_accum=1, steps=PROBE_STEPS, eval_every=0,
                         save_every=0, log_every=1, warmup=0)  # fmt: skip
    marks: list[float] = []

    def progress(ev: dict) -> None:
        if ev["event"] in ("start", "step"):
            marks.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    Trainer(model, data, cfg, progress=progress).run()
    elapsed = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = high_water_rss()
    times = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    # the fastest warm step: least disturbed by load (other torchrun ranks see no events)
    steady = min(times[1:] or times or [elapsed / PROBE_STEPS])
    return {"step_seconds": times, "seconds_per_micro_batch": steady,
            "measured_peak_bytes": peak}  # fmt: skip


def plan_run(model, tokenizer, cache, config: TrainConfig, *, device: torch.device | None = None,
             world_size: int = 1, probe: bool = True) -> dict[str, Any]:  # fmt: skip
    """The plan of one phase: everything ``llm-train --plan`` prints. ``probe`` trains
    ``model`` itself for PROBE_STEPS timed steps (its weights change: pass a copy to keep
    them); the rest is arithmetic."""
    resident = resident_bytes()  # before anything below allocates
    device = device or resolve_device(config.device)
    cfg = model.config
    seq_len = config.seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        raise TrainingError(f"seq_len {seq_len} exceeds the model's max_seq_len "
                            f"{cfg.max_seq_len}", field="seq_len")  # fmt: skip
    pad_id = getattr(tokenizer, "pad_id", 0) or 0
    data = batch_source(cache, config.phase, seq_len, config.val_fraction, config.seed, pad_id)
    n = model.num_parameters()
    per_step = config.batch_size * config.grad_accum * world_size  # sequences per step
    steps = config.steps or max(1, -(-int(config.epochs * data.n_train) // per_step))
    fit = fit_batch(cfg, config, device, seq_len, resident)
    # the run as given when its micro-batch fits, else the one the plan suggests
    fits = config.batch_size <= fit["max_micro_batch"]
    micro, accum = (config.batch_size, config.grad_accum) if fits else (
        fit["micro_batch"], fit["grad_accum"])  # fmt: skip
    memory = memory_at(cfg, config, device, config.batch_size, seq_len, resident)
    flops_token = model.flops_per_token(seq_len)
    tokens_step = per_step * seq_len
    plan: dict[str, Any] = {
        "phase": config.phase,
        "device": device.type,
        "dtype": str(autocast_dtype(config, device) or torch.float32).removeprefix("torch."),
        "backend": config.backend,
        "compile": config.compile,
        "guard": config.guard,
        "parameters": n,
        "seq_len": seq_len,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "data_tokens": int(cache.n_tokens),
        "train_examples": int(data.n_train),
        "steps": steps,
        "tokens_per_step": tokens_step,
        "epochs": steps * per_step / max(1, data.n_train),
        "memory": memory,
        "fit": fit,
        "flops_per_token": flops_token,
        "flops_total": flops_token * tokens_step * steps,
        "checkpoint_bytes": {
            "weights": 4 * n,
            "resumable": 12 * n,
            "guard_file": 24 * n if config.guard else 0,
        },  # fmt: skip
        "peak_bytes": memory["peak_bytes"],
    }
    if probe and micro:
        p = _probe(model, data, config, device, micro)
        p["micro_batch"], p["grad_accum"] = micro, accum
        # every process runs its grad_accum micro-batches per step, all at once
        p["expected_seconds"] = p["seconds_per_micro_batch"] * steps * accum
        p["tokens_per_second"] = micro * seq_len / p["seconds_per_micro_batch"]
        p["flops_per_second"] = p["tokens_per_second"] * flops_token
        plan["probe"] = p
    return plan
