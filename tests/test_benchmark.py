"""The hook-overhead benchmark package: every pair measured with sane numbers, goals, both command lines.

No timing assertions: only that every (workload, variant) pair that can run was
measured, that the numbers are finite and of the right sign, that every goal in
goals.json names a figure the run produced, and that both ways of starting it work.
"""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.hook_overhead import goals, main, parse_args
from benchmarks.hook_overhead.models import SHAPES, WORKLOADS, build_workload, trainable
from benchmarks.hook_overhead.report import render_report
from benchmarks.hook_overhead.timing import CLOCKS
from benchmarks.hook_overhead.variants import (
    BY_NAME, GRADTRACE_VARIANTS, NAMES, PEERS, WANDB_BINS, AfterWatch, ForeachFloor, WandbLike,
    make_variant, why_skipped,
)

ROOT = Path(__file__).resolve().parents[1]
# one intra-op thread: on a busy 2-core machine two OpenMP threads can stall a step for a second
TINY = ["--size", "tiny", "--rounds", "2", "--warmup", "0", "--threads", "1"]  # no timing is judged: no warm-up
CORE = [n for n in NAMES if n not in PEERS]
HAS_LORA = all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))
RUN_WORKLOADS = [w for w in WORKLOADS if HAS_LORA or w != "lora_gpt2"]
CPU = torch.device("cpu")


def assert_finite_figures(key, row):
    for clock in CLOCKS:
        for col in ("median_ms", "min_ms", "max_ms", "fwd_median_ms", "ratio", "paired_ratio",
                    "paired_q1", "paired_q3", "fwd_ratio"):
            value = row[f"{clock}_{col}"]
            assert math.isfinite(value) and value > 0, (key, clock, col, value)
        assert row[f"{clock}_min_ms"] <= row[f"{clock}_median_ms"] <= row[f"{clock}_max_ms"], (key, clock)
        assert row[f"{clock}_paired_q1"] <= row[f"{clock}_paired_ratio"] <= row[f"{clock}_paired_q3"], key
        assert math.isfinite(row[f"{clock}_us_per_param"]) and math.isfinite(row[f"{clock}_overhead_ms"]), key


def check_rows(result, workloads, variants):
    rows = {(r["workload"], r["variant"]): r for r in result["rows"]}
    assert set(rows) == {(w, v) for w in workloads for v in variants}
    measured = 0
    for (w, v), r in rows.items():
        assert "error" not in r, ((w, v), r.get("error"))
        if r.get("note"):  # a peer that is not installed, or a variant that does not apply
            assert r["note"].startswith(("skipped:", "not applicable:")) and r["samples"] == 0, (w, v)
            continue
        measured += 1
        assert r["samples"] >= 1 and r["n_params"] > 0, (w, v)
        assert_finite_figures((w, v), r)
        if "peak_mib" in r:  # peak RSS above the pre-step level never goes below zero
            assert math.isfinite(r["peak_mib"]) and r["peak_mib"] >= 0, ((w, v), r["peak_mib"])
            assert math.isfinite(r["retained_mib"]), (w, v)
    for w in workloads:
        base = rows[(w, "baseline")]
        for clock in CLOCKS:
            assert base[f"{clock}_paired_ratio"] == pytest.approx(1.0)
            assert base[f"{clock}_us_per_param"] == pytest.approx(0.0)
    return measured


@pytest.fixture(scope="module")
def core_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    result = main(TINY + ["--workloads", ",".join(RUN_WORKLOADS), "--variants", ",".join(CORE),
                          "--json", str(out)])
    return result, out


@pytest.mark.slow
def test_every_pair_has_finite_numbers(core_result):
    result, _ = core_result
    check_rows(result, RUN_WORKLOADS, CORE)
    rows = {(r["workload"], r["variant"]): r for r in result["rows"]}
    # what cannot run on autograd.grad says so instead of being measured
    ypass = build_workload("ypass", "tiny", CPU)
    for v in CORE:
        assert rows[("ypass", v)].get("note") == why_skipped(v, ypass)
    for w in RUN_WORKLOADS:
        assert all("peak_mib" in r for r in result["rows"] if r["workload"] == w and r["samples"])
    ee = {e["workload"]: e for e in result["enter_exit"]}
    assert set(ee) == set(RUN_WORKLOADS)
    for e in ee.values():
        for clock in CLOCKS:
            assert math.isfinite(e[f"{clock}_us_per_param"]) and e[f"{clock}_us_per_param"] > 0
            assert e[f"{clock}_min_ms"] <= e[f"{clock}_median_ms"] <= e[f"{clock}_max_ms"]


