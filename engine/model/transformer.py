"""The decoder-only Transformer: a handful of small modules, each readable on one screen.

    tokens -> embedding -> n_layers x Block -> RMSNorm -> output projection -> logits
    Block:  x + drop(Attention(RMSNorm(x)))  then  x + drop(SwiGLU(RMSNorm(x)))

Attention is multi-head (grouped-query when n_kv_heads < n_heads), causal, with rotary
position embeddings (RoPE, "rotate half" layout, as in Hugging Face's Llama) and no biases
anywhere. Attention, RMSNorm and the loss go through
:mod:`tritonlm.kernels.dispatch`, so ``model.backend = "triton"`` swaps in the Triton
kernels (``"auto"`` does so for CUDA tensors).

Two ways to run the model:

- ``forward(idx, lengths=None)`` / ``loss(...)``: training and scoring. ``lengths`` marks
  the valid prefix of each row of a right-padded batch; valid positions then equal running
  each sequence alone. ``document_ids`` marks the documents of packed rows, with the same
  guarantee per document.
- ``forward_cached(idx, cache)``: generation with a :class:`KVCache`. Prefill the prompt in
  one call, then feed one token per step. Batches of prompts of different lengths are
  LEFT-padded (see :func:`left_pad`); ``cache.pad[b]`` pad slots are skipped so that each
  sequence's first real token sits at RoPE position 0 and pad keys are never attended to.
  A per-row cache (:meth:`KVCache.row_view`, the server's continuous batching) instead
  keeps every row at its own position: row b's slots 0..lengths[b]-1 hold its positions
  0..lengths[b]-1, and one decode step appends one token per row.
  This path calls ``F.scaled_dot_product_attention`` with an explicit boolean mask instead
  of the kernel seam: the Triton kernels are for training (full causal blocks), while decode
  attends one query to a growing cache, where torch's fused SDPA is the right tool.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tritonlm.kernels import dispatch
from tritonlm.kernels.attention import document_bounds

from .config import ConfigError, ModelConfig
from .kv_cache import KVCache
from .memory import cache_bytes, too_big
from .row_products import fuse_rows, linear_rows, rows_product

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- RoPE


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_len, head_dim/2] (float32, computed in float64)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x [B, H, T, D] by the angles in cos/sin [.., T, D/2].

    Computed in float32 and cast back to x's dtype.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale; the math lives in dispatch.rms_norm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.rms_norm(x, self.weight, self.eps, backend=self.backend)


class Attention(nn.Module):
    """Causal self-attention with RoPE; fused q/k/v projection, no biases.

    Grouped-query attention when n_kv_heads < n_heads: query head h reads key/value head
    h // (n_heads / n_kv_heads). The fused projection's rows are [q (n_heads heads),
    k (n_kv_heads), v (n_kv_heads)], so with n_kv_heads == n_heads it is the same
    3*d_model x d_model matrix as before the option existed.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * cfg.kv_dim, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.backend = "auto"

    def forward(self, x, cos, sin, lengths=None, mask=None, cache=None, layer=0, docs=None):
        B, T, _ = x.shape
        H, Hkv, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split((H * Dh, Hkv * Dh, Hkv * Dh), dim=-1)
        q = apply_rope(q.view(B, T, H, Dh).transpose(1, 2), cos, sin)  # [B, H, T, Dh]
        k = apply_rope(k.view(B, T, Hkv, Dh).transpose(1, 2), cos, sin)  # [B, Hkv, T, Dh]
        v = v.view(B, T, Hkv, Dh).transpose(1, 2)
        if mask is None and cache is None:  # training / scoring path: the kernel seam
            y = dispatch.attention(
                q, k, v, lengths=lengths, backend=self.backend, document_ids=docs
            )
        else:  # generation / left-padded path: explicit mask, optional cache
            if cache is not None:  # the cache may hold another dtype (e.g. under autocast)
                k, v = cache.update(layer, k, v)
            causal = mask is None and T > 1  # unmasked prefill from slot 0 (see _run_masked)
            y = F.scaled_dot_product_attention(
                q.to(k.dtype), k, v, attn_mask=mask, is_causal=causal, enable_gqa=Hkv != H
            ).to(x.dtype)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up share one fused matrix [2*d_ff, d]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear_rows(self.gate_up, x).chunk(2, dim=-1)
        return linear_rows(self.down, F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: attention then SwiGLU, each with residual dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, lengths=None, mask=None, cache=None, layer=0, docs=None):
        h = self.attn(self.attn_norm(x), cos, sin, lengths, mask, cache, layer, docs)
        x = x + self.drop(h)
        return x + self.drop(self.ffn(self.ffn_norm(x)))


