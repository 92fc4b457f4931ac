"""Fault injection on run checkpoints (issue 12, items 1 and 6): damaged files, a full disk.

In-process tests damage a checkpoint-shaped directory in every way the issue lists and check what
run_checkpoint.resolve_resume (the function that picks the checkpoint of a resume) decides; the manifest the test
expects is computed here, independently, with zlib.crc32 over each whole file. End-to-end tests copy ONE tiny trainer
run (three checkpoints) per case, damage the copy, and resume it in a real `mssr train` process. The full disk is a
real one: a 21 MB tmpfs mounted in a private mount namespace (`unshare -rm`), skipped where the machine forbids it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import types

import pytest
import torch

from checkpoint_fakes import STEP_FILES, fake_checkpoint, independent_manifest
from trainer_assets import build_assets, logged_metrics, overrides

def _cfg(save_dir, resume):
    return types.SimpleNamespace(checkpoint=types.SimpleNamespace(resume=resume), checkpoint_dir=str(save_dir))


def _random_bytes_inside(path: str) -> None:
    """Overwrite 64 bytes in the middle of the file (same size, as a bad disk block or a stray write would)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(os.urandom(64))


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _zero(path: str) -> None:
    open(path, "wb").close()


DAMAGE = {
    "truncated_distcp": ("model/__0_1.distcp", _truncate, "truncated"),
    "random_bytes_in_distcp": ("model/__0_0.distcp", _random_bytes_inside, "checksum"),
    "zero_byte_rng": ("rng/rank_0.pt", _zero, "zero-byte"),
    "missing_metadata": ("model/.metadata", os.remove, "missing"),
    "missing_metadata_json": ("model/metadata.json", os.remove, "missing"),
    "missing_common_pt": ("model/common.pt", os.remove, "missing"),
    "missing_trainer_state": ("trainer_state.pt", os.remove, "missing"),
    "missing_rng": ("rng/rank_0.pt", os.remove, "missing"),
    "truncated_trainer_state": ("trainer_state.pt", _truncate, "truncated"),
    "truncated_manifest": ("MANIFEST.json", _truncate, "unreadable"),
}


def test_a_save_killed_midway_leaves_only_a_tmp_that_resume_ignores(tmp_path):
    """kill -9 during a save: the checkpoint exists only as step_N.tmp (renamed after COMPLETE), which resume=auto
    never takes: it resumes the previous checkpoint, with no warning (nothing damaged was rejected)."""
    from mssr_megatron.train.run_checkpoint import resolve_resume

    previous = fake_checkpoint(tmp_path, 1)
    partial = fake_checkpoint(tmp_path, 2)
    os.remove(os.path.join(partial, "COMPLETE"))
    _truncate(os.path.join(partial, "model/__0_1.distcp"))
    os.rename(partial, partial + ".tmp")
    assert resolve_resume(_cfg(tmp_path, "auto"), None) == previous


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_auto_resume_skips_a_damaged_newest_checkpoint(tmp_path, caplog, case):
    from mssr_megatron.train.run_checkpoint import resolve_resume

    previous = fake_checkpoint(tmp_path, 1)
    newest = fake_checkpoint(tmp_path, 2)
    name, damage, what = DAMAGE[case]
    damage(os.path.join(newest, name))
    with caplog.at_level(logging.WARNING, logger="mssr"):
        assert resolve_resume(_cfg(tmp_path, "auto"), None) == previous
    rejected = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(rejected) == 1, rejected
    assert newest in rejected[0] and name in rejected[0] and what in rejected[0], rejected[0]


def test_explicit_damaged_checkpoint_is_an_error_naming_the_file(tmp_path):
    from mssr_megatron.train.run_checkpoint import resolve_resume

    path = fake_checkpoint(tmp_path, 1)
    _random_bytes_inside(os.path.join(path, "model/__0_1.distcp"))
    with pytest.raises(Exception) as info:
        resolve_resume(_cfg(tmp_path, path), None)
    assert type(info.value).__name__ == "CheckpointError"  # caught by the CLI: one line
    assert "model/__0_1.distcp" in str(info.value) and "checksum" in str(info.value)
    assert "\n" not in str(info.value)


def test_every_checkpoint_damaged_stops_in_one_line(tmp_path, caplog):
    from mssr_megatron.train.run_checkpoint import resolve_resume

    _zero(os.path.join(fake_checkpoint(tmp_path, 1), "rng/rank_0.pt"))
    os.remove(os.path.join(fake_checkpoint(tmp_path, 2), "model/common.pt"))
    with caplog.at_level(logging.WARNING, logger="mssr"), pytest.raises(Exception) as info:
        resolve_resume(_cfg(tmp_path, "auto"), None)
    assert type(info.value).__name__ == "CheckpointError"
    assert "none of the 2 checkpoints" in str(info.value) and "\n" not in str(info.value)
    assert len([r for r in caplog.records if "damaged, skipped" in r.getMessage()]) == 2


