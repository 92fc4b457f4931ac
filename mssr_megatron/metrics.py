"""Per-step metrics of a training run: a JSONL file, TensorBoard scalars, a progress bar, a run summary, step timers.

    logger = MetricsLogger(run_dir, total_steps=150, enabled=(rank == 0))
    logger.resume(k)                  # after restoring a checkpoint of step k: drops logged steps > k
    timer = StepTimer()
    with timer("step"):
        with timer("rollout"): ...
    logger.log(step, {**metrics, **timer.pop()})
    logger.log_summary({"final_val_accuracy": 0.61})
    logger.close()

Steps count completed RL steps: the first training step logs step=1 (step 0 may carry the validation before training),
so after resuming from the checkpoint of step k the next line has step k + 1.

`<run_dir>/metrics.jsonl` holds one JSON object per `log` call, {"step": s, "time": unix seconds, **metrics}, written
and flushed line by line so that a killed run keeps every step it logged. Non-finite values (NaN, +-Inf) are written
as null and their keys listed under "nonfinite" (strict JSON has no NaN). `read_metrics` reads the file back and
ignores a last line cut short by a crash. TensorBoard event files go to `<run_dir>/tensorboard` when the
`tensorboard` package is installed (otherwise one warning, and the rest of the logging carries on).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "time", "nonfinite")

# Progress-bar postfix: (label, candidate keys in order of preference, format).
_POSTFIX = (
    ("reward", ("reward/mean", "reward/accuracy", "reward/score_mean"), "{:.3f}"),
    ("val_acc", ("val/accuracy",), "{:.3f}"),
    ("entropy", ("actor/entropy",), "{:.3f}"),
    ("rho", ("tracker/rho",), "{:.3f}"),
    ("s/step", ("time/step",), "{:.1f}"),
)

_tensorboard_warned = False


def _warn_tensorboard(reason: str) -> None:
    global _tensorboard_warned
    if not _tensorboard_warned:
        _tensorboard_warned = True
        warnings.warn(f"TensorBoard logging is off: {reason}. Metrics still go to {METRICS_FILE}.", RuntimeWarning,
                      stacklevel=3)


def _to_float(key: str, value) -> float:
    if hasattr(value, "item"):  # torch / numpy scalars
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} is not a number: {value!r}") from None


def json_safe(obj):
    """obj with non-finite floats turned into None and tensor / numpy scalars into Python numbers (for summaries)."""
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (TypeError, ValueError):
            pass
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def atomic_write_text(path: str, text: str) -> None:
    """Write path so that readers see either the old or the new content, never a partial file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _metrics_path(run_dir: str) -> str:
    return run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, METRICS_FILE)


def read_metrics(run_dir: str) -> list[dict]:
    """Every record of `<run_dir>/metrics.jsonl` (or of the JSONL file run_dir names), in file order.

    A last line cut short by a crash is ignored; an unreadable line elsewhere is skipped with a warning. Values that
    were non-finite read back as None (their keys are in the record's "nonfinite" list). Several records may share a
    step. A missing file raises FileNotFoundError.
    """
    path = _metrics_path(run_dir)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if i != last:
                warnings.warn(f"{path}:{i + 1}: skipping an unreadable line", RuntimeWarning, stacklevel=2)
            continue
        records.append(record)
    return records


