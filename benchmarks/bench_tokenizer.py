"""Benchmark our BPE tokenizer against the `tokenizers` trainer and `tiktoken`.

Corpus: the .py files of this Python's standard library (every machine has them), in
sorted path order, concatenated until the training part reaches --train-mb; the files that
follow (up to --eval-mb) are held out for encoding speed and compression.

Measured, in one run:
  * training time for each vocab size: ours vs the `tokenizers` BPE trainer (ByteLevel
    byte alphabet, same vocab size, same special tokens, min_frequency 2), both with the
    GPT-4 split regex and single-threaded; plus `tokenizers` with its default threads.
  * encoding throughput (MB/s, one thread) on held-out text: ours (fresh cache, then warm)
    vs a `tiktoken.Encoding` built from our own ranks, pattern and specials (ids must match).
  * compression (UTF-8 bytes per token) on held-out text: ours vs `tokenizers` (same
    pattern) and vs `tokenizers` with its stock ByteLevel (GPT-2) pre-tokenizer.

Prints a table and writes JSON (default benchmarks/results/bench_tokenizer.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

from peers import cpu_model

HERE = Path(__file__).resolve().parent

GOALS = {
    "train_time_ratio_max": 5.0,  # ours / tokenizers (single thread)
    "encode_speed_ratio_min": 1 / 3,  # ours (warm) / tiktoken
    "compression_gap_max": 0.01,  # |ours - tokenizers| / tokenizers, bytes per token
}


def stdlib_corpus(train_mb: float, eval_mb: float) -> tuple[list[str], list[str], dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    train, held = [], []
    n_train = n_eval = 0
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        nb = len(text.encode("utf-8"))
        if n_train < train_mb * 1e6:
            train.append(text)
            n_train += nb
        elif n_eval < eval_mb * 1e6:
            held.append(text)
            n_eval += nb
        else:
            break
    if n_train < train_mb * 1e6 or not held:
        raise SystemExit(f"stdlib at {root} has too little .py text for --train-mb {train_mb}")
    info = {
        "source": f"{root}/**/*.py (sorted, site-packages excluded)",
        "train_files": len(train),
        "train_bytes": n_train,
        "eval_files": len(held),
        "eval_bytes": n_eval,
    }
    return train, held, info


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    info["cpu"] = cpu_model()
    import importlib.metadata as md

    for pkg in ("torch", "regex", "tiktoken", "tokenizers"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    return info


def hf_tokenizer(specials: list[str], gpt4_pattern: str | None):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    if gpt4_pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(gpt4_pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return tok


def hf_train(texts, vocab_size, specials, gpt4_pattern, threads: bool):
    from tokenizers import pre_tokenizers, trainers

    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"
    tok = hf_tokenizer(specials, gpt4_pattern)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    c0, t0 = time.process_time(), time.perf_counter()
    tok.train_from_iterator(texts, trainer=trainer)
    return tok, time.process_time() - c0, time.perf_counter() - t0


def mb_per_s(n_bytes: int, seconds: float) -> float:
    return n_bytes / 1e6 / seconds


def run(args) -> dict:
    import tiktoken
    from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
    from tritonlm.engine.tokenizer.tokenizer_config import SPECIAL_TOKENS, BpeTokenizerConfig

    train, held, corpus = stdlib_corpus(args.train_mb, args.eval_mb)
    held_bytes = sum(len(t.encode("utf-8")) for t in held)
    specials = list(SPECIAL_TOKENS)
    results = {
        "corpus": corpus,
        "machine": machine_info(),
        "goals": GOALS,
        "timers": "train_s and encode MB/s use CPU time of this process (time.process_time; "
        "single-threaded work, robust to other load); *_wall_s are wall-clock",
        "vocab": {},
    }
    print(
        f"corpus: {corpus['train_files']} files, {corpus['train_bytes'] / 1e6:.1f} MB train, "
        f"{corpus['eval_files']} files, {corpus['eval_bytes'] / 1e6:.2f} MB held out",
        flush=True,
    )
    for vocab in args.vocab:
        r: dict = {}
        cfg = BpeTokenizerConfig(vocab_size=vocab)
        c0, t0 = time.process_time(), time.perf_counter()
        ours = BpeTokenizer.train(train, cfg)
        r["ours_train_s"] = time.process_time() - c0
        r["ours_train_wall_s"] = time.perf_counter() - t0
        r["ours_vocab_size"] = ours.vocab_size
        print(f"[{vocab}] ours trained in {r['ours_train_s']:.1f} s", flush=True)

        hf, r["hf_train_s"], r["hf_train_wall_s"] = hf_train(
            train, vocab, specials, cfg.pattern, threads=False
        )
        _, _, r["hf_threads_train_wall_s"] = hf_train(
            train, vocab, specials, cfg.pattern, threads=True
        )
        hf_stock, _, _ = hf_train(train, vocab, specials, None, threads=False)
        r["hf_vocab_size"] = hf.get_vocab_size()
        print(
            f"[{vocab}] tokenizers trained in {r['hf_train_s']:.1f} s (1 thread), "
            f"{r['hf_threads_train_wall_s']:.1f} s wall (default threads)",
            flush=True,
        )

        # encoding speed: ours with a fresh cache, then warm; tiktoken from our ranks
        fresh = BpeTokenizer.from_dict(ours.to_dict())
        c0 = time.process_time()
        ours_ids = [fresh.encode(t) for t in held]
        cold_s = time.process_time() - c0
        warm_s = min(_timed(_encode_all, fresh.encode, held) for _ in range(args.repeat))
        enc = tiktoken.Encoding(
            name=f"tritonlm_{vocab}",
            pat_str=cfg.pattern,
            mergeable_ranks=ours.mergeable_ranks(),
            special_tokens=ours.special_tokens,
        )
        # tiktoken does not normalize: give it the NFC text our encode() works on
        held_nfc = [ours.normalize(t) for t in held]
        tt_ids = [enc.encode_ordinary(t) for t in held_nfc]
        tt_s = min(_timed(_encode_all, enc.encode_ordinary, held_nfc) for _ in range(args.repeat))
        r["ids_match_tiktoken"] = ours_ids == tt_ids
        r["ours_encode_mb_s_cold"] = mb_per_s(held_bytes, cold_s)
        r["ours_encode_mb_s_warm"] = mb_per_s(held_bytes, warm_s)
        r["tiktoken_encode_mb_s"] = mb_per_s(held_bytes, tt_s)

        n_ours = sum(map(len, ours_ids))
        n_hf = sum(len(e.ids) for e in hf.encode_batch(held))
        n_hf_stock = sum(len(e.ids) for e in hf_stock.encode_batch(held))
        r["ours_bytes_per_token"] = held_bytes / n_ours
        r["hf_bytes_per_token"] = held_bytes / n_hf
        r["hf_bytelevel_bytes_per_token"] = held_bytes / n_hf_stock

        r["train_time_ratio"] = r["ours_train_s"] / r["hf_train_s"]
        r["encode_speed_ratio"] = r["ours_encode_mb_s_warm"] / r["tiktoken_encode_mb_s"]
        # > 0: ours packs more bytes into a token than tokenizers (better compression)
        r["compression_gap"] = r["ours_bytes_per_token"] / r["hf_bytes_per_token"] - 1
        r["goals_met"] = {
            "train_time": r["train_time_ratio"] <= GOALS["train_time_ratio_max"],
            "encode_speed": r["encode_speed_ratio"] >= GOALS["encode_speed_ratio_min"],
            "compression": abs(r["compression_gap"]) <= GOALS["compression_gap_max"],
        }
        results["vocab"][str(vocab)] = r
    return results


def _encode_all(encode, texts) -> None:
    for t in texts:
        encode(t)


def _timed(fn, *args) -> float:
    """CPU seconds of this process (single-threaded work; robust to a busy machine)."""
    t0 = time.process_time()
    fn(*args)
    return time.process_time() - t0


def print_table(results: dict) -> None:
    rows = [
        ("train CPU s, ours", "ours_train_s", "{:.1f}"),
        ("train CPU s, tokenizers 1 thread", "hf_train_s", "{:.1f}"),
        ("train wall s, ours", "ours_train_wall_s", "{:.1f}"),
        ("train wall s, tokenizers 1 thread", "hf_train_wall_s", "{:.1f}"),
        ("train wall s, tokenizers default threads", "hf_threads_train_wall_s", "{:.1f}"),
        ("train CPU ratio ours/tokenizers (goal <= 5)", "train_time_ratio", "{:.2f}"),
        ("encode ours fresh cache (MB/s)", "ours_encode_mb_s_cold", "{:.2f}"),
        ("encode ours warm cache (MB/s)", "ours_encode_mb_s_warm", "{:.2f}"),
        ("encode tiktoken, our ranks (MB/s)", "tiktoken_encode_mb_s", "{:.2f}"),
        ("encode ratio ours warm/tiktoken (goal >= 0.33)", "encode_speed_ratio", "{:.2f}"),
        ("ids identical to tiktoken", "ids_match_tiktoken", "{}"),
        ("bytes/token ours", "ours_bytes_per_token", "{:.4f}"),
        ("bytes/token tokenizers (GPT-4 split)", "hf_bytes_per_token", "{:.4f}"),
        ("bytes/token tokenizers (stock ByteLevel)", "hf_bytelevel_bytes_per_token", "{:.4f}"),
        ("bytes/token ours vs tokenizers (goal within 1%)", "compression_gap", "{:+.2%}"),
    ]
    vocabs = list(results["vocab"])
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'vocab size':<{width}} " + " ".join(f"{v:>12}" for v in vocabs))
    for label, key, fmt in rows:
        cells = [fmt.format(results["vocab"][v][key]) for v in vocabs]
        print(f"{label:<{width}} " + " ".join(f"{c:>12}" for c in cells))
    m = results["machine"]
    print(f"\nmachine: {m.get('cpu', m['machine'])}, {m['cpu_count']} cpus, python {m['python']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small run: 2 MB, vocab 1024 and 4096")
    p.add_argument("--train-mb", type=float, default=20.0, help="training text size (MB)")
    p.add_argument("--eval-mb", type=float, default=2.0, help="held-out text size (MB)")
    p.add_argument("--vocab", type=int, nargs="+", default=[4096, 16384], help="vocab sizes")
    p.add_argument("--repeat", type=int, default=3, help="timing repeats for encoding")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default benchmarks/results/bench_tokenizer.json; --quick: none)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.train_mb, args.eval_mb, args.vocab, args.repeat = 2.0, 0.5, [1024, 4096], 2
    out = args.out
    if out is None and not args.quick:
        out = HERE / "results" / "bench_tokenizer.json"
    results = run(args)
    results["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print_table(results)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
