"""sjf's remaining-length estimate: max_tokens without a predictor; a learned prediction
that is doubled (never past max_tokens) each time the request outlives it."""

from __future__ import annotations

from servelm.engine.policies import Policy
from servelm.engine.request import Request
from servelm.sampling_params import SamplingParams


class FixedPredictor:
    def __init__(self, n: float) -> None:
        self.n = n

    def predict(self, prompt_token_ids) -> float:
        return self.n


def request(max_tokens: int) -> Request:
    return Request("r", [1, 2, 3], SamplingParams(max_tokens=max_tokens), (), 1000)


def test_without_predictor_the_estimate_is_max_tokens():
    r = request(50)
    r.predicted_output_len = Policy("sjf").predict_output_len(r)
    assert Policy("sjf").remaining(r) == 50


def test_outlived_prediction_doubles_up_to_max_tokens():
    policy = Policy("sjf", predictor=FixedPredictor(10))
    r = request(100)
    r.predicted_output_len = policy.predict_output_len(r)
    assert policy.remaining(r) == 10
    for _ in range(12):
        r.append_token(7)
    assert policy.remaining(r) == 20 - 12  # outlived 10: now expected to reach 20
    for _ in range(70):
        r.append_token(7)
    assert policy.remaining(r) == 100 - 82  # 20 -> 40 -> 80 -> capped at max_tokens
    assert policy.predict_output_len(request(5)) == 5  # capped at arrival too
