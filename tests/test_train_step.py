"""The training step itself: no host syncs, prefetched batches, torch.compile.

A device-to-host sync shows up in the profiler as ``aten::item`` (``_local_scalar_dense``).
On the CPU the fused AdamW kernel reads each parameter's step counter with one such call,
from a CPU tensor (no device involved; on CUDA the same kernel reads it on the GPU), so
the check is: no item outside ``Optimizer.step``, in pretraining and SFT (padded rows),
with gradient accumulation.
"""

from __future__ import annotations

import pytest
import torch
from factories import tiny_model
from torch.profiler import ProfilerActivity, profile
from tritonlm.engine.data import token_cache as tc
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
from tritonlm.engine.tokenizer.tokenizer_config import BpeTokenizerConfig
from tritonlm.engine.train import loop as tr
from tritonlm.engine.train.batches import Prefetcher, batch_source
from tritonlm.engine.train.distributed import LossForward

TEXTS = [f"Line {i} tells of a {c} cat that sat on mat {i % 7}." for i in range(60) for c in "xy"]
CHATS = [
    [
        {"role": "user", "content": f"What is {i}{'?' * (i % 5)}"},
        {"role": "assistant", "content": f"{i} is a number" + " indeed" * (i % 4)},
    ]
    for i in range(40)
]


@pytest.fixture(scope="module")
def tok():
    return BpeTokenizer.train(TEXTS, BpeTokenizerConfig(vocab_size=300))


@pytest.fixture(scope="module")
def caches(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    return {"pretrain": tc.build_pretrain_cache(TEXTS, tok, d),
            "sft": tc.build_chat_cache(CHATS, tok, d)}  # fmt: skip


def trainer(tok, caches, phase, **kw) -> tr.Trainer:
    model = tiny_model(tok, n_layers=1, d_ff=64, max_seq_len=64).train()
    config = tr.TrainConfig(**{"phase": phase, "steps": 20, "batch_size": 4, "grad_accum": 2,
                               "eval_every": 0, "device": "cpu", "warmup": 2, **kw})  # fmt: skip
    data = batch_source(caches[phase], phase, 64, 0.1, 0, tok.pad_id)
    return tr.Trainer(model, data, config)


def _outside(events, inner_name: str, name: str) -> list:
    """Events called ``name`` that do not lie inside a range called ``inner_name``."""
    ranges = [(e.time_range.start, e.time_range.end) for e in events if inner_name in e.name]
    return [
        e for e in events
        if e.name == name and not any(a <= e.time_range.start <= b for a, b in ranges)
    ]  # fmt: skip


@pytest.mark.parametrize("phase", ["pretrain", "sft"])
def test_a_step_never_waits_for_the_host(phase, tok, caches):
    t = trainer(tok, caches, phase, log_every=100)
    t.train_step(t.planner.step(0))  # warm (optimizer state is created here)
    sb = t.planner.step(1)
    if phase == "sft":
        assert any(bt.lengths is not None for bt in sb.micro)  # padded rows are covered
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t.train_step(sb)
    events = list(prof.events())
    assert any("Optimizer.step" in e.name for e in events)
    assert _outside(events, "Optimizer.step", "aten::item") == []
    assert _outside(events, "Optimizer.step", "aten::_local_scalar_dense") == []
    assert len(t.pending) == 2  # loss and grad norm wait on the device until the next flush
    records = t.flush_metrics()  # ... and are read in one go
    assert [r["step"] for r in records] == [1, 2] and t.pending == []


def test_prefetched_batches_are_the_planned_ones(tok, caches):
    t = trainer(tok, caches, "sft")
    pf = Prefetcher(t.planner, torch.device("cpu"))
    try:
        for step in range(4):
            got, want = pf.get(step, step + 1), t.planner.step(step)
            assert (got.global_targets, got.global_tokens) == (want.global_targets,
                                                               want.global_tokens)  # fmt: skip
            for a, b in zip(got.micro, want.micro, strict=True):
                assert torch.equal(a.idx, b.idx) and torch.equal(a.targets, b.targets)
        assert pf.get(7, None).global_tokens == t.planner.step(7).global_tokens  # a jump
    finally:
        pf.close()


@pytest.mark.parametrize("lengths", [None, [16, 9, 4, 16]], ids=["full", "padded"])
def test_the_training_forward_has_no_graph_break(lengths, tok):
    forward = LossForward(tiny_model(tok, n_layers=1, d_ff=64).train())
    idx = torch.randint(0, tok.vocab_size, (4, 16))
    lt = None if lengths is None else torch.tensor(lengths)
    explained = torch._dynamo.explain(forward)(idx, idx, lt)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow
def test_compiled_training_matches_eager(tok, caches):
    """--compile (inductor on the CPU, torch backend): 20 steps, the same losses."""
    eager = trainer(tok, caches, "pretrain", log_every=5).run()
    torch._dynamo.reset()
    compiled = trainer(tok, caches, "pretrain", log_every=5, compile=True).run()
    a = [r["loss"] for r in eager.history]
    b = [r["loss"] for r in compiled.history]
    assert len(a) == len(b) == 20
    assert b == pytest.approx(a, rel=2e-4, abs=2e-4)
    assert a[-1] < a[0] - 0.5  # it really trained
