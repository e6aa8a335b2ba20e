"""On block-quantized weights (the fused C decoder), a speculative chain is verified as one
decode row per position: each row's logits must equal plain decoding's bit for bit, or
greedy output parts from the target's wherever two tokens nearly tie. A request decoding
alone over a long context is where the kernels are most tempted to split work by how many
rows share the step (decode attention sliced over threads)."""

from __future__ import annotations

import torch
from test_medusa import random_heads

from servelm import SamplingParams


def test_chain_rows_match_plain_decoding_bit_for_bit(tiny_model_dir, make_llm, tmp_path):
    path = tiny_model_dir("llama")
    heads = random_heads(tmp_path / "heads", 64)
    options = dict(quantization="int4", quantization_group_size=32, block_size=16)
    spec = make_llm(path, speculative_config={"method": "medusa", "model": heads,
                                              "num_speculative_tokens": 3}, **options)
    plain = make_llm(path, **options)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=1)
    prompts = [{"prompt_token_ids": torch.randint(1, 200, (n,), generator=gen).tolist()}
               for n in (20, 200, 440)]
    alone = [plain.generate([p], params, use_tqdm=False)[0].outputs[0] for p in prompts]
    # each request alone, then all three in one batch: a row's arithmetic must not depend
    # on the rows beside it (other requests' rows, or its own chain's)
    together = spec.generate(prompts, params, use_tqdm=False)
    for p, want, batched in zip(prompts, alone, together):
        got = spec.generate([p], params, use_tqdm=False)[0].outputs[0]
        for out in (got, batched.outputs[0]):
            assert out.token_ids == want.token_ids
            assert out.logprobs == want.logprobs  # exactly: same arithmetic, not just close
    assert plain.engine.executor.worker.runner.model._fused, "decodes ran the fused decoder"
    m = spec.get_metrics()
    assert m["spec_proposed_tokens"] > 0
