"""`make demo` as a new user runs it: no root, no apt, no browser (only the page test needs
chromium), and a model whose context holds a short conversation of the bundled chats."""

import shlex
import statistics
import subprocess
from pathlib import Path

from tritonlm.cli import train_flags
from tritonlm.engine.data.records import load_chats
from tritonlm.engine.inference.chat_prompt import history_budget
from tritonlm.engine.model.config import PRESETS
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
from tritonlm.engine.tokenizer.tokenizer_config import BpeTokenizerConfig
from tritonlm.engine.train.run_plan import DEFAULT_VOCAB

ROOT = Path(__file__).resolve().parent.parent


def _demo_commands() -> list[str]:
    dry = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True,
                         check=True, stdin=subprocess.DEVNULL).stdout  # fmt: skip
    return dry.replace("\\\n", " ").splitlines()


def test_make_demo_needs_neither_root_nor_apt_nor_a_browser():
    commands = _demo_commands()
    assert any("llm-train" in c for c in commands) and any("llm-chat" in c for c in commands)
    for word in ("apt-get", "sudo", "chromium", "playwright"):
        assert not any(word in c for c in commands), (word, commands)


def test_the_demo_model_holds_a_two_turn_conversation():
    line = next(c for c in _demo_commands() if "llm-train" in c)
    args = train_flags.build_parser().parse_args(shlex.split(line)[1:])
    context = args.seq_len or PRESETS[args.preset]["max_seq_len"]
    chats = load_chats(ROOT / "data" / "chat.json").items
    texts = [m["content"] for chat in chats for m in chat]
    tok = BpeTokenizer.train(texts, BpeTokenizerConfig(vocab_size=DEFAULT_VOCAB[args.preset]))
    # Two turns: two bundled chats one after the other, and llm-chat's room to answer.
    pairs = [a + b for a, b in zip(chats[::2], chats[1::2], strict=False)]
    lengths = [len(tok.render_chat(p, add_generation_prompt=True)[0]) for p in pairs]
    budget = history_budget(context, 256)  # llm-chat's default --max-new-tokens
    assert statistics.median(lengths) <= budget, (context, budget, lengths[:9])
    fits = sum(n <= budget for n in lengths) / len(lengths)
    assert fits >= 0.75, fits
