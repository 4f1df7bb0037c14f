"""Checkpoints: one directory, safetensors + JSON, written atomically, never pickled.

Layout (format version 1)::

    ckpt/
      config.json            {"format": "tritonlm-checkpoint", "format_version": 1,
                              "model_config": {...ModelConfig...}, "train_config": {...}|null,
                              "tokenizer_file": "tokenizer.json", "resumable": bool}
      model.safetensors      weights by parameter name (see engine.model.Transformer);
                             tied embeddings are stored once, as tok_emb.weight
                             (above max_shard_size: model-0000i-of-0000N.safetensors
                             + model.safetensors.index.json, see engine.shards)
      tokenizer.json         the tokenizer's own save format (BpeTokenizer.save)
      optimizer.safetensors  resumable only: optimizer tensors named
                             "state.<parameter name>.<key>" (e.g. state.norm.weight.exp_avg),
                             sharded like the weights
      trainer_state.json     resumable only: {"trainer_state": {...caller's JSON...},
                              "optimizer": {"class", "param_groups" (params given by name),
                              "scalars": {param name: {key: non-tensor value}}}}
      manifest.json          {"format": ..., "files": {name: {"size": int, "sha256": hex}}}
                             for every file above, every shard and index included

Saving writes everything into a sibling temporary directory ``.<name>.tmp-<random>``,
fsyncs each file and the directory, then renames it into place. When ``<name>`` already
exists it is first renamed aside to ``.<name>.old``, the new one is renamed in, and the
aside copy is deleted. Renames are atomic, so after a crash at any point either
``<name>`` or ``.<name>.old`` is a complete checkpoint. Recovery rule: ``load_checkpoint``
uses ``<name>`` when it exists and otherwise falls back to ``.<name>.old``; the next
successful save removes leftover ``.old`` and ``.tmp-*`` directories.

Loading checks the manifest (size and sha256 of every file; the optimizer shards are hashed
by ``load_optimizer_state``, when a resume uses it) first, and that every file of the weight
and optimizer sets is listed in it, then the config's magic
and format version (newer: refused; older: migrated through MIGRATIONS), rebuilds the
tokenizer, takes the vocabulary size from it, builds the model from its config and loads
the weights with strict name and shape checks. Every problem is a one-line
CheckpointError that names the file. The file layer (names, manifest, JSON, tensor sets)
lives in :mod:`.checkpoint_files`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
from tritonlm.engine.tokenizer.tokenizer_config import TokenizerError

from ..atomic import fsync_dir, fsync_file
from ..errors import os_reason
from ..hashing import sha256_file
from ..model.config import ConfigError, ModelConfig
from ..model.memory import build_bytes, too_big
from ..model.transformer import Transformer
from ..sizes import parse_size
from .checkpoint_files import (
    ADAPTER_BASE,
    ADAPTER_FILE,
    CONFIG_FILE,
    FORMAT_MAGIC,
    FORMAT_VERSION,
    MODEL_BASE,
    MODEL_FILE,
    OPTIMIZER_BASE,
    TOKENIZER_FILE,
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
from .checkpoint_store import MANIFEST_FILE, is_complete, replace_directory, resolve
from .optimizer_state import check_optimizer_meta, flatten_optimizer, restore_optimizer
from .shards import (
    DEFAULT_MAX_SHARD_SIZE,
    ShardError,
    TensorInfo,
    index_name,
    read_headers,
    write_shards,
)

# ----------------------------------------------------------------------------- migrations


def _migrate_v0(cfg: dict[str, Any]) -> dict[str, Any]:
    """v0 (pre-release layout): keys "model"/"train", tokenizer always tokenizer.json."""
    cfg = dict(cfg)
    cfg["model_config"] = cfg.pop("model", None)
    cfg["train_config"] = cfg.pop("train", None)
    cfg.setdefault("tokenizer_file", TOKENIZER_FILE)
    cfg.setdefault("resumable", False)
    return cfg


# MIGRATIONS[v] turns a version-v config.json dict into version v + 1.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _migrate_v0}


# ----------------------------------------------------------------------------- small helpers


def _unwrap(model: torch.nn.Module) -> Transformer:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(model, Transformer):
        raise CheckpointError(f"can only save a Transformer, got {type(model).__name__}")
    return model


# ----------------------------------------------------------------------------- optimizer state


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer: BpeTokenizer,
    train_config: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict[str, Any] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Atomically write a checkpoint directory at ``path`` (replacing any old one).

    With ``optimizer`` (and optionally ``trainer_state``, a JSON-serializable dict such as
    step, RNG states as lists of ints, data position) the checkpoint is resumable.
    Weights and optimizer state are split into shards above ``max_shard_size`` (bytes or
    a size such as "5GB"). Returns the checkpoint path.
    """
    model = _unwrap(model)
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise CheckpointError(f"max_shard_size: {e}", field="max_shard_size") from None
    if model.config.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(
            f"model vocab_size {model.config.vocab_size} != tokenizer vocab_size "
            f"{tokenizer.vocab_size}"
        )
    if trainer_state is not None and optimizer is None:
        raise CheckpointError("trainer_state needs the optimizer too (resumable checkpoint)")

    def fill(tmp: Path) -> None:
        _write_contents(tmp, model, tokenizer, train_config, optimizer, trainer_state,
                        shard_bytes)  # fmt: skip

    try:
        return replace_directory(Path(path), fill, is_checkpoint_file)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: cannot write the checkpoint ({e})") from None
    except OSError as e:  # disk full, permissions, ...
        raise CheckpointError(f"{path}: cannot write the checkpoint ({os_reason(e)})") from None


