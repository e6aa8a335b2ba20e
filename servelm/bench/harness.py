"""What every benchmark shares, so that each benchmark file holds only what it measures:
progress lines, option checks, warm-up then a timed and metered run, peers that may be
skipped, ratios and agreement, the result file (header, path, JSON), plain-text tables,
and the optional `bench` extra (HTTP load generator, plots).

A figure is only comparable with another when the machine, the code revision and the exact
command match, so each result records them; files default to bench-results/NAME-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

from servelm.bench.energy import EnergyMeter, EnergyReading

T = TypeVar("T")
SYSTEMS = ("servelm", "transformers", "llama.cpp")  # servelm and the peers it is measured against
BENCH_EXTRA = "pip install 'servelm[bench]'"

# ---- running -------------------------------------------------------------------------------


def progress(quiet: bool = False) -> Callable[..., None]:
    """A `say(...)` for progress lines: to stderr, or nowhere when `quiet`."""
    return (lambda *_: None) if quiet else partial(print, file=sys.stderr, flush=True)


def check_int(name: str, value: Any, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def split_engine(engine: dict[str, Any]) -> tuple[str | None, dict[str, Any], str]:
    """(model, the other `LLM` options, dtype) of a benchmark config's `engine` dict; the
    dtype resolved as the engine resolves "auto", for the peers that run the same weights."""
    from servelm.model.loader import compute_dtype

    rest = dict(engine)
    model = rest.pop("model", None)
    dtype = compute_dtype(rest.get("dtype", "auto"), model, rest.get("quantization", "auto"),
                          rest.get("device", "auto"))
    return model, rest, str(dtype).removeprefix("torch.")


def greedy(llm: Any, prompts: list[list[int]], max_tokens: int | list[int],
           ignore_eos: bool = True, show_progress: bool = False) -> list[Any]:
    """`llm.generate` of token-id prompts, greedy; `max_tokens` for all or one per prompt."""
    from servelm.sampling_params import SamplingParams

    def params(n: int) -> Any:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=ignore_eos)

    sampling = [params(n) for n in max_tokens] if isinstance(max_tokens, list) else params(max_tokens)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sampling,
                        use_tqdm=show_progress)


@dataclass
class Measured(Generic[T]):
    value: T
    elapsed_s: float
    energy: EnergyReading


def measure(run: Callable[[], T], warmup: Callable[[], Any] | None = None) -> Measured[T]:
    """`warmup()` untimed and unmetered, then `run()` timed and inside an energy meter."""
    if warmup is not None:
        warmup()
    meter = EnergyMeter()
    meter.start()
    start = time.perf_counter()
    value = run()
    elapsed = time.perf_counter() - start
    return Measured(value, elapsed, meter.stop())


# ---- peers and figures ---------------------------------------------------------------------


def ran(result: dict[str, Any], systems: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The figures of each of `systems` that ran: in `result`, and not a recorded skip."""
    return {k: r for k in systems
            if isinstance(r := result.get(k), dict) and "skipped" not in r}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of requests whose greedy outputs are identical (bf16 drifts; fp32 rarely)."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(1, len(a))


def describe(values: list[float]) -> dict[str, float] | None:
    """mean/median/p90/p99/min/max of `values` (linear-interpolated percentiles)."""
    if not values:
        return None
    import numpy as np

    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "median": float(np.median(arr)),
            "p90": float(np.percentile(arr, 90)), "p99": float(np.percentile(arr, 99)),
            "min": float(arr.min()), "max": float(arr.max()), "n": len(values)}


# ---- the result file -----------------------------------------------------------------------


def machine_info(dtype: str | None = None) -> dict[str, Any]:
    """What the numbers were measured on; CPU results mean little without it."""
    import torch
    import transformers

    cpu, mem_gb = platform.processor() or "unknown", None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "mem_total_gb": mem_gb,
            "load_average_1m": os.getloadavg()[0],
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "dtype": dtype}


def git_revision() -> str | None:
    """The servelm commit measured, with '+dirty' when the tree has local changes."""
    repo = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def run_stamp() -> dict[str, str]:
    """When, and by which command line, this result was made."""
    return {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(["servelm", *sys.argv[1:]]) if sys.argv else ""}


