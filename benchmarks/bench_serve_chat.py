"""Benchmark llm-serve on what chat front ends and extraction scripts do: a multi-turn chat
replayed by several clients (TTFT per turn, with and without the prefix cache), and the
cost of constrained decoding (JSON schema) per output token.

The model is RANDOM-INIT (speed does not depend on the weights): d_model 256, 4 blocks,
context 1024, a 512-id byte-level tokenizer; the rows of special tokens and of tokens that
are not whole UTF-8 characters are zeroed in the tied embedding, so free answers never stop
early and every token is text at once (see bench_serve.py). A real ``llm-serve``
subprocess serves it on 127.0.0.1.

Chat replay: --clients asyncio clients each run a --turns turn conversation (a user message
of --words words from data/pretrain.json per turn, the server's answer of --answer-tokens
tokens appended to the history, temperature 0), all clients at once, each turn after the
previous answer. Reported per turn: median TTFT (request sent -> first content chunk) over
the clients, with ``--prefix-cache-tokens 0`` and with a cache large enough for every
conversation; the goal is TTFT(turn 10) <= 1.5 x TTFT(turn 1) with the cache.

Constrained decoding: one client, --json-requests greedy chat requests with a JSON schema
(a long string field, so answers run to max_tokens) interleaved with the same requests
without it; time per output token = (last chunk - first chunk) / (tokens - 1), median.

Prints tables and writes JSON (machine, versions, settings, figures) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_serve import LLM_SERVE, Server, machine_info  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 400},
                   "year": {"type": "integer", "minimum": 1900, "maximum": 2100}},
    "required": ["title", "year"],
}  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--words", type=int, default=24, help="words per user message")
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--json-requests", type=int, default=8)
    p.add_argument("--json-tokens", type=int, default=64, help="max_tokens of those answers")
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--out", default=str(HERE / "results" / "bench_serve_chat.json"))
    return p.parse_args(argv)


def build_checkpoint(out: Path) -> Path:
    import torch
    from tritonlm.engine.checkpoint.save_load import save_checkpoint
    from tritonlm.engine.model.config import ModelConfig
    from tritonlm.engine.model.transformer import Transformer
    from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
    from tritonlm.engine.tokenizer.tokenizer_config import BpeTokenizerConfig

    text = (HERE.parent / "data" / "pretrain.json").read_text(encoding="utf-8")[:20000]
    tok = BpeTokenizer.train([text], BpeTokenizerConfig(vocab_size=512))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=256, n_layers=4, n_heads=4, d_ff=768,
                      max_seq_len=1024)  # fmt: skip
    model = Transformer(cfg, backend="torch")
    special = set(tok.special_tokens.values())
    with torch.no_grad():
        for tid in range(tok.vocab_size):
            if tid in special or not whole_utf8(tok.token_bytes(tid)):
                model.tok_emb.weight[tid] = 0.0  # tied: these never win an argmax
    path = out / "chat"
    save_checkpoint(path, model, tok, train_config={"steps": 0, "note": "random init"})
    return path


def whole_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class ChatServer(Server):
    """llm-serve with the given extra flags."""

    def __init__(self, ckpt: Path, log: Path, threads: int, *flags: str):
        import os
        import subprocess

        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        argv = [str(LLM_SERVE), str(ckpt), "--port", "0", "--max-batch", "16", "--max-queue",
                "256", *flags]  # fmt: skip
        self.log = log
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                                     env=env)  # fmt: skip
        self.url = self._wait_url()


async def stream_chat(http, messages, max_tokens, temperature=0.0, seed=None, fmt=None):
    """(TTFT, seconds from first to last content chunk, completion tokens, text)."""
    body = {"model": "chat", "messages": messages, "max_tokens": max_tokens,
            "temperature": temperature, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    if seed is not None:
        body["seed"] = seed
    if fmt is not None:
        body["response_format"] = fmt
    t0 = time.perf_counter()
    first = last = None
    tokens, parts = 0, []
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = last if first is None else first
                parts.append(chunk["choices"][0]["delta"]["content"])
    first = first or time.perf_counter()
    return first - t0, (last or first) - first, tokens, "".join(parts)


async def replay(url: str, users: list[list[str]], answer_tokens: int) -> list[list[float]]:
    """Every client's conversation at once; TTFT[turn][client]."""
    import httpx

    async def client(turns: list[str]) -> list[float]:
        history, ttfts = [], []
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            for text in turns:
                history.append({"role": "user", "content": text})
                ttft, _, _, answer = await stream_chat(http, history, answer_tokens)
                history.append({"role": "assistant", "content": answer})
                ttfts.append(ttft)
        return ttfts

    per_client = await asyncio.gather(*(client(t) for t in users))
    return [list(col) for col in zip(*per_client, strict=True)]


