"""Hugging Face export and import of the ``gpt2`` preset (124M): time, peak memory, logits.

A randomly initialized model of the preset (the numbers measure the conversion, not the
model) with a 50257-token vocabulary, saved as our checkpoint; then, each in a fresh
process so that its peak RSS is its own:

    export  llm-export CKPT HF_DIR [--dtype]   (load our checkpoint + write the HF folder)
    import  llm-import HF_DIR CKPT2            (read the HF folder + save our checkpoint)

Peak RSS is the process's high-water mark (VmHWM) minus its RSS once torch and
our modules are imported (``base``), compared with the model's float32 bytes. Then
transformers loads the fp32 export: the largest |logit| difference from our model on
random tokens, and whether export -> import gave back our exact weights.

The vocabulary is synthetic: 49994 merges of byte pairs (training a 50k BPE would
dominate the run and is measured by bench_tokenizer.py). Prints a table and writes JSON
(default benchmarks/results/bench_hf.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tritonlm.engine.model.memory import high_water_rss

HERE = Path(__file__).resolve().parent


def rss_now() -> int:
    """Current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    return high_water_rss()  # VmHWM: not the parent's size carried over at fork


# ----------------------------------------------------------------------------- child steps


def child(step: str, src: str, dst: str, dtype: str) -> None:
    """One measured conversion in this (fresh) process; prints a JSON line."""
    import torch  # noqa: F401  (counted in the base RSS, like our modules)
    from tritonlm.engine import checkpoint  # noqa: F401
    from tritonlm.engine.interop import hf_export, hf_import  # noqa: F401

    base = rss_now()
    t0 = time.perf_counter()
    if step == "export":
        ckpt = checkpoint.load_checkpoint(src, backend="torch")
        hf_export.export_hf(ckpt.model, ckpt.tokenizer, dst, dtype)
    else:
        hf_import.import_hf(src, dst)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "base_rss": base, "peak_rss": peak_rss()}))


def run_child(step: str, src: Path, dst: Path, dtype: str = "fp32") -> dict:
    cmd = [sys.executable, __file__, "--child", step, str(src), str(dst), dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- setup


def synthetic_tokenizer(vocab_size: int):
    """Our tokenizer with ``vocab_size`` ids: every merge joins two single bytes."""
    from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
    from tritonlm.engine.tokenizer.tokenizer_config import SPECIAL_TOKENS, BpeTokenizerConfig

    n = vocab_size - 256 - len(SPECIAL_TOKENS)
    merges = [(a, b) for a in range(32, 256) for b in range(256)][:n]
    return BpeTokenizer(BpeTokenizerConfig(vocab_size=vocab_size), merges)


def build_checkpoint(path: Path, vocab_size: int, seed: int):
    import torch
    from tritonlm.engine.checkpoint.save_load import save_checkpoint
    from tritonlm.engine.model.config import ModelConfig
    from tritonlm.engine.model.transformer import Transformer

    tok = synthetic_tokenizer(vocab_size)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset("gpt2", tok.vocab_size), backend="torch").eval()
    save_checkpoint(path, model, tok)
    return model, tok


def logits_check(model, hf_dir: Path, back: Path, seq_len: int, seed: int) -> dict:
    import torch
    import transformers
    from tritonlm.engine.checkpoint.save_load import load_checkpoint

    transformers.logging.set_verbosity_error()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=g)
    with torch.no_grad():
        ours_logits, hf_logits = model(idx), theirs(idx).logits
    diff = (ours_logits - hf_logits).abs().max().item()
    imported = load_checkpoint(back, backend="torch").model.state_dict()
    original = model.state_dict()
    same = imported.keys() == original.keys() and all(
        torch.equal(imported[k], original[k]) for k in original
    )
    return {"max_abs_logit_diff": diff, "max_abs_logit": hf_logits.abs().max().item(),
            "seq_len": seq_len, "roundtrip_bitwise_equal": same}  # fmt: skip


# ----------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "bench_hf.json"))
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = p.parse_args()

    import torch
    import transformers

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        model, _ = build_checkpoint(tmp / "ckpt", args.vocab_size, args.seed)
        build_s = time.perf_counter() - t0
        n = model.num_parameters()
        model_bytes = n * 4
        rows = []
        for dtype in ("fp32", "bf16"):
            hf_dir = tmp / f"hf_{dtype}"
            exp = run_child("export", tmp / "ckpt", hf_dir, dtype)
            imp = run_child("import", hf_dir, tmp / f"back_{dtype}")
            folder_bytes = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
            for step, r in (("export", exp), ("import", imp)):
                extra = r["peak_rss"] - r["base_rss"]
                rows.append({"step": step, "dtype": dtype, "seconds": round(r["seconds"], 2),
                             "peak_rss_mib": round(r["peak_rss"] / 2**20),
                             "base_rss_mib": round(r["base_rss"] / 2**20),
                             "extra_rss_mib": round(extra / 2**20),
                             "extra_over_model_bytes": round(extra / model_bytes, 2),
                             "hf_weight_bytes": folder_bytes})  # fmt: skip
        check = logits_check(model, tmp / "hf_fp32", tmp / "back_fp32", args.seq_len, args.seed)

    result = {
        "preset": "gpt2",
        "parameters": n,
        "model_fp32_bytes": model_bytes,
        "vocab_size": args.vocab_size,
        "build_and_save_s": round(build_s, 2),
        "rows": rows,
        "check": check,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },  # fmt: skip
    }
    try:
        from peers import cpu_model

        result["machine"]["cpu"] = cpu_model()
    except ImportError:
        pass
    print(f"gpt2 preset: {n:,} parameters, float32 model {model_bytes / 2**20:.0f} MiB, "
          f"vocab {args.vocab_size}")  # fmt: skip
    print(f"{'step':<8}{'dtype':<6}{'seconds':>9}{'peak RSS':>11}{'base':>8}{'extra':>8}"
          f"{'extra/model':>13}")  # fmt: skip
    for r in rows:
        print(
            f"{r['step']:<8}{r['dtype']:<6}{r['seconds']:>9.2f}{r['peak_rss_mib']:>7} MiB"
            f"{r['base_rss_mib']:>8}{r['extra_rss_mib']:>8}{r['extra_over_model_bytes']:>12}x"
        )
    print(f"transformers vs ours, fp32, {check['seq_len']} random tokens: max |logit diff| "
          f"{check['max_abs_logit_diff']:.2e} (max |logit| {check['max_abs_logit']:.2f}); "
          f"export -> import bitwise equal: {check['roundtrip_bitwise_equal']}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
