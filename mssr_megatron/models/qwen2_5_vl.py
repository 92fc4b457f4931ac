"""Qwen2.5-VL on Megatron-Core: a GPTModel language model with mrope, and the vision tower on the first stage.

Language model: GPTModel (position_embedding_type="mrope") with grouped-query attention, QKV bias, RMSNorm, SwiGLU,
rotary base from the HF config, tied or untied embeddings, vocabulary padded for TP as Megatron-LM pads it.
Vision tower: transformers' own `Qwen2_5_VisionTransformerPretrainedModel` (window attention, full-attention blocks,
2-D rotary, patch merger), replicated on every TP rank of the first pipeline stage, as Megatron-Bridge does. With
model.vision_balance=replicate every rank encodes every image, and its gradients need no extra reduction: the decoder
input's gradient is already all-reduced over TP by the first column-parallel layer, so every TP rank computes the same
vision gradients. With tp_balanced each rank encodes its share of the images (vision_balance.py), and the tower's
gradients are summed over TP before each optimizer step (actor.py: vision_balance.allreduce_vision_grads).
Layer spec: the local spec with SDPA core attention (CPU, GPU without Transformer Engine) or Transformer Engine with
FP8 settings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from mssr_megatron.models.rope_index import mrope_position_ids
from mssr_megatron.models.sdpa_attention import with_sdpa_core_attention
from mssr_megatron.models.sequence_parallel_norm import sequence_parallel_block_spec
from mssr_megatron.models.swiglu_mlp import swiglu_mlps
from mssr_megatron.models.tp1_linear import torch_linears_at_tp1

MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128
HF_DEFAULT_MROPE_SECTION = (16, 24, 24)  # what transformers assumes when the config names none


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    """Megatron-LM's padding: round the vocabulary up to a multiple of divisible_by * tp."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def _te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or an OSError/RuntimeError when no CUDA driver is present
        return False
    return True


def layer_spec_arguments(model_cfg) -> tuple[str, dict]:
    """(name of the megatron-core layer-spec builder in megatron.core.models.gpt.gpt_layer_specs, its keyword
    arguments) for model.transformer_impl: what `layer_spec` calls, readable by the contract tests.

    Qwen2 layers: no MoE, no query/key norm, no multi-latent attention. The local builder takes the norm type as an
    argument; the Transformer Engine builder takes none: its fused norm+linear layers (TELayerNormColumnParallelLinear)
    and TENorm read TransformerConfig.normalization ("RMSNorm", set by `language_config`) when they are built."""
    common = dict(num_experts=None, qk_layernorm=False, multi_latent_attention=False)
    if model_cfg.transformer_impl == "transformer_engine":
        return "get_gpt_layer_with_transformer_engine_spec", dict(common, use_te_op_fuser=False)
    return "get_gpt_layer_local_spec", dict(common, normalization="RMSNorm")


def layer_spec(model_cfg):
    """The transformer layer spec for model.transformer_impl: 'local' (megatron's local spec with torch's fused SDPA as
    core attention, sdpa_attention.py) or 'transformer_engine'.

    The Transformer Engine spec (and FP8 through it) is GPU-only: not run (no GPU was available); on CPU its builder
    arguments are bound against megatron-core's signature and the missing-TE / FP8-device errors are tested."""
    from megatron.core.models.gpt import gpt_layer_specs

    if model_cfg.transformer_impl == "transformer_engine":
        if not _te_available():
            raise RuntimeError(
                "model.transformer_impl=transformer_engine (and FP8) needs Transformer Engine with a CUDA GPU; "
                "install the te extra on a GPU node (pip install 'mssr-megatron[te]', README: cluster section), or set"
                " model.transformer_impl=local model.fp8=null"
            )
        _check_fp8_device(model_cfg)  # GPU-only: not run (no GPU was available)
    elif model_cfg.fp8 is not None:
        raise RuntimeError("model.fp8 needs model.transformer_impl=transformer_engine (Transformer Engine, GPU)")
    builder, kwargs = layer_spec_arguments(model_cfg)
    spec = getattr(gpt_layer_specs, builder)(**kwargs)
    if model_cfg.transformer_impl == "local":  # torch's fused SDPA in place of the unfused DotProductAttention
        spec = with_sdpa_core_attention(spec)
    return spec


