"""Sharded safetensors in the Hugging Face layout: one writer and one reader for all.

Used by our checkpoints (``model`` and ``optimizer`` sets) and by the Hugging Face export
and import. A set named ``base`` is either one file or shards plus an index::

    model.safetensors                          everything fits in one shard
    model-00001-of-00003.safetensors ...       otherwise, and
    model.safetensors.index.json               {"metadata": {"total_size": <tensor bytes>},
                                                "weight_map": {tensor name: shard file}}

Shards are filled greedily in the order the tensors are given (a model's state_dict
order keeps a block's tensors together, as ``transformers`` does): a shard is closed when
the next tensor would push it past the limit, and a tensor larger than the limit gets a
shard of its own. Sizes count tensor bytes only, not the small JSON header of each file.
``total_size`` is written for other readers; ours do not rely on it (the index's weight
map and the shards' own headers must agree instead).

Every problem with a set on disk is a :class:`ShardError` (a ValueError) whose one-line
message names the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import fsync_file
from ..errors import EngineError

DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' default for save_pretrained


class ShardError(EngineError, ValueError):
    """A tensor set on disk that cannot be read: the message names the file."""


def index_name(base: str = "model") -> str:
    return f"{base}.safetensors.index.json"


def single_name(base: str = "model") -> str:
    return f"{base}.safetensors"


def shard_name(base: str, i: int, n: int) -> str:
    """``model-00001-of-00003.safetensors`` for i=1, n=3 (1-based, like transformers)."""
    return f"{base}-{i:05d}-of-{n:05d}.safetensors"


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in the given order (see the module docstring).

    >>> t = torch.zeros(4)  # 16 bytes each
    >>> plan_shards({"a": t, "b": t, "c": torch.zeros(9), "d": t}, 32)
    [['a', 'b'], ['c'], ['d']]
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = nbytes(t)
        if shards[-1] and size + n > max_shard_bytes:  # close the current shard
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_shards(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    max_shard_bytes: int,
    base: str = "model",
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write ``tensors`` as the set ``base`` in ``folder``; return the file names written
    (the index last when there is one). Each file gets ``metadata`` in its safetensors
    header and is fsynced; the caller writes into a fresh directory and swaps it in whole
    (an existing set of another shard count in ``folder`` would not be removed).
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    folder = Path(folder)
    plan = plan_shards(tensors, max_shard_bytes)
    names = [single_name(base)] if len(plan) == 1 else [
        shard_name(base, i + 1, len(plan)) for i in range(len(plan))]  # fmt: skip
    for file, members in zip(names, plan, strict=True):
        # One shard's contiguous copies at a time: memory stays at about one shard.
        part = {k: tensors[k].detach().contiguous() for k in members}
        save_file(part, str(folder / file), metadata=metadata)
        del part
        fsync_file(folder / file)
    if len(plan) == 1:
        return names
    index = {
        "metadata": {"total_size": sum(nbytes(t) for t in tensors.values())},
        "weight_map": {k: file for file, members in zip(names, plan, strict=True) for k in members},
    }
    with open(folder / index_name(base), "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return [*names, index_name(base)]


# ----------------------------------------------------------------------------- reading


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: a key given twice (a tensor mapped twice) is an error."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ShardError(f"{key!r} is listed twice")
        out[key] = value
    return out


def _plain_name(name: object) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name)  # fmt: skip


def read_index(folder: Path, base: str = "model") -> dict[str, str]:
    """The checked weight map (tensor name -> shard file) of a sharded set."""
    path = Path(folder) / index_name(base)
    try:
        index = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except ShardError as e:
        raise ShardError(f"{path}: malformed index ({e} in it)") from None
    except FileNotFoundError:
        raise ShardError(f"{path}: file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise ShardError(f"{path}: malformed index ({type(e).__name__}: {e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ShardError(f"{path}: malformed index (no 'weight_map' object of tensors)")
    for name, file in weight_map.items():
        if not _plain_name(file) or not file.endswith(".safetensors"):
            raise ShardError(f"{path}: tensor {name!r} maps to a bad shard name {file!r}")
    return weight_map


def shard_files(folder: Path, base: str = "model") -> list[str]:
    """The files the set ``base`` in ``folder`` consists of: ``[base.safetensors]``, or the
    index followed by its shards in name order. ShardError when there is no set, when
    both forms are present, or when the index is malformed or names a missing shard."""
    folder = Path(folder)
    single, index = folder / single_name(base), folder / index_name(base)
    if single.exists() and index.exists():
        raise ShardError(f"{folder}: holds both {single.name} and {index.name} (which one?)")
    if single.exists():
        return [single.name]
    if not index.exists():
        raise ShardError(f"{folder}: has neither {single.name} nor {index.name}")
    shards = sorted(set(read_index(folder, base).values()))
    for file in shards:
        if not (folder / file).is_file():
            raise ShardError(f"{folder / file}: shard is missing (listed in {index.name})")
    return [index.name, *shards]


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor (no data read)."""

    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "F32", "BF16", "F16", "I64", ...
    file: str


