"""Tile sizes of the attention kernels, looked up in the launch-config table.

Why a table, not a formula: the best tiles depend on the GPU, the head dim and the dtype,
and only a measurement can pick them (``benchmarks/autotune_kernels.py`` sweeps
:data:`configs.SWEEP_SPACE` on a GPU and writes the entries of its arch). The launchers and
the AOT build gate both call :func:`attention_config`, so what is built is what runs.

Table ops (``kernels/kernel_configs.json``), each {block_m, block_n, num_warps, num_stages},
shape class ``d{BLOCK_D}`` (``d32``, ``d64``, ``d128``: head dim 96 runs in 128-wide tiles):

- ``attention_fwd``: query rows (block_m) x keys per step (block_n) of the forward;
- ``attention_fwd_docs``: the same on packed rows (the document mask keeps more live);
- ``attention_dkdv``: keys held (block_n) x queries per step (block_m) of dK/dV;
- ``attention_dkdv_gqa``: the same for grouped-query attention, whose loop over the query
  heads of a group keeps more registers live (reasoned tiles; the sweep does not tune it);
- ``attention_dq``: queries held (block_m) x keys per step (block_n) of dQ.

The shipped "default" entries were reasoned, not measured: in fp16/bf16 an fp32
accumulator of at most 64 values per thread (forward and dq hold [block_m, D], dk/dv two
[block_n, D]), inside the register rule of ``configs.attention_fits``; each one builds
without register spills for sm_80 and sm_90 in every variant (grouped-query dk/dv with
16-row query steps at D >= 64: 32 spilled up to 44 bytes; the packed forward at D = 32
with 32-key steps: 64 spilled 4 bytes in its grouped-query build on sm_80). fp32 inputs
use exact ("ieee") dots on CUDA cores with far more registers per tile, so 32x32 tiles
and 2 stages (some fp32 builds at D >= 64 still spill, up to ~1.6 KB on sm_90: see
benchmarks/kernel_report.py; the build gate covers fp16/bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import configs

SUPPORTED_HEAD_DIMS = (32, 64, 96, 128)

# Table ops the autotune sweep tunes (the preprocess is a plain row sum: fixed below;
# attention_dkdv_gqa keeps reasoned tiles), and the head dims it tunes them at: the "d64"
# and "d128" classes ("d32" keeps the shipped tiles).
OPS = ("attention_fwd", "attention_fwd_docs", "attention_dkdv", "attention_dq")
SWEEP_HEAD_DIMS = (64, 128)


def block_d(head_dim: int) -> int:
    """Columns of a head-dim tile: `head_dim` rounded up to a power of two (tl.arange needs
    one), so 96 runs in 128-wide tiles whose last 32 columns are masked."""
    return 1 << (head_dim - 1).bit_length()


def attention_class(head_dim: int) -> str:
    """The table's shape class of a head dim: 64 -> "d64", 96 -> "d128"."""
    return f"d{block_d(head_dim)}"


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int

    @classmethod
    def of(cls, entry: dict[str, int]) -> KernelConfig:
        """From a table entry {"block_m", "block_n", "num_warps", "num_stages"}."""
        return cls(entry["block_m"], entry["block_n"], entry["num_warps"], entry["num_stages"])


@dataclass(frozen=True)
class AttentionConfig:
    fwd: KernelConfig
    preprocess: KernelConfig  # block_n unused
    dkdv: KernelConfig
    dq: KernelConfig


# delta = rowsum(dO * O): memory-bound, one small tile shape serves every GPU
PREPROCESS = KernelConfig(64, 16, 4, 1)


def attention_config(
    head_dim: int,
    dtype: torch.dtype,
    docs: bool = False,
    arch: str = "default",
    path: Path | None = None,
    grouped: bool = False,
) -> AttentionConfig:
    """Block sizes of every attention kernel for `head_dim` and `dtype` on `arch`
    (``launch.arch(device)``); `docs` picks the packed-row forward, `grouped` the
    grouped-query dk/dv tiles. The table at `path` (default: the shipped one) is read once
    and cached."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"attention kernels support head dims {SUPPORTED_HEAD_DIMS}, got {head_dim}"
        )
    cls = attention_class(head_dim)

    def tiles(op: str) -> KernelConfig:
        return KernelConfig.of(configs.lookup(op, arch, dtype, cls, path))

    return AttentionConfig(
        fwd=tiles("attention_fwd_docs" if docs else "attention_fwd"),
        preprocess=PREPROCESS,
        dkdv=tiles("attention_dkdv_gqa" if grouped else "attention_dkdv"),
        dq=tiles("attention_dq"),
    )
