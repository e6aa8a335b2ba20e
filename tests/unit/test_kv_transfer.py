"""A request's K/V read out of cache blocks, moved by either transport, and written into
other blocks of another cache: the same bytes, for every storage dtype (8-bit values move
with their scales, as stored); a cache of another layout refuses the payload by name; a
shared-memory segment is gone once received or discarded."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch
from fixtures_models import small_arch

from servelm.cluster.kv_transport import SharedMemoryTransport
from servelm.worker.kv_cache import KVTensors
from servelm.worker.kv_payload import read_blocks, write_blocks

BS = 4


def arch(**kw):
    return small_arch(**{"hidden_size": 32, "head_dim": 8, **kw})


def filled(kv_cache_dtype: str, dtype=torch.float32, **kw) -> KVTensors:
    kv = KVTensors(arch(**kw), 8 * BS, dtype, kv_cache_dtype)
    g = torch.Generator().manual_seed(0)
    for t in kv.tensors:
        t.copy_(torch.randint(0, 100, t.shape, generator=g).to(t.dtype))
    return kv


def slots(blocks: list[int]) -> torch.Tensor:
    return torch.tensor([b * BS + i for b in blocks for i in range(BS)])


@pytest.mark.parametrize("kv_dtype, dtype", [("auto", torch.float32), ("auto", torch.bfloat16),
                                             ("int8", torch.float32), ("fp8", torch.float32)])
def test_blocks_move_as_stored(kv_dtype, dtype):
    src, dst = filled(kv_dtype, dtype), KVTensors(arch(), 8 * BS, dtype, kv_dtype)
    payload = read_blocks(src, BS, [5, 2])
    transport = SharedMemoryTransport()
    write_blocks(dst, BS, [0, 7], transport.receive(transport.send(payload)))
    for s, d in zip(src.tensors, dst.tensors):
        assert torch.equal(s.index_select(2, slots([5, 2])), d.index_select(2, slots([0, 7])))
    assert (dst.scales is not None) == (kv_dtype in ("int8", "fp8"))
    untouched = slots([1, 2, 3, 4, 5, 6])
    assert not dst.tensors[0].index_select(2, untouched).any()


def test_a_cache_of_another_layout_refuses_by_name():
    payload = read_blocks(filled("auto"), BS, [1])
    with pytest.raises(ValueError, match="num_kv_heads is 2, this cache's is 4"):
        write_blocks(KVTensors(arch(num_kv_heads=4), 8 * BS, torch.float32, "auto"), BS, [0], payload)
    with pytest.raises(ValueError, match="dtype is 'float32', this cache's is 'int8'"):
        write_blocks(KVTensors(arch(), 8 * BS, torch.float32, "int8"), BS, [0], payload)
    with pytest.raises(ValueError, match="holds 1 blocks, 2 given"):
        write_blocks(KVTensors(arch(), 8 * BS, torch.float32, "auto"), BS, [0, 1], payload)


def _receive_in_child(handle, conn) -> None:
    payload = SharedMemoryTransport().receive(handle)
    conn.send((payload.values.sum().item(), payload.scales.sum().item()))


def test_shared_memory_crosses_processes_and_is_freed():
    payload = read_blocks(filled("int8"), BS, [3, 4, 6])
    transport = SharedMemoryTransport()
    handle = transport.send(payload)
    assert os.path.exists(f"/dev/shm/{handle.name.lstrip('/')}")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receive_in_child, args=(handle, child))
    proc.start()
    got = parent.recv()
    proc.join(timeout=30)
    assert got == (payload.values.sum().item(), payload.scales.sum().item())
    assert not os.path.exists(f"/dev/shm/{handle.name.lstrip('/')}")  # the receiver unlinked it
    abandoned = transport.send(payload)
    transport.discard(abandoned)
    transport.discard(abandoned)  # twice is harmless
    assert not os.path.exists(f"/dev/shm/{abandoned.name.lstrip('/')}")


@pytest.mark.multiprocess
def test_ray_object_store_carries_a_payload_to_another_process():
    ray = pytest.importorskip("ray")
    from servelm.cluster.kv_transport import RayObjectTransport

    payload = read_blocks(filled("fp8"), BS, [0, 5])
    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        @ray.remote
        def checksum(handle) -> tuple[int, int, int]:
            got = RayObjectTransport().receive(handle)
            return got.values.sum().item(), got.scales.sum().item(), os.getpid()

        handle = RayObjectTransport().send(payload)
        values, scales, pid = ray.get(checksum.remote(handle), timeout=60)
        assert (values, scales) == (payload.values.sum().item(), payload.scales.sum().item())
        assert pid != os.getpid() and handle.nbytes == payload.nbytes
    finally:
        ray.shutdown()
