"""End-to-end checks and training throughput for gpu_check, through the engine's Trainer.

Data: a synthetic corpus drawn from a fixed random Markov chain (each token has 8
possible successors with Zipf weights), so the loss has somewhere to go (from ln V to
about the chain's entropy) and two correct implementations trace the same curve.

Loss-curve tolerance (triton vs torch backend, same seed, same batches, bf16 autocast):
two bf16 runs of different kernels are different roundings of the same trajectory and
drift apart step by step, so single steps are not compared. The 20-step moving averages
must stay within ``CURVE_TOL`` = 0.15 nats of each other at every step, and the last 20
steps' means within ``FINAL_TOL`` = 0.05 nats + 2%. A wrong gradient or a masked-out
position shows as a systematic gap far larger than that.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from gpu_check_speed import _mem_peak, _mem_reset
from tritonlm.engine.data.token_cache import TokenCache
from tritonlm.engine.model.config import ModelConfig
from tritonlm.engine.model.transformer import Transformer
from tritonlm.engine.train.batches import PretrainWindows
from tritonlm.engine.train.loop import Trainer
from tritonlm.engine.train.train_config import TrainConfig

CURVE_TOL = 0.15
FINAL_TOL = 0.05
FINAL_REL = 0.02
WINDOW = 20


def markov_tokens(vocab: int, n: int, seed: int) -> np.ndarray:
    """n tokens of a random sparse Markov chain over `vocab` symbols (uint32)."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, vocab, size=(vocab, 8))
    p = 1.0 / np.arange(1, 9)
    p /= p.sum()
    choice = rng.choice(8, size=n, p=p)
    out = np.empty(n, dtype=np.int64)
    out[0] = rng.integers(vocab)
    for i in range(1, n):  # a plain loop: a few hundred thousand steps is well under a second
        out[i] = succ[out[i - 1], choice[i]]
    return out.astype(np.uint32 if vocab > 65535 else np.uint16)


def synthetic_data(cfg: ModelConfig, n_tokens: int, seed: int) -> PretrainWindows:
    tokens = markov_tokens(cfg.vocab_size, n_tokens, seed)
    cache = TokenCache(
        path=Path("/nonexistent/gpu_check"),
        kind="pretrain",
        key="gpu_check",
        tokens=tokens,
        doc_offsets=np.array([0, n_tokens], dtype=np.int64),
        doc_bytes=np.array([n_tokens * 4], dtype=np.int64),
        mask=None,
        vocab_size=cfg.vocab_size,
    )
    return PretrainWindows(cache, cfg.max_seq_len, val_fraction=0.0, seed=seed)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_run(cfg, data, *, backend, steps, batch, device, dtype, seed, compile=False,
              timed_from=None):  # fmt: skip
    """Train a fresh model with the Trainer; return (model, losses, seconds per timed step).

    With ``timed_from`` the loop syncs at that step and at the end (log_every), and the
    time between the two progress events (both after a device sync) is the timed span."""
    log_every = timed_from if timed_from else steps
    tc = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, eval_every=0, val_fraction=0.0,
                     device=device, backend=backend, dtype=dtype, seed=seed, compile=compile,
                     log_every=log_every)  # fmt: skip
    marks: dict[int, float] = {}

    def progress(event: dict) -> None:
        if event.get("event") == "step":
            marks[event["step"]] = time.perf_counter()

    torch.manual_seed(seed)
    model = Transformer(cfg)
    result = Trainer(model, data, tc, progress=progress).run()
    _sync(device)
    losses = [r["loss"] for r in result.history if r.get("loss") is not None]
    per_step = None
    if timed_from and timed_from in marks and steps in marks and steps > timed_from:
        per_step = (marks[steps] - marks[timed_from]) / (steps - timed_from)
    return model, losses, per_step


def moving_average(xs: list[float], w: int) -> list[float]:
    w = max(1, min(w, len(xs)))
    c = np.cumsum([0.0, *xs])
    return list((c[w:] - c[:-w]) / w)


@torch.no_grad()
def greedy(model, prompt: list[int], n: int, device: str, amp: torch.dtype | None) -> list[int]:
    """n greedy tokens by full forwards (the training kernels' path, no KV cache)."""
    model.eval()
    ids = torch.tensor([prompt], device=device)
    for _ in range(n):
        with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(ids)[:, -1].float()
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt) :].tolist()