# ----------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """Decoder-only LM. Parameter names (stable, used by checkpoints):

    tok_emb.weight, blocks.{i}.attn_norm.weight, blocks.{i}.attn.qkv.weight,
    blocks.{i}.attn.proj.weight, blocks.{i}.ffn_norm.weight, blocks.{i}.ffn.gate_up.weight,
    blocks.{i}.ffn.down.weight, norm.weight, and lm_head.weight only when untied.
    """

    def __init__(self, config: ModelConfig, backend: str = "auto"):
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.backend = backend
        self.int8_head = None  # an int8 output projection for inference (int8.quantize_int8)
        self.reset_parameters()

    # -- setup ---------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in dispatch.BACKENDS:
            raise ValueError(f"unknown backend {value!r}; choose one of {dispatch.BACKENDS}")
        self._backend = value
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention)):
                m.backend = value

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices, init_std/sqrt(2L) for residual outputs, 1 for norms."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "ffn.down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def _apply(self, fn, *args, **kwargs):
        """Keep the RoPE tables float32 when the model is cast (e.g. ``.to(bfloat16)``)."""
        super()._apply(fn, *args, **kwargs)
        if self.rope_cos.dtype != torch.float32:
            cos, sin = rope_tables(
                self.config.head_dim, self.config.max_seq_len, self.config.rope_theta
            )
            self.rope_cos = cos.to(self.rope_cos.device)
            self.rope_sin = sin.to(self.rope_sin.device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the weights live (every parameter is on one device)."""
        return self.tok_emb.weight.device

    @property
    def output_weight(self) -> torch.Tensor:
        """The [V, d] output projection (the embedding matrix when tied)."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] for hidden states [..., d]: the output projection, or its int8
        copy when ``quantize_int8(..., head=True)`` made one (inference only)."""
        if self.int8_head is not None:
            return self.int8_head(hidden)
        if fuse_rows(hidden):  # a compiled decode step (see row_products)
            return rows_product(hidden, self.output_weight)
        return F.linear(hidden, self.output_weight)

    # -- accounting ----------------------------------------------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters; ``exclude_embeddings`` leaves out tok_emb and an untied lm_head."""
        skip = {id(self.tok_emb.weight)}
        if self.lm_head is not None:
            skip.add(id(self.lm_head.weight))
        params = {id(p): p for p in self.parameters()}
        return sum(p.numel() for i, p in params.items() if not (exclude_embeddings and i in skip))

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token, PaLM-style: 6*N + 12*L*d*T.

        N counts every matrix a token is multiplied by: the blocks' weights plus the output
        projection (V*d, tied or not); the embedding lookup and norms are not matmuls.
        The attention term 12*L*d*T counts QK^T and AV over the full context T (the causal
        half is not subtracted, the common convention). Forward-only is a third of this.
        """
        c = self.config
        T = c.max_seq_len if seq_len is None else seq_len
        d = c.d_model  # q and o are d x d; k and v are d x kv_dim (smaller under GQA)
        n_matmul = c.n_layers * (2 * d * d + 2 * d * c.kv_dim + 3 * d * c.d_ff)
        n_matmul += c.vocab_size * c.d_model
        return 6 * n_matmul + 12 * c.n_layers * c.d_model * T

    # -- training / scoring path ---------------------------------------------------------

    def _check_idx(self, idx: torch.Tensor) -> None:
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, time], got shape {tuple(idx.shape)}")
        if idx.shape[1] == 0:
            raise ValueError("idx has no tokens")

    def hidden_states(
        self,
        idx: torch.Tensor,
        lengths: torch.Tensor | None = None,
        pad: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, d].

        ``lengths`` [B]: right padding (valid prefix per row), via the kernel seam.
        ``pad`` [B]: left padding (pad slots per row), via the masked-SDPA path of generation.
        ``document_ids`` [B, T]: packed rows (runs of equal ids are documents); attention
        stays inside each document and RoPE positions restart at 0 for each, so every
        document gets the hidden states it would get alone.
        """
        self._check_idx(idx)
        T = idx.shape[1]
        if pad is not None:
            if lengths is not None or document_ids is not None:
                raise ValueError("left padding (pad) takes neither lengths nor document_ids")
            pad = torch.as_tensor(pad, dtype=torch.long, device=idx.device)
            return self._run_masked(idx, pad, start=0, cache=None)
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        x = self.tok_emb(idx)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        if document_ids is not None:
            document_ids = torch.as_tensor(document_ids, device=idx.device)
            if document_ids.shape != idx.shape:
                raise ValueError(
                    f"document_ids shape {tuple(document_ids.shape)} != idx {tuple(idx.shape)}"
                )
            start, _ = document_bounds(document_ids)
            positions = torch.arange(T, device=idx.device) - start  # [B, T], 0 at each start
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=idx.device)
        for block in self.blocks:
            x = block(x, cos, sin, lengths=lengths, docs=document_ids)
        return self.norm(x)

    def forward(
        self,
        idx: torch.Tensor,
        lengths: torch.Tensor | None = None,
        pad: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for token ids idx [B, T] (see hidden_states for lengths, pad
        and document_ids)."""
        hidden = self.hidden_states(idx, lengths, pad, document_ids)
        return self.project(hidden)

    def loss(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over unmasked targets (scalar); `document_ids` as
        in `hidden_states` (targets are left as given).

        targets [B, T] (already shifted by the caller); entries equal to -100, where
        ``loss_mask`` is 0, or at positions >= ``lengths`` are ignored. Uses
        dispatch.linear_cross_entropy, so the Triton path never materializes all logits.
        All targets ignored -> 0.
        """
        h = self.hidden_states(idx, lengths, document_ids=document_ids)
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != idx {tuple(idx.shape)}")
        targets = targets.to(device=idx.device, dtype=torch.long)
        if loss_mask is not None or lengths is not None:  # pretraining windows need neither
            keep = torch.ones_like(targets, dtype=torch.bool)
            if loss_mask is not None:
                keep &= loss_mask.to(idx.device).bool()
            if lengths is not None:
                pos = torch.arange(idx.shape[1], device=idx.device)
                keep &= pos[None, :] < torch.as_tensor(lengths, device=idx.device)[:, None]
            targets = targets.masked_fill(~keep, IGNORE_INDEX)
        weight = self.output_weight
        if weight.dtype != h.dtype:  # e.g. bf16 hidden states under autocast
            weight = weight.to(h.dtype)
        d = h.shape[-1]
        return dispatch.linear_cross_entropy(
            h.reshape(-1, d), weight, targets.reshape(-1), IGNORE_INDEX, self.backend
        )

    # -- generation path -----------------------------------------------------------------

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        pad: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """Allocate a KVCache. Default max_len: max_seq_len + the largest pad, so every row
        can reach the full context; dtype/device default to the model's parameters."""
        device = self.device if device is None else torch.device(device)
        dtype = self.tok_emb.weight.dtype if dtype is None else dtype
        if pad is not None:
            pad = torch.as_tensor(pad, dtype=torch.long, device=device)
            if pad.shape != (batch_size,) or bool((pad < 0).any()):
                raise ValueError(f"pad must be {batch_size} non-negative ints, got {pad.tolist()}")
        if max_len is None:
            max_len = self.config.max_seq_len + (0 if pad is None else int(pad.max()))
        shape = (batch_size, self.config.n_kv_heads, max_len, self.config.head_dim)
        itemsize = torch.empty((), dtype=dtype).element_size()
        reason = too_big(cache_bytes(self.config, batch_size, max_len, itemsize), device)
        if reason:  # e.g. a huge context times the server's rows: refuse, never OOM
            raise ConfigError(f"a KV cache of {batch_size} rows x {max_len} positions {reason}")
        if pad is None:  # only now: a refused size must not allocate even its pad row
            pad = torch.zeros(batch_size, dtype=torch.long, device=device)
        L = self.config.n_layers
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(L)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(L)]
        return KVCache(k=k, v=v, pad=pad)

    @torch.no_grad()
    def forward_cached(
        self,
        idx: torch.Tensor,
        cache: KVCache,
        last_only: bool = False,
        at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append idx [B, T] at slot cache.pos, advance it, and return logits [B, T, V].

        Row b's token at slot s has RoPE position s - pad[b]; its real length (slots minus
        pads) may not exceed max_seq_len. Always runs without gradients. ``last_only``
        projects only the last position ([B, 1, V]): a prefill needs nothing else, and the
        [T, V] projection would dominate the time to first token on long prompts. ``at``
        [B] projects only position at[b] of row b ([B, 1, V]): the last real token of a
        RIGHT-padded prefill (pads after a row's prompt never affect its earlier positions).
        """
        self._check_idx(idx)
        B, T = idx.shape
        if B != cache.batch_size:
            raise ValueError(f"batch of {B} rows does not match the cache's {cache.batch_size}")
        if cache.pos + T > cache.max_len:
            raise ValueError(
                f"KV cache full: {cache.pos} + {T} new tokens > cache length {cache.max_len}"
            )
        if cache.lengths is not None and T != 1:
            raise ValueError(f"a per-row cache takes one token per row per step, got {T}")
        hidden = self._run_masked(idx, cache.pad, cache.pos, cache)
        if at is not None:
            hidden = hidden[torch.arange(B, device=idx.device), at.to(idx.device)][:, None]
        elif last_only:
            hidden = hidden[:, -1:]
        logits = self.project(hidden)
        cache.pos += T
        if cache.lengths is not None:
            cache.lengths += 1
        return logits

    def _run_masked(self, idx, pad, start: int, cache: KVCache | None) -> torch.Tensor:
        """Left-padded forward over slots start..start+T (keys from the cache when given)."""
        if cache is not None and cache.lengths is not None:
            return self._run_rows(idx, cache)
        B, T = idx.shape
        device = idx.device
        slots = torch.arange(start, start + T, device=device)  # query slots
        positions = slots[None, :] - pad[:, None]  # [B, T] RoPE positions, < 0 on pads
        min_pad, max_pad = (
            cache.pad_range if cache is not None else (int(pad.min()), int(pad.max()))
        )
        longest = start + T - 1 - min_pad
        if longest >= self.config.max_seq_len:
            raise ValueError(
                f"sequence reaches position {longest}, beyond max_seq_len {self.config.max_seq_len}"
            )
        positions = positions.clamp_min(0)
        cos = self.rope_cos[positions][:, None]  # [B, 1, T, Dh/2]
        sin = self.rope_sin[positions][:, None]
        if cache is not None and (T == 1 or start == 0) and max_pad == 0:
            # No pads: one new token sees every cached key, and a prefill from slot 0 is
            # plain causal attention, so no mask tensor is needed (Attention infers which).
            mask = None
        else:
            keys = torch.arange(start + T, device=device)  # key slots 0..start+T
            causal = keys[None, :] <= slots[:, None]  # [T, S]
            real = keys[None, :] >= pad[:, None]  # [B, S]
            # A pad query sees only itself (its output is unused) so no row is fully masked.
            mask = causal[None] & (real[:, None, :] | (keys[None, None, :] == slots[None, :, None]))
            mask = mask[:, None]  # [B, 1, T, S]
        x = self.tok_emb(idx)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask=mask, cache=cache, layer=layer)
        return self.norm(x)

    def _run_rows(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row, row b at position cache.lengths[b] (per-row cache mode)."""
        if cache.pos >= self.config.max_seq_len:
            raise ValueError(
                f"sequence reaches position {cache.pos}, beyond max_seq_len "
                f"{self.config.max_seq_len}"
            )
        lengths = cache.lengths
        cos = self.rope_cos[lengths][:, None, None]  # [B, 1, 1, Dh/2]
        sin = self.rope_sin[lengths][:, None, None]
        keys = torch.arange(cache.pos + 1, device=idx.device)
        mask = (keys[None, :] <= lengths[:, None])[:, None, None]  # [B, 1, 1, S]: own slots
        x = self.tok_emb(idx)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask=mask, cache=cache, layer=layer)
        return self.norm(x)