@pytest.mark.slow
def test_every_goal_names_a_measured_figure(core_result):
    result, _ = core_result
    checked = {g["goal"]: g for g in result["goals"]}
    for goal in goals.load_goals():
        if goal["workload"] not in RUN_WORKLOADS:
            continue
        outcome = checked[goal["goal"]]
        assert outcome["met"] in ("yes", "NO"), (goal["goal"], outcome["met"])
        assert math.isfinite(outcome["value"]), goal["goal"]


@pytest.mark.slow
def test_json_holds_rows_machine_and_load(core_result):
    result, out = core_result
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert saved["machine"]["torch"] == torch.__version__ and saved["machine"]["torch_threads"] == 1
    assert len(saved["load_average"]["before"]) == len(saved["load_average"]["after"]) == 3
    report = render_report(saved)
    for variant in CORE:
        assert variant in report
    assert "load average (1/5/15 min): before" in report and "cpu paired x [IQR]" in report


@pytest.mark.slow
def test_peers_run_where_installed():
    installed = [p for p in PEERS if all(importlib.util.find_spec(m) for m in BY_NAME[p].requires)]
    if not installed:
        pytest.skip("none of wandb, torchlens, lightning is installed (pip install -e '.[bench]')")
    result = main(["--size", "tiny", "--rounds", "1", "--warmup", "0", "--threads", "1", "--no-memory",
                   "--no-enter-exit", "--workloads", "transformer", "--variants", ",".join(installed)])
    assert check_rows(result, ["transformer"], ["baseline"] + installed) == 1 + len(installed)


