"""The built-in entropy probe and the command line.

Each demo bug must make gradtrace put the expected verdict first, and the
fault must be real: the probe's own output shows the symptom the bug is
named after. Every scenario runs once per session (a cache); the whole file
takes a few seconds per scenario on two CPU cores.
"""
import math
import subprocess
import sys

import pytest

import gradtrace
from gradtrace import cli, demo
from gradtrace.analysis.registry import REGISTRY

pytestmark = pytest.mark.slow  # real subprocesses / the whole demo: run by the full suite, not the dev loop

BUG_NAMES = list(demo.BUGS)
_RUNS = {}


def run(bug=None):
    """run_probe(bug), memoised: the scenarios are deterministic for a seed."""
    if bug not in _RUNS:
        _RUNS[bug] = demo.run_probe(bug, seed=0)
    return _RUNS[bug]


def prints_as_zero(x):
    return float(f"{x:.6f}") == 0.0


def lora_params(trace):
    return {n for n in trace.passes["X"].params if ".lora_" in n}


# ---- the demo -----------------------------------------------------------------


def test_healthy_probe_has_no_error_verdict():
    trace, result = run()
    errors = [str(v) for v in trace.verdicts() if v.severity == "error"]
    assert errors == []
    x, y = trace.passes["X"], trace.passes["Y"]
    assert x.missing == set() and y.missing == set()
    assert x.runs == 2 and y.runs == 2  # two microbatches each
    assert not x.zero and not y.zero  # warm-up moved lora_B off zero, so lora_A grads are nonzero too
    assert trace.tensors["S"].requires_grad and trace.tensors["S"].grads["Y"].reached
    assert math.isfinite(result.delta_h1) and not prints_as_zero(result.delta_h1)
    assert trace.scalars["deltaH1"].value == result.delta_h1


def test_gradtrace_inner_product_matches_probe_u_cross():
    """Oracle: the probe's hand-written Adam-preconditioned sum equals gradtrace's diff(precondition=)."""
    for bug in (None, "precondition", "reentrant_checkpoint"):
        trace, result = run(bug)
        (summary,) = [s for s in trace.inner_products if s["preconditioned"]]
        assert summary["dot"] == pytest.approx(result.u_cross, rel=1e-6, abs=1e-30)


def test_bug_registry_is_complete():
    assert set(demo.EXPECTED) == set(demo.BUGS)
    assert set(demo.EXPECTED.values()) <= set(REGISTRY)
    with pytest.raises(gradtrace.GradtraceError, match="unknown demo bug"):
        demo.run_probe("no_such_bug")


@pytest.mark.parametrize("bug", BUG_NAMES, ids=BUG_NAMES)
def test_bug_leads_with_expected_verdict(bug):
    trace, _ = run(bug)
    codes = [v.code for v in trace.verdicts()]
    assert codes, f"{bug}: no verdict at all"
    assert codes[0] == demo.EXPECTED[bug], f"{bug}: verdicts {codes}"


@pytest.mark.parametrize("bug, factor", [("tiny_lr", "learning rate"), ("precondition", "second moment")],
                         ids=["tiny_lr", "precondition"])
def test_rounds_to_zero_names_the_factor(bug, factor):
    """Both print deltaH1 as zero; the preconditioned inner product tells them apart."""
    first = run(bug)[0].verdicts()[0]
    assert first.code == "ROUNDS_TO_ZERO" and factor in first.message, first.message


def _symptom(bug, trace, result, healthy):
    """What the probe itself shows for each bug, without reading any verdict."""
    x, y = trace.passes["X"], trace.passes["Y"]
    if bug == "tiny_lr":
        return result.delta_h1 != 0 and prints_as_zero(result.delta_h1)
    if bug == "precondition":  # the Adam-preconditioned Y gradient is ~2**16 smaller than in a healthy run
        pre = next(s["norm_b_pre"] for s in trace.inner_products if s["preconditioned"])
        healthy_pre = next(s["norm_b_pre"] for s in run()[0].inner_products if s["preconditioned"])
        return result.delta_h1 != 0 and prints_as_zero(result.delta_h1) and pre < 1e-3 * healthy_pre
    if bug == "empty_mask":
        mask = trace.tensors["gen_mask"].values
        return mask.zeros == mask.numel and result.delta_h1 == 0 and x.zero == x.covered and y.zero == y.covered
    if bug == "zero_variance":
        a = trace.tensors["A"].values
        return a.zeros == a.numel and trace.tensors["rewards"].values.constant_fraction == 1.0
    if bug == "adapters_bypassed":
        return y.covered == {"ln_f.weight", "ln_f.bias"} and x.missing == set()
    if bug == "nan":
        return math.isnan(result.delta_h1) and x.nonfinite > 0
    if bug == "stale_grads":
        return x.stale == x.covered and abs(result.delta_h1) > 10 * abs(healthy.delta_h1)
    if bug in ("s_no_grad", "inference_mode", "detach"):
        # S carries nothing; only the KL term reaches the adapters
        return not trace.tensors["S"].requires_grad and y.missing == set() and y.total_norm < x.total_norm
    if bug == "reentrant_checkpoint":
        block_params = {n for n in x.params if n.startswith("blocks.")}
        return (x.missing == set() and y.missing == block_params
                and any(c.kind == "checkpoint" for c in trace.cuts))
    raise AssertionError(f"no symptom check for {bug}")


