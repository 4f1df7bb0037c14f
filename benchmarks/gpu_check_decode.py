"""Decode speed for gpu_check (issue 22): one stream, eager vs CUDA graphs, and the
scheduler's aggregate at 16 streams, next to transformers' generate with its static cache
and torch.compile, on models of the same shape.

Every figure is greedy decoding that never stops early (no stop tokens). One stream:
decode tokens/s = (new tokens - 1) / (total - time to first token), best of 3 after a
warm-up (which also captures the graphs). The graphs' tokens must equal the eager ones
("tokens_match"). Without CUDA the "graphs" mode falls back to eager and says so
("fallback"), which is what the quick CPU run checks.
"""

from __future__ import annotations

import time

import torch


def _model(preset: str, vocab: int, device: str, overrides: dict | None):
    from tritonlm.engine.model.config import ModelConfig
    from tritonlm.engine.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, vocab_size=vocab, **(overrides or {}))
    return Transformer(cfg).to(device).eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def one_stream(preset, vocab, n_new, device, overrides=None) -> dict:
    """Eager vs CUDA-graph decode of one stream (prompt 16 tokens)."""
    from tritonlm.engine.inference.generate import generate
    from tritonlm.engine.inference.sampling import SamplingConfig
    from tritonlm.engine.model.cuda_graphs import make_decode_step

    model = _model(preset, vocab, device, overrides)
    n_new = min(n_new, model.config.max_seq_len - 16)
    prompt = [3 + (7 * i) % (vocab - 3) for i in range(16)]
    cfg = SamplingConfig(temperature=0, max_new_tokens=n_new)
    out = {"preset": preset, "n_new": n_new}
    tokens = {}
    for mode in ("eager", "graphs"):
        lines: list[str] = []
        cache = model.new_cache(1, max_len=16 + n_new)
        step = make_decode_step(model, cache, mode, lines.append)
        rates = []
        for _ in range(4):  # the first run warms up (and captures)
            _sync(device)
            r = generate(model, None, prompt, cfg, stop_token_ids=[], decoder=step)
            _sync(device)
            rates.append(r.decode_tokens_per_s)
            tokens[mode] = r.token_ids
        out[f"{mode}_tok_s"] = max(rates[1:])
        if lines:
            out[f"{mode}_fallback"] = lines[0]
    out["graphs_vs_eager"] = out["graphs_tok_s"] / out["eager_tok_s"]
    out["tokens_match"] = tokens["graphs"] == tokens["eager"]
    out["ok"] = out["tokens_match"]
    return out


def scheduler_aggregate(preset, vocab, streams, n_new, device, overrides=None) -> dict:
    """In-process scheduler: ``streams`` requests at once; aggregate new tokens/s."""
    from tritonlm.engine.inference.sampling import SamplingConfig
    from tritonlm.engine.inference.scheduler import Scheduler

    model = _model(preset, vocab, device, overrides)
    n_new = min(n_new, model.config.max_seq_len - 16)
    out = {"preset": preset, "streams": streams, "n_new": n_new}
    for mode in ("eager", "graphs"):
        lines: list[str] = []
        sched = Scheduler(model, None, max_batch=streams, max_queue=streams, decode=mode,
                          on_fallback=lines.append)  # fmt: skip
        best = 0.0
        for _ in range(2):  # the first round warms up (and captures every bucket)
            cfg = SamplingConfig(temperature=0, max_new_tokens=n_new)
            handles = [sched.submit([3 + s, 5, 7 + s, 11] * 4, cfg) for s in range(streams)]
            _sync(device)
            t0 = time.perf_counter()
            while sched.load()["active"] or sched.load()["waiting"]:
                sched.step()
            _sync(device)
            dt = time.perf_counter() - t0
            assert all(h.cancelled is False for h in handles)
            best = max(best, streams * n_new / dt)  # nothing stops early: n_new each
        out[f"{mode}_tok_s"] = best
        if lines:
            out[f"{mode}_fallback"] = lines[0]
    out["graphs_vs_eager"] = out["graphs_tok_s"] / out["eager_tok_s"]
    return out


def hf_static_compiled(preset, vocab, n_new, device, overrides=None) -> dict:
    """transformers generate, static cache + torch.compile, the same shape (one stream)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers import llama_config
    from transformers import LlamaForCausalLM

    ours = _model(preset, vocab, "cpu", overrides)
    n_new = min(n_new, ours.config.max_seq_len - 16)
    hf_cfg = llama_config(ours.config, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa").to(device).eval()
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.tensor([[3 + (7 * i) % (vocab - 3) for i in range(16)]], device=device)
    kw = dict(do_sample=False, pad_token_id=0, cache_implementation="static",
              attention_mask=torch.ones_like(ids))  # fmt: skip
    rates = []
    with torch.inference_mode():
        for _ in range(4):
            _sync(device)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            _sync(device)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
            _sync(device)
            rates.append((n_new - 1) / max(1e-9, time.perf_counter() - t0 - ttft))
    return {"preset": preset, "n_new": n_new, "hf_static_compiled_tok_s": max(rates[1:])}
