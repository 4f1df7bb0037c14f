"""LoRA (engine/lora): adapters on a frozen base, their checkpoints, merge, exact resume.

Tiny models on the CPU; grouped-query attention and tied/untied heads are covered by the
parametrized model shapes.
"""

from __future__ import annotations

import json

import pytest
import torch
from factories import tiny_model, tiny_tokenizer
from tritonlm.engine.checkpoint.checkpoint_files import CheckpointError
from tritonlm.engine.checkpoint.save_load import load_checkpoint, save_checkpoint
from tritonlm.engine.data import token_cache as tc
from tritonlm.engine.lora.adapter_checkpoint import base_ref, load_model
from tritonlm.engine.lora.layers import add_lora, lora_layers, merge_lora, trainable_parameters
from tritonlm.engine.lora.lora_config import LoraConfig, LoraConfigError
from tritonlm.engine.model.transformer import Transformer
from tritonlm.engine.stop import StopRequest
from tritonlm.engine.train import loop as tr
from tritonlm.engine.train.loop import train
from tritonlm.engine.train.train_config import TrainConfig

PAIRS = [(a, b) for a in ("quick", "slow", "red") for b in ("lazy", "odd", "big")]
TEXTS = [f"The {a} fox number {i} jumps over the {b} dog." for i, (a, b) in enumerate(PAIRS)]
SHAPES = {  # grouped-query attention with a tied head; full attention with an untied one
    "gqa-tied": dict(n_heads=4, n_kv_heads=2, tie_embeddings=True),
    "mha-untied": dict(n_heads=2, n_kv_heads=2, tie_embeddings=False),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(TEXTS, vocab_size=280)


def base_model(tok, shape="gqa-tied", seed=0) -> Transformer:
    return tiny_model(tok, seed=seed, backend="torch", d_ff=64, **SHAPES[shape])


def saved_base(tok, path, shape="gqa-tied"):
    save_checkpoint(path, base_model(tok, shape), tok)
    return path


def quick(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, warmup=1, lr=1e-2, eval_every=0, device="cpu",
                backend="torch", weight_decay=0.0)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def adapted(tok, path, shape="gqa-tied", **lora):
    ckpt = load_checkpoint(path, backend="torch")
    add_lora(ckpt.model, LoraConfig(**lora), base_ref(path), seed=1)
    return ckpt.model


def test_config_is_validated():
    assert LoraConfig(rank=4, targets=["qkv", "down"]).targets == ("qkv", "down")
    for bad, word in [({"rank": 0}, "rank"), ({"targets": ("qkv", "lm_head")}, "lm_head"),
                      ({"dropout": 1.0}, "dropout"), ({"base_dtype": "fp8"}, "base_dtype"),
                      ({"targets": ()}, "targets")]:  # fmt: skip
        with pytest.raises(LoraConfigError, match=word):
            LoraConfig(**bad)


@pytest.mark.parametrize("shape", SHAPES)
def test_step_zero_is_bitwise_the_base(tok, tmp_path, shape):
    base = saved_base(tok, tmp_path / "base", shape)
    plain = load_checkpoint(base, backend="torch").model
    model = adapted(tok, base, shape, rank=4, targets=("qkv", "proj", "gate_up", "down"))
    assert len(lora_layers(model)) == 8
    x = torch.randint(0, tok.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    # only the adapters train: 2 layers x (qkv, proj, gate_up, down) x (A, B)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 16 and all(".lora_" in n for n in names)
    d, kv, ff, r = 32, 16 if shape == "gqa-tied" else 32, 64, 4
    per_layer = r * d + (d + 2 * kv) * r + r * d + d * r + r * d + 2 * ff * r + r * ff + d * r
    assert trainable_parameters(model) == 2 * per_layer


@pytest.mark.parametrize("shape", SHAPES)
def test_training_moves_only_adapters_and_merge_gives_the_same_logits(tok, tmp_path, shape):
    base = saved_base(tok, tmp_path / "base", shape)
    before = load_checkpoint(base, backend="torch").model.state_dict()
    model = adapted(tok, base, shape, rank=4, alpha=8.0)
    cache = tc.build_pretrain_cache(TEXTS, tok, tmp_path / "cache")
    result = train(model, tok, cache, quick(steps=4, seq_len=12), tmp_path / "run")
    assert result.status == "completed"
    for name, t in before.items():  # frozen: bitwise the base
        assert torch.equal(model.state_dict()[name], t), name
    assert any(layer.lora_B.abs().max() > 0 for layer in lora_layers(model).values())
    # the checkpoint holds the adapters and the optimizer state of the adapters only
    files = json.loads((tmp_path / "run" / "manifest.json").read_text())["files"]
    assert "adapter.safetensors" in files and "model.safetensors" not in files
    from safetensors.torch import load_file

    state = load_file(tmp_path / "run" / "optimizer.safetensors")
    assert state and all(".lora_" in k for k in state)
    x = torch.randint(0, tok.vocab_size, (2, 12))
    model.eval()
    with torch.no_grad():
        expected = model(x)
        merged = load_model(tmp_path / "run", backend="torch").model
        assert not lora_layers(merged)
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
        in_place = merge_lora(model)
        torch.testing.assert_close(in_place(x), expected, atol=1e-5, rtol=1e-5)


def test_interrupted_lora_run_resumes_exactly(tok, tmp_path, monkeypatch):
    base = saved_base(tok, tmp_path / "base")
    cache = tc.build_pretrain_cache(TEXTS, tok, tmp_path / "cache")
    cfg = quick(steps=6, seq_len=12, grad_accum=2, log_every=4)
    lora = dict(rank=4, dropout=0.1)
    full = train(adapted(tok, base, **lora), tok, cache, cfg, tmp_path / "a")
    stop = StopRequest()
    real_step = tr.Trainer.train_step

    def step_then_stop(self, sb):
        real_step(self, sb)
        if self.step == 3:
            stop.request()

    monkeypatch.setattr(tr.Trainer, "train_step", step_then_stop)
    part = train(adapted(tok, base, **lora), tok, cache, cfg, tmp_path / "b", stop=stop)
    monkeypatch.setattr(tr.Trainer, "train_step", real_step)
    assert part.status == "interrupted" and part.step == 3
    ckpt = load_model(tmp_path / "b", backend="torch", merge=False)
    assert ckpt.resumable and lora_layers(ckpt.model)
    rest = train(ckpt.model, ckpt.tokenizer, cache, cfg, tmp_path / "b", resume=ckpt)
    assert rest.step == 6
    losses = [h["loss"] for h in full.history]
    assert [h["loss"] for h in part.history + rest.history] == losses  # bitwise


def test_a_different_base_is_refused_in_one_line(tok, tmp_path):
    base = saved_base(tok, tmp_path / "base")
    cache = tc.build_pretrain_cache(TEXTS, tok, tmp_path / "cache")
    train(adapted(tok, base, rank=2), tok, cache, quick(steps=1, seq_len=12), tmp_path / "run")
    save_checkpoint(base, base_model(tok, seed=5), tok)  # the base was overwritten
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "run")
    msg = str(e.value)
    assert "not the one these adapters were trained on" in msg and "\n" not in msg
    import shutil

    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match="is missing"):
        load_model(tmp_path / "run")
    with pytest.raises(CheckpointError, match="adapter checkpoint"):  # the plain loader says so
        load_checkpoint(tmp_path / "run")


def test_bf16_base_trains_and_halves_the_frozen_weights(tok, tmp_path):
    base = saved_base(tok, tmp_path / "base")
    model = adapted(tok, base, rank=4, base_dtype="bfloat16")
    layers = lora_layers(model)
    assert all(m.weight.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32
               for m in layers.values())  # fmt: skip
    cache = tc.build_pretrain_cache(TEXTS, tok, tmp_path / "cache")
    result = train(model, tok, cache, quick(steps=3, seq_len=12), tmp_path / "run")
    assert result.status == "completed" and result.loss < 10
    merged = load_model(tmp_path / "run", backend="torch").model  # merged onto the fp32 base
    assert all(p.dtype == torch.float32 for p in merged.parameters())
