"""Peak memory above a baseline: resident set of a process (CPU) or the CUDA allocator's peak (GPU).

On Linux the kernel's high-water mark (VmHWM) is reset through /proc/PID/clear_refs, so the peak is the
process's own maximum after the baseline, not one reached earlier while loading the model.
"""
from __future__ import annotations

import gc
import resource
from pathlib import Path

import torch

from analysis.memory import release_free_memory


def _status_mb(pid: "int | str", field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_high_water_mark(pid: "int | str") -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """Peak extra memory (MiB) of a process from `start()` to `peak_extra_mb()`.

    With `pid` (another process) or on CPU it reads resident memory; on CUDA, torch.cuda.max_memory_allocated.
    """

    def __init__(self, device: str = "cpu", pid: "int | str" = "self"):
        self.device, self.pid = device, pid
        self.base_mb = 0.0
        self.exact = True

    def start(self) -> None:
        if self.pid == "self":
            gc.collect()
            release_free_memory()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_mb = torch.cuda.memory_allocated() / 2**20
            return
        self.exact = _reset_high_water_mark(self.pid)
        # Without a resettable high-water mark (not Linux), the peak so far is the baseline: a lower bound.
        self.base_mb = _status_mb(self.pid, "VmRSS") if self.exact else self._max_rss_mb()

    def peak_extra_mb(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.base_mb
        peak = _status_mb(self.pid, "VmHWM") if self.exact else self._max_rss_mb()
        return peak - self.base_mb

    def _max_rss_mb(self) -> float:
        if self.pid != "self":
            raise RuntimeError("the peak of another process needs /proc/PID/clear_refs")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
