"""The C paged-attention kernel for CPU, compiled on first use and called through ctypes.

Why C: on CPU, attention over a paged cache in plain torch must first gather every
request's K/V into a padded tensor, and the SDPA kernels are slow for decode-shaped
problems (a few query rows per KV head). The kernel in csrc/ reads K/V in place through
the block table, each token's K and V row once. It needs only a C compiler with OpenMP (gcc); without
one, `load()` returns None and the engine keeps the torch path. The shared object is
cached per source hash and CPU, and shares torch's OpenMP runtime (and thread count).
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
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger("servelm")

_SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
_FUNCTIONS = {torch.float32: "paged_attention_f32", torch.bfloat16: "paged_attention_bf16"}
_ARGTYPES = [ctypes.c_void_p] * 5 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 5 + [ctypes.c_float]


def _cache_dir() -> Path:
    root = os.environ.get("SERVELM_CACHE_DIR") or Path.home() / ".cache" / "servelm"
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """The .so is built with -march=native, so it is only valid on the CPU that built it."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return platform.machine() + flags


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    if os.environ.get("SERVELM_DISABLE_C_KERNELS") == "1":
        return None
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + _cpu_signature().encode()).hexdigest()[:16]
    target = _cache_dir() / f"paged_attention-{key}.so"
    if not target.exists():
        if compiler is None:
            logger.warning("no C compiler found; using the slower torch attention path")
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
                   "-o", str(built), str(_SOURCE), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                logger.warning("building the C attention kernel failed, using torch attention:\n%s",
                               proc.stderr[-2000:])
                return None
            os.replace(built, target)  # atomic: concurrent builders race harmlessly
    lib = ctypes.CDLL(str(target))
    for name in _FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.argtypes = _ARGTYPES
        fn.restype = ctypes.c_int
    return lib


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                    row_req: torch.Tensor, row_ctx: torch.Tensor, block_size: int,
                    scale: float) -> torch.Tensor:
    """q: [T, H, D]; kv_cache: [2, slots, KV, D]; block_tables: [R, max_blocks] int64;
    row_req / row_ctx: [T] int64 (request row in block_tables, context length)."""
    lib = load()
    assert lib is not None and q.dtype == kv_cache.dtype and q.dtype in _FUNCTIONS
    q = q.contiguous()
    out = torch.empty_like(q)
    num_rows, num_heads, head_dim = q.shape
    rc = getattr(lib, _FUNCTIONS[q.dtype])(
        q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), out.data_ptr(),
        block_tables.data_ptr(), block_tables.shape[1], row_req.data_ptr(), row_ctx.data_ptr(),
        num_rows, num_heads, kv_cache.shape[2], head_dim, block_size, scale,
    )
    if rc != 0:
        raise ValueError(f"C attention kernel supports up to 64 heads and 4096 K/V values per "
                         f"token, got {num_heads} heads and {kv_cache.shape[2] * head_dim}")
    return out


def supports(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    return (dtype in _FUNCTIONS and num_heads <= 64 and num_kv_heads * head_dim <= 4096
            and num_heads * head_dim <= 8192 and load() is not None)
