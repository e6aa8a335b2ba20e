"""Disaggregated prefill/decode in the simulator, and the K/V link every move crosses.

As in the real pool (cluster/pool.py): arrivals go to the prefill replicas through the
chosen router; a prefill replica hands each request over after its first token (exported
as handoff.export_request does), to the least-loaded decode replica, which adopts its K/V
once it has crossed the link (or recomputes it when it does not fit). TTFT is the prefill
replica's first token, as the pool streams it; the later tokens are the decode replica's.

A move's time is latency + K/V bytes / bandwidth, the K/V being that of every token but the
last (what a RequestHandoff carries). Each replica sends over one outbound link, one
transfer after another (a queue), so a burst of handovers or a spot replica's migrations
wait their turn; the receiving side is not modelled as a bottleneck. K/V bytes per token:
the roofline model's own (every rank's layers, K and V heads, in its kv dtype); for a
fitted model, which knows no model shape, `kv_bytes_per_token` (default 131072: Llama-3-8B
in bf16, 32 layers x 8 K/V heads x 128 dims x 2 (K and V) x 2 bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from servelm.simulate.replica import ReplicaSpec
from servelm.simulate.roofline import KV_DTYPES, RooflineStepModel
from servelm.simulate.step_model import StepModel

DEFAULT_KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # Llama-3-8B, bf16


@dataclass
class KVLink:
    """The replica-to-replica link (assumptions: a 200 Gb/s RDMA NIC per replica, and a
    millisecond of handshake per move)."""

    gbs: float = 25.0  # GB/s, one direction
    latency_ms: float = 1.0
    bytes_per_token: float | None = None  # None: the step model's (roofline) or the default

    def __post_init__(self) -> None:
        if not (isinstance(self.gbs, (int, float)) and self.gbs > 0 and math.isfinite(self.gbs)):
            raise ValueError(f"--kv-link-gbs must be a number > 0, got {self.gbs!r}")
        if not (isinstance(self.latency_ms, (int, float)) and 0 <= self.latency_ms < math.inf):
            raise ValueError(f"--kv-link-latency-ms must be a number >= 0, got {self.latency_ms!r}")
        if self.bytes_per_token is not None and not self.bytes_per_token > 0:
            raise ValueError(f"--kv-bytes-per-token must be > 0, got {self.bytes_per_token!r}")

    def bytes_per_token_of(self, model: StepModel) -> float:
        if self.bytes_per_token is not None:
            return float(self.bytes_per_token)
        return kv_bytes_per_token(model) or DEFAULT_KV_BYTES_PER_TOKEN


def kv_bytes_per_token(model: StepModel) -> float | None:
    """A roofline replica's K/V per token over all its GPUs (K/V heads replicated where tp is
    more than their number); None for a fitted model."""
    if not isinstance(model, RooflineStepModel):
        return None
    s = model.shape
    heads = math.ceil(s.num_kv_heads / model.tp) * model.tp
    return 2.0 * heads * s.head_dim * KV_DTYPES[model.kv_dtype] * s.num_layers


def check_roles(specs: list[ReplicaSpec]) -> bool:
    """Whether the cluster is disaggregated; raises unless it is all "both", or prefill and
    decode replicas with at least one of each (as `servelm serve` allows)."""
    roles = {s.role for s in specs}
    if roles == {"both"}:
        return False
    if roles != {"prefill", "decode"}:
        raise ValueError(f"--roles: give prefill and decode replicas (at least one of each) or "
                         f"none; got {[s.role for s in specs]}")
    return True
