"""THE mapping between Hugging Face (published) names and Megatron names, with the shard rule of each tensor.

This table is the only place in the project that knows weight names. Conversion (HF <-> Megatron checkpoint) and the
weight export to rollout engines both read it. `*` in a name stands for a layer index (global over pipeline stages
on the Megatron side) or, for `visual.*`, for any suffix. A mapping's `te` is the parameter's name in a model built
with the Transformer Engine layer spec where it differs from the local spec's: TE fuses the pre-attention and pre-MLP
norms into the following linear layer (TELayerNormColumnParallelLinear), so `input_layernorm.weight` is
`self_attention.linear_qkv.layer_norm_weight` and `pre_mlp_layernorm.weight` is `mlp.linear_fc1.layer_norm_weight`.
(Megatron's checkpoints use the TE names for both specs: the local spec maps its norms to them when saving.)
Each mapping turns HF tensors into the tensor-parallel shard of one Megatron parameter, and the shards of all TP ranks
back into HF tensors:

    Replicated     same tensor on every rank (norms, the vision tower)
    ColumnParallel split along dim 0                  RowParallel  split along dim 1
    VocabParallel  rows padded to the padded vocabulary, then split along dim 0 (padding dropped on the way back)
    QKVFused       q, k, v interleaved per query group [q_g (heads/groups * d) | k_g (d) | v_g (d)], split by groups
    GatedMLP       each rank holds [gate_r ; up_r] (its slices of gate_proj and up_proj)
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelDims:
    """The sizes the shard rules need."""

    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int

    @classmethod
    def from_hf_config(cls, hf_config, padded_vocab_size: int) -> "ModelDims":
        text = hf_config.text_config
        return cls(text.num_attention_heads, text.num_key_value_heads, text.hidden_size // text.num_attention_heads,
                   text.vocab_size, padded_vocab_size)


@dataclass(frozen=True)
class Mapping(abc.ABC):
    """One Megatron parameter and the HF tensors it is made of; subclasses are the shard rules."""

    megatron: str
    hf: tuple[str, ...]
    te: str | None = None  # the name under the Transformer Engine layer spec, where it differs

    @property
    def megatron_names(self) -> tuple[str, ...]:
        """Every Megatron name of this parameter (local spec, then Transformer Engine spec)."""
        return (self.megatron,) if self.te is None else (self.megatron, self.te)

    @abc.abstractmethod
    def to_shard(self, hf: list[torch.Tensor], rank: int, size: int, dims: ModelDims) -> torch.Tensor:
        """This TP rank's shard of the Megatron parameter, from the full HF tensors (in `self.hf` order)."""

    @abc.abstractmethod
    def to_hf(self, shards: list[torch.Tensor], dims: ModelDims) -> list[torch.Tensor]:
        """The full HF tensors (in `self.hf` order) from the shards of every TP rank (in rank order)."""


class Replicated(Mapping):
    def to_shard(self, hf, rank, size, dims):
        return hf[0]

    def to_hf(self, shards, dims):
        return [shards[0]]


class ColumnParallel(Mapping):
    def to_shard(self, hf, rank, size, dims):
        return _split(hf[0], 0, rank, size)

    def to_hf(self, shards, dims):
        return [_cat(shards, 0)]


class RowParallel(Mapping):
    def to_shard(self, hf, rank, size, dims):
        return _split(hf[0], 1, rank, size)

    def to_hf(self, shards, dims):
        return [_cat(shards, 1)]


class VocabParallel(Mapping):
    def to_shard(self, hf, rank, size, dims):
        weight = hf[0]
        padded = weight.new_zeros((dims.padded_vocab_size, *weight.shape[1:]))
        padded[: weight.shape[0]] = weight
        return _split(padded, 0, rank, size)

    def to_hf(self, shards, dims):
        return [_cat(shards, 0)[: dims.vocab_size]]


class QKVFused(Mapping):
    def to_shard(self, hf, rank, size, dims):
        q, k, v = hf
        groups, per_group = dims.num_query_groups, dims.num_heads // dims.num_query_groups
        tail = q.shape[1:]
        fused = torch.cat(
            [
                q.reshape(groups, per_group * dims.head_dim, *tail),
                k.reshape(groups, dims.head_dim, *tail),
                v.reshape(groups, dims.head_dim, *tail),
            ],
            dim=1,
        )
        return _split(fused, 0, rank, size).reshape(-1, *tail)

    def to_hf(self, shards, dims):
        groups, per_group = dims.num_query_groups, dims.num_heads // dims.num_query_groups
        fused = _cat(shards, 0)
        tail = fused.shape[1:]
        fused = fused.reshape(groups, (per_group + 2) * dims.head_dim, *tail)
        q, k, v = fused.split([per_group * dims.head_dim, dims.head_dim, dims.head_dim], dim=1)
        return [t.reshape(-1, *tail) for t in (q, k, v)]


class GatedMLP(Mapping):
    def to_shard(self, hf, rank, size, dims):
        gate, up = hf
        return torch.cat([_split(gate, 0, rank, size), _split(up, 0, rank, size)], 0)

    def to_hf(self, shards, dims):
        halves = [s.chunk(2, 0) for s in shards]
        return [torch.cat([h[0] for h in halves], 0), torch.cat([h[1] for h in halves], 0)]


