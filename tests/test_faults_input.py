"""Fault injection, hostile input (issue 12, item 7): adversarial answers in the reward path, reward workers of a
killed trainer, and damaged checkpoints given to `mssr convert`.

Process-level faults run real processes: a grading process killed with SIGKILL (its worker pids must vanish), and the
`mssr convert` command line on damaged files (one line, exit code 2, no traceback). Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reward_helpers
from mssr_megatron.rewards import RewardGrader
from mssr_megatron.rewards import grader as grader_module

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# 4M nested boxes (32 MB): format_reward, linear-time, needs ~11 s on one core for it; no reward function of the
# answer is involved (reward_helpers.always_right), so the time is the format check's alone.
NESTED_BOXES = "<think>r</think>" + "\\boxed{" * 4_000_000 + "1" + "}" * 4_000_000


# ------------------------------------------------------------------------------------------------ the format reward
def test_a_slow_format_check_is_a_counted_timeout_within_the_limit():
    """The format check used to run in the calling (trainer) process with no limit: this answer blocked it for
    seconds and counted no timeout. It now runs in the worker with the answer's reward, under the same limit (4 s:
    far below the check's ~11 s, far above what the short answer needs on a loaded machine)."""
    with RewardGrader(reward_helpers.always_right, num_workers=2, timeout_s=4.0) as grader:
        grader.start()
        out = grader.score([NESTED_BOXES, "<think>r</think> \\boxed{1}"], ["1", "1"], format_weight=0.5)
    assert out.failures == [(0, "timeout after 4.0s")]
    assert out.correct == [0.0, 1.0] and out.format == [0.0, 1.0] and out.scores == [0.0, 1.0]
    assert out.as_metrics()["reward/timeouts"] == 1 and out.as_metrics()["reward/format_rate"] == 0.5


def _format_check_raises(response: str, answer: str = "") -> float:
    raise RuntimeError("format check ran")


def test_the_format_check_runs_only_with_a_format_weight(monkeypatch):
    monkeypatch.setattr(grader_module, "format_reward", _format_check_raises)
    grader = RewardGrader("math", num_workers=0)
    out = grader.score(["\\boxed{1}", "\\boxed{2}"], ["1", "1"], format_weight=0.0)
    assert out.correct == [1.0, 0.0] and out.scores == [1.0, 0.0] and out.failures == [] and out.format == []
    assert "reward/format_rate" not in out.as_metrics()
    # With a weight it runs inside the per-answer call (in-process here): its failure is that answer's, counted.
    out = grader.score(["\\boxed{1}"], ["1"], format_weight=0.5)
    assert out.failures == [(0, "RuntimeError: format check ran")] and out.scores == [0.0]
    assert out.as_metrics()["reward/errors"] == 1


def test_nul_bytes_and_a_megabyte_answer_go_through_the_workers():
    responses = ["<think>r</think> \\boxed{1}\x00\x00",  # NUL bytes after the answer
                 "<think>r\x00</think>" + "x" * 1_000_000 + " \\boxed{1}",  # a 1 MB answer
                 "\x00" * 1000]
    with RewardGrader("math", num_workers=2, timeout_s=30.0) as grader:
        out = grader.score(responses, ["1"] * 3, format_weight=0.5)
    assert out.failures == [] and out.correct == [1.0, 1.0, 0.0] and out.format == [1.0, 1.0, 0.0]


def test_a_format_weight_over_one_and_an_infinite_time_limit_are_refused():
    from mssr_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.format_reward_weight=1.5 must be at most 1"):
        load_config(None, ["data.format_reward_weight=1.5"])
    with pytest.raises(ConfigError, match=r"data.reward_timeout_s=inf must be a finite number"):
        load_config(None, ["data.reward_timeout_s=.inf"])


def test_an_image_cut_short_after_its_header_is_named_when_decoded(tmp_path):
    """A JPEG whose header reads passes the load-time check (header and size only, kept cheap for large datasets);
    decoding it in a step fails, and the error now names the file (it named no file before)."""
    import numpy as np
    from PIL import Image

    from mssr_megatron.data.images import ImageDecodeError, decode_images, image_size

    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    _truncate(path, 0.3)
    assert image_size(str(path)) == (64, 64)
    with pytest.raises(ImageDecodeError) as info:
        decode_images([str(path)])
    assert str(info.value).startswith(f"{str(path)!r} is not a decodable image (") and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ a killed trainer
