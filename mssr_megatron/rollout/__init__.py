"""Rollout engines (HF in-process, SGLang, vLLM) behind one protocol, and the bucketed weight sync that feeds them."""
