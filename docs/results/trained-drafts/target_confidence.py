"""How sure the default model is of its own greedy answers to the held-out MT-Bench and
HumanEval prompts: the mean probability of each chosen token, and the share above 0.5,
0.8 and 0.95. A draft much smaller than the target agrees with its choice roughly as
often as the target is sure of it.

    .venv/bin/python docs/results/trained-drafts/target_confidence.py
"""

import math

from servelm import LLM, SamplingParams
from servelm.bench.spec_datasets import held_out, prompt_ids

llm = LLM()
for name in ("mt-bench", "humaneval"):
    ids, _ = prompt_ids(name, llm.get_tokenizer(), 1024)
    prompts = [{"prompt_token_ids": p} for p in ids if held_out(p)][:12]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=128, logprobs=1), use_tqdm=False)
    probs = [math.exp(lp[t].logprob) for o in outs for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
    share = {c: round(sum(p > c for p in probs) / len(probs), 3) for c in (0.5, 0.8, 0.95)}
    print(name, f"{len(probs)} tokens, mean probability {sum(probs) / len(probs):.3f}, share above:", share)
