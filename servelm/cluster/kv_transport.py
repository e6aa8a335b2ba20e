"""Moving a KV payload (worker/kv_payload.py) from one engine to another.

Two transports with one interface: `send(payload) -> handle` on the sending side, a small
picklable handle travels with the request's metadata (through the router or a Ray call),
`receive(handle) -> payload` on the receiving side, and `discard(handle)` frees what a
handle holds when the transfer is abandoned (the receiver died, the request was aborted).
- `SharedMemoryTransport`, engines on one node: the bytes in a POSIX shared-memory segment,
  copied once in and once out; the receiver unlinks it.
- `RayObjectTransport`, engines anywhere in a Ray cluster: the payload in Ray's object
  store (`ray.put`), fetched by the receiver's node; freed when no handle refers to it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import torch

from servelm.engine.handoff import RequestHandoff
from servelm.worker.kv_payload import KVLayout, KVPayload

logger = logging.getLogger("servelm.cluster")


@dataclass(frozen=True)
class SharedMemoryHandle:
    name: str
    layout: KVLayout
    num_blocks: int
    values_nbytes: int
    scales_nbytes: int | None


class SharedMemoryTransport:
    def send(self, payload: KVPayload) -> SharedMemoryHandle:
        scales = payload.scales
        size = payload.nbytes
        shm = shared_memory.SharedMemory(create=True, size=max(1, size))
        # The receiver unlinks it; without this, this process's resource tracker would
        # unlink it too when this process exits, or warn of a leak that is not one.
        resource_tracker.unregister(shm._name, "shared_memory")
        try:
            buf = torch.frombuffer(shm.buf, dtype=torch.uint8, count=size)
            n = payload.values.numel()
            buf[:n].copy_(payload.values)
            if scales is not None:
                buf[n:].copy_(scales)
            del buf
        finally:
            shm.close()
        return SharedMemoryHandle(shm.name, payload.layout, payload.num_blocks,
                                  payload.values.numel(), None if scales is None else scales.numel())

    def receive(self, handle: SharedMemoryHandle) -> KVPayload:
        shm = self._attach(handle)
        try:
            n = handle.values_nbytes
            size = n + (handle.scales_nbytes or 0)
            buf = torch.frombuffer(shm.buf, dtype=torch.uint8, count=size).clone()
        finally:
            shm.close()
            shm.unlink()
        scales = None if handle.scales_nbytes is None else buf[n:]
        return KVPayload(handle.layout, handle.num_blocks, buf[:n], scales)

    def discard(self, handle: SharedMemoryHandle) -> None:
        try:
            shm = self._attach(handle)
        except FileNotFoundError:  # received (and unlinked) already
            return
        shm.close()
        shm.unlink()

    @staticmethod
    def _attach(handle: SharedMemoryHandle) -> shared_memory.SharedMemory:
        """Attached, and tracked by this process until `unlink` (so a receiver that dies
        before unlinking still frees the segment at its exit)."""
        return shared_memory.SharedMemory(name=handle.name)


@dataclass(frozen=True)
class RayObjectHandle:
    ref: Any  # ray.ObjectRef of the KVPayload
    nbytes: int


class RayObjectTransport:
    def send(self, payload: KVPayload) -> RayObjectHandle:
        import ray

        return RayObjectHandle(ray.put(payload), payload.nbytes)

    def receive(self, handle: RayObjectHandle, timeout_s: float = 60.0) -> KVPayload:
        import ray

        return ray.get(handle.ref, timeout=timeout_s)

    def discard(self, handle: RayObjectHandle) -> None:
        pass  # the object store frees the payload once no handle refers to it


TRANSPORTS = {"shm": SharedMemoryTransport, "ray": RayObjectTransport}


@dataclass
class Handover:
    """A request that left its engine, as it travels to the next: the handoff with its
    payloads replaced by the transport's handles (the bytes go their own way)."""

    handoff: RequestHandoff
    transport: str

    def without_kv(self) -> RequestHandoff:
        """The handoff to recompute from (a transfer failed, or a second receiver)."""
        return dataclasses.replace(self.handoff, kv=None, kv_first_block=0)


def send_handoff(handoff: RequestHandoff, transport: str) -> Handover:
    """`transport` "none" sends no K/V: the receiver recomputes it (a baseline)."""
    if transport == "none":
        return Handover(dataclasses.replace(handoff, kv=None, kv_first_block=0), transport)
    kv = handoff.kv
    if kv is not None:
        kv = [TRANSPORTS[transport]().send(p) for p in kv]
    return Handover(dataclasses.replace(handoff, kv=kv), transport)


def receive_handoff(handover: Handover) -> tuple[RequestHandoff, str | None]:
    """The handoff with its payloads fetched, and None; or, when a payload cannot be had
    (gone, damaged, its sender dead), the handoff without K/V and the reason."""
    h = handover.handoff
    if h.kv is None:
        return h, None
    transport = TRANSPORTS[handover.transport]()
    try:
        return dataclasses.replace(h, kv=[transport.receive(k) for k in h.kv]), None
    except Exception as exc:  # the receiver recomputes: slower, same output
        for k in h.kv:
            try:
                transport.discard(k)
            except Exception:
                pass
        return handover.without_kv(), f"{type(exc).__name__}: {exc}"
