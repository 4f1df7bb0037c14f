"""LoRA checkpoints: the adapters and a reference to the base, never the base's weights.

    ckpt/
      config.json        {"format": "tritonlm-checkpoint", "format_version": 1,
                          "kind": "lora-adapter", "model_config": {...the base's...},
                          "lora_config": {...}, "base": {"path", "fingerprint"},
                          "train_config": {...}|null, "resumable": bool}
      adapter.safetensors   blocks.{i}.{attn|ffn}.{layer}.lora_A / lora_B (float32)
      optimizer.safetensors + trainer_state.json   resumable only (adapters' state alone)
      manifest.json      sha256 and size of every file above

The base is one of our checkpoints (fingerprint: the sha256 of its manifest.json, which
itself hashes every file) or a Hugging Face folder (the sha256 of its config.json and
weight files' hashes). Loading rebuilds the base, checks the fingerprint first (a changed
or different base is refused in one line), adds the adapters and, for inference, merges
them (:func:`load_model`). The directory is written atomically like every checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..atomic import fsync_dir, fsync_file
from ..checkpoint.checkpoint_files import (
    ADAPTER_BASE,
    CONFIG_FILE,
    FORMAT_MAGIC,
    FORMAT_VERSION,
    OPTIMIZER_BASE,
    TRAINER_STATE_FILE,
    CheckpointError,
    is_checkpoint_file,
    is_optimizer_shard,
    read_json,
    read_manifest,
    read_set,
    tensor_set,
    verify_file,
    write_json,
)
from ..checkpoint.checkpoint_store import MANIFEST_FILE, replace_directory, resolve
from ..checkpoint.optimizer_state import flatten_optimizer
from ..checkpoint.save_load import Checkpoint, load_checkpoint
from ..checkpoint.shards import DEFAULT_MAX_SHARD_SIZE, write_shards
from ..errors import os_reason
from ..hashing import sha256_file
from ..interop.hf_format import HFFormatError
from ..sizes import parse_size
from .layers import BaseRef, adapter_tensors, add_lora, load_adapter_tensors, lora_info, merge_lora
from .lora_config import LoraConfig, LoraConfigError

KIND = "lora-adapter"


# ----------------------------------------------------------------------------- the base


def base_fingerprint(path: str | os.PathLike) -> str:
    """What identifies a base model's content (see the module docstring)."""
    root = resolve(Path(path))
    if root is None or not root.is_dir():
        raise CheckpointError(f"{path}: base model directory does not exist")
    if (root / MANIFEST_FILE).is_file():  # ours: the manifest hashes every file already
        return sha256_file(root / MANIFEST_FILE)
    h = hashlib.sha256()
    names = sorted(p.name for p in root.iterdir()
                   if p.name == "config.json" or p.name.endswith(".safetensors"))  # fmt: skip
    for name in names:
        h.update(f"{name} {sha256_file(root / name)}\n".encode())
    return h.hexdigest()


def base_ref(path: str | os.PathLike) -> BaseRef:
    return BaseRef(str(Path(path).resolve()), base_fingerprint(path))


def load_base(path: str | os.PathLike, backend: str = "auto") -> Checkpoint:
    """A base model: one of our checkpoints, or a Hugging Face folder imported in memory."""
    root = resolve(Path(path))
    if root is not None and not (root / MANIFEST_FILE).exists():
        from ..interop.hf_import import load_hf

        try:
            imported = load_hf(root, backend=backend)
        except HFFormatError as e:
            raise CheckpointError(str(e)) from None
        model = imported.model
        return Checkpoint(path=root, model=model, tokenizer=imported.tokenizer,
                          model_config=model.config, train_config=None, trainer_state=None,
                          format_version=FORMAT_VERSION)  # fmt: skip
    return load_model(path, backend=backend)  # a base may itself be base + adapters


# ----------------------------------------------------------------------------- save


