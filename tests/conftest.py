"""Shared fixtures: tiny random-weight HF models (llama, mistral, qwen2, qwen3) and a tiny GGUF.

Usage in a test:

    def test_x(tiny_model_dir, tiny_gguf_path):
        folder = tiny_model_dir("qwen2")                       # Path to an HF folder
        tied = tiny_model_dir("llama", tie_word_embeddings=True)
        scaled = tiny_model_dir("llama", rope_scaling=LLAMA3_ROPE)
        sharded = tiny_model_dir("llama", max_shard_size="20KB")

Models are built once per session per distinct (family, overrides) and must be treated as
read-only. All share one tokenizer (`tiny_tokenizer`), so token ids are comparable across them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from servelm.model import loader

# The Triton kernels run in Triton's interpreter where there is no GPU; it must be on
# before the first kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # tests/ is on sys.path when it is not a package (pytest's default "prepend" mode)
    from fixtures_models import build_tiny_model, build_tokenizer, write_tiny_llama_gguf
except ImportError:  # tests/ became a package: import it as one
    from tests.fixtures_models import build_tiny_model, build_tokenizer, write_tiny_llama_gguf


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    """The byte-level BPE tokenizer (vocab ~400, ChatML template) every tiny model uses."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory,
                   tiny_tokenizer: Any) -> Callable[..., Path]:
    """Factory: `tiny_model_dir(family, **config_overrides) -> Path` of a saved HF folder."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def make(family: str = "llama", **overrides: Any) -> Path:
        key = json.dumps([family, overrides], sort_keys=True, default=str)
        if key not in built:
            name = f"{family}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
            built[key] = build_tiny_model(family, root / name, tiny_tokenizer, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_gguf_path(tiny_model_dir: Callable[..., Path], tiny_tokenizer: Any,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama GGUF converted from `tiny_model_dir("llama")` (untied), tensors in F32, F16,
    BF16, Q8_0, Q4_0 and Q4_1, with gpt2-style tokenizer metadata, bos/eos/eot and ChatML."""
    out = tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama.gguf"
    return write_tiny_llama_gguf(tiny_model_dir("llama"), out, tiny_tokenizer)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "network: needs PyPI (pip download) on first run; reuses the cache after"
    )
    config.addinivalue_line(
        "markers", "multiprocess: starts tensor/pipeline-parallel worker processes (slow; "
        "skip while iterating with -m 'not multiprocess')"
    )


@pytest.fixture(autouse=True, scope="session")
def float32_by_default():
    """dtype "auto" picks bfloat16 on CPUs with native bf16; the tests compare float models
    against transformers in float32, so they see a CPU without it and get float32 wherever
    they do not ask for a dtype, on every machine alike (session-wide, so engines built by
    module fixtures see it too; test_dtype.py checks the choice itself)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(loader, "native_bf16", lambda: False)
        yield