def _prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def end_to_end(
    preset: str,
    vocab: int,
    steps: int,
    batch: int,
    device: str,
    overrides: dict | None = None,
    n_gen: int = 64,
    seed: int = 1234,
) -> dict:
    # fmt: skip
    """Train triton and torch backends from one seed; compare curves and greedy outputs."""
    cfg = ModelConfig.preset(preset, vocab, **(overrides or {}))
    data = synthetic_data(cfg, max(steps * batch * (cfg.max_seq_len + 1) + 4096, 50_000), seed)
    dtype = "bfloat16" if device == "cuda" else "float32"
    amp = torch.bfloat16 if device == "cuda" else None
    runs = {}
    for backend in ("triton", "torch"):
        t0 = time.perf_counter()
        model, losses, _ = train_run(cfg, data, backend=backend, steps=steps, batch=batch,
                                     device=device, dtype=dtype, seed=seed)  # fmt: skip
        runs[backend] = {"model": model, "losses": losses, "seconds": time.perf_counter() - t0}
    a, b = runs["triton"]["losses"], runs["torch"]["losses"]
    ma, mb = moving_average(a, WINDOW), moving_average(b, WINDOW)
    curve_gap = max(abs(x - y) for x, y in zip(ma, mb, strict=True))
    fa, fb = statistics.fmean(a[-WINDOW:]), statistics.fmean(b[-WINDOW:])
    final_ok = abs(fa - fb) <= FINAL_TOL + FINAL_REL * fb
    prompt = markov_tokens(vocab, min(16, cfg.max_seq_len - n_gen), seed).tolist()  # same chain
    gen = {}  # (model trained with, backend run with, autocast) -> greedy tokens
    precisions = [("bf16", amp), ("fp32", None)] if amp is not None else [("fp32", None)]
    for label, amp_ in precisions:
        for model_name, backend in (("triton", "triton"), ("triton", "torch"), ("torch", "torch")):
            m = runs[model_name]["model"]
            m.backend = backend
            gen[f"{model_name}_model_{backend}_{label}"] = greedy(m, prompt, n_gen, device, amp_)
    low = precisions[0][0]  # the training precision
    same_w_low = _prefix(gen[f"triton_model_triton_{low}"], gen[f"triton_model_torch_{low}"])
    same_w_fp32 = _prefix(gen["triton_model_triton_fp32"], gen["triton_model_torch_fp32"])
    cross = _prefix(gen[f"triton_model_triton_{low}"], gen[f"torch_model_torch_{low}"])
    return {
        "preset": preset,
        "overrides": overrides,
        "vocab": vocab,
        "steps": steps,
        "batch": batch,
        "seq_len": cfg.max_seq_len,
        "dtype": dtype,
        "loss_first": [a[0], b[0]],
        "loss_final_mean": {"triton": fa, "torch": fb},
        "max_moving_avg_gap": curve_gap,
        "curve_tol": CURVE_TOL,
        "curve_ok": curve_gap <= CURVE_TOL and final_ok,
        "losses": {"triton": a, "torch": b},
        "seconds": {k: v["seconds"] for k, v in runs.items()},
        "greedy_tokens": n_gen,
        "greedy_precision": low,
        "greedy_same_weights_match": same_w_low,
        "greedy_same_weights_match_fp32": same_w_fp32,
        "greedy_cross_trained_match": cross,
        # the issue's wording: the two trained models' greedy outputs identical. Reported, not
        # gated: two bf16 trajectories may rank a near-tie differently without any bug.
        "issue_greedy_identical": cross == n_gen,
        "generations": gen,
        "ok": curve_gap <= CURVE_TOL and final_ok and same_w_fp32 == n_gen,
    }


# -- throughput ------------------------------------------------------------------------

H100_BF16_DENSE = 989e12  # H100 SXM datasheet, dense bf16 tensor-core FLOP/s


def ours_throughput(preset, vocab, batch, steps, warmup, device, backend, compile=False,
                    overrides=None) -> dict:  # fmt: skip
    cfg = ModelConfig.preset(preset, vocab, **(overrides or {}))
    data = synthetic_data(cfg, (steps + 2) * batch * (cfg.max_seq_len + 1) + 4096, 7)
    _mem_reset()
    dtype = "bfloat16" if device == "cuda" else "float32"
    model, losses, per_step = train_run(cfg, data, backend=backend, steps=steps, batch=batch,
                                        device=device, dtype=dtype, seed=7,
                                        compile=compile, timed_from=warmup)  # fmt: skip
    peak = _mem_peak()
    flops_tok = model.flops_per_token(cfg.max_seq_len)
    del model
    return _throughput_record(cfg, batch, per_step, peak, flops_tok, losses[-1])


def hf_throughput(preset, vocab, batch, steps, warmup, device, overrides=None) -> dict:
    """transformers' LlamaForCausalLM of the same shape, SDPA attention, same optimizer."""
    from peers import llama_config
    from transformers import LlamaForCausalLM

    cfg = ModelConfig.preset(preset, vocab, **(overrides or {}))
    _mem_reset()
    torch.manual_seed(7)
    hf_cfg = llama_config(cfg, attention_dropout=0.0, use_cache=False)
    hf_cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_cfg).to(device)
    model.config._attn_implementation = "sdpa"
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), fused=device == "cuda",
    )  # fmt: skip
    T = cfg.max_seq_len
    gen = torch.Generator().manual_seed(7)
    loss = None
    t0 = None
    for s in range(steps):
        if s == warmup:
            _sync(device)
            t0 = time.perf_counter()
        ids = torch.randint(0, cfg.vocab_size, (batch, T), generator=gen).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.detach()
    _sync(device)
    per_step = (time.perf_counter() - t0) / (steps - warmup)
    peak = _mem_peak()
    del model, opt
    flops_tok = Transformer.flops_per_token.__get__(_Shape(cfg))(T)
    return _throughput_record(cfg, batch, per_step, peak, flops_tok, float(loss))


class _Shape:
    """Just enough of a Transformer for flops_per_token (same count for the peer)."""

    def __init__(self, cfg):
        self.config = cfg


def _throughput_record(cfg, batch, per_step, peak, flops_tok, loss) -> dict:
    tokens = batch * cfg.max_seq_len
    tps = tokens / per_step if per_step else None
    return {
        "batch": batch,
        "seq_len": cfg.max_seq_len,
        "params": cfg.num_parameters(),
        "step_ms": None if per_step is None else per_step * 1e3,
        "tokens_per_s": tps,
        "model_flops_per_token": flops_tok,
        "achieved_tflops": None if tps is None else tps * flops_tok / 1e12,
        "mfu_vs_989": None if tps is None else tps * flops_tok / H100_BF16_DENSE,
        "peak_mem_gib": peak / 2**30,
        "last_loss": loss,
    }
