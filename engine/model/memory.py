"""How much memory a model or a step needs, and how much this machine has: refuse what
cannot fit with one clear line instead of stalling in swap or being OOM-killed."""

from __future__ import annotations

import torch

from .config import ModelConfig


def available_memory(device: torch.device) -> int | None:
    """Bytes a run can still allocate on ``device`` (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:  # MemAvailable counts reclaimable page cache
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def high_water_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM of its own address space. Not
    ru_maxrss, which Linux carries over from the parent's RSS at fork across exec (a run
    started by a big process would report that process's size)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def build_bytes(cfg: ModelConfig) -> int:
    """Building the model: float32 weights (and as much again while initializing), plus
    the RoPE tables over max_seq_len positions and their temporaries."""
    return cfg.num_parameters() * 4 * 2 + cfg.max_seq_len * cfg.head_dim * 4 * 8


def cache_bytes(cfg: ModelConfig, batch_size: int, max_len: int, itemsize: int = 4) -> int:
    """A KV cache of ``batch_size`` rows of ``max_len`` slots: keys and values per layer."""
    return 2 * cfg.n_layers * batch_size * cfg.n_kv_heads * max_len * cfg.head_dim * itemsize


def step_bytes(cfg: ModelConfig, batch_size: int, seq_len: int) -> int:
    """A rough lower bound of one training step (float32): weights, gradients and two AdamW
    moments, per-token activations of every block and one chunk of logits. Meant to refuse
    runs that cannot fit, not to predict the peak."""
    tokens = batch_size * seq_len
    per_token = cfg.n_layers * (10 * cfg.d_model + 3 * cfg.d_ff) * 4  # saved activations
    logits = min(tokens, 8192) * cfg.vocab_size * 4 * 2  # a chunk of logits and its grad
    return 16 * cfg.num_parameters() + tokens * per_token + logits


def too_big(need: int, device: torch.device) -> str | None:
    """None when ``need`` bytes fit on ``device``; else the reason, for an error message."""
    have = available_memory(device)
    if have is None or need <= have:
        return None
    return f"needs {need / 2**30:.1f} GiB, {device.type} has {have / 2**30:.1f} GiB available"


# ----------------------------------------------------------------------------- a step's peak

# Bytes of saved activations per token and layer, as multiples of d_model and d_ff
# elements: measured against the peak RSS of real steps of the torch reference path
# (tests/test_plan.py holds the model to 15%). The Triton kernels save less (no
# normalized copies, no attention probabilities), so this stays an upper bound there.
ACT_PER_D, ACT_PER_FF = 16, 5
# Full-logit cross-entropy (torch reference): logits, log-softmax, and their gradient.
CE_FULL_COPIES = 3
# Fused cross-entropy (Triton): one chunk of logits, its gradient written in place, plus
# the float32 weight-gradient accumulator counted with the gradients.
CE_CHUNK_COPIES = 2
# What a training process holds beyond its tensors on the CPU (autograd, thread pools,
# allocator slack): measured as about 90-100 MiB over the steps of every preset.
CPU_RUNTIME_BYTES = 96 << 20
GUARD_SNAPSHOTS = 2  # the guard keeps two copies of weights + AdamW moments


def step_memory(cfg: ModelConfig, batch_size: int, seq_len: int, *, grad_accum: int = 1,
                amp_bytes: int = 4, fused_ce: bool = False, guard: bool = True,
                ce_chunk_rows: int | None = None) -> dict[str, int]:  # fmt: skip
    """Bytes a training process holds at its peak, by part, for one micro-batch of
    ``batch_size`` x ``seq_len`` tokens (parameters and optimizer in float32; activations
    at ``amp_bytes`` per element: 2 under bfloat16 autocast).

    Parts: weights, grads, optimizer (AdamW's two moments), guard (its snapshots),
    activations (saved for backward, every block), ce (the cross-entropy's logits: all of
    them on the torch path, one chunk of ``ce_chunk_rows`` rows with the fused kernel).
    """
    n = cfg.num_parameters()
    tokens = batch_size * seq_len
    per_token = cfg.n_layers * (ACT_PER_D * cfg.d_model + ACT_PER_FF * cfg.d_ff) * amp_bytes
    if fused_ce:
        rows = min(tokens, ce_chunk_rows or tokens)
        ce = rows * cfg.vocab_size * 4 * CE_CHUNK_COPIES
    else:
        ce = tokens * cfg.vocab_size * 4 * CE_FULL_COPIES
    return {
        "weights": 4 * n,
        "grads": 4 * n,
        "optimizer": 8 * n,
        "guard": GUARD_SNAPSHOTS * 12 * n if guard else 0,
        "activations": tokens * per_token + tokens * cfg.d_model * 4 * 2,  # + the embeddings
        "ce": ce,
    }
