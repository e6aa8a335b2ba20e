"""The device path without a GPU: the forward pass, the cache moves and the captured-graph
runner run on torch's "meta" device, which computes shapes only and raises on most ops that
mix its tensors with ones left on the CPU (a fake DEVICE device cannot be indexed from Python
in a CPU-only torch). The Triton kernels enter as operators with shape-only versions
(ops/gpu/custom_ops.py); their numbers are tested in test_gpu_attention.py and
test_gpu_qmatmul.py."""

from __future__ import annotations

import pytest
import torch

from servelm.config import EngineConfig
from servelm.model.batch import SeqChunk, build_step_batch
from servelm.model.loader import compute_dtype, load_model
from servelm.model.registry import build_model
from servelm.ops.attention import attention_context
from servelm.ops.gpu.backend import TritonPagedAttention
from servelm.ops.quant import KERNELS, BlockQ4, BlockQ8
from servelm.speculative.tree import DraftTree
from servelm.worker.cache_engine import CacheEngine
from servelm.worker.cuda_graphs import DecodeGraphs, EagerGraph
from servelm.worker.device import kv_blocks_for_memory, resolve_device, weights_to

BS = 4
DEVICE = torch.device("meta")  # stands in for "cuda"


def _batch_chunks() -> tuple[list[SeqChunk], list[list[int]]]:
    """Two decodes, a fresh prompt, a chunk after a cached prefix, and a draft tree."""
    tree = DraftTree.static((2, 1), 2)  # root, two children, one grandchild each: 5 rows
    nodes = range(tree.size + 1)
    chunks = [SeqChunk([5], 6), SeqChunk([7], 13), SeqChunk([1, 2, 3, 4, 5], 0), SeqChunk([9] * 3, 8),
              SeqChunk([3, 4, 5, 6, 7], 10, tree.positions(10, nodes), tree.mask(10, nodes))]
    tables = [[0, 1], [2, 3, 4, 5], [6, 7], [8, 9, 10], [11, 12, 13, 14]]
    return chunks, tables


@pytest.mark.parametrize("quantization,kv", [("none", "bfloat16"), ("int8", "int8"), ("int4", "fp8")])
def test_forward_and_cache_moves_stay_on_the_device(tiny_model_dir, monkeypatch, quantization, kv):
    for cls in (BlockQ8, BlockQ4):  # CUDA's quantized matmuls, on the stand-in device
        monkeypatch.setitem(KERNELS, ("meta", cls), KERNELS[("cuda", cls)])
    loaded = load_model(str(tiny_model_dir("qwen3")), torch.bfloat16, with_tokenizer=False)
    arch = loaded.arch
    model = build_model(arch, weights_to(loaded.weights, DEVICE), TritonPagedAttention(),
                        torch.bfloat16, 64, device=DEVICE)
    if quantization != "none":
        model.quantize(quantization, 32)
    cache = CacheEngine(arch, BS, torch.bfloat16, kv, 16, 4, 0, None, DEVICE)
    assert cache.kv.values.device == DEVICE and cache.swap_space.values.device.type == "cpu"
    for i, layer in enumerate(model.layers):
        layer.attn.kv_cache = cache.kv.layer(i)
    chunks, tables = _batch_chunks()
    batch = build_step_batch(chunks, tables, BS, torch.bfloat16, False, True, DEVICE)
    assert batch.attn.paged_prefills.q_lens.device == DEVICE
    with attention_context(batch.attn):
        hidden = model(batch.input_ids, batch.positions)
    logits = model.compute_logits(hidden[[0, 1, 6, 9]])
    assert hidden.device == DEVICE and logits.shape == (4, arch.vocab_size)
    cache.compact_tree(tables[4], 10, [1, 3])  # (copies to the host need data: not on meta)


def test_decode_graphs_on_the_device(tiny_model_dir):
    """The graph runner's buffers and copies on the device, with the replay standing in."""
    loaded = load_model(str(tiny_model_dir("llama")), torch.bfloat16, with_tokenizer=False)
    model = build_model(loaded.arch, weights_to(loaded.weights, DEVICE), TritonPagedAttention(),
                        torch.bfloat16, 64, device=DEVICE)
    cache = CacheEngine(loaded.arch, BS, torch.bfloat16, "bfloat16", 16 + 1, 0, 0, None, DEVICE)
    for i, layer in enumerate(model.layers):
        layer.attn.kv_cache = cache.kv.layer(i)
    graphs = DecodeGraphs(model, [1, 2, 4], 64, BS, 16, DEVICE, EagerGraph)
    batch = build_step_batch([SeqChunk([5], 6), SeqChunk([7], 13), SeqChunk([2], 3)],
                             [[0, 1], [2, 3, 4, 5], [6]], BS, torch.bfloat16, False, True, DEVICE)
    hidden = graphs.run(batch)
    assert hidden.shape == (3, loaded.arch.hidden_size) and hidden.device == DEVICE


def test_device_choice_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="device 'cuda' needs a GPU"):
            resolve_device("cuda")
    assert compute_dtype("auto", None, "auto", "cuda") == torch.bfloat16
    assert compute_dtype("float32", None, "auto", "cuda") == torch.float32
    with pytest.raises(ValueError, match="device must be one of"):
        EngineConfig(device="tpu")
    with pytest.raises(ValueError, match="gpu_memory_utilization must be a number in"):
        EngineConfig(gpu_memory_utilization=1.5)


def test_kv_blocks_from_device_memory():
    gib = 2**30
    # 80 GiB x 0.9 = 72 GiB, of which 20 GiB are taken: 52 GiB of 2 MiB blocks.
    assert kv_blocks_for_memory(80 * gib, 0.9, 20 * gib, 2 * 2**20) == 52 * 512
    with pytest.raises(ValueError, match="raise gpu_memory_utilization"):
        kv_blocks_for_memory(16 * gib, 0.5, 8 * gib, 2**20)