def result_header(benchmark: str, dtype: str | None = None) -> dict[str, Any]:
    return {"benchmark": benchmark, **run_stamp(), "servelm_revision": git_revision(),
            "machine": machine_info(dtype)}


def result_path(result_file: str | None, benchmark: str) -> Path:
    """`result_file`, or bench-results/<benchmark>-<time>.json; its folder is created."""
    out = Path(result_file or f"bench-results/{benchmark}-{dt.datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def write_result(result: dict[str, Any], out: Path) -> None:
    out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    result["result_file"] = str(out)


def new_result(benchmark: str, cfg: Any, dtype: str | None, **config: Any) -> dict[str, Any]:
    """The header, then the run's config: the fields of dataclass `cfg`, engine last."""
    fields = {k: v for k, v in vars(cfg).items() if k != "engine"}
    return {**result_header(benchmark, dtype),
            "config": {**fields, "engine": dict(cfg.engine), **config}}


def finish(result: dict[str, Any], benchmark: str, cfg: Any,
           print_table: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Write `result` to `cfg.result_file` (or the default path), print it unless
    `cfg.quiet`, and return it."""
    write_result(result, result_path(cfg.result_file, benchmark))
    if not cfg.quiet:
        print_table(result)
    return result


# ---- terminal output -----------------------------------------------------------------------


class Table:
    """A plain-text table: the first column left-aligned (labels), the rest right-aligned."""

    def __init__(self, title: str, cols: list[str], rows: list[list[str]] | None = None) -> None:
        self.title, self.cols, self.rows = title, cols, [list(r) for r in rows or []]

    def add_row(self, *cells: str) -> None:
        self.rows.append(list(cells))

    def __str__(self) -> str:
        widths = [max(len(r[i]) for r in [self.cols, *self.rows]) for i in range(len(self.cols))]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        return "\n".join([self.title, line(self.cols), line(["-" * w for w in widths]),
                          *map(line, self.rows)])


def print_report(tables: list[Table], notes: list[str]) -> None:
    """Tables, each followed by a blank line, then the notes."""
    for t in tables:
        print(f"{t}\n")
    for n in notes:
        print(n)


def joules_cell(r: dict[str, Any]) -> str:
    """Energy per output token for a table cell: a number, or 'n/a' when not readable."""
    j = r.get("energy_per_token_j")
    return "n/a" if j is None else f"{j:.3g}"


def print_systems_report(result: dict[str, Any], table: Table, notes: list[str]) -> None:
    """A side-by-side table of servelm and its peers, then `notes`, why peers were skipped,
    why energy is missing, and where the result file is."""
    notes = [*notes, *(r["skipped"] for k in SYSTEMS[1:]
                       if isinstance(r := result.get(k), dict) and "skipped" in r)]
    if (note := energy_note(result, SYSTEMS)) is not None:
        notes.append(note)
    print_report([table], [*notes, f"results: {result['result_file']}"])


def energy_note(result: dict[str, Any], systems: tuple[str, ...]) -> str | None:
    """One line with why energy is missing for the systems that ran, if it is."""
    reasons = {r.get("energy_unavailable_reason") for r in ran(result, systems).values()
               if r.get("energy_j") is None} - {None}
    return "energy unavailable: " + "; ".join(sorted(reasons)) if reasons else None


# ---- the optional extra and flags ----------------------------------------------------------


class MissingExtra(ImportError):
    """A module of the optional `bench` extra is not installed; the message says how to get it."""


def require_extra(what: str, *modules: str) -> None:
    """Import `modules` or raise MissingExtra naming the missing ones and the pip command."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtra(f"{what} needs {' and '.join(missing)}, not installed: {BENCH_EXTRA}")


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files only (no display needed)."""
    require_extra("plotting", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def listed(kind: Callable[[str], T], what: str, ok: Callable[[T], bool] = lambda v: True,
           ) -> Callable[[str], list[T]]:
    """argparse type: comma-separated `kind` values, at least one, each passing `ok`."""
    def parse(text: str) -> list[T]:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or not all(ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        return values
    return parse
