"""Compiling servelm's C kernels (ops/csrc) once per source and CPU, and loading them.

Each kernel is one C file built with `-O3 -march=native -fopenmp` into
`$SERVELM_CACHE_DIR/kernels` (default ~/.cache/servelm/kernels), named by a hash of the
sources and the CPU's flags, so an edited source or another CPU builds afresh and concurrent
builders race harmlessly. The .so shares torch's OpenMP runtime, so its thread count follows
`torch.set_num_threads`. Without a compiler, or with SERVELM_DISABLE_C_KERNELS=1, `load`
returns None and callers keep their pure-torch path. `main()` builds them all ahead of
time (`make setup` runs it), so the first request does not wait for gcc.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache, lru_cache
from pathlib import Path

logger = logging.getLogger("servelm")

CSRC = Path(__file__).parent / "csrc"


def cache_dir() -> Path:
    root = os.environ.get("SERVELM_CACHE_DIR") or Path.home() / ".cache" / "servelm"
    return Path(root) / "kernels"


@lru_cache(maxsize=1)
def cpu_signature() -> str:
    """The .so is built with -march=native, so it is only valid on the CPU that built it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return platform.machine() + line
    except OSError:
        pass
    return platform.machine()


def disabled() -> bool:
    return os.environ.get("SERVELM_DISABLE_C_KERNELS") == "1"


@cache
def load(name: str, native: bool = True) -> ctypes.CDLL | None:
    """csrc/<name>.c as a loaded library, compiled first if this CPU has no build of it.
    `native=False` builds the portable C (no -march=native, so no SIMD intrinsics): what a
    CPU without AVX2 runs, kept testable on one that has it."""
    if disabled():
        return None
    source = CSRC / f"{name}.c"
    digest = hashlib.sha256(cpu_signature().encode())
    for path in sorted(CSRC.glob("*.[ch]")):  # a kernel may #include another
        digest.update(path.name.encode() + path.read_bytes())
    key = digest.hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}{'' if native else '-portable'}.so"
    if not target.exists():
        compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
        if compiler is None:
            logger.warning("no C compiler found: servelm's %s kernel falls back to slower torch code", name)
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            cmd = [compiler, "-O3", *(["-march=native"] if native else []), "-fopenmp", "-shared",
                   "-fPIC", "-o", str(built), str(source), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                logger.warning("building servelm's %s kernel failed, falling back to torch code:\n%s",
                               name, proc.stderr[-2000:])
                return None
            os.replace(built, target)
    return ctypes.CDLL(str(target))


LIBRARIES = ("paged_attention", "qgemm", "bgemm", "decoder", "shm_allreduce")  # the kernels servelm loads


def build_all() -> list[str]:
    """Build every kernel for this CPU now; returns those that could not be built."""
    return [name for name in LIBRARIES if load(name) is None]


def main() -> None:
    """`make setup` runs this so the first request does not wait for gcc."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    failed = build_all()
    print(f"servelm C kernels built in {cache_dir()}" if not failed
          else f"servelm C kernels not built ({', '.join(failed)}): torch fallbacks will run")
