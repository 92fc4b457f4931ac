"""Fused target log-probs and full-vocabulary entropy from vocabulary-parallel logits, with a memory bound.

Layout (Megatron convention, output of `ColumnParallelLinear(gather_output=False)`): with TP size W, each rank holds
logits [..., V_local] for the contiguous vocabulary slice [rank * V_local, (rank + 1) * V_local) of the padded
vocabulary W * V_local. Columns at or beyond the true `vocab_size` are padding and are masked to -inf.

With z = logits / temperature (float32, or float64 for float64 input), m = max_v z_v, s = z - m, e = exp(s):
    S0 = sum_v e_v,  S1 = sum_v e_v * s_v,  lse = m + log S0
    logp[target] = s_target - log S0,    H = -sum_v p_v log p_v = log S0 - S1 / S0
Across TP ranks: one all-reduce MAX (m) and one all-reduce SUM of the stacked [S0, S1, s_target] (only the rank
owning the target contributes s_target; the others add 0). Gradient w.r.t. the local logits, per token, for upstream
gradients g_lp (of logp) and g_H (of H), with onehot the target indicator:
    dL/dz = g_lp * (onehot - p) - g_H * p * (log p + H) = C * onehot - A * p - B * p log p,
    A = g_lp + g_H * H,  B = g_H,  C = g_lp;  dL/dlogits = dL/dz / temperature.
It only needs local p and the per-token H, so backward communicates nothing (as in Megatron, the input-gradient
all-reduce of the preceding column-parallel layer combines the ranks).

Memory (N tokens, compute dtype c = float32, or float64 for float64 input; "buffer" = N x V_local elements of c):
  chunk_size=None: forward allocates ONE buffer. It is filled with z, turned in place into e, then into e * log e to
    get S1 (so no second buffer is needed for the product), then refilled in place with p = exp(z - lse) and SAVED.
    Saved for backward: p [N, V_local] (c) + tloc [N] int64 + owned [N] bool + H [N] (c). Backward writes the gradient
    directly for c-typed logits; for bf16/fp16 logits it needs one more c-typed buffer before the downcast.
  chunk_size=k: the same steps run k tokens at a time in one reused [k, V_local] buffer; nothing logits-sized is
    kept. Saved: a reference to the INPUT logits (no copy) + lse, H [N] (c) + tloc, owned [N]. Backward recomputes
    p per chunk into a [k, V_local] buffer (plus a second one for bf16/fp16 logits) and writes each gradient chunk.
  Non-contiguous logits (e.g. a transposed [s, b, v] tensor) cost one extra copy to flatten; pass contiguous ones.
The caller's logits are never modified. Outputs are in c (float32 for bf16/fp16/fp32 input); the gradient is in the
logits' dtype. Targets must lie in [0, vocab_size): an ignore index such as -100 is owned by no rank and yields a
meaningless (finite) value, so mask such tokens in the loss. Backward is not itself differentiable.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = ["VocabParallelLogprobsEntropy", "vocab_parallel_logprobs_entropy"]


def _tp_info(tp_group) -> tuple[object | None, int]:
    """(group or None when no communication is needed, rank in the group)."""
    if tp_group is None or not (dist.is_available() and dist.is_initialized()):
        return None, 0
    if dist.get_world_size(tp_group) == 1:
        return None, 0
    return tp_group, dist.get_rank(tp_group)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        # gloo (torch 2.13) mishandles non-contiguous tensors in collectives: only ever hand it contiguous ones.
        assert t.is_contiguous()
        dist.all_reduce(t, op=op, group=group)
    return t


def _scaled_into(buf: torch.Tensor, x: torch.Tensor, temperature: float, pad_from: int, masked=None) -> torch.Tensor:
    """buf [k, V_local] (compute dtype) <- x [k, V_local] / temperature; padded and masked columns -inf."""
    buf.copy_(x)  # the upcast happens here, so bf16 logits are never divided in bf16
    if temperature != 1.0:
        buf.div_(temperature)
    if pad_from < buf.shape[-1]:
        buf[:, pad_from:] = float("-inf")  # padded vocabulary entries take no probability mass
    if masked is not None:
        buf.index_fill_(1, masked, float("-inf"))  # tokens the sampler blocks: the same distribution as the engine
    return buf


def _probs_into(buf, x, lse, temperature, pad_from, masked) -> torch.Tensor:
    """buf [k, V_local] <- softmax probabilities p = exp(z - lse) of the local slice (global normaliser lse [k])."""
    _scaled_into(buf, x, temperature, pad_from, masked)
    return buf.sub_(lse.unsqueeze(-1)).exp_()


def _chunk_stats(buf, x, tloc, owned, temperature, pad_from, masked, group):
    """Per-token (lse, logp[target], H), each [k], for the chunk x [k, V_local]; buf [k, V_local] is scratch."""
    _scaled_into(buf, x, temperature, pad_from, masked)
    m = buf.amax(dim=-1)  # a rank whose slice is all padding gives -inf here; MAX over ranks fixes it
    _all_reduce(m, dist.ReduceOp.MAX, group)
    buf.sub_(m.unsqueeze(-1))  # s = z - m <= 0: exp cannot overflow
    s_t = torch.where(owned, buf.gather(1, tloc.unsqueeze(-1)).squeeze(-1), 0.0)  # non-owners add 0
    buf.exp_()  # e
    sum_e = buf.sum(-1)
    # e * log(e) = e * s, computed in place: the product needs no second buffer. xlogy gives 0 where e underflows
    # to 0 (padding, very unlikely tokens), where e * s would be 0 * -inf = nan for padding.
    buf.xlogy_(buf)
    sum_es = buf.sum(-1)
    stats = _all_reduce(torch.stack([sum_e, sum_es, s_t]), dist.ReduceOp.SUM, group)  # one collective for three
    sum_e, sum_es, s_t = stats.unbind(0)
    log_s0 = sum_e.log()
    return m + log_s0, s_t - log_s0, log_s0 - sum_es / sum_e


def _grad_into(out, p, a, b, c, tloc) -> torch.Tensor:
    """out [k, V_local] <- c * onehot(tloc) - a * p - b * p log p, with a, b, c [k] (b None: no entropy gradient).

    Only `out` is written: p log p goes straight into it (xlogy, 0 where p == 0) and p * a is fused in by addcmul.
    """
    if b is None:
        torch.mul(p, a.neg().unsqueeze(-1), out=out)
    else:
        torch.special.xlogy(p, p, out=out)
        out.mul_(b.neg().unsqueeze(-1))
        out.addcmul_(p, a.unsqueeze(-1), value=-1.0)
    if c is not None:
        out.scatter_add_(1, tloc.unsqueeze(-1), c.unsqueeze(-1))  # c is 0 for tokens this rank does not own
    return out


class VocabParallelLogprobsEntropy(torch.autograd.Function):
    """(logits [..., V_local], target [...]) -> (logprobs [...], entropy [...]); see the module docstring.

    Prefer the wrapper `vocab_parallel_logprobs_entropy`, which resolves the group, slice start and padding.
    """

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, pad_from, masked, temperature, chunk_size):
        v_local = logits.shape[-1]
        x = logits.reshape(-1, v_local)  # a view for contiguous logits
        n = x.shape[0]
        cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        tloc = target.reshape(-1).to(torch.long) - vocab_start
        owned = (tloc >= 0) & (tloc < v_local)
        tloc = torch.where(owned, tloc, 0)  # any valid column; the owned mask zeroes its contribution
        rows = max(1, n if chunk_size is None else min(chunk_size, n))
        buf = x.new_empty((rows, v_local), dtype=cdtype)  # the ONE logits-sized (or chunk-sized) buffer
        lse, logp, ent = (x.new_empty(n, dtype=cdtype) for _ in range(3))
        for i in range(0, n, rows):
            j = min(i + rows, n)
            lse[i:j], logp[i:j], ent[i:j] = _chunk_stats(
                buf[: j - i], x[i:j], tloc[i:j], owned[i:j], temperature, pad_from, masked, group
            )
        if chunk_size is None:
            # Refill the same buffer with p (what backward needs) instead of keeping the input logits.
            ctx.save_for_backward(_probs_into(buf, x, lse, temperature, pad_from, masked), tloc, owned, ent)
        else:
            del buf  # chunk scratch only; backward recomputes p from the input logits
            ctx.save_for_backward(logits, lse, tloc, owned, ent)
        ctx.chunked = chunk_size is not None
        ctx.rows, ctx.temperature, ctx.pad_from, ctx.masked = rows, temperature, pad_from, masked
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        ctx.set_materialize_grads(False)  # a None upstream gradient skips its term instead of adding zeros
        return logp.view(target.shape), ent.view(target.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent):
        if g_logp is None and g_ent is None:
            return (None,) * 8
        if ctx.chunked:
            logits, lse, tloc, owned, ent = ctx.saved_tensors
            x = logits.reshape(-1, logits.shape[-1])
        else:
            probs, tloc, owned, ent = ctx.saved_tensors
        cdtype, n, t = ent.dtype, ent.numel(), ctx.temperature
        v_local = ctx.logits_shape[-1]
        # Per-token coefficients of dL/dz (module docstring), with the 1 / temperature of dz/dlogits folded in.
        g_lp = None if g_logp is None else g_logp.reshape(-1).to(cdtype)
        g_h = None if g_ent is None else g_ent.reshape(-1).to(cdtype)
        a = (g_lp if g_lp is not None else 0.0) + (g_h * ent if g_h is not None else 0.0)
        a = a / t
        b = None if g_h is None else g_h / t
        c = None if g_lp is None else torch.where(owned, g_lp / t, 0.0)

        grad = torch.empty(ctx.logits_shape, dtype=ctx.logits_dtype, device=ent.device)
        grad2 = grad.view(-1, v_local)
        rows = ctx.rows
        work = grad2.new_empty((rows, v_local), dtype=cdtype) if ctx.chunked else None
        # bf16/fp16 logits: compute each chunk in float32, then downcast into the gradient.
        scratch = None if ctx.logits_dtype == cdtype else grad2.new_empty((rows, v_local), dtype=cdtype)
        for i in range(0, n, rows):
            j = min(i + rows, n)
            if ctx.chunked:
                p = _probs_into(work[: j - i], x[i:j], lse[i:j], t, ctx.pad_from, ctx.masked)
            else:
                p = probs[i:j]
            out = grad2[i:j] if scratch is None else scratch[: j - i]
            _grad_into(out, p, a[i:j], None if b is None else b[i:j], None if c is None else c[i:j], tloc[i:j])
            if scratch is not None:
                grad2[i:j].copy_(out)
        return grad, None, None, None, None, None, None, None


def vocab_parallel_logprobs_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    masked_token_ids: torch.Tensor | list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target-token log-probs and full-vocabulary entropy of softmax(logits / temperature), vocabulary-parallel.

    logits: [..., V_local] (any float dtype; e.g. Megatron's [s, b, V_local] or [b, s, V_local]), this rank's
      contiguous vocabulary slice. target: [...] integer token ids in the GLOBAL vocabulary, same leading shape.
    tp_group: tensor-parallel process group; None (or a group of size 1) runs the single-process path.
    temperature: the rollout's sampling temperature (> 0); logits are divided by it, gradients scaled accordingly.
    chunk_size: process (and in backward recompute) this many flattened tokens at a time so that the scratch is
      [chunk_size, V_local] and nothing logits-sized is saved; None processes all tokens at once and saves p.
    vocab_start_index: global id of this slice's first column; default rank * V_local.
    vocab_size: true vocabulary size; columns with global id >= vocab_size (TP padding) are excluded.
    masked_token_ids: global ids excluded from the softmax as well (tokens the rollout engine never samples, so the
      trainer's distribution is the engine's); their logits get no gradient.
    Returns (logprobs [...], entropy [...]) in float32 (float64 for float64 logits); both carry gradients.
    """
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} must equal logits shape without the vocab dim "
                         f"{tuple(logits.shape[:-1])}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer token ids, got {target.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size}")
    group, rank = _tp_info(tp_group)
    v_local = logits.shape[-1]
    start = rank * v_local if vocab_start_index is None else int(vocab_start_index)
    pad_from = v_local if vocab_size is None else max(0, min(v_local, int(vocab_size) - start))
    masked = None
    if masked_token_ids is not None and len(masked_token_ids):
        ids = torch.as_tensor(masked_token_ids, dtype=torch.long, device=logits.device) - start
        ids = ids[(ids >= 0) & (ids < v_local)]
        masked = ids if ids.numel() else None
    return VocabParallelLogprobsEntropy.apply(
        logits, target, group, start, pad_from, masked, float(temperature), chunk_size
    )
