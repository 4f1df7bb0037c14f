"""Packed sequences in training: pretraining windows with document ids (--doc-mask), SFT
rows packed with whole conversations (--pack), padding fractions, and the CLI flags.

Tiny models on the CPU, one torch thread (as in test_train.py)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from chat_fixtures import TINY_TRAIN
from tritonlm.cli import train as cli
from tritonlm.engine.checkpoint.save_load import load_checkpoint
from tritonlm.engine.data import token_cache as tc
from tritonlm.engine.model.config import ModelConfig
from tritonlm.engine.model.transformer import IGNORE_INDEX, Transformer
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
from tritonlm.engine.tokenizer.tokenizer_config import BpeTokenizerConfig
from tritonlm.engine.train import batches as bs
from tritonlm.engine.train.loop import train
from tritonlm.engine.train.packing import first_fit, split_at_turns
from tritonlm.engine.train.train_config import TrainConfig

TEXTS = [f"Document {i} talks about {w} and {w} again." for i in range(12)
         for w in ("rain", "sand")]  # fmt: skip
WORDS = ("apple", "tree", "river", "stone", "cloud", "house", "bread", "music", "lamp")
CHATS = [
    [{"role": "user", "content": f"What is {w}?"},
     {"role": "assistant", "content": f"{w.capitalize()} is a word with {len(w)} letters."}]
    * (1 + i % 3)  # one to three turns
    for i, w in enumerate(WORDS)
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tok():
    texts = TEXTS + [m["content"] for c in CHATS for m in c]
    return BpeTokenizer.train(texts, BpeTokenizerConfig(vocab_size=300))


# ----------------------------------------------------------------------------- packing


def test_split_at_turns_keeps_every_target():
    mask = np.array([0, 0, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1])
    assert split_at_turns(mask, 0, 15, limit=20) == ([(0, 15)], False)
    pieces, cut = split_at_turns(mask, 0, 15, limit=5)
    assert pieces[:2] == [(0, 4), (4, 8)] and cut  # the last turn (8..15) is cut inside
    targets = [t for a, b in pieces for t in range(a + 1, b)]
    answers = {t for t in range(1, 15) if mask[t]}
    assert answers <= set(targets)  # every assistant target kept (cuts overlap one token)
    assert all(b - a <= 5 for a, b in pieces)


def test_first_fit_places_each_item_in_the_first_row_with_room():
    assert first_fit([3, 2, 4, 1], capacity=5, order=[0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert first_fit([3, 2, 4, 1], capacity=5, order=[2, 0, 3, 1]) == [[2, 3], [0, 1]]


def _conversation_targets(tok, chat, limit=None):
    ids, mask = tok.render_chat(chat)
    return [t for t, m in zip(ids[1:], mask[1:], strict=True) if m]


def test_packed_rows_hold_every_conversation_once_with_its_mask(tok, tmp_path):
    cache = tc.build_chat_cache(CHATS, tok, tmp_path)
    data = bs.ChatBatches(cache, seq_len=128, val_fraction=0.0, seed=3, pad_id=tok.pad_id,
                          pack=True)  # fmt: skip
    assert data.n_train < len(CHATS)  # several conversations per row
    b = data.train_batch(None, np.arange(data.n_train))
    assert b.document_ids.shape == b.idx.shape and b.document_ids.dtype == torch.int32
    got = Counter()
    for r in range(data.n_train):
        L = int(b.lengths[r]) if b.lengths is not None else b.idx.shape[1]
        docs = b.document_ids[r, :L]
        for d in docs.unique().tolist():
            sel = docs == d
            got[tuple(t for t in b.targets[r, :L][sel].tolist() if t != IGNORE_INDEX)] += 1
        assert (b.targets[r, L:] == IGNORE_INDEX).all()
    want = Counter(tuple(_conversation_targets(tok, c)) for c in CHATS)
    assert got == want  # assistant targets only, each conversation exactly once
    again = bs.ChatBatches(cache, 128, 0.0, 3, tok.pad_id, pack=True)
    assert again.rows == data.rows  # seeded: same packing for a resumed run
    assert bs.ChatBatches(cache, 128, 0.0, 4, tok.pad_id, pack=True).rows != data.rows


def test_long_conversations_are_split_and_reported(tok, tmp_path):
    cache = tc.build_chat_cache(CHATS, tok, tmp_path)
    data = bs.ChatBatches(cache, seq_len=24, val_fraction=0.0, seed=0, pad_id=tok.pad_id,
                          pack=True)  # fmt: skip
    n_long = sum(len(tok.render_chat(c)[0]) > 25 for c in CHATS)
    assert n_long > 0
    assert len(data.notes) == 1 and data.notes[0].startswith(f"{n_long} of {len(CHATS)} ")
    targets = data.counts(np.arange(data.n_train))[0]
    assert targets == sum(len(_conversation_targets(tok, c)) for c in CHATS)  # none dropped
    padded = bs.ChatBatches(cache, seq_len=24, val_fraction=0.0, seed=0, pad_id=tok.pad_id)
    assert "cut at seq_len + 1 = 25 tokens" in padded.notes[0]


def test_packed_loss_equals_padded_loss(tok, tmp_path):
    """Same conversations, same model: the target-weighted loss over packed rows equals
    the one over padded rows (attention and positions restart per conversation)."""
    cache = tc.build_chat_cache(CHATS, tok, tmp_path)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2,
                                    n_heads=2, d_ff=64, max_seq_len=128)).eval()  # fmt: skip
    totals = {}
    for pack in (False, True):
        data = bs.ChatBatches(cache, 128, 0.0, 1, tok.pad_id, pack=pack)
        bt = data.train_batch(None, np.arange(data.n_train))
        with torch.no_grad():
            loss = model.loss(bt.idx, bt.targets, lengths=bt.lengths, document_ids=bt.document_ids)
        totals[pack] = (float(loss) * bt.n_targets, bt.n_targets, bt.idx.numel())
    assert totals[True][1] == totals[False][1]
    assert totals[True][0] == pytest.approx(totals[False][0], rel=1e-5)
    assert totals[True][2] < totals[False][2]  # fewer positions: less padding


def test_ranks_split_packed_rows_like_one_process(tok, tmp_path):
    cache = tc.build_chat_cache(CHATS * 4, tok, tmp_path)
    data = bs.ChatBatches(cache, 32, 0.0, 0, tok.pad_id, pack=True)

    def plan(rank, world, b):
        return [bs.StepPlanner(data, b, 2, seed=5, rank=rank, world=world).step(s) for s in (0, 1)]

    single, r0, r1 = plan(0, 1, 4), plan(0, 2, 2), plan(1, 2, 2)
    for s in (0, 1):
        rows = lambda sb: [row for bt in sb.micro for row in bt.targets.tolist()]  # noqa: E731
        strip = lambda rs: [[t for t in r if t != IGNORE_INDEX] for r in rs]  # noqa: E731
        a, b = rows(r0[s]), rows(r1[s])
        assert strip(a[:2] + b[:2] + a[2:] + b[2:]) == strip(rows(single[s]))
        for sb in (r0[s], r1[s]):
            assert sb.global_targets == single[s].global_targets
            assert sb.global_positions == single[s].global_positions > 0


# ----------------------------------------------------------------------------- pretraining


def test_pretrain_windows_carry_document_ids(tok, tmp_path):
    cache = tc.build_pretrain_cache(TEXTS, tok, tmp_path)
    plain = bs.PretrainWindows(cache, 16, 0.2, 0)
    masked = bs.PretrainWindows(cache, 16, 0.2, 0, doc_mask=True)
    items = bs.EpochSampler(masked.n_train, 0).items(0, 4)
    a, b = plain.train_batch(*items), masked.train_batch(*items)
    assert a.document_ids is None and torch.equal(a.idx, b.idx)
    offs = cache.doc_offsets
    bos = tok.bos_id
    for r in range(4):
        ids = b.document_ids[r].tolist()
        assert ids == sorted(ids)  # non-decreasing: documents are runs
        for t in range(1, 16):  # a new id exactly where a document starts (<|bos|>)
            assert (ids[t] != ids[t - 1]) == (int(b.idx[r, t]) == bos)
        assert 0 <= ids[0] < len(offs) - 1
    v = masked.val_batch(np.arange(2))
    assert v.document_ids is not None and v.document_ids.shape == v.idx.shape


def test_train_reports_padding_and_uses_document_ids(tok, tmp_path):
    pre = tc.build_pretrain_cache(TEXTS, tok, tmp_path)
    chat = tc.build_chat_cache(CHATS, tok, tmp_path)
    cfg = dict(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, d_ff=64,
               max_seq_len=128)  # fmt: skip
    results = {}
    for name, cache, extra in (
        ("pre_plain", pre, dict(phase="pretrain")),
        ("pre_mask", pre, dict(phase="pretrain", doc_mask=True)),
        ("sft_pad", chat, dict(phase="sft")),
        ("sft_pack", chat, dict(phase="sft", pack=True)),
    ):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**cfg))
        tc_ = TrainConfig(steps=2, batch_size=4, eval_every=2, eval_batches=1, seed=0, seq_len=48,
                          device="cpu", **extra)  # fmt: skip
        out = tmp_path / name
        results[name] = train(model, tok, cache, tc_, out)
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(0.0 <= r["pad_fraction"] < 1.0 for r in records)
        assert load_checkpoint(out).train_config["doc_mask"] == extra.get("doc_mask", False)
    assert results["pre_plain"].pad_fraction == 0.0 == results["pre_mask"].pad_fraction
    assert results["pre_plain"].loss != results["pre_mask"].loss  # the mask changed the model
    assert results["sft_pack"].pad_fraction < results["sft_pad"].pad_fraction


# ----------------------------------------------------------------------------- CLI


@pytest.mark.usefixtures("restore_threads")
def test_cli_doc_mask_default_and_pack_summary(tmp_path, capsys):
    (tmp_path / "pre.json").write_text(json.dumps(TEXTS))
    chats = [f"User: What is {w}? Assistant: {w} is a word." for w in WORDS]
    (tmp_path / "chat.json").write_text(json.dumps(chats))
    base = [*TINY_TRAIN, "--data", tmp_path / "pre.json", "--pretrain-steps", "1",
            "--eval-every", "0"]  # fmt: skip
    runs = {}
    for name, flags in (("default", []), ("off", ["--no-doc-mask"])):
        out = tmp_path / name
        code = cli.main([str(a) for a in [*base, "--out", out, *flags]])
        assert code == 0, capsys.readouterr().err
        runs[name] = load_checkpoint(out).train_config["doc_mask"]
    assert runs == {"default": True, "off": False}
    capsys.readouterr()
    out = tmp_path / "sft"
    argv = [*TINY_TRAIN, "--chat-data", tmp_path / "chat.json", "--steps", "1", "--pack",
            "--eval-every", "0", "--out", out]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "sft: 1 steps, loss" in printed and ", padding " in printed
    assert load_checkpoint(out).train_config["pack"] is True
    assert cli.main([str(a) for a in [*TINY_TRAIN, "--data", tmp_path / "pre.json", "--pack",
                                     "--out", tmp_path / "x"]]) == 2  # fmt: skip
    assert "--pack needs --chat-data" in capsys.readouterr().err


def test_a_run_saved_before_the_options_resumes_without_them():
    """A saved phase config without doc_mask/pack (runs from before the options) resumes
    with both off, whatever the new run's defaults are."""
    from tritonlm.engine.train.run_plan import phase_config

    old = TrainConfig(phase="pretrain", steps=5).to_dict()
    del old["doc_mask"], old["pack"]
    resumed = phase_config("pretrain", {"doc_mask": True}, resumed=old)
    assert resumed.doc_mask is False and resumed.pack is False
    assert phase_config("pretrain", {"doc_mask": True}, steps=5).doc_mask is True
