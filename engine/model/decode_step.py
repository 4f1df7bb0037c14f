"""One decode step with fixed shapes: one new token per row, every row at its own slot.

Why: the eager ``forward_cached`` path builds slices, masks and cache views whose shapes
change with the position (a Python int), so nothing can be compiled or captured once and
reused. Here the position is a tensor and the shapes depend only on the number of rows and
the key window, so the same step serves:

- ``generate``: rows share a slot and differ by their left padding (``pad``);
- the server's scheduler: rows at their own lengths, no padding;
- a compiled step (``torch.compile``) or a CUDA-graph replay (:mod:`.cuda_graphs`).

Row b writes its token's key/value at slot ``slots[b]`` of its cache row, sits at RoPE
position ``slots[b] - pad[b]`` and attends to slots ``pad[b] .. slots[b]``. Keys beyond the
``window`` first slots are never read: the eager step passes the smallest window that
holds every row (the fewest keys), the compiled and captured ones the whole cache (one
shape for the whole run). Greedy tokens are the eager path's: masked keys add exact zeros.

    >>> step = DecodeStep(model, cache)                                   # doctest: +SKIP
    >>> logits = step(tokens, slots, pad, window=int(slots.max()) + 1)    # [B, V]
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from tritonlm.kernels import dispatch

from .kv_cache import KVCache
from .row_products import compiling_on_cpu, linear_rows
from .transformer import apply_rope

__all__ = ["DECODE_MODES", "DecodeStep", "decode_logits", "next_bucket", "one_query_attention"]

DECODE_MODES = ("eager", "compile")

# For a compiled step on the CPU. Inductor recomputes a value inline in every loop that
# reads it unless its formula is long (default: more than 30 ops); inside a one-row
# product's loop over a weight matrix, that meant the RMSNorm (and residual adds) redone
# for every output row. At 8 the normed row is stored once and read back: `small` int8
# steps took half the time (benchmarks/RESULTS.md, "Decode step").
INDUCTOR_OPTIONS = {"realize_opcount_threshold": 8}


def next_bucket(n: int, limit: int) -> int:
    """The batch bucket for ``n`` live rows: the next power of two, capped at ``limit``.

    >>> [next_bucket(n, 16) for n in (1, 2, 3, 5, 9, 16)]
    [1, 2, 4, 8, 16, 16]
    """
    if not 0 < n <= limit:
        raise ValueError(f"need 1..{limit} rows, got {n}")
    return min(limit, 1 << (n - 1).bit_length())


def one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention of one query per row and head, q [B, H, Dh], over k/v [B, Hkv, W, Dh] where
    ``mask`` [B, 1, 1, W] is True; returns [B, H, Dh]. Query head h reads key head h // (H/Hkv).

    Eager (and under CUDA graphs): torch's fused SDPA, one op. Compiled on the CPU: the
    plain product-softmax-product, which inductor fuses with the rest of the layer into
    one loop nest, where SDPA stays an opaque call (24-32 us a layer for 192 keys of
    `small`). Best compiled `small` step, fused vs SDPA: 0.461 vs 0.454 ms in int8, 1.06
    vs 1.21 ms in float32 (benchmarks/RESULTS.md, "Decode step").
    """
    B, H, Dh = q.shape
    Hkv = k.shape[1]
    if not compiling_on_cpu(q):
        y = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask,
                                           enable_gqa=Hkv != H)  # fmt: skip
        return y[:, :, 0]
    q = q.view(B, Hkv, H // Hkv, Dh)  # the query heads of each key head, side by side
    scores = torch.matmul(q, k.transpose(-1, -2)) * Dh**-0.5  # [B, Hkv, H/Hkv, W]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).reshape(B, H, Dh)


def decode_logits(
    model,
    tokens: torch.Tensor,
    slots: torch.Tensor,
    pad: torch.Tensor,
    k_cache: list[torch.Tensor],
    v_cache: list[torch.Tensor],
    window: int,
) -> torch.Tensor:
    """Logits [B, V] for tokens [B] at slots [B] (left pads pad [B]); writes the caches.

    ``k_cache[l]`` / ``v_cache[l]`` are [B, Hkv, S, Dh] (views of the first B rows of a
    preallocated cache); only their first ``window`` slots are read.
    """
    B = tokens.shape[0]
    cfg = model.config
    H, Hkv, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    positions = (slots - pad).clamp_min(0)
    cos = model.rope_cos[positions][:, None]  # [B, 1, Dh/2]: one table row per row
    sin = model.rope_sin[positions][:, None]
    keys = torch.arange(window, device=tokens.device)
    mask = (keys[None] >= pad[:, None]) & (keys[None] <= slots[:, None])
    mask = mask[:, None, None]  # [B, 1, 1, W]: this row's own, filled slots
    rows = torch.arange(B, device=tokens.device)
    backend = model.backend
    x = model.tok_emb(tokens)  # [B, d]
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        h = dispatch.rms_norm(x, block.attn_norm.weight, block.attn_norm.eps, backend)
        qk, v = linear_rows(attn.qkv, h).split(((H + Hkv) * Dh, Hkv * Dh), dim=-1)
        # one RoPE over the query and key heads together: half the small ops of two calls
        q, k = apply_rope(qk.view(B, H + Hkv, Dh), cos, sin).split((H, Hkv), dim=1)
        kc, vc = k_cache[layer], v_cache[layer]
        kc[rows, :, slots] = k.to(kc.dtype)  # the cache write: (b, :, slots[b]) per row
        vc[rows, :, slots] = v.view(B, Hkv, Dh).to(vc.dtype)
        y = one_query_attention(q.to(kc.dtype), kc[:, :, :window], vc[:, :, :window], mask)
        x = x + linear_rows(attn.proj, y.reshape(B, H * Dh).to(x.dtype))
        h = dispatch.rms_norm(x, block.ffn_norm.weight, block.ffn_norm.eps, backend)
        x = x + block.ffn(h)
    return model.project(model.norm(x))


def own_copy(fn):
    """``fn`` with a code object of its own (same body): torch.compile caches per code object."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)  # fmt: skip


class DecodeStep:
    """The decode step over the first rows of one preallocated ``cache``.

    ``mode``: "eager" (the smallest key window, run as plain PyTorch) or "compile"
    (``torch.compile`` of the whole step over the whole cache: a fixed key window; on the
    CPU its products, attention and elementwise ops fuse into a few loop nests, see
    :mod:`.row_products`; the first call compiles for its batch size, and other sizes
    recompile once with the batch dimension symbolic, torch's automatic dynamic shapes, on
    each side of ``FUSED_ROWS``, so a server whose batch varies does not compile per size).
    """

    def __init__(self, model, cache: KVCache, mode: str = "eager", compiler: str = "inductor"):
        if mode not in DECODE_MODES:
            raise ValueError(f"unknown decode mode {mode!r}; choose one of {DECODE_MODES}")
        self.model, self.cache, self.mode = model, cache, mode
        self._compiled = None
        if mode == "compile":  # compiler: torch.compile's backend ("eager" only traces)
            # No guards on the model's modules: checking them before every step cost ~0.1 ms
            # of a 1 ms step (`small`, int8). Their tensors are still inputs, read afresh
            # each call, so new weight values count; a step assumes the model's structure
            # (which modules, which shapes) stays as it was at its first call.
            # Dynamo keeps compiled graphs per code object, so the step compiles its own copy
            # of the function: without module guards, another model's step (other strides,
            # int8 layers) must never find this one's graphs.
            options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            if compiler == "inductor" and cache.k[0].device.type == "cpu":
                options.update(INDUCTOR_OPTIONS)  # measured on the CPU only
            self._compiled = torch.compile(own_copy(decode_logits), backend=compiler,
                                           options=options)  # fmt: skip

    @property
    def max_rows(self) -> int:
        return self.cache.batch_size

    def __call__(
        self, tokens: torch.Tensor, slots: torch.Tensor, pad: torch.Tensor, window: int
    ) -> torch.Tensor:
        """Logits [n, V] for tokens [n] of rows 0..n-1; ``window`` > every slot (host int)."""
        n = tokens.shape[0]
        if not 0 < n <= self.max_rows:
            raise ValueError(f"a decode step takes 1..{self.max_rows} rows, got {n}")
        if window > self.cache.max_len:
            raise ValueError(f"KV cache full: slot {window - 1} >= {self.cache.max_len}")
        if self.mode == "compile":
            window = self.cache.max_len
        k, v = self.cache.k, self.cache.v
        if n < self.max_rows:  # views of the first n rows (slicing all 2L costs ~30 us)
            k, v = [t[:n] for t in k], [t[:n] for t in v]
        fn = decode_logits if self._compiled is None else self._compiled
        return fn(self.model, tokens, slots, pad, k, v, window)
