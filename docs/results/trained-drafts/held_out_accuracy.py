"""Teacher-forced top-1 accuracy of EAGLE drafts on the target's answers to the held-out
MT-Bench and HumanEval prompts (the quarter train-draft never sees): the measure train-draft
prints for its own held-out tenth, on the benchmark's prompts instead. Tokens outside a
draft's vocabulary are left out, as in training.

    .venv/bin/python docs/results/trained-drafts/held_out_accuracy.py DRAFT_DIR [DRAFT_DIR ...]
"""

import json
import sys

import torch

from servelm import LLM
from servelm.bench.spec_datasets import held_out, prompt_ids
from servelm.speculative.eagle import SHAPE_KEYS, load_eagle
from servelm.train import eagle
from servelm.train.collect import collect, runner_of
from servelm.train.methods import Target

llm = LLM(enable_prefix_caching=False)
traces = {}
for name in ("mt-bench", "humaneval"):
    ids, _ = prompt_ids(name, llm.get_tokenizer(), 1024)
    traces[name] = collect(llm, [p for p in ids if held_out(p)], 256, progress=False)
target = Target.of(runner_of(llm).model, llm.engine.model_source, [])
llm.shutdown()
vocab_size = target.lm_head.shape[1]
for path in sys.argv[1:]:
    draft = load_eagle(path, {k: target.arch[k] for k in SHAPE_KEYS}, vocab_size, 8192)
    index_of = torch.full((vocab_size,), -100, dtype=torch.int64)
    index_of[draft.vocab] = torch.arange(len(draft.vocab))
    head = target.lm_head[:, draft.vocab].contiguous()
    result = {}
    with torch.no_grad():
        for name, group in traces.items():
            right, count = [0.0, 0.0, 0.0], 0
            for i in range(0, len(group), 4):
                batch = eagle.make_batch(group[i : i + 4], target.embeddings, index_of)
                _, accuracy = eagle.losses(draft, head, batch, 3)
                n = int((batch.targets != -100).sum())
                right = [r + a * n for r, a in zip(right, accuracy)]
                count += n
            result[name] = [round(r / count, 3) for r in right]
    tokens = json.load(open(f"{path}/train_summary.json"))["output_tokens"]
    print(path, f"trained on {tokens} tokens:", result)
