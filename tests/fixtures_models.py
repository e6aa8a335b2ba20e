"""Builders for tiny random-weight models that tests compare against transformers.

Every model gets a real (if tiny) byte-level BPE tokenizer trained here on generated English,
with ChatML special tokens and chat template, so tokenization, chat formatting and stop tokens
are exercised just as with a real checkpoint. Weights are deliberately large-variance
(initializer_range 0.2, norms and biases randomized) so that greedy decoding wanders instead of
repeating one token, and so that a mixed-up norm or bias shows up as a numeric difference.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(4)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0}

_WORDS = {
    "subj": ["the cat", "a robot", "my sister", "the old sailor", "every student", "our team",
             "the quick fox", "a tiny bird", "the engineer", "this server", "the model", "Lily"],
    "verb": ["reads", "builds", "finds", "paints", "measures", "explains", "carries", "watches",
             "writes", "opens", "counts", "sells", "loves", "jumps over", "looks at"],
    "obj": ["a red book", "the blue door", "three apples", "the river", "a long letter",
            "the small box", "forty stars", "an empty cup", "the green hill", "a quiet song",
            "the lazy dog", "twelve tokens", "the kitchen table", "a bright lamp"],
    "tail": ["today", "at night", "in the morning", "with great care", "again and again",
             "before lunch", "near the park", "without a word", "for 7 minutes", "in 2024"],
}


def corpus_lines(n: int = 400, seed: int = 0) -> list[str]:
    """Varied English-like sentences: words, numbers, punctuation, questions, dialogue."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        s = " ".join(rng.choice(_WORDS[k]) for k in ("subj", "verb", "obj", "tail"))
        form = i % 5
        if form == 0:
            s = s[0].upper() + s[1:] + "."
        elif form == 1:
            s = f"Why does {s}?"
        elif form == 2:
            s = f'"{s[0].upper() + s[1:]}!" she said, and smiled.'
        elif form == 3:
            s = f"{rng.randint(1, 999)}. {s}, then {rng.choice(_WORDS['verb'])} {rng.choice(_WORDS['obj'])};"
        else:
            s = f"Q: what {rng.choice(_WORDS['verb'])} {rng.choice(_WORDS['obj'])}? A: {s}."
        lines.append(s)
    return lines


def build_tokenizer(vocab_size: int = 400) -> Any:
    """Train a byte-level BPE (GPT-2 pre-tokenization, no automatic BOS) and wrap it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|eos|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHAT_TEMPLATE,
    )


def tiny_config(family: str, vocab_size: int, **overrides: Any) -> Any:
    """A transformers config for `family` with test-sized dimensions; kwargs override."""
    from transformers import (
        Gemma2Config,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config,
               "qwen3": Qwen3Config, "mixtral": MixtralConfig, "qwen2_moe": Qwen2MoeConfig,
               "qwen3_moe": Qwen3MoeConfig, "phi3": Phi3Config, "gemma2": Gemma2Config}
    if family not in classes:
        raise ValueError(f"unknown tiny model family {family!r}; choose from {sorted(classes)}")
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
    )
    if family in ("mistral", "mixtral"):
        kw["sliding_window"] = None
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        kw["use_sliding_window"] = False
    if family == "mixtral":  # experts as wide as intermediate_size
        kw |= dict(num_local_experts=4, num_experts_per_tok=2)
    if family in ("qwen2_moe", "qwen3_moe"):
        kw |= dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True)
    if family == "gemma2":  # caps that bite at this size, a query scale other than head_dim's
        kw |= dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0, query_pre_attn_scalar=24,
                   tie_word_embeddings=True)
    if family == "qwen2_moe":  # a shared expert, and the middle layer dense
        kw |= dict(shared_expert_intermediate_size=128, mlp_only_layers=[1])
    kw.update(overrides)
    return classes[family](**kw)


def small_arch(**overrides: Any) -> Any:
    """A ModelArch of a tiny llama (2 layers, 4 heads / 2 KV heads) for tests that need a
    shape and no weights; fields overridable."""
    from servelm.model.arch import ModelArch

    base = dict(family="llama", vocab_size=100, hidden_size=8, intermediate_size=12, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=2, rms_norm_eps=1e-6, rope_theta=1e4,
                max_position_embeddings=64, tie_word_embeddings=False, qkv_bias=False,
                qk_norm=False)
    return ModelArch(**{**base, **overrides})


def build_tiny_model(family: str, out_dir: Path, tokenizer: Any, *,
                     max_shard_size: str | None = None, **overrides: Any) -> Path:
    """Save a seeded random model + tokenizer as an HF folder (float32 safetensors)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, overrides.pop("vocab_size", len(tokenizer)), **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # default ones would hide a swapped or missing norm
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):  # default zeros would hide a dropped bias
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)
    # Chat models stop on end-of-turn too; real checkpoints put that in generation_config.json.
    gen_cfg = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID], "pad_token_id": EOS_ID}
    (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=1))
    return out_dir


