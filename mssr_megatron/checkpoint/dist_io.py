"""File and process plumbing of checkpoint conversion: safetensors reading and writing, atomic output directories,
and running one function on every rank of a TP x PP world (spawned gloo processes, or the caller's own world).

    with staged_output(out) as tmp: ...                 # a temporary sibling, renamed to `out` only on success
    tensors = HFTensors(hf_dir)                         # published name -> tensor, read lazily from *.safetensors
    run_world(fn, tp * pp, out, args, finalize)         # fn(rank, tmp, *args) on every rank, then finalize
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile
import traceback
from collections.abc import Mapping

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WEIGHT_INDEXES = (INDEX_FILE, "pytorch_model.bin.index.json")


class ConversionError(ValueError):
    """A conversion problem with a one-line explanation naming what is wrong and how to fix it. A ValueError, so that
    `mssr train` reports a damaged HF model directory (read through HFTensors) in one line like other bad input."""


# ---------------------------------------------------------------------------------------------------------- reading
def safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file ({name: {dtype, shape, data_offsets}}, without tensor data), after
    checking that the file is exactly as long as the header's data offsets say: a truncated or padded copy fails here,
    in one line naming the file and both sizes, before any process starts or any tensor is read."""
    try:
        actual = os.path.getsize(path)
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > actual - 8:  # checked before reading: a damaged length field can claim exabytes
                raise ValueError(f"header length {size} exceeds the file's {actual} bytes")
            header = json.loads(fh.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path} is not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    data_end = 0
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            valid = 0 <= begin <= end and isinstance(info["dtype"], str) and isinstance(info["shape"], list)
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise ConversionError(f"{path}: the header entry of tensor {name} is malformed ({info!r:.80}): the file "
                                  f"is damaged; copy it again")
        data_end = max(data_end, end)
    expected = 8 + size + data_end
    if actual != expected:
        how = "truncated" if actual < expected else "longer than its header says"
        raise ConversionError(f"{path} is {how}: it has {actual} bytes but its header needs {expected}: the file is "
                              f"damaged or incompletely copied; copy it again")
    return header


def safetensors_files(hf_dir: str) -> list[str]:
    """The weight files of an HF directory: the shards of model.safetensors.index.json, model.safetensors, or
    every *.safetensors file. Raises ConversionError when there are none or the index names a missing shard."""
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ConversionError(f"{index} is not a valid safetensors index ({exc!r})") from None
        missing = [s for s in shards if not os.path.isfile(os.path.join(hf_dir, s))]
        if missing:
            raise ConversionError(f"{index} names shard {missing[0]}, which is missing from {hf_dir}: copy the "
                                  f"complete checkpoint")
        return [os.path.join(hf_dir, s) for s in shards]
    if os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
        return [os.path.join(hf_dir, SINGLE_FILE)]
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
        raise ConversionError(f"no *.safetensors weights in {hf_dir}: PyTorch .bin checkpoints are not supported; "
                              f"re-save the model with save_pretrained(..., safe_serialization=True)")
    return [os.path.join(hf_dir, f) for f in files]


def hf_tensor_index(hf_dir: str) -> dict[str, tuple[str, str, str, list[int]]]:
    """published name -> (file, stored name, safetensors dtype, shape), from the headers only."""
    from mssr_megatron.checkpoint.mapping import published_name  # imports torch: only once the input looks right

    where: dict[str, tuple[str, str, str, list[int]]] = {}
    for path in safetensors_files(hf_dir):
        for stored, info in safetensors_header(path).items():
            name = published_name(stored)
            if name in where:
                raise ConversionError(f"tensor {name} is stored twice (as {where[name][1]} and {stored}): "
                                      f"remove one copy from the checkpoint")
            where[name] = (path, stored, info["dtype"], list(info["shape"]))
    return where


