"""T x P worker processes on torch.distributed, one per tensor/pipeline-parallel rank.

The engine schedules once; each step's `SchedulerOutput` is pickled once and the same bytes
go down every worker's pipe, written by a sender thread: with pipeline stages a step goes
out while a later stage is still writing an earlier step's output, and two large messages
written toward each other on one pipe would each wait for the other to be read. Every rank answers each step (the output rank with the
`ModelRunnerOutput`, the others with None), so a rank that fails reports it. While
waiting, the executor watches the processes and their heartbeats: a worker that dies, or
stops stamping its heartbeat for `HEARTBEAT_TIMEOUT_S` (stopped, wedged), fails the step
within seconds with an error naming it, and takes the other workers down with it rather
than leaving them blocked in a collective. Workers also die with the engine's process.
"""

from __future__ import annotations

import atexit
import dataclasses
import multiprocessing as mp
import os
import pickle
import queue
import socket
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from servelm.config import EngineConfig
from servelm.executor.base import Executor
from servelm.executor.worker_process import run_worker
from servelm.model.loader import compute_dtype, load_arch
from servelm.model.sharding import Shard
from servelm.step_io import ModelRunnerOutput, SchedulerOutput
from servelm.worker.kv_payload import KVPayload

HEARTBEAT_TIMEOUT_S = 5.0
_POLL_S = 0.2


class WorkerFailed(RuntimeError):
    """A worker process died, hung or raised; the executor can run no more steps."""


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        Shard(tp, 0, pp, 0, config.enable_expert_parallel).check(load_arch(config.model))  # a bad split fails here, not in T x P logs
        self.world_size = tp * pp
        self.output_rank = (pp - 1) * tp  # tp rank 0 of the last stage
        # The cores shared out: more threads than cores would make the ranks preempt each other.
        threads = config.num_threads or max(1, (os.cpu_count() or 1) // self.world_size)
        # Decided here once, so that every rank computes in the same dtype.
        dtype = str(compute_dtype(config.dtype, config.model, config.quantization, config.device))
        config = dataclasses.replace(config, num_threads=threads, dtype=dtype.removeprefix("torch."))
        self._startup_s = config.distributed_timeout_s
        self._error: WorkerFailed | None = None
        ctx = mp.get_context("spawn")  # never fork a process that runs threads
        self._beats = ctx.Array("d", self.world_size, lock=False)  # 0 until a rank first stamps
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._send_failed: int | None = None  # a rank whose pipe would not take a step
        self._sender = threading.Thread(target=self._send_loop, name="servelm-step-sender", daemon=True)
        self._sender.start()
        port = _free_port()
        self._started = time.monotonic()
        atexit.register(self.shutdown)
        for rank in range(self.world_size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=run_worker, name=f"servelm-worker-{rank}", daemon=True,
                               args=(config, rank, port, theirs, self._beats, os.getpid()))
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)
        try:
            self.info = self._collect(loading=True)  # each rank's "ready" once loaded
        except BaseException:
            self.shutdown()
            raise

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids, in rank order (empty once shut down)."""
        return [p.pid for p in self._procs]

    def execute_model(self, step: SchedulerOutput) -> ModelRunnerOutput:
        self.submit(step)
        return self.collect()

    def submit(self, step: SchedulerOutput) -> None:
        """Every rank gets the step at once; the first pipeline stage starts on it while
        the later ones still work on earlier steps."""
        self.check_health()
        self._outbox.put(pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL))

    def _send_loop(self) -> None:
        """Write each queued message to every worker, in order, until None."""
        while (data := self._outbox.get()) is not None:
            for rank, conn in enumerate(list(self._conns)):
                try:
                    conn.send_bytes(data)
                except (OSError, ValueError):  # closed: its process is gone or going
                    self._send_failed = rank

    def collect(self) -> ModelRunnerOutput:
        """Each rank answers its steps in order, so the next reply of every rank is the
        oldest step's."""
        self.check_health()
        return self._collect()

    def export_request(self, req_id: str, block_ids: list[int]) -> tuple[list[KVPayload], bytes | None]:
        """Every rank's share of the request's K/V (its heads, its layers), in rank order."""
        replies = self._call(("export_request", req_id, block_ids))
        return [kv for kv, _ in replies], replies[self.output_rank][1]

    def import_kv(self, block_ids: list[int], payloads: list[KVPayload]) -> None:
        if len(payloads) != self.world_size:
            raise ValueError(f"K/V from an engine of {len(payloads)} worker processes; this one "
                             f"has {self.world_size}")
        self._call(("import_kv", block_ids, payloads))

    def _call(self, message: tuple) -> list[Any]:
        """Send a call to every rank (no step may be in flight: replies come in order)."""
        self.check_health()
        self._outbox.put(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        replies = self._collect(every=True)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _collect(self, loading: bool = False, every: bool = False) -> Any:
        """One reply from every rank; the output rank's payload (`every`: all, by rank)."""
        pending = set(range(self.world_size))
        replies: dict[int, Any] = {}
        result = None
        while pending:
            ready = wait([self._conns[r] for r in pending] + [p.sentinel for p in self._procs], _POLL_S)
            for obj in ready:
                if obj in self._conns:
                    rank = self._conns.index(obj)
                    try:
                        got, payload = obj.recv()
                    except (EOFError, OSError):
                        self._fail(f"worker rank {rank} closed its pipe")
                    if got == "error":
                        exc, text = payload
                        if loading and isinstance(exc, (ValueError, OSError)):
                            self._kill()  # bad input found while loading: raised as it is,
                            raise exc  # like one process would (the others would say the same)
                        self._fail(f"worker rank {rank} failed: {text}")
                    pending.discard(rank)
                    replies[rank] = payload
                    if rank == self.output_rank:
                        result = payload
            for rank, proc in enumerate(self._procs):
                if proc.exitcode is not None and rank in pending:
                    self._fail(f"worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")
            self._check_heartbeats()
        return [replies[r] for r in range(self.world_size)] if every else result

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for rank in range(self.world_size):
            beat = self._beats[rank]
            if beat == 0.0 and now - self._started > self._startup_s:
                self._fail(f"worker rank {rank} did not start within {self._startup_s:g}s "
                           "(distributed_timeout_s)")
            if beat and now - beat > HEARTBEAT_TIMEOUT_S:
                self._fail(f"worker rank {rank} (pid {self._procs[rank].pid}) has not answered "
                           f"for {now - beat:.1f}s: hung or stopped")

    def _fail(self, message: str) -> None:
        self._error = WorkerFailed(message)
        self._kill()
        raise self._error

    def check_health(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._procs:
            raise RuntimeError("the executor was shut down")
        if self._send_failed is not None:
            self._fail(f"worker rank {self._send_failed} is gone (its pipe closed)")
        dead = [r for r, p in enumerate(self._procs) if p.exitcode is not None]
        if dead:
            self._fail(f"worker rank {dead[0]} exited with code {self._procs[dead[0]].exitcode}")
        self._check_heartbeats()

    def shutdown(self) -> None:
        """Ask every worker to stop, give them a few seconds, then kill what is left."""
        if self._procs:
            self._outbox.put(pickle.dumps(None))  # after every step already queued
        self._outbox.put(None)
        deadline = time.monotonic() + 5.0
        self._sender.join(5.0)
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self._kill()
        atexit.unregister(self.shutdown)

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.exitcode is None:
                proc.kill()
        for proc in self._procs:
            proc.join(5.0)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
