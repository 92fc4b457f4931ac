"""Batch reward grading in worker processes, with a per-answer time limit.

sympy can hang on pathological answers (math-verify never returns on `\\boxed{9^{9^{9^{9^{9}}}}}` vs 5), and
math-verify's own timeout needs signal.alarm on the main thread. So every answer is graded in a worker
process with a wall-clock limit; an answer that overruns gets 0 and a "timeout" failure, the pool is torn
down (worker processes terminated: a running call cannot be cancelled any other way) and the answers still
pending go to a fresh pool. An answer whose grading raises gets 0 and an "<ExcType>: msg" failure. The format
check (`format_reward`, when format_weight > 0) runs in the same worker call, under the same limit: no function of
a response runs in the trainer process.

Workers die with the trainer, also when it is killed with SIGKILL (nothing in the pool would stop them: each holds
both ends of its task queue): a watchdog thread in each worker exits it within `_PARENT_POLL_S` once its parent
process is gone, and on Linux the kernel kills it at once (PR_SET_PDEATHSIG) when the thread that started it ends,
which is only asked for when that thread is the main one (a worker started from a short-lived thread would die
with that thread). The multiprocessing resource tracker then sees its last writer gone and exits too.

Start method: "spawn". The trainer process holds CUDA contexts and many threads, which makes "fork" unsafe;
"forkserver" would save little (workers are long-lived), is a process-wide singleton whose sys.path is
frozen when it starts, and is not available everywhere. Spawned workers import the parent's `__main__`
module (as `__mp_main__`), so the trainer's entry point must keep its work under `if __name__ == "__main__"`.
"""

from __future__ import annotations

import atexit
import ctypes
import math
import multiprocessing as mp
import multiprocessing.util
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from mssr_megatron.rewards.functions import REWARDS, RewardFn, format_reward, math_reward

__all__ = ["BatchScores", "RewardGrader", "score_batch", "close_shared_graders"]


@dataclass
class BatchScores:
    """Per-sample rewards of one batch.

    scores:   (1 - format_weight) * correct + format_weight * format, in [0, 1].
    correct:  the reward function's score (0 for failures).
    format:   `format_reward` of each response (0 for failures), graded with the answer under its time limit; empty
              at format_weight 0, where it is not computed (and reward/format_rate is not logged).
    failures: (index, reason) for answers that timed out ("timeout after 5.0s") or raised ("ValueError: ...").
    """

    scores: list[float]
    correct: list[float]
    format: list[float]
    failures: list[tuple[int, str]] = field(default_factory=list)

    def as_metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Scalar metrics for logging: mean score, accuracy, format rate, timeout and error counts."""
        n = len(self.scores)
        timeouts = sum(1 for _, reason in self.failures if reason.startswith("timeout"))
        metrics = {
            f"{prefix}score_mean": sum(self.scores) / n if n else 0.0,
            f"{prefix}accuracy": sum(self.correct) / n if n else 0.0,
            f"{prefix}timeouts": float(timeouts),
            f"{prefix}errors": float(len(self.failures) - timeouts),
            f"{prefix}count": float(n),
        }
        if self.format:
            metrics[f"{prefix}format_rate"] = sum(self.format) / n
        return metrics


Graded = tuple[float, float, str | None]  # (reward score, format score, failure reason or None)


def _grade_one(fn: RewardFn, response: str, answer: str, with_format: bool = False) -> Graded:
    """Run one reward call, and the format check when asked; never raises. Returns (score in [0, 1], format score,
    None), or (0.0, 0.0, failure reason) when either raises, or (0.0, format score, reason) for a score out of range.
    Without `with_format` the format score is 0.0."""
    try:
        score = float(fn(response, answer))
        fmt = (score if fn is format_reward else format_reward(response)) if with_format else 0.0
    except Exception as e:  # noqa: BLE001 - any grading error is a per-sample failure, not a batch failure
        return 0.0, 0.0, f"{type(e).__name__}: {e}"
    if not math.isfinite(score) or not 0.0 <= score <= 1.0:
        return 0.0, fmt, f"ValueError: reward {score!r} outside [0, 1]"
    return score, fmt, None


_PARENT_POLL_S = 0.2  # a worker outlives a killed trainer by at most about this long
_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def _die_with_parent(parent_pid: int, kernel_signal: bool) -> None:
    """Exit this worker when the process `parent_pid` that started it is gone (see the module docstring)."""
    if kernel_signal and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # no prctl in this libc: the watchdog below still works
            pass

    def watch() -> None:
        # An orphan is re-parented (to init or a subreaper), so its parent pid changes; this also catches a parent
        # that died before the watch started.
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-trainer", daemon=True).start()


def _init_worker(parent_pid: int, kernel_signal: bool) -> None:
    """Pool initializer: exit with the parent (`_die_with_parent`), and pay math-verify's import and first-call cost
    (~1 s) once per worker, not per task. SIGUSR1 is ignored: a preemption notice that SLURM sends to every process of
    a job step is for the trainer, which asks its workers to stop itself (the default action would kill the worker
    mid-batch). SIGINT too: Ctrl-C reaches the whole process group, and the trainer finishes its step (a
    KeyboardInterrupt would break the pool)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid, kernel_signal)
    math_reward("\\boxed{\\frac{1}{2}}", "0.5")


