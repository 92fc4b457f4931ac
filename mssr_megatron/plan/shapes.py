"""Model shapes for the memory plan, from a Hugging Face config.json alone (no weights, no transformers).

    shape = ModelShape.from_config_json("examples/model_configs/qwen2_5_vl_7b/config.json")
    shape.language_params(tp=2, pp=1)    # parameters one rank of the Megatron language model holds
    shape.vision_params()                # the HF vision tower + patch merger (replicated on every TP rank)

Both the published layout (text fields at the top level) and transformers 5's (a `text_config` section) are read.
The counts follow the modules this project builds (models/qwen2_5_vl.py): Megatron's GPT layers with fused QKV
(+ bias), gated SiLU MLP, RMSNorms, the vocabulary padded as Megatron-LM pads it, and transformers' Qwen2.5-VL
vision tower; tests check them against the parameters of models built here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from mssr_megatron.models.qwen2_5_vl import padded_vocab_size

PUBLISHED = {"qwen2.5-vl-3b": "qwen2_5_vl_3b", "qwen2.5-vl-7b": "qwen2_5_vl_7b", "qwen2.5-vl-32b": "qwen2_5_vl_32b"}
"""Published model names (as in hub ids such as Qwen/Qwen2.5-VL-7B-Instruct) -> examples/model_configs/<dir>."""

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "examples", "model_configs")


@dataclass(frozen=True)
class ModelShape:
    """The sizes the memory plan needs (language model, then vision tower)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    v_depth: int
    v_hidden: int
    v_intermediate: int
    v_heads: int
    v_out_hidden: int
    v_patch: int
    v_temporal_patch: int
    v_merge: int
    v_in_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelShape:
        text = cfg.get("text_config") or cfg
        vision = cfg["vision_config"]
        tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        return cls(hidden=text["hidden_size"], layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
                   kv_heads=text["num_key_value_heads"], intermediate=text["intermediate_size"],
                   vocab=text["vocab_size"], tied=bool(tied), v_depth=vision["depth"], v_hidden=vision["hidden_size"],
                   v_intermediate=vision["intermediate_size"], v_heads=vision["num_heads"],
                   v_out_hidden=vision["out_hidden_size"], v_patch=vision["patch_size"],
                   v_temporal_patch=vision["temporal_patch_size"], v_merge=vision["spatial_merge_size"],
                   v_in_channels=vision.get("in_chans", vision.get("in_channels", 3)))

    @classmethod
    def from_config_json(cls, path: str) -> ModelShape:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    # ------------------------------------------------------------------------------------------------ parameters
    def layer_params(self, tp: int) -> int:
        """One transformer layer on one TP rank: QKV (+ bias) and output projection, gated MLP, two RMSNorms."""
        h, d = self.hidden, self.head_dim
        qkv = (self.heads + 2 * self.kv_heads) * d
        attention = (h * qkv + qkv) // tp + self.heads * d * h // tp
        mlp = (h * 2 * self.intermediate + self.intermediate * h) // tp
        return attention + mlp + 2 * h

    def padded_vocab(self, tp: int) -> int:
        return padded_vocab_size(self.vocab, tp)

    def language_params(self, tp: int, pp: int, stage: int | None = None) -> int:
        """Parameters of the language model on one rank of pipeline stage `stage` (default: the largest stage).

        The first stage holds the embedding, the last the final norm and the output layer (also when the
        embeddings are tied and PP > 1: Megatron keeps a synchronised copy there)."""
        embedding = self.padded_vocab(tp) // tp * self.hidden
        layers = self.layers // pp * self.layer_params(tp)

        def stage_params(i: int) -> int:
            first, last = i == 0, i == pp - 1
            output = embedding if last and not (self.tied and first) else 0
            return layers + (embedding if first else 0) + (output + self.hidden if last else 0)

        return stage_params(stage) if stage is not None else max(stage_params(i) for i in range(pp))

    def vision_params(self) -> int:
        """transformers' Qwen2.5-VL vision tower: patch embedding (no bias), blocks, patch merger."""
        h, i = self.v_hidden, self.v_intermediate
        patch = self.v_in_channels * self.v_temporal_patch * self.v_patch ** 2 * h
        block = 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + 2 * (h * i + i) + (i * h + h)
        merged = h * self.v_merge ** 2
        merger = h + (merged * merged + merged) + (merged * self.v_out_hidden + self.v_out_hidden)
        return patch + self.v_depth * block + merger

    def total_params(self) -> int:
        """The whole model at TP1 PP1 (published vocabulary, no padding): the rollout engine's copy."""
        embedding = self.vocab * self.hidden
        return (self.layers * self.layer_params(1) + embedding * (1 if self.tied else 2) + self.hidden
                + self.vision_params())


def resolve_config_json(hf_path: str | None, explicit: str | None = None) -> str:
    """The config.json describing the model: `explicit` (a file or directory), else <hf_path>/config.json, else the
    shipped published shape whose name appears in hf_path (e.g. Qwen/Qwen2.5-VL-7B-Instruct -> qwen2_5_vl_7b)."""
    candidates = [explicit] if explicit else []
    if hf_path:
        candidates.append(hf_path)
        name = hf_path.lower().replace("_", "-")
        candidates += [os.path.join(SHIPPED_DIR, d) for key, d in PUBLISHED.items() if key in name]
    for path in candidates:
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if os.path.isfile(file):
            return file
    raise FileNotFoundError(
        f"no config.json for model.hf_path={hf_path!r}{f' or {explicit!r}' if explicit else ''}: point model.hf_path "
        f"at a Hugging Face model directory or pass --model-config (shipped shapes: {SHIPPED_DIR}/*/config.json)")