def save_adapter_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    train_config: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict[str, Any] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Atomically write the adapters of ``model`` (and, with ``optimizer``, the state a
    resume needs) to ``path``. Returns the path."""
    info = lora_info(model)
    if info is None:
        raise CheckpointError(f"{path}: the model has no LoRA adapters to save")
    cfg, base = info
    shard_bytes = parse_size(max_shard_size)
    model_config = getattr(model, "_orig_mod", model).config

    def fill(tmp: Path) -> None:
        files = [CONFIG_FILE]
        write_json(tmp / CONFIG_FILE, {
            "format": FORMAT_MAGIC, "format_version": FORMAT_VERSION, "kind": KIND,
            "model_config": model_config.to_dict(), "lora_config": cfg.to_dict(),
            "base": base.to_dict(), "train_config": train_config,
            "resumable": optimizer is not None,
        })  # fmt: skip
        tensor_files = write_shards(tmp, adapter_tensors(model), shard_bytes, ADAPTER_BASE,
                                    {"format": FORMAT_MAGIC})  # fmt: skip
        if optimizer is not None:
            tensors, meta = flatten_optimizer(optimizer, getattr(model, "_orig_mod", model))
            tensor_files += write_shards(tmp, tensors, shard_bytes, OPTIMIZER_BASE,
                                         {"format": FORMAT_MAGIC})  # fmt: skip
            write_json(tmp / TRAINER_STATE_FILE,
                       {"trainer_state": trainer_state or {}, "optimizer": meta})  # fmt: skip
            files.append(TRAINER_STATE_FILE)
        entries = {n: {"size": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)}
                   for n in files + tensor_files}  # fmt: skip
        write_json(tmp / MANIFEST_FILE, {"format": FORMAT_MAGIC, "files": entries})
        for name in [*files, MANIFEST_FILE]:
            fsync_file(tmp / name)
        fsync_dir(tmp)

    try:
        return replace_directory(Path(path), fill, is_checkpoint_file)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: cannot write the checkpoint ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write the checkpoint ({os_reason(e)})") from None


# ----------------------------------------------------------------------------- load


def is_adapter_checkpoint(path: str | os.PathLike) -> bool:
    root = resolve(Path(path))
    if root is None or not (root / CONFIG_FILE).is_file():
        return False
    try:
        cfg = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(cfg, dict) and cfg.get("format") == FORMAT_MAGIC and cfg.get("kind") == KIND


def _read_adapter_config(root: Path) -> tuple[dict, LoraConfig, BaseRef]:
    path = root / CONFIG_FILE
    cfg = read_json(path)
    if cfg.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: adapter format version {cfg.get('format_version')!r} "
                              f"is not {FORMAT_VERSION}")  # fmt: skip
    try:
        lora = LoraConfig.from_dict(cfg.get("lora_config"))
    except (LoraConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: bad lora_config ({e})") from None
    base = cfg.get("base")
    if not (isinstance(base, dict) and isinstance(base.get("path"), str)
            and isinstance(base.get("fingerprint"), str)):  # fmt: skip
        raise CheckpointError(f"{path}: 'base' must name the base model's path and fingerprint")
    return cfg, lora, BaseRef(base["path"], base["fingerprint"])


def load_adapter_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                            backend: str = "auto", merge: bool = True) -> Checkpoint:  # fmt: skip
    """Base + adapters. ``merge``: folded into plain weights (inference, export); else the
    adapted model a resume continues (base weights in the trained ``base_dtype``)."""
    root = resolve(Path(path))
    if root is None:
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    manifest = read_manifest(root)
    for name in manifest["files"]:
        verify_file(root, name, manifest, digest=not is_optimizer_shard(name))
    if CONFIG_FILE not in manifest["files"]:
        raise CheckpointError(f"{root / MANIFEST_FILE}: does not list {CONFIG_FILE}")
    adapter_files = tensor_set(root, ADAPTER_BASE, manifest)
    cfg, lora, base = _read_adapter_config(root)
    if not Path(base.path).exists():
        raise CheckpointError(f"{root}: its base model {base.path} is missing (the adapters "
                              "need the model they were trained on)")  # fmt: skip
    found = base_fingerprint(base.path)
    if found != base.fingerprint:
        raise CheckpointError(f"{root}: base model {base.path} is not the one these adapters "
                              f"were trained on (fingerprint {found[:12]}, expected "
                              f"{base.fingerprint[:12]})")  # fmt: skip
    ckpt = load_base(base.path, backend=backend)
    model = ckpt.model
    if model.config.to_dict() != {**cfg.get("model_config", {}), "dropout": model.config.dropout}:
        raise CheckpointError(f"{root / CONFIG_FILE}: model_config differs from the base's")
    if merge and lora.base_dtype != "float32":  # merge onto the full-precision weights
        lora = lora.replace(base_dtype="float32")
    add_lora(model, lora, base)
    try:
        load_adapter_tensors(model, read_set(root, ADAPTER_BASE))
    except ValueError as e:
        raise CheckpointError(f"{root / adapter_files[0]}: {e}") from None
    if merge:
        merge_lora(model)
    model.to(device).eval()
    trainer_state = None
    if cfg.get("resumable"):
        tensor_set(root, OPTIMIZER_BASE, manifest)
        state = read_json(root / TRAINER_STATE_FILE)
        if not isinstance(state, dict) or not isinstance(state.get("optimizer"), dict):
            raise CheckpointError(f"{root / TRAINER_STATE_FILE}: malformed trainer state")
        trainer_state = state.get("trainer_state") or {}
    return Checkpoint(path=root, model=model, tokenizer=ckpt.tokenizer,
                      model_config=model.config, train_config=cfg.get("train_config"),
                      trainer_state=trainer_state, format_version=FORMAT_VERSION,
                      manifest=manifest)  # fmt: skip


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               backend: str = "auto", merge: bool = True) -> Checkpoint:  # fmt: skip
    """Any checkpoint directory: an adapter checkpoint (base + adapters, merged unless
    ``merge`` is False) or a full one (engine.checkpoint.load_checkpoint)."""
    if is_adapter_checkpoint(path):
        return load_adapter_checkpoint(path, device, backend, merge)
    return load_checkpoint(path, device=device, backend=backend)
