"""Benchmark llm-serve: aggregate output tokens/s and time to first token vs concurrency.

For the ``seed`` and ``small`` presets, a RANDOM-INIT model (the speed of a model does not
depend on its weights) with a byte-level tokenizer padded to --vocab entries is saved as a
checkpoint and served by a real ``llm-serve`` subprocess on 127.0.0.1. The rows of the
built-in special tokens are zeroed in the tied embedding, so greedy answers never stop
early: every request produces exactly --new-tokens tokens. So are the rows of tokens that are
not whole UTF-8 characters (lone bytes >= 0x80): every token is text as soon as it is made,
so a server that holds back partial characters (as ``transformers serve`` does) still
streams each token at once and TTFT compares like for like.

At each concurrency C in --streams, C asyncio clients each send --rounds streaming chat
requests back to back (a prompt of --prompt-words words, temperature 0). Reported:

  agg tok/s   completion tokens of all requests / wall time of the whole level
  speedup     agg tok/s / agg tok/s at one stream
  TTFT p50/95 request sent -> first content chunk received, over all requests

One warm-up request per level. Server and clients share the machine (the clients are one
asyncio thread). Prints a table and writes JSON (machine, versions, settings, figures).

``--peer transformers,transformers-cb`` adds rows for ``transformers serve`` (default mode,
and ``--continuous-batching``) on the same checkpoint exported with ``llm-export`` (fp32
Hugging Face Llama folder), served offline on 127.0.0.1 and driven by the same clients. It
needs ``transformers[serving]`` (accelerate among others) in the Python of ``--peer-bin``;
the same zeroed rows keep its greedy answers full length too. Each row also records whether
every answer's text equals llm-serve's one-stream answer (same weights, greedy).

``--in-process`` measures the engine alone: the same requests go straight to a
:class:`Scheduler` on ``--device`` (one Python thread per client, no HTTP), which also
runs where FastAPI is not installed (e.g. a GPU machine), and checks that every batched
greedy answer equals the one-stream answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLM_SERVE = Path(sys.executable).parent / "llm-serve"
LLM_EXPORT = Path(sys.executable).parent / "llm-export"
PEERS = {"transformers": False, "transformers-cb": True}  # name -> continuous batching


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="seed,small", help="comma-separated (seed,small)")
    p.add_argument("--streams", default="1,4,16,32", help="concurrency levels")
    p.add_argument("--rounds", type=int, default=3, help="requests per client per level")
    p.add_argument("--prompt-words", type=int, default=6, help="prompt length in words")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens per answer")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (8192)")
    p.add_argument("--max-batch", type=int, default=32, help="llm-serve --max-batch")
    p.add_argument("--threads", type=int, default=1, help="server torch threads (0 = default)")
    p.add_argument("--quick", action="store_true", help="seed only, 1 round")
    p.add_argument("--in-process", action="store_true", help="the scheduler alone, no HTTP")
    p.add_argument("--device", default="cpu", help="--in-process device (cpu, cuda)")
    p.add_argument(
        "--peer",
        default="none",
        help="also serve the llm-export'ed model: transformers, transformers-cb (comma list)",
    )
    p.add_argument(
        "--peer-bin",
        default=str(Path(sys.executable).parent / "transformers"),
        help="the `transformers` CLI (its Python needs transformers[serving])",
    )
    p.add_argument("--peer-streams", default=None, help="peer levels (default: --streams)")
    p.add_argument("--out", default=str(HERE / "results" / "bench_serve.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.presets, args.rounds = "seed", 1
    args.peer = [x for x in args.peer.split(",") if x not in ("", "none")]
    if set(args.peer) - set(PEERS):
        p.error(f"--peer: choose from {','.join(PEERS)}")
    if args.peer and args.in_process:
        p.error("--peer needs the HTTP mode (not --in-process)")
    return args


def build_checkpoint(preset: str, vocab: int, out: Path) -> Path:
    """A random-init preset model with a tokenizer of exactly ``vocab`` ids."""
    import torch
    from tritonlm.engine.checkpoint.save_load import save_checkpoint
    from tritonlm.engine.model.config import ModelConfig
    from tritonlm.engine.model.transformer import Transformer
    from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
    from tritonlm.engine.tokenizer.tokenizer_config import BpeTokenizerConfig

    text = (HERE.parent / "data" / "pretrain.json").read_text(encoding="utf-8")[:20000]
    tok = BpeTokenizer.train([text], BpeTokenizerConfig(vocab_size=512))
    # Pad with reserved special tokens so the output projection has the intended size.
    spare = vocab - tok.vocab_size
    if spare > 0:
        names = tuple(f"<|reserved_{i}|>" for i in range(spare))
        cfg = BpeTokenizerConfig(vocab_size=vocab, special_tokens=names)
        tok = BpeTokenizer.train([text], cfg)
    special = set(tok.special_tokens.values())
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, vocab_size=tok.vocab_size), backend="torch")
    with torch.no_grad():
        for tid in tok.special_tokens.values():
            model.tok_emb.weight[tid] = 0.0  # tied: special tokens never win an argmax
        for tid in range(tok.vocab_size):  # nor pieces of a UTF-8 character (see below)
            if tid not in special and not _whole_chars(tok.token_bytes(tid)):
                model.tok_emb.weight[tid] = 0.0
    path = out / preset
    save_checkpoint(path, model, tok, train_config={"steps": 0, "note": "random init"})
    return path


def _whole_chars(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Server:
    def __init__(self, ckpt: Path, args, log: Path):
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        argv = [str(LLM_SERVE), str(ckpt), "--port", "0", "--max-batch", str(args.max_batch),
                "--max-queue", "256", "--max-new-tokens-cap", str(args.new_tokens)]  # fmt: skip
        self.log = log
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                                     env=env)  # fmt: skip
        self.url = self._wait_url()

    def _wait_url(self) -> str:
        deadline = time.monotonic() + 300  # llm-serve prints its URL once it listens
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if '"event": "listening"' in line:
                    return json.loads(line.partition(": ")[2])["url"]
            if self.proc.poll() is not None:
                raise SystemExit(f"llm-serve failed: {self.log.read_text()}")
            time.sleep(0.1)
        raise SystemExit("llm-serve did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class PeerServer(Server):
    """``transformers serve`` on the llm-export'ed copy of the checkpoint, offline."""

    def __init__(self, ckpt: Path, args, log: Path, cb: bool = False):
        hf_dir = ckpt.with_name(ckpt.name + "-hf")
        subprocess.run([str(LLM_EXPORT), str(ckpt), str(hf_dir), "--dtype", "fp32"],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        self.model = str(hf_dir)  # a pinned server only answers to its own model id
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        with socket.socket() as s:  # a free port: transformers serve has no --port 0
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv = [
            args.peer_bin,
            "serve",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--log-level",
            "warning",
        ]
        if cb:
            argv.append("--continuous-batching")
        self.log = log
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                                     env=env)  # fmt: skip
        self.url = self._wait_url()

    def _wait_url(self) -> str:
        import httpx

        url, deadline = f"http://127.0.0.1:{self.port}", time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text().strip().splitlines()[-1:] or ["(no output)"]
                raise SystemExit(f"transformers serve failed: {tail[0]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.5)
        raise SystemExit("transformers serve did not start")


def peer_version(peer_bin: str) -> str:
    """transformers' version in the peer's own Python; stop early if it cannot serve."""
    python = Path(peer_bin).parent / "python"
    # transformers serve always loads with a device_map, which needs accelerate.
    code = "import accelerate, fastapi, uvicorn, transformers; print(transformers.__version__)"
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    except OSError as e:
        raise SystemExit(f"--peer-bin {peer_bin}: no Python beside it ({e})") from None
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["failed"])[-1]
        raise SystemExit(f"--peer-bin {peer_bin} cannot serve ({why}): use a venv with "
                         "transformers[serving]")  # fmt: skip
    return out.stdout.strip()


