"""GPU time of a callable, from CUDA graphs: the one timer for kernels, autotuning and decode steps.

At batch 1 a kernel runs for microseconds, about as long as Python takes to launch it, so a timer
around eager calls measures the launch. Captured into a CUDA graph, `calls` back-to-back calls
replay with no Python in between, and CUDA events around a replay time the GPU alone.
"""
from __future__ import annotations

import torch


def graph_time_ms(fn, calls: int = 20, replays: int = 5, warmup: int = 1) -> float:
    """GPU milliseconds per call of fn: the median of `replays` replays of a graph of `calls` calls.

    fn runs `warmup` times first, on a side stream (as torch's CUDA-graph notes ask), so compiling,
    autotuning and lazy allocations happen outside the capture. fn must be capturable (no CPU sync)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def fastest(candidates: dict, what: str):
    """The key of the fastest callable in `candidates`, each timed once with graph_time_ms.

    For autotuning: a candidate that raises (a configuration this GPU cannot compile or run: registers,
    shared memory) is skipped; if none runs, RuntimeError naming `what`, from the last failure."""
    times, error = {}, None
    for key, fn in candidates.items():
        try:
            times[key] = graph_time_ms(fn)
        except Exception as e:
            error = e
    if not times:
        raise RuntimeError(f"no {what} ran") from error
    return min(times, key=times.get)
