"""`servelm bench serve`: an online load generator for any OpenAI-compatible server.

Conversations arrive by a gamma process at a fixed rate (burstiness 1 = Poisson; < 1 burstier,
> 1 smoother), all at once (rate inf) or under a concurrency cap, each turn streamed and timed
by serve_client. A comma-separated `--request-rate` sweeps rates in one run, which is how
throughput-versus-latency curves and goodput under SLOs are made. Around each run the
server's own counters are read (server_counters), and `--kill-replica-at` kills a replica
part-way through it (failover).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from servelm.bench.failover import FLAG as KILL_FLAG
from servelm.bench.failover import ReplicaKiller, require_replicas, wait_all_ready
from servelm.bench.harness import measure, progress, result_header, result_path, write_result
from servelm.bench.launch import REPLICA_SYSTEMS, SYSTEMS, LaunchSpec
from servelm.bench.serve_client import Target, stream_request
from servelm.bench.serve_datasets import (
    Conversation,
    DatasetOptions,
    build_conversations,
    render_messages,
    render_prompt,
    send_times,
)
from servelm.bench.serve_metrics import RequestRecord, compute_metrics, metric_samples
from servelm.bench.server_counters import counter_deltas, scrape


@dataclass
class ServeConfig:
    """Everything a run depends on (recorded in the result file)."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first id the server lists
    tokenizer: str | None = None  # None: --model if it is a local path, else servelm's default
    api_key: str | None = None
    dataset: DatasetOptions = field(default_factory=DatasetOptions)
    request_rates: list[float] = field(default_factory=lambda: [math.inf])
    burstiness: float = 1.0
    max_concurrency: int | None = None
    max_duration_s: float | None = None
    request_timeout_s: float = 600.0
    goodput: dict[str, float] = field(default_factory=dict)
    fluidity: tuple[float, float] | None = None  # (TTFT, TBT) ms targets of the fluidity-index
    percentile_metrics: list[str] = field(default_factory=lambda: ["ttft", "tpot", "itl", "e2el"])
    metric_percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0, 99.0])
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)  # e.g. a response_format for every request
    seed: int = 0
    kill_replica_at: float | None = None  # seconds into each run: SIGKILL the busiest replica
    launch: list[str] = field(default_factory=list)  # start these servers instead of base_url
    launch_spec: LaunchSpec = field(default_factory=LaunchSpec)
    result_file: str | None = None
    save_detailed: bool = False
    plots: bool = True
    quiet: bool = False


def validate(cfg: ServeConfig) -> None:
    """Fail before any traffic, naming the flag at fault."""
    if cfg.endpoint not in ("/v1/completions", "/v1/chat/completions"):
        raise ValueError(f"--endpoint must be /v1/completions or /v1/chat/completions, "
                         f"got {cfg.endpoint!r}")
    if not cfg.base_url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got {cfg.base_url!r}")
    if not cfg.request_rates or any(not r > 0 for r in cfg.request_rates):
        raise ValueError(f"--request-rate values must be > 0 (or inf), got {cfg.request_rates}")
    if not cfg.burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {cfg.burstiness}")
    if cfg.max_concurrency is not None and cfg.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {cfg.max_concurrency}")
    if cfg.max_duration_s is not None and not cfg.max_duration_s > 0:
        raise ValueError(f"--max-duration must be > 0 seconds, got {cfg.max_duration_s}")
    if not cfg.request_timeout_s > 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, got {cfg.request_timeout_s}")
    if any(not 0 < p < 100 for p in cfg.metric_percentiles):
        raise ValueError(f"--metric-percentiles must be in (0, 100), got {cfg.metric_percentiles}")
    unknown = [s for s in cfg.launch if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"--launch: unknown {unknown}; allowed {','.join(SYSTEMS)}")
    if cfg.launch_spec.replicas < 1:
        raise ValueError(f"--launch-replicas must be >= 1, got {cfg.launch_spec.replicas}")
    if cfg.launch_spec.replicas != 1 and not set(cfg.launch) & set(REPLICA_SYSTEMS):
        raise ValueError(f"--launch-replicas applies to --launch {','.join(REPLICA_SYSTEMS)}")
    if min(cfg.launch_spec.prefill_replicas, cfg.launch_spec.decode_replicas) < 1:
        raise ValueError("--launch-prefill-replicas and --launch-decode-replicas must be >= 1")
    if cfg.kill_replica_at is not None:
        if not cfg.kill_replica_at > 0:
            raise ValueError(f"{KILL_FLAG} must be > 0 seconds, got {cfg.kill_replica_at}")
        single = [s for s in cfg.launch if s not in REPLICA_SYSTEMS]
        if single:
            raise ValueError(f"{KILL_FLAG} kills a replica; --launch {','.join(single)} has "
                             f"none (launch only {','.join(REPLICA_SYSTEMS)})")
    if cfg.fluidity is not None and (len(cfg.fluidity) != 2
                                     or not all(math.isfinite(v) and v > 0 for v in cfg.fluidity)):
        raise ValueError(f"--fluidity needs two targets > 0 ms (TTFT_MS:TBT_MS), got {cfg.fluidity}")
    bad = [m for m in cfg.percentile_metrics if m not in ("ttft", "tpot", "itl", "e2el")]
    if bad:
        raise ValueError(f"--percentile-metrics: unknown {bad}; allowed ttft,tpot,itl,e2el")


