"""The wheel folder of the smoke kit: what a GPU node with a CUDA torch and transformers 5 lacks to run the project.

    make_wheels(DIR)      on a connected machine: `pip download --no-deps` of WHEELS for CPython 3.12 on x86-64 Linux
                          (pure-Python wheels where they exist, manylinux ones otherwise) + the project's own wheel
    install_missing(DIR)  on the node: `pip install --no-index --find-links DIR` of the WHEELS that are not installed
                          (never torch, never a package the node already has), and the project (--no-deps)

Versions are those the project is tested with. Not all are pure Python: megatron-core 0.16.1 ships only
cpXY manylinux_2_28 wheels (x86-64 and aarch64) besides its sdist, and grpcio, protobuf, markupsafe, pyyaml, psutil
and pillow are platform wheels too, so the folder is made for one platform (default PLATFORMS, x86-64; tools/
gpu_smoke.py --platform manylinux_2_28_aarch64 for a GH200 node). About 24 MiB; it must stay under
MAX_FOLDER_BYTES. tools/make_wheelhouse.sh (item 9) builds the full cluster wheelhouse (SGLang, vLLM, Transformer
Engine); this folder is the small one the smoke needs.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

WHEELS = (
    "megatron-core==0.16.1",
    "math-verify==0.9.0", "latex2sympy2_extended==1.11.0", "antlr4-python3-runtime==4.13.2",  # rewards
    "tensorboard==2.21.0", "tensorboard-data-server==0.7.2", "absl-py==2.5.1", "grpcio==1.85.3", "markdown==3.11.3",
    "protobuf==7.36.2", "werkzeug==3.1.9", "markupsafe==3.0.4",  # metrics (TensorBoard event files)
    "psutil==7.2.2",  # megatron-core's dist_checkpointing needs it without declaring it
    "pyyaml==6.0.4", "tqdm==4.70.1", "pillow==13.0.0", "packaging==26.4",  # usually present already; small
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64", "any")
PROJECT = "mssr-megatron"
MAX_FOLDER_BYTES = 64 * 2**20


def _name(requirement: str) -> str:
    return requirement.split("==")[0]


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def missing(requirements=WHEELS) -> list[str]:
    """The requirements whose distribution is not installed (an installed one is kept, whatever its version)."""
    return [r for r in requirements if not installed(_name(r))]


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def make_wheels(folder: str, repo: str, python_version: str = "3.12", platforms=PLATFORMS) -> list[str]:
    """Download WHEELS for `python_version` / `platforms` and build the project's wheel into `folder`; returns the
    file names. Needs PyPI (or a configured index)."""
    os.makedirs(folder, exist_ok=True)
    platform_args = [a for p in platforms for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    python_version, *platform_args, "--dest", folder, *WHEELS], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", folder,
                    repo], check=True)
    size = folder_bytes(folder)
    if size > MAX_FOLDER_BYTES:
        raise RuntimeError(f"{folder} holds {size / 2**20:.0f} MiB, over the {MAX_FOLDER_BYTES // 2**20} MiB limit: "
                           "remove files that are not wheels of WHEELS or the project")
    return sorted(os.listdir(folder))


def install_missing(folder: str) -> list[str]:
    """pip install --no-index --find-links `folder` the missing WHEELS, then the project wheel (--no-deps: its
    torch/transformers requirements are the node's) when the project is not installed. Returns what was installed."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--wheels {folder}: no such folder (make it with tools/gpu_smoke.py --make-wheels "
                                "DIR on a machine with internet access, then copy it here)")
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", folder]
    wanted = missing()
    if wanted:
        subprocess.run([*pip, *wanted], check=True)
    if not installed(PROJECT):
        subprocess.run([*pip, "--no-deps", PROJECT], check=True)
        wanted.append(PROJECT)
    return wanted
