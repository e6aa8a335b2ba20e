"""`servelm eval perplexity`: what a compression setting costs in accuracy.

The text (a JSONL prompt set's string fields, or a plain .txt file) is tokenized and cut
into windows of `--context-len` tokens. Every window runs through servelm twice, as one
prompt with `prompt_logprobs=1`: once as configured (`--quantization`, `--kv-cache-dtype`,
`--kv-compression`) and once without any of them as the reference. Reported per setting:
- perplexity: exp of the mean negative log-likelihood of each token given the window
  before it, and the top-1 agreement, the fraction of positions where both settings
  predict the same next token;
- greedy agreement: each window then continues for `--greedy-tokens` greedy tokens; the
  fraction generated before the first token that differs from the reference's.
A long prompt is prefilled in chunks of `--max-num-batched-tokens`, and StreamingLLM and
H2O compress after each chunk, so small chunks score them as they run while decoding.
SnapKV compresses only once the whole prompt is in, so its prompt perplexity is the
reference's by construction, and its greedy agreement is what measures it.
transformers scores the same windows on the unquantized weights as an independent check
of the reference (`--skip-hf` to leave it out).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from servelm.bench.datasets import default_dataset_path
from servelm.bench.harness import (
    greedy,
    progress,
    result_header,
    result_path,
    split_engine,
    write_result,
)


def add_eval_parser(sub, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> None:
    ev = sub.add_parser("eval", help="accuracy of a model setting")
    esub = ev.add_subparsers(dest="eval_command", required=True)
    p = esub.add_parser("perplexity", help="perplexity and top-1 agreement vs the unquantized model")
    p.add_argument("--dataset-path", default=None,
                   help="a .txt file, or JSONL whose string fields are joined (default: the "
                        "self-instruct set)")
    p.add_argument("--context-len", type=int, default=512, help="tokens per window")
    p.add_argument("--num-windows", type=int, default=16, help="windows scored (from the start)")
    p.add_argument("--greedy-tokens", type=int, default=32,
                   help="greedy tokens generated after each window for the agreement (0: skip)")
    p.add_argument("--skip-hf", action="store_true", help="no transformers reference")
    p.add_argument("--result-file", default=None, help="default: bench-results/eval-<date>.json")
    add_engine_args(p)
    p.set_defaults(func=cmd_perplexity)


def read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"--dataset-path: file {str(path)!r} does not exist")
    if path.suffix != ".jsonl":
        return path.read_text(encoding="utf-8")
    parts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            parts.append("\n".join(v for v in row.values() if isinstance(v, str)))
    return "\n\n".join(parts)


def windows(token_ids: list[int], context_len: int, num_windows: int) -> list[list[int]]:
    if context_len < 2 or num_windows < 1:
        raise ValueError("context_len must be >= 2 and num_windows >= 1, got "
                         f"{context_len} and {num_windows}")
    out = [token_ids[i:i + context_len] for i in range(0, len(token_ids) - context_len + 1, context_len)]
    if not out:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one window of "
                         f"{context_len}")
    return out[:num_windows]


def score(llm: Any, wins: list[list[int]]) -> tuple[list[float], list[int]]:
    """Log-likelihood of every token after the first of each window, and the top-1 token
    predicted at each of those positions."""
    from servelm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": w} for w in wins], params, use_tqdm=False)
    lls, top = [], []
    for w, out in zip(wins, outs):
        for token, position in zip(w[1:], out.prompt_logprobs[1:]):
            lls.append(position[token].logprob)
            top.append(max(position, key=lambda t: position[t].logprob))
    return lls, top


def greedy_agreement(got: list[list[int]], ref: list[list[int]]) -> float:
    """Mean fraction of each continuation generated before the first token that differs."""
    def prefix(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))

    return sum(prefix(a, b) / len(b) for a, b in zip(got, ref)) / len(ref)


def setting_name(engine: dict[str, Any], model: str | None) -> str | None:
    """What the configured engine changes from the reference, e.g. `kv_cache_dtype=int8`
    (quantization "auto" changes something only for a GGUF with blocks, which it keeps)."""
    from servelm.model.loader import gguf_with_blocks

    parts = []
    q = engine.get("quantization", "auto")
    if q in ("int8", "int4") or (q == "auto" and gguf_with_blocks(model)):
        parts.append(f"quantization={q}")
    if engine.get("kv_cache_dtype", "auto") != "auto":
        parts.append(f"kv_cache_dtype={engine['kv_cache_dtype']}")
    if engine.get("kv_compression"):
        c = engine["kv_compression"]
        c = json.loads(c) if isinstance(c, str) else c
        parts.append(f"kv_compression={c['method']}/{c['budget']}")
    return ", ".join(parts) or None


def _budget(engine: dict[str, Any]) -> int | None:
    c = engine.get("kv_compression")
    c = json.loads(c) if isinstance(c, str) else c
    return c["budget"] if c else None


def hf_log_likelihoods(model: str | None, dtype: str, wins: list[list[int]]) -> list[float]:
    import torch

    from servelm.bench.hf_peer import load_hf_model

    hf = load_hf_model(model, dtype)
    lls: list[float] = []
    with torch.inference_mode():
        for w in wins:
            logp = hf(torch.tensor([w])).logits[0, :-1].float().log_softmax(-1)
            lls += logp.gather(1, torch.tensor(w[1:])[:, None])[:, 0].tolist()
    return lls


def perplexity(lls: list[float]) -> float:
    return math.exp(-sum(lls) / len(lls))


def cmd_perplexity(args: argparse.Namespace) -> int:
    from servelm.engine_args import engine_kwargs
    from servelm.llm import LLM
    from servelm.model.loader import load_tokenizer

    engine = engine_kwargs(args)
    _, _, dtype = split_engine({"model": args.model, **engine})  # "auto" as the engine resolves it
    path = Path(args.dataset_path) if args.dataset_path else default_dataset_path()
    if path is None:
        raise FileNotFoundError("no --dataset-path given and the self-instruct set is not there")
    say = progress()
    tokens = load_tokenizer(args.model).encode(read_text(path))
    wins = windows(tokens, args.context_len, args.num_windows)
    say(f"eval perplexity: {len(wins)} windows of {args.context_len} tokens from {path}")
    ref = "reference (no quantization)"
    settings = {ref: {**engine, "quantization": "none", "kv_cache_dtype": "auto", "kv_compression": None}}
    configured = setting_name(engine, args.model)
    if configured:
        settings[configured] = engine
    results: dict[str, Any] = {}
    tops: dict[str, list[int]] = {}
    continuations: dict[str, list[list[int]]] = {}
    lls_by_setting: dict[str, list[float]] = {}
    for name, options in settings.items():
        say(f"{name} ...")
        llm = LLM(args.model, **options)
        lls, tops[name] = score(llm, wins)
        if args.greedy_tokens > 0:
            continuations[name] = [list(o.outputs[0].token_ids)
                                   for o in greedy(llm, wins, args.greedy_tokens)]
        m = llm.get_metrics()
        lls_by_setting[name] = lls
        results[name] = {"perplexity": perplexity(lls), "tokens": len(lls),
                         "model_weight_bytes": m["model_weight_bytes"],
                         "kv_bytes_per_token": m["kv_bytes_per_token"],
                         "kv_evicted_tokens": m["kv_evicted_tokens"]}
        del llm
    for name, r in results.items():
        r["top1_agreement_with_reference"] = (
            sum(a == b for a, b in zip(tops[name], tops[ref])) / len(tops[ref]))
        r["perplexity_vs_reference"] = r["perplexity"] / results[ref]["perplexity"]
        if continuations:
            r["greedy_agreement_with_reference"] = greedy_agreement(continuations[name], continuations[ref])
    budget = _budget(engine)
    past = [budget is not None and j > budget for w in wins for j in range(1, len(w))]
    if configured and any(past):  # the tokens predicted from a compressed cache
        for key, n in (("perplexity_past_budget", configured), ("reference_perplexity_past_budget", ref)):
            results[configured][key] = perplexity([x for x, p in zip(lls_by_setting[n], past) if p])
    if not args.skip_hf:
        say("transformers ...")
        hf = perplexity(hf_log_likelihoods(args.model, dtype, wins))
        results["transformers (no quantization)"] = {
            "perplexity": hf, "perplexity_vs_reference": hf / results[ref]["perplexity"]}
    out = {**result_header("eval-perplexity", dtype), "dataset": str(path),
           "context_len": args.context_len, "num_windows": len(wins),
           "greedy_tokens": args.greedy_tokens, "prefill_chunk": engine["max_num_batched_tokens"],
           "results": results}
    write_result(out, result_path(args.result_file, "eval-perplexity"))
    for name, r in results.items():
        extra = (f", top-1 agreement {r['top1_agreement_with_reference']:.1%}"
                 if "top1_agreement_with_reference" in r else "")
        if "greedy_agreement_with_reference" in r:
            extra += f", greedy agreement {r['greedy_agreement_with_reference']:.1%}"
        if "perplexity_past_budget" in r:
            extra += (f", past the budget {r['perplexity_past_budget']:.3f} vs "
                      f"{r['reference_perplexity_past_budget']:.3f}")
        print(f"{name}: perplexity {r['perplexity']:.3f} "
              f"({r['perplexity_vs_reference']:.4f}x the reference){extra}")
    print(f"results: {out['result_file']}")
    return 0
