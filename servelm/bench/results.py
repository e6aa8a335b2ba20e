"""What every benchmark result file starts with, and where it is written.

A figure is only comparable with another when the machine, the code revision and the exact
command match, so each result records them; files default to bench-results/NAME-<time>.json.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any


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


def result_header(benchmark: str, dtype: str | None = None) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["servelm", *sys.argv[1:]]) if sys.argv else "",
        "servelm_revision": git_revision(),
        "machine": machine_info(dtype),
    }


def result_path(result_file: str | None, benchmark: str) -> Path:
    """`result_file`, or bench-results/<benchmark>-<time>.json; its folder is created."""
    out = Path(result_file or f"bench-results/{benchmark}-{dt.datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def write_result(result: dict[str, Any], out: Path) -> None:
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    result["result_file"] = str(out)
