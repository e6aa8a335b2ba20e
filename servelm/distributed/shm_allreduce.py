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


def load() -> ctypes.CDLL | None:
    lib = c_build.load("shm_allreduce")
    if lib is not None:
        lib.shm_allreduce_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int64,
                                          ctypes.c_double]
        lib.shm_allreduce_f32.restype = ctypes.c_int
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
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.segment))
        self.seq = 0

    def __call__(self, x: torch.Tensor) -> None:
        """Sum `x` over the ranks, in place (float32 arithmetic, every rank the same bits)."""
        flat = x.view(-1) if x.dtype == torch.float32 and x.is_contiguous() else x.float().reshape(-1)
        per = SLOT_BYTES // 4
        for start in range(0, flat.numel(), per):
            chunk = flat[start:start + per]
            self.seq += 1
            rc = self.lib.shm_allreduce_f32(self.base, SLOT_BYTES, self.index, self.world, self.seq,
                                            chunk.data_ptr(), chunk.numel(), self.timeout_s)
            if rc:
                raise RuntimeError(f"all-reduce: tensor-parallel rank {-1 - rc} of this stage did "
                                   f"not arrive within {self.timeout_s:g}s")
        if flat.data_ptr() != x.data_ptr():
            x.copy_(flat.view(x.shape))