class HFTensors(Mapping):
    """A read-only {published name: tensor} view of an HF checkpoint that reads each tensor only when asked for."""

    def __init__(self, hf_dir: str, on_read=None):
        self.index = hf_tensor_index(hf_dir)
        self._handles: dict = {}
        self._on_read = on_read

    def __getitem__(self, name: str):
        from safetensors import safe_open

        path, stored, _, _ = self.index[name]
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(path, framework="pt")
            tensor = self._handles[path].get_tensor(stored)
        except Exception as exc:  # noqa: BLE001 - whatever the reader raises, say which file and tensor
            why = f"{type(exc).__name__}: {_first_line(exc)}"
            raise ConversionError(f"cannot read tensor {stored} from {path} ({why}): is the file complete and "
                                  f"unchanged since it was indexed?") from None
        if self._on_read is not None:
            self._on_read(name)
        return tensor

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, name) -> bool:
        return name in self.index


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0]


def copy_non_weight_files(src: str, dst: str) -> list[str]:
    """Copy every top-level file of `src` that is not a weight file or weight index (config, generation config,
    tokenizer, processor, chat template, README...) into `dst`. Returns the names copied."""
    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not name.endswith(WEIGHT_SUFFIXES) and name not in WEIGHT_INDEXES:
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied


