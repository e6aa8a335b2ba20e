"""A model quantized at load runs like transformers on the same weights rounded the same
way, with the activations entering each matmul rounded as the kernel rounds them: each
linear weight (and the embedding table) replaced by its 8- or 4-bit block values, computed
here from the quantization's definition, not by servelm's code."""

from __future__ import annotations

import pytest
import torch
from test_parity import check_against, hf_reference, random_prompts
from transformers import AutoModelForCausalLM

from servelm import SamplingParams


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()  # scales and mins are stored in fp16


def int8_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, group)
    step = _fp16(g.abs().amax(-1, keepdim=True) / 127)
    return ((g / step.clamp_min(1e-12)).round().clamp(-127, 127) * step).reshape(w.shape)


def int4_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, group)
    lo = _fp16(g.amin(-1, keepdim=True))
    step = _fp16((g.amax(-1, keepdim=True) - lo) / 15)
    return (((g - lo) / step.clamp_min(1e-12)).round().clamp(0, 15) * step + lo).reshape(w.shape)


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """Each 32 columns rounded to int8 with scale max |x| / 127, as csrc/qgemm.c does."""
    g = x.reshape(*x.shape[:-1], -1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    q = (g * torch.where(amax > 0, 127 / amax, 0)).round()
    return (q * (amax / 127)).reshape(x.shape)


def round_activations(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _, args: (int8_activations(args[0]),))


def rounded_copy(path, out, method: str, group: int):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                w.copy_(int8_groups(w, group) if method == "int8" else int4_groups(w, group))
        emb = model.get_input_embeddings().weight
        emb.copy_(int8_groups(emb, group))  # the lookup table is 8-bit under both methods
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("method,family,lens", [("int8", "llama", [5, 17, 30]), ("int4", "llama", [5, 17, 30]),
                                                ("int4", "qwen2", [5, 17, 30]), ("int8", "qwen3", [5, 17, 30]),
                                                ("int4", "llama", [90])])
def test_quantized_greedy_matches_transformers_on_rounded_weights(method, family, lens, tiny_model_dir,
                                                                  make_llm, tmp_path):
    """Decodes run the fused C decoder (ops/fused_decoder.py), prefills the per-op path;
    qwen2 brings q/k/v biases and qwen3 per-head q/k norms through both. One request alone
    with a long context has its attention split over threads by context slices."""
    path = tiny_model_dir(family)
    # A float32 cache (under block weights the default is bfloat16): the reference rounds
    # weights and activations only; test_kv_cache_dtype.py covers the 16-bit cache.
    llm = make_llm(path, quantization=method, quantization_group_size=32, block_size=4,
                   max_num_batched_tokens=16, kv_cache_dtype="float32")
    prompts = random_prompts(llm.engine.arch.vocab_size, lens)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.executor.worker.runner.model._fused, "decodes ran the fused decoder"
    reference = rounded_copy(path, tmp_path / method, method, 32)
    # Tokens exactly; logprobs to 2e-2: an activation within float error of a rounding
    # boundary can land on either side in another summation order, which moves a logprob by
    # up to ~1e-2 (seen with the per-op and fused paths alike on the 90-token prompt).
    check_against(outputs, hf_reference(reference, prompts, 12, prepare=round_activations),
                  lp_tol=2e-2)


def test_weight_bytes_drop_with_quantization(tiny_model_dir, make_llm):
    path = tiny_model_dir("llama", hidden_size=128, intermediate_size=512)
    sizes = {q: make_llm(path, dtype="bfloat16", quantization=q).get_metrics()["model_weight_bytes"]
             for q in ("auto", "int8", "int4")}
    assert sizes["auto"] / sizes["int8"] > 1.8
    assert sizes["auto"] / sizes["int4"] > 2.4
    with pytest.raises(ValueError, match="quantization"):
        make_llm(path, quantization="int3")
    with pytest.raises(ValueError, match="quantization_group_size"):
        make_llm(path, quantization="int4", quantization_group_size=48)


def test_fused_decoder_over_a_16bit_cache_matches_the_per_op_path(tiny_model_dir, make_llm, monkeypatch):
    """The default cache under block weights is bfloat16: the fused decoder writes and reads
    it as the per-op path does (which test_kv_cache_dtype.py checks against transformers)."""
    from servelm.model import llama

    path = tiny_model_dir("llama")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)

    def run():
        llm = make_llm(path, quantization="int4", block_size=4, max_num_batched_tokens=16)
        prompts = random_prompts(llm.engine.arch.vocab_size, [5, 90])
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return llm, [(o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                              o.outputs[0].token_ids)])
                     for o in outs]

    fused_llm, fused = run()
    assert fused_llm.engine.executor.worker.kv_dtype == "bfloat16"
    assert fused_llm.engine.executor.worker.runner.model._fused
    monkeypatch.setattr(llama, "_decodes_only", lambda meta: False)
    _, per_op = run()
    for (ta, la), (tb, lb) in zip(fused, per_op, strict=True):
        assert ta == tb and max(abs(a - b) for a, b in zip(la, lb)) < 2e-2


def bf16_activations(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _, args: (args[0].bfloat16().float(),))


def test_bf16_gguf_greedy_matches_transformers_on_rounded_activations(tiny_model_dir, tiny_tokenizer,
                                                                      make_llm, tmp_path):
    """A BF16 GGUF keeps its bfloat16 matrices (defaults: float32 compute, csrc/bgemm.c),
    decodes through the fused decoder, and matches transformers on the same bfloat16 values
    with each matmul's input rounded to bfloat16 as the kernel rounds it."""
    import gguf
    from fixtures_models import write_tiny_llama_gguf

    path = tiny_model_dir("llama")
    file = write_tiny_llama_gguf(path, tmp_path / "bf16.gguf", tiny_tokenizer,
                                 matrix_types=[gguf.GGMLQuantizationType.BF16])
    llm = make_llm(str(file), block_size=4, max_num_batched_tokens=16, kv_cache_dtype="float32")
    assert llm.engine.executor.worker.runner.model.dtype == torch.float32
    prompts = random_prompts(llm.engine.arch.vocab_size, [5, 17, 30])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.executor.worker.runner.model._fused, "decodes ran the fused decoder"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.bfloat16().float())
    model.save_pretrained(tmp_path / "rounded")
    check_against(outputs, hf_reference(tmp_path / "rounded", prompts, 12, prepare=bf16_activations),
                  lp_tol=2e-2)
