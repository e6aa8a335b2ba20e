"""`servelm serve`'s cluster flags and models-config file: which models with which replica
counts, and clear errors for what is not allowed."""

from __future__ import annotations

import json

import pytest

from servelm.cli import build_parser
from servelm.cluster.options import cluster_options, model_specs, wants_cluster
from servelm.engine_args import engine_kwargs


def parse(*argv: str):
    args = build_parser().parse_args(["serve", *argv])
    return args, engine_kwargs(args)


def test_plain_serve_is_not_a_cluster():
    args, _ = parse("--model", "m")
    assert not wants_cluster(args)
    for flags in (["--replicas", "2"], ["--min-replicas", "0"], ["--model", "a", "--model", "b"]):
        assert wants_cluster(parse(*flags)[0])


def test_repeated_models_share_the_counts(tmp_path):
    args, engine = parse("--model", str(tmp_path / "a"), "--model", str(tmp_path / "b"),
                         "--replicas", "2", "--max-replicas", "3", "--block-size", "8")
    a, b = model_specs(args, engine)
    assert (a.name, b.name) == (str(tmp_path / "a"), str(tmp_path / "b"))
    assert a.engine["block_size"] == 8 and b.engine["model"] == str(tmp_path / "b")
    scale = a.autoscale(cluster_options(args))
    assert (a.initial_replicas, scale.min_replicas, scale.max_replicas) == (2, 2, 3)


def test_config_file_gives_each_model_its_own_counts(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [
        {"model": "a", "name": "small", "replicas": 2, "router": "round-robin"},
        {"model": "b", "min_replicas": 0, "max_replicas": 2, "engine": {"block_size": 4}}]}))
    small, b = model_specs(*parse("--models-config", str(path), "--block-size", "8"))
    assert (small.name, small.router, small.initial_replicas) == ("small", "round-robin", 2)
    assert b.engine["block_size"] == 4 and b.initial_replicas == 1  # starts one, may go to 0
    assert b.autoscale(cluster_options(parse()[0])).min_replicas == 0


@pytest.mark.parametrize("entry, message", [
    ({"model": "a", "replica": 2}, "unknown keys \\['replica'\\]"),
    ({"model": "a", "engine": {"blocksize": 4}}, "unknown options \\['blocksize'\\]"),
    ({"model": "a", "min_replicas": 3, "max_replicas": 1}, "max_replicas"),
    ({"model": "a", "router": "random"}, "router must be one of"),
    ({"model": "a", "engine": {"block_size": 0}}, "block_size"),
])
def test_bad_config_entries_are_named(tmp_path, entry, message):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [entry]}))
    with pytest.raises(ValueError, match=message):
        model_specs(*parse("--models-config", str(path)))


def test_duplicate_names_are_refused(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps([{"model": "a", "name": "x"}, {"model": "b", "name": "x"}]))
    with pytest.raises(ValueError, match="names must differ"):
        model_specs(*parse("--models-config", str(path)))
