"""SDPACoreAttention (models/sdpa_attention.py) against megatron-core's own DotProductAttention, the unfused local core
attention it replaces, built from the same TransformerConfig: the same context and the same query / key / value
gradients (float32, <= 1e-5) for grouped-query and plain multi-head attention, the causal mask megatron builds itself
(attention_mask=None: the model's path), an explicit boolean mask (True = masked out) with either mask type, query-key
layer scaling and an explicit softmax scale; the options it refuses (context parallelism, sliding windows, non-vanilla
softmax, packed sequences, attention bias) raise ValueError; and the local layer spec builds it with the keywords
megatron's SelfAttention passes. Megatron runs in this process (one gloo rank, megatron_patches.cpu)."""

from __future__ import annotations

import inspect

import pytest
import torch

from megatron_harness import megatron_in_this_process

TOL = 1e-5
SQ, B, HN = 7, 3, 8


@pytest.fixture(scope="module")
def megatron():
    """Megatron-core's parallel state for one CPU process."""
    with megatron_in_this_process():
        yield


def _config(heads: int = 4, groups: int = 2, **extra):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=heads * HN, num_attention_heads=heads, num_query_groups=groups,
                             kv_channels=HN, attention_dropout=0.0, hidden_dropout=0.0, masked_softmax_fusion=False,
                             use_cpu_initialization=True, **extra)


def _pair(config, mask_type, layer_number: int = 1, softmax_scale=None):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from mssr_megatron.models.sdpa_attention import SDPACoreAttention

    kwargs = dict(config=config, layer_number=layer_number, attn_mask_type=mask_type, attention_type="self",
                  softmax_scale=softmax_scale)
    return DotProductAttention(**kwargs).eval(), SDPACoreAttention(**kwargs).eval()


def _qkv(heads: int, groups: int, sq: int = SQ, sk: int = SQ, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(sq, B, heads, HN, generator=gen), torch.randn(sk, B, groups, HN, generator=gen),
            torch.randn(sk, B, groups, HN, generator=gen))


