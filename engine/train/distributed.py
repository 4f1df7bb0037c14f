"""Multi-process training under PyTorch's own launcher (torchrun) with DDP.

    torchrun --nproc_per_node=N $(which llm-train) ...      # one node, N processes
        -> environment RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
        -> init_distributed(): one process group (nccl on CUDA, gloo on CPU), one device
           per local rank, a collective timeout
        -> Trainer: DistributedDataParallel, a disjoint share of each global batch per rank,
           rank 0 writes everything, stop decisions broadcast from rank 0

Without torchrun (or with WORLD_SIZE=1) ``init_distributed`` returns a trivial
:class:`DistContext` (rank 0 of 1, no process group) whose helpers are identity functions,
so the single-process path does no communication at all.

No pickle: everything exchanged between ranks is a tensor (numbers, or bytes as uint8).
A collective that fails or times out (a rank died or hangs) raises
:class:`DistributedError` naming this rank and the timeout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import EngineError

DEFAULT_TIMEOUT_S = 300.0


class DistributedError(EngineError, RuntimeError):
    """Multi-process setup or communication failed (bad environment, dead or hung rank)."""


# ----------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class TorchrunEnv:
    """The launcher's variables for this process (see ``torchrun --help``)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
    """Parse RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun); None outside a launcher.

    >>> torchrun_env({})  is None
    True
    >>> torchrun_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).rank
    1
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return None

    def integer(name: str, default: int | None = None) -> int:
        text = env.get(name)
        if text is None:
            if default is None:
                raise DistributedError(f"launcher environment: {name} is not set")
            return default
        try:
            return int(text)
        except ValueError:
            raise DistributedError(
                f"launcher environment: {name}={text!r} is not an integer"
            ) from None

    world = integer("WORLD_SIZE")
    rank = integer("RANK")
    local_rank = integer("LOCAL_RANK", default=rank)
    local_world = integer("LOCAL_WORLD_SIZE", default=world)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"launcher environment: RANK={rank} with WORLD_SIZE={world}")
    if not 0 <= local_rank < max(1, local_world):
        raise DistributedError(
            f"launcher environment: LOCAL_RANK={local_rank} with LOCAL_WORLD_SIZE={local_world}"
        )
    port = env.get("MASTER_PORT")
    return TorchrunEnv(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        master_addr=env.get("MASTER_ADDR"),
        master_port=int(port) if port and port.isdigit() else None,
    )


# ----------------------------------------------------------------------------- context


@dataclass
class DistContext:
    """Who this process is and how to talk to the others.

    ``DistContext()`` is the single-process context: rank 0 of 1, no process group, every
    helper returns its input. ``device`` is None there (the trainer resolves its own).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    control_group: object = field(default=None, repr=False)  # gloo group for CPU flags
    _closed: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 and self.backend is not None and not self._closed

    # -- collectives (no-ops in a single process) --------------------------------------

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def run(self, what: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; with other ranks, a failure becomes a DistributedError
        naming ``what`` (they probably died or hung)."""
        if not self.is_distributed:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except DistributedError:
            raise
        except Exception as e:  # gloo/nccl raise RuntimeError / DistBackendError
            raise self.failure(what, e) from e

    def failure(self, what: str, exc: BaseException) -> DistributedError:
        """A DistributedError explaining a failed collective (or DDP all-reduce)."""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return DistributedError(
            f"rank {self.rank} of {self.world_size}: {what} failed ({first[:300]}); another "
            f"rank probably died, hung or stopped with its own error (collective timeout "
            f"{self.timeout_s:g} s, `dist_timeout`)"
        )

    def barrier(self) -> None:
        """Wait until every rank gets here (times out after timeout_s)."""
        if not self.is_distributed:
            return
        if self.backend == "nccl":
            self.run("barrier", lambda: dist.barrier(device_ids=[self.device.index]))
        else:
            self.run("barrier", dist.barrier)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a few numbers (float64), in one collective."""
        if not self.is_distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        t = t.to(self._comm_device())
        self.run("all_reduce", lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
        return [float(v) for v in t.cpu()]

    def all_reduce_mean(self, value: float | torch.Tensor) -> float | torch.Tensor:
        """Mean over ranks of a float (returns a float) or a tensor (returns a new tensor)."""
        if isinstance(value, torch.Tensor):
            if not self.is_distributed:
                return value.clone()
            t = value.detach().to(self._comm_device(), copy=True)
            self.run("all_reduce", lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
            return (t / self.world_size).to(value.device)
        return self.all_reduce_sum([value])[0] / self.world_size

    def all_reduce_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of a device tensor, in place; no host sync on NCCL."""
        if self.is_distributed:
            self.run("all_reduce", lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
        return t

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when any rank passes True (e.g. a stop request). Runs on the
        CPU control group, so calling it every step never waits for the GPU."""
        if not self.is_distributed:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        op = dist.ReduceOp.MAX
        self.run("all_reduce", lambda: dist.all_reduce(t, op=op, group=self.control_group))
        return bool(t.item())

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP around ``module`` with other ranks; the module itself in one process."""
        if not self.is_distributed:
            return module
        return self.run("wrapping the model in DDP", wrap_ddp, module, self)

    def no_sync(self, module: torch.nn.Module, sync: bool):
        """Skip DDP's gradient all-reduce for this backward unless ``sync`` (the last
        micro-step); a null context in one process."""
        if sync or not self.is_distributed:
            return contextlib.nullcontext()
        return module.no_sync()

    def broadcast_flag(self, flag: bool, src: int = 0) -> bool:
        """Rank ``src``'s decision (e.g. stop now) on every rank."""
        if not self.is_distributed:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self._comm_device())
        self.run("broadcast", lambda: dist.broadcast(t, src=src))
        return bool(t.item())

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """Rank ``src``'s bytes on every rank (others pass anything, e.g. None)."""
        if not self.is_distributed:
            return bytes(data or b"")
        dev = self._comm_device()
        n = torch.tensor([len(data or b"") if self.rank == src else 0], dtype=torch.int64)
        n = n.to(dev)
        self.run("broadcast", lambda: dist.broadcast(n, src=src))
        size = int(n.item())
        if self.rank == src:
            buf = torch.frombuffer(bytearray(data or b""), dtype=torch.uint8) if size else None
            buf = buf.to(dev) if buf is not None else torch.empty(0, dtype=torch.uint8, device=dev)
        else:
            buf = torch.empty(size, dtype=torch.uint8, device=dev)
        if size:
            self.run("broadcast", lambda: dist.broadcast(buf, src=src))
        return bytes(buf.cpu().numpy().tobytes())

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's bytes, in rank order."""
        if not self.is_distributed:
            return [bytes(data)]
        dev = self._comm_device()
        n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        self.run("all_gather", lambda: dist.all_gather(sizes, n))
        sizes_i = [int(s.item()) for s in sizes]
        width = max(1, max(sizes_i))
        buf = torch.zeros(width, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(dev)
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        self.run("all_gather", lambda: dist.all_gather(out, buf))
        return [bytes(o.cpu().numpy().tobytes()[:s]) for o, s in zip(out, sizes_i, strict=True)]

    def check_same(self, value: str, what: str) -> None:
        """Raise DistributedError on every rank whose ``value`` differs from rank 0's."""
        if not self.is_distributed:
            return
        ref = self.broadcast_bytes(value.encode("utf-8") if self.is_main else None).decode()
        same = self.all_reduce_sum([0.0 if ref == value else 1.0])[0] == 0
        if not same:
            raise DistributedError(
                f"rank {self.rank}: {what} differs between ranks (give every node the same "
                "files and options)"
            )

    def close(self) -> None:
        """Destroy the process group (idempotent)."""
        if self.backend is not None and not self._closed and dist.is_initialized():
            dist.destroy_process_group()
        self._closed = True


def init_distributed(
    device: str = "auto",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    environ: Mapping[str, str] | None = None,
) -> DistContext:
    """A DistContext for this process: trivial outside torchrun, else a process group.

    ``device`` is the user's choice ("auto", "cpu", "cuda"): CUDA -> backend nccl and
    device cuda:LOCAL_RANK; CPU -> gloo. ``timeout_s`` bounds every collective, so a dead
    or hung rank ends the others with a DistributedError instead of a hang.
    """
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise DistributedError(f"collective timeout must be > 0 seconds, got {timeout_s!r}")
    env = torchrun_env(environ)
    if env is None or env.world_size == 1:
        return DistContext(timeout_s=float(timeout_s))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise DistributedError("device cuda: CUDA is not available on this machine",
                                   field="device")  # fmt: skip
        n_gpu = torch.cuda.device_count()
        if env.local_rank >= n_gpu:
            raise DistributedError(
                f"LOCAL_RANK {env.local_rank} needs GPU {env.local_rank}, but only {n_gpu} "
                f"visible; start at most {n_gpu} processes per node"
            )
        dev = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = dev
    try:
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=float(timeout_s)),
            **kwargs,
        )
    except Exception as e:
        raise DistributedError(
            f"rank {env.rank}: could not join the process group ({backend}, "
            f"{env.master_addr}:{env.master_port}): {str(e).strip().splitlines()[0][:300]}"
        ) from e
    # Per-step stop flags travel on the CPU (gloo) so they never wait for the GPU.
    control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timedelta(
        seconds=float(timeout_s)))  # fmt: skip
    return DistContext(
        control_group=control,
        rank=env.rank,
        world_size=env.world_size,
        local_rank=env.local_rank,
        device=dev,
        backend=backend,
        timeout_s=float(timeout_s),
    )


