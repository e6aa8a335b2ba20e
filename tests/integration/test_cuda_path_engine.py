"""The whole engine on the CUDA path's attention kernels and captured-decode runner, on the
CPU: the worker is given the Triton backend (run by Triton's interpreter) and graphs that
replay by re-running on their static buffers (`EagerGraph`). Greedy tokens and logprobs
must match transformers through chunked prefill, preemption, prefix-cache hits and padded
graph replays; speculative draft trees and an 8-bit cache must give what the CPU backend
gives."""

from __future__ import annotations

import pytest
from test_parity import check_against, hf_reference, random_prompts
from test_prefix_caching import same, tokens_and_logprobs
from test_speculative import NGRAM, repetitive_prompts

from servelm import SamplingParams
from servelm.ops.gpu.backend import TritonPagedAttention
from servelm.worker import worker as worker_module
from servelm.worker.cuda_graphs import EagerGraph


class CountingGraph(EagerGraph):
    replays = 0

    def replay(self) -> None:
        CountingGraph.replays += 1
        super().replay()


@pytest.fixture
def cuda_path(monkeypatch):
    """Engines built in the test run the Triton backend and replay decode graphs."""
    monkeypatch.setattr(worker_module.Worker, "_attention", lambda self, arch, dtype: TritonPagedAttention())
    monkeypatch.setattr(worker_module, "graph_capture", lambda device: CountingGraph)
    CountingGraph.replays = 0


def test_greedy_parity_through_graphs_chunks_preemption_and_prefix_hits(tiny_model_dir, make_llm,
                                                                         cuda_path):
    path = tiny_model_dir("qwen2")
    llm = make_llm(path, block_size=4, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=6)
    assert llm.engine.executor.worker.runner.graphs.sizes == [1, 2, 4, 6]
    prompts = random_prompts(llm.engine.arch.vocab_size, [3, 17, 40, 9, 25, 1, 33])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    refs = hf_reference(path, prompts, 12)
    check_against(llm.generate(inputs, params, use_tqdm=False), refs, lp_tol=1e-4)
    check_against(llm.generate(inputs[:3], params, use_tqdm=False), refs[:3], lp_tol=1e-4)  # cached
    metrics = llm.get_metrics()
    assert metrics["num_preemptions"] > 0 and metrics["prefix_cache_hit_tokens"] > 0
    assert CountingGraph.replays > 0


@pytest.mark.parametrize("options", [
    dict(speculative_config=NGRAM),  # a chain of drafts: rows verified in one chunk
    # draft trees from the first layer: masked rows, and the drafter's own steps
    dict(speculative_config={"method": "layer_skip", "num_layers": 1, "num_speculative_tokens": 2,
                             "tree": [2, 2]}),
    dict(kv_cache_dtype="int8"),
])
def test_same_outputs_as_the_cpu_backend(tiny_model_dir, make_llm, monkeypatch, options):
    path = tiny_model_dir("llama")
    prompts = [{"prompt_token_ids": p} for p in repetitive_prompts(4)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1)
    cpu = make_llm(path, **options).generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(worker_module.Worker, "_attention", lambda self, arch, dtype: TritonPagedAttention())
    monkeypatch.setattr(worker_module, "graph_capture", lambda device: EagerGraph)
    triton = make_llm(path, max_num_seqs=4, **options).generate(prompts, params, use_tqdm=False)
    same(tokens_and_logprobs(triton), tokens_and_logprobs(cpu))


def test_gpu_check_script_runs_on_a_cpu(tmp_path):
    """The GPU check's own code, on a tiny shape on the CPU: it reaches its table, and the
    parity it reports holds."""
    import json
    import subprocess
    import sys

    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, "-m", "servelm.bench.gpu_check", "--device", "cpu",
                           "--shape", "tiny", "--num-prompts", "8", "--output-len", "8",
                           "--hf-batch-sizes", "8", "--result-file", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| throughput, output tok/s |" in done.stdout
    result = json.loads(out.read_text())
    assert result["parity"]["identical"] == result["parity"]["prompts"] == 8
    assert result["servelm"]["decode_tok_s"] > 0 and result["transformers"]["throughput_tok_s"] > 0