def _write_contents(tmp, model, tokenizer, train_config, optimizer, trainer_state,
                    shard_bytes: int) -> None:  # fmt: skip
    files = [CONFIG_FILE, TOKENIZER_FILE]  # the JSON files, fsynced below
    tensor_files: list[str] = []  # write_shards fsyncs its own files
    config = {
        "format": FORMAT_MAGIC,
        "format_version": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "train_config": train_config,
        "tokenizer_file": TOKENIZER_FILE,
        "resumable": optimizer is not None,
    }
    write_json(tmp / CONFIG_FILE, config)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensor_files += write_shards(tmp, weights, shard_bytes, MODEL_BASE, {"format": FORMAT_MAGIC})
    tokenizer.save(tmp / TOKENIZER_FILE)
    if optimizer is not None:
        try:
            tensors, meta = flatten_optimizer(optimizer, model)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        tensor_files += write_shards(tmp, tensors, shard_bytes, OPTIMIZER_BASE,
                                     {"format": FORMAT_MAGIC})  # fmt: skip
        write_json(
            tmp / TRAINER_STATE_FILE, {"trainer_state": trainer_state or {}, "optimizer": meta}
        )
        files.append(TRAINER_STATE_FILE)
    manifest = {
        "format": FORMAT_MAGIC,
        "files": {
            name: {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
            for name in files + tensor_files
        },
    }
    write_json(tmp / MANIFEST_FILE, manifest)
    for name in [*files, MANIFEST_FILE]:
        fsync_file(tmp / name)
    fsync_dir(tmp)


# ----------------------------------------------------------------------------- load


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``trainer_state`` is None unless the checkpoint is resumable."""

    path: Path
    model: Transformer
    tokenizer: BpeTokenizer
    model_config: ModelConfig
    train_config: dict[str, Any] | None
    trainer_state: dict[str, Any] | None
    format_version: int
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def resumable(self) -> bool:
        return self.trainer_state is not None

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Load the saved optimizer state into ``optimizer`` (built over ``self.model``'s
        parameters, same parameter groups); raises CheckpointError on any mismatch."""
        if not self.resumable:
            raise CheckpointError(f"{self.path}: not a resumable checkpoint (no optimizer state)")
        files = tensor_set(self.path, OPTIMIZER_BASE, self.manifest)
        opt_path = self.path / files[0]  # the one file, or the index of the shards
        state_path = self.path / TRAINER_STATE_FILE
        try:
            meta = check_optimizer_meta(read_json(state_path))
        except ValueError as e:
            raise CheckpointError(f"{state_path}: {e}") from None
        for name in files:
            verify_file(self.path, name, self.manifest)
        if meta["class"] != type(optimizer).__name__:
            raise CheckpointError(
                f"{opt_path}: saved for {meta['class']}, not {type(optimizer).__name__}"
            )
        tensors = read_set(self.path, OPTIMIZER_BASE)
        try:
            restore_optimizer(optimizer, self.model, meta, tensors)
        except ValueError as e:
            raise CheckpointError(f"{opt_path}: {e}") from None


def _resolve(path: Path) -> Path:
    """The checkpoint to read: ``path``, or its fallback copy left by an interrupted save."""
    root = resolve(path)
    if root is None:
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    return root


def _read_config(root: Path) -> dict[str, Any]:
    path = root / CONFIG_FILE
    cfg = read_json(path)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT_MAGIC:
        raise CheckpointError(f"{path}: not a {FORMAT_MAGIC} config (wrong format magic)")
    version = cfg.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise CheckpointError(f"{path}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version} is newer than this tritonlm supports "
            f"({FORMAT_VERSION}); upgrade tritonlm to load it"
        )
    while version < FORMAT_VERSION:
        cfg = MIGRATIONS[version](cfg)
        version += 1
    cfg["format_version"] = version
    if not isinstance(cfg.get("model_config"), dict):
        raise CheckpointError(f"{path}: model_config is missing")
    missing = [
        f.name
        for f in dataclasses.fields(ModelConfig)
        if f.name not in cfg["model_config"] and f.name not in ModelConfig.added_later
    ]
    if missing:  # a default would silently build another model
        raise CheckpointError(f"{path}: model_config does not state {', '.join(missing)}")
    name = cfg.get("tokenizer_file")
    if not isinstance(name, str) or "/" in name or "\\" in name:
        raise CheckpointError(f"{path}: bad tokenizer_file {name!r}")
    return cfg


def _check_header(cfg: ModelConfig, root: Path, files: list[str]) -> dict[str, TensorInfo]:
    """Compare the safetensors headers with the shapes ``cfg`` implies, before anything is
    allocated (the expected shapes come from a model built on the ``meta`` device, once
    the headers' block count bounds how big that build can be). Returns the headers."""
    path = root / files[0]  # the one file, or the index of the shards
    try:
        headers = read_headers(root, MODEL_BASE)
    except ShardError as e:
        raise CheckpointError(str(e)) from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors ({e})") from None
    found = {k: info.shape for k, info in headers.items()}
    if "tok_emb.weight" not in found:
        raise CheckpointError(f"{path}: not a tritonlm model file (no tok_emb.weight; found "
                              f"{sorted(found)[:3]})")  # fmt: skip
    blocks = {k.split(".")[1] for k in found if k.startswith("blocks.") and k.count(".") > 1}
    if len(blocks) != cfg.n_layers:
        raise CheckpointError(f"{path}: holds {len(blocks)} blocks, config.json says n_layers "
                              f"{cfg.n_layers} (missing or extra blocks)")  # fmt: skip
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise CheckpointError(f"{path}: model_config describes no buildable model ({e})") from None
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        what = "not a tritonlm model file" if len(missing) == len(expected) else "names differ"
        raise CheckpointError(
            f"{path}: {what}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, shape in expected.items():
        if found[name] != shape:
            raise CheckpointError(f"{root / headers[name].file}: tensor {name} has shape "
                                  f"{list(found[name])}, model expects {list(shape)}")  # fmt: skip
    return headers


def _load_weights(model: Transformer, root: Path, headers: dict[str, TensorInfo]) -> None:
    tensors = read_set(root, MODEL_BASE)
    for name, t in tensors.items():
        path = root / headers[name].file if name in headers else root  # the shard holding it
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name} has non-float dtype {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values")
    model.load_state_dict(tensors, strict=True)


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", backend: str = "auto"
) -> Checkpoint:
    """Verify and load a checkpoint directory (see the module docstring for the order).

    The model comes back in eval mode on ``device`` with float32 weights (as saved).
    For a resumable checkpoint call ``ckpt.load_optimizer_state(optimizer)`` after building
    the optimizer over ``ckpt.model``'s parameters. A save running at the same time (a
    training run writing the checkpoint a chat is loading) may swap the directory away
    mid-read: then the load starts again on whichever copy is complete now.
    """
    for _ in range(4):
        root = _resolve(Path(path))
        complete = is_complete(root)
        try:
            return _load_from(root, device, backend)
        except CheckpointError:
            if not complete or is_complete(root):  # not swapped away: the content is bad
                raise
    raise CheckpointError(f"{path}: the checkpoint kept changing while it was read")


def _load_from(root: Path, device, backend: str) -> Checkpoint:
    manifest = read_manifest(root)
    listed = manifest["files"]
    if CONFIG_FILE not in listed:
        raise CheckpointError(f"{root / MANIFEST_FILE}: does not list {CONFIG_FILE}")
    if ADAPTER_FILE in listed or index_name(ADAPTER_BASE) in listed:
        raise CheckpointError(f"{root}: a LoRA adapter checkpoint (base + adapters); load it "
                              "with tritonlm.engine.lora.load_model")  # fmt: skip
    if MODEL_FILE not in listed and index_name(MODEL_BASE) not in listed:
        raise CheckpointError(f"{root / MANIFEST_FILE}: does not list {MODEL_FILE} "
                              f"(nor {index_name(MODEL_BASE)})")  # fmt: skip
    for name in listed:
        # The optimizer state (twice the weights) is hashed only when it is used, by
        # load_optimizer_state; a chat session never pays for it. Its size is still checked.
        verify_file(root, name, manifest, digest=not is_optimizer_shard(name))
    model_files = tensor_set(root, MODEL_BASE, manifest)
    cfg = _read_config(root)

    tok_path = root / cfg["tokenizer_file"]
    if cfg["tokenizer_file"] not in manifest["files"]:
        raise CheckpointError(f"{root / MANIFEST_FILE}: does not list {cfg['tokenizer_file']}")
    try:
        tokenizer = BpeTokenizer.load(tok_path)
    except (TokenizerError, OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{tok_path}: cannot load tokenizer ({e})") from None

    model_dict = dict(cfg["model_config"])
    if model_dict.get("vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
        raise CheckpointError(
            f"{root / CONFIG_FILE}: model vocab_size {model_dict['vocab_size']} does not match "
            f"the tokenizer's {tokenizer.vocab_size}"
        )
    model_dict["vocab_size"] = tokenizer.vocab_size
    try:
        model_config = ModelConfig.from_dict(model_dict)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{root / CONFIG_FILE}: bad model_config ({e})") from None

    headers = _check_header(model_config, root, model_files)
    reason = too_big(build_bytes(model_config), torch.device("cpu"))
    if reason:
        raise CheckpointError(f"{root / CONFIG_FILE}: building this model {reason}")
    model = Transformer(model_config, backend=backend)
    _load_weights(model, root, headers)
    model.to(device).eval()

    trainer_state = None
    if cfg.get("resumable"):
        if TRAINER_STATE_FILE not in listed:
            raise CheckpointError(
                f"{root / MANIFEST_FILE}: resumable but {TRAINER_STATE_FILE} not listed"
            )
        tensor_set(root, OPTIMIZER_BASE, manifest)  # every optimizer file is listed
        state = read_json(root / TRAINER_STATE_FILE)
        if not isinstance(state, dict) or not isinstance(state.get("optimizer"), dict):
            raise CheckpointError(f"{root / TRAINER_STATE_FILE}: malformed trainer state")
        trainer_state = state.get("trainer_state") or {}

    return Checkpoint(
        path=root,
        model=model,
        tokenizer=tokenizer,
        model_config=model_config,
        train_config=cfg.get("train_config"),
        trainer_state=trainer_state,
        format_version=cfg["format_version"],
        manifest=manifest,
    )
