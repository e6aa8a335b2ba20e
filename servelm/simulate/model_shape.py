"""The shape of a dense decoder (Llama, Mistral, Qwen2, Qwen3 style): all the roofline model
needs to count FLOPs and bytes, read from a Hugging Face config.json or a named preset, so
models that are not on this machine (weights and all) can be simulated."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The public config.json numbers of each model (Hugging Face Hub, the repo named).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": {  # meta-llama/Meta-Llama-3-8B
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
        "tie_word_embeddings": False, "max_position_embeddings": 8192},
    "llama-3-70b": {  # meta-llama/Meta-Llama-3-70B
        "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256,
        "tie_word_embeddings": False, "max_position_embeddings": 8192},
    "qwen2.5-7b": {  # Qwen/Qwen2.5-7B-Instruct
        "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
        "tie_word_embeddings": False, "max_position_embeddings": 32768},
    "mistral-7b": {  # mistralai/Mistral-7B-Instruct-v0.3
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32768,
        "tie_word_embeddings": False, "max_position_embeddings": 32768},
}
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "vocab_size")
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192  # capped by a sliding window, as the engine caps it

    @property
    def layer_params(self) -> int:
        """Matmul weights of one layer: q, k, v, o and the gated MLP (gate, up, down);
        norms and biases are too small to count."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.hidden_size * (q + 2 * kv) + q * self.hidden_size \
            + 3 * self.hidden_size * self.intermediate_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        heads = 1 if self.tie_word_embeddings else 2
        return self.num_layers * self.layer_params + heads * self.embedding_params

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelShape:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def shape_from_hf_config(cfg: dict[str, Any], name: str) -> ModelShape:
    """`name` says where the config came from, for the errors."""
    where = f"--model-config {name}"
    if any(cfg.get(k) for k in _MOE_KEYS):
        raise ValueError(f"{where}: a mixture-of-experts model; the roofline model covers dense "
                         "decoders (Llama, Mistral, Qwen2, Qwen3)")
    missing = [k for k in _REQUIRED if cfg.get(k) is None]
    if missing:
        raise ValueError(f"{where}: the config is missing {', '.join(missing)}")
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        max_pos = int(cfg.get("max_position_embeddings") or 8192)
        shape = ModelShape(
            name=name, hidden_size=hidden, num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or (hidden // heads if heads > 0 else 0)),
            intermediate_size=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=min(max_pos, int(window)) if window else max_pos)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: a shape field is not an integer: {exc}") from None
    for f in dataclasses.fields(ModelShape):
        value = getattr(shape, f.name)
        if f.type == "int" and value <= 0:
            raise ValueError(f"{where}: {f.name} must be > 0, got {value}")
    if shape.num_heads % shape.num_kv_heads:
        raise ValueError(f"{where}: num_attention_heads ({shape.num_heads}) must be a multiple "
                         f"of num_key_value_heads ({shape.num_kv_heads})")
    return shape


def model_shape(spec: str) -> ModelShape:
    """A preset name, a config.json, or a folder holding one (a Hugging Face model folder)."""
    if spec.lower() in MODEL_PRESETS:
        return shape_from_hf_config(MODEL_PRESETS[spec.lower()], spec.lower())
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"--model-config: {spec!r} is neither a preset (allowed: "
                         f"{', '.join(MODEL_PRESETS)}) nor a config.json or a folder holding one")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--model-config: cannot read {path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"--model-config: {path} is not a JSON object")
    return shape_from_hf_config(cfg, str(spec))
