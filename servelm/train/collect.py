"""The target's own outputs as training data. servelm generates greedily from the prompts,
and its model runner hands over the final hidden state of every token it samples
(`ModelRunner.hidden_observers`), so collecting costs no second forward pass."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from servelm.llm import LLM
from servelm.sampling_params import SamplingParams


@dataclass
class Trace:
    """One generation: `hidden[j]` is the state the LM head turned into `tokens[j]`."""

    hidden: torch.Tensor  # [n, hidden] float32
    tokens: list[int]


def runner_of(llm: LLM):
    worker = getattr(llm.engine.executor, "worker", None)
    if worker is None:
        raise ValueError("train-draft runs the target in one process: leave out "
                         "--tensor-parallel-size and --pipeline-parallel-size")
    return worker.runner


def collect(llm: LLM, prompts: list[list[int]], max_tokens: int, ignore_eos: bool = False,
            progress: bool = True) -> list[Trace]:
    """Greedy outputs of `prompts` (token ids), with their hidden states."""
    runner = runner_of(llm)
    rows: dict[str, list[torch.Tensor]] = defaultdict(list)

    def observe(req_id: str, hidden: torch.Tensor) -> None:
        rows[req_id].append(hidden.float().cpu())

    runner.hidden_observers.append(observe)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos),
                            use_tqdm=progress)
    finally:
        runner.hidden_observers.remove(observe)
    traces = []
    for out in outs:
        tokens = list(out.outputs[0].token_ids)
        states = rows[f"{out.request_id}#0"]
        if len(states) != len(tokens):
            raise RuntimeError(f"request {out.request_id}: {len(states)} hidden states for "
                               f"{len(tokens)} tokens")
        if tokens:
            traces.append(Trace(torch.stack(states), tokens))
    return traces