def first_model_id(base_url: str, api_key: str | None) -> str:
    """The first model the server lists at /v1/models (what `--model` defaults to)."""
    req = urllib.request.Request(base_url.rstrip("/") + "/v1/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = json.loads(resp.read())["data"]
        return str(data[0]["id"])
    except Exception as e:
        raise RuntimeError(f"cannot list models at {base_url}/v1/models ({e}); is the server "
                           "up? pass --model to skip this") from None


class _Turns:
    """Renders a conversation's turn for the target endpoint and counts its tokens."""

    def __init__(self, tokenizer: Any, chat: bool) -> None:
        self.tok, self.chat = tokenizer, chat

    def prompt(self, conv: Conversation, turn: int, answers: list[str]) -> str | list[dict[str, str]]:
        if conv.raw and not self.chat:
            return conv.user_turns[turn]
        messages = render_messages(conv, turn, answers)
        return messages if self.chat else render_prompt(self.tok, messages)

    def count_prompt(self, prompt: str | list[dict[str, str]]) -> int:
        if isinstance(prompt, str):
            return len(self.tok.encode(prompt, add_special_tokens=False))
        return len(self.tok.encode(render_prompt(self.tok, prompt), add_special_tokens=False))

    def count_output(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def common_prefix(self, convs: list[Conversation]) -> int:
        """Tokens every conversation's first prompt opens with (a chat template's, a system
        prompt's): what a replay of the run (`servelm simulate run --trace`) has them share."""
        prompts = []
        for conv in convs:
            prompt = self.prompt(conv, 0, [])
            text = prompt if isinstance(prompt, str) else render_prompt(self.tok, prompt)
            prompts.append(self.tok.encode(text, add_special_tokens=False))
        return len(os.path.commonprefix(prompts)) if len(prompts) > 1 else 0


async def run_rate(target: Target, convs: list[Conversation], turns: _Turns, rate: float,
                   cfg: ServeConfig) -> tuple[list[RequestRecord], float]:
    """All conversations at one request rate; returns the records and the run's wall time."""
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    records: list[RequestRecord] = []
    t0 = time.perf_counter()

    async def converse(idx: int, conv: Conversation, session: Any) -> None:
        answers: list[str] = []
        for turn, max_tokens in enumerate(conv.output_lens):
            prompt = turns.prompt(conv, turn, answers)
            async with sem or contextlib.nullcontext():
                rec, text = await stream_request(
                    session, target, prompt, max_tokens, t0,
                    lambda p=prompt: turns.count_prompt(p), turns.count_output)
            rec.session, rec.turn = idx, turn
            records.append(rec)
            if not rec.success:
                return  # the rest of this conversation depends on an answer it did not get
            answers.append(text)

    # No hidden client-side cap on concurrency, and a fresh connection per request: reusing a
    # kept-alive one that the server has just closed (llama-server closes idle ones) fails
    # the request with "Can not write request body" before it reaches the server.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        for idx, (conv, at) in enumerate(zip(convs, send_times(len(convs), rate, cfg.burstiness,
                                                               cfg.seed))):
            if cfg.max_duration_s is not None and at >= cfg.max_duration_s:
                break
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(converse(idx, conv, session)))
        await asyncio.gather(*tasks)
    return records, time.perf_counter() - t0


async def _check_endpoint(target: Target, turns: _Turns, conv: Conversation) -> None:
    """One short request first: a wrong URL, model or key fails fast with the server's reason."""
    async with aiohttp.ClientSession() as session:
        rec, _ = await stream_request(session, target, turns.prompt(conv, 0, []), 4,
                                      time.perf_counter(), lambda: 0, turns.count_output)
    if not rec.success:
        raise RuntimeError(f"test request to {target.url} failed: {rec.error}")


def _detail(records: list[RequestRecord]) -> list[dict[str, Any]]:
    return [{"session": r.session, "turn": r.turn, "success": r.success, "error": r.error,
             "start_s": r.start, "prompt_len": r.prompt_len, "output_len": r.output_len,
             "ttft_s": r.ttft, "latency_s": r.latency, "itl_s": r.itl} for r in records]