# A "trainer" that starts a 2-worker pool (from its main thread, or from a thread that ends before the kill), grades,
# leaves one worker busy (a GIL-holding regular expression with the main thread's pool; a sleep otherwise) and writes
# the pids of its children (the workers and the multiprocessing resource tracker) for the test to watch.
_GRADING_PROCESS = r"""
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import reward_helpers
from multiprocessing import resource_tracker
from mssr_megatron.rewards import RewardGrader

mode, pid_file = sys.argv[2], sys.argv[3]
fn = reward_helpers.backtrack_on_marker if mode == "main" else reward_helpers.hang_on_marker
grader = RewardGrader(fn, num_workers=2, timeout_s=600.0)
if mode == "main":
    grader.start()
else:
    starter = threading.Thread(target=grader.start)
    starter.start()
    starter.join()
assert grader.score(["\\boxed{1}"], ["1"]).correct == [1.0] and grader.pool_restarts == 0
threading.Thread(target=grader.score, args=(["x"], [reward_helpers.HANG]), daemon=True).start()
time.sleep(1.0)
children = sorted(int(pid) for task in os.listdir("/proc/self/task")
                  for pid in open(f"/proc/self/task/{task}/children").read().split())
pids = {"workers": sorted(grader._pool._processes), "tracker": resource_tracker._resource_tracker._pid,
        "children": children}
with open(pid_file + ".tmp", "w") as fh:
    json.dump(pids, fh)
os.replace(pid_file + ".tmp", pid_file)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, waiting for an init that may never reap it, has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("started_from", ["main", "thread"])
def test_reward_workers_die_with_a_killed_trainer(tmp_path, started_from):
    pid_file, stderr = tmp_path / "pids.json", tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _GRADING_PROCESS, str(TESTS), started_from, str(pid_file)],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists():
            assert proc.poll() is None, f"the grading process failed: {stderr.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the grading process did not start its workers in 120 s"
            time.sleep(0.1)
        pids = json.loads(pid_file.read_text())
        children = pids["children"]
        assert len(pids["workers"]) == 2 and set(pids["workers"]) <= set(children)
        assert pids["tracker"] in children and all(_alive(pid) for pid in children)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed = time.monotonic()
        while (alive := [pid for pid in children if _alive(pid)]) and time.monotonic() < killed + 5:
            time.sleep(0.05)
        assert not alive, f"still running 5 s after the trainer was killed: {alive} of workers {pids['workers']}"
        print(f"{started_from}: children gone {time.monotonic() - killed:.2f}s after the kill")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pid in children:  # only when the test failed: do not leave its processes behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ damaged checkpoints
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from megatron_harness import LAYERS, VOCAB
    from mssr_megatron.models.tiny_hf import build_tiny_model_dir

    return Path(build_tiny_model_dir(tmp_path_factory.mktemp("hf") / "tiny", seed=0, tie_word_embeddings=True,
                                     vocab_size=VOCAB, num_layers=LAYERS))


def _damaged_copy(src: Path, dst: Path, damage) -> Path:
    shutil.copytree(src, dst)
    damage(dst)
    return dst


def _truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def _append(path: Path) -> None:
    with open(path, "ab") as fh:
        fh.write(b"\0" * 16)


def _bad_header_entry(path: Path) -> None:
    """Rewrite the header with one entry's data_offsets dropped, keeping the file's length."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    name = next(k for k in header if k != "__metadata__")
    header[name] = {"dtype": header[name]["dtype"], "shape": header[name]["shape"]}
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    assert len(text) == size
    path.write_bytes(raw[:8] + text + raw[8 + size:])


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize("damage,expected", [
    (_truncate, r"model.safetensors is truncated: it has \d+ bytes but its header needs \d+"),
    (_append, r"model.safetensors is longer than its header says: it has \d+ bytes but its header needs \d+"),
    (_bad_header_entry, r"model.safetensors: the header entry of tensor \S+ is malformed"),
], ids=["truncated", "padded", "bad_header_entry"])
def test_a_damaged_safetensors_file_is_named_before_any_rank_starts(tmp_path, hf_dir, damage, expected):
    from mssr_megatron.checkpoint.convert import ConversionError, hf_to_megatron

    src = _damaged_copy(hf_dir, tmp_path / "hf", lambda d: damage(d / "model.safetensors"))
    start = time.monotonic()
    with pytest.raises(ConversionError, match=expected) as info:
        hf_to_megatron(src, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value) and str(src / "model.safetensors") in str(info.value)
    assert time.monotonic() - start < 5  # found from the header, not by the spawned ranks
    assert _leftovers(tmp_path / "out") == []


