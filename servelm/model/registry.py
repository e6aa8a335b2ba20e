"""Architecture family -> model class. One class covers the whole Llama family today, its
mixtures of experts included."""

from __future__ import annotations

import torch

from servelm.distributed.parallel import SINGLE, ParallelContext
from servelm.model.arch import ModelArch
from servelm.model.llama import LlamaForCausalLM
from servelm.ops.attention import AttentionBackend

MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "mixtral": LlamaForCausalLM,  # sparse MLPs: model/layers/moe.py
    "qwen2_moe": LlamaForCausalLM,
    "qwen3_moe": LlamaForCausalLM,
    "phi3": LlamaForCausalLM,  # its fused tensors are split at load (model/hf_loader.py)
    "gemma2": LlamaForCausalLM,
}


def build_model(arch: ModelArch, weights: dict[str, torch.Tensor], backend: AttentionBackend,
                dtype: torch.dtype, max_positions: int,
                parallel: ParallelContext = SINGLE, device: torch.device | str = "cpu") -> LlamaForCausalLM:
    """`arch`: the part this rank builds (model/sharding.py), `weights` its slices, on
    `device`."""
    cls = MODEL_CLASSES.get(arch.family)
    if cls is None:
        raise ValueError(f"unsupported architecture family {arch.family!r}; allowed: {sorted(MODEL_CLASSES)}")
    model = cls(arch, backend, dtype, max_positions, parallel, device)
    model.load_weights(weights)
    return model.eval()
