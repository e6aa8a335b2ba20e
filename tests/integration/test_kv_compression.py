"""KV compression (kv/compression.py) against transformers on the same weights.

- Below the budget, every policy leaves outputs (tokens and logprobs) unchanged.
- Right after a prompt's prefill, each policy keeps exactly `budget` tokens per layer and
  KV head, and the right ones: sinks + recent (StreamingLLM), recent + the heaviest
  accumulated attention (H2O), the observation window + what it attends to (SnapKV), the
  attention taken from transformers' eager attention. Blocks past the budget are free.
- StreamingLLM decoding equals transformers run on the same tokens with the
  sink-plus-window attention mask: kept keys keep their positions, new tokens get theirs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from servelm import EngineConfig, SamplingParams
from servelm.engine.engine import LLMEngine

BS = 4
PROMPT = [(7 * i + 3) % 300 + 5 for i in range(40)]
BUDGET = 16
POLICIES = {
    "streamingllm": {"method": "streamingllm", "budget": BUDGET, "sink_tokens": 2},
    "h2o": {"method": "h2o", "budget": BUDGET, "recent_tokens": 6},
    "snapkv": {"method": "snapkv", "budget": BUDGET, "window": 4, "pool_kernel": 3},
}


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")


@pytest.mark.parametrize("method", list(POLICIES))
def test_requests_within_the_budget_are_unchanged(tiny_model_dir, make_llm, method):
    model = tiny_model_dir("llama")
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True)
    prompts = [{"prompt_token_ids": PROMPT[:10]}, {"prompt_token_ids": PROMPT[5:20]}]
    base = make_llm(model, block_size=BS, num_kv_blocks=64).generate(prompts, params, use_tqdm=False)
    cfg = {**POLICIES[method], "budget": 40}
    llm = make_llm(model, block_size=BS, num_kv_blocks=64, kv_compression=cfg)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(base, outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            for t in la:
                assert la[t].logprob == pytest.approx(lb[t].logprob, abs=1e-5)
    assert llm.get_metrics()["kv_evicted_tokens"] == 0


def _expected_kept(method: str, hf_attn: tuple[torch.Tensor, ...], num_kv: int) -> torch.Tensor:
    """[layers, KV heads, budget] token indices the policy should keep, from transformers'
    attention probabilities [1, H, P, P] per layer."""
    cfg, n = POLICIES[method], len(PROMPT)
    if method == "streamingllm":
        kept = list(range(cfg["sink_tokens"])) + list(range(n - BUDGET + cfg["sink_tokens"], n))
        return torch.tensor(kept).expand(len(hf_attn), num_kv, BUDGET)
    out = []
    for a in hf_attn:
        a = a[0].view(num_kv, -1, n, n)  # [KV, group, queries, keys]
        if method == "h2o":
            recent = cfg["recent_tokens"]
            scores = a.sum(dim=(1, 2))
        else:
            recent = cfg["window"]
            scores = a[:, :, n - recent:].sum(dim=(1, 2))
        cand = scores[:, : n - recent]
        if method == "snapkv":
            k = cfg["pool_kernel"]
            cand = F.max_pool1d(cand[:, None], k, 1, k // 2)[:, 0]
        top = cand.topk(BUDGET - recent, dim=-1).indices.sort(-1).values
        out.append(torch.cat([top, torch.arange(n - recent, n).expand(num_kv, recent)], -1))
    return torch.stack(out)


@pytest.mark.parametrize("method", list(POLICIES))
def test_each_policy_keeps_exactly_its_budget_and_the_right_tokens(tiny_model_dir, method):
    model = tiny_model_dir("llama")
    ref = LLMEngine(EngineConfig(model=str(model), block_size=BS, num_kv_blocks=64))
    eng = LLMEngine(EngineConfig(model=str(model), block_size=BS, num_kv_blocks=64,
                                 kv_compression=POLICIES[method]))
    for e in (ref, eng):
        e.add_request("r", {"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=4, temperature=0))
        e.step()  # the whole prompt in one chunk, then compression
    req = eng.scheduler.running[0]
    assert req.num_kv_tokens == BUDGET and req.num_evicted_tokens == len(PROMPT) - BUDGET
    table = eng.scheduler.kv.block_table(req.request_id)
    assert len(table) == BUDGET // BS  # the rest went back to the pool
    assert eng.scheduler.kv.num_free_blocks == 64 - BUDGET // BS
    eng.scheduler.kv.check_invariants()

    def keys(e, blocks, n):  # [layers, n, KV, D]: K of a request's first n cache indices
        idx = torch.arange(n)
        slots = torch.tensor(blocks)[idx // BS] * BS + idx % BS
        return e.executor.worker.runner.cache.kv.values[:, 0].index_select(1, slots)

    full = keys(ref, ref.scheduler.kv.block_table(ref.scheduler.running[0].request_id), len(PROMPT))
    kept = keys(eng, table, BUDGET)
    # Which prompt token each kept (layer, head, index) holds: the one with identical K.
    dist = (kept[:, :, None] - full[:, None]).abs().sum(-1)  # [L, B, P, KV]
    held = dist.argmin(2).permute(0, 2, 1)  # [L, KV, B]
    assert torch.equal(dist.amin(2), torch.zeros_like(dist.amin(2)))
    hf = _hf(model)
    with torch.inference_mode():
        attn = hf(torch.tensor([PROMPT]), output_attentions=True).attentions
    assert torch.equal(held, _expected_kept(method, attn, full.shape[2]))

    while eng.has_unfinished_requests():  # decoding after compression runs and frees all
        eng.step()
    assert eng.scheduler.kv.num_free_blocks == 64
    eng.scheduler.kv.check_invariants()


def test_streamingllm_decoding_matches_transformers_with_a_sink_window_mask(tiny_model_dir, make_llm):
    model = tiny_model_dir("llama")
    sinks, n_out = 2, 24
    cfg = {"method": "streamingllm", "budget": BUDGET, "sink_tokens": sinks}
    llm = make_llm(model, block_size=BS, num_kv_blocks=64, kv_compression=cfg)
    out = llm.generate([{"prompt_token_ids": PROMPT[:12]}],
                       SamplingParams(max_tokens=n_out, temperature=0, logprobs=1, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert llm.get_metrics()["kv_evicted_tokens"] > 0
    seq = PROMPT[:12] + list(out.token_ids)
    n, p = len(seq), 12
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for t in range(p, n):  # a generated token's query sees the sinks and the recent window
        allowed[t, sinks : max(sinks, t - (BUDGET - sinks))] = False
    mask = torch.zeros(1, 1, n, n).masked_fill_(~allowed, float("-inf"))
    hf = _hf(model)
    with torch.inference_mode():
        logp = hf(torch.tensor([seq]), attention_mask=mask).logits[0].log_softmax(-1)
    for j, token in enumerate(out.token_ids):  # token j is predicted at position p - 1 + j
        row = logp[p - 1 + j]
        assert token == int(row.argmax())
        assert out.logprobs[j][token].logprob == pytest.approx(float(row[token]), abs=1e-4)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_compressed_requests_survive_preemption(tiny_model_dir, make_llm, mode):
    """SnapKV compresses each prompt once and lets the generated tokens grow, so requests
    outgrow a small cache. A swapped request comes back with its compacted K/V and goes on
    exactly. A recomputed one is compressed again, but its generated tokens are now
    prefilled in one chunk, not one step each: it runs to the end without leaking blocks,
    though not necessarily with the same tokens."""
    model = tiny_model_dir("llama")
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": PROMPT[i:i + 30]} for i in range(0, 8, 2)]
    opts = dict(block_size=BS, kv_compression=POLICIES["snapkv"], max_num_batched_tokens=64)
    ref = make_llm(model, num_kv_blocks=128, **opts).generate(prompts, params, use_tqdm=False)
    tight = make_llm(model, num_kv_blocks=16, preemption_mode=mode, **opts)
    got = tight.generate(prompts, params, use_tqdm=False)
    assert tight.get_metrics()["num_preemptions"] > 0
    assert (tight.get_metrics()["num_swap_out_blocks"] > 0) == (mode == "swap")
    for a, b in zip(ref, got):
        assert len(b.outputs[0].token_ids) == 24
        if mode == "swap":
            assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_compression_options_are_validated(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    for bad, match in [({"method": "lru", "budget": 8}, "kv_compression.method"),
                       ({"method": "h2o"}, "kv_compression.budget"),
                       ({"method": "h2o", "budget": 0}, "kv_compression.budget"),
                       ({"method": "streamingllm", "budget": 4, "sink_tokens": 4}, "sink_tokens"),
                       ({"method": "snapkv", "budget": 64, "pool_kernel": 4}, "pool_kernel"),
                       ({"method": "h2o", "budget": 8, "ratio": 0.5}, "unknown keys"),
                       ("{not json", "not valid JSON")]:
        with pytest.raises(ValueError, match=match):
            EngineConfig(model=model, kv_compression=bad)
    with pytest.raises(ValueError, match="speculative_config"):
        EngineConfig(model=model, kv_compression={"method": "h2o", "budget": 8},
                     speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    assert not EngineConfig(model=model, kv_compression={"method": "h2o", "budget": 8}).enable_prefix_caching
