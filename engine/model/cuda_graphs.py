"""The decode step replayed from CUDA graphs, one graph per batch bucket (1, 2, 4, 8, ...).

Why: on a GPU a small model's decode step costs the launch of ~150 kernels, not the math.
A CUDA graph records the launches once and replays them in one call. A graph has fixed
shapes and fixed memory, which :func:`.decode_step.decode_logits` gives it: the inputs are
copied into static buffers, the step reads the whole preallocated cache (the window is the
cache length) and the logits land in a static output.

Live rows are padded to the next bucket (``next_bucket``): pad rows feed token 0 at slot 0
of rows n..bucket-1, which must be free rows of the cache (the scheduler keeps live rows
0..n-1; ``generate`` compacts finished rows to the end). Their logits are dropped.

Any failure to capture (no CUDA, an op that cannot be captured, out of memory) switches the
step to eager for good and reports one line through ``on_fallback``; it never raises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import decode_step
from .decode_step import DecodeStep, next_bucket
from .kv_cache import KVCache

__all__ = [
    "DECODE_CHOICES",
    "GraphedDecodeStep",
    "capture_cuda_graph",
    "make_decode_step",
    "pick_decode_mode",
]

DECODE_CHOICES = ("eager", "compile", "graphs")


def make_decode_step(model, cache: KVCache, mode: str = "eager", on_fallback=None):
    """The decode step of ``mode`` over ``cache``: "eager" and "compile" are
    :class:`DecodeStep`'s; "graphs" captures CUDA graphs (eager off CUDA, with one line)."""
    if mode not in DECODE_CHOICES:
        raise ValueError(f"unknown decode mode {mode!r}; choose one of {DECODE_CHOICES}")
    if mode == "graphs":
        return GraphedDecodeStep(model, cache, on_fallback)
    return DecodeStep(model, cache, mode)


def pick_decode_mode(device: torch.device | str, graphs: bool = True, compile: bool = False):
    """The front ends' choice: CUDA graphs on a GPU unless turned off (--no-graphs), the
    compiled step when asked (--compile), else eager (measured: benchmarks/RESULTS.md)."""
    if torch.device(device).type == "cuda" and graphs:
        return "graphs"
    return "compile" if compile else "eager"


def capture_cuda_graph(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """Record ``fn`` (after warm-up runs on a side stream, as CUDA graphs require) and return
    a replay that reruns it and returns the same output tensor, refilled."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: lazy init, cuBLAS workspaces, Triton autotuning
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


class GraphedDecodeStep:
    """A :class:`DecodeStep` whose calls replay a captured graph per batch bucket.

    ``capture`` records a zero-argument step (default :func:`capture_cuda_graph`; tests pass
    one that runs the step eagerly to check the bucket padding on the CPU).
    """

    mode = "graphs"

    def __init__(
        self,
        model,
        cache: KVCache,
        on_fallback: Callable[[str], None] | None = None,
        capture: Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]] | None = None,
    ):
        self.model, self.cache = model, cache
        self.eager = DecodeStep(model, cache)
        self.on_fallback = on_fallback
        self.capture = capture_cuda_graph if capture is None else capture
        rows, device = cache.batch_size, cache.k[0].device
        # Static inputs: a captured step always reads these buffers.
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.zeros(rows, dtype=torch.long, device=device)
        self.pad = torch.zeros(rows, dtype=torch.long, device=device)
        self.replays: dict[int, Callable[[], torch.Tensor]] = {}
        self.failure: str | None = None

    @property
    def max_rows(self) -> int:
        return self.cache.batch_size

    def __call__(
        self, tokens: torch.Tensor, slots: torch.Tensor, pad: torch.Tensor, window: int
    ) -> torch.Tensor:
        """Logits [n, V] for rows 0..n-1, as :meth:`DecodeStep.__call__`."""
        if self.failure is not None:
            return self.eager(tokens, slots, pad, window)
        n = tokens.shape[0]
        if window > self.cache.max_len:  # the eager step's checks and message
            return self.eager(tokens, slots, pad, window)
        bucket = next_bucket(n, self.max_rows)
        for buf, src in ((self.tokens, tokens), (self.slots, slots), (self.pad, pad)):
            buf[:n].copy_(src)
            buf[n:bucket].zero_()  # pad rows: token 0 at slot 0 of a free row
        replay = self.replays.get(bucket)
        if replay is None:
            replay = self._capture(bucket)
            if replay is None:
                return self.eager(tokens, slots, pad, window)
        return replay()[:n].clone()  # the next replay overwrites the static output

    def _capture(self, bucket: int):
        cache = self.cache
        k = [t[:bucket] for t in cache.k]
        v = [t[:bucket] for t in cache.v]
        args = (self.tokens[:bucket], self.slots[:bucket], self.pad[:bucket], k, v)

        def step() -> torch.Tensor:
            return decode_step.decode_logits(self.model, *args, cache.max_len)

        try:
            replay = self.capture(step)
        except Exception as e:  # any capture problem: decode eagerly from now on
            self.failure = f"CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly"
            self.failure = self.failure.replace("\n", " ")
            if self.on_fallback is not None:
                self.on_fallback(self.failure)
            return None
        self.replays[bucket] = replay
        return replay
