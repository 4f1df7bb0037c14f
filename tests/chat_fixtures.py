"""A tiny checkpoint that has memorized three one-turn chats, for the llm-chat tests.

Greedy answers are known: "hi" -> "hello there, friend.". Built once per test process
and shared by every module that asks (each wraps `trained_checkpoint` in a fixture).
"""

import sys
from pathlib import Path

import torch
from factories import tiny_model, tiny_tokenizer
from tritonlm.engine.checkpoint.save_load import save_checkpoint

CHATS = [
    ("hi", "hello there, friend."),
    ("what is a token?", "a piece of text."),
    ("bye", "goodbye! ünïcode ✓"),
]
LLM_CHAT = Path(sys.executable).parent / "llm-chat"
TIMEOUT = 60.0  # generous: the test machine may be busy

# llm-train flags for a model and run small enough for a test (CPU, one thread, quiet).
TINY_TRAIN = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64",
              "--seq-len", "16", "--vocab-size", "300", "--batch-size", "4", "--threads", "1",
              "--quiet"]  # fmt: skip


_BUILT: list[Path] = []


def trained_checkpoint(tmp_path_factory) -> Path:
    if _BUILT:
        return _BUILT[0]
    texts = [f"{u} {a}" for u, a in CHATS] * 4
    tok = tiny_tokenizer(texts, vocab_size=300)
    model = tiny_model(tok, backend="torch", d_model=48, d_ff=96, max_seq_len=64).train()
    rows = [
        tok.render_chat([{"role": "user", "content": u}, {"role": "assistant", "content": a}])
        for u, a in CHATS
    ]
    width = max(len(ids) for ids, _ in rows)
    idx = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    mask = torch.tensor([m + [0] * (width - len(m)) for _, m in rows])
    lengths = torch.tensor([len(ids) - 1 for ids, _ in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model.loss(idx[:, :-1], idx[:, 1:], loss_mask=mask[:, 1:], lengths=lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    path = tmp_path_factory.mktemp("chat") / "ckpt"
    save_checkpoint(path, model, tok, train_config={"steps": 60})
    _BUILT.append(path)
    return path


class Sink:
    """A text stream that keeps what was written (for answers and errors)."""

    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.parts)