def test_a_tensor_that_cannot_be_read_names_its_file_and_tensor(tmp_path, hf_dir):
    from mssr_megatron.checkpoint.dist_io import ConversionError, HFTensors

    src = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    tensors = HFTensors(str(src))  # indexed while whole, damaged before the first read
    _truncate(src / "model.safetensors")
    name = sorted(tensors)[0]
    with pytest.raises(ConversionError) as info:
        tensors[name]
    message = str(info.value)
    assert message.startswith(f"cannot read tensor {tensors.index[name][1]} from {src / 'model.safetensors'} (")
    assert "\n" not in message


def _run_convert(*args: str) -> subprocess.CompletedProcess:
    """`mssr convert ...` in a process of its own. Megatron's import-time notice that TE and Apex are missing (printed
    by every `mssr` command on CPU, when the parser imports the planner) is filtered: it is not the conversion's."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore:Transformer Engine and Apex are not installed:UserWarning"}
    return subprocess.run([sys.executable, "-m", "mssr_megatron.cli", "convert", "--quiet", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


@pytest.mark.slow
def test_convert_cli_on_a_truncated_safetensors_prints_one_line(tmp_path, hf_dir):
    src = _damaged_copy(hf_dir, tmp_path / "hf", lambda d: _truncate(d / "model.safetensors"))
    done = _run_convert("--to", "megatron", "--input", src, "--output", tmp_path / "out")
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"convert: error: {src / 'model.safetensors'} is truncated")
    assert done.stderr.count("\n") == 1, done.stderr
    assert _leftovers(tmp_path / "out") == []


@pytest.mark.slow
def test_train_on_a_truncated_model_prints_one_line_before_any_model_is_built(tmp_path):
    """The trainer's HF engine used to meet the damaged file first, inside transformers' loader: a 60-line traceback
    with no file named."""
    from trainer_assets import build_assets, overrides

    assets = build_assets(str(tmp_path))
    _truncate(Path(assets["model"]) / "model.safetensors")
    env = {**os.environ, "PYTHONWARNINGS": "ignore:Transformer Engine and Apex are not installed:UserWarning"}
    done = subprocess.run([sys.executable, "-m", "mssr_megatron.cli", "train", "examples/configs/tiny_cpu.yaml",
                           *overrides(assets, str(tmp_path / "run"))], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)
    weights = Path(assets["model"]) / "model.safetensors"
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"mssr train: error: {weights} is truncated: it has {weights.stat().st_size} bytes")


@pytest.fixture(scope="module")
def megatron_ckpt(tmp_path_factory, hf_dir) -> Path:
    from mssr_megatron.checkpoint.convert import hf_to_megatron

    return Path(hf_to_megatron(hf_dir, tmp_path_factory.mktemp("mcore") / "ckpt", tp=1, progress=False))


def _largest(directory: Path, suffix: str) -> Path:
    return max(directory.glob(f"*{suffix}"), key=lambda p: p.stat().st_size)


_DIST_DAMAGE = {
    "truncated_distcp": (lambda d: _truncate(_largest(d, ".distcp")), r"__\S+\.distcp is truncated: it has \d+ bytes"),
    "missing_distcp": (lambda d: _largest(d, ".distcp").unlink(), r"__\S+\.distcp is missing \(named by \S+\.metadata"),
    "missing_metadata": (lambda d: (d / ".metadata").unlink(), r"ckpt/\.metadata is missing"),
    "garbage_metadata": (lambda d: (d / ".metadata").write_bytes(os.urandom(256)), r"ckpt/\.metadata is unreadable"),
    "truncated_common": (lambda d: _truncate(d / "common.pt"), r"ckpt/common\.pt is unreadable"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(_DIST_DAMAGE))
def test_a_damaged_megatron_checkpoint_is_named_in_one_line(tmp_path, megatron_ckpt, case):
    from mssr_megatron.checkpoint.convert import ConversionError, megatron_to_hf

    damage, expected = _DIST_DAMAGE[case]
    ckpt = _damaged_copy(megatron_ckpt, tmp_path / "ckpt", damage)
    start = time.monotonic()
    with pytest.raises(ConversionError, match=expected) as info:
        megatron_to_hf(ckpt, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value) and str(ckpt) in str(info.value)
    assert time.monotonic() - start < 10  # found from the files, before the ranks load anything
    assert _leftovers(tmp_path / "out") == []


@pytest.mark.slow
def test_convert_cli_on_a_truncated_distcp_prints_one_line(tmp_path, megatron_ckpt):
    ckpt = _damaged_copy(megatron_ckpt, tmp_path / "ckpt", lambda d: _truncate(_largest(d, ".distcp")))
    done = _run_convert("--to", "hf", "--input", ckpt, "--output", tmp_path / "out")
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"convert: error: {ckpt}/") and ".distcp is truncated" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert _leftovers(tmp_path / "out") == []