def _layout(folder: Path, base: str) -> dict[str, list[str] | None]:
    """Shard file -> the tensor names the index puts there; ``{file: None}`` for a set
    that is one file (whatever it holds is the set)."""
    files = shard_files(folder, base)
    if len(files) == 1:
        return {files[0]: None}
    layout: dict[str, list[str] | None] = {f: [] for f in files[1:]}
    for name, file in read_index(folder, base).items():
        layout[file].append(name)
    return layout


def _open(path: Path, device: str | torch.device = "cpu"):
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ShardError(f"{path}: unreadable safetensors ({e})") from None


def _check_members(path: Path, found: list[str], listed: list[str] | None, base: str) -> None:
    """A shard must hold exactly the tensors the index maps to it."""
    if listed is None:  # a single file
        return
    extra, missing = sorted(set(found) - set(listed)), sorted(set(listed) - set(found))
    if extra:
        raise ShardError(f"{path}: holds {extra[0]!r}, which {index_name(base)} maps "
                         f"elsewhere or not at all (a shard of another set?)")  # fmt: skip
    if missing:
        raise ShardError(f"{path}: lacks {missing[0]!r}, which {index_name(base)} maps to it")


def read_headers(folder: Path, base: str = "model") -> dict[str, TensorInfo]:
    """Name -> shape, dtype and file of every tensor in the set, from the headers only
    (nothing is allocated: a loader checks shapes before it builds a model)."""
    folder = Path(folder)
    out: dict[str, TensorInfo] = {}
    for file, listed in _layout(folder, base).items():
        path = folder / file
        try:
            with _open(path) as f:
                keys = list(f.keys())
                for k in keys:
                    s = f.get_slice(k)
                    out[k] = TensorInfo(tuple(s.get_shape()), s.get_dtype(), file)
        except SafetensorError as e:
            raise ShardError(f"{path}: unreadable safetensors ({e})") from None
        _check_members(path, keys, listed, base)
    return out


def iter_tensors(folder: Path, base: str = "model", device: str | torch.device = "cpu",
                 ) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """(name, tensor) for every tensor of the set, one shard open at a time: a converter
    can turn each into its own form without holding two copies of the whole model."""
    folder = Path(folder)
    for file, listed in _layout(folder, base).items():
        path = folder / file
        try:
            with _open(path, device) as f:
                keys = list(f.keys())
                _check_members(path, keys, listed, base)
                for k in keys:
                    yield k, f.get_tensor(k)
        except SafetensorError as e:
            raise ShardError(f"{path}: unreadable safetensors ({e})") from None


def read_shards(folder: Path, base: str = "model", device: str | torch.device = "cpu",
                ) -> dict[str, torch.Tensor]:  # fmt: skip
    """Every tensor of the set (one file or shards), each shard read through safe_open:
    memory beyond the result is at most one tensor's worth."""
    return dict(iter_tensors(folder, base, device))
