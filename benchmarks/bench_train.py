"""Training throughput and peak memory: tritonlm's loop vs transformers' LlamaForCausalLM.

For each preset (seed, small) and device (cpu, and cuda when present) both models get
the same shape (vocab, d_model, layers, heads, SwiGLU width, no biases, tied embeddings),
the same batch and sequence length, the same optimizer (AdamW, decay on matrices only,
fused on CUDA), gradient clipping at 1.0 and bfloat16 autocast on CUDA. Ours runs through
the real training loop (engine.train.Trainer over a memmap token cache); the peer runs a
plain loop of forward(labels=...) / backward / clip / step.

Every measurement runs in its own subprocess so peak memory is its own: peak RSS growth
over the process's size after imports on the CPU, torch.cuda.max_memory_allocated on CUDA.
Throughput is tokens per second from the median step time after warm-up steps (robust to
a noisy machine).

    python benchmarks/bench_train.py            # full run, writes results/bench_train.json
    python benchmarks/bench_train.py --quick    # a minute or two on a laptop CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tritonlm.engine.model.memory import high_water_rss

HERE = Path(__file__).resolve().parent

# preset -> (vocab, batch, steps, warmup) for full and quick runs
PLAN = {
    "seed": {"vocab": 512, "full": (16, 30, 5), "quick": (16, 12, 3)},
    "small": {"vocab": 8192, "full": (8, 12, 3), "quick": (4, 8, 2)},
}


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; falls back to peak RSS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss_bytes() -> int:
    return high_water_rss()  # VmHWM: not the parent's size carried over at fork


def _model_config(preset: str, vocab: int):
    from tritonlm.engine.model.config import ModelConfig

    return ModelConfig.preset(preset, vocab)


def _ours(cfg, device: str, batch: int, steps: int, warmup: int, seed: int) -> dict:
    import numpy as np
    import torch
    from tritonlm.engine.data.token_cache import TokenCache
    from tritonlm.engine.model.transformer import Transformer
    from tritonlm.engine.train.batches import PretrainWindows
    from tritonlm.engine.train.loop import Trainer
    from tritonlm.engine.train.train_config import TrainConfig

    T = cfg.max_seq_len
    n_tok = (steps + 4) * batch * (T + 1) * 2
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(seed)
        path = Path(tmp) / "tokens.bin"
        rng.integers(0, cfg.vocab_size, n_tok, dtype=np.uint16).tofile(path)
        tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(n_tok,))
        cache = TokenCache(
            path=Path(tmp),
            kind="pretrain",
            key="bench",
            tokens=tokens,
            doc_offsets=np.array([0, n_tok], dtype=np.int64),
            doc_bytes=np.array([n_tok * 4], dtype=np.int64),
            mask=None,
            vocab_size=cfg.vocab_size,
        )
        data = PretrainWindows(cache, T, val_fraction=0.0, seed=seed)
        tc = TrainConfig(
            steps=steps, batch_size=batch, lr=1e-3, warmup=0, eval_every=0, device=device
        )
        torch.manual_seed(seed)
        model = Transformer(cfg)
        trainer = Trainer(model, data, tc)
        result = trainer.run()
        _sync(device)
    elapsed = [h["elapsed_s"] for h in result.history]
    step_times = [b - a for a, b in zip(elapsed[warmup - 1 :], elapsed[warmup:], strict=False)]
    return {"step_times": step_times, "tokens_per_step": batch * T, "loss": result.loss}


def _peer(cfg, device: str, batch: int, steps: int, warmup: int, seed: int) -> dict:
    import torch
    from peers import llama_config
    from transformers import LlamaForCausalLM

    hf_cfg = llama_config(cfg, attention_dropout=0.0, use_cache=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_cfg).to(device)
    model.config._attn_implementation = "sdpa"
    model.train()
    ours_params = cfg.num_parameters()
    peer_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    kwargs = {"fused": True} if device == "cuda" else {}
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.95),
        **kwargs,
    )
    T = cfg.max_seq_len
    gen = torch.Generator().manual_seed(seed)
    amp = device == "cuda"
    times = []
    loss = None
    for _ in range(steps):
        t0 = time.perf_counter()
        ids = torch.randint(0, cfg.vocab_size, (batch, T + 1), generator=gen)
        ids = ids.to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss)  # a sync per step, like our loop
        times.append(time.perf_counter() - t0)
    return {
        "step_times": times[warmup:],
        "tokens_per_step": batch * T,
        "loss": loss,
        "params": peer_params,
        "ours_params": ours_params,
    }


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def worker(args) -> None:
    """One measurement in this process; prints one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _model_config(args.preset, args.vocab)
    # import everything first so that the memory baseline includes the libraries
    if args.impl == "tritonlm":
        import tritonlm.engine.train.loop  # noqa: F401
    else:
        import transformers.models.llama.modeling_llama  # noqa: F401
    # the first optimizer construction imports more of torch (~70 MB): not a training cost
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_bytes()
    fn = _ours if args.impl == "tritonlm" else _peer
    r = fn(cfg, args.device, args.batch, args.steps, args.warmup, args.seed)
    med = statistics.median(r["step_times"])
    peak = (
        torch.cuda.max_memory_allocated()
        if args.device == "cuda"
        else max(0, _peak_rss_bytes() - base_rss)
    )
    print(
        json.dumps(
            {
                "impl": args.impl,
                "preset": args.preset,
                "device": args.device,
                "vocab": args.vocab,
                "batch": args.batch,
                "seq_len": cfg.max_seq_len,
                "params": r.get("params", cfg.num_parameters()),
                "steps_timed": len(r["step_times"]),
                "median_step_s": med,
                "tokens_per_s": r["tokens_per_step"] / med,
                "peak_mem_mb": peak / 2**20,
                "final_loss": r["loss"],
                "threads": torch.get_num_threads(),
            }
        )
    )


