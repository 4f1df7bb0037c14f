"""LoRA on our Transformer: adapters on the block's linear layers, frozen base, merge.

    add_lora(model, cfg, base)   replace blocks.{i}.attn.qkv / attn.proj / ffn.gate_up /
                                 ffn.down (those in cfg.targets) by LoraLinear, freeze every
                                 other parameter; B = 0, so the model's output is unchanged
    merge_lora(model)            fold scale * B @ A into each weight (in float32) and put
                                 plain nn.Linear layers back: an ordinary Transformer again

Parameter names stay those of the base (``blocks.0.attn.qkv.weight``) plus
``blocks.0.attn.qkv.lora_A`` [rank, in] and ``lora_B`` [out, rank]. A fused layer (qkv,
gate_up) has one A and one B over all its rows, so its update is one low-rank matrix; PEFT
adapts q, k and v separately, and the export (engine.lora.peft_format) splits B's rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.transformer import Transformer
from .lora_config import LoraConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_OWNER = {"qkv": "attn", "proj": "attn", "gate_up": "ffn", "down": "ffn"}


@dataclass(frozen=True)
class BaseRef:
    """The model the adapters were trained on: where it was and what its files hashed to."""

    path: str
    fingerprint: str

    def to_dict(self) -> dict:
        return {"path": self.path, "fingerprint": self.fingerprint}


class LoraLinear(nn.Module):
    """y = W x + scale * B (A dropout(x)); W frozen (possibly bfloat16), A and B trained."""

    def __init__(self, linear: nn.Linear, cfg: LoraConfig, generator: torch.Generator):
        super().__init__()
        out_features, in_features = linear.weight.shape
        dtype = _DTYPES[cfg.base_dtype]
        self.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        device = linear.weight.device
        a = torch.empty(cfg.rank, in_features)
        # nn.Linear's own initialisation for A (uniform, bound 1/sqrt(in)); B starts at 0.
        bound = 1.0 / math.sqrt(in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, cfg.rank, device=device))
        self.scale = cfg.scale
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
            y = F.linear(x, w)
        else:  # a bfloat16 base under float32 activations: compute in the base's dtype
            y = F.linear(x.to(w.dtype), w).to(x.dtype)
        return y + F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B) * self.scale

    def delta(self) -> torch.Tensor:
        """scale * B @ A in float32: what merging adds to the weight."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale


def _unwrap(model: nn.Module) -> Transformer:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(model, Transformer):
        raise TypeError(f"LoRA applies to a Transformer, got {type(model).__name__}")
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The adapted layers by module name (``blocks.0.attn.qkv``); empty without LoRA."""
    return {n: m for n, m in _unwrap(model).named_modules() if isinstance(m, LoraLinear)}


def lora_info(model: nn.Module) -> tuple[LoraConfig, BaseRef] | None:
    """(config, base) of a model with adapters, or None for a plain model."""
    return getattr(getattr(model, "_orig_mod", model), "lora", None)


def add_lora(model: Transformer, cfg: LoraConfig, base: BaseRef, seed: int = 0) -> Transformer:
    """Adapt ``model`` in place (see the module docstring); returns it. A's initial values
    come from ``seed``, so two runs with the same seed start from the same adapters."""
    model = _unwrap(model)
    if lora_info(model) is not None:
        raise ValueError("the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for block in model.blocks:
        for name in cfg.targets:
            owner = getattr(block, _OWNER[name])
            setattr(owner, name, LoraLinear(getattr(owner, name), cfg, generator))
    model.lora = (cfg, base)
    return model


def merge_lora(model: nn.Module) -> Transformer:
    """Fold the adapters into float32 weights and drop them (in place); returns the model."""
    model = _unwrap(model)
    for name, layer in lora_layers(model).items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        merged = nn.Linear(layer.weight.shape[1], layer.weight.shape[0], bias=False,
                           device=layer.weight.device)  # fmt: skip
        with torch.no_grad():
            merged.weight.copy_(layer.weight.float() + layer.delta().to(layer.weight.device))
        setattr(owner, attr, merged)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora"):
        del model.lora
    return model


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors by parameter name (``blocks.0.attn.qkv.lora_A``), on the CPU."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A.detach().cpu().contiguous()
        out[f"{name}.lora_B"] = layer.lora_B.detach().cpu().contiguous()
    return out


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved adapters into an adapted model; names and shapes must match exactly
    (ValueError naming the first difference)."""
    own = {n: p for n, p in _unwrap(model).named_parameters() if ".lora_" in n}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter names differ: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")  # fmt: skip
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(own[name].shape) or not t.is_floating_point():
            raise ValueError(f"tensor {name} has shape {list(t.shape)} ({t.dtype}), "
                             f"expected {list(own[name].shape)} (float)")  # fmt: skip
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name} holds NaN or infinite values")
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in _unwrap(model).parameters() if p.requires_grad)
