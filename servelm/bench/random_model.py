"""`python -m servelm.bench.random_model FOLDER`: a Llama (or with `--experts N`, a Qwen3-MoE)
with random bfloat16 weights and the default model's tokenizer, saved as an HF folder.

Why: the benchmarks need models of other shapes than the default one (a 30M-parameter model
where per-step overhead weighs most, a 1B-class shape for weight sizes) and this machine has
no model hub. The defaults make the 30M model of the throughput figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def save_random_llama(folder: str | Path, *, hidden_size: int = 256, intermediate_size: int = 768,
                      num_layers: int = 20, num_heads: int = 4, num_kv_heads: int = 2,
                      vocab_size: int | None = None, tie_word_embeddings: bool = True,
                      seed: int = 0) -> int:
    """Write the model and tokenizer to `folder`; returns the parameter count. Without a
    vocab size the tokenizer's is used, so generated text decodes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from servelm.model.loader import load_tokenizer

    tokenizer = load_tokenizer(None)
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=tie_word_embeddings,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         rope_theta=10000.0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def save_random_moe(folder: str | Path, *, num_experts: int, top_k: int, hidden_size: int = 512,
                    moe_intermediate_size: int = 384, num_layers: int = 12, num_heads: int = 8,
                    num_kv_heads: int = 2, seed: int = 0) -> int:
    """A Qwen3-MoE of a small real shape (every layer sparse, renormalized top-k) with random
    weights and the default tokenizer; returns the parameter count."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from servelm.model.loader import load_tokenizer

    tokenizer = load_tokenizer(None)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                            intermediate_size=4 * hidden_size, moe_intermediate_size=moe_intermediate_size,
                            num_hidden_layers=num_layers, num_attention_heads=num_heads,
                            num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
                            num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                            max_position_embeddings=2048, tie_word_embeddings=True,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=768)
    p.add_argument("--num-layers", type=int, default=20)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=0, help="a Qwen3-MoE with this many experts")
    p.add_argument("--top-k", type=int, default=4, help="with --experts: experts per token")
    args = p.parse_args()
    if args.experts:
        n = save_random_moe(args.folder, num_experts=args.experts, top_k=args.top_k)
        print(f"{n / 1e6:.1f}M parameters in {args.folder}")
        return
    n = save_random_llama(args.folder, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                          num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads)
    print(f"{n / 1e6:.1f}M parameters in {args.folder}")


if __name__ == "__main__":
    main()