class MetricsLogger:
    """Rank-0 metrics sink: JSONL file, TensorBoard scalars and a tqdm progress bar. enabled=False: every call no-ops.

    run_dir:      the run directory (created if missing).
    jsonl:        append one line per `log` call to <run_dir>/metrics.jsonl.
    tensorboard:  write scalars to <run_dir>/tensorboard (needs the `tensorboard` package; warns once if missing).
    progress_bar: a tqdm bar over total_steps with the step's key figures as postfix.
    total_steps:  length of the run in RL steps (for the bar); None = unknown.
    enabled:      False on every rank but 0.
    resume_step:  resume at once (see `resume`).

    An existing metrics.jsonl is appended to (after dropping a cut-short last line); pass resume_step or call
    `resume(k)` when continuing from the checkpoint of step k.
    """

    def __init__(self, run_dir: str, *, jsonl: bool = True, tensorboard: bool = True, progress_bar: bool = True,
                 total_steps: int | None = None, enabled: bool = True, resume_step: int | None = None,
                 desc: str = "train"):
        self.run_dir = run_dir
        self.enabled = enabled
        self.use_jsonl = jsonl
        self.use_tensorboard = tensorboard
        self.total_steps = total_steps
        self._file = None
        self._writer = None
        self._purge_step: int | None = None
        self._bar = None
        self._postfix: dict[str, str] = {}
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, METRICS_FILE)
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True, mininterval=0)
        if resume_step is not None:
            self.resume(resume_step)
        elif jsonl:
            self._drop_partial_last_line()
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole run

    # ----------------------------------------------------------------------------------------------------- resume
    def resume(self, step: int) -> None:
        """Continue a run from the checkpoint of `step`: drop logged records with step > `step` from metrics.jsonl
        (atomic rewrite), hide TensorBoard events after `step`, and move the progress bar to `step`."""
        if not self.enabled:
            return
        if self.use_jsonl:
            if self._file is not None:
                self._file.close()
                self._file = None
            if os.path.exists(self.path):
                kept = []
                with open(self.path, encoding="utf-8") as f:
                    for line in f:
                        try:
                            record = json.loads(line)
                        except ValueError:
                            continue  # a line cut short by the crash that preceded this resume
                        if isinstance(record, dict) and not (_is_number(record.get("step")) and record["step"] > step):
                            kept.append(line if line.endswith("\n") else line + "\n")
                atomic_write_text(self.path, "".join(kept))
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        if self.use_tensorboard:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._purge_step = step + 1  # the writer is (re)opened at the next log and hides events >= step + 1
        if self._bar is not None:
            self._bar.n = self._bar.last_print_n = step
            self._bar.refresh()

    def _drop_partial_last_line(self) -> None:
        """Cut a last line without its newline (a crash mid-write) so that the next line starts on a line of its own."""
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            f.truncate(f.read().rfind(b"\n") + 1)

    # -------------------------------------------------------------------------------------------------------- log
    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record one step's metrics (JSONL line, TensorBoard scalars, progress bar)."""
        if not self.enabled:
            return
        now = time.time()
        record: dict = {"step": int(step), "time": now}
        values: dict[str, float] = {}
        nonfinite = []
        for key, value in metrics.items():
            if key in _RESERVED:
                raise ValueError(f"metric name {key!r} is reserved")
            x = _to_float(key, value)
            if math.isfinite(x):
                values[key] = x
                record[key] = x
            else:
                record[key] = None
                nonfinite.append(key)
        if nonfinite:
            record["nonfinite"] = nonfinite
        if self.use_jsonl and self._file is not None:
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        if self.use_tensorboard:
            self._log_tensorboard(int(step), values, now)
        if self._bar is not None:
            self._update_bar(int(step), values)

    def _log_tensorboard(self, step: int, values: dict[str, float], walltime: float) -> None:
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.use_tensorboard = False
                _warn_tensorboard("the `tensorboard` package is not installed (pip install tensorboard)")
                return
            try:
                self._writer = SummaryWriter(os.path.join(self.run_dir, TENSORBOARD_DIR), purge_step=self._purge_step,
                                             flush_secs=10)
            except Exception as e:  # noqa: BLE001 - TensorBoard is optional; never stop training for it
                self.use_tensorboard = False
                _warn_tensorboard(f"cannot open the event writer ({type(e).__name__}: {e})")
                return
            self._purge_step = None
        try:
            for key, value in values.items():
                self._writer.add_scalar(key, value, global_step=step, walltime=walltime)
        except Exception as e:  # noqa: BLE001
            self.use_tensorboard = False
            _warn_tensorboard(f"writing scalars failed ({type(e).__name__}: {e})")

    def _update_bar(self, step: int, values: dict[str, float]) -> None:
        for label, keys, fmt in _POSTFIX:
            key = next((k for k in keys if k in values), None)
            if key is not None:  # a figure absent from this step (validation) keeps its last value
                self._postfix[label] = fmt.format(values[key])
        if self._postfix:
            self._bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in self._postfix.items()), refresh=False)
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        else:
            self._bar.refresh()

    # ---------------------------------------------------------------------------------------------------- summary
    def log_summary(self, summary: Mapping) -> None:
        """Write `<run_dir>/summary.json` atomically (replacing any previous summary); non-finite floats -> null."""
        if not self.enabled:
            return
        text = json.dumps(json_safe(dict(summary)), indent=2, sort_keys=True, allow_nan=False) + "\n"
        atomic_write_text(os.path.join(self.run_dir, SUMMARY_FILE), text)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class StepTimer:
    """Wall-clock seconds per phase of a step: `with timer("rollout"): ...`, then `timer.pop()` ->
    {"time/rollout": s, ...} (phases entered several times add up) and a reset.

    If "step" itself was not timed, pop() reports time/step as the seconds since the previous pop (or construction).
    cuda_sync=True synchronizes the current CUDA device on entering and leaving a phase, so that asynchronous
    kernels are charged to the phase that launched them.
    """

    def __init__(self, cuda_sync: bool = False):
        self._sync = None
        if cuda_sync:
            import torch

            if torch.cuda.is_available():
                self._sync = torch.cuda.synchronize
        self._totals: dict[str, float] = defaultdict(float)
        self._since = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self._sync is not None:
            self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self._totals[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        now = time.perf_counter()
        out = {f"time/{name}": seconds for name, seconds in self._totals.items()}
        out.setdefault("time/step", now - self._since)
        self._totals.clear()
        self._since = now
        return out