# ---------------------------------------------------------------------------------------------------------- writing
def write_hf_shards(out_dir: str, parts: list[tuple[str, list[str], int]]) -> list[str]:
    """Give the safetensors parts written under temporary names ((file, {tensor: shape}, bytes), in order) their HF
    names: one part -> model.safetensors; several -> model-0000i-of-0000n.safetensors plus the index."""
    if len(parts) == 1:
        os.replace(os.path.join(out_dir, parts[0][0]), os.path.join(out_dir, SINGLE_FILE))
        return [SINGLE_FILE]
    weight_map, names = {}, []
    for i, (part, tensors, _) in enumerate(parts, 1):
        name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        os.replace(os.path.join(out_dir, part), os.path.join(out_dir, name))
        weight_map.update({t: name for t in tensors})
        names.append(name)
    index = {"metadata": {"total_size": sum(p[2] for p in parts)}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as fh:
        json.dump(index, fh, indent=2)
        fh.write("\n")
    return names


def check_output_path(out_dir: str, overwrite: bool, source: str) -> str:
    out = os.path.abspath(out_dir)
    src = os.path.abspath(source)
    if out == src or out.startswith(src + os.sep) or src.startswith(out + os.sep):
        raise ConversionError(f"output {out} overlaps the input {src}: choose a separate output directory")
    if os.path.lexists(out) and not overwrite:
        raise ConversionError(f"output {out} already exists: pass overwrite=True (--overwrite) or choose another path")
    return out


@contextlib.contextmanager
def staged_output(out: str):
    """Yield a fresh temporary sibling of `out`; on success it replaces `out`, on any failure it is removed."""
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    except OSError as exc:
        raise ConversionError(f"cannot create the output beside {out}: {exc}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output gets the usual permissions
    try:
        yield tmp
        if os.path.lexists(out):  # overwrite=True was checked by the caller
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.replace(out, os.path.join(old, "previous"))
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------------- processes
def _rank_entry(fn, rank: int, world_size: int, port: int, args, conn) -> None:
    import warnings

    for module in ("megatron", "torch.distributed"):  # Apex/TE fallbacks, torch's ShardedTensor deprecations
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        os.environ["LOCAL_RANK"] = str(rank % gpus if gpus else rank)  # more ranks than GPUs: they share (gloo)
        if not gpus:  # share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        conn.send(("ok", fn(rank, *args)))
    except ConversionError as exc:
        conn.send(("conversion", str(exc)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        traceback.print_exc(file=sys.stderr)
        first_line = (str(exc).splitlines() or [""])[0]
        conn.send(("error", f"rank {rank} failed: {type(exc).__name__}: {first_line}"))
    finally:
        conn.close()


def _spawn_ranks(fn, world_size: int, tmp: str, args) -> list:
    """fn(rank, tmp, *args) in `world_size` spawned processes forming a fresh local world; results by rank.
    On a failure the others are terminated and ConversionError is raised, preferring a rank's own ConversionError
    over the secondary errors (broken connections) of its peers."""
    import multiprocessing.connection as mpc
    import time

    import torch.multiprocessing as mp

    from mssr_megatron.parallel import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    procs, conns = [], []
    for rank in range(world_size):
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_rank_entry, args=(fn, rank, world_size, port, (tmp, *args), sender))
        proc.start()
        sender.close()
        procs.append(proc)
        conns.append(receiver)
    results: dict[int, object] = {}
    errors: list[tuple[int, str, str]] = []  # (rank, "conversion" or "error", message)
    deadline = None
    try:
        while len(results) + len(errors) < world_size and (deadline is None or time.monotonic() < deadline):
            waiting = [r for r in range(world_size) if r not in results and all(e[0] != r for e in errors)]
            ready = mpc.wait([conns[r] for r in waiting] + [procs[r].sentinel for r in waiting],
                             timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            for r in waiting:
                if conns[r] in ready or conns[r].poll():
                    try:
                        status, payload = conns[r].recv()
                    except EOFError:
                        status, payload = "error", f"rank {r} exited with code {procs[r].exitcode} before finishing"
                elif procs[r].sentinel in ready:
                    status, payload = "error", f"rank {r} exited with code {procs[r].exitcode} before finishing"
                else:
                    continue
                if status == "ok":
                    results[r] = payload
                else:
                    errors.append((r, status, payload))
                    deadline = deadline or time.monotonic() + 3.0  # let the other ranks report their own error
        if errors:
            errors.sort(key=lambda e: (e[1] != "conversion", e[0]))
            raise ConversionError(errors[0][2])
        for proc in procs:
            proc.join()
    finally:  # failed ranks exit by themselves; ranks stuck in a collective with a failed peer are stopped
        grace = time.monotonic() + 10.0
        for proc in procs:
            proc.join(max(0.0, grace - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(3)
            if proc.is_alive():  # SIGTERM is not always enough for a rank blocked in gloo
                proc.kill()
                proc.join()
    return [results[r] for r in range(world_size)]


def all_ranks_ok(error: str | None) -> None:
    """Collective: raise ConversionError(first rank's message) on every rank when any rank passes a message."""
    import torch.distributed as dist

    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise ConversionError(first)


def _run_in_world(fn, out: str, args, finalize) -> list:
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    gathered, results, failure = False, [None] * world_size, [None]
    try:
        with contextlib.ExitStack() as stack:
            box = [None]
            if rank == 0:
                try:
                    box = [("ok", stack.enter_context(staged_output(out)))]
                except ConversionError as exc:
                    box = [("error", str(exc))]
            dist.broadcast_object_list(box, src=0)
            if box[0][0] != "ok":
                raise ConversionError(box[0][1])
            dist.all_gather_object(results, fn(rank, box[0][1], *args))
            gathered = True
            if rank == 0:
                finalize(box[0][1], results)
    except BaseException as exc:
        if rank != 0 or not gathered:  # failures before the gather are collective (every rank raises)
            raise
        failure = [str(exc)]
        dist.broadcast_object_list(failure, src=0)
        raise
    dist.broadcast_object_list(failure, src=0)  # rank 0's finalize and rename are done
    if failure[0]:
        raise ConversionError(failure[0])
    return results


def run_world(fn, world_size: int, out: str, args: tuple, finalize) -> None:
    """Run fn(rank, tmp, *args) on every rank of a `world_size` world, writing into `tmp`, a temporary sibling of
    `out` that finalize(tmp, results by rank) completes and that then replaces `out` (removed on any failure).

    Inside an initialised torch.distributed world (or a torchrun environment: RANK, WORLD_SIZE, MASTER_PORT) of
    exactly world_size processes, every rank runs fn itself; otherwise world_size processes are spawned (callers' scripts need an
    `if __name__ == "__main__":` guard)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise ConversionError(f"this torch.distributed world has {dist.get_world_size()} processes but the "
                                  f"conversion needs TP x PP = {world_size}: launch that many, or run it outside "
                                  f"torch.distributed (it then spawns its own processes)")
        _run_in_world(fn, out, args, finalize)
        return
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and "RANK" in os.environ:  # torchrun started us: use that world
        if launched != world_size:
            raise ConversionError(f"launched with WORLD_SIZE={launched} but the conversion needs TP x PP = "
                                  f"{world_size}: launch that many processes, or run it as a single process")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo")
        try:
            _run_in_world(fn, out, args, finalize)
        finally:
            dist.destroy_process_group()
        return
    with staged_output(out) as tmp:
        finalize(tmp, _spawn_ranks(fn, world_size, tmp, args))
