"""Checkpoint directories: save and load (save_load.py), files and manifest, atomic
replacement, sharded safetensors, optimizer state."""

from .checkpoint_files import CheckpointError
from .save_load import Checkpoint, load_checkpoint, save_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]
