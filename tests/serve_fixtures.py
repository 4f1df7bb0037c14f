"""A live llm-serve for the server tests: started on a free port of 127.0.0.1, always stopped.

``long_checkpoint`` is an untrained model whose special tokens can never win an argmax
(their tied embedding rows are zero while every other logit is a random +/- value), so a
greedy answer runs until max_tokens: long streams for stop buttons, disconnects and load.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch
from factories import tiny_model, tiny_tokenizer
from procs import HANG_GUARD_S
from tritonlm.engine.checkpoint.save_load import save_checkpoint

LLM_SERVE = Path(sys.executable).parent / "llm-serve"
_LONG: list[Path] = []


def long_checkpoint(tmp_path_factory) -> Path:
    if _LONG:
        return _LONG[0]
    tok = tiny_tokenizer(["the quick brown fox jumps over the lazy dog"] * 4, vocab_size=280)
    model = tiny_model(tok, seed=1, backend="torch", d_ff=64, max_seq_len=4096, init_std=0.5)
    with torch.no_grad():
        for tid in tok.special_tokens.values():
            model.tok_emb.weight[tid] = 0.0  # tied: these logits are exactly 0
    path = tmp_path_factory.mktemp("long") / "long"
    save_checkpoint(path, model, tok, train_config={"steps": 0})
    _LONG.append(path)
    return path


class Server:
    """A running llm-serve: ``url``, ``pid``, the stderr ``log`` file and a client."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path, api_key: str | None):
        self.proc, self.url, self.log, self.api_key = proc, url, log, api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, timeout=HANG_GUARD_S, headers=headers)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_lines(self) -> list[dict]:
        """The JSON log records written so far."""
        out = []
        for line in self.log.read_text(encoding="utf-8").splitlines():
            _, _, rest = line.partition(": ")
            if rest.startswith("{"):
                out.append(json.loads(rest))
        return out

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def openai(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "unused",
                             timeout=HANG_GUARD_S, max_retries=0)  # fmt: skip


@contextlib.contextmanager
def serving(ckpt: Path, tmp_path: Path, *args, api_key: str | None = None,
            env: dict | None = None) -> Iterator[Server]:  # fmt: skip
    """Start llm-serve on a free port; stop it (SIGTERM, then kill) whatever happens."""
    log = tmp_path / f"serve-{time.monotonic_ns()}.log"
    argv = [LLM_SERVE, ckpt, "--port", "0", *args]
    if api_key:
        argv += ["--api-key", api_key]
    full_env = {**os.environ, **(env or {})}
    with open(log, "w") as err:
        proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=err,
                                stdin=subprocess.DEVNULL, env=full_env)  # fmt: skip
    server = None
    try:
        url = _wait_for_url(proc, log)
        server = Server(proc, url, log, api_key)
        _wait_healthy(proc, server)
        yield server
    finally:
        if server is not None:
            server.http.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for_url(proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        for line in log.read_text(encoding="utf-8").splitlines():
            if '"event": "listening"' in line:
                return json.loads(line.partition(": ")[2])["url"]
        assert proc.poll() is None, f"llm-serve ended early: {log.read_text()}"
        time.sleep(0.05)
    raise AssertionError("llm-serve never started listening")


def _wait_healthy(proc: subprocess.Popen, server: Server) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"llm-serve ended early: {server.log.read_text()}"
        with contextlib.suppress(httpx.TransportError):
            if server.http.get("/health").status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError("llm-serve never answered /health")
