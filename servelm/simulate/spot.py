"""Preemptible (spot) replicas in the simulator: they get a notice, and vanish a grace
period later (SpotServe). The notice takes the replica out of its router at once, as the
real pool takes out a replica it drains. Then one of two recoveries:

- migrate: requests that never started there are sent elsewhere at once. The rest are
  served on through the grace period as long as one more step still leaves time to copy
  them all (SpotServe's just-in-time migration); then its decoding requests stop and move
  with their K/V to the least-loaded other replica of its group (the target the pool's
  drain picks), queued on its link smallest K/V first, each by stop-and-copy (no staged
  copy) and only if it arrives before the replica is gone. Whatever is left when it
  vanishes (still prefilling, or no time to copy) is restarted, as below.
- restart: it serves on through the grace period; when it vanishes every unfinished
  request on it goes to another replica and is recomputed from its prompt and the tokens
  generated so far (as the pool replays a lost replica's requests from their last
  handover); tokens already streamed are not streamed again, and requests that had not
  started are rerouted.

Notices come at given times (each to a random live spot replica) or after exponential
lifetimes. Spot capacity is not assumed to come back: a replacement (a fresh spot replica
of the same kind, empty cache) joins `replacement_delay_s` after one vanishes only when
that is given. Requests with no replica left wait for a replacement, or fail without one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import partial
from typing import Any

from servelm.simulate.replica import SimReplica

RECOVERIES = ("migrate", "restart")


@dataclass
class SpotOptions:
    kill_times: list[float] | None = None  # simulated seconds of each notice
    mean_lifetime_s: float | None = None  # or: each spot replica lives Exp(mean) from its start
    grace_s: float = 30.0  # notice to vanishing (GCP gives 30 s, AWS 120 s)
    recovery: str = "migrate"
    replacement_delay_s: float | None = None  # None: lost capacity does not come back
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.kill_times is None) == (self.mean_lifetime_s is None):
            raise ValueError("spot replicas need --spot-kill-times or --spot-mean-lifetime-s "
                             "(one of them)")
        if self.kill_times is not None and not all(
                isinstance(t, (int, float)) and 0 <= t < math.inf for t in self.kill_times):
            raise ValueError(f"--spot-kill-times must be seconds >= 0, got {self.kill_times}")
        for flag, value in (("--spot-mean-lifetime-s", self.mean_lifetime_s),
                            ("--spot-replacement-delay-s", self.replacement_delay_s)):
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ValueError(f"{flag} must be a number >= 0, got {value!r}")
        if self.mean_lifetime_s is not None and not self.mean_lifetime_s > 0:
            raise ValueError(f"--spot-mean-lifetime-s must be > 0, got {self.mean_lifetime_s}")
        if not (isinstance(self.grace_s, (int, float)) and 0 <= self.grace_s < math.inf):
            raise ValueError(f"--spot-grace-s must be a number >= 0, got {self.grace_s!r}")
        if self.recovery not in RECOVERIES:
            raise ValueError(f"--spot-recovery must be one of {', '.join(RECOVERIES)}, "
                             f"got {self.recovery!r}")


class SpotMarket:
    """Sends the notices and carries out the recovery on `sim` (a Simulation)."""

    def __init__(self, sim: Any, options: SpotOptions) -> None:
        self.sim, self.options = sim, options
        self.rng = random.Random(options.seed)

    def start(self) -> None:
        o = self.options
        for t in o.kill_times or ():
            self.sim.at(t, self._notice_any)
        if o.mean_lifetime_s is not None:
            for r in list(self.sim.replicas.values()):
                if r.spot:
                    self.born(r)

    def born(self, r: SimReplica) -> None:
        """A spot replica's start: with lifetimes, its notice is drawn now."""
        if self.options.mean_lifetime_s is not None:
            life = self.rng.expovariate(1 / self.options.mean_lifetime_s)
            self.sim.at(r.born + life, partial(self.notice, r))

    def _notice_any(self) -> None:
        live = [r for r in self.sim.replicas.values() if r.spot and not r.draining]
        if live:
            self.notice(self.rng.choice(live))

    def notice(self, r: SimReplica) -> None:
        sim = self.sim
        if r.died is not None or r.draining:
            return
        r.draining = True
        r.router.remove_replica(r.name)
        r.vanish_at = sim.now + self.options.grace_s
        sim.at(r.vanish_at, partial(self.vanish, r))
        if self.options.replacement_delay_s is not None:  # requests may wait for it from now
            sim.joins_pending += 1
            sim.at(r.vanish_at + self.options.replacement_delay_s, partial(self._join, r.name))
        if self.options.recovery == "migrate":
            r.hooked = True  # drain after each of its steps
            for req in list(r.scheduler.waiting):
                if not req.output_token_ids:  # nothing computed: it goes elsewhere now
                    sim.counts["num_rerouted_requests"] += 1
                    sim.place(r.export(req))
            self.drain(r)

    def drain(self, r: SimReplica) -> None:
        """Between its steps: serve on while one more step still leaves time to copy every
        decoding request before it vanishes (SpotServe's just-in-time migration); then stop
        them all and queue their copies on its link, smallest K/V first, each only if it
        arrives before the replica is gone (the rest are restarted when it vanishes)."""
        sim = self.sim
        if r.died is not None or r.step is not None or r.role == "prefill":
            return  # a prefill replica's requests leave at their handover anyway
        movable = sorted((q for q in r.scheduler.running if q.is_decoding),
                         key=lambda q: q.num_tokens)
        others = list(r.router.replicas.values())
        if not movable or not others:
            return
        latency = sim.link.latency_ms / 1e3
        copies = sum(sim.transfer_s(r, q) - latency for q in movable) + latency
        if max(sim.now, r.link_free_at) + r.last_step_s + copies < r.vanish_at:
            return
        for q in movable:
            if max(sim.now, r.link_free_at) + sim.transfer_s(r, q) >= r.vanish_at:
                return
            target = min(others, key=lambda x: x.outstanding).name
            r.router.assign(target)
            sim.counts["num_migrations"] += 1
            sim.send(r, r.export(q), target)

    def vanish(self, r: SimReplica) -> None:
        sim = self.sim
        r.died = sim.now
        sim.counts["replicas_lost"] += 1
        if r.step is not None:  # the step in progress is lost with it
            r.busy_s -= r.step_end - sim.now
            r.step = None
        sim.replicas.pop(r.name, None)
        sim.gone[r.name] = r
        for req in r.requests():
            r.export(req)
            if req.num_computed_tokens or req.output_token_ids:
                sim.lost(req, req.num_computed_tokens)
            else:
                sim.counts["num_rerouted_requests"] += 1
            sim.place(req)

    def _join(self, lost: str) -> None:
        sim = self.sim
        sim.joins_pending -= 1
        sim.counts["replicas_joined"] += 1
        r = sim.add_replica(sim.spec_of[lost], spot=True)
        self.born(r)
        sim.flush_pending()
