"""Convert Qwen2.5-VL checkpoints between Hugging Face safetensors and Megatron distributed checkpoints.

    hf_to_megatron("Qwen2.5-VL-7B-Instruct", "ckpt/qwen7b-tp2", tp=2)      # any TP x PP layout
    megatron_to_hf("ckpt/qwen7b-tp2", "exported", tp=1, pp=1)              # loads (resharding) at any layout

Both run tp * pp ranks: spawned gloo processes, or the ranks of the caller's torch.distributed world when it has
exactly tp * pp processes (scripts need an `if __name__ == "__main__":` guard). Every tensor goes through the
mapping table (checkpoint/mapping.py); the tensors of the HF checkpoint must be exactly those the model reads.

A Megatron checkpoint directory holds megatron's dist_checkpointing files, `mssr_checkpoint.json` and `hf_config/`
(checkpoint/metadata.py), so that it converts back without the original directory.

Transformer Engine checkpoints hold each TE module's FP8 metadata as a `*._extra_state` ShardedObject (the final norm
is TE's RMSNorm wherever TE is installed, so local-spec checkpoints written there hold one too). No weights are in
them: loading skips those the CPU model does not ask for. TE's fused-norm names are the checkpoint names of both specs.
Outputs are written to a temporary sibling and renamed into place at the end: a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

from mssr_megatron.checkpoint.dist_io import (
    ConversionError,
    HFTensors,
    all_ranks_ok,
    check_output_path,
    copy_non_weight_files,
    hf_tensor_index,
    run_world,
    write_hf_shards,
)
from mssr_megatron.checkpoint.metadata import (
    HF_CONFIG_DIR,
    METADATA_FILE,
    SAFETENSORS_DTYPES,
    read_config,
    read_metadata,
    write_metadata,
)

DTYPES = ("float32", "bfloat16", "float16")
MAX_SHARD_BYTES = 5 * 1024**3  # exported safetensors files hold at most this much (like save_pretrained's default)

__all__ = ["ConversionError", "hf_to_megatron", "megatron_to_hf", "load_megatron_checkpoint"]


# ---------------------------------------------------------------------------------------------------------- checks
def _text(config: dict, key: str):
    value = (config.get("text_config") or {}).get(key, config.get(key))  # transformers 5 nests the text fields
    if value is None:
        raise ConversionError(f"config.json has no {key}: is it a complete Qwen2.5-VL config?")
    return value


def _check_layout(config: dict, tp, pp) -> None:
    heads, kv, layers = (_text(config, k) for k in ("num_attention_heads", "num_key_value_heads", "num_hidden_layers"))
    for name, size in (("TP", tp), ("PP", pp)):
        if not isinstance(size, int) or size < 1:
            raise ConversionError(f"{name}={size!r} is not a positive integer")
    if heads % tp or kv % tp:
        good = [d for d in range(1, math.gcd(heads, kv) + 1) if math.gcd(heads, kv) % d == 0]
        raise ConversionError(f"TP={tp} does not divide the {heads} attention heads and {kv} key/value heads of "
                              f"this model: choose TP from {good}")
    if layers % pp:
        good = [d for d in range(1, layers + 1) if layers % d == 0]
        raise ConversionError(f"PP={pp} does not divide the {layers} layers of this model: choose PP from {good}")


def _check_dtype(dtype) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported: choose one of {', '.join(DTYPES)}")
    return name


def _validate_hf_dir(hf_dir: str, tp, pp) -> tuple[dict, dict]:
    config = read_config(hf_dir, "pass a Hugging Face Qwen2.5-VL directory (config.json and *.safetensors)")
    _check_layout(config, tp, pp)
    index = hf_tensor_index(hf_dir)
    for name, (_, _, st_dtype, _) in sorted(index.items()):
        if st_dtype not in SAFETENSORS_DTYPES:
            raise ConversionError(f"tensor {name} has dtype {st_dtype}; only float32/bfloat16/float16 tensors "
                                  f"convert: is it part of a Qwen2.5-VL checkpoint?")
    return config, index


# ---------------------------------------------------------------------------------------------------------- ranks
@contextlib.contextmanager
def _megatron_world(tp: int, pp: int):
    """Megatron parallel state for this conversion: initialised (and torn down) here unless the caller has it."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mssr_megatron.parallel import init_megatron

    owns_group, owns_state = not dist.is_initialized(), not ps.model_parallel_is_initialized()
    if owns_state:
        init_megatron(tp, pp, seed=0, backend="gloo" if owns_group else "auto")
    elif (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (tp, pp):
        raise ConversionError(f"megatron is already initialised with another TP x PP than {tp} x {pp}: call the "
                              f"converter outside that setup")
    try:
        yield
    finally:
        if owns_state:
            ps.destroy_model_parallel()
        if owns_group:
            dist.destroy_process_group()


def _build(hf_config_dir: str, dtype: str):
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig

    from mssr_megatron.checkpoint.mapping import ModelDims
    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models.provider import build_model
    from mssr_megatron.models.qwen2_5_vl import padded_vocab_size
    from megatron.core import parallel_state as ps

    config = AutoConfig.from_pretrained(hf_config_dir)
    # Megatron's torch norms are built in float32 whatever params_dtype is (training casts the whole module, as
    # Float16Module does): cast here so that the checkpoint holds one dtype.
    model = build_model(config, ModelConfig(params_dtype=dtype)).eval().to(getattr(torch, dtype))
    if dist.get_backend() == "nccl":  # a caller's GPU world: collectives need CUDA tensors
        model.cuda()
    tp = ps.get_tensor_model_parallel_world_size()
    return config, model, ModelDims.from_hf_config(config, padded_vocab_size(config.text_config.vocab_size, tp))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)


