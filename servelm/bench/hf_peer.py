"""The baseline: Hugging Face transformers `generate` on the same weights, static batches.

This is how people serve offline batches without an engine: pad a batch on the left, generate
until the longest request in it is done, repeat. We give it a fair shot: the batch size is
tuned on a prefix of the workload, EOS is disabled exactly as for servelm (so both produce
the same number of tokens), and only the tokens a request asked for count as useful output.
Tokens generated past a request's length (because a longer neighbour is still running) are
reported separately as raw throughput, since they are work done but not work wanted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from servelm.bench.datasets import BenchRequest
from servelm.bench.energy import EnergyMeter, EnergyReading


def resolve_model_path(model: str | None) -> Path:
    """The file or folder servelm loads for `model`: the default GGUF when None, and a
    folder holding exactly one .gguf (and no config.json) resolved to that file."""
    from servelm.model.default_model import default_model_path

    path = Path(default_model_path() if model is None else model).expanduser().resolve()
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
    return path


def load_hf_model(model: str | None, dtype: str) -> Any:
    """transformers' own load of what servelm was given: a .gguf (dequantized) or HF folder."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if path.is_file():
        kwargs["gguf_file"] = path.name
        path = path.parent
        try:  # newer transformers may keep GGUF blocks packed; servelm unpacks once, so do we
            from transformers.utils.quantization_config import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older versions always dequantize
            pass
    hf = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return hf.eval()


def _pad_id(model: Any) -> int:
    """Any valid id works for padding (it is masked out); prefer the model's declared one."""
    for cfg in (model.generation_config, model.config):
        pid = getattr(cfg, "pad_token_id", None)
        if pid is None:
            pid = getattr(cfg, "eos_token_id", None)
        if isinstance(pid, (list, tuple)):
            pid = pid[0] if pid else None
        if pid is not None:
            return int(pid)
    return 0


def greedy_config(model: Any, n_new: int) -> Any:
    """Greedy, exactly `n_new` tokens (EOS suppressed until then), nothing inherited from the
    checkpoint's sampling defaults (a fresh config, so no warnings either)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, num_beams=1,
        pad_token_id=_pad_id(model), eos_token_id=model.generation_config.eos_token_id,
        bos_token_id=model.generation_config.bos_token_id,
    )


@dataclass
class BatchResult:
    """Per-request useful output ids (in batch order) and the raw token count generated."""

    token_ids: list[list[int]]
    raw_generated: int
    elapsed_s: float


def generate_batch(model: Any, batch: list[BenchRequest]) -> BatchResult:
    """One left-padded greedy batch generating max(output_len) tokens, EOS suppressed."""
    pad = _pad_id(model)
    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r.prompt_token_ids)
        ids[i, width - n:] = torch.tensor(r.prompt_token_ids, dtype=torch.long)
        mask[i, width - n:] = 1
    n_new = max(r.output_len for r in batch)
    gen_cfg = greedy_config(model, n_new)
    ids, mask = ids.to(model.device), mask.to(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    elapsed = time.perf_counter() - start
    new = out[:, width:]
    useful = [new[i, : r.output_len].tolist() for i, r in enumerate(batch)]
    return BatchResult(useful, int(new.numel()), elapsed)


@dataclass
class HFRun:
    """The whole workload at one batch size."""

    batch_size: int
    token_ids: list[list[int]] = field(default_factory=list)
    raw_generated: int = 0
    elapsed_s: float = 0.0
    energy: list[EnergyReading] = field(default_factory=list)  # one reading per timed batch

    @property
    def useful_output(self) -> int:
        return sum(len(t) for t in self.token_ids)

    def energy_dict(self) -> dict[str, Any]:
        """Energy summed over the timed batches, per useful output token (None if unreadable)."""
        if not self.energy or any(e.joules is None for e in self.energy):
            why = next((e.unavailable for e in self.energy if e.joules is None), [])
            return EnergyReading(None, [], list(why)).as_dict(self.useful_output)
        total = EnergyReading(sum(e.joules or 0.0 for e in self.energy),
                              sorted({s for e in self.energy for s in e.sources}))
        return total.as_dict(self.useful_output)


def run_batches(model: Any, requests: list[BenchRequest], batch_size: int,
                run: HFRun | None = None, say: Callable[[str], None] | None = None,
                meter: EnergyMeter | None = None) -> HFRun:
    """Run `requests` in input order in batches of `batch_size`, appending to `run`.

    With a `meter`, energy is read around each batch (the same region that is timed)."""
    run = run or HFRun(batch_size)
    for i in range(0, len(requests), batch_size):
        if meter is not None:
            meter.start()
        res = generate_batch(model, requests[i: i + batch_size])
        if meter is not None:
            run.energy.append(meter.stop())
        run.token_ids.extend(res.token_ids)
        run.raw_generated += res.raw_generated
        run.elapsed_s += res.elapsed_s
        if say:
            say(f"  bs={batch_size}: {len(run.token_ids)} requests done, "
                f"{run.useful_output / run.elapsed_s:.1f} useful output tok/s so far")
    return run


def run_transformers(model: Any, requests: list[BenchRequest], batch_sizes: list[int],
                     probe_batches: int = 2, say: Callable[[str], None] | None = None,
                     meter: EnergyMeter | None = None) -> tuple[HFRun, dict[int, float]]:
    """Tune the batch size on a prefix, then run the whole workload with the best one.

    Each candidate runs `probe_batches` batches from the start of the workload; the winner's
    probe is kept as the start of the full run (identical batches, identical work), so only
    the remaining requests are run again. Returns the full run and {batch size: useful tok/s}.
    """
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}")
    if probe_batches < 1:
        raise ValueError(f"probe_batches must be >= 1, got {probe_batches}")
    generate_batch(model, [BenchRequest(requests[0].prompt_token_ids[:8], 4)])  # warmup
    probes: dict[int, HFRun] = {}
    for bs in sorted(set(batch_sizes)):
        if len(probes) and bs >= len(requests) and max(probes) >= len(requests):
            continue  # larger sizes would form the very same single batch
        probes[bs] = run_batches(model, requests[: bs * probe_batches], bs, say=say, meter=meter)
    rates = {bs: p.useful_output / p.elapsed_s for bs, p in probes.items()}
    best = max(rates, key=lambda bs: rates[bs])
    run = probes[best]
    if say:
        say(f"  best batch size {best}; running the remaining requests")
    return run_batches(model, requests[len(run.token_ids):], best, run, say, meter), rates


class _TokenClock:
    """A stopping criterion that never stops: it only notes when each new token exists.

    `generate` calls its stopping criteria once per step, right after the step's token is
    appended, so these timestamps are when token 1, 2, ... became available to the caller
    (on GPU after a synchronize, so the time is not just when the work was queued)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_timed(model: Any, prompts: list[list[int]], n_new: int,
                   ) -> tuple[list[list[int]], float, list[float]]:
    """Greedy-generate exactly `n_new` tokens for equal-length prompts (one batch, no padding).

    Returns (new token ids per prompt, start time, time each token step finished), all
    `time.perf_counter()` values: TTFT is times[0] - start, per-token gaps follow from the rest.
    """
    from transformers import StoppingCriteriaList

    width = len(prompts[0])
    if any(len(p) != width for p in prompts):
        raise ValueError("generate_timed needs prompts of equal length (no padding)")
    ids = torch.tensor(prompts, dtype=torch.long, device=model.device)
    clock = _TokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=greedy_config(model, n_new),
                             stopping_criteria=StoppingCriteriaList([clock]))
    return out[:, width:].tolist(), start, clock.times
