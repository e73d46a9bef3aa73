"""One benchmark run: every workload, every variant, memory, enter+exit, goals."""
from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from typing import Dict, List, Optional, Tuple

from . import goals
from .memory import MemoryProbe, measure_memory
from .models import SHAPES, SkipWorkload, Workload, build_workload, trainable
from .report import enter_exit_row, load_average, machine_info, render_report, summarize, variant_order, write_json
from .timing import Runner, time_enter_exit, time_group
from .variants import BY_NAME, GRADTRACE_IMPORT_ERROR, gradtrace, runnable


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_runners(names: List[str], wl: Workload, args, errors: Dict[str, str]) -> List[Runner]:
    runners = []
    for name in names:
        try:
            runners.append(Runner(name, wl, args.device))
        except Exception as exc:  # noqa: BLE001 - reported as the variant's row
            errors[name] = f"setup: {type(exc).__name__}: {exc}"
    return runners


def time_own_rounds(name: str, base: Runner, head: dict, wl: Workload, args, rng, errors) -> List[dict]:
    """A variant with process-wide state, alone with the baseline, its state undone right after."""
    log(f"    {name}: its own rounds against the baseline")
    extra = make_runners([name], wl, args, errors)
    base.hide_modes = True
    try:
        samples = time_group([base] + extra, args.rounds, args.warmup, wl.inner, rng, errors, log)
    finally:
        base.hide_modes = False
        for run in extra:
            run.close()  # its mode must not outlive its rounds
    return summarize(head, samples, errors, own_rounds=True)


def time_watch_enter_exit(base: Runner, head: dict, repeats: int) -> dict:
    def enter_exit():
        with gradtrace.watch(base.model):
            pass

    return enter_exit_row(head, time_enter_exit(enter_exit, repeats))


def workload_head(wl: Workload) -> dict:
    return {"workload": wl.name, "shape": wl.shape, "mode": wl.mode, "n_params": len(trainable(wl.model))}


def run_workload(name: str, args, rng: random.Random) -> Tuple[List[dict], Optional[dict], dict]:
    """Times every variant of one workload: shared interleaved rounds, then one group per own-rounds variant."""
    wl = build_workload(name, args.size, args.device)
    head = workload_head(wl)
    names, notes = runnable(list(args.variants), wl)
    errors: Dict[str, str] = {}
    runners = make_runners([n for n in names if not BY_NAME[n].own_rounds], wl, args, errors)
    base = next((r for r in runners if r.name == "baseline"), None)
    rows: List[dict] = []
    enter_exit = None
    try:
        rows += summarize(head, time_group(runners, args.rounds, args.warmup, wl.inner, rng, errors, log), errors)
        for v in [n for n in names if BY_NAME[n].own_rounds] if base is not None else []:
            rows += time_own_rounds(v, base, head, wl, args, rng, errors)
        if gradtrace is not None and base is not None and not args.no_enter_exit:
            try:
                enter_exit = time_watch_enter_exit(base, head, SHAPES[args.size]["enter_exit_repeats"])
            except Exception as exc:  # noqa: BLE001 - reported beside the workload
                errors["enter_exit"] = f"{type(exc).__name__}: {exc}"
    finally:
        for run in runners:
            run.close()
    ran = {r["variant"] for r in rows}
    rows += [dict(head, variant=v, samples=0, note=notes[v]) for v in notes]
    rows += [dict(head, variant=v, samples=0, error=errors.get(v, "not run: the baseline failed"))
             for v in names if v not in ran]
    rows.sort(key=variant_order)
    info = dict(head, samples=args.rounds * wl.inner)
    if "enter_exit" in errors:
        info["enter_exit_error"] = errors["enter_exit"]
    return rows, enter_exit, info


def add_memory(rows: List[dict], args) -> Optional[str]:
    """Peak and held memory per measured row; returns why not, where it cannot be measured."""
    probe = MemoryProbe(args.device)
    if not probe.available:
        return probe.why_not
    try:
        for name in args.workloads:
            measured = [r for r in rows if r["workload"] == name and r["samples"]]
            if not measured:
                continue
            t0 = time.perf_counter()
            wl = build_workload(name, args.size, args.device)
            errors = {r["variant"]: r["error"] for r in measured if "error" in r}
            mem = measure_memory(wl, [r["variant"] for r in measured], probe, errors)
            for r in measured:
                if r["variant"] in mem:
                    r["peak_mib"], r["retained_mib"] = mem[r["variant"]]
                elif r["variant"] in errors and "error" not in r:
                    r["error"] = errors[r["variant"]]
            log(f"  memory {name}: {time.perf_counter() - t0:.1f} s")
            del wl
            gc.collect()
    finally:
        probe.restore()
    return None


def run(args: argparse.Namespace) -> dict:
    load_before = load_average()
    if GRADTRACE_IMPORT_ERROR:
        log(f"gradtrace variants skipped: {GRADTRACE_IMPORT_ERROR}")
    rng = random.Random(args.seed)
    rows: List[dict] = []
    enter_exit: List[dict] = []
    infos: List[dict] = []
    skipped: Dict[str, str] = {}
    started = time.perf_counter()
    for name in args.workloads:
        t0 = time.perf_counter()
        try:
            wl_rows, ee, info = run_workload(name, args, rng)
        except SkipWorkload as exc:
            skipped[name] = str(exc)
            log(f"skipping workload {name}: {exc}")
            continue
        rows += wl_rows
        infos.append(info)
        enter_exit += [ee] if ee else []
        log(f"  {name}: {time.perf_counter() - t0:.1f} s")
        gc.collect()
    memory_note = None if args.no_memory else add_memory(rows, args)
    result = {
        "machine": machine_info(args.device),
        "load_average": {"before": load_before, "after": load_average()},
        "settings": {"size": args.size, "rounds": args.rounds, "warmup": args.warmup, "seed": args.seed,
                     "workloads": args.workloads, "variants": args.variants},
        "workloads": infos,
        "rows": rows,
        "enter_exit": enter_exit,
        "skipped": skipped,
        "memory_note": memory_note,
        "wall_s": time.perf_counter() - started,
    }
    result["goals"] = goals.check_all(rows, enter_exit)
    print(render_report(result))
    if args.json:
        write_json(result, args.json)
    return result
