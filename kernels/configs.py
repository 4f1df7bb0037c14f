"""Launch configs per (arch, op, dtype, shape class), read by the launchers from one table.

Why a table: the right rows-per-program or warp count depends on the GPU and the shape,
and the only trustworthy way to pick it is to measure (``benchmarks/autotune_kernels.py``
does, on a GPU, and writes a new table). At run time the launchers only look the config
up: no timing, no first-call search, so two runs of the same shapes launch the same
programs and sum in the same order (deterministic results).

The table (``kernel_configs.json`` next to this file) maps::

    {"arch": {"op": {"dtype": {"shape class": {"param": value, ...}}}}}

arch is ``launch.arch(device)`` ("sm90", "sm80", "cpu"). A lookup starts from the op's
:data:`DEFAULTS`, then applies the "default" arch's entries, then the device arch's; at
each level the "any" dtype and "any" shape class first, the exact ones last.

Ops and their parameters:

- ``rmsnorm_fwd``: block_m (rows per program), num_warps
- ``rmsnorm_bwd``: block_m (rows per tile), num_warps, programs_per_sm (persistent grid)
- ``cross_entropy``: block_v (vocabulary columns per step), num_warps
- ``linear_cross_entropy``: chunk_elements (logits one chunk may hold), min_chunk_rows
- ``attention_fwd``, ``attention_fwd_docs``, ``attention_dkdv``, ``attention_dkdv_gqa``,
  ``attention_dq``: block_m (query rows), block_n (key rows), num_warps, num_stages;
  shape class ``d{BLOCK_D}`` (read through :func:`.attention_configs.attention_config`)

Every config in the table and in :data:`SWEEP_SPACE` must compile for sm_80 and sm_90
without register spills: ``tests/test_kernel_build.py`` builds them all.
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path
from typing import Any

import torch

from .launch import triton_type

TABLE_PATH = Path(__file__).with_name("kernel_configs.json")

DEFAULTS: dict[str, dict[str, int]] = {
    "rmsnorm_fwd": {"block_m": 1, "num_warps": 4},
    "rmsnorm_bwd": {"block_m": 1, "num_warps": 4, "programs_per_sm": 4},
    "cross_entropy": {"block_v": 4096, "num_warps": 8},
    "linear_cross_entropy": {"chunk_elements": 2**27, "min_chunk_rows": 1},
    "attention_fwd": {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3},
    "attention_fwd_docs": {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
    "attention_dkdv": {"block_m": 32, "block_n": 128, "num_warps": 8, "num_stages": 3},
    "attention_dkdv_gqa": {"block_m": 32, "block_n": 128, "num_warps": 8, "num_stages": 3},
    "attention_dq": {"block_m": 128, "block_n": 32, "num_warps": 8, "num_stages": 3},
}

# Largest tile (rows x columns) one RMSNorm program holds in registers: 8192 fp32 values
# spread over 4-16 warps stays well under 255 registers per thread.
MAX_TILE = 8192

_ATTENTION_BWD_LAUNCH = {"num_warps": (4, 8), "num_stages": (2, 3)}

# What the autotune sweep tries (per arch, dtype and shape class); each point must also
# satisfy :func:`valid`.
SWEEP_SPACE: dict[str, dict[str, tuple[int, ...]]] = {
    "rmsnorm_fwd": {"block_m": (1, 2, 4, 8), "num_warps": (4, 8, 16)},
    "rmsnorm_bwd": {"block_m": (1, 2, 4), "num_warps": (4, 8, 16), "programs_per_sm": (2, 4, 8)},
    "cross_entropy": {"block_v": (2048, 4096, 8192), "num_warps": (4, 8, 16)},
    "linear_cross_entropy": {"chunk_elements": (2**25, 2**26, 2**27), "min_chunk_rows": (1,)},
    # attention (fp16/bf16): Triton's fused-attention tutorial space for the forward; the
    # backward kernels hold a long block (keys for dk/dv, queries for dq) and step through
    # short ones, as the tutorial's backward does. Every point is a kernel build, so the
    # space is kept to what the build gate can compile in CI (about 100 builds)
    "attention_fwd": {
        "block_m": (64, 128),
        "block_n": (32, 64, 128),
        "num_warps": (4, 8),
        "num_stages": (3, 4),
    },
    "attention_fwd_docs": {
        "block_m": (64, 128),
        "block_n": (32, 64),
        "num_warps": (4, 8),
        "num_stages": (3,),
    },
    "attention_dkdv": {"block_m": (16, 32, 64), "block_n": (64, 128), **_ATTENTION_BWD_LAUNCH},
    "attention_dq": {"block_m": (64, 128), "block_n": (16, 32, 64), **_ATTENTION_BWD_LAUNCH},
}

# Shared memory a block may use: sm_90's 227 KiB (sm_80 has 163 KiB; a config over it
# fails at launch there and the autotune sweep drops it).
MAX_SHARED = 232_448


def rmsnorm_class(block_n: int, one_pass: bool) -> str:
    """Shape class of a hidden size, from the column block the launcher uses:
    (1024, True) -> "n1024"; a row wider than one block -> "loop"."""
    return f"n{block_n}" if one_pass else "loop"


def cross_entropy_class(vocab: int) -> str:
    """Vocabularies up to 4096 fit one block ("small"); larger ones stream ("large")."""
    return "small" if vocab <= 4096 else "large"


def valid(op: str, cfg: dict[str, int], width: int = 0) -> bool:
    """Whether a config is allowed at tile width `width`: RMSNorm's column block (below),
    attention's head-dim tile (:func:`attention_fits`). RMSNorm: the
    tile fits :data:`MAX_TILE`, and beyond 4 warps every thread holds at least 8 elements
    (one 16-byte load of bf16; more warps would only idle). The backward keeps three
    tiles live, so it allows at most 32 elements per thread (the sm_80/sm_90 builds of
    64 spill registers).

    Example: rmsnorm_fwd {"block_m": 2, "num_warps": 8} at width 1024 -> True (2048
    elements, 8 per thread); {"block_m": 1, "num_warps": 8} -> False (4 per thread).
    """
    if op.startswith("rmsnorm"):
        tile, threads = cfg["block_m"] * width, 32 * cfg["num_warps"]
        if op == "rmsnorm_bwd" and tile > 32 * threads:
            return False  # x, dy and the dw accumulator: > 32 each per thread spills
        return tile <= MAX_TILE and (cfg["num_warps"] <= 4 or tile >= 8 * threads)
    if op == "cross_entropy":
        return cfg["num_warps"] <= 4 or cfg["block_v"] >= 8 * 32 * cfg["num_warps"]
    if op.startswith("attention"):
        return attention_fits(op, cfg, width)
    return True


def attention_fits(op: str, cfg: dict[str, int], block_d: int) -> bool:
    """Whether attention tiles stay in registers and shared memory at head-dim tile
    `block_d` (fp16/bf16). Register load = fp32 values per thread of the tiles a step keeps
    live: forward S [m, n] and the accumulator [m, d]; dk/dv its two accumulators [n, d]
    and S/dS [n, m]; dq its accumulator [m, d] and S/dS [m, n]. Fitted to sm_90 builds of
    432 configs at d 32/64/128 (stages 2-4): every load <= 128 built without spills
    except 4 warps at d 128 (one spilled at 128), hence <= 96 there, and dq at 128 with
    4 stages (16 bytes; the backward space stops at 3). Shared memory: the forward's
    pipelined K and V tiles num_stages deep plus Q (exact for the builds); for the
    backward a lower bound, the build gate checks the real figure.

    Example: attention_fwd {"block_m": 128, "block_n": 64, "num_warps": 8,
    "num_stages": 3} at d 128 -> True (load 96); with 4 warps -> False (load 192).
    """
    m, n, warps = cfg["block_m"], cfg["block_n"], cfg["num_warps"]
    if op.startswith("attention_fwd"):
        load, shared = m * n + m * block_d, cfg["num_stages"] * n * block_d * 4 + m * block_d * 2
    elif op.startswith("attention_dkdv"):
        load, shared = 2 * n * block_d + 2 * n * m, cfg["num_stages"] * m * block_d * 4
    else:  # attention_dq
        load, shared = m * block_d + 2 * m * n, cfg["num_stages"] * n * block_d * 4
    limit = 96 if warps == 4 and block_d >= 128 else 128
    return load / (32 * warps) <= limit and shared <= MAX_SHARED


def sweep(op: str, width: int = 0) -> list[dict[str, int]]:
    """Every valid point of the sweep space of `op` at tile width `width` (RMSNorm: the
    column block; attention: the head-dim tile), in a fixed order."""
    space = SWEEP_SPACE[op]
    combos = itertools.product(*space.values())
    points = [dict(zip(space, values, strict=True)) for values in combos]
    return [p for p in points if valid(op, p, width)]


@functools.cache
def _table(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


_active_path: Path | None = None  # set by use_table; None: the shipped TABLE_PATH


def use_table(path: Path | None) -> None:
    """Make `path` the table every later lookup without an explicit path reads (None: the
    shipped one again). For a benchmark that measures, in the same process, a table it
    has just tuned (gpu_check --autotune); the launchers never call it."""
    global _active_path
    _active_path = None if path is None else Path(path)


def table_path() -> Path:
    """The table lookups read when given no path: the shipped one unless use_table."""
    return _active_path or TABLE_PATH


def table(path: Path | None = None) -> dict[str, Any]:
    """The parsed table at `path`, else the one in use (cached per path)."""
    return _table(str(path or table_path()))


def lookup(
    op: str, arch: str, dtype: torch.dtype, shape_class: str, path: Path | None = None
) -> dict[str, int]:
    """The config for one launch: DEFAULTS[op] updated by the table's most specific entry.

    Example: lookup("rmsnorm_fwd", "sm90", torch.bfloat16, "n1024") -> {"block_m": 4,
    "num_warps": 4} with the shipped table.
    """
    tab = table(path)
    cfg = dict(DEFAULTS[op])
    for arch_key in ("default", arch):  # most general first, each later level overrides
        by_dtype = tab.get(arch_key, {}).get(op, {})
        for key in ("any", triton_type(dtype)):
            classes = by_dtype.get(key, {})
            for cls in ("any", shape_class):
                cfg.update(classes.get(cls, {}))
    return cfg


def table_archs(path: Path | None = None) -> list[str]:
    """The arch keys of the table ("default" first): the archs a launch can resolve to."""
    archs = [a for a in table(path) if not a.startswith("_")]
    return sorted(archs, key=lambda a: (a != "default", a))


def table_entries(path: Path | None = None):
    """Yield (arch, op, dtype key, shape class, config) for every entry of the table, the
    config completed with DEFAULTS (what the AOT build gate compiles)."""
    for arch, ops in table(path).items():
        if arch.startswith("_"):  # "_about" and other notes
            continue
        for op, dtypes in ops.items():
            for dt, classes in dtypes.items():
                for cls, entry in classes.items():
                    yield arch, op, dt, cls, {**DEFAULTS[op], **entry}
