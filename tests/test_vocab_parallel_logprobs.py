"""Fused vocabulary-parallel target log-probs + entropy: values and gradients against the unfused autograd
reference (TP=1 and TP=2 on real gloo processes), gradcheck, and the memory bound measured in bytes."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mssr_megatron.parallel import free_port
from mssr_megatron.ops import vocab_parallel_logprobs_entropy

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float64: dict(rtol=0, atol=1e-6), torch.float32: dict(rtol=0, atol=1e-5)}


def reference(logits, target, *, temperature=1.0, vocab_size=None, g_lp=None, g_h=None):
    """Unfused: log_softmax over the true vocabulary, gather, entropy = -(p * logp).sum(-1), autograd.

    Returns (logp, entropy, grad w.r.t. the full-width logits; padded columns get 0)."""
    x = logits.detach().clone().requires_grad_()
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    logp_all = torch.log_softmax(x[..., :vocab_size].to(cdtype) / temperature, dim=-1)
    logp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    loss = sum((out * g).sum() for out, g in ((logp, g_lp), (ent, g_h)) if g is not None)
    grad = torch.autograd.grad(loss, x)[0] if g_lp is not None or g_h is not None else None
    return logp.detach(), ent.detach(), grad


def fused(logits, target, *, g_lp=None, g_h=None, **kw):
    x = logits.detach().clone().requires_grad_()
    logp, ent = vocab_parallel_logprobs_entropy(x, target, **kw)
    loss = sum((out * g).sum() for out, g in ((logp, g_lp), (ent, g_h)) if g is not None)
    grad = torch.autograd.grad(loss, x)[0] if g_lp is not None or g_h is not None else None
    return logp.detach(), ent.detach(), grad


def make_inputs(shape, width, vocab_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, width, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, vocab_size, shape, generator=g)
    g_lp, g_h = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    return logits, target, g_lp, g_h


# ----------------------------------------------------------------------------------------------------- TP = 1
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [None, 5, 1000])  # 5 does not divide the 21 tokens; 1000 > tokens
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("vocab_size", [13, 11])  # 11: two padded columns that must take no probability mass
@pytest.mark.parametrize("grads", ["both", "logp", "entropy"])
def test_single_process_matches_unfused(dtype, chunk, temperature, vocab_size, grads):
    logits, target, g_lp, g_h = make_inputs((3, 7), 13, vocab_size, dtype)
    logits[..., vocab_size:] = 50.0  # huge padded logits: would dominate the softmax if not masked
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    g_lp = g_lp.to(cd) if grads in ("both", "logp") else None
    g_h = g_h.to(cd) if grads in ("both", "entropy") else None
    before = logits.clone()
    kw = dict(temperature=temperature, vocab_size=vocab_size)
    ref = reference(logits, target, g_lp=g_lp, g_h=g_h, **kw)
    out = fused(logits, target, g_lp=g_lp, g_h=g_h, chunk_size=chunk, **kw)
    for got, want in zip(out, ref):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **TOL[dtype])
    assert torch.equal(out[2][..., vocab_size:], torch.zeros_like(out[2][..., vocab_size:]))
    assert torch.equal(logits, before)


@pytest.mark.parametrize("chunk", [None, 4])
def test_bf16_input_computes_in_float32(chunk):
    logits, target, g_lp, g_h = make_inputs((2, 9), 16, 14, torch.bfloat16)
    g_lp, g_h = g_lp.float(), g_h.float()
    ref = reference(logits, target, temperature=0.9, vocab_size=14, g_lp=g_lp, g_h=g_h)  # on the upcast values
    logp, ent, grad = fused(logits, target, temperature=0.9, vocab_size=14, chunk_size=chunk, g_lp=g_lp, g_h=g_h)
    assert logp.dtype == ent.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(logp, ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ref[1], rtol=0, atol=1e-5)
    # Both gradients are float32 values rounded once to bf16: equal up to one bf16 rounding step.
    torch.testing.assert_close(grad.float(), ref[2].float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("layout", ["[T,B]", "[B,T]-transposed", "flat", "4d"])
def test_leading_shapes_and_non_contiguous_logits(layout):
    logits, target, g_lp, g_h = make_inputs((6, 4), 10, 10, torch.float64)
    if layout == "[B,T]-transposed":  # Megatron's [s, b, v] read as [b, s, v]: a non-contiguous view
        logits, target, g_lp, g_h = logits.transpose(0, 1), target.t(), g_lp.t(), g_h.t()
    elif layout == "flat":
        logits, target, g_lp, g_h = logits.reshape(24, 10), target.reshape(24), g_lp.reshape(24), g_h.reshape(24)
    elif layout == "4d":
        logits, target = logits.reshape(2, 3, 4, 10), target.reshape(2, 3, 4)
        g_lp, g_h = g_lp.reshape(2, 3, 4), g_h.reshape(2, 3, 4)
    for chunk in (None, 7):
        out = fused(logits, target, chunk_size=chunk, g_lp=g_lp, g_h=g_h)
        for got, want in zip(out, reference(logits, target, g_lp=g_lp, g_h=g_h)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_slice_start_and_padding_in_one_process():
    """Without a group a slice normalises over itself only: same as the reference on that slice."""
    logits, _, g_lp, g_h = make_inputs((5,), 8, 8, torch.float64)
    target = torch.tensor([20, 21, 23, 22, 20])  # global ids 20..25 live in local columns 0..5
    out = fused(logits, target, vocab_start_index=20, vocab_size=26, g_lp=g_lp, g_h=g_h)
    ref = reference(logits, target - 20, vocab_size=6, g_lp=g_lp, g_h=g_h)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_peaked_distributions_stay_finite(dtype):
    """Logits spread over thousands: most exp() underflow to 0, entropy ~ 0; nothing may turn into nan."""
    logits, target, g_lp, g_h = make_inputs((4, 5), 12, 10, dtype)
    logits = logits * 1000
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    g_lp, g_h = g_lp.to(cd), g_h.to(cd)
    for chunk in (None, 3):
        out = fused(logits, target, vocab_size=10, chunk_size=chunk, g_lp=g_lp, g_h=g_h)
        ref = reference(logits, target, vocab_size=10, g_lp=g_lp, g_h=g_h)
        for got, want in zip(out, ref):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, **{**TOL[dtype], "rtol": 1e-6})  # log-probs reach -1e4


def test_retain_graph_backward_twice_gives_the_same_gradient():
    logits, target, g_lp, g_h = make_inputs((4,), 6, 6, torch.float64)
    for chunk in (None, 3):
        x = logits.clone().requires_grad_()
        logp, ent = vocab_parallel_logprobs_entropy(x, target, chunk_size=chunk)
        loss = (logp * g_lp).sum() + (ent * g_h).sum()
        first = torch.autograd.grad(loss, x, retain_graph=True)[0]
        torch.testing.assert_close(torch.autograd.grad(loss, x)[0], first, rtol=0, atol=0)


def test_bad_arguments_are_rejected():
    x, t = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_logprobs_entropy(x, t[:, :2])
    with pytest.raises(TypeError, match="integer"):
        vocab_parallel_logprobs_entropy(x, t.float())
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs_entropy(x, t, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_logprobs_entropy(x, t, chunk_size=0)


@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck_float64(chunk):
    logits, target, _, _ = make_inputs((2, 3), 6, 5, torch.float64, seed=3)
    x = logits.requires_grad_()
    fn = lambda z: vocab_parallel_logprobs_entropy(z, target, temperature=0.6, chunk_size=chunk, vocab_size=5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------- TP = 2
# (name, dtype, true vocab, padded width, chunk, temperature, which upstream gradients)
TP_CASES = [
    ("f64-pad10to12", torch.float64, 10, 12, None, 0.8, "both"),
    ("f64-pad10to12-chunk3", torch.float64, 10, 12, 3, 0.8, "both"),
    ("f32-pad10to12-chunk4", torch.float32, 10, 12, 4, 1.0, "both"),
    ("f64-logp-only", torch.float64, 10, 12, 3, 1.3, "logp"),
    ("f64-entropy-only", torch.float64, 10, 12, None, 1.3, "entropy"),
    ("f64-rank1-all-padding", torch.float64, 5, 12, 4, 1.0, "both"),  # rank 1's slice holds only padding
    ("bf16-chunk3", torch.bfloat16, 10, 12, 3, 0.8, "both"),
]
TP_SHAPE = (2, 5)  # 10 tokens: chunks of 3 and 4 leave a remainder


def _case_inputs(case):
    name, dtype, vocab, width, chunk, temperature, which = case
    logits, target, g_lp, g_h = make_inputs(TP_SHAPE, width, vocab, dtype, seed=len(name))
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    return logits, target, (g_lp.to(cd) if which != "entropy" else None), (g_h.to(cd) if which != "logp" else None)


def _tp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {}
        for case in TP_CASES:
            name, _, vocab, width, chunk, temperature, _ = case
            logits, target, g_lp, g_h = _case_inputs(case)  # the same full logits on both ranks (fixed seed)
            v_local = width // 2
            local = logits[..., rank * v_local:(rank + 1) * v_local].contiguous()  # gloo wants contiguous
            before = local.clone()
            results[name] = fused(local, target, g_lp=g_lp, g_h=g_h, tp_group=dist.group.WORLD,
                                  temperature=temperature, chunk_size=chunk, vocab_size=vocab)
            assert torch.equal(local, before), f"{name}: the caller's logits were modified"
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2")
    mp.spawn(_tp_worker, args=(free_port(), str(out)), nprocs=2, join=True)  # raises if a worker fails
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", TP_CASES, ids=[c[0] for c in TP_CASES])
def test_two_tp_ranks_match_unfused_on_full_vocab(tp2_results, case):
    name, dtype, vocab, width, _, temperature, _ = case
    logits, target, g_lp, g_h = _case_inputs(case)
    ref_logp, ref_ent, ref_grad = reference(logits, target, temperature=temperature, vocab_size=vocab,
                                            g_lp=g_lp, g_h=g_h)
    tol = TOL[torch.float64 if dtype == torch.float64 else torch.float32]
    v_local = width // 2
    for rank, res in enumerate(tp2_results):
        logp, ent, grad = res[name]
        torch.testing.assert_close(logp, ref_logp, **tol)  # replicated on every TP rank
        torch.testing.assert_close(ent, ref_ent, **tol)
        want = ref_grad[..., rank * v_local:(rank + 1) * v_local]
        if dtype == torch.bfloat16:
            torch.testing.assert_close(grad.float(), want.float(), rtol=2**-7, atol=1e-6)
        else:
            torch.testing.assert_close(grad, want, **tol)


# ----------------------------------------------------------------------------------------------------- memory
def _load_tool():
    spec = importlib.util.spec_from_file_location("measure_logprob_memory", ROOT / "tools/measure_logprob_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_memory_bound_in_bytes():
    """Saved-for-backward bytes (saved_tensors_hooks) and peak allocated bytes (profiler allocation events).

    N tokens x V vocab float32: one buffer = 4 N V bytes. Per-token stats cost a few dozen bytes per token."""
    tool = _load_tool()
    n_tokens, vocab, chunk = 512, 2048, 100
    buffer, chunk_buffer, small = 4 * n_tokens * vocab, 4 * chunk * vocab, 64 * n_tokens + 4096
    logits = torch.randn(n_tokens, vocab)
    target = torch.randint(0, vocab, (n_tokens,))
    unfused = tool.measure("unfused", logits, target)
    fused_ = tool.measure("fused", logits, target)
    chunked = tool.measure("chunked", logits, target, chunk=chunk)
    # The reference keeps log p and p (two buffers) and allocates more in forward.
    assert unfused.saved >= 2 * buffer and unfused.forward_peak >= 3 * buffer
    # Fused: p is the only logits-sized tensor kept, and the only one allocated in forward.
    assert buffer <= fused_.saved <= buffer + small
    assert buffer <= fused_.forward_peak <= buffer + small
    assert fused_.backward_peak <= buffer + small  # just the gradient being returned
    # Chunked: only per-token stats are kept (the input logits are referenced, not copied) ...
    assert chunked.saved <= 32 * n_tokens
    # ... forward needs one chunk-sized buffer, backward the gradient plus one chunk-sized buffer.
    assert chunked.forward_peak <= chunk_buffer + small
    assert chunked.backward_peak <= buffer + chunk_buffer + small


def test_memory_bound_bf16_chunked():
    """bf16 logits: float32 work happens per chunk; the bf16 gradient plus two float32 chunks in backward."""
    tool = _load_tool()
    n_tokens, vocab, chunk = 256, 2048, 64
    logits = torch.randn(n_tokens, vocab).bfloat16()
    target = torch.randint(0, vocab, (n_tokens,))
    m = tool.measure("chunked", logits, target, chunk=chunk)
    small = 64 * n_tokens + 4096
    assert m.saved <= 32 * n_tokens
    assert m.forward_peak <= 4 * chunk * vocab + small
    assert m.backward_peak <= 2 * n_tokens * vocab + 2 * 4 * chunk * vocab + small


@pytest.mark.parametrize("chunk", [None, 3])
def test_masked_token_ids_match_a_reference_with_those_columns_removed(chunk):
    """Blocked tokens (never sampled by the engine) leave the softmax: same values and gradients as dropping them."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 5, 12, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 8, (2, 5), generator=gen)
    g_lp, g_h = torch.randn(2, 5, generator=gen, dtype=torch.float64), torch.randn(2, 5, generator=gen, dtype=torch.float64)
    masked = [8, 10]
    keep = torch.ones(12, dtype=torch.bool)
    keep[masked + [11]] = False  # 11 is vocabulary padding (vocab_size=11)
    ref_lp, ref_h, ref_grad = reference(logits[..., keep], target, g_lp=g_lp, g_h=g_h)  # targets < 8 keep their index
    lp, h, grad = fused(logits, target, g_lp=g_lp, g_h=g_h, chunk_size=chunk, vocab_size=11, masked_token_ids=masked)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(grad[..., keep], ref_grad)
    assert torch.all(grad[..., ~keep] == 0)
