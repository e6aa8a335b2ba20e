"""The server's own counters around a run, from Prometheus text as servelm's /metrics writes it."""

from __future__ import annotations

import pytest

from servelm.bench.server_counters import counter_deltas, counter_notes, parse_metrics

HEAD = """# HELP servelm:prefix_cache_hits_total Prompt tokens found in the prefix cache.
# TYPE servelm:prefix_cache_hits_total counter
"""


def replicas(hits0, hits1, queries0, queries1, routed0, routed1, retried=0, failed=0,
             preempted=0) -> str:
    m = 'model="llama-30m",replica="llama-30m-{}"'
    return HEAD + f"""servelm:prefix_cache_hits_total{{{m.format(0)}}} {hits0}
servelm:prefix_cache_hits_total{{{m.format(1)}}} {hits1}
servelm:prefix_cache_queries_total{{{m.format(0)}}} {queries0}
servelm:prefix_cache_queries_total{{{m.format(1)}}} {queries1}
servelm:prompt_tokens_total{{{m.format(0)}}} 999.0
servelm:router_requests_routed_total{{{m.format(1)}}} {routed1}
servelm:router_requests_routed_total{{{m.format(0)}}} {routed0}
servelm:router_requests_retried_total{{model="llama-30m"}} {retried}
servelm:router_requests_failed_total{{model="llama-30m"}} {failed}
servelm:num_preemptions_total{{{m.format(0)}}} {preempted}
servelm:num_preemptions_total{{{m.format(1)}}} 4
"""


def test_parse_keeps_names_labels_and_values():
    samples = parse_metrics(HEAD + 'servelm:x_total{a="1",b="q\\"uote, x"} 2.5\n'
                            "servelm:y 3e2\nbad line\n\n")
    assert samples == {("servelm:x_total", (("a", "1"), ("b", 'q\\"uote, x'))): 2.5,
                       ("servelm:y", ()): 300.0}


def test_deltas_sum_the_replicas_and_count_requests_per_replica():
    before = parse_metrics(replicas(10, 0, 100, 50, 3, 2, retried=1))
    after = parse_metrics(replicas(70, 30, 200, 150, 8, 9, retried=3, failed=1, preempted=6))
    d = counter_deltas(before, after)
    assert d["prefix_cache_hit_tokens"] == 90 and d["prefix_cache_query_tokens"] == 200
    assert d["prefix_cache_hit_rate"] == pytest.approx(0.45)
    assert d["requests_per_replica"] == {"llama-30m-0": 5, "llama-30m-1": 7}
    assert d["requests_retried"] == 2 and d["requests_failed"] == 1
    assert d["num_preemptions"] == 6  # replica 1's 4 were there before
    notes = counter_notes("servelm-replicas-prefix-aware rate inf", d)
    assert notes == ["servelm-replicas-prefix-aware rate inf: prefix-cache hit rate 45.0% "
                     "(90 of 200 prompt tokens, server counters)",
                     "servelm-replicas-prefix-aware rate inf: requests per replica "
                     "llama-30m-0 5, llama-30m-1 7",
                     "servelm-replicas-prefix-aware rate inf: router retried 2, failed 1 "
                     "(server counters)"]


def test_a_restarted_replica_counts_from_zero():
    before = parse_metrics(replicas(500, 0, 900, 0, 5, 5))
    after = parse_metrics(replicas(40, 20, 60, 40, 9, 6))  # replica 0 killed and restarted
    d = counter_deltas(before, after)
    assert d["prefix_cache_hit_tokens"] == 60 and d["prefix_cache_query_tokens"] == 100


def test_a_single_engine_has_hit_rate_only_and_other_servers_nothing():
    plain = "servelm:prefix_cache_hits_total {}\nservelm:prefix_cache_queries_total {}\n"
    d = counter_deltas(parse_metrics(plain.format(0, 0)), parse_metrics(plain.format(30, 40)))
    assert d == {"prefix_cache_hit_tokens": 30, "prefix_cache_query_tokens": 40,
                 "prefix_cache_hit_rate": pytest.approx(0.75)}
    idle = counter_deltas(parse_metrics(plain.format(5, 5)), parse_metrics(plain.format(5, 5)))
    assert idle["prefix_cache_hit_rate"] is None and "- (0 of 0" in counter_notes("x", idle)[0]
    llama = parse_metrics("llamacpp:prompt_tokens_total 12\n")
    assert counter_deltas(llama, llama) == {} and counter_deltas(None, None) == {}
    assert counter_notes("x", {}) == []
