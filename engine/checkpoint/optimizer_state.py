"""The optimizer's state in a checkpoint: tensors by parameter name, the rest as JSON.

    optimizer.safetensors   "state.<param name>.<key>" (exp_avg, exp_avg_sq, step)
    trainer_state.json      "optimizer": {"class", "param_groups" (params by name),
                                          "scalars": {param name: {key: value}}}

Names instead of positions make the files readable and let a load check that every
tensor belongs to a parameter of this model, with its shape, before torch sees it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..model.transformer import Transformer


def _optimizer_names(optimizer: torch.optim.Optimizer, model: Transformer) -> list[str]:
    """Parameter names in the optimizer's own order (the order of its state_dict ids)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError("optimizer holds a tensor that is not a model parameter")
            names.append(by_id[id(p)])
    return names


def flatten_optimizer(optimizer, model) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for safetensors, JSON-able metadata) of an optimizer over ``model``."""
    names = _optimizer_names(optimizer, model)
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{names[index]}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(names[index], {})[key] = value
    groups = []
    for group in sd["param_groups"]:
        g = {k: v for k, v in group.items() if k != "params"}
        for k, v in g.items():
            if isinstance(v, torch.Tensor):
                g[k] = v.item() if v.numel() == 1 else v.tolist()
            elif isinstance(v, tuple):
                g[k] = list(v)
        g["params"] = [names[i] for i in group["params"]]
        groups.append(g)
    meta = {"class": type(optimizer).__name__, "param_groups": groups, "scalars": scalars}
    return tensors, meta


TUNABLE = ("lr", "betas", "eps", "weight_decay", "initial_lr")  # numbers a group may change


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_optimizer_meta(state: Any) -> dict[str, Any]:
    """The "optimizer" object of trainer_state.json, field by field (ValueError)."""
    meta = state.get("optimizer") if isinstance(state, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("'optimizer' must be an object")
    if not isinstance(meta.get("class"), str):
        raise ValueError("optimizer 'class' must be a string")
    groups = meta.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ValueError("optimizer 'param_groups' must be a list of objects")
    for i, g in enumerate(groups):
        params = g.get("params")
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise ValueError(f"optimizer param_groups[{i}] 'params' must be a list of names")
        for key in ("lr", "weight_decay", "eps"):
            if key in g and not _number(g[key]):
                raise ValueError(f"optimizer param_groups[{i}] {key!r} must be a finite number")
        if "initial_lr" in g and not _number(g["initial_lr"]):
            raise ValueError(f"optimizer param_groups[{i}] 'initial_lr' must be a number")
        betas = g.get("betas", [0.9, 0.999])
        if not (isinstance(betas, list) and len(betas) == 2 and all(map(_number, betas))):
            raise ValueError(f"optimizer param_groups[{i}] 'betas' must be two numbers")
    scalars = meta.get("scalars")
    if not isinstance(scalars, dict) or not all(isinstance(v, dict) for v in scalars.values()):
        raise ValueError("optimizer 'scalars' must be an object of objects")
    return meta


def restore_optimizer(optimizer, model: Transformer, meta: dict, tensors: dict) -> None:
    """Load checked state into ``optimizer`` (built over ``model``, same groups); every
    tensor must belong to a parameter and have its shape. ValueError on any mismatch."""
    if meta["class"] != type(optimizer).__name__:
        raise ValueError(f"saved for {meta['class']}, not {type(optimizer).__name__}")
    names = _optimizer_names(optimizer, model)
    saved_names = [n for g in meta["param_groups"] for n in g["params"]]
    if names != saved_names or len(meta["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"parameter groups differ from the optimizer's ({len(saved_names)} saved "
            f"parameters, {len(names)} in the optimizer)"
        )
    index = {n: i for i, n in enumerate(names)}
    params = dict(model.named_parameters())
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pname, _, skey = key[len("state.") :].rpartition(".")
        if not key.startswith("state.") or pname not in index:
            raise ValueError(f"unexpected tensor {key!r}")
        want = () if skey == "step" else tuple(params[pname].shape)
        if tuple(value.shape) != want or not value.is_floating_point():
            raise ValueError(f"tensor {key} has shape {list(value.shape)} ({value.dtype}), "
                             f"expected {list(want)} (float)")  # fmt: skip
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"tensor {key} holds NaN or infinite values")
        state.setdefault(index[pname], {})[skey] = value
    for pname, values in meta["scalars"].items():
        if pname not in index:
            raise ValueError(f"scalars for unknown parameter {pname!r}")
        state.setdefault(index[pname], {}).update(values)
    groups, start = [], 0
    for i, (g, own) in enumerate(zip(meta["param_groups"], optimizer.param_groups, strict=True)):
        # Hyper-parameters come from the file; switches (amsgrad, fused, foreach, ...) must
        # be the ones this optimizer was built with: a saved null or "x" never reaches it.
        for key, value in own.items():
            if key in ("params", *TUNABLE):
                continue
            if g.get(key, value) != value or type(g.get(key, value)) is not type(value):
                raise ValueError(f"param_groups[{i}] {key!r} is {g.get(key)!r}, this optimizer "
                                 f"uses {value!r}")  # fmt: skip
        unknown = sorted(set(g) - set(own))
        if unknown:
            raise ValueError(f"param_groups[{i}] has unknown keys {unknown}")
        n = len(g["params"])
        groups.append({**own, **{k: g[k] for k in TUNABLE if k in g},
                       "params": list(range(start, start + n))})  # fmt: skip
        start += n
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, RuntimeError, TypeError) as e:
        raise ValueError(f"cannot load optimizer state ({e})") from None
