"""Sharded checkpoints: weights and optimizer state split above max_shard_size, covered by
the manifest, loaded bitwise, resumed identically; every damaged set is one clear line;
checkpoints written the old single-file way keep loading."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from factories import tiny_model, tiny_tokenizer
from safetensors.torch import load_file, save_file
from tritonlm.cli import train as cli
from tritonlm.engine.checkpoint.checkpoint_files import CheckpointError
from tritonlm.engine.checkpoint.optimizer_state import flatten_optimizer
from tritonlm.engine.checkpoint.save_load import load_checkpoint, save_checkpoint
from tritonlm.engine.checkpoint.shards import nbytes
from tritonlm.engine.data import token_cache as tc
from tritonlm.engine.model.transformer import Transformer
from tritonlm.engine.sizes import parse_size
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
from tritonlm.engine.train import loop as tr

TEXTS = [f"Shard {i} holds {c} tensors of block {i % 3}." for i in range(40) for c in "xy"]
IDX = torch.tensor([[1, 5, 9, 200, 3, 7], [2, 2, 4, 8, 16, 32]])
LIMIT = "8KB"  # the embedding (290 x 16 x 4 bytes) and each block land in separate shards


SHAPE = dict(d_model=16, n_layers=3, n_heads=2, d_ff=32, max_seq_len=16, tie_embeddings=False)


@pytest.fixture(scope="module")
def tok() -> BpeTokenizer:
    return tiny_tokenizer(TEXTS, vocab_size=290)


def adamw(model: Transformer) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_steps(model, opt, n: int) -> None:
    model.train()
    for _ in range(n):
        opt.zero_grad()
        model.loss(IDX[:, :-1], IDX[:, 1:]).backward()
        opt.step()


def trained(tok, seed: int = 0, **overrides):
    model = tiny_model(tok, SHAPE, seed=seed, **overrides)
    opt = adamw(model)
    train_steps(model, opt, 2)
    return model, opt


def names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def listed(path: Path) -> list[str]:
    return sorted(json.loads((path / "manifest.json").read_text())["files"])


def shards_of(path: Path, base: str) -> list[str]:
    return [n for n in names(path) if n.startswith(f"{base}-") and n.endswith(".safetensors")]


def load_error(path: Path, optimizer_too: bool = False) -> str:
    with pytest.raises(CheckpointError) as info:
        ckpt = load_checkpoint(path)
        if optimizer_too:
            ckpt.load_optimizer_state(adamw(ckpt.model))
    message = str(info.value)
    assert message and "\n" not in message
    return message


def reseal(path: Path, drop: str | None = None) -> None:
    """Make the manifest match the files again (optionally forgetting one file)."""
    man = json.loads((path / "manifest.json").read_text())
    man["files"].pop(drop, None)
    for name in man["files"]:
        data = (path / name).read_bytes()
        man["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(man))


@pytest.fixture(scope="module")
def sharded(tok, tmp_path_factory):
    """A resumable checkpoint in several model and optimizer shards, and its model/opt."""
    model, opt = trained(tok)
    path = tmp_path_factory.mktemp("sh") / "ck"
    save_checkpoint(path, model, tok, {"lr": 1e-2}, optimizer=opt, trainer_state={"step": 2},
                    max_shard_size=LIMIT)  # fmt: skip
    return path, model, opt


@pytest.fixture
def copy(sharded, tmp_path) -> Path:
    return Path(shutil.copytree(sharded[0], tmp_path / "ck"))


# ----------------------------------------------------------------------------- layout, round trip


def test_sharded_layout_and_manifest(sharded):
    path, model, _ = sharded
    model_shards, opt_shards = shards_of(path, "model"), shards_of(path, "optimizer")
    assert len(model_shards) >= 3 and len(opt_shards) >= 3
    assert model_shards[0] == f"model-00001-of-{len(model_shards):05d}.safetensors"
    assert not (path / "model.safetensors").exists()
    assert not (path / "optimizer.safetensors").exists()
    fixed = ["config.json", "manifest.json", "model.safetensors.index.json", "tokenizer.json",
             "optimizer.safetensors.index.json", "trainer_state.json"]  # fmt: skip
    assert names(path) == sorted(fixed + model_shards + opt_shards)
    assert listed(path) == sorted(set(names(path)) - {"manifest.json"})  # every file covered
    limit = parse_size(LIMIT)
    for shard in model_shards + opt_shards:
        held = load_file(str(path / shard))
        assert len(held) == 1 or sum(nbytes(t) for t in held.values()) <= limit, shard
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == set(model_shards)


def test_sharded_round_trip_is_bitwise_and_resumes_identically(sharded):
    path, model, opt = sharded
    ckpt = load_checkpoint(path)
    assert ckpt.trainer_state == {"step": 2}
    saved = ckpt.model.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, saved[name]), name
    opt2 = adamw(ckpt.model)
    ckpt.load_optimizer_state(opt2)
    model, opt = copy_of(model, opt)
    train_steps(model, opt, 2)
    train_steps(ckpt.model, opt2, 2)
    for name, t in model.state_dict().items():
        assert torch.equal(t, ckpt.model.state_dict()[name]), name


def copy_of(model: Transformer, opt):
    """An independent copy of a model and its optimizer (the fixture is shared)."""
    clone = Transformer(model.config)
    clone.load_state_dict(model.state_dict())
    opt2 = adamw(clone)
    opt2.load_state_dict(opt.state_dict())
    return clone, opt2


def test_resharding_leaves_no_stale_file(tok, tmp_path):
    path = tmp_path / "ck"
    model, opt = trained(tok)
    save_checkpoint(path, model, tok, optimizer=opt, trainer_state={}, max_shard_size=LIMIT)
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    few = len(shards_of(path, "model"))
    save_checkpoint(path, model, tok, optimizer=opt, trainer_state={}, max_shard_size="2KB")
    assert len(shards_of(path, "model")) > few  # more, smaller shards; none of the old ones
    assert listed(path) == sorted(set(names(path)) - {"manifest.json", "metrics.jsonl"})
    save_checkpoint(path, model, tok)  # one file, model only
    assert names(path) == ["config.json", "manifest.json", "metrics.jsonl", "model.safetensors",
                           "tokenizer.json"]  # fmt: skip
    save_checkpoint(path, model, tok, max_shard_size=LIMIT)  # and back
    assert "model.safetensors" not in names(path) and (path / "metrics.jsonl").exists()
    assert torch.equal(load_checkpoint(path).model(IDX), model.eval()(IDX))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_bad_max_shard_size_is_refused_before_writing(tok, tmp_path):
    with pytest.raises(CheckpointError, match="max_shard_size.*'0'"):
        save_checkpoint(tmp_path / "ck", tiny_model(tok, SHAPE), tok, max_shard_size="0")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- old checkpoints


def test_checkpoint_written_the_old_single_file_way_loads(tok, tmp_path):
    """The layout before sharding existed, written here by hand, resumable."""
    model, opt = trained(tok)
    path = tmp_path / "old"
    path.mkdir()
    config = {"format": "tritonlm-checkpoint", "format_version": 1,
              "model_config": model.config.to_dict(), "train_config": {"lr": 0.01},
              "tokenizer_file": "tokenizer.json", "resumable": True}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "tritonlm-checkpoint"})
    tok.save(path / "tokenizer.json")
    tensors, meta = flatten_optimizer(opt, model)
    save_file(tensors, str(path / "optimizer.safetensors"))
    (path / "trainer_state.json").write_text(json.dumps({"trainer_state": {"step": 2},
                                                         "optimizer": meta}))  # fmt: skip
    (path / "manifest.json").write_text(json.dumps({"format": "tritonlm-checkpoint", "files": {
        n: {} for n in ["config.json", "model.safetensors", "tokenizer.json",
                        "optimizer.safetensors", "trainer_state.json"]}}))  # fmt: skip
    reseal(path)
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.model(IDX), model.eval()(IDX))
    opt2 = adamw(ckpt.model)
    ckpt.load_optimizer_state(opt2)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]
                       ["exp_avg"])  # fmt: skip


# ----------------------------------------------------------------------------- damaged sets


def test_missing_shard(copy):
    victim = shards_of(copy, "model")[1]
    (copy / victim).unlink()
    msg = load_error(copy)
    assert victim in msg and "missing" in msg


def test_missing_optimizer_shard(copy):
    victim = shards_of(copy, "optimizer")[-1]
    (copy / victim).unlink()
    msg = load_error(copy)
    assert victim in msg and "missing" in msg


def test_tampered_index(copy):
    index = copy / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    second = shards_of(copy, "model")[1]
    doc["weight_map"]["tok_emb.weight"] = second  # claims the embedding is elsewhere
    index.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")  # the same size
    msg = load_error(copy)
    assert "model.safetensors.index.json" in msg and "sha256" in msg
    reseal(copy)  # a careful tamperer: now the shards and the index disagree
    msg = load_error(copy)
    assert second in msg and "tok_emb.weight" in msg  # it lacks what the index claims


def test_shard_from_another_checkpoint(copy, tok, tmp_path):
    for seed, shape in [(1, {}), (2, {"d_ff": 48})]:  # same shapes (same size), another shape
        other = tmp_path / f"other{seed}"
        model = tiny_model(tok, SHAPE, seed=seed, **shape)
        save_checkpoint(other, model, tok, max_shard_size=LIMIT)
        victim = shards_of(copy, "model")[2]  # an FFN shard
        shutil.copy(other / shards_of(other, "model")[2], copy / victim)
        msg = load_error(copy)
        assert victim in msg and ("sha256" if not shape else "modified") in msg
    reseal(copy)  # a careful tamperer: the shard's tensors are not the ones the index lists
    msg = load_error(copy)
    assert victim in msg and "lacks 'blocks.0.ffn.down.weight'" in msg


def test_shard_not_in_the_manifest(copy):
    manifest = (copy / "manifest.json").read_text()
    for victim in (shards_of(copy, "model")[0], shards_of(copy, "optimizer")[0]):
        (copy / "manifest.json").write_text(manifest)
        reseal(copy, drop=victim)
        msg = load_error(copy)
        assert victim in msg and "not listed in manifest.json" in msg


def test_stray_single_file_beside_the_shards(copy, sharded):
    save_file({"x": torch.zeros(2)}, str(copy / "model.safetensors"))
    msg = load_error(copy)  # which set would be the weights?
    assert "holds both model.safetensors and model.safetensors.index.json" in msg


def test_corrupt_optimizer_shard_is_caught_when_resuming(copy):
    victim = shards_of(copy, "optimizer")[1]
    data = bytearray((copy / victim).read_bytes())
    data[-3] ^= 0x40  # same size: only the hash can tell
    (copy / victim).write_bytes(bytes(data))
    ckpt = load_checkpoint(copy)  # chat only needs the weights
    with pytest.raises(CheckpointError, match=f"{victim}: sha256 mismatch"):
        ckpt.load_optimizer_state(adamw(ckpt.model))


# ----------------------------------------------------------------------------- training, CLI


def test_training_saves_shards_and_resumes_identically(tok, tmp_path):
    cache = tc.build_pretrain_cache(TEXTS, tok, tmp_path / "cache")
    cfg = tr.TrainConfig(steps=4, batch_size=2, warmup=1, eval_every=0, save_every=2,
                         val_fraction=0.0, device="cpu", max_shard_size="4KB")  # fmt: skip
    tr.train(tiny_model(tok, SHAPE, seed=4, n_layers=1), tok, cache, cfg, tmp_path / "a")
    tr.train(tiny_model(tok, SHAPE, seed=4, n_layers=1), tok, cache, cfg.replace(steps=2),
             tmp_path / "b")  # fmt: skip
    assert len(shards_of(tmp_path / "b", "optimizer")) > 1
    ckpt = load_checkpoint(tmp_path / "b")
    tr.train(ckpt.model, tok, cache, cfg, tmp_path / "b", resume=ckpt)
    resumed = load_checkpoint(tmp_path / "b").model.state_dict()
    for name, t in load_checkpoint(tmp_path / "a").model.state_dict().items():
        assert torch.equal(t, resumed[name]), name


def test_cli_max_shard_size(tmp_path, capsys):
    (tmp_path / "pre.json").write_text(json.dumps(TEXTS))
    tiny = ["--d-model", "16", "--n-layers", "2", "--n-heads", "2", "--d-ff", "32", "--seq-len",
            "16", "--vocab-size", "290", "--batch-size", "2", "--threads", "1", "--quiet",
            "--data", str(tmp_path / "pre.json"), "--steps", "1"]  # fmt: skip
    out = tmp_path / "run"
    assert cli.main([*tiny, "--out", str(out), "--max-shard-size", "3KB"]) == 0
    assert len(shards_of(out, "model")) > 1 and len(shards_of(out, "optimizer")) > 1
    assert load_checkpoint(out).resumable
    capsys.readouterr()
    assert cli.main([*tiny, "--out", str(tmp_path / "x"), "--max-shard-size", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-shard-size" in err and "'lots'" in err


def test_resume_may_change_the_shard_size():
    from tritonlm.engine.train.run_plan import phase_config

    saved = tr.TrainConfig(steps=10, lr=0.5, max_shard_size="5GB").to_dict()
    cfg = phase_config("pretrain", {"max_shard_size": "1KB", "lr": 0.1}, resumed=saved)
    assert cfg.max_shard_size == "1KB" and cfg.lr == 0.5  # the schedule is kept
    with pytest.raises(ValueError, match="max_shard_size.*'1XB'"):
        tr.TrainConfig(max_shard_size="1XB")
