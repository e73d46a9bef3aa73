"""Peak memory of one steady-state step per variant, measured after all timing.

The allocator settings used here (glibc told to hand freed memory back) slow
allocation down, which is why no timed step ever runs under them.
"""
from __future__ import annotations

import ctypes
import gc
from typing import Callable, Dict, List, Tuple

import torch

from .models import Workload
from .timing import Runner


class MemoryProbe:
    """Peak memory of one step, above what was in use just before it.

    CUDA: the caching allocator's own counters. CPU: Linux peak RSS (VmHWM),
    reset through /proc/self/clear_refs; glibc malloc is told to hand freed
    memory back (mmap threshold 64 KiB, trim after every step), so RSS follows
    what is live instead of what malloc cached. That setting slows allocation,
    which is why memory is measured only after all timing is done.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = None
        self.why_not = None
        if device.type == "cuda":
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also stops its dynamic growth)
            self.libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        except OSError as exc:
            self.why_not = f"peak RSS cannot be reset here ({exc})"

    def restore(self) -> None:
        """Leave malloc close to where its dynamic thresholds settle for a tensor-heavy process.

        (mallopt turned the dynamic adjustment off for good; 32 MiB is glibc's ceiling for it.)
        """
        if self.libc is not None:
            self.libc.mallopt(-3, 32 * 2**20)
            self.libc.mallopt(-1, 64 * 2**20)

    @property
    def available(self) -> bool:
        return self.device.type == "cuda" or self.libc is not None

    def _settle(self):
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)

    def measure(self, fn: Callable[[], object]) -> Tuple[float, float]:
        """Runs fn once; returns (peak MiB above the start, MiB still held after)."""
        self._settle()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self._settle()
            end = torch.cuda.memory_allocated(self.device)
        else:
            start = proc_status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            fn()
            peak = proc_status_kib("VmHWM") * 1024
            self._settle()
            end = proc_status_kib("VmRSS") * 1024
        return (peak - start) / 2**20, (end - start) / 2**20


def proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure_memory(wl: Workload, variants: List[str], probe: MemoryProbe,
                   errors: Dict[str, str]) -> Dict[str, Tuple[float, float]]:
    """Per variant: a warm-up step, then one measured step (steady state)."""
    out = {}
    for name in variants:
        if name in errors:
            continue
        run = None
        try:
            run = Runner(name, wl, probe.device)
            run.step()
            out[name] = probe.measure(run.step)
        except Exception as exc:  # noqa: BLE001
            errors.setdefault(name, f"memory step: {type(exc).__name__}: {exc}")
        finally:
            if run is not None:
                run.close()
            del run
    return out

