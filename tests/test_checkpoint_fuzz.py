"""Tampered checkpoints: every field of every JSON file, and the safetensors headers.

Each variant rewrites one file and then fixes the manifest (size and sha256), so the
tampering gets past the integrity check and must be caught by the field checks. The
checkpoint is then used the way ``llm-train --resume`` uses it (load, check the trainer
state, build the optimizer and load its state). Every variant must either work or fail
with one of our one-line errors, which ``llm-train`` prints as one line and exit 2; no
other exception may escape.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from factories import tiny_model, tiny_tokenizer
from tritonlm.cli.common import known_errors
from tritonlm.engine.checkpoint.save_load import load_checkpoint, save_checkpoint
from tritonlm.engine.data import token_cache as tc
from tritonlm.engine.train import loop as tr
from tritonlm.engine.train.runtime import build_optimizer
from tritonlm.engine.train.trainer_state import check_trainer_state

TEXTS = [f"Item {i}: a {c} lamp by door {i % 7}." for i in range(50) for c in "rs"]
FILES = ["config.json", "trainer_state.json", "tokenizer.json", "manifest.json"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A resumable checkpoint after 2 steps, and the cache it trained on."""
    root = tmp_path_factory.mktemp("fuzz")
    tok = tiny_tokenizer(TEXTS, vocab_size=290)
    cache = tc.build_pretrain_cache(TEXTS, tok, root / "cache")
    model = tiny_model(tok, d_model=16, n_layers=1, d_ff=32)
    cfg = tr.TrainConfig(steps=4, batch_size=2, warmup=1, eval_every=2, device="cpu",
                         val_fraction=0.1)  # fmt: skip
    tr.train(model, tok, cache, cfg.replace(steps=2), root / "ckpt")  # finished at step 2
    ckpt = load_checkpoint(root / "ckpt")
    tr.train(ckpt.model, tok, cache, cfg, root / "ckpt", resume=ckpt, stop=_stop_now())
    return root / "ckpt", cache


@pytest.fixture(scope="module")
def made_sharded(made, tmp_path_factory):
    """The same checkpoint saved again with its weights and optimizer state in shards."""
    src, cache = made
    ckpt = load_checkpoint(src)
    st = check_trainer_state(ckpt.trainer_state, str(src))
    optimizer = build_optimizer(ckpt.model, tr.TrainConfig.from_dict(st["train_config"]))
    ckpt.load_optimizer_state(optimizer)
    dst = tmp_path_factory.mktemp("fuzz_sharded") / "ckpt"
    save_checkpoint(dst, ckpt.model, ckpt.tokenizer, ckpt.train_config, optimizer=optimizer,
                    trainer_state=ckpt.trainer_state, max_shard_size="8KB")  # fmt: skip
    assert len(list(dst.glob("optimizer-*-of-*.safetensors"))) > 2
    return dst, cache


def _stop_now():
    stop = tr.StopRequest()
    stop.request()  # obeyed before the first step: the saved state is step 2 of 4
    return stop