def _check_fp8_device(model_cfg) -> None:
    """Refuse an FP8 recipe that this CUDA device cannot run (checked where the device is known: model build).
    GPU-only: not run (no GPU was available); the decision itself (config_checks.fp8_recipe_problem) is tested."""
    from mssr_megatron.config_checks import fp8_recipe_problem

    if model_cfg.fp8 is not None and torch.cuda.is_available():
        problem = fp8_recipe_problem(model_cfg.fp8_recipe, torch.cuda.get_device_capability())
        if problem:
            raise RuntimeError(problem)


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or an OSError/RuntimeError from a build that does not match this CUDA/torch
        return False
    return True


def vision_attention_implementation(on_cuda: bool, dtype: torch.dtype) -> str:
    """transformers' attention implementation for the vision tower: "flash_attention_2" when flash-attn is importable
    and the tower runs on CUDA in bf16/fp16 (flash-attn's only device and dtypes; its variable-length kernel runs the
    window attention without padding), else "sdpa" (deterministic on CPU)."""
    if on_cuda and dtype in (torch.bfloat16, torch.float16) and _flash_attn_available():
        return "flash_attention_2"
    return "sdpa"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def language_config(hf_config, model_cfg, tp: int = 1, pp: int = 1, sequence_parallel: bool = False,
                    cpu_initialization: bool = True):
    """TransformerConfig of the language model from the HF Qwen2.5-VL config and our ModelConfig.

    cpu_initialization: megatron's use_cpu_initialization (weights created and initialised on the CPU); False makes
    megatron create them on torch.cuda.current_device() (build_model's choice for a CUDA device; GPU-only: not run
    (no GPU was available))."""
    from megatron.core.transformer import TransformerConfig

    text = hf_config.text_config
    dtype = _DTYPES[model_cfg.params_dtype]
    head_dim = text.hidden_size // text.num_attention_heads
    rope = _rope_parameters(text)
    fp8 = {}
    if model_cfg.fp8 is not None:  # GPU-only path: never run here
        fp8 = dict(fp8=model_cfg.fp8, fp8_recipe=model_cfg.fp8_recipe, fp8_margin=model_cfg.fp8_margin,
                   fp8_amax_history_len=model_cfg.fp8_amax_history_len,
                   fp8_amax_compute_algo=model_cfg.fp8_amax_compute_algo)
    return TransformerConfig(
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_key_value_heads,
        kv_channels=head_dim,
        ffn_hidden_size=text.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=text.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=cpu_initialization,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        mrope_section=list(rope.get("mrope_section", HF_DEFAULT_MROPE_SECTION)),
        recompute_granularity=model_cfg.recompute_granularity,
        recompute_method=model_cfg.recompute_method,
        recompute_num_layers=model_cfg.recompute_num_layers,
        **fp8,
    )


def _rope_parameters(text_config) -> dict:
    """rope_theta and mrope_section: transformers 5 keeps them in rope_parameters, 4.x in rope_theta/rope_scaling."""
    params = dict(getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(text_config, "rope_theta", 1e6))
    return params


def rotary_base(hf_config) -> float:
    return float(_rope_parameters(hf_config.text_config)["rope_theta"])


