"""Small, named, explicitly applied patches that let megatron-core run on CPU with gloo (filled by the model issue)."""
