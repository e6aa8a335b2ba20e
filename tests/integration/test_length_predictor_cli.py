"""`servelm length-predictor collect` then `train` on a tiny model, and their input errors."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

from servelm.bench.length_predictor_cli import add_predictor_parser
from servelm.engine.length_predictor import LengthPredictor, evaluate
from servelm.engine_args import add_engine_args
from servelm.sampling_params import SamplingParams

try:  # tests/ is on sys.path when it is not a package (pytest's default "prepend" mode)
    from fixtures_models import corpus_lines
except ImportError:
    from tests.fixtures_models import corpus_lines


def run(argv: list[str]) -> int:
    """What `servelm length-predictor ...` does once cli.py registers the parser."""
    parser = argparse.ArgumentParser(prog="servelm")
    add_predictor_parser(parser.add_subparsers(dest="command", required=True), add_engine_args)
    args = parser.parse_args(["length-predictor", *argv])
    return args.func(args)


def test_collect_then_train(tiny_model_dir, tiny_tokenizer, make_llm, tmp_path, capsys,
                            monkeypatch):
    texts = corpus_lines(14)
    prompts, pairs = tmp_path / "prompts.jsonl", tmp_path / "out" / "pairs.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": t, "other": i}) for i, t in enumerate(texts)))
    model = tiny_model_dir("llama")
    assert run(["collect", "--model", str(model), "--dataset-path", str(prompts),
                "--output", str(pairs), "--num-prompts", "12", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "collected 12 pairs" in out and "hit max_tokens (8)" in out

    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert len(rows) == 12
    for row, text in zip(rows, texts):
        assert row["prompt"] == text and row["vocab_size"] == len(tiny_tokenizer)
        chatml = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        assert row["prompt_token_ids"] == tiny_tokenizer.encode(chatml)
        assert row["finish_reason"] in ("stop", "length")
        assert (row["finish_reason"] == "length") == (row["output_len"] == 8)
    # The logged lengths are what the engine generates for those ids (greedy, same bound).
    llm = make_llm(model)
    again = llm.generate([{"prompt_token_ids": r["prompt_token_ids"]} for r in rows],
                         SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in again] == [r["output_len"] for r in rows]

    predictor, report = tmp_path / "p.npz", tmp_path / "report.json"
    with monkeypatch.context() as m:  # no plots, no HTTP client: runs without the bench extra
        m.setitem(sys.modules, "aiohttp", None)
        m.setitem(sys.modules, "matplotlib", None)
        assert run(["train", str(pairs), "--output", str(predictor), "--report-json",
                    str(report)]) == 0
    out = capsys.readouterr().out
    assert "held-out" in out and "pairwise acc." in out and "max_tokens=8" in out
    loaded = LengthPredictor.load(predictor)
    loaded.check_vocab(len(tiny_tokenizer))
    assert loaded.num_train == 12 and loaded.vocab_size == len(tiny_tokenizer)
    # The saved predictor is the fit on every pair; the report scores a fit on all but the
    # held-out quarter (the seed-0 split) on those three.
    prompts, lens = [r["prompt_token_ids"] for r in rows], [r["output_len"] for r in rows]
    vocab = len(tiny_tokenizer)
    refit = LengthPredictor.fit(prompts, lens, vocab_size=vocab)
    assert [loaded.predict(p) for p in prompts] == pytest.approx([refit.predict(p) for p in prompts])
    rep = json.loads(report.read_text())
    assert rep["num_pairs"] == 12 and rep["num_test"] == 3 and rep["max_tokens"] == 8
    order = np.random.default_rng(0).permutation(12)
    test, train = order[:3], order[3:]
    held_out = LengthPredictor.fit([prompts[i] for i in train], [lens[i] for i in train],
                                   vocab_size=vocab)
    want = evaluate(held_out, [prompts[i] for i in test], [lens[i] for i in test], 8)
    assert rep["held_out"] == json.loads(json.dumps(want))
    assert rep["held_out"]["max_tokens"]["n"] == 3


def test_train_names_the_bad_line_and_field(tmp_path):
    good = {"prompt_token_ids": [1, 2, 3], "output_len": 5, "vocab_size": 10}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in [good, {"prompt_token_ids": [4]}, good]))
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: missing field 'output_len'"):
        run(["train", str(pairs), "--output", str(tmp_path / "p.npz")])

    pairs.write_text("\n".join(json.dumps(r) for r in [good, {**good, "output_len": "7"}, good]))
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: field 'output_len' must be an integer"):
        run(["train", str(pairs), "--output", str(tmp_path / "p.npz")])

    no_vocab = {k: v for k, v in good.items() if k != "vocab_size"}
    pairs.write_text("\n".join(json.dumps(r) for r in [no_vocab] * 4))
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: no 'vocab_size' field; pass --vocab-size"):
        run(["train", str(pairs), "--output", str(tmp_path / "p.npz")])
    assert run(["train", str(pairs), "--output", str(tmp_path / "p.npz"), "--vocab-size", "10"]) == 0
    assert LengthPredictor.load(tmp_path / "p.npz").vocab_size == 10
    with pytest.raises(ValueError, match="does not cover token id 3"):
        run(["train", str(pairs), "--output", str(tmp_path / "p.npz"), "--vocab-size", "3"])

    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run(["train", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "p.npz")])


def test_collect_rejects_bad_input_before_loading_a_model(tmp_path):
    out = str(tmp_path / "pairs.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        run(["collect", "--dataset-path", str(tmp_path / "nope.jsonl"), "--output", out])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: need a JSON object with \['prompt'\]"):
        run(["collect", "--dataset-path", str(bad), "--output", out])
    with pytest.raises(ValueError, match="max_tokens"):
        run(["collect", "--dataset-path", str(bad), "--output", out, "--max-tokens", "0"])
