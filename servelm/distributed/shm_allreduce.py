"""All-reduce through shared memory for the tensor-parallel ranks of one machine
(ops/csrc/shm_allreduce.c says how). gloo's loopback all-reduce costs about a millisecond
per call whatever the size, and a decode step makes two per layer; this one costs
microseconds. The process group still sets the segment up, and does everything else."""

from __future__ import annotations

import ctypes
import mmap
import os
import uuid

import torch
import torch.distributed as dist

from servelm.ops import c_build

SLOT_BYTES = 1 << 21  # per rank and buffer; larger tensors go through in chunks


class _Ctx(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("slot_bytes", ctypes.c_int64), ("rank", ctypes.c_int64),
                ("world", ctypes.c_int64), ("seq", ctypes.c_uint64), ("timeout_s", ctypes.c_double),
                ("calls", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("seconds", ctypes.c_double)]


def load() -> ctypes.CDLL | None:
    lib = c_build.load("shm_allreduce")
    if lib is not None:
        lib.shm_allreduce.argtypes = [ctypes.POINTER(_Ctx), ctypes.c_void_p, ctypes.c_int64]
        lib.shm_allreduce.restype = ctypes.c_int
        lib.shm_allreduce_header_bytes.restype = ctypes.c_int64
    return lib


class ShmAllReduce:
    def __init__(self, lib: ctypes.CDLL, group: object, ranks: list[int], rank: int,
                 timeout_s: float) -> None:
        """Every rank of `group` (global `ranks`, this one `rank`) calls this together: the
        first makes the segment and names it, all map it, then its name is unlinked, so it
        goes away with the last process that maps it, however they end."""
        self.lib, self.timeout_s = lib, timeout_s
        self.world, self.index = len(ranks), ranks.index(rank)
        size = lib.shm_allreduce_header_bytes() + 2 * self.world * SLOT_BYTES
        name = [f"/dev/shm/servelm-allreduce-{uuid.uuid4().hex}" if self.index == 0 else None]
        if self.index == 0:  # made and sized before anyone learns its name
            fd = os.open(name[0], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, size)  # zero-filled: every counter starts at 0
        dist.broadcast_object_list(name, src=ranks[0], group=group)
        if self.index != 0:
            fd = os.open(name[0], os.O_RDWR)
        try:
            self.segment = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        dist.barrier(group=group)  # everyone has it mapped
        if self.index == 0:
            os.unlink(name[0])
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.segment))
        self.ctx = _Ctx(base, SLOT_BYTES, self.index, self.world, 0, timeout_s, 0, 0, 0.0)

    def take_counts(self) -> tuple[int, int, float]:
        """(calls, bytes, seconds) of the all-reduces since the last take, whoever called
        them (Python or the fused decoder)."""
        c = self.ctx
        counts = (c.calls, c.bytes, c.seconds)
        c.calls, c.bytes, c.seconds = 0, 0, 0.0
        return counts

    @property
    def c_hook(self) -> tuple[int, int]:
        """(function, its first argument) for C code that sums through the same segment:
        `int fn(void *ctx, float *x, int64_t n)`."""
        return ctypes.cast(self.lib.shm_allreduce, ctypes.c_void_p).value, ctypes.addressof(self.ctx)

    def __call__(self, x: torch.Tensor, counted: bool = True) -> None:
        """Sum `x` over the ranks, in place (float32 arithmetic, every rank the same bits).
        `counted=False` leaves it out of `take_counts` (a gather done as a sum)."""
        c = self.ctx
        before = (c.calls, c.bytes, c.seconds)
        flat = x.view(-1) if x.dtype == torch.float32 and x.is_contiguous() else x.float().reshape(-1)
        rc = self.lib.shm_allreduce(ctypes.byref(self.ctx), flat.data_ptr(), flat.numel())
        if rc:
            raise RuntimeError(f"all-reduce: tensor-parallel rank {-1 - rc} of this stage did "
                               f"not arrive within {self.timeout_s:g}s")
        if flat.data_ptr() != x.data_ptr():
            x.copy_(flat.view(x.shape))
        if not counted:
            c.calls, c.bytes, c.seconds = before