async def constrained(url: str, n: int, max_tokens: int) -> dict:
    """Greedy answers with and without the schema, interleaved (the load drifts)."""
    import httpx

    fmt = {"type": "json_schema", "json_schema": {"name": "book", "schema": SCHEMA}}
    runs = {"free": ([], []), "json_schema": ([], [])}
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await stream_chat(http, [{"role": "user", "content": "warm up"}], 8)
        for i in range(n):
            msg = [{"role": "user", "content": f"a book, please ({i})"}]
            for name, f in (("free", None), ("json_schema", fmt)):
                _, span, k, _ = await stream_chat(http, msg, max_tokens, 0.0, fmt=f)
                runs[name][0].append(span / max(1, k - 1))
                runs[name][1].append(k)
    out = {name: {"ms_per_token_median": 1000 * statistics.median(per_token),
                  "tokens_mean": statistics.mean(tokens)}
           for name, (per_token, tokens) in runs.items()}  # fmt: skip
    free, con = out["free"]["ms_per_token_median"], out["json_schema"]["ms_per_token_median"]
    out["overhead"] = con / free - 1
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    texts = json.loads((HERE.parent / "data" / "pretrain.json").read_text(encoding="utf-8"))
    words = " ".join(texts).split()
    users = [[" ".join(words[(c * 997 + t * 131) % (len(words) - args.words):][: args.words])
              for t in range(args.turns)] for c in range(args.clients)]  # fmt: skip
    record = {"machine": machine_info("cpu"), "settings": vars(args), "note": (
        "CPU, 2 cores shared with parallel test and benchmark runs of other engineers: "
        "absolute times are inflated and noisy")}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(tmp))
        runs = {}
        for name, budget in (("no_cache", "0"), ("prefix_cache", "32768")):
            server = ChatServer(ckpt, Path(tmp) / f"{name}.log", args.threads,
                                "--prefix-cache-tokens", budget,
                                "--max-new-tokens-cap", str(max(args.answer_tokens,
                                                                args.json_tokens)))  # fmt: skip
            try:
                table = asyncio.run(replay(server.url, users, args.answer_tokens))
                runs[name] = [statistics.median(col) for col in table]
                if name == "prefix_cache":
                    import httpx

                    metrics = httpx.get(server.url + "/metrics").text
                    record["prefix_cache_metrics"] = [
                        line for line in metrics.splitlines()
                        if line.startswith("tritonlm_prefix_cache")]  # fmt: skip
                    record["constrained"] = asyncio.run(
                        constrained(server.url, args.json_requests, args.json_tokens)
                    )
            finally:
                server.stop()
    record["ttft_median_s_per_turn"] = runs
    print(
        f"{args.clients} clients x {args.turns} turns, median TTFT per turn (s); "
        "machine loaded by parallel work"
    )
    print(f"{'turn':>4} {'no cache':>10} {'prefix cache':>13}")
    for t in range(args.turns):
        print(f"{t + 1:>4} {runs['no_cache'][t]:>10.3f} {runs['prefix_cache'][t]:>13.3f}")
    for name in runs:
        record[f"{name}_turn_last_over_first"] = runs[name][-1] / runs[name][0]
        print(f"{name}: TTFT turn {args.turns} / turn 1 = {runs[name][-1] / runs[name][0]:.2f}")
    c = record["constrained"]
    print(
        f"constrained decoding: {c['free']['ms_per_token_median']:.2f} ms/token free, "
        f"{c['json_schema']['ms_per_token_median']:.2f} ms/token with a JSON schema "
        f"(overhead {100 * c['overhead']:+.1f}%)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
