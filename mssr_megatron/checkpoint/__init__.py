"""HF <-> Megatron weight names (one mapping table), conversion, and distributed checkpoint I/O."""
