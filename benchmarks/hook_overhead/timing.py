"""Interleaved timing on two clocks: wall time and the stepping thread's CPU time.

Wall time on a shared machine includes every moment another process held the
core; ``time.thread_time()`` counts only the time this thread ran. On CPU the
autograd engine runs backward, and every hook, on the calling thread, so with
one intra-op thread (``--threads 1``, the default on CPU) thread time covers the
whole step; torch's intra-op worker threads, and CUDA's device thread, are not
counted in it.
"""
from __future__ import annotations

import copy
import gc
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .models import Workload
from .variants import make_variant

CLOCKS = ("wall", "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Stamp:
    """Both clocks, read together."""

    wall_ns: int
    cpu_ns: int

    @classmethod
    def now(cls) -> "Stamp":
        return cls(time.perf_counter_ns(), time.thread_time_ns())

    def since(self, start: "Stamp") -> Dict[str, int]:
        return {"wall": self.wall_ns - start.wall_ns, "cpu": self.cpu_ns - start.cpu_ns}


class Runner:
    """One variant on its own copy of the workload's model."""

    def __init__(self, variant: str, workload: Workload, device: torch.device):
        self.name = variant
        self.workload = workload
        self.device = device
        self.model = copy.deepcopy(workload.model)
        self.variant = make_variant(variant, self.model, workload)
        self.steps = 0
        # Set while another variant's TorchFunctionMode is active: this runner's
        # steps then run with torch-function handling off, as if no mode were open.
        self.hide_modes = False

    def step(self) -> Tuple[Dict[str, int], Dict[str, int]]:
        """One forward+backward; returns ({clock: forward ns}, {clock: whole step ns})."""
        if self.hide_modes:
            with torch._C.DisableTorchFunction():
                return self._step()
        return self._step()

    def _step(self):
        v = self.variant
        self.model.zero_grad(set_to_none=True)
        synchronize(self.device)
        start = Stamp.now()
        with v.pass_(self.steps):
            loss = v.loss()
            synchronize(self.device)
            forward_done = Stamp.now()
            grads = v.take_grads(loss)
        v.after(self.steps, grads)
        synchronize(self.device)
        done = Stamp.now()
        del grads, loss
        self.model.zero_grad(set_to_none=True)  # untimed: keeps idle copies from holding gradients
        self.steps += 1
        return forward_done.since(start), done.since(start)

    def close(self) -> None:
        self.variant.close()


@dataclass
class Samples:
    """Timed steps of one variant in one group of interleaved rounds, per clock."""

    fwd_ns: Dict[str, List[int]] = field(default_factory=lambda: {c: [] for c in CLOCKS})
    step_ns: Dict[str, List[int]] = field(default_factory=lambda: {c: [] for c in CLOCKS})
    # round -> {clock: that round's step times}: the pairing for paired ratios
    round_ns: Dict[int, Dict[str, List[int]]] = field(default_factory=dict)

    def add(self, rnd: int, fwd: Dict[str, int], step: Dict[str, int]) -> None:
        per_round = self.round_ns.setdefault(rnd, {c: [] for c in CLOCKS})
        for c in CLOCKS:
            self.fwd_ns[c].append(fwd[c])
            self.step_ns[c].append(step[c])
            per_round[c].append(step[c])

    def __len__(self) -> int:
        return len(self.step_ns["wall"])


def time_group(runners: List[Runner], rounds: int, warmup: int, inner: int, rng: random.Random,
               errors: Dict[str, str], log: Optional[Callable[[str], None]] = None) -> Dict[str, Samples]:
    """Interleaved timing: every round runs every live runner ``inner`` times, in a fresh random order."""
    live = list(runners)
    samples = {run.name: Samples() for run in runners}
    started = time.perf_counter()
    for rnd in range(warmup + rounds):
        if log is not None and rnd:
            log(f"    round {rnd}/{warmup + rounds} ({time.perf_counter() - started:.0f} s)")
        order = list(live)
        rng.shuffle(order)
        for run in order:
            try:
                for _ in range(inner):
                    fwd, step = run.step()
                    if rnd >= warmup:
                        samples[run.name].add(rnd, fwd, step)
            except Exception as exc:  # noqa: BLE001 - reported as the variant's row; the rest go on
                errors[run.name] = f"step {run.steps}: {type(exc).__name__}: {exc}"
                live.remove(run)
        gc.collect()  # between rounds, so no variant's step pays for another's garbage
    return samples


def time_enter_exit(enter_exit: Callable[[], None], repeats: int) -> Dict[str, List[int]]:
    """Times ``enter_exit`` (entering and leaving a watch, no step) on both clocks, after one warm-up."""
    enter_exit()  # first use may import or cache things
    got: Dict[str, List[int]] = {c: [] for c in CLOCKS}
    for _ in range(repeats):
        start = Stamp.now()
        enter_exit()
        for c, ns in Stamp.now().since(start).items():
            got[c].append(ns)
    return got


# ------------------------------------------------------------------- statistics


def quartiles(values: List[float]) -> Tuple[float, float]:
    """First and third quartile (inclusive method: defined for two values, within their range)."""
    if len(values) == 1:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def paired_ratios(run: Samples, base: Samples, clock: str) -> List[float]:
    """Per round: (variant's mean step) / (baseline's mean step) in that same round.

    Both ran back to back in the round, so load that comes and goes over
    seconds or minutes cancels; a ratio of medians does not have that protection.
    """
    return [statistics.fmean(run.round_ns[r][clock]) / statistics.fmean(base.round_ns[r][clock])
            for r in run.round_ns if r in base.round_ns]
