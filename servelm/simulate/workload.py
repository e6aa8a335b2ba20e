"""The requests a simulation replays: arrival times and lengths, as `bench serve` sends
them, or read from a trace file.

- random: prompt and output lengths drawn as `bench serve --dataset-name random` draws them
  (same seed, same distribution), prompts as random token ids (no text to build: a
  million requests take seconds).
- shared-prefix: `--shared-prefix-num-prefixes` prompts of `--shared-prefix-len` tokens,
  request i opening with prefix i mod N, then a random question of `--random-input-len`.
- a trace file: JSONL or CSV with `prompt_len`, `output_len` and optionally `arrival_s`
  (else arrivals come from --request-rate/--burstiness) and `prefix_id`/`prefix_len`
  (requests sharing a prefix id open with the same tokens); or a `bench serve` result
  written with --save-detailed (its requests, as the server saw them).
Arrivals: gamma-distributed gaps of mean 1/rate with shape `burstiness` (1: Poisson).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from servelm.bench.serve_datasets import draw_lengths, send_times


@dataclass(slots=True)
class TraceRequest:
    """One request of a trace. Its prompt is drawn when asked for, from its own seed: a
    million prompts are never all held at once."""

    arrival_s: float
    prompt_len: int
    output_len: int
    prefix: list[int] = field(default_factory=list)  # opening tokens (one list shared by many)
    seed: int = 0

    @classmethod
    def of(cls, arrival_s: float, prompt_ids: list[int], output_len: int) -> TraceRequest:
        """A request with the given prompt."""
        return cls(arrival_s, len(prompt_ids), output_len, list(prompt_ids))

    @property
    def prompt_ids(self) -> list[int]:
        n = self.prompt_len - len(self.prefix)
        if n <= 0:
            return self.prefix[:self.prompt_len]
        # From a hash of its seed (seeding a random.Random would cost more than the rest of
        # the request's admission), one byte a token: ids under 256 are ints Python shares,
        # so a prompt allocates no int objects (a random 16-token block still repeats
        # with odds of 2^-128).
        return self.prefix + list(hashlib.shake_128(self.seed.to_bytes(8, "little")).digest(n))


def _ids(n: int, rng: random.Random) -> list[int]:
    """n random token ids (any ids work: only equality matters to the prefix cache)."""
    return memoryview(rng.randbytes(2 * n)).cast("H").tolist()


def synthetic(name: str, n: int, input_len: int, output_len: int, ratio: float,
              rate: float, burstiness: float, seed: int, prefix_len: int = 0,
              num_prefixes: int = 1, arrival_seed: int | None = None) -> list[TraceRequest]:
    """`seed` draws lengths and tokens, `arrival_seed` (default: seed) the arrival gaps: bench
    serve keeps the arrival seed across a sweep's rates and draws new prompts at each."""
    if name not in ("random", "shared-prefix"):
        raise ValueError(f"--dataset-name: the simulator makes 'random' or 'shared-prefix' "
                         f"workloads (or give --trace FILE), got {name!r}")
    rng = random.Random(seed)
    ins = draw_lengths(input_len, ratio, n, rng)
    outs = draw_lengths(output_len, ratio, n, rng)
    prefixes = [_ids(prefix_len, rng) for _ in range(num_prefixes)] if name == "shared-prefix" else [[]]
    times = send_times(n, rate, burstiness, seed if arrival_seed is None else arrival_seed)
    trace = []
    for i, t in enumerate(times):
        prefix = prefixes[i % len(prefixes)]
        trace.append(TraceRequest(t, len(prefix) + ins[i], outs[i], prefix, rng.getrandbits(63)))
    return trace


def from_file(path: str | Path, rate: float, burstiness: float, seed: int,
              num_prompts: int | None = None) -> list[TraceRequest]:
    path = Path(path)
    rows = _rows(path, rate)
    rng = random.Random(seed)
    if num_prompts is not None:  # a prompt set's lengths, drawn with replacement (a real trace: cut)
        timed = any(row.get("arrival_s") not in (None, "") for row in rows)
        rows = rows[:num_prompts] if timed else [rng.choice(rows) for _ in range(num_prompts)]
    prefixes: dict[str, list[int]] = {}
    times = send_times(len(rows), rate, burstiness, seed)
    out = []
    for i, row in enumerate(rows):
        try:
            prompt_len, output_len = int(row["prompt_len"]), int(row["output_len"])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: row {i + 1} needs integer prompt_len and output_len") from exc
        prefix: list[int] = []
        if row.get("prefix_id") not in (None, ""):
            size = int(row.get("prefix_len") or 0)
            prefix = prefixes.setdefault(str(row["prefix_id"]), _ids(size, rng))
        arrival = float(row["arrival_s"]) if row.get("arrival_s") not in (None, "") else times[i]
        out.append(TraceRequest(arrival, prompt_len, max(1, output_len), prefix, rng.getrandbits(63)))
    return sorted(out, key=lambda r: r.arrival_s)


def _rows(path: Path, rate: float) -> list[dict]:
    text = path.read_text()
    if path.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if path.suffix == ".json":  # a bench serve result with its requests
        return _result_rows(path, json.loads(text), rate)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def bench_rates(path: str | Path) -> list[tuple[float, float]]:
    """(request rate, measured mean TTFT in ms) of each run in a bench serve result."""
    data = json.loads(Path(path).read_text())
    return [(math.inf if r["request_rate"] == "inf" else float(r["request_rate"]), r["mean_ttft_ms"])
            for r in result_runs(data)]


def result_runs(data: dict) -> list[dict]:
    """A bench serve (or simulate run) result's runs, of its first system when it has several."""
    systems = data.get("systems") or {}
    return next(iter(systems.values()))["runs"] if systems else data.get("runs") or [data]


def _result_rows(path: Path, data: dict, rate: float) -> list[dict]:
    """The requests of a bench serve result's run at `rate` (its first system's), as sent."""
    runs = result_runs(data)
    if len(runs) > 1:
        want = "inf" if math.isinf(rate) else rate
        runs = [r for r in runs if r.get("request_rate") == want]
        if not runs:
            raise ValueError(f"--trace: {path} has no run at --request-rate {want}")
    reqs = runs[0].get("requests")
    if not reqs:
        raise ValueError(f"--trace: {path} lacks its requests (run bench serve with --save-detailed)")
    shared = runs[0].get("common_prefix_tokens", 0)  # a chat template's, a system prompt's
    return [{"arrival_s": r["start_s"], "prompt_len": r["prompt_len"], "output_len": r["output_len"],
             "prefix_id": "common" if shared else None, "prefix_len": shared}
            for r in reqs if r.get("success")]
