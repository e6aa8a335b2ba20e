"""The main function of one worker process of the multi-process executor (multiproc.py).

It joins the process group, loads its part of the model and then runs each step it reads
from its pipe until told to stop or the pipe closes. Beside that, a thread stamps its
heartbeat twice a second (a stopped or wedged process stops stamping) and ends the process
when the engine's process is gone, so no worker outlives the engine.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from servelm.config import EngineConfig

HEARTBEAT_EVERY_S = 0.5


def run_worker(config: EngineConfig, rank: int, port: int, conn: Connection, beats: Any,
               parent_pid: int) -> None:
    _die_with_parent()
    threading.Thread(target=_heartbeat, args=(beats, rank, parent_pid), daemon=True,
                     name="servelm-heartbeat").start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the engine stops us
    from servelm.distributed.parallel import destroy_parallel, init_parallel
    from servelm.worker.device import resolve_device
    from servelm.worker.worker import Worker

    try:
        parallel = init_parallel(config.tensor_parallel_size, config.pipeline_parallel_size, rank,
                                 port, config.distributed_timeout_s, config.allreduce,
                                 resolve_device(config.device, rank))
        worker = Worker(config, parallel)
        conn.send(("ready", worker.info))
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):  # the engine is gone
                break
            step = pickle.loads(data)
            if step is None:
                break
            if isinstance(step, tuple):  # a call to every rank, between steps
                conn.send(("out", _call(worker, rank, step)))
                continue
            out = worker.execute_model(step)
            conn.send(("out", out if parallel.is_output_rank else None))
    except BaseException as exc:  # the engine reports it; the other ranks are out of step now
        text = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
        try:
            pickle.dumps(exc)
        except Exception:
            exc = None  # the engine gets the text alone
        try:
            conn.send(("error", (exc, text)))
        except OSError:
            pass
        os._exit(1)  # not a clean teardown: peers may be blocked in a collective with us
    destroy_parallel()


def _call(worker: Any, rank: int, message: tuple) -> Any:
    """("export_request", req_id, block_ids) or ("import_kv", block_ids, one payload per
    rank). A payload this rank cannot take comes back as the ValueError, not a crash."""
    kind, *args = message
    try:
        if kind == "export_request":
            return worker.export_request(*args)
        block_ids, payloads = args
        return worker.import_kv(block_ids, payloads[rank])
    except ValueError as exc:
        return exc


def _heartbeat(beats: Any, rank: int, parent_pid: int) -> None:
    while True:
        beats[rank] = time.monotonic()
        if os.getppid() != parent_pid:  # orphaned: the engine died without stopping us
            os._exit(1)
        time.sleep(HEARTBEAT_EVERY_S)


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies, even mid-step."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the heartbeat thread's parent check covers it
