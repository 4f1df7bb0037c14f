"""CUDA-graph decode steps, checked on the CPU: the bucket padding (through a stand-in
capture that replays the step eagerly), and a real capture failing (no CUDA here) falling
back to eager with one line, for generate and the scheduler."""

import pytest
import torch
from tritonlm.engine.inference.generate import generate, generate_batch
from tritonlm.engine.inference.sampling import SamplingConfig
from tritonlm.engine.inference.scheduler import Scheduler
from tritonlm.engine.model.config import ModelConfig
from tritonlm.engine.model.cuda_graphs import (
    GraphedDecodeStep,
    make_decode_step,
    pick_decode_mode,
)
from tritonlm.engine.model.transformer import Transformer

CTX = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      d_ff=64, max_seq_len=CTX, init_std=0.3)  # fmt: skip
    return Transformer(cfg, backend="torch").eval()


def prompt_of(n, start=3):
    return [(start + 7 * i) % 290 for i in range(n)]


class EagerReplay:
    """Stands in for a graph capture: records which step shapes were captured, and each
    replay reruns the captured step on the same static buffers."""

    def __init__(self):
        self.captured = []

    def __call__(self, step):
        self.captured.append(step)
        return step


def test_buckets_pad_rows_and_capture_once_each(model):
    prompts = [prompt_of(n, start=n) for n in (3, 11, 5)]  # 3 rows -> bucket 4
    cfg = SamplingConfig(temperature=0, max_new_tokens=8)
    long = SamplingConfig(temperature=0, max_new_tokens=CTX)
    want = generate_batch(model, None, prompts, cfg, stop_token_ids=[])
    capture = EagerReplay()
    step = GraphedDecodeStep(model, model.new_cache(4, max_len=2 * CTX), capture=capture)
    got = generate_batch(model, None, prompts, cfg, stop_token_ids=[], decoder=step)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert sorted(step.replays) == [4] and len(capture.captured) == 1
    # rows leave (context) at different steps: buckets 4, then 2, then 1
    prompts = [prompt_of(n, start=n) for n in (CTX - 3, 2, CTX - 6)]
    want = generate_batch(model, None, prompts, long, stop_token_ids=[])
    got = generate_batch(model, None, prompts, long, stop_token_ids=[], decoder=step)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert sorted(step.replays) == [1, 2, 4] and len(capture.captured) == 3
    assert step.failure is None


def test_capture_failure_prints_one_line_and_decodes_eagerly(model):
    """No CUDA here: the real capture fails; the step says so once and goes on eagerly."""
    lines = []
    step = make_decode_step(model, model.new_cache(2, max_len=CTX + 8), "graphs", lines.append)
    cfg = SamplingConfig(temperature=0, max_new_tokens=10)
    for p in (prompt_of(4), prompt_of(9, start=2)):
        want = generate(model, None, p, cfg, stop_token_ids=[])
        assert generate(model, None, p, cfg, stop_token_ids=[], decoder=step).token_ids == (
            want.token_ids
        )
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("CUDA graph capture failed (") and "decoding eagerly" in lines[0]


def test_capture_error_of_any_kind_falls_back(model):
    def broken(step):
        step()  # a warm-up ran, then the capture itself failed
        raise torch.OutOfMemoryError("out of memory\nwhile capturing")

    lines = []
    step = GraphedDecodeStep(model, model.new_cache(1, max_len=CTX), lines.append, broken)
    cfg = SamplingConfig(temperature=0, max_new_tokens=6)
    want = generate(model, None, prompt_of(5), cfg, stop_token_ids=[])
    assert generate(model, None, prompt_of(5), cfg, stop_token_ids=[], decoder=step).token_ids == (
        want.token_ids
    )
    assert lines == [
        "CUDA graph capture failed (OutOfMemoryError: out of memory while capturing); "
        "decoding eagerly"
    ]


def test_scheduler_pads_live_rows_to_buckets(model):
    """Rows join and leave the server's batch; every step replays its bucket's step."""
    lines = []
    sched = Scheduler(model, None, max_batch=8, decode="graphs", on_fallback=lines.append)
    capture = EagerReplay()
    sched.decode_step = GraphedDecodeStep(model, sched.cache, capture=capture)
    cfgs = [SamplingConfig(temperature=0, max_new_tokens=n) for n in (9, 3, 14, 6, 11)]
    prompts = [prompt_of(n, start=n) for n in (4, 7, 2, 12, 5)]
    handles = []
    for i, (p, c) in enumerate(zip(prompts, cfgs, strict=True)):
        handles.append(sched.submit(p, c))
        if i % 2:
            sched.step()  # staggered joins
    for _ in range(200):
        if not sched.load()["active"] and not sched.load()["waiting"]:
            break
        sched.step()
    for h, p, c in zip(handles, prompts, cfgs, strict=True):
        res = h.delivered()[-1].result
        assert res.token_ids == generate(model, None, p, c, stop_token_ids=[]).token_ids
    assert set(sched.decode_step.replays) <= {1, 2, 4, 8} and len(sched.decode_step.replays) >= 2
    assert lines == []  # the stand-in capture never failed


def test_pick_decode_mode():
    assert pick_decode_mode("cpu") == "eager"
    assert pick_decode_mode("cpu", compile=True) == "compile"
    assert pick_decode_mode("cuda") == "graphs"
    assert pick_decode_mode("cuda:1", graphs=False) == "eager"
    with pytest.raises(ValueError, match="unknown decode mode"):
        make_decode_step(None, None, "fast")