async def one_request(http, model: str, prompt: str, n: int) -> tuple[float, int, str]:
    """Stream one answer: (seconds to the first content chunk, completion tokens, text)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    ttft, tokens, text = None, 0, []
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif (piece := chunk["choices"][0]["delta"].get("content")) is not None:
                ttft = time.perf_counter() - t0 if ttft is None else ttft
                text.append(piece)
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens, "".join(text)


async def level(url: str, model: str, streams: int, rounds: int, prompt: str, n: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await one_request(http, model, prompt, n)  # warm-up

        async def client():
            return [await one_request(http, model, prompt, n) for _ in range(rounds)]

        t0 = time.perf_counter()
        results = await asyncio.gather(*(client() for _ in range(streams)))
        wall = time.perf_counter() - t0
    flat = [x for per in results for x in per]
    ttfts = sorted(t for t, _, _ in flat)
    tokens = sum(k for _, k, _ in flat)
    assert tokens == n * len(flat), "an answer stopped early"
    return {"streams": streams, "requests": len(flat), "tokens": tokens, "wall_s": wall,
            "agg_tok_s": tokens / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            "answers": {a for _, _, a in flat}}  # fmt: skip


def level_in_process(sched, streams: int, rounds: int, prompt: list[int], n: int) -> dict:
    """The same level as :func:`level`, with threads calling the scheduler directly."""
    from concurrent.futures import ThreadPoolExecutor

    from tritonlm.engine.inference.sampling import SamplingConfig

    cfg = SamplingConfig(temperature=0, max_new_tokens=n)

    def one() -> tuple[float, int, list[int]]:
        t0 = time.perf_counter()
        ttft, tokens = None, 0
        for event in sched.submit(prompt, cfg):
            tokens += event.n_tokens
            if ttft is None and event.n_tokens:
                ttft = time.perf_counter() - t0
        return ttft, tokens, event.result.token_ids

    one()  # warm-up
    with ThreadPoolExecutor(streams) as pool:
        t0 = time.perf_counter()
        futures = [pool.submit(lambda: [one() for _ in range(rounds)]) for _ in range(streams)]
        flat = [x for f in futures for x in f.result()]
        wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _, _ in flat)
    tokens = sum(k for _, k, _ in flat)
    assert tokens == n * len(flat), "an answer stopped early"
    return {"streams": streams, "requests": len(flat), "tokens": tokens, "wall_s": wall,
            "agg_tok_s": tokens / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            "answers": {tuple(ids) for _, _, ids in flat}}  # fmt: skip


def run_in_process(preset: str, ckpt: Path, args, streams: list[int], words: str) -> list[dict]:
    import torch
    from tritonlm.engine.checkpoint.save_load import load_checkpoint
    from tritonlm.engine.inference.scheduler import Scheduler

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_checkpoint(ckpt, device=args.device)
    tok = loaded.tokenizer
    prompt, _ = tok.render_chat([{"role": "user", "content": words}], add_generation_prompt=True)
    sched = Scheduler(loaded.model, tok, max_batch=args.max_batch, max_queue=256).start()
    rows = []
    try:
        for c in streams:
            row = level_in_process(sched, c, args.rounds, prompt, args.new_tokens)
            rows.append(row)
            print(f"  {preset} x{c} (in process): {row['agg_tok_s']:.1f} tok/s", file=sys.stderr)
    finally:
        sched.stop()
    # Greedy: every answer at every concurrency equals the one-stream answer.
    solo = rows[0]["answers"]
    for row in rows:
        row["batch_equals_alone"] = row.pop("answers") == solo and len(solo) == 1
    return rows


def machine_info(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(), "device": device}  # fmt: skip
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    for name in ("fastapi", "uvicorn"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    streams = [int(s) for s in args.streams.split(",")]
    words = "the model reads a prompt and writes an answer one token at a time".split()
    prompt = " ".join(words[i % len(words)] for i in range(args.prompt_words))
    device = args.device if args.in_process else "server: llm-serve --device auto"
    report = {"machine": machine_info(args.device), "settings": vars(args), "rows": []}
    report["machine"]["device"] = device
    servers = [("llm-serve", Server, streams)]
    peer_levels = [int(x) for x in (args.peer_streams or args.streams).split(",")]
    for peer in args.peer:
        name = "transformers serve" + (" --cb" if PEERS[peer] else "")
        servers.append((name, partial(PeerServer, cb=PEERS[peer]), peer_levels))
    if args.peer:
        report["machine"]["peer_transformers"] = peer_version(args.peer_bin)
        report["peer_note"] = (
            "transformers serve on the llm-export fp32 folder of the same checkpoint, --device "
            "cpu --dtype float32, same clients, max_tokens and temperature 0; no ignore_eos is "
            "sent to either server: the zeroed special-token rows keep both greedy answers full "
            "length (each level asserts completion tokens == new tokens * requests). 'transformers "
            "serve': default mode, one model.generate() at a time on its inference thread; "
            "'--cb': --continuous-batching (paged attention)."
        )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            ckpt = build_checkpoint(preset, args.vocab, Path(tmp))
            if args.in_process:
                for row in run_in_process(preset, ckpt, args, streams, prompt):
                    report["rows"].append({**row, "preset": preset})
                continue
            for name, cls, levels in servers:
                log = Path(tmp) / f"{preset}-{name.replace(' ', '_')}.log"
                server = cls(ckpt, args, log)
                model = getattr(server, "model", preset)
                try:
                    for c in levels:
                        row = asyncio.run(level(server.url, model, c, args.rounds, prompt,
                                                args.new_tokens))  # fmt: skip
                        row.update(preset=preset, server=name)
                        report["rows"].append(row)
                        print(f"  {name} {preset} x{c}: {row['agg_tok_s']:.1f} tok/s",
                              file=sys.stderr)  # fmt: skip
                finally:
                    server.stop()
            # Greedy, same weights: does every answer equal llm-serve's one-stream answer?
            solo = next(r["answers"] for r in report["rows"] if r.get("preset") == preset)
            for r in report["rows"]:
                if r.get("preset") == preset and "answers" in r:
                    r["same_answer_as_llm_serve_1"] = r.pop("answers") == solo and len(solo) == 1
    key = lambda r: (r.get("server"), r["preset"])  # noqa: E731
    base = {key(r): r["agg_tok_s"] for r in report["rows"] if r["streams"] == 1}
    same = "batch_equals_alone" if args.in_process else "same_answer_as_llm_serve_1"
    print(f"{'server':24}{'preset':8}{'streams':>8}{'requests':>9}{'agg tok/s':>11}{'speedup':>9}"
          f"{'TTFT p50':>10}{'TTFT p95':>10}"
          f"{'  = alone' if args.in_process else '  = llm-serve x1'}")  # fmt: skip
    for r in report["rows"]:
        r["speedup_vs_1"] = r["agg_tok_s"] / base[key(r)] if key(r) in base else None
        sp = f"{r['speedup_vs_1']:.2f}x" if r["speedup_vs_1"] else "-"
        print(f"{r.get('server', 'in process'):24}{r['preset']:8}{r['streams']:>8}"
              f"{r['requests']:>9}{r['agg_tok_s']:>11.1f}"
              f"{sp:>9}{r['ttft_p50_s']:>9.3f}s{r['ttft_p95_s']:>9.3f}s  {r[same]}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
