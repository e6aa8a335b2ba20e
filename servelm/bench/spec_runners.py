"""One request at a time through each system, with and without speculation.

A runner takes prompt token ids and returns a `Trace`: the output ids (greedy, at most
`max_tokens`, ending with the model's end-of-generation token when it writes one), time to
first token, and the tokens and seconds after the first token. Decode speed is the latter
pair, so prefill, which speculation does not change, stays out of the headline figure.
Each runner also counts its decode steps (forward passes after the first token), so tokens
per step is measured the same way for every system instead of derived from acceptances.

- servelm: `LLM.generate` of one prompt; times from `RequestOutput.metrics`, drafts and
  acceptances from the output, steps from the engine's `num_steps` counter minus the
  prefill steps.
- transformers: `generate`, greedy; the speculative variant drafts like servelm's proposer
  (`hf_spec_settings`): ngram -> prompt lookup decoding (`prompt_lookup_num_tokens` = k,
  `max_matching_ngram_size` = prompt_lookup_max); layer_skip -> `assistant_early_exit` = L
  (the model's first L layers, final norm and LM head draft, with a KV cache of their own);
  draft_model -> assisted generation with `assistant_model` = the same draft folder loaded
  by transformers. Assisted drafting is pinned to k tokens a step like servelm's:
  `num_assistant_tokens` = k, schedule "constant" and `assistant_confidence_threshold` 0
  (transformers reads these from the drafting model's own generation_config, so they are
  set there too). transformers has no token trees: with a tree it drafts a chain of
  len(tree) tokens. A stopping criterion that never stops notes the time and length after
  each step. HF's first step already verifies drafts (copied from the prompt or drafted
  after the prompt), so tokens accepted there arrive with the first token: they count
  toward TTFT, and decode starts after that step.
- llama.cpp: `Llama.generate` token by token, stopping at an end-of-generation token; the
  speculative variant is a second `Llama` loaded with `LlamaPromptLookupDecoding` (llama-cpp-
  python fixes the draft model at load, and with it keeps logits of every position, prompt
  included, which slows its prefill). Steps are counted by wrapping `Llama.eval`.
  llama-cpp-python drafts only by prompt lookup, so layer_skip and draft_model have no
  llama.cpp peer (recorded as skipped).

For prompt lookup, all three search n-grams from prompt_lookup_max down to 1; HF and llama.cpp
take the earliest match in the context, servelm the latest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from servelm.bench.harness import greedy


@dataclass
class Trace:
    """One request: output ids and timings; drafts and acceptances where the system says."""

    token_ids: list[int]
    ttft_s: float
    decode_tokens: int  # tokens after the first
    decode_s: float  # seconds after the first token
    decode_steps: int | None = None
    proposed: int | None = None
    accepted: int | None = None


class ServelmRunner:
    """Batch-1 greedy requests through one `LLM` (with or without `speculative_config`)."""

    def __init__(self, llm: Any, max_tokens: int) -> None:
        self.llm, self.max_tokens = llm, max_tokens
        self.budget = llm.engine.config.max_num_batched_tokens

    def __call__(self, prompt: list[int]) -> Trace:
        before = self.llm.get_metrics()["num_steps"]
        out = greedy(self.llm, [prompt], self.max_tokens, ignore_eos=False)[0]
        if out.error:
            raise RuntimeError(f"servelm request failed: {out.error}")
        steps = self.llm.get_metrics()["num_steps"] - before
        m, ids = out.metrics, list(out.outputs[0].token_ids)
        prefill_steps = -(-max(1, len(prompt) - out.num_cached_tokens) // self.budget)
        return Trace(ids, m.first_token_time - m.arrival_time, len(ids) - 1,
                     m.finished_time - m.first_token_time, max(0, steps - prefill_steps),
                     out.spec_proposed_tokens, out.spec_accepted_tokens)


class _StepClock:
    """A stopping criterion that never stops: notes (time, sequence length) after each step."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int]] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        self.steps.append((time.perf_counter(), int(input_ids.shape[1])))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


