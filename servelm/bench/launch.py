"""Start a peer's OpenAI-compatible server for `bench serve --launch`, then stop it.

One command then measures servelm and its peers on the same weights, threads and workload,
one server at a time so they never compete for the cores: servelm's own `serve` (also as
`servelm-no-prefix-cache`, `servelm-cpu-offload` with a CPU tier under its prefix cache, or
`servelm-sjf` etc. under another scheduling policy, `servelm-sjf-learned` with a trained
output-length predictor, `servelm-replicas-<router>` as several engine replicas on Ray with the
threads shared out among them, so one engine and N replicas compare on the same cores),
llama.cpp's own C++ `llama-server` (continuous batching over `LLAMA_SERVER_SLOTS` slots
sharing one unified KV cache; the binary from --launch-llama-server, $SERVELM_LLAMA_SERVER
or PATH) and the llama.cpp server of llama-cpp-python (`python -m llama_cpp.server`, one
request at a time, optional extra), each on a free 127.0.0.1 port, reading the same GGUF file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from servelm.cluster.router import POLICIES as ROUTERS

POLICY_VARIANTS = tuple(f"servelm-{p}" for p in ("fcfs", "priority", "sjf", "mlfq"))
# `servelm-replicas` routes by LaunchSpec.router, the others by the router they name
REPLICA_SYSTEMS = ("servelm-replicas", *(f"servelm-replicas-{r}" for r in ROUTERS))
DISAGG = "servelm-disagg"  # --launch-prefill-replicas + --launch-decode-replicas on Ray
SYSTEMS = ("servelm", "servelm-no-prefix-cache", "servelm-cpu-offload", *POLICY_VARIANTS,
           "servelm-sjf-learned", *REPLICA_SYSTEMS, DISAGG, "llama-server", "llama.cpp")
CPU_OFFLOAD_GB = 4.0  # servelm-cpu-offload's CPU tier
LLAMA_SERVER_SLOTS = 32  # requests llama-server runs at once


@dataclass(frozen=True)
class LaunchSpec:
    """What every launched server gets: the same model file, threads and context size."""

    model: str | None = None  # None: servelm's default GGUF
    num_threads: int = 2
    dtype: str = "auto"  # servelm only; llama.cpp computes with the file's own quant types
    max_model_len: int = 4096
    max_num_seqs: int | None = None  # servelm only: a small batch makes requests queue
    kv_cache_memory_gb: float | None = None  # servelm only: a small cache forces eviction
    length_predictor: str | None = None  # servelm-sjf-learned's predictor file
    preemption_mode: str | None = None  # servelm only: "recompute" or "swap"
    tensor_parallel_size: int = 1  # servelm only: worker processes; threads shared out among them
    pipeline_parallel_size: int = 1
    replicas: int = 1  # servelm-replicas-*: engine replicas, threads shared out among them
    router: str = "prefix-aware"  # servelm-replicas' routing policy
    min_replicas: int | None = None  # servelm-replicas-*: autoscaling bounds (default: replicas)
    max_replicas: int | None = None
    downscale_delay_s: float | None = None
    migrate_imbalance: int | None = None  # replicas: live migration's trigger (None: servelm's)
    prefill_replicas: int = 1  # servelm-disagg
    decode_replicas: int = 1
    llama_server: str | None = None  # llama-server binary (default: $SERVELM_LLAMA_SERVER, PATH)
    startup_timeout_s: float = 180.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gguf(model: str | None) -> str:
    from servelm.model.default_model import default_model_path

    path = Path(default_model_path() if model is None else model).expanduser().resolve()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ValueError(f"--launch-model: llama.cpp needs one .gguf file, {path} has {len(ggufs)}")
        path = ggufs[0]
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"--launch-model: llama.cpp needs a .gguf file, got {path}")
    return str(path)


def server_command(system: str, spec: LaunchSpec, port: int) -> list[str]:
    if system.startswith("servelm"):
        ranks = spec.tensor_parallel_size * spec.pipeline_parallel_size
        engines = (spec.replicas if system in REPLICA_SYSTEMS else
                   spec.prefill_replicas + spec.decode_replicas if system == DISAGG else 1)
        processes = ranks * engines
        threads = max(1, spec.num_threads // processes)
        cmd = [sys.executable, "-m", "servelm.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--num-threads", str(threads),
               "--dtype", spec.dtype, "--max-model-len", str(spec.max_model_len)]
        if system in REPLICA_SYSTEMS or system == DISAGG:
            cmd += _replica_flags(system, spec, threads)
        if ranks > 1:
            cmd += ["--tensor-parallel-size", str(spec.tensor_parallel_size),
                    "--pipeline-parallel-size", str(spec.pipeline_parallel_size)]
        if system == "servelm-no-prefix-cache":  # the same server with prefix caching off
            cmd.append("--no-enable-prefix-caching")
        if system == "servelm-cpu-offload":
            cmd += ["--cpu-offload-gb", str(CPU_OFFLOAD_GB)]
        if system in POLICY_VARIANTS:  # the same server under another scheduling policy
            cmd += ["--scheduling-policy", system.removeprefix("servelm-")]
        if system == "servelm-sjf-learned":
            if spec.length_predictor is None:
                raise ValueError("--launch servelm-sjf-learned needs --launch-length-predictor")
            cmd += ["--scheduling-policy", "sjf", "--length-predictor", spec.length_predictor]
        if spec.max_num_seqs is not None:
            cmd += ["--max-num-seqs", str(spec.max_num_seqs)]
        if spec.preemption_mode is not None:
            cmd += ["--preemption-mode", spec.preemption_mode]
        if spec.kv_cache_memory_gb is not None:
            cmd += ["--kv-cache-memory-gb", str(spec.kv_cache_memory_gb)]
        return cmd + (["--model", spec.model] if spec.model else [])
    if system == "llama-server":
        import shutil

        binary = spec.llama_server or os.environ.get("SERVELM_LLAMA_SERVER") or shutil.which("llama-server")
        if not binary or not os.access(binary, os.X_OK):
            raise ValueError("--launch llama-server needs llama.cpp's llama-server binary: give "
                             "--launch-llama-server PATH, set SERVELM_LLAMA_SERVER, or put it on "
                             "PATH (docs/benchmarks.md says how to build it)")
        return [binary, "-m", _gguf(spec.model), "--host", "127.0.0.1", "--port", str(port),
                "-t", str(spec.num_threads), "-tb", str(spec.num_threads),
                "-np", str(LLAMA_SERVER_SLOTS), "--kv-unified",
                "-c", str(spec.max_model_len * LLAMA_SERVER_SLOTS), "--no-webui",
                # an HTTP thread per slot: with its default (one per core) concurrent streams
                # beyond that were refused ("Can not write request body")
                "--threads-http", str(LLAMA_SERVER_SLOTS + 4)]
    if system == "llama.cpp":
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise ValueError("--launch llama.cpp needs llama-cpp-python: "
                             "pip install 'servelm[peers]' (builds llama.cpp, several minutes)")
        return [sys.executable, "-m", "llama_cpp.server", "--model", _gguf(spec.model),
                "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(spec.num_threads),
                "--n_threads_batch", str(spec.num_threads), "--n_ctx", str(spec.max_model_len),
                # queue concurrent requests instead of aborting the running one (its default)
                "--interrupt_requests", "False"]
    raise ValueError(f"--launch: unknown system {system!r}; allowed {SYSTEMS}")


def _replica_flags(system: str, spec: LaunchSpec, threads: int) -> list[str]:
    """Ray reserves as many CPUs per engine process as it has threads, so replicas never
    share a core while one engine's threads are free."""
    if system == DISAGG:
        flags = ["--prefill-replicas", str(spec.prefill_replicas), "--decode-replicas",
                 str(spec.decode_replicas), "--router", spec.router]
    else:
        router = system.removeprefix("servelm-replicas").removeprefix("-") or spec.router
        flags = ["--replicas", str(spec.replicas), "--router", router]
    flags += ["--replica-cpus", str(threads)]
    for flag, value in (("--min-replicas", spec.min_replicas), ("--max-replicas", spec.max_replicas),
                        ("--downscale-delay-s", spec.downscale_delay_s),
                        ("--migrate-imbalance", spec.migrate_imbalance)):
        if value is not None:
            flags += [flag, str(value)]
    return flags


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} during startup; "
                               f"log: {log}\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as resp:
                if resp.status == 200 and json.loads(resp.read()).get("data"):
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(0.1)  # fine-grained: `bench cold-start` times process start to first token
    raise RuntimeError(f"server not ready after {timeout_s:.0f}s; log: {log}")


@contextlib.contextmanager
def launched(system: str, spec: LaunchSpec, log_dir: Path) -> Iterator[str]:
    """Run `system`'s server for the duration of the block; yields its base URL."""
    port = _free_port()
    cmd = server_command(system, spec, port)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{system}-server.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.num_threads)}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, spec.startup_timeout_s, log)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
