"""Rows from samples, the machine's description, tables and JSON."""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import statistics
from typing import Dict, List, Optional

import torch
from tabulate import tabulate

from .timing import CLOCKS, Samples, paired_ratios, quartiles
from .variants import NAMES, gradtrace

OWN_ROUNDS_NOTE = ("timed in rounds of its own against the baseline, whose steps then hide torch-function "
                   "modes (it changes process-wide state: a TorchFunctionMode, or torch's functions wrapped)")
COLUMNS_NOTE = (
    "cpu = time.thread_time() of the stepping thread, wall = time.perf_counter(); ms = median per step; "
    "paired x = median over rounds of the ratio to the baseline's steps in the same round, [first-third "
    "quartile]; +ms/pass = median - baseline median (every step is one pass); us/param = that / watched "
    "params; fwd x = forward medians' ratio (cpu); peak MiB = memory above the pre-step level during one "
    "step; held MiB = still held after it")


def median_ms(ns: List[int]) -> float:
    return statistics.median(ns) / 1e6


def clock_figures(got: Samples, base: Optional[Samples], clock: str, n_params: int) -> Dict[str, float]:
    """A variant's figures on one clock, against the baseline timed in the same rounds."""
    step_ms = [t / 1e6 for t in got.step_ns[clock]]
    out = {f"{clock}_median_ms": statistics.median(step_ms), f"{clock}_min_ms": min(step_ms),
           f"{clock}_max_ms": max(step_ms), f"{clock}_fwd_median_ms": median_ms(got.fwd_ns[clock])}
    if base is None or not len(base):
        return out
    base_ms = median_ms(base.step_ns[clock])
    overhead = out[f"{clock}_median_ms"] - base_ms
    ratios = paired_ratios(got, base, clock)
    q1, q3 = quartiles(ratios)
    out.update({
        f"{clock}_baseline_median_ms": base_ms,
        f"{clock}_ratio": out[f"{clock}_median_ms"] / base_ms,
        f"{clock}_paired_ratio": statistics.median(ratios),
        f"{clock}_paired_q1": q1,
        f"{clock}_paired_q3": q3,
        f"{clock}_fwd_ratio": out[f"{clock}_fwd_median_ms"] / median_ms(base.fwd_ns[clock]),
        f"{clock}_overhead_ms": overhead,
        f"{clock}_us_per_param": overhead * 1e3 / n_params,
    })
    return out


def summarize(head: dict, samples: Dict[str, Samples], errors: Dict[str, str],
              own_rounds: bool = False) -> List[dict]:
    """One row per variant in ``samples``; ``head`` holds the workload's columns.

    ``own_rounds``: the group held one variant and the baseline only; the
    baseline's row comes from the main group, so it is left out here.
    """
    base = samples.get("baseline")
    rows = []
    for name, got in samples.items():
        if own_rounds and name == "baseline":
            continue
        row = dict(head, variant=name, samples=len(got), own_rounds=own_rounds)
        if name in errors:
            row["error"] = errors[name]
        if len(got):
            for clock in CLOCKS:
                row.update(clock_figures(got, base, clock, head["n_params"]))
        rows.append(row)
    return rows


def enter_exit_row(head: dict, ns: Dict[str, List[int]]) -> dict:
    row = dict(head)
    for clock in CLOCKS:
        med = median_ms(ns[clock])
        row.update({f"{clock}_median_ms": med, f"{clock}_min_ms": min(ns[clock]) / 1e6,
                    f"{clock}_max_ms": max(ns[clock]) / 1e6,
                    f"{clock}_us_per_param": med * 1e3 / head["n_params"]})
    return row


