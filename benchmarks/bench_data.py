"""Benchmark a large-corpus run: the parallel token-cache build and tokenizer training.

Corpus: every .py, .txt and .rst file installed on this machine (the standard library,
this virtual environment's packages, /usr/lib/python3*, /usr/share/doc), sorted by path,
UTF-8 only, written as Parquet and .jsonl.zst shards (alternating, ~64 MB of text each)
until --corpus-mb is reached; if the machine holds less, the file list is read again
(the number of passes is recorded). The last --heldout-mb of files is kept out of the
shards for the bytes-per-token comparison.

Measured, side by side in one run (each build in its own process, for its peak RSS):
  * token-cache build (engine/token_cache.py build_corpus_cache, fresh cache each time),
    MB of text per wall second with 1 and 2 workers, vs tiktoken encode_ordinary on one
    thread over the same documents (reading excluded), and the peak RSS of the build
    (main process, and the largest worker);
  * tokenizer training, vocab --vocab, on a --sample-mb sample spread over the corpus
    (`TextCorpus.sample`): ours (2 workers for counting) vs the `tokenizers` BPE trainer
    (default threads), wall time and peak RSS, then UTF-8 bytes per token of both on the
    held-out files.

Prints a table and writes JSON (default benchmarks/results/bench_data.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOTS = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
         *sorted(str(p) for p in Path("/usr/lib").glob("python3*")), "/usr/share/doc"]  # fmt: skip
SHARD_BYTES = 64 << 20


def installed_files() -> list[Path]:
    seen, out = set(), []
    for root in ROOTS:
        for dirpath, dirs, names in os.walk(root):
            dirs.sort()
            for name in sorted(names):
                if name.endswith((".py", ".txt", ".rst")):
                    p = Path(dirpath, name)
                    real = os.path.realpath(p)
                    if real not in seen and p.is_file():
                        seen.add(real)
                        out.append(p)
    return out


def read_doc(path: Path) -> str | None:
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() and "\x00" not in text else None


def build_corpus(out: Path, corpus_mb: float, heldout_mb: float) -> dict:
    """Write the shards; return facts about them and the held-out texts' path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    files = installed_files()
    held, held_bytes = [], 0
    while files and held_bytes < heldout_mb * 1e6:  # the last files are held out
        text = read_doc(files.pop())
        if text:
            held.append(text)
            held_bytes += len(text.encode())
    (out / "heldout.json").write_text(json.dumps(held))
    shard, shard_bytes, total, n_docs, n_shards, passes = [], 0, 0, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n_shards
        name = out / f"shard-{n_shards:04d}"
        if n_shards % 2 == 0:
            pq.write_table(pa.table({"text": shard}), f"{name}.parquet", row_group_size=2048)
        else:
            lines = "".join(json.dumps({"text": t}) + "\n" for t in shard).encode()
            Path(f"{name}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(3).compress(lines))
        shard, shard_bytes, n_shards = [], 0, n_shards + 1

    while total < corpus_mb * 1e6:
        passes += 1
        for path in files:
            text = read_doc(path)
            if text is None:
                continue
            nb = len(text.encode())
            shard.append(text)
            shard_bytes += nb
            total += nb
            n_docs += 1
            if shard_bytes >= SHARD_BYTES:
                flush()
            if total >= corpus_mb * 1e6:
                break
    if shard:
        flush()
    return {"files_installed": len(files), "passes": passes, "docs": n_docs,
            "text_bytes": total, "shards": n_shards, "heldout_files": len(held),
            "heldout_bytes": held_bytes,
            "disk_bytes": sum(p.stat().st_size for p in out.glob("shard-*"))}  # fmt: skip


# ----------------------------------------------------------------------------- children


class RssPeak:
    """Peak resident memory of this process and, summed with it, of all its descendants
    (worker processes), sampled every 0.1 s from /proc. (ru_maxrss would not do: a forked
    child starts with its parent's high-water mark.)"""

    def __init__(self):
        import threading

        self.own = self.total = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss_mb(pid: int) -> float:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError):
            pass
        return 0.0

    @staticmethod
    def _descendants(root: int) -> list[int]:
        parent = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    pass
        out, todo = [], [root]
        while todo:
            p = todo.pop()
            kids = [c for c, pp in parent.items() if pp == p]
            out += kids
            todo += kids
        return out

    def _run(self):
        me = os.getpid()
        while not self._stop.wait(0.1):
            own = self._rss_mb(me)
            total = own + sum(self._rss_mb(p) for p in self._descendants(me))
            self.own, self.total = max(self.own, own), max(self.total, total)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_mb": round(self.own, 1), "peak_rss_with_workers_mb": round(self.total, 1)}