def _versions() -> dict:
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "numpy", "triton"):
        try:
            v[name] = __import__(name).__version__
        except Exception:
            v[name] = None
    return v


def _machine() -> dict:
    import torch

    m = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(0)
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Training tokens/s and peak memory: tritonlm vs transformers Llama "
        "(same shape, batch, sequence length and optimizer).",
    )
    p.add_argument("--quick", action="store_true", help="fewer steps and smaller batches")
    p.add_argument("--presets", nargs="+", default=["seed", "small"], choices=sorted(PLAN))
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu (+ cuda if present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="rounds per pair; best kept (2)")
    p.add_argument("--out", default=None, help="JSON path (default: results/bench_train*.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import torch

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    mode = "quick" if args.quick else "full"
    rows = []
    for device in devices:
        for preset in args.presets:
            plan = PLAN[preset]
            batch, steps, warmup = plan[mode]
            if device == "cuda":
                batch, steps = batch * 4, steps * 2
            best: dict[str, dict] = {}
            # alternate the order each round and keep each side's best round: fair on a
            # machine whose load changes while the benchmark runs
            for rnd in range(args.repeats):
                impls = ("tritonlm", "transformers")
                for impl in impls if rnd % 2 == 0 else impls[::-1]:
                    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--preset", preset,
                           "--device", device, "--vocab", str(plan["vocab"]), "--batch", str(batch),
                           "--steps", str(steps + warmup), "--warmup", str(warmup),
                           "--seed", str(args.seed)]  # fmt: skip
                    if args.threads:
                        cmd += ["--threads", str(args.threads)]
                    r = subprocess.run(cmd, capture_output=True, text=True)
                    if r.returncode != 0:
                        print(r.stderr, file=sys.stderr)
                        return 1
                    row = json.loads(r.stdout.strip().splitlines()[-1])
                    if impl not in best or row["tokens_per_s"] > best[impl]["tokens_per_s"]:
                        best[impl] = row
                    print(f"  measured {impl:12s} {preset:5s} {device}", file=sys.stderr)
            rows += [best["tritonlm"], best["transformers"]]

    header = (
        f"{'device':6s} {'preset':6s} {'impl':12s} {'params':>8s} {'batch x seq':>11s} "
        f"{'tokens/s':>10s} {'peak MB':>8s} {'vs peer':>8s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        peer = next(
            x
            for x in rows
            if x["impl"] == "transformers"
            and x["preset"] == r["preset"]
            and x["device"] == r["device"]
        )
        ratio = r["tokens_per_s"] / peer["tokens_per_s"]
        r["speed_vs_peer"] = ratio
        print(
            f"{r['device']:6s} {r['preset']:6s} {r['impl']:12s} {r['params'] / 1e6:7.2f}M "
            f"{r['batch']:>4d} x {r['seq_len']:<4d} {r['tokens_per_s']:10.0f} "
            f"{r['peak_mem_mb']:8.1f} {ratio:7.2f}x"
        )
    out = (
        Path(args.out)
        if args.out
        else HERE / "results" / f"bench_train{'_quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "bench_train",
        "mode": mode,
        "machine": _machine(),
        "versions": _versions(),
        "repeats": args.repeats,
        "threads": args.threads,
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
