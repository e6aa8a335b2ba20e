"""`servelm train-draft --method distill`: a draft model cut from the target's first layers and
trained on the target's own greedy outputs matches the target's next token far more often
than the cut alone, loads as a `draft_model`, and gets more of its drafts accepted there,
with output still the target's."""

from __future__ import annotations

import json

from test_spec_distribution import VOCAB
from trained_drafts import acceptance_on_rows, train_on_rows

from servelm.bench.spec_drafts import write_pruned_draft


def test_distilled_draft_learns_the_target(tiny_model_dir, make_llm, tmp_path):
    path = tiny_model_dir("llama", vocab_size=VOCAB)
    out, summary = train_on_rows(tmp_path, path, "distill", "--num-layers", "1", "--epochs", "30",
                                 "--batch-size", "4", "--lr", "1e-2")
    assert summary["per_epoch"][-1]["held_out_loss"] < summary["untrained"]["held_out_loss"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert not (out / ".start").exists()
    cut = write_pruned_draft(str(path), 1, tmp_path / "cut")
    rates = acceptance_on_rows(make_llm, path, {
        name: {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2}
        for name, draft in (("distilled", out), ("cut", cut))})
    assert rates["distilled"] > rates["cut"] + 0.2, rates  # a one-layer cut of three: not all
