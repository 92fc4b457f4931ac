"""The metadata that makes a Megatron checkpoint convertible back to Hugging Face without the original directory:
`mssr_checkpoint.json` (format version, source TP/PP, dtype, vocabulary sizes, tied flag, layer implementation and
FP8 settings, HF tensor names and shapes) and `hf_config/` (config, generation config, tokenizer, processor files).
Written by hf_to_megatron and by the trainer's run checkpoints; read by megatron_to_hf, which first checks that the
dist_checkpointing files are all there and whole (`check_dist_checkpoint`).
"""

from __future__ import annotations

import json
import os

from mssr_megatron.checkpoint.dist_io import ConversionError, copy_non_weight_files, hf_tensor_index

FORMAT, FORMAT_VERSION = "mssr-megatron/qwen2_5_vl", 1
METADATA_FILE, HF_CONFIG_DIR = "mssr_checkpoint.json", "hf_config"
MODEL_TYPE = "qwen2_5_vl"
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
LAYER_IMPLS = ("local", "transformer_engine")

__all__ = ["METADATA_FILE", "HF_CONFIG_DIR", "layer_metadata", "write_metadata", "read_metadata", "read_config",
           "check_dist_checkpoint"]


def read_config(directory: str, hint: str) -> dict:
    """The config.json of an HF Qwen2.5-VL directory; ConversionError (ending in `hint`) when it is missing or of
    another model."""
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ConversionError(f"input {directory} {what}: {hint}")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, METADATA_FILE)):
            raise ConversionError(f"{directory} is a Megatron checkpoint written by this converter: convert it "
                                  f"with megatron_to_hf (--to hf)")
        raise ConversionError(f"{path} is missing: {hint}")
    try:
        with open(path) as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path} is not valid JSON ({exc}): restore the model's config.json") from None
    if config.get("model_type") != MODEL_TYPE:
        raise ConversionError(f"{path} has model_type {config.get('model_type')!r}; only {MODEL_TYPE!r} "
                              f"(Qwen2.5-VL) checkpoints convert")
    return config


def read_metadata(ckpt_dir: str) -> dict:
    """The mssr_checkpoint.json of a checkpoint written by hf_to_megatron or the trainer, after checking that the
    directory is a complete one of a format this converter reads, its dist_checkpointing files whole
    (`check_dist_checkpoint`); a one-line ConversionError otherwise."""
    path = os.path.join(ckpt_dir, METADATA_FILE)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(ckpt_dir, "config.json")):
            raise ConversionError(f"{ckpt_dir} is a Hugging Face directory, not a Megatron checkpoint: convert it "
                                  f"with hf_to_megatron (--to megatron)")
        raise ConversionError(f"{ckpt_dir} has no {METADATA_FILE}: not a checkpoint written by hf_to_megatron "
                              f"(--to megatron)")
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path} is unreadable ({exc}): convert the HF checkpoint again") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ConversionError(f"{path} has format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                              f"this converter reads {FORMAT!r} version {FORMAT_VERSION}")
    meta.setdefault("transformer_impl", "local")  # written before the layer implementation was recorded
    if meta["transformer_impl"] not in LAYER_IMPLS:
        raise ConversionError(f"{path} records transformer_impl {meta['transformer_impl']!r}; this converter reads "
                              f"{' and '.join(LAYER_IMPLS)} checkpoints")
    read_config(os.path.join(ckpt_dir, HF_CONFIG_DIR), "the checkpoint lacks its HF config; convert it again")
    if not os.path.isfile(os.path.join(ckpt_dir, "metadata.json")):
        raise ConversionError(f"{ckpt_dir} has no metadata.json of megatron dist_checkpointing: the checkpoint is "
                              f"incomplete; convert it again")
    check_dist_checkpoint(ckpt_dir)
    return meta


def layer_metadata(model_cfg) -> dict:
    """The layer implementation a model was built with, as recorded in mssr_checkpoint.json: transformer_impl and the
    FP8 settings (null without FP8) of a ModelConfig."""
    fp8 = None
    if model_cfg.fp8 is not None:
        fp8 = dict(format=model_cfg.fp8, recipe=model_cfg.fp8_recipe, margin=model_cfg.fp8_margin,
                   amax_history_len=model_cfg.fp8_amax_history_len,
                   amax_compute_algo=model_cfg.fp8_amax_compute_algo)
    return dict(transformer_impl=model_cfg.transformer_impl, fp8=fp8)


