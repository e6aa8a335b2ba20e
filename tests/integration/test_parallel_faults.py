"""A worker that dies or hangs becomes an error within seconds, never a hang; shutting
down, or the engine's process dying, leaves no worker behind; a bad split or a process
group that cannot form says what to check."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from servelm import LLM, SamplingParams
from servelm.executor import multiproc
from servelm.executor.multiproc import WorkerFailed

pytestmark = pytest.mark.multiprocess
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, just not yet reaped
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_killed_worker_fails_the_next_step_fast(tiny_model_dir, make_llm):
    llm = make_llm(tiny_model_dir("llama"), dtype="float32", tensor_parallel_size=2)
    assert llm.generate([[5, 6, 7]], PARAMS, use_tqdm=False)[0].outputs[0].token_ids
    os.kill(llm.engine.executor.pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match="worker rank 1"):
        llm.generate([[5, 6, 7]], PARAMS, use_tqdm=False)
    assert time.monotonic() - start < 5
    pids = llm.engine.executor.pids
    llm.shutdown()
    assert wait_gone(pids, 5)


def test_stopped_worker_is_reported_as_hung(tiny_model_dir, make_llm, monkeypatch):
    monkeypatch.setattr(multiproc, "HEARTBEAT_TIMEOUT_S", 2.0)
    llm = make_llm(tiny_model_dir("llama"), dtype="float32", pipeline_parallel_size=2)
    os.kill(llm.engine.executor.pids[1], signal.SIGSTOP)  # a stopped rank neither dies nor answers
    time.sleep(0.6)  # past its last heartbeat
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match="hung or stopped"):
        llm.generate([[5, 6, 7]], PARAMS, use_tqdm=False)
    assert time.monotonic() - start < 4
    llm.shutdown()  # kills the stopped process too


def test_workers_die_with_the_engine_process(tiny_model_dir, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from servelm import LLM
        if __name__ == "__main__":
            llm = LLM({str(tiny_model_dir("llama"))!r}, dtype="float32", tensor_parallel_size=2)
            print(*llm.engine.executor.pids, flush=True)
            time.sleep(120)
    """)
    (tmp_path / "engine.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "engine.py")], stdout=subprocess.PIPE,
                            text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
    assert wait_gone(pids, 5), "workers outlived the engine's process"


def test_a_split_the_model_cannot_take_is_refused_up_front(tiny_model_dir):
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(3\) must divide num_attention_heads \(4\)"):
        LLM(str(tiny_model_dir("llama")), tensor_parallel_size=3)


def test_bad_input_found_by_the_workers_is_raised_as_by_one_process(tiny_model_dir):
    with pytest.raises(ValueError, match=r"max_model_len \(4096\) exceeds the model's context length"):
        LLM(str(tiny_model_dir("llama")), dtype="float32", pipeline_parallel_size=2, max_model_len=4096)


def test_a_process_group_that_cannot_form_says_what_to_check(tiny_model_dir, monkeypatch):
    """The rendezvous port is taken: rank 0 cannot serve it, and says so."""
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        monkeypatch.setattr(multiproc, "_free_port", lambda: blocker.getsockname()[1])
        start = time.monotonic()
        with pytest.raises(WorkerFailed, match="could not join the process group"):
            LLM(str(tiny_model_dir("llama")), dtype="float32", tensor_parallel_size=2,
                distributed_timeout_s=5)
        assert time.monotonic() - start < 30
