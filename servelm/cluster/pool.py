"""All replicas of one served model: routing, handovers, retries when a replica is lost,
live migration, and autoscaling. It is what the HTTP API serves (a `ServedModel`), so the
API, streaming and errors are those of a single engine.

Colocated (`--replicas N`): one group of replicas that each prefill and decode. The router
picks one for each request. Disaggregated (`--prefill-replicas P --decode-replicas D`):
the router picks a prefill replica (prefix-aware by default: prefix caching works there),
which computes the prompt and the first token and hands the request over with its K/V; the
least-loaded decode replica goes on with it. Either way a request's stream is a series of
legs, one per replica it runs on, joined so the client sees one stream (`_Joiner`).

When a replica is lost (died, hung, its engine dead) it leaves rotation at once and the
request goes on elsewhere: from the start while nothing of it reached the client, from its
last handover once it had one (the new replica recomputes from there, and what the client
already has is not sent again), and otherwise it fails with an error saying the output is
incomplete.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from servelm.cluster.autoscale import AutoscaleOptions
from servelm.cluster.group import ReplicaGroup
from servelm.cluster.handle import ReplicaHandle, ReplicaLost
from servelm.cluster.kv_transport import Handover
from servelm.cluster.migration import Flight, Migrations, migrate, pick_to_balance
from servelm.cluster.options import ClusterOptions, ModelSpec
from servelm.engine.async_engine import EngineStepError
from servelm.engine.engine import PromptInput
from servelm.model.loader import load_tokenizer
from servelm.outputs import RequestOutput
from servelm.sampling_params import SamplingParams

logger = logging.getLogger("servelm.cluster")


class ReplicaPool:
    def __init__(self, spec: ModelSpec, options: ClusterOptions) -> None:
        self.name, self.spec, self.options = spec.name, spec, options
        self.tokenizer = load_tokenizer(spec.engine.get("model"))
        router = spec.router or options.router
        if spec.disaggregated:
            fixed = [AutoscaleOptions(n, n, options.target_requests)
                     for n in (spec.prefill_replicas, spec.decode_replicas)]
            self.groups = [ReplicaGroup(spec, options, "prefill", router, fixed[0]),
                           ReplicaGroup(spec, options, "decode", "least-loaded", fixed[1])]
        else:
            self.groups = [ReplicaGroup(spec, options, "both", router, spec.autoscale(options))]
        self.groups[-1].on_drain = self._drain
        self.flights: dict[str, Flight] = {}
        self.migrations = Migrations()
        self.num_retried = self.num_failed = self.num_cold_starts = self.num_handovers = 0
        self.last_cold_start_s: float | None = None
        self._ids = itertools.count()
        self._balancer: asyncio.Task | None = None

    # ---- ServedModel ----------------------------------------------------------------
    @property
    def max_model_len(self) -> int | None:
        return self.groups[0].info.get("max_model_len")  # known once a replica has started

    @property
    def vocab_size(self) -> int:
        return self.groups[0].info.get("vocab_size", len(self.tokenizer))

    @property
    def num_waiting(self) -> int:
        return sum(g.pending + sum(r.stats.get("num_waiting", 0) for r in g.ready()) for g in self.groups)

    @property
    def replicas(self) -> dict[str, ReplicaHandle]:
        return {name: r for g in self.groups for name, r in g.replicas.items()}

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    async def start(self) -> None:
        """Launch the initial replicas and wait until every one is ready."""
        counts = ([self.spec.prefill_replicas, self.spec.decode_replicas] if self.spec.disaggregated
                  else [self.spec.initial_replicas])
        await asyncio.gather(*(g.start(n) for g, n in zip(self.groups, counts)))
        self._balancer = asyncio.create_task(self._balance())

    async def stop(self) -> None:
        if self._balancer is not None:
            self._balancer.cancel()
        for g in self.groups:
            await g.stop()

    async def generate(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                       priority: int = 0, stream: bool = False,
                       session: str | None = None) -> AsyncIterator[RequestOutput]:
        flight = self.flights[request_id] = Flight(request_id, movable=params.n == 1)
        try:
            async for out in self._serve(flight, self._prompt(prompt), params, priority, stream, session):
                yield out
        finally:
            self.flights.pop(request_id, None)

    async def _serve(self, flight: Flight, payload: dict[str, Any], params: SamplingParams,
                     priority: int, stream: bool, session: str | None) -> AsyncIterator[RequestOutput]:
        arrived, lost = time.monotonic(), 0
        joined, handover = _Joiner(), None
        while True:
            group, replica, cold = await self._place(flight, payload, session, handover)
            replica.in_flight += 1
            replica.routed += 1
            flight.replica, flight.group = replica, group
            legs = (replica.stream(flight.request_id, payload, params, priority, self._transport())
                    if handover is None else replica.resume(handover))
            joined.start_leg(0 if handover is None else handover.handoff.text_sent)
            try:
                async with contextlib.aclosing(legs) as items:
                    async for item in items:
                        if isinstance(item, Handover):
                            handover = item
                            self.num_handovers += flight.arrived is None
                            break
                        out = joined.take(item)
                        if out is None:
                            continue
                        if cold and not joined.sent:
                            self.num_cold_starts += 1
                            self.last_cold_start_s = time.monotonic() - arrived
                        self._arrived(flight, handover)
                        flight.tokens = len(joined.token_ids)
                        joined.sent = True
                        yield out
                    else:
                        return
            except ReplicaLost as exc:
                group.take_out(replica, str(exc))
                lost += 1
                cut = stream and joined.sent and handover is None
                if cut or lost == self.options.max_attempts:
                    self.num_failed += 1
                    why = ("after part of the output was streamed; the output is incomplete"
                           if cut else f"and on every one of {lost} attempts")
                    raise EngineStepError(f"replica {replica.name} was lost {why}: {exc}") from exc
                self.num_retried += 1
                if handover is not None:  # go on from its last handover, recomputing its K/V
                    handover = Handover(handover.without_kv(), handover.transport)
                if not stream:  # the client has nothing yet: no need to match what it has
                    joined = _Joiner()
                if flight.arrived is not None:  # a migration's target was lost
                    flight.arrived.set_exception(ValueError(f"{replica.name} was lost"))
                    flight.target = flight.arrived = None
                logger.warning("retrying %s after losing replica %s: %s", flight.request_id,
                               replica.name, exc)
            finally:
                replica.in_flight -= 1
                group.router.finished(replica.name)

    async def _place(self, flight: Flight, payload: dict[str, Any], session: str | None,
                     handover: Handover | None) -> tuple[ReplicaGroup, ReplicaHandle, bool]:
        """The next leg's replica: the router's pick from the first group for a new request,
        a migration's target, or the least loaded of the last group after a handover."""
        if handover is None:
            group = self.groups[0]
            replica, waited = await group.acquire(payload["prompt_token_ids"], session)
            return group, replica, waited
        group = self.groups[-1]
        target, flight.target = flight.target, None
        if target is not None and target.state == "ready":
            group.router.assign(target.name)
            return group, target, False
        replica, _ = await group.acquire([], None)
        return group, replica, False

    def _arrived(self, flight: Flight, handover: Handover | None) -> None:
        """The first output after a migration's handover: its downtime is known."""
        if flight.arrived is not None and handover is not None:
            downtime = time.time() - handover.handoff.exported_at
            if not flight.arrived.done():
                flight.arrived.set_result(downtime)
            flight.arrived = None

    def _transport(self) -> str:
        """How a handed-over request's K/V travels: shared memory while every replica is
        on one node, else Ray's object store (`--kv-transport` chooses otherwise)."""
        if self.options.kv_transport != "auto":
            return self.options.kv_transport
        nodes = {r.node for r in self.replicas.values() if r.node is not None}
        return "shm" if len(nodes) <= 1 else "ray"

    # ---- health and metrics ---------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        states = {}
        for g in self.groups:
            down = [r for r in g.replicas.values() if r.state == "down"]
            ok = bool(g.ready()) or (g.autoscaler.options.min_replicas == 0 and not down)
            states[g.role] = ok
        ok = all(states.values())
        body: dict[str, Any] = {"status": "ok" if ok else "unhealthy", "router": self.groups[0].router.policy,
                                "min_replicas": self.groups[-1].autoscaler.options.min_replicas,
                                "max_replicas": self.groups[-1].autoscaler.options.max_replicas,
                                "replicas": [r.describe() | {"role": g.role}
                                             for g in self.groups for r in g.replicas.values()]}
        return ok, body

    async def refresh_metrics(self) -> None:
        await asyncio.gather(*(g.refresh_stats() for g in self.groups))

    def metric_snapshots(self) -> list[tuple[dict[str, str], dict[str, float]]]:
        return [({"model": self.name, "replica": r.name}, r.stats["metrics"])
                for r in self.replicas.values() if r.stats]

    def extra_metrics(self) -> list[tuple[str, str, str, dict[str, str], float]]:
        model = {"model": self.name}
        m = self.migrations
        rows = [
            ("counter", "servelm:router_requests_retried", "Requests retried on another replica "
             "after theirs was lost.", model, self.num_retried),
            ("counter", "servelm:router_requests_failed", "Requests failed because their replica "
             "was lost (streams cut, or every attempt lost).", model, self.num_failed),
            ("counter", "servelm:cold_starts", "Requests that waited for a replica to start.",
             model, self.num_cold_starts),
            ("gauge", "servelm:last_cold_start_seconds", "Arrival to first output of the latest "
             "request that found no replica ready.", model, self.last_cold_start_s or 0.0),
            ("counter", "servelm:kv_handovers", "Requests a prefill replica handed to a decode "
             "replica.", model, self.num_handovers),
            ("counter", "servelm:migrations_failed", "Live migrations that did not happen (the "
             "request finished or its replica was lost meanwhile).", model, m.failed),
            ("gauge", "servelm:migration_downtime_seconds_mean", "Mean downtime of the latest "
             "1000 live migrations (export to the target's first token).", model,
             sum(m.downtime_s) / len(m.downtime_s) if m.downtime_s else 0.0),
        ]
        for reason in ("operator", "balance", "drain"):
            rows.append(("counter", "servelm:migrations", "Running requests moved to another "
                         "replica, by reason.", {**model, "reason": reason}, m.done.get(reason, 0)))
        for state in ("starting", "ready", "down", "draining"):
            for g in self.groups:
                rows.append(("gauge", "servelm:replicas", "Replicas by state.",
                             {**model, "role": g.role, "state": state},
                             sum(r.state == state for r in g.replicas.values())))
        for r in self.replicas.values():
            labels = {**model, "replica": r.name}
            rows += [("counter", "servelm:router_requests_routed", "Requests routed to each replica.",
                      labels, r.routed),
                     ("counter", "servelm:replica_restarts", "Times each replica was restarted.",
                      labels, r.restarts),
                     ("gauge", "servelm:replica_in_flight", "Requests each replica is serving.",
                      labels, r.in_flight),
                     ("counter", "servelm:kv_transfer_failures", "Handovers whose K/V did not arrive "
                      "(recomputed instead).", labels, r.stats.get("kv_transfer_failures", 0))]
        return rows

    def _prompt(self, prompt: PromptInput) -> dict[str, Any]:
        """Token ids to route on; the text too when there is one (for echo)."""
        if isinstance(prompt, str):
            return {"prompt": prompt, "prompt_token_ids": self.tokenizer.encode(prompt)}
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return {"prompt": prompt.get("prompt"), "prompt_token_ids": list(prompt["prompt_token_ids"])}
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self._prompt(prompt["prompt"])
        if isinstance(prompt, (list, tuple)):
            return {"prompt": None, "prompt_token_ids": list(prompt)}
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    # ---- live migration -------------------------------------------------------------
    async def migrate(self, request_id: str, to: str | None = None, reason: str = "operator",
                      max_stages: int = 64, transport: str | None = None) -> dict[str, Any]:
        """Move a running request to replica `to` (default: the least loaded other one).
        `request_id` is the engine's, or the response's id when it has one prompt.
        `max_stages` 0 copies everything during the stop; `transport` "none" sends no K/V
        (the target recomputes it): the baselines staged copying is measured against."""
        flight = self.flights.get(request_id)
        if flight is None:
            parts = [f for rid, f in self.flights.items() if rid.startswith(f"{request_id}-")]
            if len(parts) > 1:
                raise ValueError(f"request {request_id!r} has several prompts; move one of "
                                 f"{sorted(f.request_id for f in parts)}")
            flight = parts[0] if parts else None
        if flight is None or flight.replica is None:
            raise KeyError(f"request {request_id!r} is not running on model {self.name!r}")
        request_id = flight.request_id
        group = self.groups[-1]
        if flight.group is not group:
            raise ValueError(f"request {request_id!r} is still on a prefill replica")
        if to is None:
            others = [r for r in group.ready() if r is not flight.replica]
            if not others:
                raise ValueError(f"model {self.name!r} has no other ready replica to move to")
            target = min(others, key=lambda r: r.in_flight)
        else:
            target = group.replicas.get(to)
            if target is None or target.state != "ready":
                raise ValueError(f"to: {to!r} is not a ready replica of model {self.name!r}; "
                                 f"ready: {[r.name for r in group.ready()]}")
        o = self.options
        try:
            moved = await migrate(flight, target, transport or self._transport(),
                                  stop_blocks=o.migration_stop_blocks, max_stages=max_stages,
                                  timeout_s=o.health_timeout_s * 10)
        except (ValueError, asyncio.TimeoutError):
            self.migrations.failed += 1
            raise
        self.migrations.done[reason] = self.migrations.done.get(reason, 0) + 1
        self.migrations.downtime_s = [*self.migrations.downtime_s[-999:], moved["downtime_s"]]
        logger.info("moved %s from %s to %s (%s): %d blocks staged, %d at the stop, %.1f ms down",
                    request_id, moved["from"], moved["to"], reason, moved["blocks_staged"],
                    moved["blocks_at_stop"], moved["downtime_s"] * 1e3)
        return moved

    async def _balance(self) -> None:
        """Once a health interval: when the last group's replicas are out of balance, the
        busiest gives one decoding request to the idlest."""
        group = self.groups[-1]
        while True:
            await asyncio.sleep(self.options.health_interval_s)
            loads = {r.name: r.in_flight for r in group.ready()}
            pick = pick_to_balance(loads, list(self.flights.values()), self.options.migrate_imbalance)
            if pick is not None:
                with contextlib.suppress(ValueError, KeyError, asyncio.TimeoutError):
                    await self.migrate(pick[0].request_id, pick[1], reason="balance")

    async def _drain(self, r: ReplicaHandle) -> None:
        """Before a replica is scaled in: move its decoding requests to the others."""
        for flight in [f for f in self.flights.values() if f.replica is r]:
            with contextlib.suppress(ValueError, KeyError, asyncio.TimeoutError):
                await self.migrate(flight.request_id, reason="drain")

    def running(self) -> list[dict[str, Any]]:
        return [f.describe() for f in self.flights.values()]