def measure_target(cfg: ServeConfig, base_url: str, tokenizer: Any, convs: list[Conversation],
                   ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[Any, dict[str, list[float]]]]:
    """Every rate against one server: (target info, one result per rate, samples per rate)."""
    say = progress(cfg.quiet)
    model = cfg.model or first_model_id(base_url, cfg.api_key)
    banned = tuple(getattr(tokenizer, "all_special_ids", None) or ()) if cfg.ignore_eos else ()
    target = Target(base_url, cfg.endpoint, model, cfg.api_key, cfg.ignore_eos,
                    cfg.request_timeout_s, banned, tuple(cfg.extra_body.items()))
    turns = _Turns(tokenizer, target.chat)
    asyncio.run(_check_endpoint(target, turns, convs[0]))
    if cfg.kill_replica_at is not None:
        require_replicas(base_url)
    runs, samples = [], {}
    for i, rate in enumerate(cfg.request_rates):
        if i and cfg.dataset.name == "random":
            # new prompts at each rate: the server's prefix cache still holds the last rate's
            convs = build_conversations(tokenizer, dataclasses.replace(cfg.dataset, seed=cfg.dataset.seed + i))
        killer = None
        if cfg.kill_replica_at is not None:
            wait_all_ready(base_url)
            killer = ReplicaKiller(base_url, cfg.kill_replica_at)
        before = scrape(base_url)
        say(f"rate {rate} req/s: {len(convs)} conversations to {target.url} ...")
        if killer is not None:
            killer.start()
        timed = measure(lambda rate=rate, convs=convs: asyncio.run(run_rate(target, convs, turns, rate, cfg)))
        records, duration = timed.value
        run = {"request_rate": "inf" if math.isinf(rate) else rate,
               **compute_metrics(records, duration, cfg.metric_percentiles,
                                 cfg.percentile_metrics, cfg.goodput, cfg.fluidity)}
        run.update(timed.energy.as_dict(run["total_output_tokens"]))
        if killer is not None:
            run["replica_killed"] = killer.finish()
        counters = counter_deltas(before, scrape(base_url))
        if counters:
            run["server_counters"] = counters
        if cfg.save_detailed:
            run["requests"] = _detail(records)
            run["common_prefix_tokens"] = turns.common_prefix(convs)
        runs.append(run)
        samples[run["request_rate"]] = metric_samples(records)
    return {"base_url": base_url, "model_id": model}, runs, samples


def run_serve(cfg: ServeConfig) -> dict[str, Any]:
    """Run every rate (on every launched system), print tables, write JSON + PNG plots."""
    from servelm.bench.launch import launched
    from servelm.model.loader import load_tokenizer

    validate(cfg)
    if cfg.launch:
        tok_source = cfg.tokenizer or cfg.launch_spec.model
    else:
        tok_source = cfg.tokenizer or (cfg.model if cfg.model and Path(cfg.model).exists() else None)
    tokenizer = load_tokenizer(tok_source)
    convs = build_conversations(tokenizer, cfg.dataset)
    out = result_path(cfg.result_file, "serve")
    result: dict[str, Any] = {
        **result_header("serve"),
        "endpoint": cfg.endpoint, "tokenizer": tok_source or "servelm default model",
        "dataset": vars(cfg.dataset), "num_conversations": len(convs),
        "num_turns": sum(len(c.user_turns) for c in convs),
        "burstiness": cfg.burstiness, "max_concurrency": cfg.max_concurrency,
        "max_duration_s": cfg.max_duration_s, "ignore_eos": cfg.ignore_eos,
        "extra_body": cfg.extra_body,
    }
    systems: dict[str, list[dict[str, Any]]] = {}
    plots = []
    if cfg.launch:
        result["launch"] = vars(cfg.launch_spec)
        result["systems"] = {}
        for system in cfg.launch:
            with launched(system, cfg.launch_spec, out.parent / "logs") as url:
                info, runs, samples = measure_target(cfg, url, tokenizer, convs)
            result["systems"][system] = {**info, "runs": runs}
            systems[system] = runs
            if cfg.plots:
                plots.append(_cdf_plot(samples, out, f"-{system}"))
    else:
        info, runs, samples = measure_target(cfg, cfg.base_url, tokenizer, convs)
        result.update(info)
        result.update(runs[0] if len(runs) == 1 else {"runs": runs})
        systems[""] = runs
        if cfg.plots:
            plots.append(_cdf_plot(samples, out, ""))
    if cfg.plots and (len(cfg.request_rates) > 1 or len(systems) > 1):
        from servelm.bench.serve_plots import plot_sweep

        plots.append(str(plot_sweep(systems, cfg.metric_percentiles,
                                    out.with_name(out.stem + "-sweep.png"))))
    if plots:
        result["plots"] = plots
    write_result(result, out)
    if not cfg.quiet:
        from servelm.bench.serve_report import print_serve_report

        print_serve_report(systems, cfg, result)
    return result


def _cdf_plot(samples: dict[Any, dict[str, list[float]]], out: Path, suffix: str) -> str:
    from servelm.bench.serve_plots import plot_cdfs

    return str(plot_cdfs(samples, out.with_name(f"{out.stem}{suffix}-cdf.png")))