def _llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to llama q/k rows: halves layout -> adjacent pairs."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
}
_GGUF_EXPERTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def gguf_tensor_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, _, suffix = rest.rpartition(".")
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{suffix}"


def _stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF MoE tensors (Mixtral's names too) with each projection's experts stacked in one
    [experts, out, in] tensor under its GGUF name, as llama.cpp's converter writes them."""
    import re

    from servelm.model.hf_loader import canonical_name

    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in state.items():
        name = canonical_name(name)
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight", name)
        if m is None:
            out[name] = t
        else:
            stacks.setdefault(f"blk.{m.group(1)}.{_GGUF_EXPERTS[m.group(3)]}.weight", {})[int(m.group(2))] = t
    for name, experts in stacks.items():
        out[name] = torch.stack([experts[e] for e in sorted(experts)])
    return out


def write_tiny_llama_gguf(hf_dir: Path, out_path: Path, tokenizer: Any,
                          matrix_types: list[Any] | None = None, arch: str = "llama") -> Path:
    """Convert a tiny HF llama folder to GGUF the way llama.cpp would: also a Mixtral (as
    "llama" with experts) or a Qwen2/3-MoE (`arch` "qwen2moe"/"qwen3moe"), experts stacked.

    2-D and 3-D tensors cycle through `matrix_types` (default: every type servelm
    dequantizes), so one file checks each decoder; 1-D tensors (norms) stay F32 as llama.cpp
    keeps them. For a dense model `arch` only changes the general.architecture label, to test
    refusal of foreign files.
    """
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    state = _stack_experts(load_file(str(hf_dir / "model.safetensors")))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    Q = gguf.GGMLQuantizationType
    cycle = matrix_types or [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16, Q.Q4_1, Q.Q4_0, Q.F32]
    w = gguf.GGUFWriter(str(out_path), arch)
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if arch != "llama" and experts:
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_weights_norm(cfg["norm_topk_prob"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_name("tiny llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_eot_token_id(IM_END_ID)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for i, (name, t) in enumerate(sorted(state.items())):
        if arch == "llama" and ".q_proj." in name:
            t = _llama_cpp_permute(t, heads)
        elif arch == "llama" and ".k_proj." in name:
            t = _llama_cpp_permute(t, kv_heads)
        if name.endswith("shared_expert_gate.weight"):
            t = t.reshape(-1)  # llama.cpp keeps it as a vector
        arr = t.float().numpy()
        router = ".mlp.gate." in name or "shared_expert_gate" in name  # llama.cpp keeps it F32
        qtype = cycle[i % len(cycle)] if arr.ndim >= 2 and not router else Q.F32
        data = arr if qtype == Q.F32 else gguf.quants.quantize(arr, qtype)
        w.add_tensor(name if name.startswith("blk.") else gguf_tensor_name(name),
                     np.ascontiguousarray(data), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path
