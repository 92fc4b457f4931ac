"""Datasets: readers (jsonl/parquet), image decoding (DALI or PIL), the prompt sampler, prompt building, and the
synthetic visual-reasoning generator of the embedded default. See each module's docstring."""

from mssr_megatron.data.images import ImageDecodeError, decode_image, decode_images, image_backend
from mssr_megatron.data.prompts import build_request, filter_long_prompts, load_split
from mssr_megatron.data.records import DataFileError, Record, RecordSet, read_records
from mssr_megatron.data.sampler import PromptSampler, expand_rollouts
from mssr_megatron.data.synthetic import floor_accuracy, generate_dataset

__all__ = [
    "DataFileError", "ImageDecodeError", "PromptSampler", "Record", "RecordSet", "build_request", "decode_image",
    "decode_images", "expand_rollouts", "filter_long_prompts", "floor_accuracy", "generate_dataset", "image_backend",
    "load_split", "read_records",
]