def _naming(names: list[str], problem: str, fix: str) -> str | None:
    """'<problem> <first name> (and N more): <fix>', or None when there are no names."""
    if not names:
        return None
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"{problem} {names[0]}{more}: {fix}"


def _error_of(fn) -> str | None:
    try:
        fn()
    except (ConversionError, KeyError, ValueError, RuntimeError) as exc:
        return (str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)).splitlines()[0]
    return None


def _to_megatron_rank(rank: int, tmp: str, hf_dir: str, tp: int, pp: int, dtype: str, progress: bool):
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from mssr_megatron.checkpoint.hf_bridge import load_hf_weights, megatron_parameters

    with _megatron_world(tp, pp):
        config, model, dims = _build(hf_dir, dtype)
        needed = sorted({h for *_, hf_names in megatron_parameters(model) for h in hf_names})
        bar = _progress(len(needed), "reading HF tensors", progress and rank == 0)
        tensors = HFTensors(hf_dir, on_read=lambda _: bar.update())
        all_ranks_ok(_naming([h for h in needed if h not in tensors], "the checkpoint lacks tensor",
                             "is it a complete checkpoint of the model in config.json?"))
        consumed: set[str] = set()
        all_ranks_ok(_error_of(lambda: consumed.update(load_hf_weights(model, tensors, dims))))
        bar.close()
        union = [None] * dist.get_world_size()
        dist.all_gather_object(union, sorted(consumed))
        consumed = set().union(*union)
        unexpected = sorted(set(tensors) - consumed)
        if config.tie_word_embeddings and "lm_head.weight" in unexpected:  # a tied checkpoint that stores both
            same = rank or torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
            all_ranks_ok(None if same else "lm_head.weight differs from model.embed_tokens.weight but "
                         "config.json ties them (tie_word_embeddings): fix the config or the checkpoint")
            unexpected.remove("lm_head.weight")
        all_ranks_ok(_naming(unexpected, "the checkpoint holds an unexpected tensor",
                             "the model in config.json has no such weight; remove it or fix config.json"))
        all_ranks_ok(_naming([n for n, p in model.named_parameters() if p.dtype != getattr(torch, dtype)],
                             "the model was built in another dtype than", f"{dtype} expected"))
        sharded = model.sharded_state_dict()
        all_ranks_ok(_uncovered_parameter(model, sharded))
        if progress and rank == 0:
            print(f"saving the Megatron checkpoint (TP={tp}, PP={pp}, {dtype})", flush=True)
        dist_checkpointing.save(sharded, tmp)
        return dict(vocab_size=dims.vocab_size, padded_vocab_size=dims.padded_vocab_size,
                    num_layers=config.text_config.num_hidden_layers,
                    tie_word_embeddings=bool(config.tie_word_embeddings)) if rank == 0 else None


