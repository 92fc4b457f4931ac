"""Fused tensor ops for the trainer (autograd Functions with explicit memory bounds)."""

from mssr_megatron.ops.vocab_parallel_logprobs import VocabParallelLogprobsEntropy, vocab_parallel_logprobs_entropy

__all__ = ["VocabParallelLogprobsEntropy", "vocab_parallel_logprobs_entropy"]
