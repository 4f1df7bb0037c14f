"""Replacing a checkpoint directory so that some complete checkpoint always exists.

A directory is *complete* when its ``manifest.json`` exists: the manifest is written last,
inside a temporary directory that is only ever renamed into place whole. The names the
loader looks at are ``<name>`` and its fallback ``.<name>.old``.

    save:  write .<name>.tmp-XXXX (complete)        old: <name> complete?
             |  <name> complete:   drop .<name>.old; rename <name> -> .<name>.old
             |  <name> incomplete: delete it (.<name>.old, if any, is the complete copy)
           rename .<name>.tmp-XXXX -> <name>; delete .<name>.old

Invariants, at every instant (each step is one rename or one delete):
  - ``<name>`` or ``.<name>.old`` is complete once any save has finished;
  - the loader prefers a complete directory to an incomplete one, never the reverse;
  - a complete copy is deleted only while another complete copy is in place;
  - files that are not part of the checkpoint (metrics.jsonl, plots) are carried into the
    new directory from both ``<name>`` and ``.<name>.old``, so history survives.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from ..atomic import fsync_dir

MANIFEST_FILE = "manifest.json"


def rename_path(src: Path, dst: Path) -> None:
    """os.rename, behind a name tests can patch to simulate a crash."""
    os.rename(src, dst)


def fallback_of(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_FILE).is_file()


def resolve(path: Path) -> Path | None:
    """The directory to load for ``path``: itself when complete, else its complete
    fallback, else ``path`` itself when it exists (the loader then names what is wrong),
    else None."""
    if is_complete(path):
        return path
    if is_complete(fallback_of(path)):
        return fallback_of(path)
    return path if path.exists() else None


def discard(path: Path) -> None:
    """Delete a directory, manifest first: a half-deleted copy never looks complete."""
    (path / MANIFEST_FILE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


Owned = Callable[[str], bool] | frozenset  # the names a checkpoint's own files have


def _owns(checkpoint_files: Owned, name: str) -> bool:
    """Whether ``name`` is one of the checkpoint's own files: a fixed set of names, or a
    predicate where names vary (``model-00002-of-00005.safetensors``)."""
    if callable(checkpoint_files):
        return bool(checkpoint_files(name))
    return name in checkpoint_files


def carry_over_extras(sources: list[Path], new: Path, checkpoint_files: Owned) -> None:
    """Copy files that are not part of the checkpoint (metrics, plots, notes) into ``new``,
    the first source that has a name winning. Without this a run's metrics.jsonl, or
    anything a user put beside the weights, would be lost when directories are swapped;
    the checkpoint's own files (of any shard count) are never carried, or a stale shard
    would sit beside the new set."""
    for src in sources:
        if not src.is_dir():
            continue
        for entry in sorted(src.iterdir()):
            if _owns(checkpoint_files, entry.name) or (new / entry.name).exists():
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, new / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, new / entry.name, follow_symlinks=False)


def replace_directory(target: Path, fill: Callable[[Path], None], checkpoint_files: Owned,
                      ) -> Path:  # fmt: skip
    """Write a new complete directory with ``fill(tmp)`` and swap it in at ``target``.

    Errors (disk full, permissions) leave the previous state and remove the temporary
    directory; a crash leaves a stale temporary that the next save removes.
    """
    parent, aside = target.parent, fallback_of(target)
    parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target}: exists and is not a directory")
    for stale in parent.glob(f".{target.name}.tmp-*"):  # left by a crashed save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        fill(tmp)
        carry_over_extras([target, aside], tmp, checkpoint_files)
        fsync_dir(tmp)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _swap_in(tmp, target, aside)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    discard(aside)  # <name> is complete now
    fsync_dir(parent)
    return target


def _swap_in(tmp: Path, target: Path, aside: Path) -> None:
    """Rename ``tmp`` (complete) to ``target`` keeping a complete copy at every instant."""
    parent = target.parent
    if is_complete(target):
        if aside.exists():  # stale: target is the complete copy
            discard(aside)
        rename_path(target, aside)  # now aside is the complete copy
        fsync_dir(parent)
    elif target.exists():  # incomplete (a run log written before any save): not a copy
        shutil.rmtree(target)  # its extras are already in tmp
    try:
        rename_path(tmp, target)
    except Exception:
        if not target.exists() and is_complete(aside):
            try:  # put the previous checkpoint back under its own name
                rename_path(aside, target)
            except OSError:
                pass  # the loader falls back to the aside copy
        raise
    fsync_dir(parent)
