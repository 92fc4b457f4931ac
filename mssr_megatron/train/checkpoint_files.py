"""The file manifest of a run checkpoint: every file's size and CRC-32, written before COMPLETE, checked before a load.

    <checkpoint>/MANIFEST.json   {"version": 1, "hash": "crc32", "world_size": W,
                                  "files": {"model/__0_0.distcp": {"size": 6729078, "crc32": "1c291ca7"}, ...}}

Every file of the checkpoint except COMPLETE and the manifest itself is listed. Verification (`verify`) finds, in
one pass and before anything is loaded: a missing file (`model/.metadata`, `model/metadata.json`, `model/common.pt`,
`trainer_state.pt`, a rank's RNG file when the world size is unchanged, or anything else listed), a size that differs
(truncated or zero-byte files), a checksum that differs (bytes overwritten in a `.distcp`: megatron would load them as
weights and Adam moments without complaint), and a trainer state or this rank's RNG file that cannot be unpickled.
A checkpoint written before manifests existed is checked for its required files and their readability only, with a
one-line warning that its contents cannot be verified.

Hash: zlib.crc32. Measured on a 200 MB random file on the 2-core development machine (16 MiB reads, best of 3):
crc32 1.8 GB/s, sha256 0.88 GB/s (with SHA-NI), sha1 0.98 GB/s, blake2b 0.62 GB/s, md5 0.61 GB/s; reading alone
1.9 GB/s. crc32 is as fast as reading the file, and it misses accidental damage (truncation, a lost block, random
bytes) with probability 2^-32 per file; it is no defence against deliberate tampering, which is not what it is for.
Split: file i of the sorted listing is hashed by rank i % world_size and the results are gathered, so a 7B checkpoint
with Adam state (~100 GB) on 8 ranks costs each rank ~12 GB of reading, seconds at these rates (storage permitting).
`write_manifest` and `verify` are COLLECTIVE when torch.distributed is initialised: every rank calls them, with the
same directory; every rank returns the same verdict (all_gather_object: on NCCL through the current CUDA device:
GPU-only: not run (no GPU was available)).
"""

from __future__ import annotations

import errno
import json
import os
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

MANIFEST = "MANIFEST.json"
COMPLETE = "COMPLETE"
REQUIRED = ("model/.metadata", "model/metadata.json", "model/common.pt", "trainer_state.pt")
"""Files a resume reads whatever the layout: megatron's tensor index, backend config and common state; the trainer
state. (The .distcp shards are named by the writer's layout: the manifest covers them.)"""
_CHUNK = 16 << 20
FAILURES = (Exception, CheckpointException)
"""What a failed save or load raises: torch.distributed.checkpoint (under megatron's writer and reader) reports the
failed ranks' errors as CheckpointException, a BaseException."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or resumed; its message is one line that names the file or directory."""


@dataclass(frozen=True, order=True)
class Problem:
    """What is wrong with one file of a checkpoint (path relative to the checkpoint directory)."""

    file: str
    what: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what}"


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(obj) -> list:
    """`obj` of every rank, in rank order ([obj] in a single process)."""
    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if _world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def call_on_every_rank(fn, what: str):
    """fn() on every rank; when it raised on any rank, CheckpointError on EVERY rank (naming the first failing rank's
    error), so that no rank goes on into a collective that the failed one never joins. Returns fn's result."""
    result, error = None, None
    try:
        result = fn()
    except FAILURES as exc:  # any failure must reach every rank as one line
        error = one_line(exc)
    errors = [(rank, e) for rank, e in enumerate(all_gather(error)) if e is not None]
    if errors:
        rank, first = errors[0]
        raise CheckpointError(f"{what} failed on rank {rank}: {first}")
    return result


def _inner(exc: BaseException) -> BaseException:
    """The first failed rank's own error inside a CheckpointException (whose message is a header and tracebacks)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        return next(iter(exc.failures.values()))[0]
    return exc


def one_line(exc: BaseException) -> str:
    """The exception's type and the first non-empty line of its message (of the failed rank's error, for a
    CheckpointException)."""
    exc = _inner(exc)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "file write failed", "unexpected pos")


def is_disk_full(exc: BaseException) -> bool:
    """Whether the exception (or one it was raised from or wraps in its message) is a write that ran out of space.
    Plain writes raise OSError(ENOSPC / EDQUOT); torch.save (its zip writer) raises RuntimeError('[enforce fail at
    inline_container.cc:...] . unexpected pos 704 vs 598') for a short write (seen on /dev/full) or '... file write
    failed'; megatron's shard writer re-raises its worker's OSError inside its own error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = _inner(exc)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(exc) for text in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def checksum(path: str) -> str:
    """CRC-32 of a file's bytes, 8 hex digits."""
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def list_files(directory: str) -> list[str]:
    """Every file under `directory` (relative, '/'-separated, sorted) except COMPLETE and the manifest."""
    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if rel not in (COMPLETE, MANIFEST):
                found.append(rel)
    return sorted(found)


def _my_share(names: list[str]) -> list[str]:
    rank, world = _world()
    return [name for i, name in enumerate(names) if i % world == rank]


