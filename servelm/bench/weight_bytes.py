"""`python -m servelm.bench.weight_bytes`: `model_weight_bytes` under each weight
quantization for a random-weight Llama of a given shape.

Why: how much int4 saves depends on the model's shape. The embedding table stays int8
(a tied LM head shares it), so the smaller its share of the weights, the closer the whole
model gets to the 4-bit matmul weights' ratio. The default model is small and has a large
vocabulary. This measures a bigger shape (TinyLlama-1.1B's, with 16 layers so that it fits
the reference machine) without downloading anything.
"""

from __future__ import annotations

import argparse
import json
import tempfile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--intermediate-size", type=int, default=5632)
    p.add_argument("--num-layers", type=int, default=16)
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--tie-word-embeddings", action="store_true")
    args = p.parse_args()

    from servelm import LLM
    from servelm.bench.random_model import save_random_llama

    with tempfile.TemporaryDirectory() as folder:
        save_random_llama(folder, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                          num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                          vocab_size=args.vocab_size, tie_word_embeddings=args.tie_word_embeddings)
        result = {"shape": vars(args)}
        for method in (None, "int8", "int4"):
            llm = LLM(folder, dtype="bfloat16", quantization=method, num_kv_blocks=4,
                      enable_prefix_caching=False)
            result[method or "bfloat16"] = llm.get_metrics()["model_weight_bytes"]
            del llm
    base = result["bfloat16"]
    for method in ("int8", "int4"):
        result[f"{method}_ratio"] = base / result[method]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
