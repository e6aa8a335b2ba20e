"""Disaggregated prefill/decode and spot replicas in the cluster simulator (issue 20). Each
replica is the real Scheduler and KVCacheManager; a request moves between replicas through
the calls the real engine makes (export: finished at the source, prompt blocks still cached;
import: blocks allocated and adopted, or recomputed), so every request finishes with the
tokens it would have had on one replica, and no replica leaks a KV block."""

from __future__ import annotations

import gc
import json

import pytest

from servelm.cli import main
from servelm.simulate.disagg import KVLink
from servelm.simulate.replica import ReplicaSpec, SimEngineConfig
from servelm.simulate.simulator import Simulation, simulate
from servelm.simulate.spot import SpotOptions
from servelm.simulate.step_model import StepTimeModel
from servelm.simulate.workload import TraceRequest, synthetic

# 10 ms a step, 0.1 ms a prefill token, 1 ms a decode, nothing else
MODEL = StepTimeModel([0.010, 0.0001, 0.001, 0.0, 0.0])
CONFIG = SimEngineConfig(num_kv_blocks=1024, block_size=16, max_model_len=1024)


def disagg(prefill: int = 1, decode: int = 1, spot_p: int = 0, spot_d: int = 0,
           decode_config: SimEngineConfig = CONFIG) -> list[ReplicaSpec]:
    return [ReplicaSpec(MODEL, CONFIG, prefill, "p", "prefill", spot_p),
            ReplicaSpec(MODEL, decode_config, decode, "d", "decode", spot_d)]


def run(specs, trace, **kw):
    sim = Simulation(specs, "least-loaded", True, **kw)
    records, stats = sim.run(trace)
    return sim, records, stats


def assert_clean(sim: Simulation) -> None:
    """No request left on any replica (vanished ones included), no KV block held."""
    for r in {**sim.replicas, **sim.gone}.values():
        kv = r.scheduler.kv
        kv.check_invariants()
        assert not r.scheduler.requests, r.name
        assert kv.num_free_blocks == kv.num_blocks, r.name


def lengths(records) -> list[tuple[float, int, int]]:
    return sorted((round(r.start, 9), r.prompt_len, r.output_len) for r in records)


def workload(n: int = 60, rate: float = 30.0, out: int = 32, seed: int = 1) -> list[TraceRequest]:
    return synthetic("random", n, 64, out, 0.5, rate, 1.0, seed)


def test_disaggregated_output_matches_colocated_and_nothing_leaks():
    trace = workload() + [TraceRequest.of(0.3, list(range(200, 240)), 1)]  # done at its prefill
    _, colo, _ = run([ReplicaSpec(MODEL, CONFIG, 3)], trace)
    sim, records, stats = run(disagg(1, 2), trace)
    assert len(records) == len(trace) and all(r.success for r in records)
    assert lengths(records) == lengths(colo)
    assert stats["num_handovers"] == len(trace) - 1  # the one-token request finished there
    assert stats["requests_by_kind"] == {"p": len(trace), "d": 0}  # arrivals: prefill only
    assert all(sim.replicas[f"d-{i}"].num_steps > 0 for i in range(2))  # least-loaded spreads
    assert stats["num_kv_not_taken"] == stats["recomputed_tokens"] == 0
    assert_clean(sim)


def test_ttft_is_the_prefill_replicas_and_the_transfer_is_charged():
    """64 prompt tokens x 1 MB over 1 GB/s + 2 ms = 66 ms between the first token (at the
    prefill replica) and the second (at the decode replica)."""
    trace = [TraceRequest.of(0.0, list(range(100, 164)), 4)]
    link = KVLink(gbs=1.0, latency_ms=2.0, bytes_per_token=1e6)
    _, (r,), stats = run(disagg(), trace, link=link)
    prefill, decode = 0.010 + 64 * 0.0001, 0.011
    assert r.ttft == pytest.approx(prefill)
    assert r.itl == pytest.approx([0.066 + decode, decode, decode])
    assert r.latency == pytest.approx(prefill + 0.066 + 3 * decode)
    assert stats["mean_kv_transfer_ms"] == pytest.approx(66.0)
    slow, fast = (simulate(workload(), disagg(1, 2), "least-loaded",
                           link=KVLink(gbs, 1.0, 1e6)) for gbs in (2.0, 4.0))
    assert fast["completed"] == slow["completed"] == 60
    assert fast["mean_tpot_ms"] < slow["mean_tpot_ms"]
    assert fast["mean_e2el_ms"] < slow["mean_e2el_ms"]
    assert fast["mean_ttft_ms"] == pytest.approx(slow["mean_ttft_ms"])  # before the move


