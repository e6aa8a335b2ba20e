"""`servelm length-predictor collect | train`: learn output lengths for the sjf policy.

`collect` runs a prompt set through the model with the sampling settings it will be served
with and logs one (prompt, output length) pair per request; `train` fits a
`LengthPredictor` on such a log, shows how well it ranks held-out requests against the
references it must beat, then refits on every pair and saves it. Kept apart from cli.py so
the scheduler's learned input has one place for its data, its training and its report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from servelm.bench.datasets import default_dataset_path, encode_prompt, read_jsonl
from servelm.bench.harness import (
    Table,
    check_int,
    print_report,
    result_path,
    run_stamp,
    write_result,
)

DEFAULT_MAX_TOKENS = 512
_ROWS = (("predictor", "learned (tokens + length)"), ("prompt_length", "prompt length only"),
         ("train_mean", "training mean"), ("max_tokens", "max_tokens (no information)"))


def add_predictor_parser(sub, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `length-predictor` and its subcommands on the top-level subparsers `sub`."""
    lp = sub.add_parser("length-predictor", help="learn output lengths for --scheduling-policy sjf")
    lsub = lp.add_subparsers(dest="predictor_command", required=True)

    p = lsub.add_parser("collect", help="generate for a prompt set and log (prompt, output length)")
    p.add_argument("--dataset-path", default=None,
                   help="JSONL with a 'prompt' field (default: the self-instruct prompts)")
    p.add_argument("--output", required=True, help="pairs JSONL to write")
    p.add_argument("--num-prompts", type=int, default=None, help="first N prompts (default all)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (temperature > 0)")
    add_engine_args(p)
    p.set_defaults(func=cmd_collect)

    p = lsub.add_parser("train", help="fit, report held-out accuracy, save the predictor")
    p.add_argument("pairs", help="JSONL with 'prompt_token_ids' and 'output_len' per line")
    p.add_argument("--output", required=True, help="predictor file to write (.npz)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="held out for the report")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="the bound the pairs were collected with (default: their 'max_tokens' "
                        f"field, else {DEFAULT_MAX_TOKENS})")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tokens in the model's tokenizer (default: the pairs' 'vocab_size' field)")
    p.add_argument("--report-json", default=None, help="also write the report here")
    p.set_defaults(func=cmd_train)


def cmd_collect(args: argparse.Namespace) -> int:
    import numpy as np

    from servelm.engine_args import engine_kwargs
    from servelm.llm import LLM
    from servelm.sampling_params import SamplingParams

    # Validate everything cheap before the slow model load and generation.
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed)
    if args.num_prompts is not None and args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    path = Path(args.dataset_path) if args.dataset_path else default_dataset_path()
    if path is None:
        raise FileNotFoundError("no default prompt set (../shared/data/self-instruct/"
                                "predictions.jsonl) was found; pass --dataset-path")
    texts = [str(row["prompt"]) for row in read_jsonl(path, ("prompt",))][: args.num_prompts]
    output = Path(args.output)
    if output.is_dir():
        raise ValueError(f"--output {str(output)!r} is a directory")
    output.parent.mkdir(parents=True, exist_ok=True)

    llm = LLM(args.model, **engine_kwargs(args))
    tok = llm.get_tokenizer()
    ids = [encode_prompt(tok, t) for t in texts]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params)
    elapsed = time.perf_counter() - start
    rows = [{"prompt": t, "prompt_token_ids": i, "output_len": len(o.outputs[0].token_ids),
             "finish_reason": o.outputs[0].finish_reason, "vocab_size": len(tok),
             "max_tokens": args.max_tokens} for t, i, o in zip(texts, ids, outs)]
    with output.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

    lens = [r["output_len"] for r in rows]
    capped = sum(r["finish_reason"] == "length" for r in rows) / len(rows)
    print(f"collected {len(rows)} pairs from {path} in {elapsed:.1f} s -> {output}")
    print(f"output tokens: mean {statistics.fmean(lens):.1f}, median {statistics.median(lens):g}, "
          f"p90 {np.percentile(lens, 90):.0f}, max {max(lens)}; "
          f"{capped:.1%} hit max_tokens ({args.max_tokens})")
    return 0


def _int_field(row: dict[str, Any], key: str, where: str, minimum: int) -> int:
    return check_int(f"{where}: field {key!r}", row.get(key), minimum)