def child(args) -> dict:
    """One measurement in this process (so its peak RSS is its own)."""
    rss = RssPeak()
    from tritonlm.engine.data.corpus import open_corpus
    from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer

    corpus = open_corpus(sorted(Path(args.corpus).glob("shard-*")))
    if args.child == "build":
        from tritonlm.engine.data.token_cache import build_corpus_cache

        tok = BpeTokenizer.load(args.tokenizer)
        with tempfile.TemporaryDirectory(dir=args.corpus) as cache_dir:
            t0 = time.perf_counter()
            cache = build_corpus_cache(corpus, tok, cache_dir, workers=args.workers)
            wall = time.perf_counter() - t0
            r = {"wall_s": wall, "text_bytes": cache.n_bytes, "tokens": cache.n_tokens,
                 "engine": cache.info.get("engine")}  # fmt: skip
    elif args.child == "tiktoken":
        import tiktoken

        tok = BpeTokenizer.load(args.tokenizer)
        ranks = tok.mergeable_ranks()
        enc = tiktoken.Encoding("ours", pat_str=tok.config.pattern, mergeable_ranks=ranks,
                                special_tokens={})  # fmt: skip
        wall = wall_np = n_bytes = n_tok = 0
        for doc in corpus.documents():  # both APIs on each document, reading not timed
            t0 = time.perf_counter()
            n_tok += len(enc.encode_ordinary(doc))
            t1 = time.perf_counter()
            enc.encode_to_numpy(doc, disallowed_special=())
            wall_np += time.perf_counter() - t1
            wall += t1 - t0
            n_bytes += len(doc.encode())
        r = {"wall_s": wall, "wall_numpy_s": wall_np, "text_bytes": n_bytes, "tokens": n_tok}
    else:  # tokenizer training: ours or tokenizers, on the same sample
        from tritonlm.engine.tokenizer.tokenizer_config import SPECIAL_TOKENS, BpeTokenizerConfig

        sample = list(corpus.sample(int(args.sample_mb * 1e6)))
        r = {"sample_bytes": sum(len(s.encode()) for s in sample), "sample_docs": len(sample)}
        held = json.loads((Path(args.corpus) / "heldout.json").read_text())
        cfg = BpeTokenizerConfig(vocab_size=args.vocab)
        r["rss_before_training_mb"] = round(rss.own, 1)
        t0 = time.perf_counter()
        if args.child == "train-ours":
            tok = BpeTokenizer.train(sample, cfg, workers=2)
            r["wall_s"] = time.perf_counter() - t0
            tok.save(args.tokenizer)
            n_tok = sum(len(tok.encode(t)) for t in held)
        else:
            sys.path.insert(0, str(HERE))
            from bench_tokenizer import hf_train

            hf, _, wall = hf_train(sample, args.vocab, list(SPECIAL_TOKENS), cfg.pattern, True)
            r["wall_s"] = wall
            n_tok = sum(len(e.ids) for e in hf.encode_batch(held))
        r["heldout_bytes_per_token"] = sum(len(t.encode()) for t in held) / n_tok
    r.update(rss.stop())
    t = os.times()  # CPU seconds of this process and of its (reaped) workers
    r["cpu_s"] = t.user + t.system + t.children_user + t.children_system
    return r