def test_kv_bytes_per_token_come_from_a_roofline_model():
    from servelm.simulate.disagg import DEFAULT_KV_BYTES_PER_TOKEN, kv_bytes_per_token
    from servelm.simulate.hardware import gpu_spec
    from servelm.simulate.model_shape import model_shape
    from servelm.simulate.roofline import RooflineStepModel

    def roofline(**kw):
        return RooflineStepModel(gpu_spec("h100"), model_shape("llama-3-8b"), **kw)

    # 32 layers x 8 K/V heads x 128 dims x K and V x 2 bytes, split over ranks or not
    assert kv_bytes_per_token(roofline()) == kv_bytes_per_token(roofline(tp=2)) == 131072
    assert kv_bytes_per_token(roofline(kv_dtype="fp8")) == 65536
    assert kv_bytes_per_token(roofline(tp=16, pp=1)) == 2 * 131072  # K/V heads replicated
    assert KVLink().bytes_per_token_of(MODEL) == DEFAULT_KV_BYTES_PER_TOKEN
    assert KVLink(bytes_per_token=10).bytes_per_token_of(roofline()) == 10


def test_kv_that_does_not_fit_at_the_decode_replica_is_recomputed():
    small = SimEngineConfig(num_kv_blocks=8, block_size=16, max_model_len=128)  # one request
    trace = [TraceRequest.of(0.0, list(range(100, 200)), 4),
             TraceRequest.of(0.0, list(range(300, 400)), 4)]
    sim, records, stats = run(disagg(decode_config=small), trace)
    assert [r.output_len for r in records] == [4, 4]
    assert stats["num_kv_not_taken"] == 1 and stats["recomputed_tokens"] == 100
    assert_clean(sim)


def spot_run(recovery: str, grace: float = 0.5, specs=None, **kw):
    specs = specs or [ReplicaSpec(MODEL, CONFIG, 3, "sim", spot=1)]
    return run(specs, workload(90, out=48), spot=SpotOptions([1.0], grace_s=grace,
                                                            recovery=recovery, **kw))


def test_spot_migration_loses_nothing_and_restart_recomputes():
    sim, records, migrated = spot_run("migrate")
    assert len(records) == 90 and all(r.success for r in records)
    assert migrated["replicas_lost"] == 1 and migrated["num_migrations"] > 0
    assert migrated["num_restarted_requests"] == migrated["recomputed_tokens"] == 0
    assert_clean(sim)
    sim, records, restarted = spot_run("restart")
    assert len(records) == 90 and all(r.success for r in records)
    assert lengths(records) == lengths(spot_run("migrate")[1])
    assert restarted["num_migrations"] == 0 and restarted["num_restarted_requests"] > 0
    assert restarted["recomputed_tokens"] > 0
    durations = [sum(r.latency for r in rs) for rs in (spot_run("migrate")[1], records)]
    assert durations[1] > durations[0]  # recomputing and the grace wait cost time
    assert_clean(sim)


@pytest.mark.parametrize("recovery", ["restart", "migrate"])
def test_a_kill_without_grace_still_finishes_everything(recovery):
    specs = [ReplicaSpec(MODEL, CONFIG, 3, "sim", spot=2)]
    sim, records, stats = run(specs, workload(60, out=48),
                              spot=SpotOptions([0.5, 1.0], grace_s=0.0, recovery=recovery))
    assert len(records) == 60 and all(r.success for r in records)
    assert stats["replicas_lost"] == 2 and stats["num_migrations"] == 0  # no time to copy
    assert stats["num_restarted_requests"] > 0
    assert_clean(sim)


def test_spot_decode_and_prefill_replicas_in_a_disaggregated_cluster():
    sim, records, stats = spot_run("migrate", specs=disagg(2, 2, spot_d=1))
    assert all(r.success for r in records) and stats["num_migrations"] > 0
    assert stats["recomputed_tokens"] == 0
    assert_clean(sim)
    # a prefill replica lost with handovers on its link: those K/V are recomputed
    sim, records, stats = spot_run("restart", grace=0.0, specs=disagg(2, 1, spot_p=1))
    assert len(records) == 90 and all(r.success for r in records)
    assert stats["replicas_lost"] == 1
    assert_clean(sim)


def test_with_every_replica_lost_requests_wait_for_a_replacement_or_fail():
    specs = [ReplicaSpec(MODEL, CONFIG, 1, "sim", spot=1)]
    trace = workload(20, rate=10.0)
    _, records, stats = run(specs, trace, spot=SpotOptions([0.5], grace_s=0.1, recovery="restart"))
    assert stats["replicas_lost"] == 1 and len(records) == 20
    assert any(not r.success and "lost" in r.error for r in records)
    sim, records, stats = run(specs, trace, spot=SpotOptions(
        [0.5], grace_s=0.1, recovery="restart", replacement_delay_s=1.0))
    assert all(r.success for r in records) and stats["replicas_joined"] == 1
    assert min(r.start + r.latency for r in records if r.start > 0.5) > 1.6  # after it joined
    assert_clean(sim)


