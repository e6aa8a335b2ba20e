"""SamplingParams: defaults, normalization, and one error per invalid value naming its field."""

from __future__ import annotations

import math

import pytest

from servelm.sampling_params import SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.seed is None and p.stop == [] and p.stop_token_ids == []
    assert p.max_tokens == 16 and p.min_tokens == 0 and not p.ignore_eos
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.greedy


def test_normalization() -> None:
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=(3, 4), temperature=1, max_tokens=None)
    assert p.top_k == 0
    assert p.stop == ["###"]
    assert p.stop_token_ids == [3, 4]
    assert isinstance(p.temperature, float)
    assert p.max_tokens is None


@pytest.mark.parametrize("temperature,greedy", [(0.0, True), (1e-6, True), (1e-4, False)])
def test_greedy(temperature: float, greedy: bool) -> None:
    assert SamplingParams(temperature=temperature).greedy is greedy


def test_clone_revalidates_and_copies_lists() -> None:
    p = SamplingParams(stop=["a"], stop_token_ids=[1], seed=5)
    q = p.clone(temperature=0.5)
    assert q.temperature == 0.5 and q.seed == 5 and q.stop == ["a"]
    q.stop.append("b")
    q.stop_token_ids.append(2)
    assert p.stop == ["a"] and p.stop_token_ids == [1]
    with pytest.raises(ValueError, match="temperature"):
        p.clone(temperature=-1)


def test_boundary_values_accepted() -> None:
    SamplingParams(
        n=128,
        temperature=2.0,
        top_p=1e-9,
        top_k=1,
        min_p=1.0,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        repetition_penalty=2.0,
        seed=-(2**63),
        max_tokens=1,
        min_tokens=1,
        logprobs=20,
        prompt_logprobs=0,
    )
    SamplingParams(seed=2**63 - 1, min_tokens=1000, max_tokens=None, stop_token_ids=[0])


INVALID = [
    ("n", 0, r"n must be in \[1, 128\], got 0"),
    ("n", 129, r"n must be in \[1, 128\]"),
    ("n", 1.0, "n must be an integer"),
    ("n", True, "n must be an integer"),
    ("temperature", -0.1, r"temperature must be in \[0, 2\], got -0.1"),
    ("temperature", 3.0, r"temperature must be in \[0, 2\], got 3.0"),
    ("temperature", math.nan, "temperature must be a finite number"),
    ("temperature", math.inf, "temperature must be a finite number"),
    ("temperature", "hot", "temperature must be a number"),
    ("temperature", True, "temperature must be a number"),
    ("temperature", None, "temperature must be a number"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\], got 0.0"),
    ("top_p", 1.01, r"top_p must be in \(0, 1\]"),
    ("top_p", "1", "top_p must be a number"),
    ("top_k", -2, r"top_k must be 0 or -1 .* or in \[1, 2\*\*31 - 1\], got -2"),
    ("top_k", 2**70, r"top_k must be .* got 1180591620717411303424"),
    ("top_k", 2.5, "top_k must be an integer"),
    ("top_k", False, "top_k must be an integer"),
    ("min_p", -0.01, r"min_p must be in \[0, 1\]"),
    ("min_p", 1.5, r"min_p must be in \[0, 1\]"),
    ("presence_penalty", -2.5, r"presence_penalty must be in \[-2, 2\]"),
    ("presence_penalty", 2.5, r"presence_penalty must be in \[-2, 2\]"),
    ("frequency_penalty", 3, r"frequency_penalty must be in \[-2, 2\]"),
    ("frequency_penalty", "x", "frequency_penalty must be a number"),
    ("repetition_penalty", 0.0, r"repetition_penalty must be in \(0, 2\], got 0.0"),
    ("repetition_penalty", 2.1, r"repetition_penalty must be in \(0, 2\]"),
    ("repetition_penalty", -1.0, r"repetition_penalty must be in \(0, 2\]"),
    ("seed", 2**63, "seed must be in"),
    ("seed", -(2**63) - 1, "seed must be in"),
    ("seed", 1.5, "seed must be an integer"),
    ("seed", True, "seed must be an integer"),
    ("stop", "", "stop must not contain empty strings"),
    ("stop", ["a", ""], "stop must not contain empty strings"),
    ("stop", ["a", 3], "stop must contain only strings"),
    ("stop", 5, "stop must be a string or a list of strings"),
    ("stop_token_ids", [1, -1], "stop_token_ids must be non-negative"),
    ("stop_token_ids", [1.0], "stop_token_ids must be an integer"),
    ("stop_token_ids", [True], "stop_token_ids must be an integer"),
    ("stop_token_ids", 7, "stop_token_ids must be a list of integers"),
    ("ignore_eos", 1, "ignore_eos must be a boolean"),
    ("max_tokens", 0, "max_tokens must be >= 1 or None, got 0"),
    ("max_tokens", -5, "max_tokens must be >= 1 or None"),
    ("max_tokens", 10.0, "max_tokens must be an integer"),
    ("min_tokens", -1, "min_tokens must be >= 0, got -1"),
    ("min_tokens", 17, r"min_tokens must be <= max_tokens \(16\), got 17"),
    ("min_tokens", "3", "min_tokens must be an integer"),
    ("logprobs", -1, r"logprobs must be in \[0, 20\], got -1"),
    ("logprobs", 21, r"logprobs must be in \[0, 20\], got 21"),
    ("logprobs", True, "logprobs must be an integer"),
    ("prompt_logprobs", 21, r"prompt_logprobs must be in \[0, 20\]"),
    ("prompt_logprobs", -1, r"prompt_logprobs must be in \[0, 20\]"),
    ("skip_special_tokens", "yes", "skip_special_tokens must be a boolean"),
    ("include_stop_str_in_output", None, "include_stop_str_in_output must be a boolean"),
]


@pytest.mark.parametrize("field,value,message", INVALID, ids=[f"{f}={v!r}" for f, v, _ in INVALID])
def test_invalid_values_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("changes,message", [
    ({"stop": ["s"] * 257}, "stop has 257 strings; the limit is 256"),
    ({"stop": "x" * 1025}, "at most 1024 characters"),
    ({"logit_bias": {i: 0.0 for i in range(1025)}}, "logit_bias has 1025 entries; the limit is 1024"),
    ({"structured_outputs": {"grammar": "r" * 100_001}}, "the limit is 100000"),
])
def test_absurd_sizes_are_refused_with_the_limit(changes, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**changes)