def _uncovered_parameter(model, sharded_state_dict) -> str | None:
    """A message naming a parameter that the sharded state dict (what dist_checkpointing saves) does not hold."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    # ShardedTensor, or ShardedTensorFactory (e.g. the gated fc1 at TP > 1 saves gate and up as separate shards)
    held = {id(v.data) for v in nested_values(sharded_state_dict) if isinstance(v, ShardedBase) and hasattr(v, "data")}
    for name, param in model.named_parameters():
        if id(param) not in held:
            return f"parameter {name} is missing from the model's sharded_state_dict: it would not be saved"
    return None


def load_megatron_checkpoint(model, ckpt_dir: str, state_key: str | None = None) -> None:
    """Load a dist_checkpointing checkpoint into this rank's stage (any TP/PP: dist_checkpointing reshards). Keys
    missing from the checkpoint fail with ConversionError, and so do unexpected ones, except the optimizer state that
    a trainer run checkpoint holds beside the model (under `state_key`) and modules' extra state (Transformer
    Engine's FP8 metadata, see the module docstring), which are skipped."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    from mssr_megatron.checkpoint.mapping import is_extra_state

    try:
        request = model.sharded_state_dict() if state_key is None else {state_key: model.sharded_state_dict()}
        # megatron's naming: "unexpected" = requested by the model but absent from the checkpoint, "missing" = in the
        # checkpoint but not requested.
        state, not_requested, absent = dist_checkpointing.load(request, ckpt_dir, strict=StrictHandling.RETURN_ALL)
    except CheckpointException as exc:  # torch's reader failed (a BaseException whose str is a traceback per rank)
        first = next(iter(exc.failures.values()))[0] if exc.failures else exc
        raise ConversionError(f"cannot load {ckpt_dir}: {type(first).__name__}: "
                              f"{(str(first).splitlines() or [''])[0]}") from None
    except (CheckpointingException, KeyError, RuntimeError, OSError, ValueError) as exc:
        raise ConversionError(f"cannot load {ckpt_dir}: {(str(exc).splitlines() or [''])[0]}") from None
    extra = sorted(k for k in not_requested if not k.startswith("optimizer.") and not is_extra_state(k))
    for keys, what in ((sorted(absent), "lacks"), (extra, "holds an unexpected")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ConversionError(f"cannot load {ckpt_dir}: the checkpoint {what} tensor {keys[0]}{more}; "
                                  f"was it written for this model (hf_config/config.json)?")
    model.load_state_dict(state if state_key is None else state[state_key])


def _to_hf_rank(rank: int, tmp: str, ckpt_dir: str, tp: int, pp: int, dtype: str, progress: bool):
    import torch
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    from mssr_megatron.checkpoint.hf_bridge import export_hf_weights, megatron_parameters

    meta = read_metadata(ckpt_dir)
    with _megatron_world(tp, pp):
        _, model, dims = _build(os.path.join(ckpt_dir, HF_CONFIG_DIR), meta["dtype"])
        load_megatron_checkpoint(model, ckpt_dir, meta.get("state_key"))
        stage = ps.get_pipeline_model_parallel_rank()
        writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        parts, current, size = [], {}, 0

        def flush():
            nonlocal current, size
            if current and writer:
                name = f"part-{stage:05d}-{len(parts):05d}.safetensors"
                save_file(current, os.path.join(tmp, name), metadata={"format": "pt"})
                parts.append((name, {k: list(v.shape) for k, v in current.items()}, size))
            current, size = {}, 0

        total = sum(len(h) for *_, h in megatron_parameters(model))
        with _progress(total, "exporting HF tensors", progress and rank == 0) as bar:
            for name, tensor in export_hf_weights(model, dims, getattr(torch, dtype)):
                bar.update()
                if writer:
                    current[name] = tensor.detach().cpu().contiguous()
                    size += tensor.numel() * tensor.element_size()
                    if size >= MAX_SHARD_BYTES:
                        flush()
        flush()
        return parts


# ---------------------------------------------------------------------------------------------------------- API
def hf_to_megatron(hf_dir, out_dir, tp: int = 1, pp: int = 1, dtype=None, overwrite: bool = False,
                   progress: bool = True) -> str:
    """Convert the Hugging Face Qwen2.5-VL directory `hf_dir` into a Megatron distributed checkpoint at `out_dir`,
    saved from a TP x PP layout, with parameters in `dtype` (default: the dtype of the HF weights). Returns the
    output path; raises ConversionError with a one-line reason on any problem (nothing is left at out_dir)."""
    hf_dir = os.path.abspath(os.fspath(hf_dir))
    config, index = _validate_hf_dir(hf_dir, tp, pp)
    dtypes = [SAFETENSORS_DTYPES[d] for _, _, d, _ in index.values()]
    hf_dtype = max(set(dtypes), key=dtypes.count)
    dtype = _check_dtype(dtype) or hf_dtype
    out = check_output_path(os.fspath(out_dir), overwrite, hf_dir)

    def finalize(tmp: str, results: list) -> None:
        write_metadata(tmp, hf_dir, index, tp=tp, pp=pp, dtype=dtype, **results[0])  # model sizes from rank 0

    run_world(_to_megatron_rank, tp * pp, out, (hf_dir, tp, pp, dtype, progress), finalize)
    return out


def megatron_to_hf(ckpt_dir, out_dir, tp: int = 1, pp: int = 1, dtype=None, overwrite: bool = False,
                   progress: bool = True) -> str:
    """Convert a checkpoint written by hf_to_megatron or a trainer run checkpoint (`<save_dir>/step_N`, from any
    layout) into a Hugging Face directory with the
    published tensor names, loading it at TP x PP, in `dtype` (default: the checkpoint's dtype). Returns the
    output path; raises ConversionError with a one-line reason on any problem (nothing is left at out_dir)."""
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    if os.path.isfile(os.path.join(ckpt_dir, "model", METADATA_FILE)):  # a trainer run checkpoint (step_N/)
        ckpt_dir = os.path.join(ckpt_dir, "model")
    if not os.path.isdir(ckpt_dir):
        what = "is not a directory" if os.path.exists(ckpt_dir) else "does not exist"
        raise ConversionError(f"input {ckpt_dir} {what}: pass a checkpoint written by hf_to_megatron (--to megatron)")
    meta = read_metadata(ckpt_dir)
    with open(os.path.join(ckpt_dir, HF_CONFIG_DIR, "config.json")) as fh:
        config = json.load(fh)
    _check_layout(config, tp, pp)
    dtype = _check_dtype(dtype) or meta["dtype"]
    out = check_output_path(os.fspath(out_dir), overwrite, ckpt_dir)

    def finalize(tmp: str, results: list) -> None:
        parts = sorted((p for rank_parts in results for p in rank_parts), key=lambda p: p[0])
        written = {name: shape for _, shapes, _ in parts for name, shape in shapes.items()}
        expected = meta["hf_tensors"]
        for name in sorted(set(expected) | set(written)):
            if expected.get(name) != written.get(name):
                raise ConversionError(f"tensor {name}: exported shape {written.get(name)}, but mssr_checkpoint.json "
                                      f"records {expected.get(name)}: the checkpoint and its metadata disagree")
        write_hf_shards(tmp, parts)
        copy_non_weight_files(os.path.join(ckpt_dir, HF_CONFIG_DIR), tmp)
        if dtype != meta["hf_dtype"]:
            _set_config_dtype(os.path.join(tmp, "config.json"), dtype)

    run_world(_to_hf_rank, tp * pp, out, (ckpt_dir, tp, pp, dtype, progress), finalize)
    return out


def _set_config_dtype(path: str, dtype: str) -> None:
    with open(path) as fh:
        config = json.load(fh)
    for section in (config, config.get("text_config") or {}, config.get("vision_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if key in section:
                section[key] = dtype
    config.setdefault("dtype", dtype)
    with open(path, "w") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
        fh.write("\n")
