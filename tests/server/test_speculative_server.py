"""A server started with --speculative-config (prompt lookup, or a layer-skip token tree)
answers exactly like one without it (greedy, checked with the official openai client),
counts drafts in /metrics, and takes the per-request num_speculative_tokens field."""

from __future__ import annotations

import urllib.request

import openai
import pytest
from test_edges import post

PROMPT = "the cat sat on the mat and the cat sat on the mat and the cat sat on the"


@pytest.mark.parametrize("config", [
    {"method": "ngram", "num_speculative_tokens": 3},
    {"method": "layer_skip", "num_layers": 1, "tree": [2, 1]},
], ids=lambda c: c["method"])
def test_speculative_server_matches_plain_server(make_server, server, config):
    spec = make_server(speculative_config=config)
    texts = []
    for live in (spec, server):
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24,
                                        temperature=0, extra_body={"ignore_eos": True})
        texts.append(out.choices[0].text)
    assert texts[0] == texts[1]
    with urllib.request.urlopen(spec.url + "/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    drafts = [line for line in metrics.splitlines()
              if line.startswith("servelm:spec_decode_num_draft_tokens_total")]
    assert drafts and float(drafts[0].split()[1]) > 0

    code, payload, _ = post(spec.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4,
                                                           "num_speculative_tokens": 0})
    assert code == 200 and payload["choices"]
    code, payload, _ = post(spec.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4,
                                                           "num_speculative_tokens": -2})
    assert code == 400 and "num_speculative_tokens" in payload["error"]["message"]
