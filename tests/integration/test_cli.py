"""The command line: `servelm generate --json` and `servelm chat` on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

from servelm.cli import main


def test_generate_json(tiny_model_dir, capsys):
    code = main(["generate", "--model", str(tiny_model_dir("llama")), "--max-tokens", "5", "--json", "hello"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "hello" and len(out["token_ids"]) <= 5
    assert out["finish_reason"] in ("stop", "length") and out["e2e_s"] >= out["ttft_s"] >= 0


def test_generate_reports_bad_options(tiny_model_dir, capsys):
    code = main(["generate", "--model", str(tiny_model_dir("llama")), "--temperature", "9", "hi"])
    assert code == 2
    assert "temperature" in capsys.readouterr().err


def test_chat_streams_replies(tiny_model_dir):
    cmd = [sys.executable, "-m", "servelm.cli", "chat", "--model", str(tiny_model_dir("llama")),
           "--max-tokens", "6"]
    proc = subprocess.run(cmd, input="hello\nand again\n\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.split("> ") if line.strip()]
    assert len(replies) == 2
