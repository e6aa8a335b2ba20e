"""Which part of each weight a tensor/pipeline-parallel rank holds, decided from names alone.

Megatron-style: q/k/v and gate/up are split by output rows (column-parallel; whole heads),
o_proj and down_proj by input columns (row-parallel: each rank's partial sum is all-reduced),
the embedding and LM head by vocabulary rows. An MoE's experts split like dense MLPs, or
with `expert_parallel` each rank holds num_experts / T whole experts. When there are fewer KV heads than ranks,
each rank keeps the one KV head its query heads read (replication). Pipeline stages keep
a contiguous range of layers; the first stage the embedding, the last the final norm and
LM head. Loaders ask `select` for each tensor before reading it, so a rank reads only its
slice from disk.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from servelm.model.arch import ModelArch

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"experts\.\d+\.")
# An MoE's experts and shared expert split like a dense MLP (experts' names without their
# number); its router and the shared expert's gate are kept whole on every rank.
_COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                    "mlp.up_proj", "mlp.experts.gate_proj", "mlp.experts.up_proj",
                    "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")
_ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj", "mlp.experts.down_proj", "mlp.shared_expert.down_proj")
Index = tuple[slice, ...]  # () is the whole tensor


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Stage `pp_rank`'s layers: an even split, the remainder to the earlier stages (the
    last one also runs the LM head)."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (pp_rank < extra))


def vocab_range(vocab_size: int, tp_size: int, tp_rank: int) -> range:
    """Rank `tp_rank`'s rows of the embedding and LM head: ceil(vocab / T) each, the last
    shard shorter when T does not divide the vocabulary."""
    per = -(-vocab_size // tp_size)
    return range(min(tp_rank * per, vocab_size), min((tp_rank + 1) * per, vocab_size))


@dataclass(frozen=True)
class Shard:
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    expert_parallel: bool = False

    @property
    def is_whole(self) -> bool:
        return self.tp_size == 1 and self.pp_size == 1

    def check(self, arch: ModelArch) -> None:
        """Refuse a split the model's shape does not allow, naming the option and the shape."""
        t = self.tp_size
        if arch.num_heads % t:
            raise ValueError(f"tensor_parallel_size ({t}) must divide num_attention_heads "
                             f"({arch.num_heads})")
        if arch.num_kv_heads % t and t % arch.num_kv_heads:
            raise ValueError(f"tensor_parallel_size ({t}) must divide num_key_value_heads "
                             f"({arch.num_kv_heads}) or be a multiple of it")
        fields = ["intermediate_size", "shared_expert_intermediate_size"]
        if self.expert_parallel and arch.num_experts % t:
            raise ValueError(f"with enable_expert_parallel, tensor_parallel_size ({t}) must divide "
                             f"the number of experts ({arch.num_experts})")
        if not self.expert_parallel:
            fields.append("moe_intermediate_size")
        for field in fields:
            if getattr(arch, field) % t:
                raise ValueError(f"tensor_parallel_size ({t}) must divide {field} ({getattr(arch, field)})")
        if self.pp_size > arch.num_layers:
            raise ValueError(f"pipeline_parallel_size ({self.pp_size}) must be at most the "
                             f"model's {arch.num_layers} layers")

    def layers(self, arch: ModelArch) -> range:
        return stage_layers(arch.num_layers, self.pp_size, self.pp_rank)

    def kv_heads(self, arch: ModelArch) -> range:
        """The KV heads this rank's query heads read."""
        if arch.num_kv_heads >= self.tp_size:
            per = arch.num_kv_heads // self.tp_size
            return range(self.tp_rank * per, (self.tp_rank + 1) * per)
        head = self.tp_rank // (self.tp_size // arch.num_kv_heads)
        return range(head, head + 1)

    def local_arch(self, arch: ModelArch) -> ModelArch:
        """The shape of this rank's part: its heads, its MLP columns and its layers (the
        vocabulary stays the model's: logits are gathered whole)."""
        layers = self.layers(arch)
        return dataclasses.replace(
            arch, num_heads=arch.num_heads // self.tp_size,
            num_kv_heads=len(self.kv_heads(arch)),
            intermediate_size=arch.intermediate_size // self.tp_size,
            moe_intermediate_size=arch.moe_intermediate_size // (1 if self.expert_parallel else self.tp_size),
            held_experts=tuple(self.experts(arch)) if self.expert_parallel and self.tp_size > 1 else (),
            shared_expert_intermediate_size=arch.shared_expert_intermediate_size // self.tp_size,
            num_layers=len(layers),
            dense_layers=tuple(i - layers.start for i in arch.dense_layers if i in layers))

    def experts(self, arch: ModelArch) -> range:
        """Expert parallelism: the experts this rank holds whole."""
        per = arch.num_experts // self.tp_size
        return range(self.tp_rank * per, (self.tp_rank + 1) * per)

    def select(self, name: str, arch: ModelArch) -> tuple[str, Index] | None:
        """(local name, index into the stored tensor) of HF weight `name`, or None when this
        rank does not hold it. Layers are renumbered from 0 within the stage."""
        m = _LAYER.fullmatch(name)
        if m is None:
            return self._select_global(name, arch)
        layers = self.layers(arch)
        i, rest = int(m.group(1)), m.group(2)
        if i not in layers:
            return None
        local = f"model.layers.{i - layers.start}.{rest}"
        module = _EXPERT.sub("experts.", rest.rsplit(".", 1)[0])
        if self.expert_parallel and module.startswith("mlp.experts.") and self.tp_size > 1:
            expert = int(rest.split(".")[2])
            return (local, ()) if expert in self.experts(arch) else None
        if self.tp_size == 1 or module not in _COLUMN_PARALLEL + _ROW_PARALLEL:
            return local, ()
        d, t, r = arch.head_dim, self.tp_size, self.tp_rank
        if module == "self_attn.q_proj":
            per = arch.num_heads // t * d
            rows = slice(r * per, (r + 1) * per)
        elif module in ("self_attn.k_proj", "self_attn.v_proj"):
            heads = self.kv_heads(arch)
            rows = slice(heads.start * d, heads.stop * d)
        else:
            per = _inner_size(module, arch) // t
            rows = slice(r * per, (r + 1) * per)
        return local, ((rows,) if module in _COLUMN_PARALLEL else (slice(None), rows))

    def _select_global(self, name: str, arch: ModelArch) -> tuple[str, Index] | None:
        first, last = self.pp_rank == 0, self.pp_rank == self.pp_size - 1
        if name == "model.norm.weight":
            return (name, ()) if last else None
        if name == "model.embed_tokens.weight":
            wanted = first or (last and arch.tie_word_embeddings)
        elif name == "lm_head.weight":
            wanted = last
        else:
            return name, ()  # an unknown name: check_weights reports it
        if not wanted:
            return None
        if self.tp_size == 1:
            return name, ()
        rows = vocab_range(arch.vocab_size, self.tp_size, self.tp_rank)
        return name, (slice(rows.start, rows.stop),)


def _inner_size(module: str, arch: ModelArch) -> int:
    """The width a split MLP or o_proj weight is cut along, whole."""
    if module.startswith("mlp.experts."):
        return arch.moe_intermediate_size
    if module.startswith("mlp.shared_expert."):
        return arch.shared_expert_intermediate_size
    return arch.intermediate_size if module.startswith("mlp.") else arch.num_heads * arch.head_dim


def index_shape(shape: tuple[int, ...], index: Index) -> tuple[int, ...]:
    """The shape of `tensor[index]` for a tensor of `shape`."""
    padded = index + (slice(None),) * (len(shape) - len(index))
    return tuple(len(range(*s.indices(n))) for n, s in zip(shape, padded))