def paths(obj, prefix=()):
    """Every field path in a JSON value (list items: the first one only)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*prefix, k)
            yield from paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:1]):
            yield (*prefix, i)
            yield from paths(v, (*prefix, i))


def mutations(value):
    """Delete, null, mistype and reshape a field; numbers also go negative and huge."""
    yield "deleted", None
    yield "null", None
    yield "mistyped", 7 if isinstance(value, str) else "x"
    yield "reshaped", {"a": value} if isinstance(value, list) else [value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield "negative", -7
        yield "huge", 2**62


def variants(doc):
    for path in paths(doc):
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        for kind, value in mutations(parent[path[-1]]):
            new = copy.deepcopy(doc)
            target = new
            for key in path[:-1]:
                target = target[key]
            if kind == "deleted":
                del target[path[-1]]
            else:
                target[path[-1]] = copy.deepcopy(value)
            yield f"{'.'.join(map(str, path))}={kind}", new


def replace_file(path: Path, data: bytes) -> None:
    """Write a new file (the work copy's files are hard links to the original's)."""
    path.unlink()
    path.write_bytes(data)


def work_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def reseal(ckpt: Path) -> None:
    """Make the manifest match the files again, as a careful tamperer would."""
    man = json.loads((ckpt / "manifest.json").read_text())
    for name in man.get("files", {}) if isinstance(man.get("files"), dict) else {}:
        f = ckpt / name
        if f.is_file():
            data = f.read_bytes()
            man["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    replace_file(ckpt / "manifest.json", json.dumps(man).encode())


def use_for_resume(ckpt_dir: Path, cache) -> None:
    """What `llm-train --resume` does with a checkpoint before training."""
    ckpt = load_checkpoint(ckpt_dir)
    if ckpt.trainer_state is not None:
        st = check_trainer_state(ckpt.trainer_state, str(ckpt.path))
        cfg = tr.TrainConfig.from_dict(st["train_config"])
        # one more step, with evaluation; no save (that path has its own tests)
        steps = max(1, st["step"]) + 1
        tr.train(ckpt.model, ckpt.tokenizer, cache, cfg.replace(steps=steps, eval_every=1),
                 resume=ckpt)  # fmt: skip


def outcome(ckpt_dir: Path, cache) -> str:
    try:
        use_for_resume(ckpt_dir, cache)
    except known_errors() as e:
        msg = str(e)
        assert msg and "\n" not in msg.strip(), msg
        return "refused"
    return "ok"


@pytest.mark.parametrize("name", FILES)
def test_every_json_field_tampered(name, made, tmp_path):
    src, cache = made
    doc = json.loads((src / name).read_text())
    counts = {"ok": 0, "refused": 0}
    for i, (label, new) in enumerate(variants(doc)):
        work = work_copy(src, tmp_path / f"v{i}")
        replace_file(work / name, json.dumps(new).encode())
        if name != "manifest.json":
            reseal(work)
        try:
            counts[outcome(work, cache)] += 1
        except AssertionError:
            raise
        except BaseException as e:  # anything else is a traceback for the user
            raise AssertionError(f"{name} {label}: {type(e).__name__}: {e}") from None
        shutil.rmtree(work)
    assert counts["refused"] > 20, counts  # the checks really ran


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_header(path: Path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    replace_file(path, struct.pack("<Q", len(text)) + text + body)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_every_safetensors_header_field_tampered(name, made, tmp_path):
    src, cache = made
    header, body = _header(src / name)
    seen = 0
    for i, (label, new) in enumerate(variants(header)):
        work = work_copy(src, tmp_path / f"v{i}")
        _write_header(work / name, new, body)
        reseal(work)
        try:
            outcome(work, cache)
        except BaseException as e:
            raise AssertionError(f"{name} {label}: {type(e).__name__}: {e}") from None
        shutil.rmtree(work)
        seen += 1
    assert seen > 50


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_non_finite_tensors_are_refused(name, value, made, tmp_path):
    from safetensors.torch import load_file, save_file

    src, cache = made
    work = tmp_path / "w"
    shutil.copytree(src, work)
    tensors = load_file(str(work / name))
    key = sorted(k for k in tensors if tensors[k].numel() > 1)[0]
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(work / name), metadata={"format": "tritonlm-checkpoint"})
    reseal(work)
    with pytest.raises(known_errors(), match="NaN or infinite"):
        use_for_resume(work, cache)


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("form", ["whole file", "inside a field", "huge integer"])
def test_deeply_nested_or_oversized_json_is_one_line(name, form, made, tmp_path):
    src, cache = made
    work = work_copy(src, tmp_path / "w")
    text = (src / name).read_text()
    if form == "whole file":
        text = DEEP
    elif form == "inside a field":
        text = text.replace("{", '{"deep": ' + DEEP + ", ", 1)
    else:
        text = text.replace("{", '{"big": ' + "9" * 5000 + ", ", 1)
    replace_file(work / name, text.encode())
    if name != "manifest.json":
        reseal(work)
    assert outcome(work, cache) == "refused" or form != "whole file"


@pytest.mark.parametrize(
    "change, words",
    [
        ({"max_seq_len": 2**31}, "GiB"),  # shapes agree; building would need ~TBs of RoPE tables
        ({"d_model": 2**20, "n_heads": 2**10}, "shape"),  # the header disagrees first
        ({"n_layers": 2**30}, "blocks"),  # refused before building 2**30 blocks
    ],
)
def test_tampered_sizes_are_refused_before_allocating(change, words, made, tmp_path):
    import resource

    src, _ = made
    work = work_copy(src, tmp_path / "w")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_config"].update(change)
    replace_file(work / "config.json", json.dumps(cfg).encode())
    reseal(work)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(known_errors(), match=words):
        load_checkpoint(work)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200  # refused before any large allocation


# ----------------------------------------------------------------------------- shards


def index_variants(doc):
    """variants() of an index, its weight_map's first entry standing for all of them, plus
    the entry pointed at another shard, a missing one and one outside the folder."""
    first = next(iter(doc["weight_map"]))
    for label, new in variants(doc):
        if label.startswith("weight_map.") and not label.startswith(f"weight_map.{first}="):
            continue
        yield label, new
    shards = sorted(set(doc["weight_map"].values()))
    for label, file in [("other shard", shards[-1] if doc["weight_map"][first] != shards[-1]
                         else shards[0]), ("missing", "model-00009-of-00009.safetensors"),
                        ("escape", "../ckpt/" + shards[0])]:  # fmt: skip
        new = copy.deepcopy(doc)
        new["weight_map"][first] = file
        yield f"weight_map.{first}={label}", new


@pytest.mark.parametrize("name", ["model.safetensors.index.json",
                                  "optimizer.safetensors.index.json"])  # fmt: skip
def test_every_index_field_tampered(name, made_sharded, tmp_path):
    src, cache = made_sharded
    doc = json.loads((src / name).read_text())
    counts = {"ok": 0, "refused": 0}
    for i, (label, new) in enumerate(index_variants(doc)):
        work = work_copy(src, tmp_path / f"v{i}")
        replace_file(work / name, json.dumps(new).encode())
        reseal(work)
        try:
            counts[outcome(work, cache)] += 1
        except BaseException as e:
            raise AssertionError(f"{name} {label}: {type(e).__name__}: {e}") from None
        shutil.rmtree(work)
    assert counts["refused"] > 10 and counts["ok"] >= 1, counts  # total_size is advisory


@pytest.mark.parametrize("base, i", [("model", 1), ("optimizer", 2)])
def test_every_shard_header_field_tampered(base, i, made_sharded, tmp_path):
    src, cache = made_sharded
    name = sorted(p.name for p in src.glob(f"{base}-*-of-*.safetensors"))[i]
    header, body = _header(src / name)
    for i, (label, new) in enumerate(variants(header)):
        work = work_copy(src, tmp_path / f"v{i}")
        _write_header(work / name, new, body)
        reseal(work)
        try:
            outcome(work, cache)
        except BaseException as e:
            raise AssertionError(f"{name} {label}: {type(e).__name__}: {e}") from None
        shutil.rmtree(work)
