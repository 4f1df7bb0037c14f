"""LoRA vs full fine-tuning: peak memory, step time, trainable parameters; loss reached.

Part 1, cost: for each preset (small, gpt2) the same model, batch and sequence length are
trained by the real loop (engine.train.Trainer) three ways: every weight (full), LoRA rank 8
and LoRA rank 64 on all four linear layers of each block (qkv, proj, gate_up, down). Each
measurement runs in its own subprocess: peak RSS growth over the process's size after
imports (CPU) or torch.cuda.max_memory_allocated (CUDA); the median step time after a
warm-up step.

Part 2, quality: a base of the chosen preset is pretrained on data/pretrain.json (llm-train,
the same run for all), then instruction-tuned on data/chat.json for the same number of
steps by full fine-tuning and by LoRA rank 8 and 64 (llm-train --lora-rank); the table
gives the validation loss each reaches.

    python benchmarks/bench_lora.py            # both parts; writes results/bench_lora.json
    python benchmarks/bench_lora.py --quick    # the seed preset, a couple of minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tritonlm.engine.model.memory import high_water_rss

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODES = {"full": None, "lora-r8": 8, "lora-r64": 64}
BF16 = "lora-r8-bf16"  # cost part only: rank 8 with the frozen weights in bfloat16
# preset -> (vocab, batch, seq_len, steps) of the cost part; quick runs use "seed"
COST = {"seed": (512, 4, 64, 4), "small": (4096, 4, 256, 4), "gpt2": (8192, 1, 512, 3)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> None:
    """One cost measurement in this process; prints one JSON line."""
    import numpy as np
    import torch
    import tritonlm.engine.train.loop as loop
    from tritonlm.engine.data.token_cache import TokenCache
    from tritonlm.engine.lora.layers import BaseRef, add_lora, trainable_parameters
    from tritonlm.engine.lora.lora_config import LoraConfig
    from tritonlm.engine.model.config import ModelConfig
    from tritonlm.engine.model.transformer import Transformer
    from tritonlm.engine.train.batches import PretrainWindows
    from tritonlm.engine.train.train_config import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    vocab, batch, seq_len, steps = COST[args.preset]
    seq_len = args.seq_len or seq_len
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # imports the rest of torch.optim
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_bytes()
    cfg = ModelConfig.preset(args.preset, vocab, max_seq_len=seq_len)
    torch.manual_seed(0)
    model = Transformer(cfg)
    rank = 8 if args.mode == BF16 else MODES[args.mode]
    if rank is not None:
        dtype = "bfloat16" if args.mode == BF16 else "float32"
        lora = LoraConfig(rank=rank, alpha=2.0 * rank, base_dtype=dtype)
        add_lora(model, lora, BaseRef("random", "-"))
    n_tok = (steps + 4) * batch * (seq_len + 1) * 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.bin"
        np.random.default_rng(0).integers(0, vocab, n_tok, dtype=np.uint16).tofile(path)
        tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(n_tok,))
        cache = TokenCache(path=Path(tmp), kind="pretrain", key="bench", tokens=tokens,
                           doc_offsets=np.array([0, n_tok], dtype=np.int64),
                           doc_bytes=np.array([n_tok * 4], dtype=np.int64), mask=None,
                           vocab_size=vocab)  # fmt: skip
        data = PretrainWindows(cache, seq_len, val_fraction=0.0, seed=0)
        tc = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, warmup=0, eval_every=0,
                         log_every=1, device=device)  # fmt: skip
        result = loop.Trainer(model, data, tc).run()
    elapsed = [h["elapsed_s"] for h in result.history]
    step_times = [b - a for a, b in zip(elapsed[:-1], elapsed[1:], strict=True)]  # after step 1
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else
            high_water_rss() - base_rss)  # fmt: skip
    print(json.dumps({
        "preset": args.preset, "mode": args.mode, "device": device, "batch": batch,
        "seq_len": seq_len, "params": cfg.num_parameters(),
        "trainable": trainable_parameters(model), "median_step_s": statistics.median(step_times),
        "steps_timed": len(step_times), "peak_mem_mb": peak / 2**20,
        "threads": torch.get_num_threads(),
    }))  # fmt: skip


def _cost(preset: str, mode: str, threads: int | None, seq_len: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--preset", preset, "--mode", mode]
    if seq_len:
        cmd += ["--seq-len", str(seq_len)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise SystemExit(f"worker {preset}/{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _llm_train(argv: list[str]) -> None:
    cmd = [sys.executable, "-m", "tritonlm.cli.train", *argv, "--quiet", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise SystemExit(f"llm-train {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")


def _last_val(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def _quality(preset: str, pre_steps: int, sft_steps: int, seq_len: int, lrs: dict) -> list:
    """Pretrain once, then SFT full vs LoRA on data/chat.json; val loss at equal steps."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        _llm_train(["--data", str(ROOT / "data/pretrain.json"), "--preset", preset,
                    "--seq-len", str(seq_len), "--steps", str(pre_steps), "--eval-every", "0",
                    "--batch-size", "8", "--out", str(base)])  # fmt: skip
        for mode, rank in MODES.items():
            out = Path(tmp) / mode
            lora = [] if rank is None else ["--lora-rank", str(rank)]
            _llm_train(["--init-from", str(base), "--chat-data", str(ROOT / "data/chat.json"),
                        "--steps", str(sft_steps), "--eval-every", str(sft_steps),
                        "--batch-size", "8", "--lr", str(lrs[mode]), "--seed", "1",
                        "--out", str(out), *lora])  # fmt: skip
            rows.append({"preset": preset, "mode": mode, "sft_steps": sft_steps,
                         "lr": lrs[mode], "val_loss": _last_val(out)})  # fmt: skip
    return rows


