"""The llama.cpp peer: llama-cpp-python on the same GGUF file, same prompt token ids.

llama.cpp is what many people run a small GGUF model with on a CPU, so it is the peer to beat
there. It computes with the file's quantized blocks natively (Q4_1 matmuls), while servelm
and transformers unpack the weights once to float32/bfloat16, so its greedy outputs are
expected to agree with servelm's less often than transformers' do: that is reported, never
asserted.

How it is driven, and why:

- One sequence at a time. llama-cpp-python's high-level `Llama` holds one sequence, so the
  throughput benchmark runs the requests one after another (`"batching": "sequential"` in
  the results). That is how an offline batch is run with this API; llama.cpp's own
  multi-sequence server (`llama-server --parallel`) is a different setup, not measured here.
- Token ids in, token ids out, through `Llama.generate`, the token generator that
  `create_completion` itself wraps. It yields each token as soon as it is sampled, so the
  timestamps give TTFT and per-token gaps directly; `create_completion(stream=True)` would
  add detokenization and can hold a chunk back while a UTF-8 character is incomplete, which
  would smear the gaps.
- Greedy (`temp=0`, llama.cpp's native greedy sampler) and exactly `output_len` tokens: the
  loop takes `output_len` tokens from the generator and stops, and `generate` (unlike
  `create_completion`) never stops at an end-of-generation token. So EOS is ignored the way
  servelm's `ignore_eos=True` ignores it: sampled like any token, never ending the request.
  (A `logit_bias` would run a Python callback over the whole vocabulary at every token in
  llama-cpp-python, an overhead that is not llama.cpp's own.) The generator is left
  suspended after the last token, so like servelm no forward pass runs for a token nobody
  asked for.
- A clean KV cache per request: `reset()` before each request. Otherwise llama-cpp-python
  reuses the longest cached prefix of the previous prompt, which would skip prefill for a
  repeated prompt (latency iterations) and favour llama.cpp unfairly.
- `n_threads` (decode) and `n_threads_batch` (prefill) both equal servelm's thread count;
  `n_batch` is llama.cpp's default 512 (prompt chunk per decode call); `n_ctx` is the
  longest request rounded up, so no request is truncated; `logits_all=False` (logits of
  the last position only, which is all greedy needs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servelm.bench.datasets import BenchRequest
from servelm.bench.harness import measure

SKIP_NOT_INSTALLED = ("llama.cpp peer skipped: llama-cpp-python not installed "
                      "(pip install 'servelm[peers]')")
N_BATCH = 512


def unavailable_reason(model: str | None) -> str | None:
    """Why llama.cpp cannot run on `model` here (None when it can), without loading it."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return SKIP_NOT_INSTALLED
    except Exception as e:  # a broken build (missing shared library) raises OSError and kin
        return f"llama.cpp peer skipped: llama-cpp-python failed to import ({e})"
    path = gguf_path(model)
    if path is None:
        return "llama.cpp peer skipped: llama.cpp needs a GGUF file, servelm was given a folder"
    return None


def gguf_path(model: str | None) -> Path | None:
    """The GGUF file servelm loads for `model` (same resolution as transformers' peer)."""
    from servelm.bench.hf_peer import resolve_model_path

    path = resolve_model_path(model)
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def default_threads(engine: dict[str, Any]) -> int:
    """servelm's thread count for these engine options (what LLMEngine gives torch)."""
    return engine.get("num_threads") or os.cpu_count() or 1


def context_size(max_tokens: int) -> int:
    """A context that holds the longest request: rounded up to 256, at least 512."""
    return max(512, -(-max_tokens // 256) * 256)


@dataclass
class LlamaCppModel:
    """A loaded `llama_cpp.Llama` and the settings it was loaded with."""

    llm: Any
    path: str
    n_threads: int
    n_ctx: int
    n_batch: int
    version: str

    def settings(self) -> dict[str, Any]:
        return {"model_file": self.path, "n_threads": self.n_threads,
                "n_threads_batch": self.n_threads, "n_ctx": self.n_ctx, "n_batch": self.n_batch,
                "llama_cpp_python": self.version, "batching": "sequential",
                "weights": "GGUF blocks as stored (quantized matmuls, not dequantized)"}


def load_llamacpp(model: str | None, n_threads: int, max_tokens: int,
                  seed: int = 0, draft_model: Any = None) -> LlamaCppModel:
    """Load the same GGUF servelm runs; `max_tokens` = longest prompt + output to expect.

    `draft_model` (a `llama_cpp.llama_speculative.LlamaDraftModel`) turns on llama-cpp-python's
    speculative decoding; it also makes the model keep logits of every position."""
    import llama_cpp

    path = gguf_path(model)
    if path is None:
        raise ValueError("llama.cpp needs a GGUF file; servelm was given a folder without one")
    n_ctx = context_size(max_tokens)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=N_BATCH,
                          n_threads=n_threads, n_threads_batch=n_threads, seed=seed,
                          logits_all=False, draft_model=draft_model, verbose=False)
    return LlamaCppModel(llm, str(path), n_threads, n_ctx, N_BATCH,
                         getattr(llama_cpp, "__version__", "unknown"))


def generate_timed(model: LlamaCppModel, prompt: list[int],
                   output_len: int) -> tuple[list[int], float, list[float]]:
    """Greedy-generate exactly `output_len` tokens from a clean cache.

    Returns (token ids, start time, time each token was sampled), `time.perf_counter()` values.
    """
    if output_len < 1:
        raise ValueError(f"output_len must be >= 1, got {output_len}")
    llm = model.llm
    llm.reset()  # clean KV cache: no prefix reuse from the previous request
    tokens: list[int] = []
    times: list[float] = []
    start = time.perf_counter()
    gen = llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                       repeat_penalty=1.0, reset=True)
    for tok in gen:
        times.append(time.perf_counter())
        tokens.append(int(tok))
        if len(tokens) == output_len:
            break
    gen.close()
    return tokens, start, times


def warmup(model: LlamaCppModel, prompt: list[int]) -> None:
    """A short untimed run, so first-call setup is not billed to the first request."""
    generate_timed(model, prompt[:16], 4)


@dataclass
class LlamaCppRun:
    """All requests, run one after another."""

    token_ids: list[list[int]] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    energy: dict[str, Any] = field(default_factory=dict)


def run_requests(model: LlamaCppModel, requests: list[BenchRequest]) -> LlamaCppRun:
    """Throughput mode: every request in order, sequentially, timed and metered as a whole
    after an untimed warm-up."""
    def run_all() -> LlamaCppRun:
        run = LlamaCppRun()
        for r in requests:
            ids, t0, times = generate_timed(model, r.prompt_token_ids, r.output_len)
            run.token_ids.append(ids)
            run.ttft_s.append(times[0] - t0)
        return run

    timed = measure(run_all, warmup=lambda: warmup(model, requests[0].prompt_token_ids))
    run = timed.value
    run.elapsed_s = timed.elapsed_s
    run.energy = timed.energy.as_dict(sum(len(t) for t in run.token_ids))
    return run


def llamacpp_skip(model: str | None, say: Callable[..., None]) -> dict[str, str] | None:
    """{"skipped": why} (and `why` said) when llama.cpp cannot run `model` here, else None."""
    why = unavailable_reason(model)
    if why is None:
        return None
    say(why)
    return {"skipped": why}
