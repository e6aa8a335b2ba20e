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
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Phi3ForCausalLM": "phi3",  # q/k/v and gate/up fused in the file (split at load), LongRoPE
    "Gemma2ForCausalLM": "gemma2",  # see GEMMA below
}
SUPPORTED_MODEL_TYPES = set(SUPPORTED_ARCHITECTURES.values())
MOE_FAMILIES = {"mixtral", "qwen2_moe", "qwen3_moe"}
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3", "longrope"}


@dataclass(frozen=True)
class ModelArch:
    family: str  # a value of SUPPORTED_ARCHITECTURES
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
    qkv_bias: bool  # Qwen2, Qwen2-MoE
    qk_norm: bool  # Qwen3, Qwen3-MoE
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"llama3"|"longrope", ...}
    rotary_dim: int = 0  # dims of each head that RoPE rotates (Phi's partial_rotary_factor); 0: all
    sliding_window: int | None = None  # attention window; servelm caps the context at it
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Mixture of experts (0 experts: a dense model). Each token of a sparse layer runs
    # through the `num_experts_per_tok` experts its router scores highest.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # the chosen experts' weights renormalized to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one more expert every token runs
    dense_layers: tuple[int, ...] = ()  # layers of an MoE model with a plain MLP
    # Expert parallelism: the experts this rank holds, whole (model/sharding.py); () is all.
    held_experts: tuple[int, ...] = ()
    # Gemma 2's departures from Llama: a GELU-gated MLP, norms also after attention and
    # after the MLP, norm weights stored as w - 1, embeddings scaled by sqrt(hidden),
    # attention scaled by query_pre_attn_scalar^-0.5, and tanh soft-capping of attention
    # scores and of the logits (cap * tanh(x / cap)).
    hidden_act: str = "silu"  # or "gelu_tanh"
    sandwich_norms: bool = False
    norm_weight_offset: float = 0.0
    embedding_multiplier: float = 1.0
    query_pre_attn_scalar: float | None = None  # None: head_dim
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.dense_layers

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
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family == "gemma2")),
                qkv_bias=family in ("qwen2", "qwen2_moe") or bool(cfg.get("attention_bias", False)),
                qk_norm=family in ("qwen3", "qwen3_moe"),
                rope_scaling=_rope_scaling(cfg),
                rotary_dim=_rotary_dim(cfg, int(cfg.get("head_dim") or hidden // num_heads)),
                sliding_window=_sliding_window(cfg),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=_as_tuple(cfg.get("eos_token_id")),
                **_moe_fields(family, cfg),
                **_gemma_fields(family, cfg),
            )
        except KeyError as e:
            raise ValueError(f"model config is missing required field {e.args[0]!r}") from None
        if arch.num_experts and not 1 <= arch.num_experts_per_tok <= arch.num_experts:
            raise ValueError(f"num_experts_per_tok ({arch.num_experts_per_tok}) must be between 1 "
                             f"and the number of experts ({arch.num_experts})")
        if arch.num_heads % arch.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({arch.num_heads}) must be a multiple of "
                f"num_key_value_heads ({arch.num_kv_heads})"
            )
        return arch


def _moe_fields(family: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields of a Mixtral / Qwen2-MoE / Qwen3-MoE config ({} for a dense family).
    Mixtral's experts are as wide as its `intermediate_size` and always renormalized; the
    Qwen MoEs say so in `moe_intermediate_size` and `norm_topk_prob`, and may keep some
    layers dense (`mlp_only_layers`, or all but every `decoder_sparse_step`-th)."""
    if family not in MOE_FAMILIES:
        return {}
    if family == "mixtral":
        return dict(num_experts=int(cfg["num_local_experts"]), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                    moe_intermediate_size=int(cfg["intermediate_size"]), norm_topk_prob=True)
    step = int(cfg.get("decoder_sparse_step") or 1)
    only = {int(i) for i in cfg.get("mlp_only_layers") or ()}
    layers = int(cfg["num_hidden_layers"])
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))  # transformers 5 renamed it
    if experts is None:
        raise KeyError("num_experts")
    return dict(num_experts=int(experts), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0)
                if family == "qwen2_moe" else 0,
                dense_layers=tuple(i for i in range(layers) if i in only or (i + 1) % step))


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


def _gemma_fields(family: str, cfg: dict[str, Any]) -> dict[str, Any]:
    if family != "gemma2":
        return {}
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"unsupported hidden_activation {act!r} for gemma2; allowed: gelu_pytorch_tanh")
    return dict(hidden_act="gelu_tanh", sandwich_norms=True, norm_weight_offset=1.0,
                embedding_multiplier=float(cfg["hidden_size"]) ** 0.5,
                query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or 0) or None,
                attn_logit_softcap=cfg.get("attn_logit_softcapping"),
                final_logit_softcap=cfg.get("final_logit_softcapping"))


def _rotary_dim(cfg: dict[str, Any], head_dim: int) -> int:
    """Phi models may rotate only a leading share of each head (`partial_rotary_factor`,
    top-level or, in transformers 5, inside `rope_parameters`); 0 means all of it."""
    params = cfg.get("rope_parameters") or {}
    factor = cfg.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0
    return 0 if factor == 1.0 else int(head_dim * factor)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Transformers 4.x calls it `rope_scaling`, 5.x `rope_parameters`; accept both. LongRoPE
    (Phi-3) also needs the trained context and the configured one, which may sit at the top."""
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "longrope":
        scaling.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
        scaling.setdefault("max_position_embeddings", cfg.get("max_position_embeddings"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_scaling type {rope_type!r}; allowed: {sorted(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return None
    scaling["rope_type"] = rope_type
    return scaling
