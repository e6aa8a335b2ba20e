"""The architecture facts the engine needs, normalized from a Hugging Face config dict.

Every loader (HF folder, GGUF) ends by producing an HF-style config dict; this module is the
single place that turns it into typed fields and refuses what servelm cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# HF `architectures[0]` / `model_type` -> servelm family name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3"}


@dataclass(frozen=True)
class ModelArch:
    family: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"llama3", ...}
    sliding_window: int | None = None  # attention window; servelm caps the context at it
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArch:
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if family is None and model_type in SUPPORTED_MODEL_TYPES:
            family = model_type
        if family is None:
            raise ValueError(
                f"unsupported architecture {archs or model_type!r}; servelm supports "
                f"{sorted(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(cfg["hidden_size"])
            num_heads = int(cfg["num_attention_heads"])
            arch = cls(
                family=family,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=int(cfg.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(cfg)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
                qk_norm=family == "qwen3",
                rope_scaling=_rope_scaling(cfg),
                sliding_window=_sliding_window(cfg),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=_as_tuple(cfg.get("eos_token_id")),
            )
        except KeyError as e:
            raise ValueError(f"model config is missing required field {e.args[0]!r}") from None
        if arch.num_heads % arch.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({arch.num_heads}) must be a multiple of "
                f"num_key_value_heads ({arch.num_kv_heads})"
            )
        return arch


def _as_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)


def _sliding_window(cfg: dict[str, Any]) -> int | None:
    """Mistral sets `sliding_window`; Qwen2/3 only use theirs when `use_sliding_window`."""
    window = cfg.get("sliding_window")
    if window is None or cfg.get("use_sliding_window") is False:
        return None
    return int(window)


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return params.get("rope_theta", cfg.get("rope_theta", 10000.0))


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Transformers 4.x calls it `rope_scaling`, 5.x `rope_parameters`; accept both."""
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_scaling type {rope_type!r}; allowed: {sorted(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return None
    scaling["rope_type"] = rope_type
    return scaling
