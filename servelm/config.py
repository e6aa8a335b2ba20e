"""Engine configuration: one dataclass, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from servelm.engine.policies import POLICIES
from servelm.kv.compression import CompressionConfig
from servelm.ops.kv_quant import KV_CACHE_DTYPES
from servelm.ops.quant import GROUP_SIZES
from servelm.ops.quant import METHODS as QUANT_METHODS
from servelm.spec.config import SpecConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PREEMPTION_MODES = ("recompute", "swap")


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs besides the weights.

    `num_kv_blocks` wins over `kv_cache_memory_gb`; when neither is given the cache is
    sized from a default memory budget. `max_model_len=None` means the model's own
    context length, capped by what the KV cache can hold.
    """

    model: str | None = None
    dtype: str = "float32"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 2.0
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None
    seed: int = 0
    num_threads: int | None = None
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"  # or "swap": victims' KV goes to a CPU buffer
    swap_space_gb: float = 4.0  # size of that buffer (used only with preemption_mode="swap")
    cpu_offload_gb: float = 0.0  # CPU tier for evicted prefix-cache blocks (0: off); KV, not weights
    scheduling_policy: str = "fcfs"  # or "priority", "sjf", "mlfq" (engine/policies.py)
    length_predictor: str | None = None  # sjf: a file from `servelm length-predictor train`
    speculative_config: dict | str | None = None  # see servelm/spec/config.py; None: off
    quantization: str | None = None  # "int8" or "int4" weight-only, at load (ops/quant.py)
    quantization_group_size: int = 128  # int4: input columns per scale (32, 64 or 128)
    kv_cache_dtype: str = "auto"  # "auto" (= dtype), "int8" or "fp8" (e4m3), ops/kv_quant.py
    # Per-request KV budget for long contexts, e.g. {"method": "h2o", "budget": 512}; None:
    # off. See servelm/kv/compression.py. Turns the prefix cache off.
    kv_compression: dict | str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1):
            raise ValueError(f"num_kv_blocks must be an integer >= 1, got {self.num_kv_blocks!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, "
                             f"got {self.preemption_mode!r}")
        if self.scheduling_policy not in POLICIES:
            raise ValueError(f"scheduling_policy must be one of {POLICIES}, "
                             f"got {self.scheduling_policy!r}")
        if self.length_predictor is not None and self.scheduling_policy != "sjf":
            raise ValueError("length_predictor is used only by scheduling_policy 'sjf', "
                             f"got scheduling_policy {self.scheduling_policy!r}")
        if not self.swap_space_gb > 0:
            raise ValueError(f"swap_space_gb must be > 0, got {self.swap_space_gb!r}")
        if not self.cpu_offload_gb >= 0:
            raise ValueError(f"cpu_offload_gb must be >= 0, got {self.cpu_offload_gb!r}")
        SpecConfig.parse(self.speculative_config)  # raises on a bad one
        if self.quantization not in (None, *QUANT_METHODS):
            raise ValueError(f"quantization must be one of {QUANT_METHODS} or None, "
                             f"got {self.quantization!r}")
        if self.quantization_group_size not in GROUP_SIZES:
            raise ValueError(f"quantization_group_size must be one of {GROUP_SIZES}, "
                             f"got {self.quantization_group_size!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if CompressionConfig.parse(self.kv_compression) is not None:
            if self.spec is not None:
                raise ValueError("kv_compression cannot be combined with speculative_config")
            # A compacted block no longer holds the tokens its hash names.
            self.enable_prefix_caching = False
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads!r}")

    @property
    def spec(self) -> SpecConfig | None:
        return SpecConfig.parse(self.speculative_config)

    @property
    def compression(self) -> CompressionConfig | None:
        return CompressionConfig.parse(self.kv_compression)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
