"""Checkpoint-shaped directories for the fault tests: the files a run checkpoint has (random shard bytes, real
pickles), with a manifest computed here, independently of the package (zlib.crc32 over each whole file)."""

from __future__ import annotations

import json
import os
import zlib

import torch

STEP_FILES = ("model/.metadata", "model/__0_0.distcp", "model/__0_1.distcp", "model/common.pt",
              "model/metadata.json", "trainer_state.pt", "rng/rank_0.pt")


def independent_manifest(directory: str) -> dict:
    """{relative path: {"size", "crc32"}} of every file but COMPLETE and MANIFEST.json, computed from whole reads."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel not in ("COMPLETE", "MANIFEST.json"):
                data = open(os.path.join(root, name), "rb").read()
                files[rel] = {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    return files


def fake_checkpoint(save_dir, step: int, manifest: bool = True, run_id: str | None = None) -> str:
    """A checkpoint with the files a real one has (random shard bytes, real pickles), its manifest and COMPLETE
    (naming run `run_id`; None: a checkpoint from before run ids)."""
    path = os.path.join(str(save_dir), f"step_{step:06d}")
    os.makedirs(os.path.join(path, "model"))
    os.makedirs(os.path.join(path, "rng"))
    gen = torch.Generator().manual_seed(step)
    for name in ("model/__0_0.distcp", "model/__0_1.distcp", "model/.metadata"):
        with open(os.path.join(path, name), "wb") as f:
            f.write(torch.randint(0, 256, (40_000,), generator=gen, dtype=torch.uint8).numpy().tobytes())
    with open(os.path.join(path, "model/metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1}, f)
    torch.save({"optimizer": {"param_groups": []}}, os.path.join(path, "model/common.pt"))
    torch.save({"step": step, "world_size": 1, "sampler": {"position": step}}, os.path.join(path, "trainer_state.pt"))
    torch.save({"torch": torch.get_rng_state()}, os.path.join(path, "rng/rank_0.pt"))
    if manifest:
        with open(os.path.join(path, "MANIFEST.json"), "w") as f:
            json.dump({"version": 1, "hash": "crc32", "world_size": 1, "files": independent_manifest(path)}, f)
    with open(os.path.join(path, "COMPLETE"), "w") as f:
        json.dump({"step": step} if run_id is None else {"step": step, "run_id": run_id}, f)
    return path