# ----------------------------------------------------------------------------- model


class LossForward(torch.nn.Module):
    """``forward(idx, targets, lengths, document_ids) = model.loss(...)``, so DDP sees the
    loss as its forward (DDP only syncs gradients of computations that run through its
    forward)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx, targets, lengths=None, document_ids=None):
        return self.model.loss(idx, targets, lengths=lengths, document_ids=document_ids)


def wrap_ddp(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DistributedDataParallel over ``module`` (a LossForward). Checkpoints save the bare
    model itself, so weight names carry no prefix."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device.index] if ctx.backend == "nccl" else None
    # RoPE tables are constant buffers: no need to sync them at every forward.
    # (torch >= 2.13 renamed broadcast_buffers to forward_sync_buffers.)
    params = inspect.signature(DDP.__init__).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DDP(module, device_ids=ids, output_device=None if ids is None else ids[0],
               **{no_sync: False})  # fmt: skip


# ----------------------------------------------------------------------------- RNG per rank


def gather_rng_states(ctx: DistContext, state: dict) -> list[dict]:
    """Every rank's (JSON-able) RNG state dict, in rank order."""
    blobs = ctx.all_gather_bytes(json.dumps(state, sort_keys=True).encode("utf-8"))
    return [json.loads(b.decode("utf-8")) for b in blobs]


def rank_seed(seed: int, rank: int) -> int:
    """Torch seed of a rank (rank 0 keeps ``seed``, so its stream is the single-process one).

    >>> rank_seed(1337, 0), rank_seed(1337, 1) != 1337
    (1337, True)
    """
    return seed if rank == 0 else (seed + 1_000_003 * rank) % (2**63)