def measure(kind: str, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--corpus", str(args.corpus),
           "--tokenizer", str(args.tokenizer), "--vocab", str(args.vocab),
           "--sample-mb", str(args.sample_mb)]  # fmt: skip
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {kind} {extra or ''}: {json.dumps(r)}", file=sys.stderr, flush=True)
    return r


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(args) -> dict:
    import importlib.metadata as md

    sys.path.insert(0, str(HERE))
    from peers import cpu_model

    res = {"machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(),
                       "python": sys.version.split()[0],
                       "versions": {p: md.version(p) for p in
                                    ("tiktoken", "tokenizers", "pyarrow", "zstandard")}},
           "args": {k: str(v) for k, v in vars(args).items()},
           "load_before": load_average()}  # fmt: skip
    t0 = time.perf_counter()
    res["corpus"] = build_corpus(Path(args.corpus), args.corpus_mb, args.heldout_mb)
    res["corpus"]["write_s"] = time.perf_counter() - t0
    print(f"corpus: {json.dumps(res['corpus'])}", file=sys.stderr, flush=True)
    res["train_ours"] = measure("train-ours", args)
    res["train_hf"] = measure("train-hf", args)
    res["tiktoken_1thread"] = measure("tiktoken", args)
    for w in (1, 2):
        res[f"build_{w}w"] = measure("build", args, workers=w)
    res["load_after"] = load_average()
    return res


def mbps(r: dict) -> float:
    return r["text_bytes"] / 1e6 / r["wall_s"]


def print_table(res: dict) -> None:
    c, tk = res["corpus"], mbps(res["tiktoken_1thread"])
    print(f"corpus: {c['text_bytes'] / 1e6:.0f} MB of text, {c['docs']} documents, "
          f"{c['shards']} shards ({c['disk_bytes'] / 1e6:.0f} MB on disk), {c['passes']} "
          f"pass(es) over {c['files_installed']} installed files")  # fmt: skip
    print(f"load average before/after: {res['load_before']} / {res['load_after']}")
    print("\n| measurement | MB/s | x tiktoken 1 thread | MB per CPU s | "
          "peak RSS main / with workers (MB) |")  # fmt: skip
    print("|---|---|---|---|---|")
    print(f"| tiktoken encode_ordinary, 1 thread | {tk:.2f} | 1.00 | - | - |")
    t = res["tiktoken_1thread"]
    tnp = t["text_bytes"] / 1e6 / t["wall_numpy_s"]
    print(f"| tiktoken encode_to_numpy, 1 thread | {tnp:.2f} | {tnp / tk:.2f} | - | - |")
    for w in (1, 2):
        r = res[f"build_{w}w"]
        print(
            f"| cache build, {w} worker(s), engine {r['engine']} | {mbps(r):.2f} | "
            f"{mbps(r) / tk:.2f} | {r['text_bytes'] / 1e6 / r['cpu_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} / {r['peak_rss_with_workers_mb']:.0f} |"
        )
    o, h = res["train_ours"], res["train_hf"]
    print(f"\ntokenizer training, vocab {res['args']['vocab']}, sample "
          f"{o['sample_bytes'] / 1e6:.1f} MB ({o['sample_docs']} documents)")  # fmt: skip
    print(
        "\n| trainer | wall s | peak RSS with workers (MB) | RSS before training (MB) | "
        "held-out bytes/token |"
    )
    print("|---|---|---|---|---|")
    for name, r in (("ours (2 counting workers)", o), ("tokenizers BpeTrainer", h)):
        print(
            f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_with_workers_mb']:.0f} | "
            f"{r['rss_before_training_mb']:.0f} | {r['heldout_bytes_per_token']:.4f} |"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus-mb", type=float, default=500.0)
    p.add_argument("--sample-mb", type=float, default=500.0)
    p.add_argument("--heldout-mb", type=float, default=2.0)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--corpus", help="folder for the shards (default: a temporary one)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_data.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        args.corpus = Path(args.corpus or tmp)
        args.corpus.mkdir(parents=True, exist_ok=True)
        args.tokenizer = args.corpus / "tokenizer.json"
        res = run(args)
    print_table(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
