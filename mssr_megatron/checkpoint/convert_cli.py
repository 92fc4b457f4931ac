"""Command-line front end of checkpoint conversion, shared by `mssr convert` and `tools/convert_checkpoint.py`:
one function adds the options to a parser, one runs the conversion. Bad inputs print one line and exit with 2."""

from __future__ import annotations

import argparse
import os
import sys
import types

EXAMPLES = """examples:
  # Hugging Face -> Megatron, saved from a TP=2 layout (loads later at any TP/PP)
  %(prog)s --to megatron --input Qwen2.5-VL-7B-Instruct --output ckpt/qwen7b --tp 2 --dtype bfloat16
  # Megatron -> Hugging Face (published tensor names; loads with from_pretrained)
  %(prog)s --to hf --input ckpt/qwen7b --output qwen7b-hf --tp 2 --pp 2

Conversion runs TP x PP processes (gloo, CPU); launched by torchrun with exactly TP x PP processes, it uses those. The output is written to a temporary sibling and renamed at the end; nothing is left on failure."""


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the conversion options to `parser` (a top-level parser or an `mssr convert` sub-parser)."""
    parser.description = ("Convert Qwen2.5-VL checkpoints between Hugging Face safetensors and Megatron\n"
                          "distributed checkpoints, at any tensor / pipeline parallel layout.")
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--to", required=True, choices=("megatron", "hf"),
                        help="direction: 'megatron' reads an HF directory, 'hf' reads a checkpoint written by "
                             "--to megatron (e.g. --to megatron)")
    parser.add_argument("--input", required=True, metavar="DIR",
                        help="HF model directory (config.json, *.safetensors, tokenizer, processor) for --to "
                             "megatron, or a Megatron checkpoint directory for --to hf (e.g. --input "
                             "Qwen2.5-VL-3B-Instruct)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="directory to create; must not exist unless --overwrite (e.g. --output ckpt/qwen3b)")
    parser.add_argument("--tp", type=int, default=1, metavar="N",
                        help="tensor-parallel size to save from (--to megatron) or load at (--to hf); must divide "
                             "the attention and key/value heads (default 1, e.g. --tp 2)")
    parser.add_argument("--pp", type=int, default=1, metavar="N",
                        help="pipeline-parallel size; must divide the number of layers (default 1, e.g. --pp 2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="dtype of the written weights (default: the input's dtype, e.g. --dtype bfloat16)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output directory (only once the new one is complete; "
                             "e.g. --overwrite)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (e.g. --quiet)")
    parser.error = types.MethodType(_one_line_error, parser)  # argparse errors: one line, exit 2
    parser.set_defaults(func=run_convert)
    return parser


def _one_line_error(self, message: str):
    print(f"convert: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_convert(args: argparse.Namespace) -> int:
    """Run the conversion the parsed arguments describe; a ConversionError prints one line and returns 2."""
    from mssr_megatron.checkpoint.convert import ConversionError, hf_to_megatron, megatron_to_hf

    convert = hf_to_megatron if args.to == "megatron" else megatron_to_hf
    try:
        out = convert(args.input, args.output, tp=args.tp, pp=args.pp, dtype=args.dtype, overwrite=args.overwrite,
                      progress=not args.quiet)
    except ConversionError as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank converts; one reports
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = add_convert_arguments(argparse.ArgumentParser(prog=prog))
    return run_convert(parser.parse_args(argv))
