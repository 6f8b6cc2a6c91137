"""Peak memory while some code runs: the one meter of the demo, the benchmarks and the peers they run.

    with PeakMemory(device) as peak:
        minquant.quantize(model, ...)
    print(peak.bytes)

On a GPU, the CUDA allocator's peak. On Linux, the process's peak resident memory (VmHWM), reset
to the current RSS on entry: what the OS saw, so memory the allocator already held and reuses
counts once. Where the reset is refused, `bytes` stays None: the process's lifetime peak would be a
wrong answer, not a rough one. `reset=False` asks for the lifetime peak on purpose (a peer tool run
in its own process, where that is the figure to report).

Not `resource.getrusage(...).ru_maxrss`: on Linux that survives exec, so a program started by the
bench would report the bench's own peak if it was higher. VmHWM belongs to one program alone.
"""
from __future__ import annotations

import torch


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.bytes`: the peak while inside (None where unmeasurable)."""

    def __init__(self, device=None, reset: bool = True):
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.bytes = None
        self._reset = reset
        self._measurable = not reset

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._measurable = True
        elif self._reset:
            try:  # "5" resets the peak RSS (VmHWM) to the current RSS: Linux only
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self._measurable = True
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if not self._measurable:
            return
        if self.cuda:
            self.bytes = torch.cuda.max_memory_allocated()
            return
        try:
            with open("/proc/self/status") as f:
                self.bytes = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            self.bytes = None