def _run(module, qkv, mask, **kwargs):
    """Context and the query / key / value gradients of a fixed random linear function of it."""
    q, k, v = (t.clone().requires_grad_() for t in qkv)
    out = module(q, k, v, mask, **kwargs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _assert_same(reference, ours):
    for what, r, o in zip(("context", "query grad", "key grad", "value grad"), reference, ours):
        assert o.shape == r.shape, what
        assert torch.isfinite(r).all(), what
        diff = (o - r).abs().max().item()
        assert diff <= TOL, f"{what}: max abs diff {diff}"


def _padded_causal_mask(sq: int, lengths: list[int]) -> torch.Tensor:
    """[b, 1, sq, sk] bool, True = masked out: causal, plus each row's keys at or beyond its length (right padding;
    every query still sees key 0, so no row is fully masked)."""
    causal = torch.ones(sq, sq, dtype=torch.bool).triu(1)
    padded = torch.arange(sq)[None, :] >= torch.tensor(lengths)[:, None]  # [b, sk]
    return causal[None, None] | padded[:, None, None, :]


# ---------------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4), (4, 1)], ids=["gqa_4h_2g", "mha_4h_4g", "mqa_4h_1g"])
def test_causal_without_a_mask_matches_dot_product_attention(megatron, heads, groups):
    """The model's path: AttnMaskType.causal with attention_mask=None (megatron builds the causal mask itself)."""
    from megatron.core.transformer.enums import AttnMaskType

    reference, ours = _pair(_config(heads, groups), AttnMaskType.causal)
    qkv = _qkv(heads, groups)
    _assert_same(_run(reference, qkv, None), _run(ours, qkv, None))


def test_the_causal_mask_is_applied(megatron):
    """Not a no-op mask: the first query's context is the first value itself (its only visible key)."""
    from megatron.core.transformer.enums import AttnMaskType

    _, ours = _pair(_config(4, 2), AttnMaskType.causal)
    q, k, v = _qkv(4, 2)
    with torch.no_grad():
        out = ours(q, k, v, None)
    expected = v[0].repeat_interleave(2, dim=1).reshape(B, 4 * HN)  # head h reads group h // 2
    assert torch.allclose(out[0], expected, atol=TOL)


@pytest.mark.parametrize("mask_type", ["padding", "causal"])
@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_an_explicit_boolean_mask_matches_dot_product_attention(megatron, mask_type, heads, groups):
    """A [b, 1, sq, sk] bool mask, True = masked out (megatron's attention_mask_func fills those scores with -10000;
    with a mask given, FusedScaleMaskSoftmax's torch path applies it as it is, for either mask type)."""
    from megatron.core.transformer.enums import AttnMaskType

    reference, ours = _pair(_config(heads, groups), getattr(AttnMaskType, mask_type))
    qkv = _qkv(heads, groups)
    mask = _padded_causal_mask(SQ, [7, 5, 3])
    ref = _run(reference, qkv, mask)
    _assert_same(ref, _run(ours, qkv, mask))
    unmasked = _run(reference, qkv, None) if mask_type == "causal" else None
    if unmasked is not None:  # the padding matters: rows 1 and 2 differ from the plain causal result
        assert (ref[0][:, 1:] - unmasked[0][:, 1:]).abs().max() > 1e-3


def test_a_non_causal_mask_broadcast_over_the_batch_matches(megatron):
    """A [1, 1, sq, sk] mask that is not causal (some keys hidden from everyone, the future visible)."""
    from megatron.core.transformer.enums import AttnMaskType

    reference, ours = _pair(_config(4, 2), AttnMaskType.padding)
    qkv = _qkv(4, 2)
    mask = torch.zeros(1, 1, SQ, SQ, dtype=torch.bool)
    mask[..., [1, 4]] = True
    _assert_same(_run(reference, qkv, mask), _run(ours, qkv, mask))


def test_one_query_against_many_keys_matches(megatron):
    """sq = 1 with sk > 1 (a decoding step): megatron applies no causal mask then, and neither does SDPA."""
    from megatron.core.transformer.enums import AttnMaskType

    reference, ours = _pair(_config(4, 2), AttnMaskType.causal)
    qkv = _qkv(4, 2, sq=1, sk=5)
    _assert_same(_run(reference, qkv, None), _run(ours, qkv, None))


def test_query_key_layer_scaling_and_an_explicit_scale_match(megatron):
    """apply_query_key_layer_scaling divides the scores by the layer number and the softmax multiplies it back;
    an explicit softmax_scale replaces 1/sqrt(head dim)."""
    from megatron.core.transformer.enums import AttnMaskType

    qkv = _qkv(4, 2)
    reference, ours = _pair(_config(4, 2, apply_query_key_layer_scaling=True), AttnMaskType.causal, layer_number=2)
    _assert_same(_run(reference, qkv, None), _run(ours, qkv, None))
    reference, ours = _pair(_config(4, 2), AttnMaskType.causal, softmax_scale=0.7)
    _assert_same(_run(reference, qkv, None), _run(ours, qkv, None))


def test_training_mode_without_dropout_matches(megatron):
    from megatron.core.transformer.enums import AttnMaskType

    reference, ours = _pair(_config(4, 2), AttnMaskType.causal)
    reference.train(), ours.train()
    qkv = _qkv(4, 2)
    _assert_same(_run(reference, qkv, None), _run(ours, qkv, None))


def test_a_fully_masked_query_row_gives_zeros_and_the_other_rows_match(megatron):
    """The documented difference (sdpa_attention.py): a query row that sees no key (padding, explicit masks only)
    gets zeros from SDPA, the mean of the values from DotProductAttention (all scores -10000, softmax uniform)."""
    from megatron.core.transformer.enums import AttnMaskType

    reference, ours = _pair(_config(4, 2), AttnMaskType.padding)
    qkv = _qkv(4, 2)
    mask = _padded_causal_mask(SQ, [7, 7, 7])
    mask[0, :, 0, :] = True  # batch row 0, query 0 sees no key (e.g. a left-padded position)
    ref, out = reference(*qkv, mask).detach(), ours(*qkv, mask).detach()  # [sq, b, np * hn]
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))
    values = qkv[2][:, 0].repeat_interleave(2, dim=1).mean(0).reshape(-1)  # 2 heads per key/value group
    torch.testing.assert_close(ref[0, 0], values, rtol=0, atol=TOL)
    keep = torch.ones(SQ, B, dtype=torch.bool)
    keep[0, 0] = False
    assert (out - ref)[keep].abs().max().item() <= TOL


# ---------------------------------------------------------------------------------------------------- refusals
def test_context_parallelism_is_refused(megatron):
    from megatron.core.transformer.enums import AttnMaskType

    from mssr_megatron.models.sdpa_attention import SDPACoreAttention

    config = _config()
    config.context_parallel_size = 2  # the world has one rank: set on the built config
    with pytest.raises(ValueError, match="context parallelism"):
        SDPACoreAttention(config, 1, AttnMaskType.causal, "self")


def test_a_sliding_window_is_refused_on_the_layers_that_use_it(megatron):
    from megatron.core.transformer.enums import AttnMaskType

    from mssr_megatron.models.sdpa_attention import SDPACoreAttention

    with pytest.raises(ValueError, match="sliding-window"):
        SDPACoreAttention(_config(window_size=(3, 0)), 1, AttnMaskType.causal, "self")
    # every 2nd layer full attention: layer 2 has no window (megatron's is_layer_window_attention), layer 1 has one
    config = _config(window_size=(3, 0), window_attn_skip_freq=2)
    SDPACoreAttention(config, 2, AttnMaskType.causal, "self")
    with pytest.raises(ValueError, match="sliding-window"):
        SDPACoreAttention(config, 1, AttnMaskType.causal, "self")