@pytest.mark.parametrize("bug", BUG_NAMES, ids=BUG_NAMES)
def test_bug_really_happens(bug):
    trace, result = run(bug)
    assert _symptom(bug, trace, result, run()[1])


def test_run_probe_is_deterministic_and_leaves_global_rng_alone():
    import torch
    _, cached = run("tiny_lr")
    before = torch.get_rng_state()
    _, again = demo.run_probe("tiny_lr", seed=0)
    assert torch.equal(before, torch.get_rng_state())
    assert again.delta_h1 == cached.delta_h1


# ---- the command line ---------------------------------------------------------


def test_demo_healthy_prints_report(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "run_probe", lambda bug=None, seed=0, cuts="modules": run(bug))
    path = tmp_path / "healthy.json"
    assert cli.main(["demo", "--healthy", "--save", str(path)]) == 0
    out = capsys.readouterr().out
    trace, result = run()
    assert "healthy run" in out and f"deltaH1: {result.delta_h1:.6f}" in out
    assert trace.report() in out
    assert path.exists()


def test_demo_bug_all_prints_one_line_per_bug(capsys, monkeypatch):
    monkeypatch.setattr(demo, "run_probe", lambda bug=None, seed=0, cuts="modules": run(bug))
    assert cli.main(["demo", "--bug", "all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1] for line in lines}
    assert list(rows) == ["healthy", *BUG_NAMES]
    for bug in BUG_NAMES:
        first = run(bug)[0].verdicts()[0]
        line = next(line for line in lines if line.split()[0] == bug)
        assert rows[bug] == first.code and first.message in line


def test_demo_help_lists_every_bug(capsys):
    assert cli.main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BUG_NAMES)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("traces")
    paths = {}
    for bug in (None, "adapters_bypassed"):
        paths[bug] = folder / f"{bug or 'healthy'}.json"
        run(bug)[0].save(paths[bug])
    return paths


def test_show_round_trip(saved, capsys):
    assert cli.main(["show", str(saved["adapters_bypassed"])]) == 0
    assert capsys.readouterr().out == run("adapters_bypassed")[0].report() + "\n"


def test_diff_within_one_file(saved, capsys):
    assert cli.main(["diff", str(saved["adapters_bypassed"]), "X", "Y"]) == 0
    out = capsys.readouterr().out
    assert out == str(gradtrace.load(saved["adapters_bypassed"]).diff("X", "Y")) + "\n"
    live = str(run("adapters_bypassed")[0].diff("X", "Y"))
    assert out.split("\n\n")[:2] == live.split("\n\n")[:2]  # header and coverage-by-module table
    assert "24 only in 'X'" in out


def test_diff_across_files(saved, capsys):
    healthy, bypassed = str(saved[None]), str(saved["adapters_bypassed"])
    assert cli.main(["diff", healthy, bypassed, "Y", "Y"]) == 0
    out = capsys.readouterr().out
    assert "'healthy.json:Y' vs 'adapters_bypassed.json:Y'" in out
    assert "2 reached in both, 24 only in 'healthy.json:Y', 0 only in" in out


@pytest.mark.parametrize("argv, message", [
    (["show", "{missing}"], "no such trace file"),
    (["show", "{garbage}"], "not valid JSON"),
    (["show", "{not_trace}"], "not a gradtrace trace"),
    (["diff", "{healthy}", "X", "Z"], "no pass named 'Z'"),
    (["diff", "{healthy}", "{healthy}", "X", "Z"], "no pass named 'Z'"),
    (["diff", "{healthy}", "X"], "3 or 4 arguments"),
    (["demo", "--bug", "all", "--save", "{missing}"], "single --bug NAME"),
], ids=["missing-file", "not-json", "json-not-trace", "unknown-pass", "unknown-pass-2-files",
        "diff-arity", "save-with-all"])
def test_bad_input_exits_2_with_one_line(argv, message, saved, tmp_path, capsys):
    (tmp_path / "garbage.json").write_text("{ not json")
    (tmp_path / "other.json").write_text('{"passes": {}}')
    names = {"missing": str(tmp_path / "missing.json"), "garbage": str(tmp_path / "garbage.json"),
             "not_trace": str(tmp_path / "other.json"), "healthy": str(saved[None])}
    assert cli.main([a.format(**names) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err and "Traceback" not in err
    assert err.startswith("gradtrace: error: ") and message in err


def test_usage_error_exits_2(capsys):
    assert cli.main(["demo", "--bug", "no_such_bug"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    missing = tmp_path / "missing.json"
    proc = subprocess.run([sys.executable, "-m", "gradtrace", "show", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("gradtrace: error: no such trace file") and str(missing) in err and "\n" not in err
