"""The captured-decode bookkeeping (worker/cuda_graphs.py) on the CPU: `EagerGraph` replays
by re-running the function on the graph's static buffers, so padding, bucketing and the
scratch slot are checked against an eager forward pass with the real (interpreted) Triton
attention kernels."""

from __future__ import annotations

import torch

from servelm.model.batch import SeqChunk, build_step_batch
from servelm.model.loader import load_model
from servelm.model.registry import build_model
from servelm.ops.attention import attention_context
from servelm.ops.gpu.backend import TritonPagedAttention
from servelm.worker.cache_engine import CacheEngine
from servelm.worker.cuda_graphs import DecodeGraphs, EagerGraph, capture_sizes

BS, NUM_BLOCKS = 4, 12
SCRATCH = NUM_BLOCKS  # the one block past the engine's


class RecordingGraph(EagerGraph):
    captured: list[int] = []

    def __init__(self, run, pool):
        super().__init__(run, pool)
        RecordingGraph.captured.append(len(self.out))


def _setup(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")), torch.float32, with_tokenizer=False)
    model = build_model(loaded.arch, loaded.weights, TritonPagedAttention(), torch.float32, 64)
    cache = CacheEngine(loaded.arch, BS, torch.float32, "auto", NUM_BLOCKS + 1, 0, 0, None)
    for i, layer in enumerate(model.layers):
        layer.attn.kv_cache = cache.kv.layer(i)
    return model, cache


def _eager(model, chunks, tables):
    batch = build_step_batch(chunks, tables, BS, torch.float32, False, True)
    with attention_context(batch.attn):
        return batch, model(batch.input_ids, batch.positions)


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(1000)[-3:] == [240, 248, 256]


def test_replayed_decodes_match_eager_and_pad_into_the_scratch_block(tiny_model_dir):
    model, cache = _setup(tiny_model_dir)
    tables = [[3, 0], [5, 7, 1], [2, 9, 10, 4]]
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12, 13, 14], [15] * 14]
    _eager(model, [SeqChunk(p, 0) for p in prompts], tables)
    RecordingGraph.captured = []
    graphs = DecodeGraphs(model, [1, 2, 4], 64, BS, SCRATCH, torch.device("cpu"), RecordingGraph)
    assert RecordingGraph.captured == [4, 2, 1]  # the largest first
    assert graphs.bucket(3) == 4 and graphs.bucket(5) is None

    decodes = [SeqChunk([20], 5), SeqChunk([21], 9), SeqChunk([22], 14)]
    batch, eager = _eager(model, decodes, tables)  # writes the new K/V; a replay rewrites the same
    cache.kv.values[:, :, SCRATCH * BS:].fill_(7.0)  # to see the padding row write there
    before = cache.kv.values.clone()
    replayed = graphs.run(batch)
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
    # The replay rewrites the real rows' K/V (equal up to rounding: torch's float32 matmul may
    # round a row differently in a batch of 4 than of 3) and writes nothing else but the
    # padding row's one slot.
    moved = ~torch.isclose(cache.kv.values, before, rtol=1e-5, atol=1e-5)
    changed = moved.flatten(3).any(-1).any(1).any(0)  # per slot
    assert changed.nonzero().flatten().tolist() == [SCRATCH * BS]

    # Two rows after three: the size-2 graph, over buffers the larger step wrote to.
    batch, eager = _eager(model, [SeqChunk([23], 15), SeqChunk([24], 6)], [tables[2], tables[0]])
    torch.testing.assert_close(graphs.run(batch), eager, rtol=1e-5, atol=1e-5)
    assert graphs.context_lens[:2].tolist() == [7, 16]  # sorted by length, as batches are


def test_steps_a_graph_cannot_run_go_eager(tiny_model_dir):
    model, _ = _setup(tiny_model_dir)
    graphs = DecodeGraphs(model, [1, 2], 64, BS, SCRATCH, torch.device("cpu"), EagerGraph)
    tables = [[0], [1], [2]]
    with_prefill = build_step_batch([SeqChunk([1], 2), SeqChunk([1, 2], 0)], tables[:2], BS,
                                    torch.float32, False, True)
    too_many = build_step_batch([SeqChunk([1], 2)] * 3, tables, BS, torch.float32, False, True)
    assert graphs.run(with_prefill) is None and graphs.run(too_many) is None
