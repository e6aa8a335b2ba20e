"""Fuzzing the published OpenAPI schema with schemathesis against a live server on a tiny
model: valid and invalid bodies for every route, a bounded number of examples each. No 5xx,
every answer conforms to the schema (status, content type, body), the server answers
afterwards, and no KV block is left behind."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from leaks import assert_no_leaks
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from servelm.server.guards import ServerOptions

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def fuzzed(make_server):
    # A short context keeps each generated request cheap; a small body limit lets 413 happen.
    return make_server(ServerOptions(max_body_bytes=64 * 1024), max_model_len=64)


@pytest.fixture(scope="module")
def api_schema(fuzzed):
    return schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")


# Every route the schema publishes (test_every_route_is_fuzzed keeps this list whole).
ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
          ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/health"), ("GET", "/version"),
          ("GET", "/metrics"), ("GET", "/admin/requests"), ("POST", "/admin/migrate")]


def test_every_route_is_fuzzed(api_schema):
    published = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert published == set(ROUTES)


# Valid bodies, and invalid ones for the routes that take any input.
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in ROUTES] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in ROUTES if m == "POST"]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_request_breaks_the_server(api_schema, method, path, mode):
    operation = api_schema[path][method]
    strategy = operation.as_strategy(mode)
    if mode == GenerationMode.POSITIVE:  # the schema's own examples: whole valid requests
        strategy = st.one_of(strategy, *operation.get_strategies_from_examples())

    @given(case=strategy)
    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def call(case):
        case.call_and_validate(checks=CHECKS, timeout=60)

    call()


def test_the_server_still_answers_and_holds_no_kv(fuzzed):
    body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 4}).encode()
    req = urllib.request.Request(fuzzed.url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        out = json.load(resp)
    assert out["choices"][0]["finish_reason"] in ("length", "stop")
    assert_no_leaks(fuzzed.llm.engine)


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/v1/completions", b"{not json", 400),
    ("GET", "/v1/no-such-route", None, 404),
    ("DELETE", "/v1/completions", None, 405),
])
def test_framework_errors_have_openai_shape(fuzzed, method, path, body, status):
    req = urllib.request.Request(fuzzed.url + path, data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == status
    assert set(json.load(err.value)["error"]) == {"message", "type", "param", "code"}