class _Joiner:
    """A request's legs (one per replica it ran on) as one stream. Each leg after a handover
    streams text from the handoff's `text_sent` on; after a lost replica the next leg
    recomputes from the last handover, and what the client already has is cut from it.
    The tokens recomputed must be those the client has, else the stream fails."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []  # of the output the client has
        self.chars = 0  # characters of text the client has
        self.pos = 0  # where the current leg's next text delta starts
        self.first: RequestOutput | None = None
        self.sent = False

    def start_leg(self, text_from: int) -> None:
        self.pos = text_from

    def take(self, out: RequestOutput) -> RequestOutput | None:
        """`out` with only what is new to the client; None when nothing is."""
        if self.first is None:
            self.first = out
        else:  # known only where the prompt ran: the first leg
            out.prompt_logprobs = out.prompt_logprobs or self.first.prompt_logprobs
            out.num_cached_tokens = self.first.num_cached_tokens
        if len(out.outputs) != 1:  # n > 1 never moves
            return out
        c = out.outputs[0]
        known = min(len(c.token_ids), len(self.token_ids))
        if c.token_ids[:known] != self.token_ids[:known]:
            raise EngineStepError("a replica was lost and the recomputed output differs from what "
                                  "was streamed; the output is incomplete")
        cut = max(0, self.chars - self.pos)
        self.pos += len(c.delta_text)
        c.delta_text = c.delta_text[cut:]
        self.chars += len(c.delta_text)
        new_tokens = len(c.token_ids) > len(self.token_ids)
        if new_tokens:
            self.token_ids = list(c.token_ids)
        return out if new_tokens or c.delta_text or out.finished else None