def _environment() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0]}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="LoRA vs full fine-tuning: memory, time, loss.")
    p.add_argument("--quick", action="store_true", help="seed preset only, short runs")
    p.add_argument("--skip-quality", action="store_true", help="only the cost part")
    p.add_argument("--threads", type=int, help="torch threads per worker")
    p.add_argument("--presets", default="small,gpt2", help="cost part (default: small,gpt2)")
    p.add_argument("--seq-len", type=int, help="cost part: override the presets' lengths")
    p.add_argument("--quality-preset", default="small", help="quality part (default: small)")
    p.add_argument("--out", default=str(HERE / "results" / "bench_lora.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    presets = ["seed"] if args.quick else args.presets.split(",")
    modes = [*MODES, BF16]
    cost = [_cost(p, m, args.threads, args.seq_len) for p in presets for m in modes]
    print(f"{'preset':7s} {'mode':12s} {'trainable':>12s} {'step s':>8s} {'vs full':>8s} "
          f"{'peak MB':>9s} {'vs full':>8s}")  # fmt: skip
    for r in cost:
        full = next(f for f in cost if f["preset"] == r["preset"] and f["mode"] == "full")
        r["step_vs_full"] = r["median_step_s"] / full["median_step_s"]
        r["mem_vs_full"] = r["peak_mem_mb"] / full["peak_mem_mb"]
        step, mem = r["median_step_s"], r["peak_mem_mb"]
        print(f"{r['preset']:7s} {r['mode']:12s} {r['trainable']:12,d} {step:8.3f} "
              f"{r['step_vs_full']:7.2f}x {mem:9.1f} {r['mem_vs_full']:7.2f}x")  # fmt: skip
    quality = []
    if not args.skip_quality:
        lrs = {"full": 5e-4, "lora-r8": 2e-3, "lora-r64": 2e-3}
        if args.quick:
            quality = _quality("seed", 30, 10, 64, lrs)
        else:
            quality = _quality(args.quality_preset, 120, 40, 128, lrs)
        print(f"\n{'preset':7s} {'mode':9s} {'lr':>8s} {'SFT steps':>9s} {'val loss':>9s}")
        for r in quality:
            print(f"{r['preset']:7s} {r['mode']:9s} {r['lr']:8.0e} {r['sft_steps']:9d} "
                  f"{r['val_loss']:9.4f}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": _environment(), "cost": cost,
                               "quality": quality}, indent=2) + "\n")  # fmt: skip
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
