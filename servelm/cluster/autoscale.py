"""How many replicas a model should have, from its load: pure decisions, no I/O.

Demand is the number of requests in the model's pool (routed and running, or waiting for
a replica); the target is enough replicas for `target_requests` each, one more while the
replicas' KV caches are nearly full, within [min_replicas, max_replicas]. Scaling up waits
`upscale_delay_s` of sustained demand (none when nothing is running: a request waiting on
zero replicas is a cold start already); scaling down waits `downscale_delay_s`, so a gap
between bursts does not throw replicas and their caches away. With min_replicas 0 an idle
model scales to zero after the down-scale delay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class AutoscaleOptions:
    min_replicas: int = 1
    max_replicas: int = 1
    target_requests: float = 8.0  # requests in flight per replica
    kv_high: float = 0.85  # mean KV usage above this asks for one more replica
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"max_replicas must be >= max(1, min_replicas={self.min_replicas}), "
                             f"got {self.max_replicas}")
        if self.target_requests <= 0:
            raise ValueError(f"target_requests must be > 0, got {self.target_requests}")


class Autoscaler:
    def __init__(self, options: AutoscaleOptions) -> None:
        self.options = options
        self._want_up_since: float | None = None
        self._want_down_since: float | None = None

    def desired(self, demand: int, kv_usage: float, current: int) -> int:
        """The replica count the load asks for right now, within the bounds."""
        o = self.options
        want = math.ceil(demand / o.target_requests)
        if current and kv_usage > o.kv_high:
            want = max(want, current + 1)
        return min(o.max_replicas, max(o.min_replicas, want))

    def decide(self, now: float, demand: int, kv_usage: float, current: int) -> int:
        """The replica count to move to at `now` (`current` when it is not yet time)."""
        want = self.desired(demand, kv_usage, current)
        if want > current:
            self._want_down_since = None
            if current == 0:  # requests are waiting on nothing at all
                return want
            self._want_up_since = self._want_up_since if self._want_up_since is not None else now
            return want if now - self._want_up_since >= self.options.upscale_delay_s else current
        self._want_up_since = None
        if want < current:
            self._want_down_since = self._want_down_since if self._want_down_since is not None else now
            if now - self._want_down_since >= self.options.downscale_delay_s:
                self._want_down_since = None
                return want
            return current
        self._want_down_since = None
        return current
