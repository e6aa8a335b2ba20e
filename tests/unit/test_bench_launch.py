"""`bench serve --launch` variants start the same servelm server with one option changed."""

from __future__ import annotations

import pytest

from servelm.bench.launch import LaunchSpec, server_command
from servelm.cli import build_parser


def engine_options(system: str, **spec) -> dict:
    cmd = server_command(system, LaunchSpec(model="m.gguf", **spec), 1234)
    serve = cmd.index("serve")
    args = build_parser().parse_args(cmd[serve:])  # the flags must be real `serve` flags
    return vars(args)


def test_variants_change_one_engine_option():
    spec = dict(kv_cache_memory_gb=0.25, max_num_seqs=4, preemption_mode="swap")
    base = engine_options("servelm", **spec)
    assert base["kv_cache_memory_gb"] == 0.25 and base["max_num_seqs"] == 4
    assert base["preemption_mode"] == "swap"
    assert base["model"] == ["m.gguf"] and base["port"] == 1234
    for system, key, value in (("servelm-no-prefix-cache", "enable_prefix_caching", False),
                               ("servelm-cpu-offload", "cpu_offload_gb", 4.0),
                               ("servelm-sjf", "scheduling_policy", "sjf")):
        variant = engine_options(system, **spec)
        assert {k for k in base if base[k] != variant[k]} == {key} and variant[key] == value
    learned = engine_options("servelm-sjf-learned", length_predictor="p.npz")
    assert learned["scheduling_policy"] == "sjf" and learned["length_predictor"] == "p.npz"
    with pytest.raises(ValueError, match="--launch-length-predictor"):
        server_command("servelm-sjf-learned", LaunchSpec(), 1)


def test_a_parallel_server_shares_the_threads_among_its_ranks():
    split = engine_options("servelm", num_threads=4, tensor_parallel_size=2)
    assert split["tensor_parallel_size"] == 2 and split["pipeline_parallel_size"] == 1
    assert split["num_threads"] == 2
    assert engine_options("servelm", num_threads=2)["tensor_parallel_size"] == 1


def test_unknown_system_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed .*servelm-cpu-offload"):
        server_command("vllm", LaunchSpec(), 1)


def test_llama_server_runs_the_same_file_and_threads_with_its_slots(tmp_path, monkeypatch):
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cmd = server_command("llama-server", LaunchSpec(model=str(gguf), num_threads=3, max_model_len=512,
                                                    llama_server=str(binary)), 1234)
    assert cmd[0] == str(binary)
    flag = {cmd[i]: cmd[i + 1] for i in range(1, len(cmd) - 1) if cmd[i].startswith("-")}
    assert flag["-m"] == str(gguf) and flag["--port"] == "1234" and flag["--host"] == "127.0.0.1"
    assert flag["-t"] == flag["-tb"] == "3" and flag["-np"] == "32" and flag["-c"] == str(512 * 32)
    monkeypatch.delenv("SERVELM_LLAMA_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="--launch-llama-server"):
        server_command("llama-server", LaunchSpec(model=str(gguf)), 1)


def test_replica_systems_share_the_threads_and_reserve_them_on_ray():
    from servelm.cluster.router import POLICIES

    for policy in POLICIES:
        args = engine_options(f"servelm-replicas-{policy}", num_threads=4, replicas=2)
        assert args["replicas"] == 2 and args["router"] == policy
        assert args["num_threads"] == 2 and args["replica_cpus"] == 2.0
        assert args["min_replicas"] is None and args["max_replicas"] is None
    single = engine_options("servelm", num_threads=4, replicas=2)  # one engine, every thread
    assert single["replicas"] is None and single["num_threads"] == 4
    odd = engine_options("servelm-replicas", num_threads=3, replicas=4, router="least-loaded")
    assert odd["router"] == "least-loaded" and odd["num_threads"] == 1 and odd["replica_cpus"] == 1.0
    tp = engine_options("servelm-replicas-round-robin", num_threads=8, replicas=2,
                        tensor_parallel_size=2)
    assert tp["num_threads"] == 2 and tp["replica_cpus"] == 2.0 and tp["tensor_parallel_size"] == 2


def test_a_replica_system_passes_autoscaling_bounds():
    args = engine_options("servelm-replicas", replicas=1, min_replicas=0, max_replicas=1,
                          downscale_delay_s=3.0)
    assert (args["min_replicas"], args["max_replicas"], args["downscale_delay_s"]) == (0, 1, 3.0)


def test_launch_replicas_needs_a_replica_system():
    from servelm.bench.serve import ServeConfig, validate

    validate(ServeConfig(launch=["servelm", "servelm-replicas-prefix-aware"],
                         launch_spec=LaunchSpec(replicas=2)))
    with pytest.raises(ValueError, match="--launch-replicas applies to --launch servelm-replicas"):
        validate(ServeConfig(launch=["servelm"], launch_spec=LaunchSpec(replicas=2)))
