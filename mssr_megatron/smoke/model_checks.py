"""Smoke checks on the model itself: Megatron vs transformers logits, the fused log-prob op vs the unfused one, and
the model directory the benchmark runs on.

Shapes: on a GPU the Qwen2.5-VL-3B shape of examples/model_configs/qwen2_5_vl_3b/config.json; with --cpu the tiny
shape (tiny_hf.tiny_qwen2_5_vl_config). Weights are random (seeded); nothing is downloaded.
"""

from __future__ import annotations

import copy
import os

import torch

from mssr_megatron.smoke import SmokeOptions

CONFIG_3B = os.path.join("examples", "model_configs", "qwen2_5_vl_3b", "config.json")
PARAMS_3B = 3_754_622_976  # HF parameter count of Qwen2.5-VL-3B-Instruct (tied embeddings)


def smoke_hf_config(opts: SmokeOptions, num_layers: int | None = None):
    """The model shape of this run: the shipped 3B config.json (GPU) or the tiny config (--cpu); `num_layers`
    shortens the text tower (the shape of every layer is kept)."""
    if opts.cpu:
        from mssr_megatron.models.tiny_hf import tiny_qwen2_5_vl_config

        return tiny_qwen2_5_vl_config(vocab_size=331, num_layers=num_layers or 4)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(os.path.dirname(os.path.join(opts.repo, CONFIG_3B)))
    if num_layers is not None:
        cfg.text_config.num_hidden_layers = num_layers
        cfg.text_config.layer_types = cfg.text_config.layer_types[:num_layers]
    return cfg