@pytest.mark.parametrize("softmax_type", ["off-by-one", "learnable"])
def test_a_non_vanilla_softmax_is_refused(megatron, softmax_type):
    from megatron.core.transformer.enums import AttnMaskType

    from mssr_megatron.models.sdpa_attention import SDPACoreAttention

    config = _config()
    config.softmax_type = softmax_type
    with pytest.raises(ValueError, match="softmax_type"):
        SDPACoreAttention(config, 1, AttnMaskType.causal, "self")


def test_packed_sequences_and_attention_bias_are_refused_at_forward(megatron):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    _, ours = _pair(_config(), AttnMaskType.causal)
    q, k, v = _qkv(4, 2)
    cu = torch.tensor([0, SQ], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=SQ, max_seqlen_kv=SQ)
    with pytest.raises(ValueError, match="packed sequences"):
        ours(q, k, v, None, packed_seq_params=packed)
    with pytest.raises(ValueError, match="attention bias"):
        ours(q, k, v, None, attention_bias=torch.zeros(B, 4, SQ, SQ))


# ---------------------------------------------------------------------------------------------------- layer spec
def test_the_local_layer_spec_uses_sdpa_core_attention():
    from megatron.core.transformer.attention import SelfAttention

    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models.qwen2_5_vl import layer_spec
    from mssr_megatron.models.sdpa_attention import SDPACoreAttention

    spec = layer_spec(ModelConfig(transformer_impl="local"))
    assert spec.submodules.self_attention.module is SelfAttention
    assert spec.submodules.self_attention.submodules.core_attention is SDPACoreAttention


def test_self_attentions_core_attention_keywords_bind():
    """The keywords megatron-core 0.16.1's SelfAttention (Attention.__init__, attention.py) passes to
    submodules.core_attention(...), read from the installed source (the only such call), bind to
    SDPACoreAttention.__init__."""
    import ast

    from megatron.core.transformer import attention

    from mssr_megatron.models.sdpa_attention import SDPACoreAttention

    tree = ast.parse(inspect.getsource(attention))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and ast.unparse(node.func) == "submodules.core_attention"]
    assert len(calls) == 1 and not calls[0].args
    keywords = [kw.arg for kw in calls[0].keywords]
    assert set(keywords) == {"config", "layer_number", "attn_mask_type", "attention_type", "cp_comm_type",
                             "softmax_scale", "pg_collection"}
    inspect.signature(SDPACoreAttention.__init__).bind(None, **{name: None for name in keywords})


@pytest.mark.parametrize("recompute", [None, "selective"])
def test_a_layer_built_from_the_spec_matches_the_same_layer_with_dot_product_attention(megatron, recompute):
    """A whole Qwen2 transformer layer built from layer_spec() (megatron's SelfAttention builds the core attention with
    its own keywords) against the same layer, same weights, from megatron's unmodified local spec; with selective
    recomputation megatron calls the core attention through its checkpoint (attn_mask_type passed positionally)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.spec_utils import build_module

    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models.qwen2_5_vl import language_config, layer_spec
    from mssr_megatron.models.sdpa_attention import SDPACoreAttention
    from mssr_megatron.models.tiny_hf import tiny_qwen2_5_vl_config

    model_cfg = ModelConfig(params_dtype="float32", transformer_impl="local", recompute_granularity=recompute)
    config = language_config(tiny_qwen2_5_vl_config(num_layers=2), model_cfg)
    if recompute:
        assert "core_attn" in config.recompute_modules
    torch.manual_seed(0)
    ours = build_module(layer_spec(model_cfg), config=config, layer_number=1).eval()
    reference = build_module(get_gpt_layer_local_spec(num_experts=None, qk_layernorm=False,
                                                      multi_latent_attention=False, normalization="RMSNorm"),
                             config=config, layer_number=1).eval()
    assert isinstance(ours.self_attention.core_attention, SDPACoreAttention)
    assert isinstance(reference.self_attention.core_attention, DotProductAttention)
    assert ours.self_attention.checkpoint_core_attention == (recompute == "selective")
    reference.load_state_dict(ours.state_dict())
    hidden = torch.randn(SQ, B, config.hidden_size, generator=torch.Generator().manual_seed(2))
    outputs = []
    for layer in (reference, ours):
        x = hidden.clone().requires_grad_()
        out, _ = layer(x, attention_mask=None)
        out.sum().backward()
        outputs.append((out.detach(), x.grad))
    for (r, o), what in zip(zip(*outputs), ("output", "input grad")):
        assert (o - r).abs().max().item() <= TOL, what
