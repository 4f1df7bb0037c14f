"""engine.shards: sizes, split points, the index, bitwise round trips, malformed sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tritonlm.engine.checkpoint.shards import (
    ShardError,
    iter_tensors,
    nbytes,
    plan_shards,
    read_headers,
    read_index,
    read_shards,
    shard_files,
    write_shards,
)
from tritonlm.engine.sizes import parse_size

# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("10KB", 10_000),
        ("10kb", 10_000),
        ("123", 123),
        (" 2 KB ", 2000),
        ("1.5GB", 1_500_000_000),
        ("2GiB", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("3KiB", 3072),
        ("7B", 7),
        ("300M", 300 * 10**6),
        ("2g", 2 * 10**9),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "five GB", "-1GB", "0", "0.1", "1e9", "5 G B",
                                  "0KB", True, None, 1.5, -3])  # fmt: skip
def test_parse_size_refuses_junk(text):
    with pytest.raises(ValueError) as e:
        parse_size(text)
    assert repr(text) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["2GB", "2GiB", "1.5MB", "300M"])
def test_every_size_flag_reads_a_size_the_same_way(text):
    """llm-train's --tokenizer-sample-bytes and --max-shard-size (and llm-export's) agree."""
    from tritonlm.cli import train_flags
    from tritonlm.engine.train.train_config import TrainConfig

    args = train_flags.build_parser().parse_args(["--tokenizer-sample-bytes", text])
    assert args.tokenizer_sample_bytes == parse_size(text)
    TrainConfig(max_shard_size=text).validate()  # accepted where the other one is


# ----------------------------------------------------------------------------- split points


def f32(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)  # 4n bytes


def test_plan_fills_greedily_in_the_given_order():
    tensors = {"a": f32(4), "b": f32(4), "c": f32(8), "d": f32(1), "e": f32(3)}  # 16 16 32 4 12
    assert plan_shards(tensors, 32) == [["a", "b"], ["c"], ["d", "e"]]  # 32 exactly fits
    assert plan_shards(tensors, 31) == [["a"], ["b"], ["c"], ["d", "e"]]  # c alone, oversize
    assert plan_shards(tensors, 10**9) == [["a", "b", "c", "d", "e"]]
    assert plan_shards(dict(reversed(tensors.items())), 32) == [["e", "d"], ["c"], ["b", "a"]]


def test_oversize_tensor_gets_a_shard_of_its_own(tmp_path):
    tensors = {"small1": f32(2), "big": f32(100), "small2": f32(2)}  # 8, 400, 8 bytes
    files = write_shards(tmp_path, tensors, 50)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"small1": files[0], "big": files[1], "small2": files[2]}
    assert set(load_file(str(tmp_path / files[1]))) == {"big"}


def test_zero_size_and_empty_sets(tmp_path):
    (tmp_path / "a").mkdir()
    assert write_shards(tmp_path / "a", {}, 10) == ["model.safetensors"]
    assert read_shards(tmp_path / "a") == {}
    (tmp_path / "b").mkdir()
    tensors = {"empty": torch.zeros(0, 3), "x": f32(3)}
    assert write_shards(tmp_path / "b", tensors, 12) == ["model.safetensors"]
    back = read_shards(tmp_path / "b")
    assert back["empty"].shape == (0, 3) and torch.equal(back["x"], tensors["x"])


# ----------------------------------------------------------------------------- writing


def mixed() -> dict[str, torch.Tensor]:
    """Tensors of several dtypes (and one non-contiguous view) in a fixed order."""
    g = torch.Generator().manual_seed(0)
    return {
        "tok_emb.weight": torch.randn(40, 8, generator=g),  # 1280 bytes
        "blocks.0.attn.weight": torch.randn(8, 24, generator=g).to(torch.bfloat16),  # 384
        "blocks.0.norm.weight": torch.randn(8, generator=g).to(torch.float16),  # 16
        "blocks.0.ffn.weight": torch.randn(16, 8, generator=g).t(),  # 512, non-contiguous
        "step": torch.tensor(3, dtype=torch.int64),  # 8
        "blocks.1.attn.weight": torch.randn(8, 24, generator=g),  # 768
    }


def test_one_file_when_everything_fits(tmp_path):
    tensors = mixed()
    files = write_shards(tmp_path, tensors, parse_size("5GB"), metadata={"format": "pt"})
    assert files == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert shard_files(tmp_path) == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    back = load_file(str(tmp_path / "model.safetensors"))  # a plain safetensors file
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())


def test_sharded_files_index_and_bitwise_round_trip(tmp_path):
    tensors = mixed()
    files = write_shards(tmp_path, tensors, 1300, base="optimizer", metadata={"format": "x"})
    # 1280 | 384+16+512+8 = 920 | 768: three shards, the index last
    shards = [f"optimizer-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert files == [*shards, "optimizer.safetensors.index.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    index = json.loads((tmp_path / files[-1]).read_text())
    assert index["metadata"] == {"total_size": sum(nbytes(t) for t in tensors.values())}
    names = list(tensors)  # the given order decides the split
    expected = [files[0]] + [files[1]] * 4 + [files[2]]
    assert index["weight_map"] == dict(zip(names, expected, strict=True))
    for file in files[:-1]:  # each shard holds exactly what the index maps to it, under limit
        held = load_file(str(tmp_path / file))
        assert set(held) == {k for k, v in index["weight_map"].items() if v == file}
        assert sum(nbytes(t) for t in held.values()) <= 1300
        with safe_open(str(tmp_path / file), framework="pt") as f:
            assert f.metadata() == {"format": "x"}
    assert shard_files(tmp_path, "optimizer") == [files[-1], *files[:-1]]
    back = read_shards(tmp_path, "optimizer")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].view(-1).view(torch.uint8), v.contiguous().view(-1).view(
            torch.uint8))  # bitwise  # fmt: skip
    assert read_index(tmp_path, "optimizer") == index["weight_map"]


def test_headers_without_loading(tmp_path):
    tensors = mixed()
    write_shards(tmp_path, tensors, 1300)
    info = read_headers(tmp_path)
    assert set(info) == set(tensors)
    assert info["blocks.0.ffn.weight"].shape == (8, 16)
    assert info["blocks.0.attn.weight"].dtype == "BF16" and info["step"].dtype == "I64"
    assert info["tok_emb.weight"].file == "model-00001-of-00003.safetensors"
    assert info["blocks.1.attn.weight"].file == "model-00003-of-00003.safetensors"


def test_iter_tensors_goes_shard_by_shard(tmp_path):
    write_shards(tmp_path, mixed(), 1300)
    names = [name for name, _ in iter_tensors(tmp_path)]
    assert names[0] == "tok_emb.weight" and names[-1] == "blocks.1.attn.weight"
    assert sorted(names) == sorted(mixed())


# ----------------------------------------------------------------------------- malformed sets


@pytest.fixture
def sharded(tmp_path) -> Path:
    write_shards(tmp_path, mixed(), 1300)
    return tmp_path


def edit_index(folder: Path, change) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))


def read_error(folder: Path) -> str:
    """The one-line message of every reader, which must agree."""
    messages = set()
    for read in (read_shards, read_headers, lambda f: list(iter_tensors(f))):
        with pytest.raises(ShardError) as e:
            read(folder)
        messages.add(str(e.value))
    assert len(messages) == 1
    message = messages.pop()
    assert "\n" not in message
    return message


def test_malformed_index(sharded):
    index = sharded / "model.safetensors.index.json"
    index.write_text("{not json")
    assert str(index) in read_error(sharded) and "malformed index" in read_error(sharded)
    index.write_text(json.dumps({"metadata": {}}))
    assert "weight_map" in read_error(sharded)
    index.write_text(json.dumps({"weight_map": {"a": 3}}))
    assert "bad shard name" in read_error(sharded)
    index.write_text(json.dumps([1, 2]))
    assert "weight_map" in read_error(sharded)


def test_tensor_listed_twice(sharded):
    index = sharded / "model.safetensors.index.json"
    text = index.read_text().replace('"weight_map": {', '"weight_map": {"step": '
                                     '"model-00001-of-00003.safetensors", ', 1)  # fmt: skip
    index.write_text(text)
    assert "'step' is listed twice" in read_error(sharded)


def test_shard_names_must_stay_in_the_folder(sharded):
    edit_index(
        sharded, lambda i: i["weight_map"].update(step="../model-00002-of-00003.safetensors")
    )
    assert "bad shard name" in read_error(sharded)


def test_missing_shard(sharded):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    msg = read_error(sharded)
    assert "model-00002-of-00003.safetensors: shard is missing" in msg
    with pytest.raises(ShardError, match="shard is missing"):
        shard_files(sharded)


def test_index_and_shards_must_agree(sharded):
    # the index moves a tensor to another shard: the shard it names does not hold it
    edit_index(sharded, lambda i: i["weight_map"].update(step="model-00001-of-00003.safetensors"))
    msg = read_error(sharded)
    assert "model-0000" in msg and "'step'" in msg
    # a tensor the index does not know is in a shard (a shard of another set)
    edit_index(sharded, lambda i: i["weight_map"].pop("step") and None)
    msg = read_error(sharded)
    assert "model-00002-of-00003.safetensors: holds 'step'" in msg


def test_shard_swapped_in_from_another_set(sharded, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    write_shards(other, {"foreign": f32(8)}, 1)
    (sharded / "model-00003-of-00003.safetensors").unlink()
    (other / "model.safetensors").rename(sharded / "model-00003-of-00003.safetensors")
    assert "model-00003-of-00003.safetensors: holds 'foreign'" in read_error(sharded)


def test_unreadable_shard_names_the_file(sharded):
    (sharded / "model-00002-of-00003.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0garbage!")
    msg = read_error(sharded)
    assert "model-00002-of-00003.safetensors: unreadable safetensors" in msg


def test_no_set_or_two_sets(tmp_path):
    with pytest.raises(ShardError, match="neither model.safetensors nor"):
        shard_files(tmp_path)
    write_shards(tmp_path, mixed(), 1300)
    save_file({"x": f32(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ShardError, match="both model.safetensors and"):
        read_shards(tmp_path)


def test_write_refuses_a_zero_limit(tmp_path):
    with pytest.raises(ValueError, match="max_shard_bytes"):
        write_shards(tmp_path, {"x": f32(1)}, 0)
