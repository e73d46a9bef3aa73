"""What watching optimizer steps costs: ``opt.step()`` with and without an open watch.

    python benchmarks/optimizer_steps.py                  # the default shapes, about a minute
    python benchmarks/optimizer_steps.py --quick --json out.json

An open watch puts two global step hooks around every ``Optimizer.step``: the
pre-step hook finds the optimizer's watched parameters and samples 16 elements of
each stepped parameter and of its gradient (one ``torch.cat`` per device); the
post-step hook samples the weights again and reduces the comparison per parameter
with one ``index_add_`` (``watch(updates=False)`` skips both samples). This times
the optimizer step alone (the backward is outside the clock), for three variants
on their own model copies, in interleaved rounds: ``baseline`` (no watch),
``watch(updates=False)`` (step boundaries and ownership only) and ``watch``
(the default). It reports the median per step (CPU thread time and wall), the
ratio to the baseline of the same round, and the extra cost per parameter.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradtrace  # noqa: E402

SHAPES = {
    "quick": {"chain": (200, 4), "mlp": (8, 256)},
    "full": {"chain": (1000, 4), "mlp": (8, 1024)},
}
VARIANTS = ("baseline", "updates_off", "watch")


def chain(n: int, width: int) -> nn.Module:
    """n small Linear layers: 2n parameter tensors, the per-parameter cost shows."""
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n)])


def mlp(depth: int, width: int) -> nn.Module:
    """A few big layers: the per-element cost of sampling is what shows (it should not: 16 per tensor)."""
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


class Runner:
    def __init__(self, variant: str, model: nn.Module, width: int, optimizer: str):
        self.variant, self.model, self.width = variant, model, width
        params = list(model.parameters())
        self.opt = (torch.optim.AdamW(params, lr=1e-3) if optimizer == "adamw"
                    else torch.optim.SGD(params, lr=1e-3, momentum=0.9))
        self.stack = contextlib.ExitStack()
        if variant != "baseline":
            self.stack.enter_context(gradtrace.watch(model, cuts="off", updates=variant == "watch",
                                                     max_passes=8))
        self.x = torch.randn(4, width)
        self.thread: List[float] = []
        self.wall: List[float] = []

    def step(self, timed: bool) -> None:
        self.opt.zero_grad()
        self.model(self.x).sum().backward()
        t0, w0 = time.thread_time(), time.perf_counter()
        self.opt.step()
        t1, w1 = time.thread_time(), time.perf_counter()
        if timed:
            self.thread.append(t1 - t0)
            self.wall.append(w1 - w0)

    def close(self) -> None:
        self.stack.close()


def run(workload: str, shape, rounds: int, warmup: int, optimizer: str) -> Dict[str, Dict[str, float]]:
    build = chain if workload == "chain" else mlp
    runners = []
    for variant in VARIANTS:
        torch.manual_seed(0)
        runners.append(Runner(variant, build(*shape), shape[1], optimizer))
    n_params = sum(1 for _ in runners[0].model.parameters())
    try:
        for r in range(warmup + rounds):
            for runner in (runners if r % 2 == 0 else reversed(runners)):  # interleaved, order alternating
                runner.step(timed=r >= warmup)
    finally:
        for runner in runners:
            runner.close()
    base = runners[0]
    out = {}
    for runner in runners:
        ratios = [a / b for a, b in zip(runner.thread, base.thread, strict=False) if b > 0]
        extra = statistics.median(runner.thread) - statistics.median(base.thread)
        out[runner.variant] = {
            "step_thread_ms": 1e3 * statistics.median(runner.thread),
            "step_wall_ms": 1e3 * statistics.median(runner.wall),
            "ratio_thread": statistics.median(ratios) if ratios else float("nan"),
            "extra_us_per_param": 1e6 * extra / n_params,
            "params": n_params,
        }
    return out


def main(argv=None) -> Dict[str, Dict[str, Dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size = "quick" if args.quick else "full"
    rounds = args.rounds or (20 if args.quick else 60)
    results = {}
    for workload, shape in SHAPES[size].items():
        results[workload] = run(workload, shape, rounds, warmup=3, optimizer=args.optimizer)
        print(f"\n{workload} {shape} ({results[workload]['baseline']['params']} parameter tensors), "
              f"{args.optimizer}, {rounds} rounds")
        print(f"{'variant':<12} {'step thread ms':>15} {'step wall ms':>13} {'x baseline':>11} {'+us/param':>10}")
        for variant, row in results[workload].items():
            print(f"{variant:<12} {row['step_thread_ms']:>15.3f} {row['step_wall_ms']:>13.3f} "
                  f"{row['ratio_thread']:>11.2f} {row['extra_us_per_param']:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