def read_pairs(path: str | Path) -> tuple[list[list[int]], list[int], list[dict[str, Any]]]:
    """(prompt ids, output lengths, the raw rows) of a pairs JSONL, each line checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {str(path)!r} does not exist")
    prompts, lens, rows = [], [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: need a JSON object, got {type(row).__name__}")
            for key in ("prompt_token_ids", "output_len"):
                if key not in row:
                    raise ValueError(f"{where}: missing field {key!r}")
            ids = row["prompt_token_ids"]
            if not isinstance(ids, list) or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise ValueError(f"{where}: field 'prompt_token_ids' must be a list of "
                                 "non-negative integers")
            lens.append(_int_field(row, "output_len", where, 0))
            prompts.append(ids)
            rows.append({**row, "_where": where})
    if len(rows) < 3:
        raise ValueError(f"{path} has {len(rows)} pairs; need at least 3 to train and test")
    return prompts, lens, rows


def _vocab_size(args: argparse.Namespace, prompts: list[list[int]],
                rows: list[dict[str, Any]]) -> int:
    """--vocab-size, else the one 'vocab_size' every row carries (collect writes it)."""
    if args.vocab_size is not None:
        vocab = args.vocab_size
    else:
        vocab = None
        for row in rows:
            if "vocab_size" not in row:
                raise ValueError(f"{row['_where']}: no 'vocab_size' field; pass --vocab-size "
                                 "(the number of tokens in the model's tokenizer)")
            value = _int_field(row, "vocab_size", row["_where"], 1)
            if vocab is not None and value != vocab:
                raise ValueError(f"{row['_where']}: 'vocab_size' {value} differs from "
                                 f"{vocab} on earlier lines; the pairs mix tokenizers")
            vocab = value
    top = max((max(p) for p in prompts if p), default=-1)
    if vocab < 1:
        raise ValueError(f"--vocab-size must be >= 1, got {vocab}")
    if top >= vocab:
        raise ValueError(f"vocab size {vocab} does not cover token id {top} in {args.pairs}")
    return vocab


def _max_tokens(args: argparse.Namespace, rows: list[dict[str, Any]]) -> int:
    if args.max_tokens is not None:
        value = args.max_tokens
    else:
        found = [r["max_tokens"] for r in rows if isinstance(r.get("max_tokens"), int)]
        value = max(found) if found else DEFAULT_MAX_TOKENS
    if value < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {value}")
    return value


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_held_out(metrics: dict[str, dict[str, Any]], num_train: int, max_tokens: int) -> None:
    n = metrics["predictor"]["n"]
    table = Table(f"output length on {n} held-out requests (trained on {num_train})",
                  ["predictor", "pairwise acc.", "Spearman", "MAE (tokens)", "median rel. error"])
    for key, label in _ROWS:
        m = metrics[key]
        table.add_row(label.replace("max_tokens", f"max_tokens={max_tokens}", 1),
                      _fmt(m["pairwise_accuracy"], ".3f"), _fmt(m["spearman"], ".3f"),
                      _fmt(m["mae_tokens"], ".1f"), _fmt(m["median_rel_error"], ".2f"))
    print_report([table], ["pairwise acc.: share of request pairs with different true lengths "
                           "that the predictor orders correctly (what sjf needs; 0.5 = chance)"])


def cmd_train(args: argparse.Namespace) -> int:
    import numpy as np

    from servelm.engine.length_predictor import LengthPredictor, evaluate

    if not 0.0 < args.test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    prompts, lens, rows = read_pairs(args.pairs)
    vocab = _vocab_size(args, prompts, rows)
    max_tokens = _max_tokens(args, rows)
    n = len(prompts)
    num_test = min(max(1, round(n * args.test_fraction)), n - 2)
    order = np.random.default_rng(args.seed).permutation(n)
    test, train = order[:num_test], order[num_test:]

    held_out = LengthPredictor.fit([prompts[i] for i in train], [lens[i] for i in train],
                                   vocab_size=vocab)
    metrics = evaluate(held_out, [prompts[i] for i in test], [lens[i] for i in test], max_tokens)
    print_held_out(metrics, len(train), max_tokens)

    predictor = LengthPredictor.fit(prompts, lens, vocab_size=vocab)
    predictor.save(args.output)
    print(f"saved length predictor ({n} pairs, vocab {vocab}, ridge alpha {predictor.alpha:g}) "
          f"to {args.output}")
    if args.report_json:
        report = {
            **run_stamp(),
            "pairs_file": str(args.pairs), "num_pairs": n, "num_train": len(train),
            "num_test": num_test, "test_fraction": args.test_fraction, "seed": args.seed,
            "max_tokens": max_tokens, "vocab_size": vocab, "buckets": predictor.buckets,
            "alpha_held_out_fit": held_out.alpha, "alpha": predictor.alpha,
            "predictor_file": str(args.output), "held_out": metrics,
            "output_len": {"mean": statistics.fmean(lens), "median": statistics.median(lens),
                           "p90": float(np.percentile(lens, 90)), "max": max(lens),
                           "hit_max_tokens": sum(n_ >= max_tokens for n_ in lens) / n},
        }
        write_result(report, result_path(args.report_json, "length-predictor"))
    return 0
