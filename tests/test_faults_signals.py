"""Fault injection: signals in every phase. SIGTERM / SIGUSR1 / SIGINT stop the run at the next phase boundary (set-up,
tracker initialisation chunks, step-0 validation, after a step's rollouts, after a step); the CLI says "checkpoint
saved" only when one was; a second SIGINT exits at once; the requeued run logs every step once. In-process cases for
the flag, the chunked initialisation and the dropped step, then real `mssr train` processes (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from mssr_megatron.cli import _stopped_line
from mssr_megatron.config import load_config
from mssr_megatron.train import rl_step, trainer


class _StopAfter:
    """A stop flag that is agreed from its `calls`-th agreed() on (counting from 1)."""

    def __init__(self, calls: int):
        self.calls, self.seen, self.signal_name = calls, 0, "SIGTERM"

    def agreed(self) -> bool:
        self.seen += 1
        return self.seen >= self.calls


def test_first_sigint_asks_to_stop_second_exits_at_once():
    before = signal.getsignal(signal.SIGINT)
    flag = trainer._PreemptionFlag()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in the main thread at the next bytecode
        assert flag.requested and flag.signal_name == "SIGINT" and flag.agreed()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_sigusr1_then_sigterm_keeps_the_first_name():
    flag = trainer._PreemptionFlag()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert flag.agreed() and flag.signal_name == "SIGUSR1"
    finally:
        flag.restore()


def test_cli_says_checkpoint_saved_only_when_one_was():
    saved = _stopped_line({"preempted_at_step": 3, "signal": "SIGTERM", "checkpoint_saved": "/c/step_000003"})
    assert saved == "stopped by SIGTERM at step 3: checkpoint saved: /c/step_000003; continue with checkpoint.resume=auto"
    for summary in ({"preempted_at_step": 2, "signal": "SIGUSR1", "checkpoint_saved": None},
                    {"preempted_at_step": 0, "signal": "SIGINT", "checkpoint_saved": None}):
        assert "checkpoint saved" not in _stopped_line(summary)
    assert "nothing trained yet" in _stopped_line({"preempted_at_step": 0, "signal": "SIGINT", "checkpoint_saved": None})


def test_second_sigint_exits_in_one_line(monkeypatch, capsys):
    """What the CLI prints when the second Ctrl-C's KeyboardInterrupt comes out of train(): one line, exit 130."""
    from mssr_megatron import cli

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    monkeypatch.delenv("MSSR_TRACEBACK", raising=False)
    assert cli.main(["train", "examples/configs/tiny_cpu.yaml"]) == 130
    assert capsys.readouterr().err.splitlines() == [
        "mssr train: interrupted: exited at once, nothing saved (checkpoints already on disk are intact)"]


def _fake_ctx(num_prompts: int, *overrides):
    cfg = load_config(None, ["data.prompts_per_step=4", "optimizer.mini_batch_size=4",
                             "algorithm.baseline.init_rollouts=2", *overrides])
    initialized = []
    algo = SimpleNamespace(tracker=object(), initialize=lambda ids, rewards: initialized.append((ids, rewards)))
    records = [SimpleNamespace(prompt_id=f"p{i}", answer="1") for i in range(num_prompts)]
    return SimpleNamespace(cfg=cfg, algo=algo, train=records, device=None), initialized


def _fake_engine(monkeypatch):
    """rl_step.generate/grade stand-ins: n rollouts per record, request ids local to the call, reward 1 for even
    prompt numbers; records each call's prompts and seed."""
    calls = []

    def generate(ctx, records, sampling):
        calls.append(([r.prompt_id for r in records], sampling.seed))
        return [SimpleNamespace(request_id=str(i)) for i in range(len(records)) for _ in range(sampling.n)]

    def grade(ctx, records, rollouts):
        rewards = [float(int(records[int(r.request_id)].prompt_id[1:]) % 2 == 0) for r in rollouts]
        return rewards, {"reward/accuracy": sum(rewards) / len(rewards)}

    monkeypatch.setattr(rl_step, "generate", generate)
    monkeypatch.setattr(rl_step, "grade", grade)
    return calls


def test_tracker_initialisation_runs_in_chunks_with_the_seeds_of_one_call(monkeypatch):
    calls = _fake_engine(monkeypatch)
    ctx, initialized = _fake_ctx(10)
    assert trainer.initialize_tracker(ctx, _StopAfter(10 ** 6))
    seed = ctx.cfg.rollout.seed - 1
    # prompt k of a single call would get seed + k * n (rl_step.generate): each chunk starts where it would
    assert calls == [([f"p{i}" for i in range(0, 4)], seed), ([f"p{i}" for i in range(4, 8)], seed + 8),
                     (["p8", "p9"], seed + 16)]
    [(ids, rewards)] = initialized
    assert ids == [f"p{i}" for i in range(10) for _ in range(2)]
    assert rewards.tolist() == [float(i % 2 == 0) for i in range(10) for _ in range(2)]


