"""Offline API: `LLM(model).generate(prompts, params)` and `.chat(conversations, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from servelm.config import EngineConfig
from servelm.engine.engine import LLMEngine, PromptInput
from servelm.outputs import RequestOutput
from servelm.sampling_params import SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """Runs many prompts through one continuously batched engine, returns outputs in input order."""

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        config = EngineConfig(model=model, **engine_options)
        if config.role != "both":
            raise ValueError(f"role {config.role!r} is for an engine serving one part of each "
                             "request (disaggregated serving); LLM runs whole requests: role 'both'")
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Release the workers now (tensor/pipeline-parallel processes included) instead of
        at exit."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_metrics(self) -> dict[str, float]:
        return self.engine.get_metrics()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: int | Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """`priority` (one for all or one per prompt) matters with scheduling_policy="priority"."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries but there are {len(prompts)} prompts"
                )
        if priority is None or isinstance(priority, int):
            priorities = [priority or 0] * len(prompts)
        else:
            priorities = list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"priority has {len(priorities)} entries but there are {len(prompts)} prompts")
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, params, prio in zip(ids, prompts, params_list, priorities):
                self.engine.add_request(rid, prompt, params, priority=prio)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt, chat_template)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: Conversation, add_generation_prompt: bool = True,
                            chat_template: str | None = None) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer; this LLM was made with skip_tokenizer_init")
        if chat_template is None and not tok.chat_template:
            raise ValueError("this model has no chat template; pass chat_template=...")
        ids = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                      chat_template=chat_template, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            for rid in ids:
                if rid not in results:
                    self.engine.abort_request(rid)
        return [results[rid] for rid in ids]
