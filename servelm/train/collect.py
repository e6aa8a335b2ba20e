"""The target's own outputs as training data. servelm generates greedily from the prompts,
and its model runner hands over the final hidden state of every token it computes
(`ModelRunner.hidden_observers`), prompt included, so collecting costs no second forward
pass. The LLM must run without prefix caching: a cached prefix is never computed again."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from servelm.llm import LLM
from servelm.sampling_params import SamplingParams


@dataclass
class Trace:
    """One generation: `hidden[p]` is the target's final state at position p, the one its LM
    head turned into `tokens[p + 1]` (the last token was never fed back: len(tokens) - 1 rows)."""

    tokens: list[int]  # prompt, then output
    hidden: torch.Tensor  # [len(tokens) - 1, hidden] float32
    num_prompt: int

    @property
    def output_hidden(self) -> torch.Tensor:
        """Row j: the state that produced output token j."""
        return self.hidden[self.num_prompt - 1 :]

    @property
    def output(self) -> list[int]:
        return self.tokens[self.num_prompt :]


def runner_of(llm: LLM):
    worker = getattr(llm.engine.executor, "worker", None)
    if worker is None:
        raise ValueError("train-draft runs the target in one process: leave out "
                         "--tensor-parallel-size and --pipeline-parallel-size")
    return worker.runner


def collect(llm: LLM, prompts: list[list[int]], max_tokens: int, ignore_eos: bool = False,
            progress: bool = True) -> list[Trace]:
    """Greedy outputs of `prompts` (token ids), with the hidden states of every position."""
    if llm.engine.config.enable_prefix_caching:
        raise ValueError("collect needs every position computed: build the LLM with "
                         "enable_prefix_caching=False")
    runner = runner_of(llm)
    rows: dict[str, list[torch.Tensor]] = defaultdict(list)

    def observe(req_id: str, first: int, hidden: torch.Tensor) -> None:
        mine = rows[req_id]
        del mine[first:]  # a preempted request computes its positions again
        if first != len(mine):
            raise RuntimeError(f"request {req_id}: states from position {first}, {len(mine)} held")
        mine.extend(hidden.float().cpu())

    runner.hidden_observers.append(observe)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos),
                            use_tqdm=progress)
    finally:
        runner.hidden_observers.remove(observe)
    traces = []
    for prompt, out in zip(prompts, outs):
        tokens = list(prompt) + list(out.outputs[0].token_ids)
        states = rows[f"{out.request_id}#0"]
        if len(states) != len(tokens) - 1:
            raise RuntimeError(f"request {out.request_id}: {len(states)} hidden states for "
                               f"{len(tokens)} tokens")
        if len(tokens) > len(prompt):
            traces.append(Trace(tokens, torch.stack(states), len(prompt)))
    return traces
