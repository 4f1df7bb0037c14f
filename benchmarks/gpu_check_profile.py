"""Where one training step's time goes: a torch.profiler table for gpu_check.

The MFU gap of issue #21 must be attributed, not guessed: this trains a model with the
engine's Trainer for a few warm-up steps, records exactly one step with torch.profiler,
and keeps the top kernels by their own device time (CUDA; on the CPU smoke run, CPU
operator time), each with its share of the step's wall time and of the time the device
was busy.
"""

from __future__ import annotations

import time

import torch
from gpu_check_train import synthetic_data
from tritonlm.engine.model.config import ModelConfig
from tritonlm.engine.model.transformer import Transformer
from tritonlm.engine.train.loop import Trainer
from tritonlm.engine.train.train_config import TrainConfig


def _self_us(event, cuda: bool) -> float:
    """An averaged event's own time in microseconds: device time for CUDA, else CPU."""
    if cuda:
        for name in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, name):
                return float(getattr(event, name))
        return 0.0
    return float(event.self_cpu_time_total)


def top_rows(events, cuda: bool, step_ms: float | None, top: int) -> tuple[list[dict], float]:
    """(the `top` events by own time, as rows with shares; total own time in ms)."""
    timed = [(e, _self_us(e, cuda)) for e in events]
    timed = [(e, us) for e, us in timed if us > 0]
    busy_ms = sum(us for _, us in timed) / 1e3
    timed.sort(key=lambda item: -item[1])
    rows = []
    for e, us in timed[:top]:
        ms = us / 1e3
        rows.append({
            "name": e.key,
            "calls": int(e.count),
            "ms": ms,
            "share_of_step": ms / step_ms if step_ms else None,
            "share_of_busy": ms / busy_ms if busy_ms else None,
        })  # fmt: skip
    return rows, busy_ms


def profile_step(preset, vocab, batch, warmup, device, overrides=None, backend="triton",
                 top=15) -> dict:  # fmt: skip
    """Profile the step after `warmup` steps of a fresh `preset` model (bf16 on CUDA)."""
    cfg = ModelConfig.preset(preset, vocab, **(overrides or {}))
    steps = warmup + 1
    data = synthetic_data(cfg, (steps + 2) * batch * (cfg.max_seq_len + 1) + 4096, 7)
    cuda = device == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=0, warmup=warmup, active=1, repeat=1)
    tc = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, eval_every=0, val_fraction=0.0,
                     device=device, backend=backend, dtype="bfloat16" if cuda else "float32",
                     seed=7, log_every=1)  # fmt: skip
    marks: list[float] = []
    torch.manual_seed(7)
    model = Transformer(cfg)
    with torch.profiler.profile(activities=activities, schedule=schedule) as prof:

        def progress(event: dict) -> None:
            if event.get("event") == "step":
                if cuda:
                    torch.cuda.synchronize()
                marks.append(time.perf_counter())
                prof.step()

        Trainer(model, data, tc, progress=progress).run()
    step_ms = (marks[-1] - marks[-2]) * 1e3 if len(marks) >= 2 else None
    rows, busy_ms = top_rows(prof.key_averages(), cuda, step_ms, top)
    return {
        "preset": preset,
        "backend": backend,
        "batch": batch,
        "seq_len": cfg.max_seq_len,
        "time_kind": "cuda kernel" if cuda else "cpu operator",
        "step_ms": step_ms,
        "busy_ms": busy_ms,
        "top": rows,
    }
