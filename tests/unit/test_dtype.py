"""dtype "auto": float32 where the matmul weights stay block-quantized (the block kernels
take float32 activations), else bfloat16 on a CPU with native bf16, else float32."""

from __future__ import annotations

import pytest
import torch

from servelm.config import EngineConfig
from servelm.model import loader
from servelm.model.loader import native_bf16 as real_native_bf16  # before the autouse patch


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_follows_the_weights_and_the_cpu(monkeypatch, tiny_model_dir, tiny_gguf_path, native):
    monkeypatch.setattr(loader, "native_bf16", lambda: native)
    folder = str(tiny_model_dir("llama"))
    best_float = torch.bfloat16 if native else torch.float32
    assert loader.compute_dtype("auto", folder, "auto") == best_float
    assert loader.compute_dtype("auto", folder, "none") == best_float
    assert loader.compute_dtype("auto", folder, "int4") == torch.float32
    assert loader.compute_dtype("auto", str(tiny_gguf_path), "auto") == torch.float32
    assert loader.compute_dtype("auto", str(tiny_gguf_path), "none") == best_float
    assert loader.compute_dtype("float32", folder, "auto") == torch.float32
    assert loader.compute_dtype("bfloat16", str(tiny_gguf_path), "auto") == torch.bfloat16


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert real_native_bf16(str(cpuinfo))
    cpuinfo.write_text("flags\t\t: fpu avx2 fma\n")
    assert not real_native_bf16(str(cpuinfo))
    assert not real_native_bf16(str(tmp_path / "missing"))


def test_config_rejects_an_unknown_dtype():
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="float16x")
