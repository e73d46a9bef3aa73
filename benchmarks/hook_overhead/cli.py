"""The command line: ``python -m benchmarks.hook_overhead`` or ``python benchmarks/hook_overhead.py``."""
from __future__ import annotations

import argparse
import gc
from typing import List, Optional, Sequence

import torch

from .models import SHAPES, WORKLOADS
from .suite import run
from .variants import NAMES

DESCRIPTION = "How much does watching gradients cost? Forward+backward steps, interleaved, on two clocks."


def pick(parser: argparse.ArgumentParser, text: str, allowed: Sequence[str], what: str) -> List[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in chosen if t not in allowed]
    if bad:
        parser.error(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return [a for a in allowed if a in chosen]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hook_overhead", description=DESCRIPTION)
    p.add_argument("--quick", action="store_true", help="small shapes, under a minute on 2 idle CPU cores")
    p.add_argument("--size", choices=sorted(SHAPES), default=None,
                   help="shape set (default full; --quick means quick; tiny is for tests)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of " + ", ".join(WORKLOADS))
    p.add_argument("--variants", default=",".join(NAMES),
                   help="comma list of " + ", ".join(NAMES) + " (baseline is always added)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds after warm-up")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; default 1 on CPU, so that the stepping thread's CPU time "
                        "covers the whole step; 0 keeps torch's default")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-round shuffles")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-enter-exit", action="store_true", help="skip timing watch() enter+exit")
    p.add_argument("--json", metavar="PATH", help="write machine info, every row and the goals as JSON")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.size = args.size or ("quick" if args.quick else "full")
    shapes = SHAPES[args.size]
    args.rounds = shapes["rounds"] if args.rounds is None else args.rounds
    args.warmup = shapes["warmup"] if args.warmup is None else args.warmup
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    args.workloads = pick(p, args.workloads, WORKLOADS, "workload")
    args.variants = pick(p, args.variants, NAMES, "variant")
    if "baseline" not in args.variants:
        args.variants.insert(0, "baseline")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads is None:
        args.threads = 1 if args.device.type == "cpu" else 0
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the benchmark, prints the report, returns the result (also called in-process by the tests)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Everything alive now (torch, transformers, their modules) lives for the whole
    # run: frozen, the collector stops walking it, so the gc.collect() between
    # rounds takes microseconds instead of ~0.2 s, and no full collection of it
    # lands inside a timed step.
    gc.freeze()
    try:
        return run(args)
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
