"""Benchmark workloads: lists of (prompt token ids, output length) requests.

Throughput depends heavily on the mix of prompt and output lengths (prefill is cheap per
token, decode is not; padding in static batches grows with length spread), so the workload
is modelled on real instruction-following traffic: the self-instruct predictions file, whose
reference responses give each request a realistic output length. `synthetic` mimics the same
mix from random vocabulary ids for when that file is absent (tests, fresh checkouts).
Requests are pre-tokenized so every system under test sees identical token ids.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_OUTPUT_LEN = 4  # shorter outputs make a request almost pure prefill, not what we measure
DATASETS = ("synthetic", "self-instruct")


@dataclass(frozen=True)
class BenchRequest:
    """One request: the exact prompt ids and how many tokens to generate (EOS ignored)."""

    prompt_token_ids: list[int]
    output_len: int


def default_dataset_path() -> Path | None:
    """`../shared/data/self-instruct/predictions.jsonl` next to the repo, if it exists."""
    repo = Path(__file__).resolve().parents[2]
    path = repo.parent / "shared" / "data" / "self-instruct" / "predictions.jsonl"
    return path if path.is_file() else None


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` as a chat model would receive it (chat template when there is one)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return list(tokenizer.encode(text))


def cycled(rows: list[Any], n: int, rng: random.Random) -> list[Any]:
    """n rows: shuffled passes over all of them, so n > len(rows) repeats each row evenly."""
    out: list[Any] = []
    while len(out) < n:
        batch = list(rows)
        rng.shuffle(batch)
        out.extend(batch)
    return out[:n]


def read_jsonl(path: Path, need: tuple[str, ...]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, each checked to have the `need` fields."""
    if not path.is_file():
        raise FileNotFoundError(f"--dataset-path: file {str(path)!r} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not all(k in row for k in need):
                    raise KeyError(need)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: need a JSON object with {list(need)}") from None
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def load_self_instruct(path: str | Path, tokenizer: Any, num_prompts: int,
                       max_output_len: int = 256, seed: int = 0,
                       max_prompt_len: int | None = None) -> list[BenchRequest]:
    """Requests from a JSONL with `prompt` and `response` fields.

    Output length is the token count of the reference response, clamped to
    [MIN_OUTPUT_LEN, max_output_len]. Rows whose prompt exceeds `max_prompt_len` are dropped.
    """
    rows: list[BenchRequest] = []
    for row in read_jsonl(Path(path), ("prompt", "response")):
        ids = encode_prompt(tokenizer, str(row["prompt"]))
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            continue
        n_out = len(tokenizer.encode(str(row["response"]), add_special_tokens=False))
        rows.append(BenchRequest(ids, max(MIN_OUTPUT_LEN, min(n_out, max_output_len))))
    if not rows:
        raise ValueError(f"{path} has no usable rows")
    rng = random.Random(seed)
    return cycled(rows, num_prompts, rng)


def plain_vocab(tokenizer: Any) -> list[int]:
    """Token ids that are not special tokens (which could act as stop or control tokens)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [i for i in range(len(tokenizer)) if i not in special]


def random_token_prompts(tokenizer: Any, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of exactly `length` random non-special ids (seeded)."""
    rng = random.Random(seed)
    vocab = plain_vocab(tokenizer)
    return [[rng.choice(vocab) for _ in range(length)] for _ in range(n)]


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


def synthetic_requests(tokenizer: Any, num_prompts: int, max_output_len: int = 256,
                       seed: int = 0, max_prompt_len: int = 400) -> list[BenchRequest]:
    """Seeded random requests with a self-instruct-like length mix.

    Prompt lengths: lognormal around 70 tokens, clipped to [20, max_prompt_len]; output
    lengths: lognormal around 60, clipped to [10, max_output_len] (both match the medians of
    the self-instruct file under SmolLM2's tokenizer). Ids avoid special tokens, which could
    otherwise act as stop or control tokens.
    """
    rng = random.Random(seed)
    vocab = plain_vocab(tokenizer)
    lo_out = min(10, max_output_len)
    out: list[BenchRequest] = []
    for _ in range(num_prompts):
        n_prompt = _lognormal_int(rng, 70, 0.6, min(20, max_prompt_len), max_prompt_len)
        n_out = _lognormal_int(rng, 60, 1.0, max(MIN_OUTPUT_LEN, lo_out), max_output_len)
        out.append(BenchRequest([rng.choice(vocab) for _ in range(n_prompt)], n_out))
    return out


def build_requests(dataset: str | None, path: str | None, tokenizer: Any, num_prompts: int,
                   max_output_len: int = 256, seed: int = 0,
                   max_prompt_len: int | None = None) -> tuple[str, str | None, list[BenchRequest]]:
    """Pick and build the workload; returns (dataset name, file used, requests).

    `dataset=None` means self-instruct when a file is given or found, else synthetic.
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if max_output_len < MIN_OUTPUT_LEN:
        raise ValueError(f"max_output_len must be >= {MIN_OUTPUT_LEN}, got {max_output_len}")
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if dataset != "synthetic":
        found = path or default_dataset_path()
        if found is not None:
            reqs = load_self_instruct(found, tokenizer, num_prompts, max_output_len, seed,
                                      max_prompt_len)
            return "self-instruct", str(found), reqs
        if dataset == "self-instruct":
            raise FileNotFoundError("no self-instruct file found; pass --dataset-path")
    reqs = synthetic_requests(tokenizer, num_prompts, max_output_len, seed,
                              max_prompt_len if max_prompt_len is not None else 400)
    return "synthetic", None, reqs


def summarize(requests: list[BenchRequest]) -> dict[str, float]:
    """Counts and length percentiles, recorded with results so runs can be compared."""
    p = [len(r.prompt_token_ids) for r in requests]
    o = [r.output_len for r in requests]
    return {
        "num_requests": len(requests),
        "prompt_tokens": sum(p), "output_tokens": sum(o),
        "prompt_len_min": min(p), "prompt_len_median": statistics.median(p), "prompt_len_max": max(p),
        "output_len_min": min(o), "output_len_median": statistics.median(o), "output_len_max": max(o),
    }
