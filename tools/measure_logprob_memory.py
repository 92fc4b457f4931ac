"""Measure what the log-prob/entropy computation keeps for backward and how much it allocates at peak (CPU, bytes).

    python tools/measure_logprob_memory.py [--batch 4 --seq 1024 --vocab 32768 --chunk 1024 --dtype float32]

Compares the unfused reference (log_softmax on the full vocabulary, gather, entropy = -(p * logp).sum(-1), autograd)
with the fused Function (chunk_size=None) and its chunked mode. Two genuine measurements, no estimates:
  saved   bytes of the distinct storages autograd keeps for backward, seen through
          `torch.autograd.graph.saved_tensors_hooks` (storages shared with the input logits are not counted: a
          reference to the input costs nothing extra).
  peak    the highest net number of bytes allocated by the CPU allocator during the forward (resp. the backward)
          above the level at its start, from the allocation/free events that `torch.profiler` records with
          profile_memory=True, replayed in time order. The forward peak includes what is then saved; the backward
          peak includes the logits gradient itself (one input-sized buffer every method must produce).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mssr_megatron.ops import vocab_parallel_logprobs_entropy  # noqa: E402
from mssr_megatron.profiling import peak_allocated_bytes  # noqa: E402


def saved_bytes(fn, exclude: torch.Tensor):
    """(bytes of distinct storages saved for backward while fn() builds its graph, fn's result)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    storages.pop(exclude.untyped_storage().data_ptr(), None)
    return sum(storages.values()), result


def unfused_reference(logits, target, *, temperature=1.0, vocab_size=None):
    """The plain autograd computation: several [..., V] float32 buffers, all kept for backward."""
    cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits[..., :vocab_size].to(cdtype) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@dataclass
class Measurement:
    saved: int
    forward_peak: int
    backward_peak: int


def measure(method: str, logits: torch.Tensor, target: torch.Tensor, chunk: int | None = None,
            temperature: float = 1.0) -> Measurement:
    """Saved and peak bytes of one method ("unfused", "fused", "chunked") for a loss using both outputs."""
    x = logits.detach().clone().requires_grad_()
    if method == "unfused":
        def run():
            return unfused_reference(x, target, temperature=temperature)
    else:
        def run():
            return vocab_parallel_logprobs_entropy(
                x, target, temperature=temperature, chunk_size=chunk if method == "chunked" else None
            )
    g = torch.Generator().manual_seed(0)
    g_lp, g_h = (torch.randn(target.shape, generator=g) for _ in range(2))
    fwd_peak, (saved, (logp, ent)) = peak_allocated_bytes(lambda: saved_bytes(run, exclude=x))
    loss = (logp * g_lp.to(logp.dtype)).sum() + (ent * g_h.to(ent.dtype)).sum()
    bwd_peak, _ = peak_allocated_bytes(loss.backward)
    return Measurement(saved, fwd_peak, bwd_peak)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per chunk in chunked mode")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    logits = torch.randn(args.batch, args.seq, args.vocab).to(dtype)
    target = torch.randint(0, args.vocab, (args.batch, args.seq))
    mib = 2.0**20
    n_tokens = args.batch * args.seq
    print(f"logits [{args.batch}, {args.seq}, {args.vocab}] {args.dtype} = {logits.nbytes / mib:.1f} MiB; "
          f"one float32 logits-sized buffer = {n_tokens * args.vocab * 4 / mib:.1f} MiB; "
          f"chunk = {args.chunk} tokens = {args.chunk * args.vocab * 4 / mib:.1f} MiB float32; "
          f"temperature {args.temperature}")
    print(f"{'method':<22}{'saved for backward':>20}{'forward peak':>16}{'backward peak':>16}")
    for method in ("unfused", "fused", "chunked"):
        m = measure(method, logits, target, chunk=args.chunk, temperature=args.temperature)
        label = f"chunked ({args.chunk} tok)" if method == "chunked" else method
        print(f"{label:<22}{m.saved / mib:>16.2f} MiB{m.forward_peak / mib:>12.2f} MiB"
              f"{m.backward_peak / mib:>12.2f} MiB")


if __name__ == "__main__":
    main()
