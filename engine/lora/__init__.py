"""LoRA: low-rank adapters on a frozen base (layers), their checkpoints (a reference to the
base + the adapters), and the PEFT adapter format (export and import)."""

from .adapter_checkpoint import load_model, save_adapter_checkpoint
from .layers import BaseRef, add_lora, lora_info, merge_lora
from .lora_config import LoraConfig, LoraConfigError

__all__ = [
    "BaseRef",
    "LoraConfig",
    "LoraConfigError",
    "add_lora",
    "load_model",
    "lora_info",
    "merge_lora",
    "save_adapter_checkpoint",
]