def _ping() -> bool:
    return True


class RewardGrader:
    """Long-lived grader: one reward function, a warm process pool, a per-answer time limit.

    reward: a registered name ("math", "choice", "format", ...) or a picklable top-level function.
    num_workers: worker processes; 0 grades inline in the calling process, catching exceptions but with NO
        time limit (a hanging answer hangs the caller; meant for debugging and tests). The format check is
        linear-time in the response (`rewards.extract`), so inline it is bounded by the response length: ~1 s
        per megabyte at worst, and rollouts are capped by the maximum response length.
    timeout_s: wall-clock limit per answer, measured from submission. At most `num_workers` answers are in
        flight and the pool is warmed before use, so submission time is start time.
    Use as a context manager or call `close()`; the pool starts on first use (or `start()`).
    """

    def __init__(self, reward: str | RewardFn = "math", *, num_workers: int = 2, timeout_s: float = 5.0,
                 startup_timeout_s: float = 120.0):
        self.fn: RewardFn = REWARDS.get(reward) if isinstance(reward, str) else reward
        if num_workers < 0 or timeout_s <= 0:
            raise ValueError(f"need num_workers >= 0 and timeout_s > 0, got {num_workers}, {timeout_s}")
        if num_workers > 0:
            try:  # fail here, not inside the pool, if the function cannot reach the workers
                pickle.dumps(self.fn)
            except Exception as e:
                raise TypeError(f"reward function {self.fn!r} is not picklable; use a top-level function") from e
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = startup_timeout_s
        self.pool_restarts = 0  # pools torn down after a timeout or crash (useful to log)
        self._pool: ProcessPoolExecutor | None = None

    # -- pool lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start and warm the worker pool now (otherwise it starts on the first batch). No-op inline."""
        if self.num_workers == 0 or self._pool is not None:
            return
        # Workers are spawned on demand by the submitting thread (this one: a pool that loses a worker is replaced
        # whole, see _grade_in_pool), one per submit that finds no idle worker, so num_workers concurrent pings
        # start all of them; waiting for the pings means every initializer (warm-up) has run.
        main_thread = threading.current_thread() is threading.main_thread()
        pool = ProcessPoolExecutor(self.num_workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                   initargs=(os.getpid(), main_thread))
        pings = [pool.submit(_ping) for _ in range(self.num_workers)]
        done, not_done = wait(pings, timeout=self.startup_timeout_s)
        self._pool = pool
        errors = [f.exception() for f in done if f.exception() is not None]
        if not_done or errors:
            self._teardown()
            why = f"{type(errors[0]).__name__}: {errors[0]}" if errors else f"not up after {self.startup_timeout_s}s"
            raise RuntimeError(f"reward worker pool failed to start ({why}); the workers' stderr has details "
                               "(an unguarded __main__ module or an import error?)")

    def _teardown(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # Private attribute, but the public API has no way to stop a call that is already running.
        procs = list((pool._processes or {}).values())  # type: ignore[attr-defined]
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def close(self) -> None:
        """Stop the worker processes. The grader restarts a pool if used again."""
        self._teardown()

    def __enter__(self) -> RewardGrader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._teardown()
        except Exception:
            pass

    # -- grading -----------------------------------------------------------------------------------------
    def grade(self, responses: list[str], answers: list[str]) -> tuple[list[float], list[tuple[int, str]]]:
        """Reward-function scores of each (response, answer) pair and the sorted (index, reason) failures."""
        results = self._grade(responses, answers, with_format=False)
        return [s for s, _, _ in results], [(i, why) for i, (_, _, why) in enumerate(results) if why is not None]

    def _grade(self, responses: list[str], answers: list[str], with_format: bool) -> list[Graded]:
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        if self.num_workers == 0:
            return [_grade_one(self.fn, r, a, with_format) for r, a in zip(responses, answers)]
        return self._grade_in_pool(responses, answers, with_format)

    def _grade_in_pool(self, responses: list[str], answers: list[str], with_format: bool) -> list[Graded]:
        results: list[Graded | None] = [None] * len(responses)
        pending = deque(range(len(responses)))
        crashed: set[int] = set()  # in flight when a worker died: retried once, alone, to find the culprit
        inflight: dict[Future, tuple[int, float]] = {}
        while pending or inflight:
            self.start()
            assert self._pool is not None
            while pending and len(inflight) < self.num_workers:
                if any(j in crashed for j, _ in inflight.values()) or (pending[0] in crashed and inflight):
                    break  # a suspect runs alone
                i = pending.popleft()
                fut = self._pool.submit(_grade_one, self.fn, responses[i], answers[i], with_format)
                inflight[fut] = (i, time.monotonic() + self.timeout_s)
            next_deadline = min(deadline for _, deadline in inflight.values())
            done, _ = wait(inflight, timeout=max(0.0, next_deadline - time.monotonic()), return_when=FIRST_COMPLETED)

            broken = None
            for fut in done:
                try:
                    results[inflight[fut][0]] = fut.result()
                    del inflight[fut]
                except BrokenProcessPool as e:
                    broken = e  # handled below, together with the other answers that were in flight
                except Exception as e:  # e.g. the result could not be pickled back
                    results[inflight.pop(fut)[0]] = (0.0, 0.0, f"{type(e).__name__}: {e}")

            now = time.monotonic()
            expired = [fut for fut, (_, deadline) in inflight.items() if deadline <= now and not fut.done()]
            for fut in expired:
                results[inflight.pop(fut)[0]] = (0.0, 0.0, f"timeout after {self.timeout_s}s")
            if expired or broken is not None:
                for fut, (i, _) in inflight.items():
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        results[i] = fut.result()
                    elif broken is None:
                        # Interrupted by another answer's timeout: not its fault, re-queue as is.
                        pending.appendleft(i)
                    elif i in crashed:
                        # It ran alone (see above) and the worker died again: this answer kills workers.
                        results[i] = (0.0, 0.0, f"BrokenProcessPool: worker died grading this answer ({broken})")
                    else:
                        # A worker died and we cannot tell whose answer did it: retry each suspect alone.
                        crashed.add(i)
                        pending.appendleft(i)
                inflight.clear()
                self._teardown()
                self.pool_restarts += 1
        return [r if r is not None else (0.0, 0.0, "internal error: not graded") for r in results]

    def score(self, responses: list[str], answers: list[str], format_weight: float = 0.0) -> BatchScores:
        """Grade a batch and combine with the format reward: score = (1 - w) * correct + w * format. The format check
        runs with the reward function, under the same time limit, and only when w > 0."""
        if not 0.0 <= format_weight <= 1.0:
            raise ValueError(f"format_weight must be in [0, 1], got {format_weight}")
        with_format = format_weight > 0.0
        results = self._grade(responses, answers, with_format)
        correct = [c for c, _, _ in results]
        fmt = [f for _, f, _ in results] if with_format else []
        scores = [(1.0 - format_weight) * c + format_weight * f for c, f, _ in results]
        failures = [(i, why) for i, (_, _, why) in enumerate(results) if why is not None]
        return BatchScores(scores=scores, correct=correct, format=fmt, failures=failures)


# score_batch keeps one grader per configuration alive, so a trainer calling it every step does not pay
# worker start-up (~1-2 s) each time. They are closed at interpreter exit or by close_shared_graders().
_SHARED: dict[tuple[object, int, float], RewardGrader] = {}


def close_shared_graders() -> None:
    """Close the pools that `score_batch` keeps alive."""
    while _SHARED:
        _SHARED.popitem()[1].close()


atexit.register(close_shared_graders)
# A multiprocessing child (a rank started by mp.spawn) exits without running atexit handlers: its exit joins every
# child process first, and the pools' idle workers would never end. Finalizers with a priority run before that join.
mp.util.Finalize(None, close_shared_graders, exitpriority=100)


def score_batch(responses: list[str], answers: list[str], reward: str | RewardFn = "math",
                format_weight: float = 0.0, num_workers: int = 2, timeout_s: float = 5.0) -> BatchScores:
    """Score a batch with a cached `RewardGrader(reward, num_workers, timeout_s)`; see `RewardGrader.score`.

    Returns BatchScores (scores, correct, format, failures; `.as_metrics()` for logging).
    """
    key = (reward, num_workers, float(timeout_s))
    grader = _SHARED.get(key)
    if grader is None:
        grader = _SHARED[key] = RewardGrader(reward, num_workers=num_workers, timeout_s=timeout_s)
    return grader.score(responses, answers, format_weight=format_weight)
