"""Which device a worker runs on, moving weights there, and sizing the KV cache from what
the device has left (`--gpu-memory-utilization`, as vLLM does).

On CUDA the cache takes what is left of `utilization` x the GPU's memory after the weights,
the peak activations of the largest step (measured by running one, see
worker/memory_profile.py), and whatever else holds memory on the GPU (the CUDA context,
other processes).
"""

from __future__ import annotations

from dataclasses import fields

import torch

from servelm.ops.quant import QuantWeight

GiB = 2**30


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """config.device ("auto", "cpu", "cuda") as a torch device; on CUDA, rank r of a
    tensor/pipeline-parallel group takes GPU r (mod the GPUs this process sees)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device 'cuda' needs a GPU that torch can use, and torch {torch.__version__} "
                         "sees none (a CPU build, no driver, or CUDA_VISIBLE_DEVICES empty); use "
                         "device 'cpu' or 'auto'")
    return torch.device("cuda", rank % torch.cuda.device_count())


def weights_to(weights: dict[str, torch.Tensor | QuantWeight],
               device: torch.device) -> dict[str, torch.Tensor | QuantWeight]:
    """Every weight moved to `device`, one at a time (the host copy of each is freed as it
    goes, so the host never holds two copies); blocks stay blocks."""
    if device.type == "cpu":
        return weights
    for name in list(weights):
        w = weights[name]
        if isinstance(w, torch.Tensor):
            weights[name] = w.to(device)
        else:
            weights[name] = type(w)(**{f.name: v.to(device) if isinstance(v := getattr(w, f.name), torch.Tensor)
                                       else v for f in fields(w)})
    return weights


def kv_blocks_for_memory(total_bytes: int, utilization: float, used_bytes: int, block_bytes: int) -> int:
    """KV blocks that fit in `utilization` of a device of `total_bytes` of which
    `used_bytes` are taken at the peak of a step without the cache (weights, activations,
    the CUDA context and other processes)."""
    budget = int(total_bytes * utilization) - used_bytes
    blocks = budget // block_bytes
    if blocks < 1:
        raise ValueError(
            f"gpu_memory_utilization {utilization:g} of {total_bytes / GiB:.1f} GiB leaves no room for "
            f"the KV cache: weights, activations and other memory already take {used_bytes / GiB:.2f} GiB "
            f"and one block needs {block_bytes / 2**20:.2f} MiB; raise gpu_memory_utilization or "
            "lower max_num_batched_tokens")
    return blocks