def write_manifest(directory: str) -> None:
    """Hash every file of the checkpoint at `directory` (split over the ranks) and write MANIFEST.json on rank 0.
    Collective; raises CheckpointError on every rank when any rank failed."""
    rank, world = _world()
    names = broadcast(list_files(directory) if rank == 0 else None)

    def hash_share() -> dict:
        return {name: {"size": os.path.getsize(os.path.join(directory, name)),
                       "crc32": checksum(os.path.join(directory, name))} for name in _my_share(names)}

    files: dict = {}
    for share in all_gather(call_on_every_rank(hash_share, f"hashing the files of {directory}")):
        files.update(share)

    def write() -> None:
        if rank == 0:
            with open(os.path.join(directory, MANIFEST), "w") as f:
                json.dump({"version": 1, "hash": "crc32", "world_size": world,
                           "files": dict(sorted(files.items()))}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())

    call_on_every_rank(write, f"writing {os.path.join(directory, MANIFEST)}")


def _read_manifest(directory: str) -> dict | Problem | None:
    """The manifest, None when the checkpoint has none (written before manifests), or the Problem reading it."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("crc32"), str)
                for e in files.values()):
            raise ValueError("no 'files' table of sizes and checksums")
        return manifest
    except (OSError, ValueError, AttributeError) as exc:
        return Problem(MANIFEST, f"unreadable ({one_line(exc)})")


def _check_listed(directory: str, name: str, expected: dict) -> Problem | None:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return Problem(name, "missing")
    size = os.path.getsize(path)
    if size != expected["size"]:
        kind = " (zero-byte file)" if size == 0 else " (truncated)" if size < expected["size"] else ""
        return Problem(name, f"size {size} bytes, the manifest says {expected['size']}{kind}")
    try:
        actual = checksum(path)
    except OSError as exc:  # a rank that raised here would leave the others waiting in verify's gather
        return Problem(name, f"cannot be read ({one_line(exc)})")
    if actual != expected["crc32"]:
        return Problem(name, f"checksum crc32 {actual}, the manifest says {expected['crc32']} (contents changed)")
    return None


def _check_readable(directory: str, name: str, required_key: str | None) -> Problem | None:
    """torch.load of a small pickled file (trainer state, RNG state) succeeds."""
    try:
        state = torch.load(os.path.join(directory, name), weights_only=False)
    except Exception as exc:  # noqa: BLE001 - an unpickling failure has many types; each is "cannot be read"
        return Problem(name, f"cannot be read ({one_line(exc)})")
    if required_key is not None and (not isinstance(state, dict) or required_key not in state):
        return Problem(name, f"holds no {required_key!r} entry")
    return None


def _check_required(directory: str, listed: dict, saved_world: int | None, world_size: int) -> list[Problem]:
    """Rank 0: the files every resume reads are there, non-empty, and the trainer state unpickles; so are the RNG files
    of every rank when the world size is unchanged (a checkpoint without a manifest says its world size in the
    trainer state)."""
    problems = []
    for name in REQUIRED:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(Problem(name, "missing"))
        elif name not in listed and os.path.getsize(path) == 0:
            problems.append(Problem(name, "zero-byte file"))
    if not any(p.file == "trainer_state.pt" for p in problems):
        problem = _check_readable(directory, "trainer_state.pt", "step")
        if problem is not None:
            return problems + [problem]
        if saved_world is None:
            saved_world = torch.load(os.path.join(directory, "trainer_state.pt"), weights_only=False).get("world_size")
    if saved_world == world_size:
        for name in (f"rng/rank_{r}.pt" for r in range(world_size)):
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                problems.append(Problem(name, "missing"))
            elif os.path.getsize(path) == 0:
                problems.append(Problem(name, "zero-byte file"))
    return problems


def verify(directory: str, world_size: int | None = None) -> tuple[list[Problem], bool]:
    """(problems, verified) of the checkpoint at `directory` for a resume on `world_size` ranks (default: the current
    world). Problems are sorted and the same on every rank; empty when the checkpoint may be loaded. verified is False
    for a checkpoint without a manifest (its required files are checked, not its contents). Collective."""
    rank, world = _world()
    world_size = world if world_size is None else world_size
    manifest = broadcast(_read_manifest(directory) if rank == 0 else None)
    if isinstance(manifest, Problem):
        return [manifest], False
    listed = (manifest or {}).get("files", {})
    problems: list[Problem] = []
    for name in _my_share(sorted(listed)):
        problem = _check_listed(directory, name, listed[name])
        if problem is not None:
            problems.append(problem)
    checks: list[Problem] = []
    if rank == 0:
        checks += _check_required(directory, listed, (manifest or {}).get("world_size"), world_size)
    # each rank's RNG file is read by that rank: a checkpoint whose pickles do not load is rejected here, before any
    # weight is touched, and on every rank at once
    own_rng = f"rng/rank_{rank}.pt"
    if os.path.isfile(os.path.join(directory, own_rng)):
        problem = _check_readable(directory, own_rng, None)
        if problem is not None:
            checks.append(problem)
    gathered = all_gather((problems, checks))
    merged = {p.file: p for share, _ in gathered for p in share}  # the manifest's verdict on a file comes first
    for _, share in gathered:
        for p in share:
            merged.setdefault(p.file, p)
    merged = sorted(merged.values())
    return merged, manifest is not None


def describe(problems: list[Problem]) -> str:
    """The first problem, and how many more there are."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}"


def free_space(directory: str) -> str:
    """'X MB free of Y MB' of the file system holding `directory` (or its nearest existing parent)."""
    import shutil

    path = os.path.abspath(directory)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    usage = shutil.disk_usage(path)
    return f"{usage.free / 1e6:.1f} MB free of {usage.total / 1e6:.1f} MB"