def _cat(shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat, without the copy when there is a single shard (TP=1: the export then holds no second copy)."""
    return shards[0] if len(shards) == 1 else torch.cat(shards, dim)


def _split(tensor: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if tensor.shape[dim] % size:
        raise ValueError(f"cannot split a dimension of {tensor.shape[dim]} across {size} tensor-parallel ranks")
    return tensor.chunk(size, dim)[rank].contiguous()  # contiguous: gloo scrambles non-contiguous chunks


_LM = "language_model."
_LAYER = _LM + "decoder.layers.*."
_HF_LAYER = "model.layers.*."

QWEN2_5_VL_MAPPINGS: tuple[Mapping, ...] = (
    VocabParallel(_LM + "embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Replicated(_LAYER + "input_layernorm.weight", (_HF_LAYER + "input_layernorm.weight",),
               te=_LAYER + "self_attention.linear_qkv.layer_norm_weight"),
    QKVFused(_LAYER + "self_attention.linear_qkv.weight",
             tuple(_HF_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv")),
    QKVFused(_LAYER + "self_attention.linear_qkv.bias", tuple(_HF_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv")),
    RowParallel(_LAYER + "self_attention.linear_proj.weight", (_HF_LAYER + "self_attn.o_proj.weight",)),
    Replicated(_LAYER + "pre_mlp_layernorm.weight", (_HF_LAYER + "post_attention_layernorm.weight",),
               te=_LAYER + "mlp.linear_fc1.layer_norm_weight"),
    GatedMLP(_LAYER + "mlp.linear_fc1.weight", (_HF_LAYER + "mlp.gate_proj.weight", _HF_LAYER + "mlp.up_proj.weight")),
    RowParallel(_LAYER + "mlp.linear_fc2.weight", (_HF_LAYER + "mlp.down_proj.weight",)),
    Replicated(_LM + "decoder.final_layernorm.weight", ("model.norm.weight",)),
    VocabParallel(_LM + "output_layer.weight", ("lm_head.weight",)),
    Replicated("vision_model.*", ("visual.*",)),
)

# transformers 5 holds (and may save) the published names under other prefixes; this is the one rule mapping them back.
HF_IN_MEMORY_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def published_name(hf_name: str) -> str:
    """The published name of an HF tensor: `model.language_model.X` -> `model.X`, `model.visual.X` -> `visual.X`;
    published names (and `lm_head.weight`) are returned unchanged, so both checkpoint layouts are accepted."""
    for prefix, published in HF_IN_MEMORY_PREFIXES:
        if hf_name.startswith(prefix):
            return published + hf_name[len(prefix):]
    return hf_name


def in_memory_name(published_hf_name: str) -> str:
    """The inverse of `published_name`: `visual.X` -> `model.visual.X`, `model.X` -> `model.language_model.X`;
    in-memory names (and `lm_head.weight`) are returned unchanged."""
    if published_hf_name.startswith(tuple(prefix for prefix, _ in HF_IN_MEMORY_PREFIXES)):
        return published_hf_name
    for prefix, published in HF_IN_MEMORY_PREFIXES:
        if published_hf_name.startswith(published):
            return prefix + published_hf_name[len(published):]
    return published_hf_name


def _pattern(name: str, layer_only: bool) -> re.Pattern:
    star = r"(\d+)" if layer_only else r"(.+)"
    return re.compile("^" + re.escape(name).replace(r"\*", star) + "$")


_COMPILED = [(m, _pattern(name, "layers.*" in name)) for m in QWEN2_5_VL_MAPPINGS for name in m.megatron_names]


_EXTRA_STATE = re.compile(r"(^|\.)_extra_state\d*$")  # TE's grouped linears number theirs: _extra_state1, ...


def is_extra_state(checkpoint_key: str) -> bool:
    """A module's extra-state entry in a Megatron checkpoint (Transformer Engine's FP8 scaling metadata; None for
    megatron's own linear layers): never a weight, so it has no mapping."""
    return bool(_EXTRA_STATE.search(checkpoint_key))


def resolve(megatron_name: str) -> tuple[Mapping, list[str]]:
    """The mapping of a (global) Megatron parameter name, local-spec or Transformer Engine, and the concrete HF names
    it reads."""
    for mapping, pattern in _COMPILED:
        match = pattern.match(megatron_name)
        if match:
            return mapping, [h.replace("*", match.group(1), 1) if "*" in h else h for h in mapping.hf]
    raise KeyError(f"no mapping for Megatron parameter {megatron_name!r}: add it to checkpoint/mapping.py")


def global_layer_name(local_name: str, layer_offset: int) -> str:
    """decoder.layers.<local i> -> decoder.layers.<offset + i> (pipeline stages number their layers from 0)."""
    return re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.",
                  local_name, count=1)


def published_to_module_names(model) -> dict[str, str]:
    """Published name -> name in a transformers Qwen2.5-VL model's state_dict, for every tensor a published checkpoint
    holds (a tied ``lm_head.weight`` is not one of them)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    names: dict[str, str] = {}
    for name in model.state_dict():
        if tied and name == "lm_head.weight":
            continue
        published = published_name(name)
        if published in names:
            raise ValueError(f"{names[published]!r} and {name!r} both publish as {published!r}")
        names[published] = name
    return names
