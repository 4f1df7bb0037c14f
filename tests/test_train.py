"""Training loop, token cache, schedule and sampler (engine/train.py, engine/token_cache.py).

Everything runs on the CPU with tiny models; torch uses one thread here so that the
figures do not depend on the machine's core count and parallel test workers do not fight.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import tiny_model, tiny_tokenizer
from tritonlm.engine.checkpoint.save_load import load_checkpoint
from tritonlm.engine.data import token_cache as tc
from tritonlm.engine.data.records import load_texts
from tritonlm.engine.model.config import ModelConfig
from tritonlm.engine.model.transformer import IGNORE_INDEX, Transformer
from tritonlm.engine.stop import StopRequest
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
from tritonlm.engine.tokenizer.tokenizer_config import BpeTokenizerConfig
from tritonlm.engine.train import batches as bs
from tritonlm.engine.train import loop as tr
from tritonlm.engine.train.loop import train
from tritonlm.engine.train.runtime import build_optimizer
from tritonlm.engine.train.train_config import TrainConfig, TrainingError

REPO = Path(__file__).resolve().parents[1]

TEXTS = [
    f"The {a} {b} jumps over the {c} dog number {i}. It was a {b} day."
    for i, (a, b, c) in enumerate(
        (a, b, c)
        for a in ("quick", "slow", "tiny", "big")
        for b in ("brown", "red", "green")
        for c in ("lazy", "happy", "sleepy", "odd")
    )
]
CHATS = [
    [
        {"role": "user", "content": f"What is {w}?"},
        {"role": "assistant", "content": f"{w.capitalize()} is a word with {len(w)} letters."},
    ]
    for w in ("apple", "tree", "river", "stone", "cloud", "house", "bread", "music")
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tok():
    texts = TEXTS + [m["content"] for c in CHATS for m in c]
    return tiny_tokenizer(texts, vocab_size=300)


SHAPE = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=16)


def quick(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, warmup=1, lr=3e-3, eval_every=0, device="cpu")
    return TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- config


def test_train_config_json_roundtrip():
    cfg = TrainConfig(phase="sft", steps=None, epochs=2.5, betas=(0.8, 0.9), min_lr=1e-5)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(d) == cfg


@pytest.mark.parametrize(
    "changes, word",
    [
        ({"steps": 0}, "steps"),
        ({"steps": None}, "exactly one"),
        ({"epochs": 2.0}, "exactly one"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"min_lr": 1.0, "lr": 0.1}, "min_lr"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"phase": "rlhf"}, "phase"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"patience": 2, "eval_every": 0}, "patience"),
        ({"grad_accum": 1.5}, "grad_accum"),
    ],
)
def test_train_config_rejects(changes, word):
    with pytest.raises(ValueError, match=word):
        TrainConfig(**changes)
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"stepz": 3})


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup=4, steps=20)
    lrs = [tr.lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))  # monotone decay
    assert tr.lr_at(20, 20, cfg) == pytest.approx(0.1)
    assert tr.lr_at(12, 20, cfg) == pytest.approx(0.1 + 0.45)  # half way: mean of lr and min


def test_auto_warmup_follows_the_run_length():
    """warmup=None (the CLI's default) is a tenth of the run, at most 100 steps, even when
    the step count only becomes known from --epochs."""
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup=None, steps=30)
    assert [tr.lr_at(s, 30, cfg) for s in range(3)] == [
        pytest.approx(1 / 3),
        pytest.approx(2 / 3),
        1.0,
    ]
    assert tr.lr_at(29, 30, cfg) < 0.01  # decays to the end of a short run
    assert tr.lr_at(99, 5000, cfg) == 1.0 and tr.lr_at(98, 5000, cfg) < 1.0


def test_weight_decay_only_on_matrices(tok):
    model = tiny_model(tok, SHAPE)
    opt = build_optimizer(model, quick(weight_decay=0.3))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name


# ----------------------------------------------------------------------------- token cache


def test_token_dtype_boundary():
    assert tc.token_dtype(65536) == np.uint16
    assert tc.token_dtype(65537) == np.uint32


def test_pretrain_cache_layout_and_reuse(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(tc, "CHUNK_TOKENS", 7)  # force many streamed chunks
    cache = tc.build_pretrain_cache(TEXTS, tok, tmp_path)
    assert cache.tokens.dtype == np.uint16 and isinstance(cache.tokens, np.memmap)
    assert cache.n_docs == len(TEXTS)
    for i in (0, 5, len(TEXTS) - 1):
        doc = cache.tokens[cache.doc_offsets[i] : cache.doc_offsets[i + 1]].tolist()
        assert doc == [tok.bos_id, *tok.encode(TEXTS[i]), tok.eos_id]
        assert cache.doc_bytes[i] == len(TEXTS[i].encode())
    assert cache.n_bytes == sum(len(t.encode()) for t in TEXTS)
    entries = [p.name for p in tmp_path.iterdir()]
    assert entries == [cache.path.name]  # no temporary directories left behind
    mtime = (cache.path / "tokens.bin").stat().st_mtime_ns
    again = tc.build_pretrain_cache(TEXTS, tok, tmp_path)  # same data: reused, not rebuilt
    assert again.path == cache.path and (cache.path / "tokens.bin").stat().st_mtime_ns == mtime
    other = tc.build_pretrain_cache(TEXTS[:-1], tok, tmp_path)  # different data: new key
    assert other.key != cache.key and other.path != cache.path


def test_cache_key_depends_on_tokenizer_and_item_boundaries(tok):
    fp = tc.tokenizer_fingerprint(tok)
    assert tc.cache_key("pretrain", ["ab"], fp) != tc.cache_key("pretrain", ["a", "b"], fp)
    tok2 = BpeTokenizer.train(TEXTS, BpeTokenizerConfig(vocab_size=280))
    fp2 = tc.tokenizer_fingerprint(tok2)
    assert tc.cache_key("pretrain", ["ab"], fp) != tc.cache_key("pretrain", ["ab"], fp2)


def test_chat_cache_keeps_mask(tok, tmp_path):
    cache = tc.build_chat_cache(CHATS, tok, tmp_path)
    assert cache.kind == "sft" and cache.mask is not None
    a, b = cache.doc_offsets[2], cache.doc_offsets[3]
    ids, mask = tok.render_chat(CHATS[2])
    assert cache.tokens[a:b].tolist() == ids and cache.mask[a:b].tolist() == mask


def test_broken_cache_entry_is_rebuilt(tok, tmp_path):
    cache = tc.build_pretrain_cache(TEXTS, tok, tmp_path)
    with open(cache.path / "tokens.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(tc.TokenCacheError, match="wrong size"):
        tc.open_cache(cache.path)
    again = tc.build_pretrain_cache(TEXTS, tok, tmp_path)
    assert again.n_tokens == cache.n_tokens


# ----------------------------------------------------------------------------- data + sampler


def test_epoch_sampler_is_seeded_permutation():
    s = bs.EpochSampler(10, seed=3)
    e, items = s.items(0, 25)
    assert sorted(items[:10]) == list(range(10)) and sorted(items[10:20]) == list(range(10))
    assert e.tolist() == [0] * 10 + [1] * 10 + [2] * 5
    assert items[:10].tolist() != items[10:20].tolist()
    again = bs.EpochSampler(10, seed=3).items(7, 9)[1]  # stateless: any position, any order
    assert again.tolist() == items[7:16].tolist()
    assert bs.EpochSampler(10, seed=4).items(0, 10)[1].tolist() != items[:10].tolist()


def test_pretrain_windows_and_validation_split(tok, tmp_path):
    cache = tc.build_pretrain_cache(TEXTS, tok, tmp_path)
    data = bs.PretrainWindows(cache, seq_len=16, val_fraction=0.2, seed=0)
    assert data.split in set(cache.doc_offsets.tolist())  # snapped to a document start
    b = data.train_batch(*bs.EpochSampler(data.n_train, 0).items(0, 3))
    assert b.idx.shape == (3, 16) and b.lengths is None
    assert torch.equal(b.idx[:, 1:], b.targets[:, :-1])  # targets = inputs shifted by one
    starts = [int(x) for x in b.idx[:, 0]]
    assert all(0 <= s < data.split for s in starts)
    v = data.val_batch(np.arange(data.n_val))
    flat = torch.cat([v.idx[:, :1], v.targets], 1).flatten().tolist()
    expect = cache.tokens[data.split : data.split + data.n_val * 17].tolist()
    assert flat == expect  # consecutive windows of the held-out tail
    bpb = data.bits_per_byte(2.0)
    assert bpb == pytest.approx(2.0 * data.n_val_tokens / (math.log(2) * data.val_bytes))


def test_sft_batch_masks_everything_but_assistant(tok, tmp_path):
    cache = tc.build_chat_cache(CHATS, tok, tmp_path)
    data = bs.ChatBatches(cache, seq_len=16, val_fraction=0.25, seed=0, pad_id=tok.pad_id)
    assert (data.n_train, data.n_val) == (6, 2)
    b = data.train_batch(np.zeros(3, dtype=np.int64), np.array([0, 1, 2]))
    for r, d in enumerate((0, 1, 2)):
        ids, mask = tok.render_chat(CHATS[d])
        ids, mask = ids[:17], mask[:17]
        L = len(ids) - 1
        assert int(b.lengths[r] if b.lengths is not None else b.idx.shape[1]) == L
        want = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
        assert b.targets[r, :L].tolist() == want
        assert (b.targets[r, L:] == IGNORE_INDEX).all()
        assert b.idx[r, :L].tolist() == ids[:-1]


def _sft_loss(tok, tmp_path, chats):
    cache = tc.build_chat_cache(chats, tok, tmp_path)
    data = bs.ChatBatches(cache, seq_len=16, val_fraction=0.0, seed=0, pad_id=tok.pad_id)
    b = data.train_batch(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64))
    model = tiny_model(tok, SHAPE).eval()
    with torch.no_grad():
        return float(model.loss(b.idx, b.targets, lengths=b.lengths)), b


def test_sft_loss_ignores_user_tokens(tok, tmp_path):
    def chat(answer, last_user):
        return [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": last_user},
        ]

    base, b = _sft_loss(tok, tmp_path, [chat("a red dog", "ok")])
    other_user, _ = _sft_loss(tok, tmp_path, [chat("a red dog", "the odd green day")])
    other_answer, _ = _sft_loss(tok, tmp_path, [chat("a big tree", "ok")])
    assert other_user == pytest.approx(base, rel=1e-6, abs=1e-6)
    assert abs(other_answer - base) > 1e-3
    # and the loss is exactly the mean over assistant targets
    model = tiny_model(tok, SHAPE).eval()
    with torch.no_grad():
        logits = model(b.idx, lengths=b.lengths)[0]
    keep = b.targets[0] != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep], b.targets[0][keep])
    assert base == pytest.approx(float(manual), rel=1e-5)


# ----------------------------------------------------------------------------- golden


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    """The `seed` preset at seq 32 on the bundled data: 30 steps on the CPU."""
    texts = load_texts(REPO / "data" / "pretrain.json").items
    tok = BpeTokenizer.train(texts, BpeTokenizerConfig(vocab_size=512))
    cache = tc.build_pretrain_cache(texts, tok, tmp_path_factory.mktemp("cache"))
    torch.manual_seed(1337)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    model = Transformer(ModelConfig.preset("seed", tok.vocab_size, max_seq_len=32))
    cfg = TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup=3, eval_every=0, device="cpu")
    result = train(model, tok, cache, cfg)
    torch.set_num_threads(old)
    return [h["loss"] for h in result.history]


# Recorded from this test on the bundled data (data/make_data.py output). If the data, the
# tokenizer, the model init or the loop change, these change: re-record deliberately.
# fmt: off
GOLDEN = [
    6.276363, 6.024766, 5.769390, 5.486250, 5.420391, 5.271418,
    5.311143, 5.265563, 5.439782, 5.226090, 5.395555, 5.179765,
    5.151411, 5.158838, 5.055405, 5.075904, 5.108595, 5.091293,
    5.057342, 5.163114, 5.052946, 5.162809, 4.814165, 5.003061,
    5.005230, 5.147661, 5.022180, 5.025742, 5.001390, 5.096048,
]
# fmt: on


def test_golden_loss_sequence(golden_run):
    assert len(golden_run) == 30
    assert golden_run == pytest.approx(GOLDEN, rel=1e-4)


def test_loss_falls_well_below_start(golden_run):
    start, end = golden_run[0], float(np.mean(golden_run[-5:]))
    assert start > 5.5  # about ln(512) for a fresh model
    assert end < start - 1.0, (start, end)


# ----------------------------------------------------------------------------- resume


def test_interrupt_then_resume_matches_uninterrupted_run(tok, tmp_path, monkeypatch):
    cache = tc.build_pretrain_cache(TEXTS, tok, tmp_path / "cache")
    cfg = quick(steps=6, grad_accum=2, eval_every=2, val_fraction=0.2, log_every=4)
    full = train(tiny_model(tok, SHAPE, dropout=0.1), tok, cache, cfg, tmp_path / "a")
    expected = [h["loss"] for h in full.history]
    stop = StopRequest()
    model = tiny_model(tok, SHAPE, dropout=0.1)
    real_step = tr.Trainer.train_step

    def step_then_stop(self, sb):
        real_step(self, sb)
        if self.step == 3:
            stop.request()  # obeyed at the next step boundary

    monkeypatch.setattr(tr.Trainer, "train_step", step_then_stop)
    part = train(model, tok, cache, cfg, tmp_path / "b", stop=stop)
    monkeypatch.setattr(tr.Trainer, "train_step", real_step)
    assert part.status == "interrupted" and part.step == 3
    ckpt = load_checkpoint(tmp_path / "b")
    assert ckpt.resumable and ckpt.trainer_state["step"] == 3
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # a step logged after the save
        f.write(json.dumps({"phase": "pretrain", "step": 4, "loss": 99.0}) + "\n")
    plotted = []
    monkeypatch.setattr(tr, "plot_losses", lambda history, *a, **k: plotted.append(history))
    rest = train(ckpt.model, ckpt.tokenizer, cache, cfg, tmp_path / "b", resume=ckpt)
    assert rest.status == "completed" and rest.step == 6
    assert [r["step"] for r in plotted[0]] == [1, 2, 3, 4, 5, 6]  # the whole run, not 4..6
    assert [h["loss"] for h in part.history] == expected[:3]
    assert [h["loss"] for h in rest.history] == expected[3:]  # bitwise equal
    assert [h["val_loss"] for h in rest.history if "val_loss" in h] == [
        h["val_loss"] for h in full.history[3:] if "val_loss" in h
    ]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_other_data(tok, tmp_path):
    cache = tc.build_pretrain_cache(TEXTS, tok, tmp_path / "cache")
    train(tiny_model(tok, SHAPE), tok, cache, quick(steps=2), tmp_path / "a")
    ckpt = load_checkpoint(tmp_path / "a")
    other = tc.build_pretrain_cache(TEXTS[:-2], tok, tmp_path / "cache")
    with pytest.raises(TrainingError, match="differ"):
        train(ckpt.model, tok, other, quick(steps=4), tmp_path / "a", resume=ckpt)


# ----------------------------------------------------------------------------- failure modes


def test_nan_loss_without_guard_stops_and_keeps_last_good_checkpoint(tok, tmp_path, monkeypatch):
    cache = tc.build_pretrain_cache(TEXTS, tok, tmp_path / "cache")
    model = tiny_model(tok, SHAPE)
    real = model.loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(model, "loss", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*step 4"):
        train(model, tok, cache, quick(steps=8, save_every=2, guard=False), tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.trainer_state["step"] == 4
    assert all(torch.isfinite(p).all() for p in ckpt.model.parameters())


def test_early_stopping_with_patience(tok, tmp_path):
    cache = tc.build_pretrain_cache(TEXTS, tok, tmp_path / "cache")
    cfg = quick(steps=20, lr=0.0, eval_every=1, patience=2, val_fraction=0.2)
    result = train(tiny_model(tok, SHAPE), tok, cache, cfg, tmp_path / "run")
    assert result.status == "early_stopped"
    assert result.step == 3  # eval 1 sets the best, evals 2 and 3 do not improve
    assert load_checkpoint(tmp_path / "run").trainer_state["step"] == 3


def test_corpus_too_small_for_seq_len(tok, tmp_path):
    cache = tc.build_pretrain_cache(["tiny"], tok, tmp_path)
    with pytest.raises(TrainingError, match="too few"):
        train(tiny_model(tok, SHAPE), tok, cache, quick())


def test_phase_must_match_cache(tok, tmp_path):
    cache = tc.build_chat_cache(CHATS, tok, tmp_path)
    with pytest.raises(TrainingError, match="sft"):
        train(tiny_model(tok, SHAPE), tok, cache, quick(phase="pretrain"))


# ----------------------------------------------------------------------------- outputs


def test_sft_run_writes_metrics_plot_and_epochs(tok, tmp_path):
    cache = tc.build_chat_cache(CHATS, tok, tmp_path / "cache")
    cfg = quick(phase="sft", steps=None, epochs=2.0, batch_size=3, eval_every=2,
                val_fraction=0.25)  # fmt: skip
    result = train(tiny_model(tok, SHAPE), tok, cache, cfg, tmp_path / "run")
    assert result.total_steps == 4  # ceil(2 epochs * 6 conversations / 3 per step)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert "val_loss" in records[1] and records[1]["val_bpb"] is None
    assert (tmp_path / "run" / "loss_sft.png").stat().st_size > 1000
    assert load_checkpoint(tmp_path / "run").train_config["phase"] == "sft"


def test_ranks_split_the_global_batch(tok, tmp_path):
    """world_size ranks with batch b see the examples of one process with batch w*b, and
    every rank knows the counts of the whole global step without communicating."""
    cache = tc.build_chat_cache(CHATS * 3, tok, tmp_path)
    data = bs.ChatBatches(cache, seq_len=16, val_fraction=0.0, seed=0, pad_id=tok.pad_id)

    def plan(rank, world, b):
        return [bs.StepPlanner(data, b, 2, seed=5, rank=rank, world=world).step(s) for s in (0, 1)]

    single = plan(0, 1, 4)
    r0, r1 = plan(0, 2, 2), plan(1, 2, 2)
    for s in (0, 1):
        rows = lambda sb: [row for bt in sb.micro for row in bt.targets.tolist()]  # noqa: E731
        a, b = rows(r0[s]), rows(r1[s])
        strip = lambda rs: [[t for t in r if t != IGNORE_INDEX] for r in rs]  # noqa: E731
        assert strip(a[:2] + b[:2] + a[2:] + b[2:]) == strip(rows(single[s]))
        for sb in (r0[s], r1[s]):
            assert (sb.global_targets, sb.global_tokens) == (
                single[s].global_targets,
                single[s].global_tokens,
            )
        assert single[s].global_targets == sum(bt.n_targets for bt in single[s].micro)
