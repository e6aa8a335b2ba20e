"""The shared benchmark harness: plain-text tables, flag lists, and the optional `bench` extra
(a benchmark that needs a missing module says how to install it, in one line)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import servelm
from servelm.bench.harness import MissingExtra, Table, agreement, listed, pyplot
from servelm.cli import main


def test_table_aligns_labels_left_and_numbers_right():
    table = Table("title", ["system", "tok/s"], [["servelm", "12.5"]])
    table.add_row("transformers", "3.0")
    assert str(table).splitlines() == ["title",
                                       "system        tok/s",
                                       "------------  -----",
                                       "servelm        12.5",
                                       "transformers    3.0"]


def test_listed_flag_values_and_agreement():
    ints = listed(int, "positive integers", lambda v: v >= 1)
    assert ints("8, 16,32") == [8, 16, 32]
    for bad in ("", "0,4", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integers"):
            ints(bad)
    assert agreement([[1, 2], [3], [4]], [[1, 2], [3, 0], [4]]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):  # different request counts are a bug, not a 0
        agreement([[1]], [[1], [2]])


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tiny_model_dir, capsys, port: int, *extra: str) -> int:
    tokenizer = str(tiny_model_dir("llama"))
    capsys.readouterr()  # building the tiny model writes progress bars
    return main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--quiet",
                 "--tokenizer", tokenizer, "--num-prompts", "1", *extra])


@pytest.mark.parametrize("missing", ["aiohttp", "matplotlib"])
def test_bench_serve_without_the_extra_says_how_to_install_it(missing, monkeypatch, capsys,
                                                              tiny_model_dir, unused_port):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` fail
    assert _serve(tiny_model_dir, capsys, unused_port) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("error: servelm bench serve needs " + missing
                   + ", not installed: pip install 'servelm[bench]'\n")


def test_bench_serve_without_plots_needs_no_matplotlib(monkeypatch, capsys, tiny_model_dir,
                                                       unused_port):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert _serve(tiny_model_dir, capsys, unused_port, "--no-plots") == 1  # past the check: no server
    assert "/v1/models" in capsys.readouterr().err


def test_plots_without_matplotlib_raise_missing_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtra, match=r"^plotting needs matplotlib, not installed: "
                                           r"pip install 'servelm\[bench\]'$"):
        pyplot()


def test_help_imports_no_benchmark_dependency():
    code = ("import sys; from servelm.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('aiohttp', 'matplotlib', 'rich') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(Path(servelm.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120, env=env).stdout
    assert out.strip() == "[]"
