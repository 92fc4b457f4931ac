"""Packaging for clusters: the GPU extras of pyproject.toml each resolve consistently with the runtime requirements by
the pins they list (sglang and vllm pin different torch/flashinfer builds, so they are separate extras and nothing
asks for both); the pins are the engines' own; the CPU/CI install path is unchanged; tools/make_wheelhouse.sh builds
an offline wheel folder that `pip install --no-index --find-links` installs from."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "make_wheelhouse.sh")
EXTRAS = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]


def requirement_lines(path: str) -> list[str]:
    lines = [line.split("#")[0].strip() for line in open(os.path.join(ROOT, path))]
    return [line for line in lines if line]


def conflicts(lines: list[str]) -> list[str]:
    """Packages whose requirements cannot all hold: two different exact pins, or an exact pin another specifier
    excludes. (Exact pins are what the engines use; ranges alone are not solved here.)"""
    by_name: dict[str, list[Requirement]] = {}
    for line in lines:
        req = Requirement(line)
        by_name.setdefault(canonicalize_name(req.name), []).append(req)
    found = []
    for name, reqs in sorted(by_name.items()):
        exact = {spec.version for req in reqs for spec in req.specifier if spec.operator == "=="}
        if len(exact) > 1 or (exact and not all(req.specifier.contains(next(iter(exact)), prereleases=True)
                                                for req in reqs)):
            found.append(f"{name}: {' / '.join(str(req.specifier) for req in reqs)}")
    return found


def pins(lines: list[str]) -> dict[str, str]:
    """name -> specifier text of the requirements without environment markers."""
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs if r.marker is None}


@pytest.mark.parametrize("extras", [["sglang"], ["vllm"], ["te"], ["dali"], ["sglang", "te", "dali"],
                                    ["vllm", "te", "dali"]])
def test_each_cluster_install_is_consistent_by_its_pins(extras):
    lines = requirement_lines("requirements.txt") + [r for e in extras for r in EXTRAS[e]]
    assert conflicts(lines) == [], extras


def test_sglang_and_vllm_are_separate_because_their_pins_conflict():
    assert sorted(conflicts(EXTRAS["sglang"] + EXTRAS["vllm"])) == [
        "flashinfer-python: ==0.7.2 / ==0.7.2.post1", "torch: ==2.14.1 / ==2.14.0"]
    for name, reqs in EXTRAS.items():  # no extra, and no requirements file, asks for both engines
        assert not {"sglang", "vllm"} <= {canonicalize_name(Requirement(r).name) for r in reqs}, name
    assert requirement_lines("requirements-gpu.txt") == []  # a pointer to the extras only: nothing to conflict


@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="the sglang wheel is not installed")
def test_sglang_extra_pins_are_sglangs_own():
    theirs = pins(importlib.metadata.requires("sglang"))
    ours = pins(EXTRAS["sglang"])
    assert ours["sglang"] == f"=={importlib.metadata.version('sglang')}"
    for name in ("torch", "flashinfer-python", "transformers"):
        assert ours[name] == theirs[name], name
    flashinfer = next(Requirement(r) for r in importlib.metadata.requires("sglang") if r.startswith("flashinfer"))
    assert flashinfer.extras == {"cu13"} == Requirement(EXTRAS["sglang"][2]).extras  # CUDA 13 builds


def test_te_extra_is_megatron_cores_tested_range():
    dev = [Requirement(r) for r in importlib.metadata.requires("megatron-core")
           if r.startswith("transformer-engine") and "dev" in r]
    (ours,) = [Requirement(r) for r in EXTRAS["te"]]
    assert [(r.specifier, r.extras) for r in dev] == [(ours.specifier, ours.extras)]


def test_cpu_install_path_is_unchanged():
    assert EXTRAS["test"] == ["pytest>=8", "hypothesis>=6", "msgspec"]
    assert conflicts(requirement_lines("requirements.txt") + requirement_lines("constraints-cpu.txt")) == []


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_make_wheelhouse_help_and_dry_run():
    done = run_script("--help")
    assert done.returncode == 0 and "pip install --no-index --find-links" in done.stdout
    done = run_script("--extras", "sglang,te", "--python-version", "3.12", "--dest", "/tmp/wh", "--dry-run")
    assert done.returncode == 0, done.stderr
    listed = [line.removeprefix("#   ") for line in done.stdout.splitlines() if line.startswith("#   ")]
    assert listed == requirement_lines("requirements.txt") + EXTRAS["sglang"] + EXTRAS["te"]
    assert "pip wheel --no-deps --wheel-dir /tmp/wh /" in done.stdout  # built from a clean copy of the sources
    assert ("pip download --dest /tmp/wh --only-binary=:all: --implementation cp --python-version 3.12 "
            "--platform manylinux_2_34_x86_64") in done.stdout
    done = run_script("--extras", "sglang,vllm", "--dry-run")
    assert done.returncode != 0 and "one engine per wheelhouse" in done.stderr
    done = run_script("--extras", "sglangg", "--dry-run")
    assert done.returncode != 0 and "unknown extra(s) ['sglangg']" in done.stderr


@pytest.mark.slow
def test_wheelhouse_installs_offline_into_a_fresh_venv(tmp_path):
    """For real, on a pure-Python subset: the project's wheel and pyyaml, downloaded (PyPI) then installed with no
    index into a new virtual environment."""
    subset = tmp_path / "subset.txt"
    subset.write_text("pyyaml>=6\n")
    house = tmp_path / "wheelhouse"
    done = run_script("--requirements", str(subset), "--dest", str(house))
    if done.returncode != 0 and any(w in done.stderr for w in ("NewConnectionError", "Could not fetch", "timed out")):
        pytest.skip(f"PyPI unreachable: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    names = sorted(os.listdir(house))
    assert any(n.startswith("mssr_megatron-") and n.endswith(".whl") for n in names), names
    assert any(n.lower().startswith("pyyaml-") for n in names), names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # --no-deps: the subset leaves out torch & co.; the point is that the wheels come from the folder alone
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "--no-index", "--find-links", str(house),
                              "--no-deps", "mssr-megatron", "pyyaml"], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    check = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import yaml, mssr_megatron; print(mssr_megatron.__version__, mssr_megatron.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    version, path = check.stdout.split()
    assert version == importlib.metadata.version("mssr-megatron") and str(venv) in path