def test_trainer_state_that_verifies_but_does_not_unpickle_is_rejected(tmp_path, caplog):
    """A file whose bytes match the manifest but cannot be loaded (e.g. a pickle of a class that no longer exists)."""
    from mssr_megatron.train.run_checkpoint import resolve_resume

    previous = fake_checkpoint(tmp_path, 1)
    newest = fake_checkpoint(tmp_path, 2, manifest=False)
    with open(os.path.join(newest, "trainer_state.pt"), "wb") as f:
        f.write(b"\x80\x04\x95not a pickle")
    with open(os.path.join(newest, "MANIFEST.json"), "w") as f:
        json.dump({"version": 1, "hash": "crc32", "world_size": 1, "files": independent_manifest(newest)}, f)
    with caplog.at_level(logging.WARNING, logger="mssr"):
        assert resolve_resume(_cfg(tmp_path, "auto"), None) == previous
    assert any("trainer_state.pt: cannot be read" in r.getMessage() for r in caplog.records)


def test_checkpoint_without_manifest_loads_with_a_warning(tmp_path, caplog):
    from mssr_megatron.train.run_checkpoint import resolve_resume

    path = fake_checkpoint(tmp_path, 1, manifest=False)
    with caplog.at_level(logging.WARNING, logger="mssr"):
        assert resolve_resume(_cfg(tmp_path, "auto"), None) == path
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cannot be verified" in warnings[0], warnings


def test_write_manifest_records_every_file(tmp_path):
    from mssr_megatron.train.checkpoint_files import verify, write_manifest

    path = fake_checkpoint(tmp_path, 1, manifest=False)
    write_manifest(path)
    manifest = json.load(open(os.path.join(path, "MANIFEST.json")))
    assert manifest["files"] == independent_manifest(path) and sorted(manifest["files"]) == sorted(STEP_FILES)
    assert verify(path) == ([], True)


def test_disk_full_errors_are_recognised():
    """The real exceptions of a write onto a full device (/dev/full answers every write with ENOSPC)."""
    from mssr_megatron.train.checkpoint_files import is_disk_full

    caught = []
    for write in (lambda: torch.save(torch.zeros(1000), "/dev/full"),
                  lambda: open("/dev/full", "wb", buffering=0).write(b"x")):
        with pytest.raises((RuntimeError, OSError)) as info:
            write()
        caught.append(info.value)
    assert all(is_disk_full(exc) for exc in caught), caught
    assert not is_disk_full(RuntimeError("CUDA error: device-side assert triggered"))


