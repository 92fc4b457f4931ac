"""Genuine CPU memory measurements for the bounds the project promises (log-prob op, weight export).

`peak_allocated_bytes(fn)` replays the allocation/free events that `torch.profiler` records with
profile_memory=True and returns the highest net number of bytes the CPU allocator held above the level at the start.
`timings(fn, repeats, warmup)` is the wall-clock loop the benchmarks share (report medians, never assert on them).
"""

from __future__ import annotations

import time

from torch.profiler import ProfilerActivity, profile


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def peak_allocated_bytes(fn):
    """(peak net CPU bytes allocated while fn() runs, fn's result), from the profiler's allocation events.

    Relies on `prof.profiler.kineto_results.experimental_event_tree()` (a semi-private API present in torch 2.x):
    each allocation/free is a node tagged `_EventType.Allocation` with a signed `alloc_size`.
    """
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted(
        (node.start_time_ns, node.extra_fields.alloc_size)
        for node in _walk(prof.profiler.kineto_results.experimental_event_tree())
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu"
    )
    running = peak = 0
    for _, size in events:
        running += size
        peak = max(peak, running)
    return peak, result


def timings(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of `repeats` calls of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out