def load_average() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "gradtrace": getattr(gradtrace, "__version__", None) if gradtrace else None,
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    for dist in ("transformers", "peft", "wandb", "torchlens", "lightning"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    return info


# ---------------------------------------------------------------------- render


def fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def paired_cell(row: dict, clock: str) -> str:
    if f"{clock}_paired_ratio" not in row:
        return "-"
    return (f"{row[f'{clock}_paired_ratio']:.3f} "
            f"[{row[f'{clock}_paired_q1']:.3f}-{row[f'{clock}_paired_q3']:.3f}]")


def render_rows(rows: List[dict]) -> str:
    table = [[
        r["workload"], r["variant"],
        fmt(r.get("cpu_median_ms"), ".2f"), paired_cell(r, "cpu"),
        fmt(r.get("cpu_overhead_ms"), ".3f"), fmt(r.get("cpu_us_per_param"), ".2f"),
        fmt(r.get("wall_median_ms"), ".2f"), paired_cell(r, "wall"), fmt(r.get("wall_us_per_param"), ".2f"),
        fmt(r.get("cpu_fwd_ratio"), ".3f"), fmt(r.get("peak_mib"), ".1f"), fmt(r.get("retained_mib"), ".1f"),
        r.get("error") or r.get("note", ""),
    ] for r in rows]
    return tabulate(table, headers=[
        "workload", "variant", "cpu ms", "cpu paired x [IQR]", "cpu +ms/pass", "cpu us/param",
        "wall ms", "wall paired x [IQR]", "wall us/param", "fwd x", "peak MiB", "held MiB", "note",
    ], disable_numparse=True)


def render_workloads(infos: List[dict]) -> str:
    return tabulate([[i["workload"], i["shape"], i["mode"], i["n_params"], i["samples"]] for i in infos],
                    headers=["workload", "shape", "grads via", "watched params", "samples/variant"])


def render_enter_exit(rows: List[dict]) -> str:
    return tabulate([[r["workload"], r["n_params"],
                      fmt(r["cpu_median_ms"], ".2f"), fmt(r["cpu_us_per_param"], ".2f"),
                      fmt(r["wall_median_ms"], ".2f"), f"{r['wall_min_ms']:.2f}-{r['wall_max_ms']:.2f}",
                      fmt(r["wall_us_per_param"], ".2f")] for r in rows],
                    headers=["workload", "params", "cpu ms", "cpu us/param", "wall ms", "wall min-max ms",
                             "wall us/param"], disable_numparse=True)


def render_goals(goals: List[dict]) -> str:
    return tabulate([[g["goal"], fmt(g["value"], ".3f"), g["target"], g["met"]] for g in goals],
                    headers=["goal (goals.json)", "measured", "target", "met"], disable_numparse=True)


def render_header(result: dict) -> List[str]:
    m, s = result["machine"], result["settings"]
    load = result["load_average"]
    return [
        f"machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable, torch threads {m['torch_threads']}), "
        f"torch {m['torch']}, device {m['device']}" + (f" ({m['device_name']})" if "device_name" in m else "")
        + f", python {m['python']}, gradtrace {m['gradtrace']}",
        f"load average (1/5/15 min): before {fmt_load(load['before'])}, after {fmt_load(load['after'])}",
        f"settings: size {s['size']}, {s['rounds']} rounds after {s['warmup']} warm-up, "
        f"wall {result['wall_s']:.0f} s",
    ]


def fmt_load(values: Optional[List[float]]) -> str:
    return "-" if values is None else "/".join(f"{v:.2f}" for v in values)


def render_report(result: dict) -> str:
    parts = render_header(result) + ["", render_workloads(result["workloads"]), "",
                                     render_rows(result["rows"])]
    if result["enter_exit"]:
        parts += ["", "enter+exit of gradtrace.watch(model), no step:", render_enter_exit(result["enter_exit"])]
    if result["goals"]:
        parts += ["", render_goals(result["goals"])]
    parts += [f"skipped {name}: {why}" for name, why in result["skipped"].items()]
    if result["memory_note"]:
        parts.append(f"memory not measured: {result['memory_note']}")
    own = sorted({r["variant"] for r in result["rows"] if r.get("own_rounds")})
    if own:
        parts.append(f"{', '.join(own)}: {OWN_ROUNDS_NOTE}")
    if result["machine"]["torch_threads"] != 1 or result["machine"]["device"] != "cpu":
        parts.append("cpu columns count the stepping thread only: with more than one torch thread, or on "
                     "CUDA, work on other threads is not in them")
    parts.append(COLUMNS_NOTE)
    return "\n".join(parts)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def variant_order(row: dict) -> int:
    return NAMES.index(row["variant"])