def test_spot_lifetimes_with_replacements():
    specs = [ReplicaSpec(MODEL, CONFIG, 3, "sim", spot=3)]
    spot = SpotOptions(mean_lifetime_s=1.0, grace_s=0.2, replacement_delay_s=0.3, seed=3)
    sim, records, stats = run(specs, workload(90, out=48), spot=spot)
    assert all(r.success for r in records) and stats["replicas_lost"] >= 1
    assert stats["replicas_joined"] >= 1
    assert_clean(sim)


def test_simulate_run_with_roles_and_spot_writes_the_counts(tmp_path):
    profile = tmp_path / "p.json"
    StepTimeModel(MODEL.coefficients, {"engine": {"num_kv_blocks": 256, "block_size": 16,
                                                  "max_model_len": 1024}}).save(profile)
    out = tmp_path / "r.json"
    rc = main(["simulate", "run", "--profile", str(profile), str(profile), "--replicas", "1", "2",
               "--roles", "prefill", "decode", "--spot-replicas", "0", "1",
               "--spot-kill-times", "0.5", "--spot-grace-s", "0.5", "--kv-link-gbs", "10",
               "--num-prompts", "30", "--random-input-len", "64", "--random-output-len", "16",
               "--request-rate", "20", "--result-file", str(out), "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["completed"] == 30 and res["replicas_lost"] == 1 and res["num_handovers"] == 30
    assert [(r["name"], r["role"], r["spot"]) for r in res["replicas"]] == [
        ("p-prefill", "prefill", 0), ("p-decode", "decode", 1)]
    assert res["kv_link"]["gbs"] == 10 and res["spot"]["recovery"] == "migrate"


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "2", "--roles", "prefill"], "--roles: give prefill and decode"),
    (["--roles", "prefill", "decode"], "--roles: give one per --profile"),
    (["--kv-link-gbs", "0"], "--kv-link-gbs must be"),
    (["--kv-link-latency-ms", "-1"], "--kv-link-latency-ms must be"),
    (["--kv-bytes-per-token", "0"], "--kv-bytes-per-token must be"),
    (["--spot-replicas", "1"], "--spot-kill-times or --spot-mean-lifetime-s"),
    (["--replicas", "2", "--spot-replicas", "3", "--spot-kill-times", "1"], "--spot-replicas: 3"),
    (["--spot-kill-times", "1"], "need --spot-replicas"),
    (["--spot-replicas", "1", "--spot-kill-times", "-1"], "--spot-kill-times must be"),
    (["--spot-replicas", "1", "--spot-kill-times", "1", "--spot-grace-s", "-1"], "--spot-grace-s"),
    (["--spot-replicas", "1", "--spot-mean-lifetime-s", "0"], "--spot-mean-lifetime-s must be"),
])
def test_bad_cluster_flags_say_which(tmp_path, capsys, flags, message):
    profile = tmp_path / "p.json"
    StepTimeModel(MODEL.coefficients, {"engine": {"num_kv_blocks": 64}}).save(profile)
    rc = main(["simulate", "run", "--profile", str(profile), "--num-prompts", "2",
               "--random-input-len", "32", "--random-output-len", "4",
               "--result-file", str(tmp_path / "r.json"), "--quiet", *flags])
    assert rc == 2 and message in capsys.readouterr().err


def test_a_run_makes_no_reference_cycles_so_it_can_run_without_the_collector():
    """Simulation.run switches the cyclic garbage collector off (its passes over a million
    records cost a fifth of a large run): that is safe only while what a run drops is freed
    by reference counting. Handovers, migrations, spot losses, failures and prefix caching
    all run here; afterwards, with the simulations still held (a simulation and its
    replicas do refer to each other), the collector finds nothing, and it is on again."""
    gc.collect()
    held = [spot_run("migrate", specs=disagg(2, 2, spot_d=1)),
            spot_run("restart", grace=0.0, specs=disagg(2, 1, spot_p=1)),
            run([ReplicaSpec(MODEL, CONFIG, 1, "sim", spot=1)], workload(20, rate=10.0),
                spot=SpotOptions([0.5], grace_s=0.1, recovery="restart"))]
    routed = Simulation([ReplicaSpec(MODEL, CONFIG, 2)], "prefix-aware")  # prompt trees
    routed.run(workload(60, rate=100.0))
    # round-robin gives one replica every long request; the balancer moves some
    balanced = Simulation([ReplicaSpec(MODEL, CONFIG, 2)], "round-robin", migrate_imbalance=2)
    balanced.run([TraceRequest.of(0.0, list(range(40 * i, 40 * i + 32)), 200 if i % 2 else 4)
                  for i in range(24)])
    assert gc.isenabled()
    assert gc.collect() == 0
    (_, _, moved), (_, _, lost), (_, failed, _) = held
    assert moved["num_handovers"] and moved["num_migrations"] and lost["replicas_lost"] == 1
    assert any(not r.success for r in failed) and balanced.counts["num_migrations"]
