"""Per-token KL(p || q) over the full vocabulary between two vocabulary-parallel logit tensors, with gradient to both.

Layout as in vocab_parallel_logprobs.py: with TP size W each rank holds logits [N, V_local] for the contiguous slice
[rank * V_local, (rank + 1) * V_local) of the padded vocabulary; columns at or past the true `vocab_size` (TP
padding) and `masked_token_ids` (tokens the rollout engine never samples) are left out of both softmaxes.

With a = logits_p / temperature, b = logits_q / temperature (float32, or float64 for float64 input):
    log p = a - lse(a),  log q = b - lse(b),  KL = sum_v p_v (log p_v - log q_v)
Across TP ranks: one all-reduce MAX of the stacked maxima [2, N], one all-reduce SUM of the stacked [sum e^a, sum e^b]
and one SUM of the local KL terms. Gradient, per token, for an upstream gradient g:
    dKL/da_v = p_v (log p_v - log q_v - KL),    dKL/db_v = q_v - p_v,    d/dlogits = d/da / temperature
Both need only the local slice and per-token lse(a), lse(b), KL, so backward communicates nothing (the input-gradient
all-reduce of the output layer's column-parallel input combines the ranks, as for the fused log-prob op).

Memory: forward works in float32 on a few [k, V_local] temporaries at a time (k = chunk_size rows, or all N) and
saves the two INPUT tensors (no copy) plus three [N] vectors; backward recomputes p and q from them chunk by chunk and
writes the two gradients (each the inputs' size and dtype). Callers pass only the tokens that carry the loss (the
response positions), so N is the number of response tokens of a micro-batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from mssr_megatron.ops.vocab_parallel_logprobs import _all_reduce, _tp_info

__all__ = ["VocabParallelKL", "vocab_parallel_kl"]


def _scaled(x: torch.Tensor, temperature: float, excluded: torch.Tensor | None) -> torch.Tensor:
    """x [N, V_local] / temperature in the compute dtype, excluded columns -inf."""
    z = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32) / temperature
    if excluded is not None:
        z = z.masked_fill(excluded, float("-inf"))
    return z


def _log_probs(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    return z - lse.unsqueeze(-1)


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, p * (log p - log q)) with 0 where p == 0 (excluded columns: -inf - -inf would be nan)."""
    p = log_p.exp()
    return p, torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def _chunk_kl(x_p, x_q, group, excluded, temperature) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse [2, k] of both, KL [k]) for one chunk of k rows."""
    a, b = _scaled(x_p, temperature, excluded), _scaled(x_q, temperature, excluded)
    maxima = torch.stack([a.amax(-1), b.amax(-1)])  # a rank whose slice is all padding gives -inf: MAX fixes it
    _all_reduce(maxima, dist.ReduceOp.MAX, group)
    sums = torch.stack([(a - maxima[0].unsqueeze(-1)).exp().sum(-1), (b - maxima[1].unsqueeze(-1)).exp().sum(-1)])
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    lse = maxima + sums.log()
    _, terms = _kl_terms(_log_probs(a, lse[0]), _log_probs(b, lse[1]))
    return lse, _all_reduce(terms.sum(-1).contiguous(), dist.ReduceOp.SUM, group)


class VocabParallelKL(torch.autograd.Function):
    """(logits_p [N, V_local], logits_q [N, V_local]) -> KL(p || q) [N]; see the module docstring. Rows are taken
    `rows` at a time (every rank the same chunks: each chunk is one set of collectives)."""

    @staticmethod
    def forward(ctx, logits_p, logits_q, group, excluded, temperature, rows):
        n = logits_p.shape[0]
        cdtype = torch.float64 if logits_p.dtype == torch.float64 else torch.float32
        lse, kl = logits_p.new_empty((2, n), dtype=cdtype), logits_p.new_empty(n, dtype=cdtype)
        for i in range(0, n, rows):
            lse[:, i:i + rows], kl[i:i + rows] = _chunk_kl(logits_p[i:i + rows], logits_q[i:i + rows], group, excluded,
                                                           temperature)
        ctx.save_for_backward(logits_p, logits_q, lse, kl)
        ctx.excluded, ctx.temperature, ctx.rows = excluded, temperature, rows
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        logits_p, logits_q, lse, kl = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        grad_p, grad_q = torch.empty_like(logits_p), torch.empty_like(logits_q)
        for i in range(0, logits_p.shape[0], rows):
            j = slice(i, i + rows)
            log_p = _log_probs(_scaled(logits_p[j], t, ctx.excluded), lse[0, j])
            log_q = _log_probs(_scaled(logits_q[j], t, ctx.excluded), lse[1, j])
            p, terms = _kl_terms(log_p, log_q)
            g = grad_kl[j].to(kl.dtype).unsqueeze(-1) / t
            grad_p[j] = (terms - p * kl[j].unsqueeze(-1)) * g  # p (log p - log q - KL); 0 on excluded columns
            grad_q[j] = (log_q.exp() - p) * g
        return grad_p, grad_q, None, None, None, None


def vocab_parallel_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, *, tp_group=None, temperature: float = 1.0,
                      vocab_size: int | None = None, masked_token_ids=None,
                      chunk_size: int | None = None) -> torch.Tensor:
    """KL(softmax(logits_p / T) || softmax(logits_q / T)) per row, over the full (TP-split) vocabulary.

    logits_p, logits_q: [N, V_local], this rank's contiguous vocabulary slice (slice start rank * V_local).
    tp_group: tensor-parallel group; None (or size 1) runs the single-process path. vocab_size: the true vocabulary
    (padding columns past it are excluded); masked_token_ids: global ids excluded from both softmaxes.
    chunk_size: rows per chunk (model.logprob_chunk_tokens), which bounds the float32 scratch to a few
    [chunk_size, V_local] tensors in forward and in backward; None: all rows at once.
    Returns [N] in float32 (float64 for float64 logits), the same on every TP rank; gradient flows to both inputs.
    """
    if logits_p.shape != logits_q.shape or logits_p.dim() != 2:
        raise ValueError(f"vocab_parallel_kl needs two [N, V_local] logit tensors of one shape, got "
                         f"{tuple(logits_p.shape)} and {tuple(logits_q.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}")
    group, rank = _tp_info(tp_group)
    v_local = logits_p.shape[-1]
    start = rank * v_local
    columns = torch.arange(start, start + v_local, device=logits_p.device)
    excluded = torch.zeros(v_local, dtype=torch.bool, device=logits_p.device)
    if vocab_size is not None:
        excluded |= columns >= int(vocab_size)
    if masked_token_ids is not None and len(masked_token_ids):
        excluded |= torch.isin(columns, torch.as_tensor(masked_token_ids, dtype=torch.long, device=columns.device))
    return VocabParallelKL.apply(logits_p, logits_q, group, excluded if excluded.any() else None, float(temperature),
                               max(1, chunk_size or logits_p.shape[0]))
