"""Checkpoint directory: roundtrip, resumable optimizer state, every error, atomic save."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from factories import tiny_model, tiny_tokenizer
from safetensors.torch import load_file, save_file
from tritonlm.engine.checkpoint import checkpoint_store as store
from tritonlm.engine.checkpoint import save_load as ck
from tritonlm.engine.checkpoint import shards
from tritonlm.engine.checkpoint.checkpoint_files import CheckpointError
from tritonlm.engine.checkpoint.save_load import load_checkpoint, save_checkpoint
from tritonlm.engine.model.transformer import Transformer
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer

TEXTS = ["the cat sat on the mat. " * 4, "checkpoints are written atomically, then renamed."]


@pytest.fixture(scope="module")
def tokenizer() -> BpeTokenizer:
    return tiny_tokenizer(TEXTS, vocab_size=290)


IDX = torch.tensor([[1, 5, 9, 200, 3, 7], [2, 2, 4, 8, 16, 32]])


def rewrite_manifest(root: Path) -> None:
    """Recompute the manifest so that checks after the hash check are reached."""
    manifest = json.loads((root / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (root / name).read_bytes()
        entry["size"] = len(data)
        entry["sha256"] = hashlib.sha256(data).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))


def edit_config(root: Path, **changes) -> None:
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(changes)
    (root / "config.json").write_text(json.dumps(cfg))
    rewrite_manifest(root)


@pytest.fixture
def saved(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    path = save_checkpoint(tmp_path / "ckpt", model, tokenizer, train_config={"lr": 0.001})
    return path, model


# ----------------------------------------------------------------------------- roundtrip


@pytest.mark.parametrize("tie", [True, False])
def test_roundtrip_bitwise_equal_logits(tmp_path, tokenizer, tie):
    model = tiny_model(tokenizer, tie_embeddings=tie)
    train_config = {"lr": 3e-4, "phase": "pretrain", "steps": [1, 2]}
    path = save_checkpoint(tmp_path / "ck", model, tokenizer, train_config=train_config)
    names = {p.name for p in path.iterdir()}
    assert names == {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"}
    weights = load_file(str(path / "model.safetensors"))
    assert ("lm_head.weight" in weights) != tie  # tied weights stored once
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.model(IDX), model(IDX))
    assert ckpt.model_config == model.config
    assert ckpt.train_config == train_config
    assert ckpt.trainer_state is None and not ckpt.resumable
    assert ckpt.format_version == ck.FORMAT_VERSION
    assert not ckpt.model.training
    if tie:
        assert ckpt.model.output_weight.data_ptr() == ckpt.model.tok_emb.weight.data_ptr()


def test_tokenizer_rebuilt_from_checkpoint(saved, tokenizer):
    path, _ = saved
    tok = load_checkpoint(path).tokenizer
    assert tok.to_dict() == tokenizer.to_dict()
    text = "the cat sat, atomically"
    assert tok.encode(text) == tokenizer.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_save_overwrites_and_leaves_no_temp_dirs(tmp_path, tokenizer):
    path = tmp_path / "ck"
    save_checkpoint(path, tiny_model(tokenizer, seed=0), tokenizer)
    new = tiny_model(tokenizer, seed=1)
    save_checkpoint(path, new, tokenizer)
    assert torch.equal(load_checkpoint(path).model(IDX), new(IDX))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_replacing_keeps_extra_files_but_not_stale_optimizer(tmp_path, tokenizer):
    path = tmp_path / "ck"
    model = tiny_model(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters())
    model(IDX).sum().backward()
    optimizer.step()
    save_checkpoint(path, model, tokenizer, optimizer=optimizer, trainer_state={"step": 1})
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    (path / "plots").mkdir()
    (path / "plots" / "loss.png").write_bytes(b"png")
    save_checkpoint(path, model, tokenizer)  # model-only replaces the resumable one
    assert (path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (path / "plots" / "loss.png").read_bytes() == b"png"
    assert not (path / "optimizer.safetensors").exists()
    assert not (path / "trainer_state.json").exists()
    assert not load_checkpoint(path).resumable


def test_never_unpickles(monkeypatch, tmp_path, tokenizer):
    def boom(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    model = tiny_model(tokenizer)
    opt = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path / "ck", model, tokenizer, optimizer=opt, trainer_state={})
    ckpt = load_checkpoint(path)
    ckpt.load_optimizer_state(torch.optim.AdamW(ckpt.model.parameters()))


# ----------------------------------------------------------------------------- resumable


def adamw(model: Transformer) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
    )


def train_steps(model, opt, n):
    model.train()
    for _ in range(n):
        opt.zero_grad()
        model.loss(IDX[:, :-1], IDX[:, 1:]).backward()
        opt.step()


def test_corrupt_optimizer_state_is_caught_when_resuming(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    opt = adamw(model)
    train_steps(model, opt, 1)
    path = save_checkpoint(tmp_path / "ck", model, tokenizer, optimizer=opt, trainer_state={})
    data = bytearray((path / "optimizer.safetensors").read_bytes())
    data[-3] ^= 0x40  # a bit flip inside the tensor bytes: same size
    (path / "optimizer.safetensors").write_bytes(bytes(data))
    ckpt = load_checkpoint(path)  # the weights are fine: chat can use them
    assert torch.equal(ckpt.model(IDX), model.eval()(IDX))
    with pytest.raises(CheckpointError, match="optimizer.safetensors: sha256 mismatch"):
        ckpt.load_optimizer_state(adamw(ckpt.model))


def test_resumable_checkpoint_continues_identically(tmp_path, tokenizer):
    model = tiny_model(tokenizer, tie_embeddings=False)
    opt = adamw(model)
    train_steps(model, opt, 3)
    state = {"step": 3, "rng": torch.get_rng_state().tolist()[:8], "data_pos": 12}
    path = save_checkpoint(
        tmp_path / "ck", model, tokenizer, {"lr": 1e-2}, optimizer=opt, trainer_state=state
    )
    assert {"optimizer.safetensors", "trainer_state.json"} <= {p.name for p in path.iterdir()}
    names = set(load_file(str(path / "optimizer.safetensors")))
    assert "state.blocks.0.attn.qkv.weight.exp_avg" in names

    ckpt = load_checkpoint(path)
    assert ckpt.resumable and ckpt.trainer_state == state
    opt2 = adamw(ckpt.model)
    ckpt.load_optimizer_state(opt2)
    assert opt2.param_groups[0]["betas"][1] == 0.95
    train_steps(model, opt, 2)
    train_steps(ckpt.model, opt2, 2)
    loaded = ckpt.model.state_dict()
    for name, a in model.state_dict().items():
        assert torch.equal(a, loaded[name]), name


def test_optimizer_state_mismatches(tmp_path, tokenizer, saved):
    path, _ = saved
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a resumable"):
        ckpt.load_optimizer_state(torch.optim.AdamW(ckpt.model.parameters()))
    model = tiny_model(tokenizer)
    opt = adamw(model)
    train_steps(model, opt, 1)
    path = save_checkpoint(tmp_path / "res", model, tokenizer, optimizer=opt)
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="optimizer.safetensors.*saved for AdamW"):
        ckpt.load_optimizer_state(torch.optim.SGD(ckpt.model.parameters(), lr=0.1))
    with pytest.raises(CheckpointError, match="parameter groups differ"):
        ckpt.load_optimizer_state(torch.optim.AdamW(ckpt.model.parameters()))


def test_trainer_state_must_be_json(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match="trainer_state.json.*JSON"):
        save_checkpoint(tmp_path / "ck", model, tokenizer, optimizer=opt,
                        trainer_state={"rng": torch.get_rng_state()})  # fmt: skip
    assert not (tmp_path / "ck").exists()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- errors


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_directory_and_files(tmp_path, saved):
    assert "does not exist" in load_error(tmp_path / "nope")
    (tmp_path / "afile").write_text("x")
    assert "not a checkpoint directory" in load_error(tmp_path / "afile")
    path, _ = saved
    (path / "model.safetensors").unlink()
    msg = load_error(path)
    assert "model.safetensors" in msg and "missing" in msg
    (path / "manifest.json").unlink()
    msg = load_error(path)
    assert "manifest.json" in msg and "missing" in msg


def test_bit_flip_and_truncation_detected(saved):
    path, _ = saved
    f = path / "model.safetensors"
    good = f.read_bytes()
    data = bytearray(good)
    data[-5] ^= 0x01
    f.write_bytes(bytes(data))
    msg = load_error(path)
    assert "model.safetensors" in msg and "sha256" in msg
    f.write_bytes(bytes(data[:-100]))
    msg = load_error(path)
    assert "model.safetensors" in msg and "truncated" in msg
    f.write_bytes(good)
    load_checkpoint(path)
    tok = path / "tokenizer.json"
    tok.write_text(tok.read_text().replace("1", "2", 1))
    assert "tokenizer.json" in load_error(path)


def test_wrong_magic_and_newer_version(saved):
    path, _ = saved
    edit_config(path, format="someone-else")
    msg = load_error(path)
    assert "config.json" in msg and "magic" in msg
    edit_config(path, format=ck.FORMAT_MAGIC, format_version=ck.FORMAT_VERSION + 1)
    msg = load_error(path)
    assert "config.json" in msg and "newer" in msg and "upgrade" in msg
    edit_config(path, format_version="1")
    assert "format_version" in load_error(path)


def test_older_version_is_migrated(saved):
    path, model = saved
    cfg = json.loads((path / "config.json").read_text())
    v0 = {"format": ck.FORMAT_MAGIC, "format_version": 0, "model": cfg["model_config"],
          "train": {"lr": 0.5}}  # fmt: skip
    (path / "config.json").write_text(json.dumps(v0))
    rewrite_manifest(path)
    ckpt = load_checkpoint(path)
    assert ckpt.train_config == {"lr": 0.5}
    assert ckpt.format_version == ck.FORMAT_VERSION
    assert torch.equal(ckpt.model(IDX), model(IDX))


def test_malformed_json(saved):
    path, _ = saved
    (path / "config.json").write_text('{"format": ')
    rewrite_manifest(path)
    msg = load_error(path)
    assert "config.json" in msg and "malformed JSON" in msg
    (path / "manifest.json").write_text("[not json")
    msg = load_error(path)
    assert "manifest.json" in msg and "malformed JSON" in msg


def test_bad_model_config(saved):
    path, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    edit_config(path, model_config={**cfg["model_config"], "n_heads": 3})
    msg = load_error(path)
    assert "config.json" in msg and "n_heads" in msg
    edit_config(path, model_config={**cfg["model_config"], "vocab_size": 999})
    msg = load_error(path)
    assert "vocab_size" in msg and "tokenizer" in msg


def test_shape_mismatch(saved):
    path, _ = saved
    weights = load_file(str(path / "model.safetensors"))
    weights["blocks.1.ffn.down.weight"] = torch.zeros(32, 40)
    save_file(weights, str(path / "model.safetensors"))
    rewrite_manifest(path)
    msg = load_error(path)
    assert "model.safetensors" in msg and "blocks.1.ffn.down.weight" in msg
    assert "[32, 40]" in msg and "[32, 48]" in msg


def test_foreign_safetensors(saved):
    path, _ = saved
    foreign = {"transformer.h.0.attn.c_attn.weight": torch.zeros(4, 4), "wte": torch.zeros(2)}
    save_file(foreign, str(path / "model.safetensors"))
    rewrite_manifest(path)
    msg = load_error(path)
    assert "model.safetensors" in msg and "not a tritonlm model file" in msg
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    rewrite_manifest(path)
    assert "unreadable safetensors" in load_error(path)


def test_extra_tensor_is_refused(saved):
    path, model = saved
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights["lm_head.weight"] = weights["tok_emb.weight"].clone()  # model is tied
    save_file(weights, str(path / "model.safetensors"))
    rewrite_manifest(path)
    msg = load_error(path)
    assert "names differ" in msg and "lm_head.weight" in msg


def test_corrupt_tokenizer_named(saved):
    path, _ = saved
    (path / "tokenizer.json").write_text('{"format": "not-a-tokenizer"}')
    rewrite_manifest(path)
    msg = load_error(path)
    assert "tokenizer.json" in msg


def test_save_refuses_vocab_mismatch(tmp_path, tokenizer):
    model = tiny_model(tokenizer.vocab_size + 1)
    with pytest.raises(CheckpointError, match="vocab_size"):
        save_checkpoint(tmp_path / "ck", model, tokenizer)


# ----------------------------------------------------------------------------- atomic save


def test_crash_during_write_keeps_old_checkpoint(monkeypatch, saved, tokenizer):
    path, old = saved

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(shards, "save_file", crash)
    with pytest.raises(CheckpointError, match="simulated"):
        save_checkpoint(path, tiny_model(tokenizer, seed=5), tokenizer)
    assert torch.equal(load_checkpoint(path).model(IDX), old(IDX))
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_failed_swap_keeps_old_checkpoint(monkeypatch, saved, tokenizer):
    path, old = saved
    real_rename, calls = store.rename_path, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # target was moved aside; moving the new one in fails
            raise OSError("power cut (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(store, "rename_path", rename)
    with pytest.raises(CheckpointError, match="simulated"):
        save_checkpoint(path, tiny_model(tokenizer, seed=5), tokenizer)
    assert calls[0] == ("ckpt", ".ckpt.old")
    assert torch.equal(load_checkpoint(path).model(IDX), old(IDX))


def test_crash_between_renames_recovers_from_aside(saved, tokenizer):
    path, old = saved
    # State after a crash between "rename old aside" and "rename new in":
    aside = path.parent / ".ckpt.old"
    path.rename(aside)
    (path.parent / ".ckpt.tmp-deadbeef").mkdir()  # half-written new checkpoint
    ckpt = load_checkpoint(path)
    assert ckpt.path == aside
    assert torch.equal(ckpt.model(IDX), old(IDX))
    new = tiny_model(tokenizer, seed=7)
    save_checkpoint(path, new, tokenizer)  # the next save cleans up
    assert torch.equal(load_checkpoint(path).model(IDX), new(IDX))
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_crash_after_swap_uses_new_checkpoint(saved, tokenizer):
    path, old = saved
    # State after a crash between "rename new in" and "delete aside": both complete.
    aside = path.parent / ".ckpt.old"
    save_checkpoint(aside, tiny_model(tokenizer, seed=9), tokenizer)
    assert torch.equal(load_checkpoint(path).model(IDX), old(IDX))
    save_checkpoint(path, old, tokenizer)
    assert not aside.exists()