class Qwen2_5_VLMegatron(MegatronModule):
    """One pipeline stage of Qwen2.5-VL.

    Parameters are named `vision_model.*` (first stage only; transformers' module names) and `language_model.*`
    (megatron GPTModel names); the checkpoint mapping table translates both to the published HF names.
    forward(input_ids [B, S], position_ids [3, B, S], pixel_values [P, C*T*14*14], image_grid_thw [N, 3])
      -> last stage: vocab-parallel logits [B, S, V_padded / TP]; other stages: hidden states [S, B, H]
         ([S / TP, B, H] under sequence parallelism; the output layer gathers the sequence back, so logits stay
         [B, S, V_padded / TP]; S must then be a multiple of TP).
    """

    def __init__(self, hf_config, model_cfg, tp: int = 1, pp: int = 1, pre_process: bool = True,
                 post_process: bool = True, sequence_parallel: bool = False, cpu_initialization: bool = True):
        from megatron.core.enums import ModelType
        from megatron.core.models.gpt import GPTModel

        super().__init__(config=language_config(hf_config, model_cfg, tp, pp, sequence_parallel, cpu_initialization))
        self.model_type = ModelType.encoder_or_decoder
        self.hf_config = hf_config
        self.pre_process, self.post_process = pre_process, post_process
        self.vocab_size = hf_config.text_config.vocab_size
        self.image_token_id = hf_config.image_token_id
        self.vision_balance = model_cfg.vision_balance
        spec = layer_spec(model_cfg)
        if self.config.sequence_parallel:  # the local spec's torch norms refuse SP: swap in SP-marked RMSNorms
            spec = sequence_parallel_block_spec(spec, self.config)
        self.language_model = GPTModel(
            config=self.config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(self.vocab_size, tp),
            max_sequence_length=hf_config.text_config.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
            position_embedding_type="mrope",
            rotary_base=rotary_base(hf_config),
            # under SP, embed() merges the vision features into the full [S, B, H] embeddings, then scatters
            scatter_embedding_sequence_parallel=False,
        )
        if model_cfg.transformer_impl == "local":  # Transformer Engine's layers have their own fused paths
            torch_linears_at_tp1(self.language_model, self.config)  # tp1_linear.py
            swiglu_mlps(self.language_model, self.config)  # swiglu_mlp.py
        self.vision_model = None
        if pre_process:
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

            dtype = _DTYPES[model_cfg.params_dtype]
            # not cpu_initialization: build_model puts the stage on CUDA (flash-attention there: GPU-only, not run
            # (no GPU was available))
            attention = vision_attention_implementation(on_cuda=not cpu_initialization, dtype=dtype)
            self.vision_model = Qwen2_5_VisionTransformerPretrainedModel._from_config(
                hf_config.vision_config, dtype=dtype, attn_implementation=attention
            )
            self.vision_model.requires_grad_(model_cfg.train_vision)

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        """The tied embedding / output weight (megatron's grad finalisation syncs it across the first/last stage)."""
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline hook: the hidden states received from the previous stage."""
        self.language_model.set_input_tensor(input_tensor)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None) -> torch.Tensor:
        """Token embeddings with the vision features placed at the <|image_pad|> positions: [S, B, H], or this rank's
        [S/TP, B, H] slice of the sequence under sequence parallelism (scattered after the merge, so the [B, S]
        image mask lines up with the full sequence)."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H], not scattered
        if pixel_values is not None:
            embeddings = self._merge_vision(embeddings, input_ids, pixel_values, image_grid_thw)
        if self.config.sequence_parallel:
            from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

            # what LanguageModelEmbedding does under SP: split the sequence over TP (its backward all-gathers the
            # gradient, so every TP rank sees the full gradient of the vision features), and clone the view
            embeddings = scatter_to_sequence_parallel_region(embeddings)
            if self.config.clone_scatter_output_in_embedding:
                embeddings = embeddings.clone()
        return embeddings

    def vision_features(self, pixel_values, image_grid_thw) -> torch.Tensor:
        """The vision tower's features [sum_i t*h*w / merge^2, H] of the images, in image order, under
        model.vision_balance: this rank encodes every image (replicate) or its share of them (tp_balanced; at TP=1
        the share is every image, so the tower is called directly)."""
        if self.vision_balance == "tp_balanced" and self.config.tensor_model_parallel_size > 1:
            from megatron.core import parallel_state as ps

            from mssr_megatron.models.vision_balance import balanced_vision_features

            return balanced_vision_features(self.vision_model, pixel_values, image_grid_thw,
                                            self.hf_config.vision_config.spatial_merge_size,
                                            ps.get_tensor_model_parallel_group())
        features = self.vision_model(pixel_values.to(self.vision_model.dtype), grid_thw=image_grid_thw)
        return getattr(features, "pooler_output", features)  # transformers 5 returns a model output

    def _merge_vision(self, embeddings, input_ids, pixel_values, image_grid_thw) -> torch.Tensor:
        """[S, B, H] embeddings with the vision tower's features written at the image-token positions."""
        image_mask = input_ids == self.image_token_id  # [B, S]: features come image by image, batch-major
        features = self.vision_features(pixel_values, image_grid_thw)
        if int(image_mask.sum()) != features.shape[0]:
            raise ValueError(f"the prompts hold {int(image_mask.sum())} <|image_pad|> tokens but the images give "
                             f"{features.shape[0]} features: check the processor's image_grid_thw")
        embeddings = embeddings.transpose(0, 1).clone()  # [B, S, H]
        embeddings[image_mask] = features.to(embeddings.dtype)
        return embeddings.transpose(0, 1).contiguous()

    def forward(self, input_ids, position_ids=None, pixel_values=None, image_grid_thw=None, attention_mask=None,
                logit_mask=None):
        """logit_mask [B, S] (bool), last stage: the logits only at its True positions, packed [1, N, V_padded / TP]
        in row-major (b, s) order (`logit_mask.nonzero()`'s), instead of [B, S, V_padded / TP]: the output layer
        and everything after it skip the positions no loss reads (the prompt)."""
        tp = self.config.tensor_model_parallel_size
        if self.config.sequence_parallel and input_ids.shape[1] % tp:
            raise ValueError(f"parallel.sequence_parallel splits the sequence over the {tp} tensor-parallel ranks: "
                             f"the micro-batch length {input_ids.shape[1]} must be a multiple of {tp}; pad it")
        if position_ids is None:
            position_ids = mrope_position_ids(input_ids.cpu(), image_grid_thw, self.image_token_id,
                                              self.hf_config.vision_config.spatial_merge_size).to(input_ids.device)
        decoder_input = self.embed(input_ids, pixel_values, image_grid_thw) if self.pre_process else None
        inputs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      decoder_input=decoder_input)
        if logit_mask is None or not self.post_process:
            return self.language_model(**inputs)
        return self._logits_at(self._final_hidden_states(inputs), logit_mask)

    def _final_hidden_states(self, inputs: dict) -> torch.Tensor:
        """The decoder's output [S, B, H] (final norm applied) on the last stage, without the output layer: GPTModel
        returns it where its _postprocess would apply the output layer when post_process is off, as on a middle
        pipeline stage (megatron-core 0.16.1); the flag is set back at once."""
        language_model = self.language_model
        language_model.post_process = False
        try:
            return language_model(**inputs)
        finally:
            language_model.post_process = True

    def _logits_at(self, hidden: torch.Tensor, logit_mask: torch.Tensor) -> torch.Tensor:
        """hidden [S, B, H] ([S/TP, B, H] under sequence parallelism), logit_mask [B, S] -> the output layer's logits
        at the mask's positions [1, N, V/TP]."""
        language_model = self.language_model
        output_layer = language_model.output_layer
        sequence_parallel = output_layer.sequence_parallel
        if sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # The whole sequence on every TP rank; the selected rows then go through the output layer as a non-SP
            # layer, whose input gradient is all-reduced over TP, so the gather's backward only takes this rank's
            # slice (tensor_parallel_output_grad=False: no second reduction).
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        selected = hidden.transpose(0, 1)[logit_mask.to(torch.bool)]  # [N, H]
        weight = (language_model.shared_embedding_or_output_weight()
                  if language_model.share_embeddings_and_output_weights else None)
        output_layer.sequence_parallel = False  # as megatron's own last-token inference path does (gpt_model.py)
        try:
            logits, _ = output_layer(selected.unsqueeze(1), weight=weight)  # [N, 1, V/TP]
        finally:
            output_layer.sequence_parallel = sequence_parallel
        return logits.transpose(0, 1)
