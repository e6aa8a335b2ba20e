"""Mixture-of-experts GGUF files: their config fields and their stacked expert tensors.

llama.cpp stores a Mixtral as architecture "llama" with `expert_count` set, and the Qwen
MoEs as "qwen2moe" / "qwen3moe". Each sparse layer has a router (`ffn_gate_inp`) and the
experts' matrices stacked in one 3-D tensor per projection (`ffn_gate_exps` and so on,
[experts, out, in]); Qwen2-MoE adds a shared expert (`*_shexp`) and its sigmoid gate. Here
the stack is cut into one HF-named matrix per expert (a view of the file's bytes, so
quantized blocks stay blocks) and the metadata becomes the HF config fields ModelArch reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

MOE_LAYER_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
MOE_ARCHITECTURES = {"qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}
_ROUTER = re.compile(r"blk\.(\d+)\.ffn_gate_inp\.weight")
_STACKED = re.compile(r"(.*\.mlp\.experts)\.([a-z_]+\.weight)")


def moe_config(field: Callable[[str], Any], name: str, tensor_names: list[str]) -> dict[str, Any]:
    """The HF config fields of an MoE file ({} for a dense one). `field(key)` reads a
    metadata value or None. Layers without a router are dense."""
    experts = field(f"{name}.expert_count")
    if not experts:
        return {}
    used = int(field(f"{name}.expert_used_count"))
    if name == "llama":  # Mixtral: experts as wide as feed_forward_length, renormalized
        return {"architectures": ["MixtralForCausalLM"], "num_local_experts": int(experts),
                "num_experts_per_tok": used}
    sparse = {int(m.group(1)) for n in tensor_names if (m := _ROUTER.fullmatch(n))}
    # Without the key, llama.cpp renormalizes the chosen experts' weights for Qwen3-MoE only.
    norm = field(f"{name}.expert_weights_norm")
    cfg = {"num_experts": int(experts), "num_experts_per_tok": used,
           "moe_intermediate_size": int(field(f"{name}.expert_feed_forward_length")),
           "norm_topk_prob": name == "qwen3moe" if norm is None else bool(norm),
           "mlp_only_layers": [i for i in range(int(field(f"{name}.block_count"))) if i not in sparse]}
    if name == "qwen2moe":
        cfg["shared_expert_intermediate_size"] = int(field(f"{name}.expert_shared_feed_forward_length"))
    return cfg


def split_experts(hf: str, data: np.ndarray, shape: tuple[int, ...],
                  ) -> Iterator[tuple[str, np.ndarray, tuple[int, ...]]]:
    """(HF name, stored data, torch shape) of each matrix in a GGUF tensor: one per expert
    for a stacked one, the tensor itself otherwise (a shared-expert gate as HF's [1, in])."""
    stacked = _STACKED.fullmatch(hf)
    if stacked is None:
        if hf.endswith("shared_expert_gate.weight") and len(shape) == 1:
            yield hf, data.reshape(1, -1), (1, shape[0])
        else:
            yield hf, data, shape
        return
    head, tail = stacked.groups()
    for e in range(shape[0]):
        yield f"{head}.{e}.{tail}", data[e], shape[1:]
