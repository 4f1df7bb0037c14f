"""The PEFT LoRA adapter format: write ours for our HF export, read one for a Llama folder.

    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
    adapter_model.safetensors  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
                               [r, in] and ...lora_B.weight [out, r], per adapted HF module

Our fused layers map onto several HF modules (qkv -> q_proj, k_proj, v_proj; gate_up ->
gate_proj, up_proj: engine.interop.hf_config.weight_table). Their update B A shares one A,
so the export gives each HF module that A and its rows of B: exactly the same update, so
``peft.PeftModel.from_pretrained`` on our HF export of the base computes our model. The
other way, a PEFT adapter's modules have their own A and B; the import adds each module's
update scale * B A to its rows of our weight (a merged model: one HF module's update is
not one of our fused layer's low-rank updates).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import fsync_dir, fsync_file
from ..interop.hf_config import weight_table
from ..interop.hf_format import HFFormatError
from ..model.transformer import Transformer
from .layers import lora_info, lora_layers

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's names: the wrapper, then the HF model's own names
HF_MODULES = {"qkv": ("q_proj", "k_proj", "v_proj"), "proj": ("o_proj",),
              "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}  # fmt: skip


class PeftFormatError(HFFormatError):
    """A PEFT adapter we cannot write or read; the message names the file or field."""


def _slices(model: Transformer) -> dict[str, Any]:
    """HF module name (model.layers.0.self_attn.q_proj) -> its Slice of our weights."""
    return {s.hf.removesuffix(".weight"): s for s in weight_table(model.config)
            if s.hf.endswith("_proj.weight")}  # fmt: skip


# ----------------------------------------------------------------------------- export


def export_peft(model: torch.nn.Module, out: str | os.PathLike,
                base_name_or_path: str | None = None) -> list[str]:  # fmt: skip
    """Write the adapters of ``model`` (unmerged) as a PEFT LoRA folder; returns the files."""
    info = lora_info(model)
    if info is None:
        raise PeftFormatError("the checkpoint has no LoRA adapters (not an adapter checkpoint)")
    cfg, _ = info
    model = getattr(model, "_orig_mod", model)
    out = Path(out)
    if out.exists() and (
        not out.is_dir() or any(p.name not in (CONFIG_NAME, WEIGHTS_NAME) for p in out.iterdir())
    ):
        raise PeftFormatError(f"{out}: exists and is not an empty folder or an adapter folder")
    slices = _slices(model)
    tensors = {}
    for name, layer in lora_layers(model).items():
        # blocks.3.attn.qkv -> model.layers.3.self_attn.{q,k,v}_proj, each with its B rows
        i, kind = name.split(".")[1], name.rsplit(".", 1)[1]
        group = "self_attn" if kind in ("qkv", "proj") else "mlp"
        for hf in HF_MODULES[kind]:
            s = slices[f"model.layers.{i}.{group}.{hf}"]
            b = layer.lora_B.detach().float()
            stop = s.stop if s.stop is not None else b.shape[0]
            key = f"{PREFIX}model.layers.{i}.{group}.{hf}"
            tensors[f"{key}.lora_A.weight"] = layer.lora_A.detach().float().cpu().clone()
            tensors[f"{key}.lora_B.weight"] = b[s.start : stop].cpu().contiguous()
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": alpha,
        "lora_dropout": cfg.dropout, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "inference_mode": True, "init_lora_weights": True, "base_model_name_or_path":
        base_name_or_path, "target_modules": sorted(m for t in cfg.targets for m in HF_MODULES[t]),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        fsync_file(out / name)
    fsync_dir(out)
    return [CONFIG_NAME, WEIGHTS_NAME]


# ----------------------------------------------------------------------------- import


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise PeftFormatError(f"{path}: file is missing (not a PEFT adapter folder)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise PeftFormatError(f"{path}: malformed JSON ({type(e).__name__})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise PeftFormatError(f"{path}: peft_type is {cfg.get('peft_type')!r}, only LORA is "
                              "supported")  # fmt: skip
    refuse = {"use_dora": "DoRA adapters", "fan_in_fan_out": "fan_in_fan_out layers",
              "modules_to_save": "fully trained extra modules (modules_to_save)",
              "alpha_pattern": "per-module alphas (alpha_pattern)",
              "rank_pattern": "per-module ranks (rank_pattern)"}  # fmt: skip
    for key, what in refuse.items():
        if cfg.get(key):
            raise PeftFormatError(f"{path}: {key} is set: {what} are not supported")
    if cfg.get("bias", "none") != "none":
        raise PeftFormatError(f"{path}: bias is {cfg['bias']!r}: adapter biases are not supported")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
            raise PeftFormatError(f"{path}: {key} must be a positive number, got {v!r}")
    return cfg


def merge_peft(model: Transformer, folder: str | os.PathLike) -> int:
    """Add the PEFT LoRA adapter in ``folder`` to ``model``'s weights (in place, float32);
    returns how many HF modules it adapted. PeftFormatError names what is unsupported."""
    folder = Path(folder)
    cfg = _read_config(folder)
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise PeftFormatError(f"{path}: file is missing (adapter.bin pickles are not read)")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise PeftFormatError(f"{path}: unreadable safetensors ({e})") from None
    slices = _slices(model)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, dot, part = key.removeprefix(PREFIX).rpartition(".lora_")
        if not dot or part not in ("A.weight", "B.weight") or name not in slices:
            raise PeftFormatError(f"{path}: tensor {key} is not a LoRA matrix of a "
                                  "Llama projection we have")  # fmt: skip
        modules.setdefault(name, {})[part[0]] = t
    params = dict(model.named_parameters())
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    for name, ab in sorted(modules.items()):
        if set(ab) != {"A", "B"}:
            raise PeftFormatError(f"{path}: {name} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"].double(), ab["B"].double()
        s = slices[name]
        weight = params[s.ours]
        stop = s.stop if s.stop is not None else weight.shape[0]
        if a.shape != (r, weight.shape[1]) or b.shape != (stop - s.start, r):
            raise PeftFormatError(
                f"{path}: {name} has A {list(a.shape)} and B {list(b.shape)}, "
                f"not [{r}, {weight.shape[1]}] and [{stop - s.start}, {r}]"
            )
        with torch.no_grad():
            weight[s.start : stop] += (scale * (b @ a)).to(weight.dtype)
    return len(modules)


def import_hf_with_adapter(folder: str | os.PathLike, adapter: str | os.PathLike,
                           out: str | os.PathLike, force: bool = False):  # fmt: skip
    """llm-import HF_DIR OUT --adapter PEFT_DIR: the Llama folder with the adapter merged
    in, saved as our checkpoint ``out`` (an existing one replaced only with ``force``).
    Returns the ImportedModel."""
    from ..checkpoint.save_load import save_checkpoint
    from ..interop.hf_import import check_import_target, load_hf

    check_import_target(Path(out), Path(folder), force)
    imported = load_hf(folder, backend="torch")
    n = merge_peft(imported.model, adapter)
    imported.notes.append(f"merged the PEFT LoRA adapter {adapter} ({n} modules)")
    source = {"imported_from": str(Path(folder).resolve()),
              "adapter": str(Path(adapter).resolve()), "notes": imported.notes}  # fmt: skip
    save_checkpoint(out, imported.model, imported.tokenizer, train_config=source)
    return imported
