"""The training loop (loop.py) for pretraining and instruction tuning, its config, batches,
run directory, metrics log and torchrun context."""

from .loop import Trainer, TrainResult
from .train_config import TrainConfig, TrainingError

__all__ = ["TrainConfig", "TrainResult", "Trainer", "TrainingError"]