@pytest.mark.slow
def test_both_command_lines(tmp_path):
    args = ["--size", "tiny", "--workloads", "linear_chain", "--variants", "gradtrace", "--rounds", "1",
            "--warmup", "0", "--threads", "1", "--no-memory", "--no-enter-exit"]
    commands = {"module": [sys.executable, "-m", "benchmarks.hook_overhead"],
                "script": [sys.executable, str(ROOT / "benchmarks" / "hook_overhead.py")]}
    # started together, waited on together: most of each is importing torch
    procs = {name: subprocess.Popen(cmd + args + ["--json", str(tmp_path / f"{name}.json")], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in commands.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, (name, stderr[-2000:])
        assert "linear_chain  gradtrace" in stdout, name
        rows = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
        assert [r["variant"] for r in rows] == ["baseline", "gradtrace"], name


def test_goal_checks_on_known_rows():
    rows = [
        {"workload": "w", "variant": "baseline", "cpu_overhead_ms": 0.0},
        {"workload": "w", "variant": "gradtrace", "cpu_overhead_ms": 1.0, "cpu_paired_ratio": 1.02},
        {"workload": "w", "variant": "wandb_like", "cpu_overhead_ms": 4.0},
        {"workload": "w", "variant": "after_watch", "cpu_paired_ratio": 1.01,
         "cpu_paired_q1": 0.99, "cpu_paired_q3": 1.03},
    ]
    enter_exit = [{"workload": "w", "cpu_us_per_param": 20.0}]
    specs = [
        {"goal": "ratio", "table": "steps", "workload": "w", "variant": "gradtrace",
         "figure": "cpu_paired_ratio", "at_most": 1.03},
        {"goal": "share", "table": "steps", "workload": "w", "variant": "gradtrace",
         "figure": "cpu_overhead_ms", "over_variant": "wandb_like", "at_most": 0.2},
        {"goal": "noise", "table": "steps", "workload": "w", "variant": "after_watch",
         "figure": "cpu_paired_ratio", "iqr_contains": 1.0},
        {"goal": "enter", "table": "enter_exit", "workload": "w", "figure": "cpu_us_per_param", "at_most": 12},
        {"goal": "absent", "table": "steps", "workload": "w", "variant": "gradtrace_ops",
         "figure": "cpu_fwd_ratio", "at_most": 1.5},
        {"goal": "elsewhere", "table": "steps", "workload": "other", "variant": "gradtrace",
         "figure": "cpu_paired_ratio", "at_most": 1.03},
    ]
    got = {g["goal"]: g for g in goals.check_all(rows, enter_exit, specs)}
    assert set(got) == {"ratio", "share", "noise", "enter", "absent"}  # "other" did not run
    assert (got["ratio"]["met"], got["share"]["met"], got["noise"]["met"]) == ("yes", "NO", "yes")
    assert got["share"]["value"] == pytest.approx(0.25)
    assert (got["enter"]["met"], got["absent"]["met"]) == ("NO", "not measured")


def test_goals_file_parses_and_names_known_rows():
    loaded = goals.load_goals()
    assert loaded
    for goal in loaded:
        assert goal["workload"] in WORKLOADS, goal["goal"]
        for key in ("variant", "over_variant"):
            assert goal.get(key, "baseline") in NAMES, goal["goal"]
    with pytest.raises(ValueError, match="exactly one"):
        goals.check_goal_shape({"goal": "g", "table": "steps", "variant": "gradtrace", "figure": "cpu_ratio"})


def test_linear_chain_shapes():
    assert SHAPES["full"]["linear_chain"]["n"] == SHAPES["quick"]["linear_chain"]["n"] == 1000
    wl = build_workload("linear_chain", "tiny", CPU)
    assert len(trainable(wl.model)) == 2 * SHAPES["tiny"]["linear_chain"]["n"]


def test_variant_filter_always_keeps_the_baseline_and_one_thread_on_cpu():
    args = parse_args(["--size", "tiny", "--variants", "item_hooks"])
    assert args.variants == ["baseline", "item_hooks"] and args.threads == 1
    with pytest.raises(SystemExit):
        parse_args(["--workloads", "nope"])


def test_wandb_like_histogram_counts_every_element():
    wl = build_workload("linear_chain", "tiny", CPU)
    model = torch.nn.Linear(5, 3)
    v = WandbLike(model, wl)
    model(torch.randn(7, 5)).sum().backward()
    v.close()
    counts, edges = v.row["weight"]
    assert len(counts) == WANDB_BINS and len(edges) == WANDB_BINS + 1
    assert sum(counts) == model.weight.numel()
    assert edges[0] == pytest.approx(model.weight.grad.min().item())
    assert edges[-1] == pytest.approx(model.weight.grad.max().item())


def test_foreach_floor_reads_every_gradient():
    wl = build_workload("linear_chain", "tiny", CPU)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    v = ForeachFloor(model, wl)
    model(torch.randn(3, 4)).square().sum().backward()
    v.after(0, None)
    assert v.norms == pytest.approx([p.grad.norm().item() for p in model.parameters()])


@pytest.mark.parametrize("name", [n for n in GRADTRACE_VARIANTS if n != "after_watch"])
def test_gradtrace_variants_read_the_true_total_norm(name):
    # the timed step must be doing the real work: its pass figure matches plain autograd
    wl = build_workload("transformer", "tiny", CPU)
    v = make_variant(name, wl.model, wl)
    try:
        with v.pass_(0):
            v.take_grads(v.loss())
        v.after(0, None)
    finally:
        v.close()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in v.params])).item()
    if name == "gradtrace_unread":  # it never reads in the step; the pass it recorded is still exact
        assert math.isnan(v.last_norm)
        assert v.trace.passes["step0"].total_norm == pytest.approx(expected, rel=1e-5)
        return
    assert v.last_norm == pytest.approx(expected, rel=1e-5)


def test_after_watch_steps_like_a_model_never_watched():
    # the "after" copy was really watched (one pass), and its plain step gives the same gradients
    wl = build_workload("transformer", "tiny", CPU)
    never = build_workload("transformer", "tiny", CPU).model
    v = AfterWatch(wl.model, wl)
    assert v.covered_while_watched == len(v.params)
    assert all(p.grad is None for p in v.params)  # the watched pass left no gradient behind
    v.take_grads(v.loss())
    wl.loss_of(never(wl.batch), wl.batch).backward()
    for (name, p), q in zip(v.named, (q for _, q in trainable(never)), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
