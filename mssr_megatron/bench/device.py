"""What the device can do: datasheet peaks of known GPUs, a measured matmul peak elsewhere, MFU, memory, versions.

Datasheet peaks are DENSE tensor-core numbers in TFLOP/s (NVIDIA quotes the bf16/fp8 figures "with sparsity", which
are twice these). Which one applies is chosen from `torch.cuda.get_device_name()` and the run's numerics: model.fp8
set -> fp8, bf16/fp16 parameters -> bf16, float32 -> tf32 when torch allows TF32 matmuls, else plain fp32. On a CPU
(or an unknown GPU) the peak is MEASURED: the best of several timed square matmuls in the run's dtype with the
thread count the benchmark uses, and labelled as measured.
"""

from __future__ import annotations

import os
import platform
import resource
import time

import torch

TFLOPS = 1e12

#: (name substrings that must all occur, label, {precision: dense TFLOP/s}); first match wins, so more specific
#: names come first. Sources: NVIDIA H100 / H200 / A100 datasheets (sparsity figures halved).
GPU_PEAKS: tuple[tuple[tuple[str, ...], str, dict[str, float]], ...] = (
    (("H100", "PCIE"), "H100 PCIe", {"fp8": 1513.0, "bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (("H100", "NVL"), "H100 NVL", {"fp8": 1670.5, "bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (("H100",), "H100 SXM", {"fp8": 1978.9, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (("H200",), "H200 SXM", {"fp8": 1978.9, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (("A100",), "A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


def precision_of(params_dtype: str, fp8: str | None, allow_tf32: bool = False) -> str:
    """The peak column that applies to a run: fp8, bf16 (also fp16: the same tensor-core rate), tf32 or fp32."""
    if fp8:
        return "fp8"
    if params_dtype in ("bfloat16", "float16"):
        return "bf16"
    return "tf32" if allow_tf32 else "fp32"


def datasheet_peak(device_name: str, precision: str) -> tuple[float, str] | None:
    """(peak FLOP/s, label) of a known GPU at `precision`, or None (unknown GPU or precision)."""
    upper = device_name.upper()
    for needles, label, peaks in GPU_PEAKS:
        if all(n in upper for n in needles) and precision in peaks:
            return peaks[precision] * TFLOPS, f"{label} {precision} dense (datasheet)"
    return None


def measure_matmul_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", n: int = 2048,
                        repeats: int = 5) -> dict:
    """Measured matmul rate: best and median FLOP/s of `repeats` timed [n, n] x [n, n] products (one untimed first).
    FLOPs per product: 2 * n^3."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.matmul(a, b)
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        seconds.append(time.perf_counter() - start)
    flops = 2.0 * n ** 3
    seconds.sort()
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats, "seconds": seconds,
            "best_flops_per_s": flops / seconds[0], "median_flops_per_s": flops / seconds[len(seconds) // 2],
            "threads": torch.get_num_threads()}


def device_peak(device: torch.device, params_dtype: str, fp8: str | None, world_size: int = 1,
                measure_repeats: int = 5, matmul_n: int = 2048) -> dict:
    """Peak FLOP/s of the whole job (per-device peak x world_size) with its provenance ("datasheet" or
    "measured"). CPU ranks: each rank's measured peak is assumed equal (they share the machine's cores)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        precision = precision_of(params_dtype, fp8, torch.backends.cuda.matmul.allow_tf32)
        found = datasheet_peak(name, precision)
        if found is not None:
            per_device, label = found
            return {"flops_per_s": per_device * world_size, "per_device_flops_per_s": per_device, "label": label,
                    "source": "datasheet", "precision": precision, "device_name": name}
    else:
        name, precision = cpu_name(), params_dtype
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(params_dtype, torch.float32)
    m = measure_matmul_peak(dtype, device, n=matmul_n, repeats=measure_repeats)
    label = f"measured {m['dtype']} matmul n={m['n']}, {m['threads']} threads, best of {m['repeats']}"
    if world_size > 1:
        label += f", x{world_size} ranks"
    return {"flops_per_s": m["best_flops_per_s"] * world_size, "per_device_flops_per_s": m["best_flops_per_s"],
            "label": label, "source": "measured", "precision": precision, "device_name": name, "matmul": m}


def mfu(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: (flops / seconds) / peak (a fraction; nan when undefined)."""
    if seconds <= 0 or peak_flops_per_s <= 0:
        return float("nan")
    return flops / seconds / peak_flops_per_s


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def max_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if platform.system() == "Darwin" else rss * 1024)


def environment(device: torch.device) -> dict:
    """Device, library versions and threads, for the JSON record."""
    import transformers

    try:
        import megatron.core as mcore

        megatron_version = getattr(mcore, "__version__", "unknown")
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        megatron_version = None
    info = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "megatron_core": megatron_version, "python": platform.python_version(), "platform": platform.platform(),
            "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    gpu_memory_bytes=torch.cuda.get_device_properties(device).total_memory)
    return info
