"""LengthPredictor: learns which prompt tokens mean long outputs, saves, loads, refuses misuse."""

from __future__ import annotations

import numpy as np
import pytest

from servelm.engine.length_metrics import length_metrics, pairwise_accuracy, rankdata, spearman
from servelm.engine.length_predictor import LengthPredictor, evaluate

VOCAB = 1000
# Each task is a 3-token instruction with its own typical output length (4 to 400 tokens);
# the rest of the prompt is random filler of random length, unrelated to the output.
TASKS = [list(range(10 + 3 * t, 13 + 3 * t)) for t in range(12)]
TASK_LEN = np.geomspace(4, 400, len(TASKS))


def synthetic(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(seed)
    prompts, lens = [], []
    for _ in range(n):
        t = int(rng.integers(len(TASKS)))
        filler = rng.integers(100, VOCAB, int(rng.integers(5, 60))).tolist()
        prompts.append([1, *TASKS[t], *filler])
        lens.append(int(max(1, round(TASK_LEN[t] * np.exp(rng.normal(0, 0.25))))))
    return prompts, lens


@pytest.fixture(scope="module")
def trained() -> LengthPredictor:
    return LengthPredictor.fit(*synthetic(300, seed=0), vocab_size=VOCAB)


def test_learns_the_ranking_and_beats_the_baselines(trained):
    prompts, lens = synthetic(200, seed=1)
    m = evaluate(trained, prompts, lens, max_tokens=512)
    assert set(m) == {"predictor", "prompt_length", "train_mean", "max_tokens"}
    assert m["predictor"]["pairwise_accuracy"] > 0.8
    assert m["predictor"]["spearman"] > 0.8
    for base in ("prompt_length", "train_mean", "max_tokens"):
        assert m["predictor"]["pairwise_accuracy"] > m[base]["pairwise_accuracy"] + 0.2
        assert m["predictor"]["mae_tokens"] < m[base]["mae_tokens"]
    assert m["max_tokens"]["pairwise_accuracy"] == 0.5 == m["train_mean"]["pairwise_accuracy"]
    assert m["max_tokens"]["spearman"] == 0.0
    assert m["max_tokens"]["mae_tokens"] == pytest.approx(np.mean(np.abs(512 - np.array(lens))))


def test_save_load_round_trip(trained, tmp_path):
    path = tmp_path / "sub" / "predictor.npz"
    trained.save(path)
    loaded = LengthPredictor.load(path)
    assert loaded.path == str(path) and loaded.vocab_size == VOCAB
    for p in synthetic(20, seed=2)[0]:
        assert loaded.predict(p) == trained.predict(p)
        assert loaded.predict_from_length(len(p)) == trained.predict_from_length(len(p))
    assert not list(tmp_path.glob("sub/*.tmp"))


@pytest.mark.parametrize("content", [b"", b"not an npz at all", b"PK\x03\x04broken zip"])
def test_load_rejects_corrupt_files_naming_them(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.npz"):
        LengthPredictor.load(path)


def test_load_rejects_other_npz_and_other_versions(trained, tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz is not a servelm length predictor"):
        LengthPredictor.load(other)
    good = tmp_path / "good.npz"
    trained.save(good)
    with np.load(good) as z:
        fields = {k: z[k] for k in z.files}
    newer = tmp_path / "newer.npz"
    np.savez(newer, **{**fields, "format_version": 99})
    with pytest.raises(ValueError, match="newer.npz has length predictor format 99"):
        LengthPredictor.load(newer)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        LengthPredictor.load(tmp_path / "missing.npz")


def test_check_vocab(trained, tmp_path):
    trained.check_vocab(VOCAB)
    path = tmp_path / "p.npz"
    trained.save(path)
    loaded = LengthPredictor.load(path)
    with pytest.raises(ValueError, match=f"length predictor {path} was trained for a tokenizer "
                                         f"with {VOCAB} tokens, the model has 49152"):
        loaded.check_vocab(49152)


def test_predict_on_edge_prompts(trained):
    for prompt in ([], [0], [VOCAB - 1] * 5, list(range(VOCAB)) * 20):
        y = trained.predict(prompt)
        assert np.isfinite(y) and 1.0 <= y <= trained.max_output_len
    assert trained.predict(np.arange(50)) == trained.predict(list(range(50)))


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="2 prompts but 1"):
        LengthPredictor.fit([[1], [2]], [3], vocab_size=10)
    with pytest.raises(ValueError, match="at least 2"):
        LengthPredictor.fit([[1]], [3], vocab_size=10)
    with pytest.raises(ValueError, match="power of two"):
        LengthPredictor.fit([[1], [2]], [3, 4], vocab_size=10, buckets=1000)
    with pytest.raises(ValueError, match=">= 0"):
        LengthPredictor.fit([[1], [2]], [3, -1], vocab_size=10)


def test_constant_lengths_give_a_constant_prediction():
    p = LengthPredictor.fit([[1, 2], [3, 4, 5], [6]], [7, 7, 7], vocab_size=10)
    assert p.predict([9, 9]) == pytest.approx(7.0)


def test_metrics_against_hand_computed_values():
    np.testing.assert_array_equal(rankdata(np.array([10.0, 20.0, 10.0, 5.0])), [2.5, 4, 2.5, 1])
    truth = np.array([1.0, 2.0, 3.0, 3.0])
    # pairs with different truths: 5; (0,1) right, (0,2) right, (0,3) right, (1,2) wrong,
    # (1,3) tied prediction -> half
    acc, pairs = pairwise_accuracy(np.array([1.0, 5.0, 4.0, 5.0]), truth)
    assert pairs == 5 and acc == pytest.approx(3.5 / 5)
    assert pairwise_accuracy(np.ones(4), truth) == (0.5, 5)
    assert pairwise_accuracy(np.arange(3.0), np.ones(3)) == (None, 0)
    assert spearman(np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(-1.0)
    assert spearman(np.ones(3), np.arange(3.0)) == 0.0 and spearman(np.arange(3.0), np.ones(3)) is None
    m = length_metrics([2.0, 4.0], [1.0, 8.0])
    assert m["mae_tokens"] == 2.5 and m["median_rel_error"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["pairwise_accuracy"] == 1.0 and m["n"] == 2
