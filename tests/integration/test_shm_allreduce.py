"""The shared-memory all-reduce sums like gloo, gives every rank the same bits, takes
tensors larger than its slots in chunks, and gives up with an error naming the rank that
never came instead of hanging."""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from servelm.distributed import shm_allreduce
from servelm.distributed.shm_allreduce import SLOT_BYTES, ShmAllReduce

pytestmark = pytest.mark.multiprocess
WORLD = 3


def _rank(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    shm = ShmAllReduce(shm_allreduce.load(), None, list(range(WORLD)), rank, timeout_s=2.0)
    out = {}
    for n in (1, 1000, SLOT_BYTES // 4 + 5):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n, generator=torch.Generator().manual_seed(rank + n)).to(dtype)
            ref = x.clone()
            dist.all_reduce(ref)
            shm(x)
            out[(n, str(dtype))] = (x.float(), ref.float())
    if rank == WORLD - 1:
        dist.barrier()
        out["timeout"] = None  # this rank skips the next all-reduce
    else:
        try:
            shm(torch.ones(4))
            out["timeout"] = None
        except RuntimeError as e:
            out["timeout"] = str(e)
        dist.barrier()
    results[rank] = out
    dist.destroy_process_group()


def test_shm_allreduce_matches_gloo_and_ranks_agree():
    if shm_allreduce.load() is None:
        pytest.skip("the C kernel could not be built here")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_rank, args=(port, shared), nprocs=WORLD)
        results = dict(shared)
    first = results[0]
    for key, value in first.items():
        if key == "timeout":
            continue
        got, ref = value
        tol = 1e-5 if "float32" in key[1] else 2e-2
        assert torch.allclose(got, ref, rtol=tol, atol=tol), key
        for rank in range(1, WORLD):
            assert torch.equal(results[rank][key][0], got), f"rank {rank} differs at {key}"
    for rank in range(WORLD - 1):
        assert f"rank {WORLD - 1}" in results[rank]["timeout"]