def write_metadata(ckpt_dir: str, hf_dir: str, index: dict | None = None, *, tp: int, pp: int, dtype: str,
                   vocab_size: int, padded_vocab_size: int, num_layers: int, tie_word_embeddings: bool,
                   state_key: str | None = None, transformer_impl: str = "local", fp8: dict | None = None) -> None:
    """Make the dist_checkpointing directory `ckpt_dir` convertible back to HF: write `mssr_checkpoint.json` and copy
    the HF config, tokenizer and processor files of `hf_dir` (the model it started from) into `hf_config/`.
    Used by hf_to_megatron (local layers, no FP8) and by the trainer's run checkpoints, whose model state sits under
    `state_key` ("model", beside "optimizer") and whose layer implementation is recorded (`layer_metadata`)."""
    if transformer_impl not in LAYER_IMPLS:
        raise ValueError(f"transformer_impl={transformer_impl!r} must be one of {LAYER_IMPLS}")
    index = hf_tensor_index(hf_dir) if index is None else index
    dtypes = [SAFETENSORS_DTYPES.get(d, dtype) for _, _, d, _ in index.values()]
    meta = dict(format=FORMAT, format_version=FORMAT_VERSION, model_type=MODEL_TYPE, source_tp=tp, source_pp=pp,
                dtype=dtype, hf_dtype=max(set(dtypes), key=dtypes.count) if dtypes else dtype,
                vocab_size=vocab_size, padded_vocab_size=padded_vocab_size, num_layers=num_layers,
                tie_word_embeddings=tie_word_embeddings, state_key=state_key, transformer_impl=transformer_impl,
                fp8=fp8, hf_tensors={name: shape for name, (_, _, _, shape) in sorted(index.items())})
    if tie_word_embeddings:
        meta["hf_tensors"].pop("lm_head.weight", None)
    with open(os.path.join(ckpt_dir, METADATA_FILE), "w") as fh:
        json.dump(meta, fh, indent=1)
    copy_non_weight_files(hf_dir, os.path.join(ckpt_dir, HF_CONFIG_DIR))


def check_dist_checkpoint(ckpt_dir: str) -> None:
    """Check that the megatron dist_checkpointing files of `ckpt_dir` (torch_dist backend) are all there and whole:
    `.metadata` readable, every data file it records present and as long as the byte ranges it records, common.pt a
    complete archive. Raises a one-line ConversionError naming the file otherwise (the load would fail inside the
    ranks with a long torch traceback). Bytes changed inside a file of the right length are not detected here."""
    import zipfile

    from torch.distributed.checkpoint import FileSystemReader

    metadata = os.path.join(ckpt_dir, ".metadata")
    fix = "the checkpoint is incomplete or damaged; convert or copy it again"
    if not os.path.isfile(metadata):
        raise ConversionError(f"{metadata} is missing: {fix}")
    try:
        storage = FileSystemReader(ckpt_dir).read_metadata().storage_data
        needed: dict[str, int] = {}
        for info in storage.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises anything
        raise ConversionError(f"{metadata} is unreadable ({type(exc).__name__}: {_first_line(exc)}): {fix}") from None
    for name, size in sorted(needed.items()):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            raise ConversionError(f"{path} is missing (named by {metadata}): {fix}")
        if os.path.getsize(path) < size:
            raise ConversionError(f"{path} is truncated: it has {os.path.getsize(path)} bytes but {metadata} records "
                                  f"data up to byte {size}: {fix}")
    common = os.path.join(ckpt_dir, "common.pt")
    try:
        with zipfile.ZipFile(common) as archive:  # torch.save's format; testzip reads every member's CRC
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConversionError(f"{common} is unreadable ({type(exc).__name__}: {_first_line(exc)}): {fix}") from None
    if bad is not None:
        raise ConversionError(f"{common} is damaged (member {bad} fails its checksum): {fix}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0]
