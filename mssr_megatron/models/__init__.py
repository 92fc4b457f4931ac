"""Model helpers (tiny Hugging Face Qwen2.5-VL builders, ...)."""