def _split_worker(rank: int, path: str, out: str) -> None:
    """Rank r writes the manifest with the other rank, then (after rank 0 damaged one file) verifies; it records the
    files it hashed itself and its verdict."""
    import torch.distributed as dist

    from mssr_megatron.train import checkpoint_files

    dist.init_process_group("gloo", rank=rank, world_size=2)
    hashed = []
    original = checkpoint_files.checksum
    checkpoint_files.checksum = lambda p: hashed.append(os.path.relpath(p, path)) or original(p)
    checkpoint_files.write_manifest(path)
    written = list(hashed)
    dist.barrier()
    if rank == 0:
        _random_bytes_inside(os.path.join(path, "model/__0_1.distcp"))  # listed second: rank 1's share
    dist.barrier()
    hashed.clear()
    problems, _ = checkpoint_files.verify(path, world_size=1)
    torch.save({"written": written, "verified": list(hashed), "problems": [str(p) for p in problems]},
               os.path.join(out, f"rank_{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_split_the_hashing_and_agree(tmp_path):
    from megatron_harness import spawn

    path = fake_checkpoint(tmp_path / "save", 1, manifest=False)
    expected = independent_manifest(path)
    spawn(_split_worker, 2, path, str(tmp_path))
    results = [torch.load(tmp_path / f"rank_{r}.pt") for r in range(2)]
    names = sorted(expected)
    for rank, result in enumerate(results):
        assert result["written"] == names[rank::2] and result["verified"] == names[rank::2]
        assert len(result["problems"]) == 1 and result["problems"][0].startswith("model/__0_1.distcp: checksum")
    assert results[0]["problems"] == results[1]["problems"]
    # the manifest itself (written before the damage) agrees with this test's own checksums
    assert json.load(open(os.path.join(path, "MANIFEST.json")))["files"] == expected


# --------------------------------------------------------------------------- end to end: real trainer processes
def _train(assets, run_dir, *extra, prefix=(), timeout=400) -> tuple[int, str]:
    args = overrides(assets, str(run_dir), "trainer.total_steps=3", "checkpoint.save_every=1",
                     "checkpoint.keep_last=0", *extra)
    cmd = [sys.executable, "-m", "mssr_megatron.cli", "train", "examples/configs/tiny_cpu.yaml", *args]
    if prefix:
        cmd = [*prefix, " ".join(shlex.quote(c) for c in cmd)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc.returncode, proc.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run of 3 steps with a checkpoint after each (keep_last=0: all three kept)."""
    root = tmp_path_factory.mktemp("ckpt_faults")
    assets = build_assets(str(root / "assets"))
    rc, out = _train(assets, root / "base")
    assert rc == 0, out[-3000:]
    assert sorted(os.listdir(root / "base" / "checkpoints")) == [f"step_00000{s}" for s in (1, 2, 3)]
    return assets, root / "base"


def _copy(trained, dst):
    shutil.copytree(trained[1], dst)
    return os.path.join(dst, "checkpoints")


def _warnings(out: str, what: str) -> list[str]:
    return [line for line in out.splitlines() if what in line]


@pytest.mark.slow
def test_random_bytes_in_newest_checkpoint_resume_falls_back(trained, tmp_path):
    """The weights of the damaged checkpoint are never loaded: the resumed run logs the uninterrupted run's step 3."""
    save = _copy(trained, tmp_path / "run")
    _random_bytes_inside(os.path.join(save, "step_000003", "model", "__0_0.distcp"))
    rc, out = _train(trained[0], tmp_path / "run", "checkpoint.resume=auto")
    assert rc == 0, out[-3000:]
    skipped = _warnings(out, "is damaged, skipped")
    assert len(skipped) == 1 and "step_000003" in skipped[0] and "model/__0_0.distcp: checksum" in skipped[0], out
    assert len(_warnings(out, f"resumed from {os.path.join(save, 'step_000002')} at step 2")) == 1, out
    assert logged_metrics(tmp_path / "run") == logged_metrics(trained[1])  # steps 0..3 once, step 3 as before


@pytest.mark.slow
def test_every_checkpoint_damaged_stops_before_loading(trained, tmp_path):
    save = _copy(trained, tmp_path / "run")
    _truncate(os.path.join(save, "step_000001", "model", "__0_1.distcp"))
    _zero(os.path.join(save, "step_000002", "rng", "rank_0.pt"))
    os.remove(os.path.join(save, "step_000003", "model", ".metadata"))
    rc, out = _train(trained[0], tmp_path / "run", "checkpoint.resume=auto")
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    assert len(_warnings(out, "is damaged, skipped")) == 3, out
    errors = _warnings(out, "mssr train: error:")
    assert len(errors) == 1 and "none of the 3 checkpoints" in errors[0], out


@pytest.mark.slow
def test_explicit_damaged_checkpoint_stops_naming_the_file(trained, tmp_path):
    save = _copy(trained, tmp_path / "run")
    _truncate(os.path.join(save, "step_000003", "trainer_state.pt"))
    rc, out = _train(trained[0], tmp_path / "run", f"checkpoint.resume={os.path.join(save, 'step_000003')}")
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    errors = _warnings(out, "mssr train: error:")
    assert len(errors) == 1 and "trainer_state.pt: size" in errors[0], out


def _can_mount_tmpfs() -> bool:
    try:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                               capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.mark.slow
def test_disk_full_during_save_ends_in_one_line_and_removes_the_partial_checkpoint(trained, tmp_path):
    """A real full disk: the checkpoint folder is a 21 MB tmpfs (in a private mount namespace) holding step 1
    (~14 MB); the run resumes from it, trains step 2, and its save runs out of space inside megatron's writer."""
    if not _can_mount_tmpfs():
        pytest.skip("this machine cannot mount a tmpfs in a user namespace (unshare -rm)")
    mount, after = tmp_path / "disk", tmp_path / "after"
    os.makedirs(mount)
    shutil.copytree(trained[1], tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    step1 = os.path.join(trained[1], "checkpoints", "step_000001")
    # inside the namespace: mount, put step 1 there, train, then copy what is left where the test can read it
    script = (f"mount -t tmpfs -o size=21m tmpfs {mount} && cp -r {step1} {mount}/ && {{ eval \"$0\"; rc=$?; "
              f"cp -r {mount} {after}; exit $rc; }}")
    rc, out = _train(trained[0], tmp_path / "run", "checkpoint.resume=auto", f"checkpoint.save_dir={mount}",
                     prefix=("unshare", "-rm", "sh", "-c", script))
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    errors = _warnings(out, "mssr train: error:")
    assert len(errors) == 1, out
    assert "no space left on device" in errors[0] and f"in {mount}:" in errors[0] and "MB free of" in errors[0], out
    assert sorted(os.listdir(after)) == ["step_000001"]  # no step_000002.tmp
    from mssr_megatron.train.checkpoint_files import verify

    assert verify(os.path.join(after, "step_000001")) == ([], True)
