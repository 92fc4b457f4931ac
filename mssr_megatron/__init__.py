"""mssr-megatron: MSSR (Multimodal Stabilized Single-Rollout) RL for Qwen2.5-VL on Megatron-Core."""

__version__ = "0.1.0"