def test_tracker_initialisation_stops_between_chunks(monkeypatch):
    calls = _fake_engine(monkeypatch)
    ctx, initialized = _fake_ctx(10)
    assert not trainer.initialize_tracker(ctx, _StopAfter(2))  # agreed before the second chunk
    assert len(calls) == 1 and initialized == []


def test_step_stopped_after_its_rollouts_is_dropped(monkeypatch):
    """No update, and the sampler is back where the step began: a checkpoint of ctx.step then holds exactly the
    state that step's checkpoint would have, and the resumed run draws the same prompts."""
    from mssr_megatron.data.sampler import PromptSampler

    _fake_engine(monkeypatch)
    ctx, _ = _fake_ctx(10)
    ctx.step, ctx.sampler, ctx.device = 0, PromptSampler(10, 4, seed=0, shuffle=True), SimpleNamespace(type="cpu")
    monkeypatch.setattr(rl_step, "make_experience", lambda *a: pytest.fail("the step went on to the update"))
    reference = PromptSampler(10, 4, seed=0, shuffle=True)
    reference.next_step()
    ctx.sampler.next_step()  # a step already done
    assert trainer.train_step(ctx, _StopAfter(1)) is None
    assert ctx.sampler.state_dict() == reference.state_dict()


# ------------------------------------------------------------------------------------------- real processes (slow)
class _Run:
    """`mssr train` in a subprocess whose output is read as it comes (to wait for a log line); killed with its
    children on a timeout."""

    def __init__(self, assets, run_dir, *extra):
        from trainer_assets import overrides

        args = overrides(assets, str(run_dir), *extra)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mssr_megatron.cli", "train", "examples/configs/tiny_cpu.yaml", *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)  # its own process group, as a terminal's foreground job: Ctrl-C reaches all of it
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if any(text in line for line in list(self.lines)):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"no {text!r} within {timeout_s} s:\n{''.join(self.lines)[-3000:]}")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)

    def finish(self, timeout_s: float) -> str:
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(timeout=10)
        out = "".join(self.lines)
        assert self.proc.returncode == 0, out[-3000:]
        return out


def _logged_steps(run_dir) -> list[int]:
    """Every step metrics.jsonl holds, in file order (a line still being written is left out)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


@pytest.mark.slow
def test_signals_in_tracker_initialisation_and_in_a_step_then_requeue(tmp_path):
    """SIGTERM during the tracker initialisation: exits within a chunk, one line, no 'checkpoint saved', PREEMPTED
    left. The requeued run (resume=auto) starts over; Ctrl-C (SIGINT to its process group, reward worker included)
    during its step 2: the last completed step is saved, one line, no traceback. The next requeue finishes: every step logged exactly once."""
    from mssr_megatron.data.synthetic import generate_dataset
    from trainer_assets import build_assets

    assets = build_assets(str(tmp_path / "assets"))
    assets["train"], _ = generate_dataset(str(tmp_path / "big"), 96, 4, seed=1)  # 12 chunks of 8 prompts
    run = tmp_path / "run"
    extra = ("trainer.total_steps=3", "data.reward_workers=1")

    first = _Run(assets, run, *extra)
    first.wait_for("tracker initialisation:", timeout_s=300)
    signalled = time.time()
    first.proc.send_signal(signal.SIGTERM)
    out = first.finish(timeout_s=120)
    stop_s = time.time() - signalled
    assert "tracker initialisation stopped after" in out and "tracker initialised" not in out
    assert "checkpoint saved" not in out and "Traceback" not in out
    assert "stopped by SIGTERM at step 0: nothing trained yet, no checkpoint" in out
    assert _logged_steps(run) == [] and json.loads((run / "PREEMPTED").read_text())["step"] == 0
    assert stop_s < 30, stop_s

    second = _Run(assets, run, *extra, "checkpoint.resume=auto")
    _wait_logged(run, 1, second)
    os.killpg(second.proc.pid, signal.SIGINT)  # Ctrl-C: the trainer and its reward worker
    out = second.finish(timeout_s=300)
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    stopped = [line for line in out.splitlines() if line.startswith("stopped by SIGINT")]
    assert len(stopped) == 1 and "checkpoint saved" in stopped[0], out[-3000:]
    cut = json.loads((run / "PREEMPTED").read_text())["step"]
    assert cut in (1, 2) and os.path.exists(run / "checkpoints" / f"step_{cut:06d}" / "COMPLETE")

    third = _Run(assets, run, *extra, "checkpoint.resume=auto")
    third.finish(timeout_s=600)
    assert _logged_steps(run) == [0, 1, 2, 3]
    assert not os.path.exists(run / "PREEMPTED")


def _wait_logged(run_dir, step: int, run: _Run, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and run.proc.poll() is None:
        if step in _logged_steps(run_dir):
            return
        time.sleep(0.1)
    run.kill()
    raise AssertionError(f"step {step} not logged within {timeout_s} s:\n{''.join(run.lines)[-3000:]}")
