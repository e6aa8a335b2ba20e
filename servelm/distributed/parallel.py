"""Where this process sits among the ranks, and the collectives the model calls.

Ranks are laid out tensor-parallel first: global rank = pp_rank * tp_size + tp_rank, so
the T ranks of one pipeline stage are consecutive. With one rank every collective is a
no-op and nothing touches torch.distributed, so single-process code pays nothing.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from servelm.distributed import shm_allreduce
from servelm.distributed.shm_allreduce import ShmAllReduce


@dataclass
class CollectiveStats:
    """All-reduces run by this rank: how many, their bytes, and the seconds spent in them
    (waiting for slower ranks included)."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class ParallelContext:
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0  # global
    tp_group: Any = field(default=None, repr=False)  # torch ProcessGroup of this stage's ranks
    stats: CollectiveStats = field(default_factory=CollectiveStats)  # gloo's, counted here
    shm_allreduce: ShmAllReduce | None = field(default=None, repr=False)
    device: torch.device = torch.device("cpu")  # where activations sent between stages live
    _sending: tuple[Any, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_output_rank(self) -> bool:
        """The rank whose step output goes back to the engine: tp rank 0 of the last stage."""
        return self.is_last_stage and self.tp_rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over this stage's tensor-parallel ranks, in place."""
        if self.tp_size == 1:
            return x
        if self.shm_allreduce is not None:  # it counts its own calls, C callers' too
            self.shm_allreduce(x)
            return x
        start = time.perf_counter()
        dist.all_reduce(x, group=self.tp_group)
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1
        self.stats.bytes += x.nbytes
        return x

    def take_stats(self) -> CollectiveStats:
        """The all-reduces (not the logit gathers) since the last take."""
        taken, self.stats = self.stats, CollectiveStats()
        if self.shm_allreduce is not None:
            calls, nbytes, seconds = self.shm_allreduce.take_counts()
            taken = CollectiveStats(taken.calls + calls, taken.bytes + nbytes, taken.seconds + seconds)
        return taken

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, n] on each rank -> [rows, tp_size * n], rank order."""
        if self.tp_size == 1:
            return x
        if self.shm_allreduce is not None:  # each rank's part beside zeros, summed: exact
            n = x.shape[-1]
            out = x.new_zeros(*x.shape[:-1], self.tp_size * n)
            out[..., self.tp_rank * n:(self.tp_rank + 1) * n] = x
            self.shm_allreduce(out, counted=False)
            return out
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    def all_reduce_min(self, value: int) -> int:
        """The smallest `value` over every rank (KV blocks: the tightest rank decides)."""
        return self._over_world(value, dist.ReduceOp.MIN)

    def all_reduce_sum(self, value: int) -> int:
        return self._over_world(value, dist.ReduceOp.SUM)

    def _over_world(self, value: int, op: Any) -> int:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=op)
        return int(t.item())

    def send_next(self, x: torch.Tensor) -> None:
        """Hand activations to the same tensor-parallel rank of the next stage without
        waiting for it to take them (this stage goes on with the next micro-batch); the
        previous send is waited for first, so at most one is outstanding."""
        if self._sending is not None:
            self._sending[0].wait()
        x = x.contiguous()
        self._sending = (dist.isend(x, self.rank + self.tp_size), x)

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        x = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(x, self.rank - self.tp_size)
        return x


SINGLE = ParallelContext()


def init_parallel(tp_size: int, pp_size: int, rank: int, port: int, timeout_s: float,
                  allreduce: str = "shm", device: torch.device = torch.device("cpu")) -> ParallelContext:
    """Join the world of tp_size x pp_size ranks at 127.0.0.1:`port` and make each stage's
    tensor-parallel group. Every rank must call it; collectives and the rendezvous give up
    after `timeout_s` with an error instead of waiting forever. `allreduce` (CPU): "shm"
    sums through shared memory (shm_allreduce.py) where its C kernel builds, "gloo" through
    the process group. On CUDA, tensors on the GPU go through NCCL and the few host
    tensors (block counts) through gloo."""
    timeout = datetime.timedelta(seconds=timeout_s)
    cuda = device.type == "cuda"
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(device)
    world = tp_size * pp_size
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timeout)
    except Exception as e:
        raise RuntimeError(
            f"rank {rank} of {world} could not join the process group at 127.0.0.1:{port} within "
            f"{timeout_s:g}s ({e}); check that every worker process started (the others' logs) and "
            "that nothing else holds the port") from None
    ctx = ParallelContext(tp_size, pp_size, rank, device=device)
    for stage in range(pp_size):  # every rank takes part in creating every group
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(ranks, timeout=timeout) if tp_size > 1 else None
        if stage == ctx.pp_rank:
            ctx.tp_group = group
    lib = shm_allreduce.load() if tp_size > 1 and allreduce == "shm" and not cuda else None
    if lib is not None:
        ranks = list(range(ctx.pp_rank * tp_size, (ctx.pp_rank + 1) * tp_size))
        ctx.shm_allreduce = shm_allreduce.ShmAllReduce(lib, ctx.tp_group, ranks, rank, timeout_s)
    return ctx


def destroy_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
