"""`servelm train-draft --method distill`: a draft model cut from the target's first layers and
trained on the target's own greedy outputs matches the target's next token far more often
than the cut alone, loads as a `draft_model`, and gets more of its drafts accepted there,
with output still the target's."""

from __future__ import annotations

import json

from test_spec_distribution import VOCAB

from servelm import SamplingParams
from servelm.bench.spec_drafts import write_pruned_draft
from servelm.cli import main


def test_distilled_draft_learns_the_target(tiny_model_dir, make_llm, tmp_path):
    path = tiny_model_dir("llama", vocab_size=VOCAB)
    rows = [[1 + (i * 3 + j * (i % 5 + 1)) % 7 for j in range(3 + i % 4)] for i in range(40)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt_token_ids": r}) + "\n"
                                                    for r in rows))
    out = tmp_path / "distilled"
    rc = main(["train-draft", "--method", "distill", "--model", str(path), "--output", str(out),
               "--prompts-file", str(tmp_path / "prompts.jsonl"), "--max-tokens", "48",
               "--ignore-eos", "--num-layers", "1", "--epochs", "30", "--batch-size", "4",
               "--lr", "1e-2", "--quiet"])
    assert rc == 0
    summary = json.loads((out / "train_summary.json").read_text())
    first, last = summary["per_epoch"][0], summary["per_epoch"][-1]
    assert last["train_loss"] < 0.5 * first["train_loss"]
    assert last["held_out_loss"] < summary["untrained"]["held_out_loss"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert not (out / ".start").exists()

    prompts = [{"prompt_token_ids": r} for r in rows]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    want = make_llm(path).generate(prompts, params, use_tqdm=False)
    rates = {}
    for name, draft in (("distilled", out), ("cut", write_pruned_draft(str(path), 1, tmp_path / "cut"))):
        llm = make_llm(path, speculative_config={"method": "draft_model", "model": str(draft),
                                                 "num_speculative_tokens": 2,
                                                 "disable_by_batch_size": 64})
        got = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        m = llm.get_metrics()
        rates[name] = m["spec_accepted_tokens"] / m["spec_proposed_tokens"]
    assert rates["distilled"] > rates["cut"] + 0.2, rates  # a one-layer cut of three: not all