def random_hf_model(hf_config, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Qwen2_5_VLForConditionalGeneration with seeded random weights, initialised directly on `device`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(hf_config, dtype=dtype)
    return model.eval()


def image_batch(hf_config, device: torch.device, seed: int = 0) -> dict:
    """Two right-padded prompts of different lengths, each with one image of 2x2 attention windows (so window
    attention is not trivial): the HF inputs plus mrope position_ids."""
    from mssr_megatron.models.rope_index import mrope_position_ids

    vision = hf_config.vision_config
    side = 2 * vision.window_size // vision.patch_size  # patches per image side
    merged = side * side // vision.spatial_merge_size ** 2
    gen = torch.Generator().manual_seed(seed)
    high = min(hf_config.text_config.vocab_size, hf_config.vision_start_token_id)  # ordinary text ids only
    image = [hf_config.vision_start_token_id] + [hf_config.image_token_id] * merged + [hf_config.vision_end_token_id]
    rows = [torch.randint(0, high, (n,), generator=gen).tolist() for n in (24, 48, 8, 16)]
    rows = [rows[0] + image + rows[1], rows[2] + image + rows[3]]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    grid = torch.tensor([[1, side, side]] * len(rows))
    channels = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    inputs = dict(input_ids=ids, attention_mask=mask, image_grid_thw=grid,
                  pixel_values=torch.randn(side * side * len(rows), channels, generator=gen),
                  mm_token_type_ids=(ids == hf_config.image_token_id).long())
    inputs["position_ids"] = mrope_position_ids(ids, grid, hf_config.image_token_id, vision.spatial_merge_size, mask)
    return {k: v.to(device) for k, v in inputs.items()}


def _hf_logits(model, inputs) -> torch.Tensor:
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    with torch.no_grad():
        batch = {k: inputs[k] for k in keys}
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        return model(**batch).logits.float()


def _rel_error(x: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor) -> float:
    return float((x[valid] - ref[valid]).norm() / ref[valid].norm())


def megatron_logits(hf_model, inputs, params_dtype: str, device: torch.device, transformer_impl: str = "local"):
    """Logits [B, S, V] of our Megatron Qwen2.5-VL (TP = PP = 1) holding `hf_model`'s weights, loaded through the
    checkpoint mapping (checkpoint/hf_bridge.py). Needs init_megatron(1, 1) first."""
    from mssr_megatron.checkpoint.hf_bridge import load_hf_weights
    from mssr_megatron.checkpoint.mapping import ModelDims
    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models.provider import build_model, run_microbatches
    from mssr_megatron.models.qwen2_5_vl import padded_vocab_size
    from mssr_megatron.models.tiny_hf import published_state_dict

    hf_config = hf_model.config
    vocab = hf_config.text_config.vocab_size
    model = build_model(hf_config, ModelConfig(params_dtype=params_dtype, transformer_impl=transformer_impl),
                        device).eval()
    load_hf_weights(model, published_state_dict(hf_model), ModelDims.from_hf_config(hf_config,
                                                                                   padded_vocab_size(vocab, 1)))
    batch = {k: inputs[k] for k in ("input_ids", "position_ids", "pixel_values", "image_grid_thw")}
    with torch.no_grad():
        logits = run_microbatches(model, [batch], forward_only=True)[0]
    del model
    return logits[..., :vocab].float()


def logit_parity(opts: SmokeOptions, hf_config, transformer_impl: str = "local") -> dict:
    """Megatron logits vs transformers on the same random weights, on the smoke device, in float32 and in bfloat16.

    float32 (TF32 off) checks the model and the weight mapping: relative L2 error <= 1e-4 (measured on CPU: 4e-7;
    a wrong rotary base alone gives 1e-2). bfloat16 rounding differs between any two implementations, so its
    tolerance is measured, not guessed: transformers in float32 on the same bf16-valued weights is the reference, and
    Megatron's bf16 error must stay within 3x transformers' own bf16 error plus 5e-3. Raises AssertionError naming
    the figures when either is off; returns them."""
    from mssr_megatron.parallel import destroy_megatron, init_megatron

    device = opts.device
    if device.type == "cuda":  # GPU-only: not run (no GPU was available)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    hf = random_hf_model(hf_config, torch.bfloat16, device)
    inputs = image_batch(hf_config, device)
    valid = inputs["attention_mask"].bool()
    hf_bf16 = _hf_logits(hf, inputs)
    hf32 = copy.deepcopy(hf).float()
    init_megatron(1, 1, seed=0, device=device.type)
    try:
        ours = megatron_logits(hf, inputs, "bfloat16", device, transformer_impl)
        del hf
        ours32 = megatron_logits(hf32, inputs, "float32", device, transformer_impl)
    finally:
        destroy_megatron()
    reference = _hf_logits(hf32, inputs)
    del hf32
    err32 = _rel_error(ours32, reference, valid)
    err_ours, err_hf = _rel_error(ours, reference, valid), _rel_error(hf_bf16, reference, valid)
    top1 = float((ours.argmax(-1) == reference.argmax(-1))[valid].float().mean())
    limit = 3 * err_hf + 5e-3
    layers = hf_config.text_config.num_hidden_layers
    figure = (f"rel L2 vs transformers fp32: megatron fp32 {err32:.1e} (limit 1e-4), bf16 {err_ours:.2e} "
              f"(transformers bf16 {err_hf:.2e}, limit {limit:.2e}); bf16 top-1 agreement {top1:.3f}; "
              f"{transformer_impl} spec, {layers} layers, {int(valid.sum())} tokens")
    if not (err32 <= 1e-4 and err_ours <= limit):
        raise AssertionError(f"Megatron logits differ from transformers: {figure}")
    return dict(figure=figure, rel_l2_megatron_fp32=err32, rel_l2_megatron_bf16=err_ours,
                rel_l2_transformers_bf16=err_hf, limit=limit, top1_agreement=top1, layers=layers,
                tokens=int(valid.sum()), max_abs_diff_bf16=float((ours - reference)[valid].abs().max()))


def check_parity(opts: SmokeOptions) -> dict:
    """logit_parity at the smoke shape: the 3B shape with all 36 layers on a GPU (GPU-only: not run (no GPU was
    available)), the tiny shape with --cpu."""
    return logit_parity(opts, smoke_hf_config(opts))


def check_config_3b(opts: SmokeOptions) -> dict:
    """The shipped 3B config.json loads as a Qwen2_5_VLConfig with the published parameter count (built on the meta
    device: no memory, any machine)."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    cfg = AutoConfig.from_pretrained(os.path.dirname(os.path.join(opts.repo, CONFIG_3B)))
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration(cfg).parameters())
    if n != PARAMS_3B:
        raise AssertionError(f"{CONFIG_3B} builds {n:,} parameters, Qwen2.5-VL-3B has {PARAMS_3B:,}")
    return dict(figure=f"{n:,} parameters (Qwen2.5-VL-3B: {PARAMS_3B:,})", parameters=n)


def check_logprob_op(opts: SmokeOptions) -> dict:
    """The fused vocabulary-parallel log-prob + entropy op (chunked and whole) against log_softmax + gather + entropy
    with autograd, on bf16 logits of the model's vocabulary, values and gradients. GPU-only: not run (no GPU was
    available) on CUDA; --cpu runs it on the CPU."""
    from mssr_megatron.ops import vocab_parallel_logprobs_entropy

    device = opts.device
    vocab = smoke_hf_config(opts).text_config.vocab_size
    width = vocab + (-vocab) % 128  # Megatron's padded width: padding columns are excluded
    tokens = 64 if opts.cpu else 4096
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(tokens, width, generator=gen)).to(device, torch.bfloat16)
    target = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    g_lp, g_h = torch.randn(2, tokens, generator=gen).to(device)

    x = logits.detach().clone().requires_grad_()
    logp_all = torch.log_softmax(x[:, :vocab].float(), -1)
    ref_lp = logp_all.gather(-1, target[:, None])[:, 0]
    ref_h = -(logp_all.exp() * logp_all).sum(-1)
    (ref_grad,) = torch.autograd.grad((ref_lp * g_lp).sum() + (ref_h * g_h).sum(), x)
    worst_value = worst_grad = 0.0
    for chunk in (None, 1024):
        y = logits.detach().clone().requires_grad_()
        lp, h = vocab_parallel_logprobs_entropy(y, target, vocab_size=vocab, chunk_size=chunk)
        (grad,) = torch.autograd.grad((lp * g_lp).sum() + (h * g_h).sum(), y)
        worst_value = max(worst_value, float((lp - ref_lp).abs().max()), float((h - ref_h).abs().max()))
        # both gradients are float32 results rounded to bf16 (the logits' dtype): allow one bf16 step (2^-7 relative)
        excess = (grad.float() - ref_grad.float()).abs() - 2 ** -7 * ref_grad.float().abs()
        worst_grad = max(worst_grad, float(excess.max()))
    if not (worst_value <= 1e-4 and worst_grad <= 1e-6):
        raise AssertionError(f"fused log-probs differ from the unfused computation: values by {worst_value:.2e} "
                             f"(limit 1e-4), gradients by {worst_grad:.2e} beyond one bf16 step (limit 1e-6)")
    return dict(figure=f"max abs diff {worst_value:.2e} (log-probs, entropy), gradients within one bf16 step; "
                       f"{tokens} tokens x vocab {vocab}, whole and chunked",
                max_abs_diff=worst_value, grad_excess_over_bf16_step=worst_grad, tokens=tokens, vocab=vocab)
