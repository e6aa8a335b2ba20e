"""`servelm bench cold-start`: what scale-to-zero costs the first request after idle.

One replicas server with `--min-replicas 0` scales to zero after `--downscale-delay-s` of
idle; each repeat waits until /health lists no replica, sends one streamed completion and
times its first token and its end (the request waits while a replica starts), then sends
the same request again to the now warm replica. For scale, the same run times a plain
single-engine `servelm serve` from process start (Python imports included) to its first
token: what a cold start would cost without a cluster at all. One server at a time, so
none competes with another for the cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from servelm.bench.harness import (
    MissingExtra,
    Table,
    check_int,
    print_report,
    progress,
    require_extra,
    result_header,
    result_path,
    write_result,
)

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


@dataclass
class ColdStartConfig:
    model: str | None = None  # None: servelm's default model
    threads: int = 2
    dtype: str = "auto"
    max_model_len: int = 2048
    repeats: int = 3
    downscale_delay_s: float = 3.0
    max_tokens: int = 8
    scale_to_zero_timeout_s: float = 120.0
    result_file: str | None = None
    quiet: bool = False


def add_cold_start_parser(bsub: Any) -> None:
    p = bsub.add_parser("cold-start", help="first-token time of a replica scaled to zero, vs a "
                        "warm replica and a single engine from process start")
    p.add_argument("--model", default=None, help="HF folder or GGUF (default: servelm's default)")
    p.add_argument("--threads", type=int, default=2, help="threads of the engine (each server)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3, help="cold starts measured")
    p.add_argument("--downscale-delay-s", type=float, default=3.0,
                   help="idle seconds before the replica is stopped")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens of each timed completion")
    p.add_argument("--scale-to-zero-timeout-s", type=float, default=120.0,
                   help="longest wait for the replica to be stopped before each repeat")
    p.add_argument("--result-file", default=None, help="default: bench-results/cold-start-<date>.json")
    p.add_argument("--quiet", action="store_true", help="no progress or table")
    p.set_defaults(func=cmd_cold_start)


def cmd_cold_start(args: argparse.Namespace) -> int:
    cfg = ColdStartConfig(**{k: v for k, v in vars(args).items()
                             if k in ColdStartConfig.__dataclass_fields__})
    try:
        require_extra("servelm bench cold-start", "aiohttp")
        run_cold_start(cfg)
    except (MissingExtra, RuntimeError) as e:  # no extra; a server failed to start or answer
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, MissingExtra) else 1
    return 0


def validate(cfg: ColdStartConfig) -> None:
    for name in ("threads", "repeats", "max_tokens"):
        check_int("--" + name.replace("_", "-"), getattr(cfg, name))
    if not cfg.downscale_delay_s > 0:
        raise ValueError(f"--downscale-delay-s must be > 0, got {cfg.downscale_delay_s}")


def timed_request(url: str, model: str, max_tokens: int, t0: float) -> dict[str, float]:
    """One streamed completion: seconds from sending to its first token and to its end, and
    from `t0` to sending."""
    import asyncio

    import aiohttp

    from servelm.bench.serve_client import Target, stream_request

    async def send() -> Any:
        async with aiohttp.ClientSession() as session:
            rec, _ = await stream_request(session, Target(url, "/v1/completions", model), PROMPT,
                                          max_tokens, t0, lambda: 0, len)
            return rec

    rec = asyncio.run(send())
    if not rec.success:
        raise RuntimeError(f"request to {url} failed: {rec.error}")
    return {"sent_s": rec.start, "ttft_s": rec.ttft, "e2e_s": rec.latency}


def wait_scaled_to_zero(url: str, timeout_s: float) -> float:
    """Seconds until /health lists no replica at all (the last one drained and stopped)."""
    from servelm.bench.failover import fetch_health, replicas_of

    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        replicas = replicas_of(fetch_health(url))
        if replicas is None:
            raise RuntimeError(f"{url}/health lists no replicas: not a replicas server")
        if not replicas:
            return time.perf_counter() - start
        time.sleep(0.2)
    raise RuntimeError(f"the replica at {url} was not scaled to zero within {timeout_s:.0f}s")


def _ready_replica(url: str) -> dict[str, Any]:
    from servelm.bench.failover import fetch_health, replicas_of

    return next((r for r in replicas_of(fetch_health(url)) or [] if r.get("state") == "ready"), {})


def _server_cold_start_s(url: str) -> float | None:
    from servelm.bench.server_counters import scrape

    values = [v for (name, _), v in (scrape(url) or {}).items()
              if name == "servelm:last_cold_start_seconds"]
    return max(values) if values else None


def measure_cold_starts(cfg: ColdStartConfig, url: str, model: str,
                        say: Any) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    cold, warm = [], []
    for i in range(cfg.repeats):
        say(f"cold start {i + 1}/{cfg.repeats}: waiting for the replica to scale to zero ...")
        idle = wait_scaled_to_zero(url, cfg.scale_to_zero_timeout_s)
        run = timed_request(url, model, cfg.max_tokens, time.perf_counter())
        replica = _ready_replica(url)
        cold.append({"ttft_s": run["ttft_s"], "e2e_s": run["e2e_s"],
                     "replica_ready_s": replica.get("ready_s"), "replica": replica.get("name"),
                     "server_cold_start_s": _server_cold_start_s(url), "waited_for_zero_s": idle})
        warm_run = timed_request(url, model, cfg.max_tokens, time.perf_counter())
        warm.append({"ttft_s": warm_run["ttft_s"], "e2e_s": warm_run["e2e_s"]})
    return cold, warm


def summarize(cold: list[dict[str, Any]], warm: list[dict[str, Any]],
              single: dict[str, float]) -> dict[str, Any]:
    """Medians of the repeats, next to the single engine's process-start figures."""
    def median(rows: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else None

    cold_ttft, warm_ttft = median(cold, "ttft_s"), median(warm, "ttft_s")
    return {"cold_ttft_s": cold_ttft, "cold_e2e_s": median(cold, "e2e_s"),
            "replica_ready_s": median(cold, "replica_ready_s"),
            "server_cold_start_s": median(cold, "server_cold_start_s"),
            "warm_ttft_s": warm_ttft, "warm_e2e_s": median(warm, "e2e_s"),
            "cold_over_warm_ttft": cold_ttft / warm_ttft if cold_ttft and warm_ttft else None,
            "single_engine_first_token_s": single.get("first_token_s"),
            "single_engine_ready_s": single.get("ready_s")}


def run_cold_start(cfg: ColdStartConfig) -> dict[str, Any]:
    from servelm.bench.launch import LaunchSpec, launched
    from servelm.bench.serve import first_model_id

    validate(cfg)
    say = progress(cfg.quiet)
    out = result_path(cfg.result_file, "cold-start")
    logs = out.parent / "logs"
    spec = LaunchSpec(model=cfg.model, num_threads=cfg.threads, dtype=cfg.dtype,
                      max_model_len=cfg.max_model_len, replicas=1, min_replicas=0, max_replicas=1,
                      downscale_delay_s=cfg.downscale_delay_s)
    say("starting a replicas server that may scale to zero ...")
    with launched("servelm-replicas", spec, logs) as url:
        model = first_model_id(url, None)
        cold, warm = measure_cold_starts(cfg, url, model, say)
    say("starting a single-engine server ...")
    start = time.perf_counter()
    with launched("servelm", spec, logs) as url:
        ready = time.perf_counter() - start
        run = timed_request(url, model, cfg.max_tokens, start)
    single = {"ready_s": ready, "first_token_s": run["sent_s"] + run["ttft_s"],
              "end_s": run["sent_s"] + run["e2e_s"]}
    result = {**result_header("cold-start", cfg.dtype), "config": asdict(cfg), "model_id": model,
              "cold_starts": cold, "warm": warm, "single_engine": single,
              "summary": summarize(cold, warm, single)}
    write_result(result, out)
    if not cfg.quiet:
        print_report([cold_start_table(result)], _notes(result, logs))
    return result


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def cold_start_table(result: dict[str, Any]) -> Table:
    cfg, summary = result["config"], result["summary"]
    table = Table(f"cold start: {result['model_id']}, one replica stopped after "
                  f"{cfg['downscale_delay_s']:g}s idle, {cfg['max_tokens']} tokens, "
                  f"{cfg['threads']} threads", ["", "first token s", "end s", "ready s"])
    for i, c in enumerate(result["cold_starts"], 1):
        table.add_row(f"cold start {i}", _s(c["ttft_s"]), _s(c["e2e_s"]), _s(c["replica_ready_s"]))
    table.add_row("cold start, median", _s(summary["cold_ttft_s"]), _s(summary["cold_e2e_s"]),
                  _s(summary["replica_ready_s"]))
    table.add_row("warm replica, median", _s(summary["warm_ttft_s"]), _s(summary["warm_e2e_s"]), "-")
    single = result["single_engine"]
    table.add_row("single engine from process start", _s(single["first_token_s"]),
                  _s(single["end_s"]), _s(single["ready_s"]))
    return table


def _notes(result: dict[str, Any], logs: Path) -> list[str]:
    summary = result["summary"]
    ratio, server = summary["cold_over_warm_ttft"], summary["server_cold_start_s"]
    return [
        "cold start: request sent to a server with no replica; ready s = the replica's own "
        "start (Ray actor created to engine ready, from /health)",
        "single engine: ready s = process start to /v1/models answering (imports included)",
        *([f"cold first token is {ratio:.0f}x a warm replica's"] if ratio else []),
        *([f"server's own figure (servelm:last_cold_start_seconds), median: {server:.2f}s"]
          if server else []),
        f"results: {result['result_file']}", f"server logs: {logs}",
    ]
