"""Convert Qwen2.5-VL checkpoints between Hugging Face and Megatron (any TP/PP). Same as `mssr convert`.

    python tools/convert_checkpoint.py --to megatron --input Qwen2.5-VL-7B-Instruct --output ckpt/qwen7b --tp 2
    python tools/convert_checkpoint.py --to hf --input ckpt/qwen7b --output qwen7b-hf
    python tools/convert_checkpoint.py --help
"""

import sys

from mssr_megatron.checkpoint.convert_cli import main

if __name__ == "__main__":  # needed: conversion spawns worker processes that re-import this file
    sys.exit(main(prog="convert_checkpoint.py"))
