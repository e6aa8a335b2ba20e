"""GPUs the roofline step model (roofline.py) can time a step on, for hardware not here.

Compute and memory figures are the vendors' published datasheet numbers: the dense 16-bit
(bf16) tensor peak, never the "with sparsity" figure printed beside it; memory bandwidth and
capacity as printed (HBM and GDDR capacities are binary, so "80 GB" is taken as 80 GiB; the
driver keeps a little, which `gpu_memory_utilization` leaves room for). The link is what one
GPU can send to the others in one direction (NVLink or Infinity Fabric inside an 8-GPU
board, else PCIe), the figure a ring all-reduce is bound by.

ASSUMPTIONS, not datasheet figures: the per-call collective latency (NCCL small-message
all-reduce is ~10 us on NVLink, more through PCIe and the host) and `usd_per_gpu_hour`, a
rough on-demand price per GPU-hour at GPU clouds in 2024-25 (hyperscalers often charge more,
reserved and spot less). They exist so `simulate plan` can rank deployments by cost; pass
your own price with --usd-per-gpu-hour.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PRICE_ASSUMPTION = "assumed on-demand $/GPU-hour at GPU clouds, 2024-25; not a quote"


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_tflops: float  # dense bf16 tensor-core peak, 1e12 FLOP/s
    mem_bandwidth_gbs: float  # device memory, 1e9 B/s
    memory_gib: float  # device memory per GPU
    link_gbs: float  # GPU-to-GPU, one direction, 1e9 B/s
    link_latency_us: float  # per collective call (assumption)
    usd_per_gpu_hour: float | None  # assumption; None: unknown (a custom GPU without a price)
    source: str = ""

    def __post_init__(self) -> None:
        for f in ("peak_tflops", "mem_bandwidth_gbs", "memory_gib", "link_gbs"):
            _positive(f, getattr(self, f))
        if self.link_latency_us < 0:
            raise ValueError(f"--link-latency-us must be >= 0, got {self.link_latency_us}")
        if self.usd_per_gpu_hour is not None and self.usd_per_gpu_hour < 0:
            raise ValueError(f"--usd-per-gpu-hour must be >= 0, got {self.usd_per_gpu_hour}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPUSpec:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def _positive(field: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"--{field.replace('_', '-')} must be a number > 0, got {value!r}")


_NVLINK3 = "NVLink 3: 600 GB/s both directions"
_NVLINK4 = "NVLink 4: 900 GB/s both directions"
_PCIE4 = "PCIe Gen4 x16: 64 GB/s both directions"

GPU_PRESETS: dict[str, GPUSpec] = {g.name: g for g in (
    GPUSpec("a100-40gb", 312, 1555, 40, 300, 10, 1.30,
            f"NVIDIA A100 datasheet (SXM4 40GB); {_NVLINK3}"),
    GPUSpec("a100-80gb", 312, 2039, 80, 300, 10, 1.80,
            f"NVIDIA A100 datasheet (SXM4 80GB); {_NVLINK3}"),
    GPUSpec("h100-sxm", 989, 3350, 80, 450, 10, 3.00,
            f"NVIDIA H100 datasheet (SXM5; 1979 TFLOPS is with sparsity); {_NVLINK4}"),
    GPUSpec("h200", 989, 4800, 141, 450, 10, 3.80, f"NVIDIA H200 datasheet (SXM); {_NVLINK4}"),
    GPUSpec("l4", 121, 300, 24, 32, 25, 0.80,
            f"NVIDIA L4 datasheet (242 TFLOPS is with sparsity); {_PCIE4}"),
    GPUSpec("l40s", 362, 864, 48, 32, 25, 1.00, f"NVIDIA L40S datasheet; {_PCIE4}"),
    GPUSpec("a10", 125, 600, 24, 32, 25, 0.75, f"NVIDIA A10 datasheet; {_PCIE4}"),
    GPUSpec("a10g", 70, 600, 24, 32, 25, 1.01,
            "AWS's A10 variant (g5): no NVIDIA datasheet; 70 TFLOPS is the commonly quoted "
            f"tensor figure, memory as the A10; {_PCIE4}; price: g5.xlarge on-demand"),
    GPUSpec("mi300x", 1307, 5300, 192, 448, 10, 2.50,
            "AMD Instinct MI300X datasheet (2615 TFLOPS is with sparsity); Infinity Fabric: "
            "7 links, 896 GB/s both directions"),
)}
GPU_ALIASES = {"h100": "h100-sxm", "a100": "a100-80gb"}
GPU_CHOICES = sorted([*GPU_PRESETS, *GPU_ALIASES, "custom"])


def gpu_spec(name: str, **overrides: float | None) -> GPUSpec:
    """A preset with any figure overridden (None: keep the preset's), or "custom" from the
    figures alone: peak_tflops, mem_bandwidth_gbs and memory_gib are then required; the
    link defaults to PCIe Gen4 and the price to unknown."""
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {f.name for f in dataclasses.fields(GPUSpec)} - {"name", "source"}
    if unknown:
        raise TypeError(f"gpu_spec: unknown figures {sorted(unknown)}")
    key = GPU_ALIASES.get(name.lower(), name.lower())
    if key == "custom":
        missing = [f for f in ("peak_tflops", "mem_bandwidth_gbs", "memory_gib") if f not in given]
        if missing:
            flags = ", ".join("--" + f.replace("_", "-") for f in missing)
            raise ValueError(f"--gpu custom needs {flags}")
        base = GPUSpec("custom", given["peak_tflops"], given["mem_bandwidth_gbs"],
                       given["memory_gib"], 32, 25, None, "custom figures (link default: PCIe Gen4)")
    elif key in GPU_PRESETS:
        base = GPU_PRESETS[key]
    else:
        raise ValueError(f"--gpu: unknown GPU {name!r}; allowed: {', '.join(GPU_CHOICES)}")
    if not given:
        return base
    source = base.source + "; overridden: " + ", ".join(f"{k}={v}" for k, v in sorted(given.items()))
    return dataclasses.replace(base, **given, source=source)

