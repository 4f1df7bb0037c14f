"""The files of a checkpoint directory: their names, the manifest, JSON and tensor sets.

:mod:`.checkpoint` decides what goes into a checkpoint and how it is rebuilt; this module
only knows files: which names belong to a checkpoint, how a JSON file or a (possibly
sharded) tensor set is read and written, and how every file is checked against
``manifest.json`` (size and sha256). Every problem is a one-line :class:`CheckpointError`
that names the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..errors import EngineError
from ..hashing import sha256_file
from .checkpoint_store import MANIFEST_FILE
from .shards import ShardError, read_shards, shard_files

FORMAT_MAGIC = "tritonlm-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_BASE, OPTIMIZER_BASE = "model", "optimizer"  # the two sharded tensor sets
ADAPTER_BASE = "adapter"  # LoRA checkpoints (engine.lora) hold this set instead of the model's
MODEL_FILE = "model.safetensors"  # the set's name when it is one file
TOKENIZER_FILE = "tokenizer.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTER_FILE = "adapter.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"


class CheckpointError(EngineError, ValueError):
    """A checkpoint that cannot be saved or loaded; the message names the file."""


CHECKPOINT_FILES = frozenset(
    {
        CONFIG_FILE,
        MODEL_FILE,
        TOKENIZER_FILE,
        OPTIMIZER_FILE,
        TRAINER_STATE_FILE,
        MANIFEST_FILE,
        ADAPTER_FILE,
    }
)
# The variable names of a sharded set: model-00001-of-00003.safetensors, its index.
_SHARDED = re.compile(rf"({MODEL_BASE}|{OPTIMIZER_BASE}|{ADAPTER_BASE})"
                      r"(-\d+-of-\d+\.safetensors|\.safetensors\.index\.json)")  # fmt: skip


def is_checkpoint_file(name: str) -> bool:
    """Whether a file in a checkpoint directory belongs to the checkpoint (a save replaces
    it) rather than to the user or the run log (a save carries it over)."""
    return name in CHECKPOINT_FILES or _SHARDED.fullmatch(name) is not None


def is_optimizer_shard(name: str) -> bool:
    """Optimizer tensors (twice the weights): hashed only when a resume reads them."""
    return name.startswith(OPTIMIZER_BASE) and name.endswith(".safetensors")


def write_json(path: Path, obj: Any) -> None:
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path.name}: cannot be written as JSON ({e})") from None
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: malformed JSON ({e})") from None
    except (RecursionError, ValueError) as e:  # nested too deeply, an oversized integer
        raise CheckpointError(f"{path}: malformed JSON ({type(e).__name__})") from None


def verify_file(root: Path, name: str, manifest: dict[str, Any], digest: bool = True) -> None:
    entry = manifest["files"].get(name)
    path = root / name
    if entry is None:
        raise CheckpointError(f"{path}: not listed in {MANIFEST_FILE}")
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    size = path.stat().st_size
    if size != entry["size"]:
        raise CheckpointError(
            f"{path}: size {size} bytes, manifest says {entry['size']} (truncated or modified)"
        )
    if digest and sha256_file(path) != entry["sha256"]:
        raise CheckpointError(f"{path}: sha256 mismatch with {MANIFEST_FILE} (file corrupted)")


def read_manifest(root: Path) -> dict[str, Any]:
    manifest = read_json(root / MANIFEST_FILE)
    path = root / MANIFEST_FILE
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_MAGIC:
        raise CheckpointError(f"{path}: not a {FORMAT_MAGIC} manifest")
    files = manifest.get("files")
    ok = isinstance(files, dict) and all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
        for e in files.values()
    )
    if not ok:
        raise CheckpointError(f"{path}: malformed file list")
    for name in files:
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CheckpointError(f"{path}: bad file name {name!r}")
    return manifest


def tensor_set(root: Path, base: str, manifest: dict[str, Any]) -> list[str]:
    """The files of the tensor set ``base`` (one file, or index + shards), each of which
    must be listed in the manifest: a shard dropped in from elsewhere is refused."""
    try:
        files = shard_files(root, base)
    except ShardError as e:
        raise CheckpointError(str(e)) from None
    for name in files:
        if name not in manifest["files"]:
            raise CheckpointError(f"{root / name}: not listed in {MANIFEST_FILE}")
    return files


def read_set(root: Path, base: str) -> dict[str, torch.Tensor]:
    """Every tensor of a set, shard by shard (the messages name the shard)."""
    try:
        return read_shards(root, base)
    except ShardError as e:
        raise CheckpointError(str(e)) from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{root}: unreadable {base} safetensors ({e})") from None
