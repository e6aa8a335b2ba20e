"""Which replica serves a request: round-robin, least-loaded, power-of-two choices,
speed-aware, or prefix-aware (the default), with chat sessions kept on one replica.

Plain bookkeeping, no I/O: the serving front end reports each replica's load (requests it
has outstanding, and its KV usage when the replica reports it) and calls `route` and
`finished`. Prefix-aware routing follows SGLang's cache-aware router: each replica has an
approximate tree of the prompts sent to it (radix.py); a request goes to the replica whose
tree holds its longest prefix (the least loaded of those within `match_slack` of it),
unless the replicas' loads are out of balance (then the least loaded takes it) or no
replica holds enough of it (then the least loaded, and of equals the one that has cached
least, spreading distinct prefixes over the replicas' caches). Speed-aware routing is for
replicas of unequal speed (mixed GPU generations, edge devices): the one whose requests,
this one included, would take the least time at its speed, (outstanding + 1) / speed;
with equal speeds it is least-loaded.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from servelm.cluster.radix import PrefixTree

POLICIES = ("round-robin", "least-loaded", "power-of-two", "speed-aware", "prefix-aware")


@dataclass
class Replica:
    name: str
    outstanding: int = 0  # requests routed to it and not finished
    kv_usage: float = 0.0  # its KV cache in use, 0-1, as it last reported
    speed: float = 1.0  # relative throughput, for speed-aware routing
    tree: PrefixTree = field(default_factory=PrefixTree)

    @property
    def load(self) -> tuple[int, float]:
        return self.outstanding, self.kv_usage


@dataclass
class RouterOptions:
    # Out of balance when the busiest replica has more than `balance_abs` requests above
    # the idlest and more than `balance_rel` times its count: then least-loaded decides.
    balance_abs: int = 4
    balance_rel: float = 1.5
    # Below this share of the prompt cached anywhere, a request counts as a new prefix.
    cache_threshold: float = 0.5
    # Replicas within this share of the prompt of the longest match count as matching.
    match_slack: float = 0.1
    tree_tokens: int = 1 << 20  # per replica
    max_sessions: int = 100_000  # sessions remembered, least recently used forgotten first
    seed: int = 0


class Router:
    def __init__(self, policy: str = "prefix-aware", options: RouterOptions | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"router must be one of {POLICIES}, got {policy!r}")
        self.policy, self.options = policy, options or RouterOptions()
        self.replicas: dict[str, Replica] = {}
        self._pool: list[Replica] = []  # the replicas' values, kept for choosing among them
        self.sessions: dict[str, str] = {}  # chat session -> the replica holding its history
        self._turn = itertools.count()
        self._rng = random.Random(self.options.seed)

    def add_replica(self, name: str, speed: float = 1.0) -> None:
        if not speed > 0:
            raise ValueError(f"replica {name}: speed must be > 0, got {speed}")
        self.replicas[name] = Replica(name, speed=speed, tree=PrefixTree(self.options.tree_tokens))
        self._pool = list(self.replicas.values())

    def remove_replica(self, name: str) -> None:
        """Out of rotation (dead, or scaled down); its sessions move on their next turn."""
        self.replicas.pop(name, None)
        self._pool = list(self.replicas.values())
        self.sessions = {s: r for s, r in self.sessions.items() if r != name}

    def report(self, name: str, outstanding: int | None = None, kv_usage: float | None = None) -> None:
        """A replica's own figures, which replace the router's counts."""
        replica = self.replicas.get(name)
        if replica is not None:
            replica.outstanding = replica.outstanding if outstanding is None else outstanding
            replica.kv_usage = replica.kv_usage if kv_usage is None else kv_usage

    def route(self, prompt_ids: Sequence[int], session: str | None = None) -> str:
        """The replica for a request; counted as outstanding there until `finished`."""
        if not self.replicas:
            raise RuntimeError("no replica is available")
        replica = self.replicas.get(self.sessions.get(session, "")) if session else None
        if replica is None:
            replica = self._choose(prompt_ids)
        if session:
            self.sessions.pop(session, None)  # most recent last: the oldest are forgotten first
            self.sessions[session] = replica.name
            if len(self.sessions) > self.options.max_sessions:
                del self.sessions[next(iter(self.sessions))]
        replica.outstanding += 1
        if self.policy == "prefix-aware":  # the only reader of the trees
            replica.tree.insert(prompt_ids)
        return replica.name

    def assign(self, name: str) -> None:
        """A request placed on `name` by the caller (a migration's target), counted as
        outstanding there until `finished`."""
        replica = self.replicas.get(name)
        if replica is not None:
            replica.outstanding += 1

    def finished(self, name: str) -> None:
        replica = self.replicas.get(name)
        if replica is not None and replica.outstanding > 0:
            replica.outstanding -= 1

    def _choose(self, prompt_ids: Sequence[int]) -> Replica:
        replicas = self._pool
        if self.policy == "round-robin":
            return replicas[next(self._turn) % len(replicas)]
        if self.policy == "least-loaded":
            return min(replicas, key=lambda r: r.load)
        if self.policy == "speed-aware":
            return min(replicas, key=lambda r: ((r.outstanding + 1) / r.speed, r.kv_usage))
        if self.policy == "power-of-two":
            picks = self._rng.sample(replicas, min(2, len(replicas)))
            return min(picks, key=lambda r: r.load)
        return self._prefix_aware(replicas, prompt_ids)

    def _prefix_aware(self, replicas: list[Replica], prompt_ids: Sequence[int]) -> Replica:
        o = self.options
        idlest = min(replicas, key=lambda r: r.load)
        busiest = max(r.outstanding for r in replicas)
        if busiest - idlest.outstanding > o.balance_abs and busiest > idlest.outstanding * o.balance_rel:
            return idlest
        matched = {r.name: r.tree.match(prompt_ids) for r in replicas}
        best = max(matched.values())
        if prompt_ids and best >= o.cache_threshold * len(prompt_ids):
            # replicas holding about as much as the best are as good a cache: the least
            # loaded of them (a shared system prompt cached on several replicas spreads)
            close = [r for r in replicas if matched[r.name] >= best - o.match_slack * len(prompt_ids)]
            return min(close, key=lambda r: (r.load, -matched[r.name]))
        # a new prefix: the least loaded, and of equals the one that has cached least
        return min(replicas, key=lambda r: (r.load, r.tree.num_tokens))
