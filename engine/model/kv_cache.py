"""The key/value cache of generation, and the left padding of prompt batches.

Two ways to fill it (see :mod:`.model`, ``forward_cached``):

- shared position: every row has filled ``pos`` slots; prompts of different lengths are
  left-padded (``pad[b]`` pad slots at the start of row b, masked out), and finished rows
  leave with :meth:`KVCache.select` (the batched ``generate``);
- per row (:meth:`KVCache.row_view`): row b has filled ``lengths[b]`` slots, one token
  per row per step, so requests join and leave independently (the server's scheduler).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Preallocated keys and values for every layer: k[l], v[l] are [B, Hkv, max_len, Dh]
    (Hkv = n_kv_heads).

    ``pos`` is the number of slots filled (the same for every row, pads included);
    ``pad[b]`` is the number of left-padding slots at the start of row b.
    Build one with :meth:`Transformer.new_cache`.

    Per-row mode (``lengths`` set, see :meth:`row_view`): row b has its own filled length
    ``lengths[b]`` (no pads; slot = RoPE position), ``pos`` is the largest of them, and
    each step appends exactly one token per row, so rows can join and leave independently.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pad: torch.Tensor
    pos: int = 0
    lengths: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.lengths is None:
            self._note_pad()
        else:
            self.pad_range = (0, 0)  # per-row mode has no pads; reading them would sync

    def _note_pad(self) -> None:
        # Smallest and largest pad as Python ints, read once here rather than from the
        # (possibly GPU) tensor at every decode step, which would sync each token.
        self.pad_range = (int(self.pad.min()), int(self.pad.max())) if len(self.pad) else (0, 0)

    @property
    def batch_size(self) -> int:
        return self.pad.shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def rows(self, first: int, n: int) -> KVCache:
        """A shared-position cache (pos 0, no pads) over rows first..first+n-1 that writes
        into this cache's buffers: a prefill fills some rows while others keep decoding."""
        if n < 1 or first < 0 or first + n > self.batch_size:
            raise ValueError(f"rows {first}..{first + n - 1} are outside 0..{self.batch_size - 1}")
        return KVCache(
            k=[t[first : first + n] for t in self.k],
            v=[t[first : first + n] for t in self.v],
            pad=torch.zeros(n, dtype=torch.long, device=self.pad.device),
        )

    def row_view(self, n: int, lengths: list[int]) -> KVCache:
        """A per-row cache over rows 0..n-1 whose filled lengths are ``lengths`` (host ints,
        tracked by the caller, so no device read is needed); it writes into this cache."""
        if len(lengths) != n or not 0 < n <= self.batch_size:
            raise ValueError(f"row_view needs 1..{self.batch_size} rows and one length each")
        return KVCache(
            k=[t[:n] for t in self.k],
            v=[t[:n] for t in self.v],
            pad=self.pad[:n],
            pos=max(lengths),
            lengths=torch.tensor(lengths, dtype=torch.long).to(self.pad.device),
        )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B, H, T, Dh] at slots pos..pos+T; return all keys/values so far.
        In per-row mode (T == 1) row b's token goes to slot lengths[b] instead."""
        if self.lengths is not None:
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[layer][rows, :, self.lengths] = k[:, :, 0]  # [B, H, Dh] at (b, :, len_b)
            self.v[layer][rows, :, self.lengths] = v[:, :, 0]
            return self.k[layer][:, :, : self.pos + 1], self.v[layer][:, :, : self.pos + 1]
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished sequences leave a batched generation)."""
        if self.lengths is not None:
            raise ValueError("select() is for shared-position caches; per-row views move rows")
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.pad = self.pad[rows]
        self._note_pad()

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first ``length`` slots into row dst (keeps live rows contiguous)."""
        for t in (*self.k, *self.v):
            t[dst, :, :length] = t[src, :, :length]

    def reset(self, pad: torch.Tensor | None = None) -> None:
        """Reuse the buffers for a new batch (old contents are simply overwritten)."""
        self.pos = 0
        if pad is not None:
            self.pad = pad.to(device=self.pad.device, dtype=torch.long)
            self._note_pad()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into idx [B, T] and pad [B] (pads per row).

    >>> left_pad([[5, 6, 7], [8]], pad_id=0)
    (tensor([[5, 6, 7],
            [0, 0, 8]]), tensor([0, 2]))
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad needs at least one prompt and no empty prompts")
    width = max(len(p) for p in prompts)
    rows = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    pad = torch.tensor([width - len(p) for p in prompts], dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long), pad