# Assisted drafting fixed at k tokens a step (no schedule, no stopping on low confidence).
HF_ASSISTED = {"num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.0}
HF_DRAFTER_KEYS = {"num_assistant_tokens", *HF_ASSISTED}
HF_NO_TREE = ("transformers has no token trees: it drafts a chain of len(tree) tokens "
              "(one candidate per depth)")


def hf_spec_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """transformers `generate` settings drafting like servelm's `speculative_config` `spec`
    (draft_model also needs `assistant_model=`, the draft loaded by transformers)."""
    k = spec.get("num_speculative_tokens") or len(spec["tree"])
    if spec["method"] == "ngram":
        return {"prompt_lookup_num_tokens": k,
                "max_matching_ngram_size": spec.get("prompt_lookup_max", 4)}
    assisted = {"num_assistant_tokens": k, **HF_ASSISTED}
    if spec["method"] == "layer_skip":
        return {"assistant_early_exit": spec["num_layers"], **assisted}
    if spec["method"] == "draft_model":
        return assisted
    raise ValueError(f"no transformers peer for speculative method {spec['method']!r}")


class HFRunner:
    """transformers `generate`, greedy, EOS honoured; `settings` (see `hf_spec_settings`)
    turn on speculation, with `assistant` the draft model of assisted generation."""

    def __init__(self, model: Any, max_tokens: int, settings: dict[str, Any] | None = None,
                 assistant: Any = None) -> None:
        from transformers import GenerationConfig

        from servelm.bench.hf_peer import _pad_id

        gen = model.generation_config
        self.model, self.assistant, self.settings = model, assistant, dict(settings or {})
        self.config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, num_beams=1,
                                       pad_token_id=_pad_id(model), eos_token_id=gen.eos_token_id,
                                       bos_token_id=gen.bos_token_id, **self.settings)
        # The model that drafts: transformers takes its drafting settings from its config.
        self.drafter = assistant if assistant is not None else (
            model if "assistant_early_exit" in self.settings else None)
        eos = gen.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])

    def __call__(self, prompt: list[int]) -> Trace:
        import torch
        from transformers import StoppingCriteriaList

        ids = torch.tensor([prompt], dtype=torch.long, device=self.model.device)
        if self.drafter is not None:  # set per call: the layer-skip drafter is the model itself
            for key in HF_DRAFTER_KEYS & self.settings.keys():
                setattr(self.drafter.generation_config, key, self.settings[key])
        extra = {"assistant_model": self.assistant} if self.assistant is not None else {}
        clock = _StepClock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      generation_config=self.config,
                                      stopping_criteria=StoppingCriteriaList([clock]), **extra)
        new = until_stop(out[0, len(prompt):].tolist(), self.stop_ids)
        (t0, n0), (t1, _) = clock.steps[0], clock.steps[-1]
        first = min(len(new), n0 - len(prompt))  # tokens the first step produced
        return Trace(new, t0 - start, len(new) - first, t1 - t0, len(clock.steps) - 1)


def until_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    """`ids` up to and including the first stop token (a verified step can overshoot it)."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[: i + 1]
    return ids


class LlamaCppRunner:
    """llama-cpp-python's token generator, greedy, stopping at end-of-generation tokens."""

    def __init__(self, lm: Any, max_tokens: int) -> None:
        self.lm, self.max_tokens, self.evals = lm, max_tokens, 0
        llm = lm.llm
        inner = llm.eval

        def counted_eval(tokens: Any) -> None:  # one call per forward pass
            self.evals += 1
            inner(tokens)

        llm.eval = counted_eval  # generate() calls self.eval, so the instance attribute wins
        self.is_stop = _eog_test(llm)

    def __call__(self, prompt: list[int]) -> Trace:
        llm = self.lm.llm
        llm.reset()  # clean KV cache: no prefix reuse from the previous request
        ids: list[int] = []
        times: list[float] = []
        first_evals = self.evals = 0
        start = time.perf_counter()
        gen = llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                           repeat_penalty=1.0, reset=True)
        for tok in gen:
            times.append(time.perf_counter())
            ids.append(int(tok))
            if len(ids) == 1:
                first_evals = self.evals
            if self.is_stop(ids[-1]) or len(ids) == self.max_tokens:
                break
        gen.close()
        if not ids:
            raise RuntimeError("llama.cpp generated no token")
        return Trace(ids, times[0] - start, len(ids) - 1, times[-1] - times[0],
                     self.evals - first_evals)


def _eog_test(llm: Any) -> Any:
    """A predicate for llama.cpp's end-of-generation tokens (EOS, EOT, ...)."""
    import llama_cpp

    vocab = getattr(getattr(llm, "_model", None), "vocab", None)
    if vocab is not None and hasattr(llama_cpp, "llama_vocab_is_eog"):
        return lambda tok: bool(llama_cpp.llama_vocab_is_eog(vocab, tok))
    eos = llm.token_eos()
    return lambda tok: tok == eos
