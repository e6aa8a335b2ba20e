"""What `servelm serve --replicas ...` is asked for: the cluster-wide options, and one
`ModelSpec` per served model (from repeated `--model` flags or a `--models-config` file).

A models-config file is JSON (or YAML, when PyYAML is installed) holding a list of models,
each with its own replica counts and engine options:

    {"models": [
      {"model": "/models/llama-1b", "name": "llama", "replicas": 2},
      {"model": "/models/qwen.gguf", "min_replicas": 0, "max_replicas": 2,
       "engine": {"kv_cache_memory_gb": 1.0}}]}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servelm.cluster.autoscale import AutoscaleOptions
from servelm.cluster.router import POLICIES
from servelm.config import EngineConfig
from servelm.model.default_model import DEFAULT_MODEL_NAME

KV_TRANSPORTS = ("auto", "shm", "ray")


@dataclass
class ClusterOptions:
    router: str = "prefix-aware"
    ray_address: str | None = None  # None: start a local Ray cluster for this server
    cpus_per_rank: float = 1.0  # Ray CPUs each engine process of a replica reserves
    health_interval_s: float = 1.0
    health_timeout_s: float = 3.0
    max_attempts: int = 3  # tries of a request whose replica is lost
    acquire_timeout_s: float = 300.0  # a request waits this long for a replica to be ready
    start_timeout_s: float = 600.0
    drain_timeout_s: float = 600.0
    target_requests: float = 8.0
    kv_high: float = 0.85
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0
    replica_log_level: str = "WARNING"
    kv_transport: str = "auto"  # how K/V moves between replicas: shm, ray, or auto
    migrate_imbalance: int = 4  # requests between the busiest and idlest that move one (0: off)
    migration_stop_blocks: int = 2  # stop to copy the rest once a stage finds this few new blocks

    def __post_init__(self) -> None:
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {KV_TRANSPORTS}, got {self.kv_transport!r}")
        if self.migrate_imbalance < 0:
            raise ValueError(f"migrate_imbalance must be >= 0, got {self.migrate_imbalance}")
        if self.router not in POLICIES:
            raise ValueError(f"router must be one of {POLICIES}, got {self.router!r}")
        if self.cpus_per_rank <= 0:
            raise ValueError(f"replica_cpus must be > 0, got {self.cpus_per_rank}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


@dataclass
class ModelSpec:
    name: str
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig's fields, model included
    replicas: int = 1  # started with the server
    min_replicas: int | None = None  # default: replicas
    max_replicas: int | None = None  # default: max(replicas, min_replicas)
    router: str | None = None  # default: the cluster's (the prefill replicas' when disaggregated)
    prefill_replicas: int | None = None  # with decode_replicas: disaggregated prefill/decode
    decode_replicas: int | None = None

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {self.replicas}")
        if (self.prefill_replicas is None) != (self.decode_replicas is None):
            raise ValueError("prefill_replicas and decode_replicas go together, got "
                             f"{self.prefill_replicas} and {self.decode_replicas}")
        for key in ("prefill_replicas", "decode_replicas"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.engine.get("role", "both") != "both":
            raise ValueError("role is set per replica by prefill_replicas/decode_replicas; "
                             "leave the engine's role at both")
        if self.router is not None and self.router not in POLICIES:
            raise ValueError(f"router must be one of {POLICIES}, got {self.router!r}")
        EngineConfig(**self.engine)  # its checks, before any replica starts
        self.autoscale(ClusterOptions())  # the replica counts' checks

    @property
    def disaggregated(self) -> bool:
        return self.prefill_replicas is not None

    @property
    def ranks(self) -> int:
        return (self.engine.get("tensor_parallel_size", 1) or 1) * (
            self.engine.get("pipeline_parallel_size", 1) or 1)

    @property
    def initial_replicas(self) -> int:
        """Start with `replicas`, at least one even when the model may scale to zero (its
        first replica tells the front end the context window), within the bounds."""
        scale = self.autoscale(ClusterOptions())
        return min(scale.max_replicas, max(scale.min_replicas, self.replicas, 1))

    def autoscale(self, options: ClusterOptions) -> AutoscaleOptions:
        low = self.replicas if self.min_replicas is None else self.min_replicas
        high = max(self.replicas, low, 1) if self.max_replicas is None else self.max_replicas
        return AutoscaleOptions(
            min_replicas=low, max_replicas=high, target_requests=options.target_requests,
            kv_high=options.kv_high, upscale_delay_s=options.upscale_delay_s,
            downscale_delay_s=options.downscale_delay_s)


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("replicas on Ray (any of these serves through a cluster)")
    g.add_argument("--replicas", type=int, default=None,
                   help="engine replicas per model, started with the server")
    g.add_argument("--min-replicas", type=int, default=None,
                   help="autoscaling floor, 0 allows scale-to-zero (default: --replicas)")
    g.add_argument("--max-replicas", type=int, default=None,
                   help="autoscaling ceiling (default: --replicas)")
    g.add_argument("--router", choices=POLICIES, default="prefix-aware",
                   help="which replica serves a request (default: prefix-aware)")
    g.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster (default: start a local one)")
    g.add_argument("--replica-cpus", type=float, default=1.0,
                   help="Ray CPUs reserved per engine process of a replica (default: 1)")
    g.add_argument("--models-config", default=None,
                   help="JSON/YAML file listing models with their own replica counts")
    g.add_argument("--autoscale-target-requests", type=float, default=8.0,
                   help="requests in flight per replica the autoscaler aims for (default: 8)")
    g.add_argument("--downscale-delay-s", type=float, default=30.0,
                   help="seconds of low load before a replica is stopped (default: 30)")
    g.add_argument("--prefill-replicas", type=int, default=None,
                   help="disaggregated serving: replicas that compute prompts and first tokens, "
                        "then hand requests with their KV to --decode-replicas")
    g.add_argument("--decode-replicas", type=int, default=None,
                   help="disaggregated serving: replicas that continue handed-over requests")
    g.add_argument("--kv-transport", choices=KV_TRANSPORTS, default="auto",
                   help="how KV moves between replicas: shm (one node), ray (object store, "
                        "any node); auto: shm while every replica is on one node")
    g.add_argument("--migrate-imbalance", type=int, default=4,
                   help="live-migrate a running request from the busiest replica to the idlest "
                        "when their request counts differ by this much (0: never; default 4)")


def wants_cluster(args: argparse.Namespace) -> bool:
    given = (args.replicas, args.min_replicas, args.max_replicas, args.ray_address, args.models_config,
             args.prefill_replicas, args.decode_replicas)
    return any(v is not None for v in given) or len(args.model or []) > 1


def cluster_options(args: argparse.Namespace) -> ClusterOptions:
    return ClusterOptions(router=args.router, ray_address=args.ray_address,
                          cpus_per_rank=args.replica_cpus,
                          target_requests=args.autoscale_target_requests,
                          downscale_delay_s=args.downscale_delay_s,
                          replica_log_level=args.log_level, kv_transport=args.kv_transport,
                          migrate_imbalance=args.migrate_imbalance)


def model_specs(args: argparse.Namespace, engine: dict[str, Any]) -> list[ModelSpec]:
    """One spec per `--model` (the default model when none), or the config file's list;
    `engine` holds the command line's engine options, which a file's entries override."""
    counts = {"replicas": args.replicas if args.replicas is not None else 1,
              "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
              "prefill_replicas": args.prefill_replicas, "decode_replicas": args.decode_replicas}
    if args.models_config is None:
        models = args.model or [None]
        if args.served_model_name and len(models) > 1:
            raise ValueError("--served-model-name names one model; name several in --models-config")
        return [ModelSpec(name=args.served_model_name or _default_name(m),
                          engine={**engine, "model": _absolute(m)}, **counts) for m in models]
    entries = _read_config(Path(args.models_config))
    specs = []
    for i, entry in enumerate(entries):
        entry = dict(entry)
        unknown = set(entry) - {"model", "name", "engine", *counts, "router"}
        if unknown:
            raise ValueError(f"models[{i}]: unknown keys {sorted(unknown)}; allowed: model, name, "
                             "replicas, min_replicas, max_replicas, prefill_replicas, "
                             "decode_replicas, router, engine")
        model = entry.pop("model", None)
        extra = entry.pop("engine", {}) or {}
        unknown = set(extra) - {f.name for f in dataclasses.fields(EngineConfig)}
        if unknown:
            raise ValueError(f"models[{i}].engine: unknown options {sorted(unknown)}")
        specs.append(ModelSpec(name=entry.pop("name", None) or _default_name(model),
                               engine={**engine, **extra, "model": _absolute(model)},
                               **{**counts, **entry}))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"models: names must differ, got {names}")
    return specs


def _read_config(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        import yaml  # only a YAML file needs it

        data = yaml.safe_load(text)
    models = data.get("models") if isinstance(data, dict) else data
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise ValueError(f"{path}: expected {{\"models\": [{{\"model\": ...}}, ...]}}")
    return models


def _absolute(model: str | None) -> str | None:
    return None if model is None else str(Path(model).expanduser().resolve())


def _default_name(model: str | None) -> str:
    return model or DEFAULT_MODEL_NAME
