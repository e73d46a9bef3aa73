"""The command line for scripts and CI: --format, --fail-on, --version, plot, progress of demo --bug all."""
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import gradtrace
from gradtrace import cli, demo
from zoo import _features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))


def _cut_in_y():
    """X reaches everything; in Y the first layer runs under no_grad (GRAPH_CUT, COVERAGE_GAP: errors)."""
    model = _model()
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            model(_features(0)).pow(2).mean().backward()
        with trace.pass_("Y"):
            with torch.no_grad():
                hidden = model[0](_features(1))
            torch.autograd.grad(model[2](model[1](hidden)).sum(), list(model.parameters()), allow_unused=True)
    return trace


def _healthy(scalar=None):
    model = _model()
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            model(_features(0)).sum().backward()
        if scalar is not None:
            trace.scalar("deltaH1", scalar)
    return trace


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ci")
    traces = {"broken": _cut_in_y(), "healthy": _healthy(),
              "warning": _healthy(scalar=-2e-8)}  # prints as -0.000000: ROUNDS_TO_ZERO, a warning only
    paths = {}
    for name, trace in traces.items():
        paths[name] = str(folder / f"{name}.json")
        trace.save(paths[name])
    return paths


def run_cli(argv, capsys):
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_show_json_has_every_pass_and_verdict(files, capsys):
    status, out, _ = run_cli(["show", files["broken"], "--format", "json"], capsys)
    assert status == 0  # --fail-on defaults to never
    data = json.loads(out)
    loaded = gradtrace.load(files["broken"])
    assert [p["name"] for p in data["passes"]] == ["X", "Y"]
    x, y = data["passes"]
    assert x["missing"] == [] and x["covered"] == 4 and x["coverage"] == 1.0
    assert y["missing"] == sorted(loaded.passes["Y"].missing) == ["0.bias", "0.weight"]
    assert y["covered"] == 2 and y["params"] == 4 and y["via"] == ["grad"]
    for summary in data["passes"]:
        assert summary["total_norm"] == pytest.approx(loaded.passes[summary["name"]].total_norm)
    assert [(v["code"], v["severity"]) for v in data["verdicts"]] == [(v.code, v.severity) for v in loaded.verdicts()]
    assert data["diagnosis"].startswith("gradtrace diagnosis: ")


def test_show_markdown_is_github_tables(files, capsys):
    status, out, _ = run_cli(["show", files["broken"], "--format", "markdown"], capsys)
    assert status == 0
    assert out.startswith("**gradtrace diagnosis:")
    rows = [line for line in out.splitlines() if line.startswith("|")]
    assert any(line.startswith("| `X`") for line in rows) and any(line.startswith("| `Y`") for line in rows)
    for block in out.split("\n\n"):  # every table keeps one column count on every row
        lines = [line for line in block.splitlines() if line.startswith("|")]
        counts = {line.replace("\\|", "").count("|") for line in lines}
        assert len(counts) <= 1, block
    codes = {v.code for v in gradtrace.load(files["broken"]).verdicts()}
    assert all(f"`{code}`" in out for code in codes)


@pytest.mark.parametrize("name, fail_on, status", [
    ("broken", "error", 1), ("broken", "warning", 1), ("broken", "never", 0),
    ("healthy", "error", 0), ("healthy", "warning", 0),
    ("warning", "error", 0), ("warning", "warning", 1),
], ids=lambda x: str(x))
def test_fail_on(files, capsys, name, fail_on, status):
    severities = {v.severity for v in gradtrace.load(files[name]).verdicts()}
    assert ("error" in severities) == (name == "broken")  # the fixtures are what their names say
    assert ("warning" in severities) == (name == "warning")
    got, out, _ = run_cli(["show", files[name], "--fail-on", fail_on], capsys)
    assert got == status
    assert out == gradtrace.load(files[name]).report() + "\n"  # the report is printed either way


def test_diff_across_files_json_and_fail_on(files, capsys):
    status, out, _ = run_cli(["diff", files["broken"], files["broken"], "X", "Y", "--format", "json",
                              "--fail-on", "error"], capsys)
    data = json.loads(out)
    assert data["only_a"] == ["0.bias", "0.weight"] and data["only_b"] == [] and len(data["both"]) == 2
    assert data["verdicts"][0]["code"] == "COVERAGE_GAP"
    assert status == 1
    healthy = files["healthy"]
    status, out, _ = run_cli(["diff", healthy, healthy, "X", "X", "--fail-on", "error"], capsys)
    assert status == 0 and "0 only in" in out


def test_diff_across_files_counts_the_gap_between_them(capsys, tmp_path):
    """Two files without an error of their own whose passes differ: the gap is an error only the diff sees."""
    model = _model()
    with gradtrace.watch(model) as full:
        with full.pass_("X"):
            model(_features(0)).sum().backward()
    model.zero_grad()
    with gradtrace.watch([(n, p) for n, p in model.named_parameters() if n.startswith("2.")]) as head_only:
        with head_only.pass_("X"):
            model(_features(0)).sum().backward()
    for trace, name in ((full, "a.json"), (head_only, "b.json")):
        assert not [v for v in trace.verdicts() if v.severity == "error"]
        trace.save(tmp_path / name)
    argv = ["diff", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "X", "X", "--format", "markdown"]
    status, out, _ = run_cli(argv + ["--fail-on", "error"], capsys)
    assert status == 1
    assert out.startswith("**diff `a.json:X` vs `b.json:X`**: 2 reached in both, 2 only in `a.json:X`")
    assert re.search(r"\| `COVERAGE_GAP` +\|", out)
    assert run_cli(argv, capsys)[0] == 0


def test_diff_within_one_file_markdown(files, capsys):
    status, out, _ = run_cli(["diff", files["broken"], "X", "Y", "--format", "markdown"], capsys)
    assert status == 0 and out.startswith("**diff `X` vs `Y`**: 2 reached in both, 2 only in `X`")
    assert re.search(r"\| `GRAPH_CUT` +\|", out) and re.search(r"\| `COVERAGE_GAP` +\|", out)


def test_version(capsys):
    status, out, _ = run_cli(["--version"], capsys)
    assert status == 0 and out.strip() == f"gradtrace {gradtrace.__version__}"


def test_plot_command(files, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    out_png = tmp_path / "coverage.png"
    status, out, _ = run_cli(["plot", files["broken"], "-o", str(out_png), "--kind", "coverage"], capsys)
    assert status == 0 and out.strip() == f"wrote {out_png}"
    assert matplotlib.image.imread(out_png).shape[0] > 100
    status, _, err = run_cli(["plot", files["broken"], "-o", str(out_png), "--kind", "inner"], capsys)
    assert status == 2 and err.count("\n") == 1 and "keep_grads=True" in err


def test_errors_stay_one_line(files, capsys, tmp_path):
    status, out, err = run_cli(["show", str(tmp_path / "missing.json"), "--format", "json"], capsys)
    assert status == 2 and out == "" and err.startswith("gradtrace: error: no such trace file")
    assert err.count("\n") == 1


def test_demo_bug_all_flushes_each_line(monkeypatch):
    """Progress: every line leaves the process as soon as its scenario ends (CI logs show it live)."""
    trace = _healthy()
    monkeypatch.setattr(demo, "run_probe", lambda bug=None, seed=0, cuts="modules": (trace, None))

    class Recorder(io.StringIO):
        flushed_at = []

        def flush(self):
            self.flushed_at.append(self.getvalue().count("\n"))

    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["demo", "--bug", "all"]) == 0
    lines = len(demo.BUGS) + 1
    assert out.getvalue().count("\n") == lines
    assert [n for n in out.flushed_at if n][:lines] == list(range(1, lines + 1))


@pytest.mark.slow  # subprocesses that import torch: seconds each
def test_subprocess_exit_status_for_ci(files):
    out = subprocess.run([sys.executable, "-m", "gradtrace", "show", files["broken"], "--format", "json",
                          "--fail-on", "error"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout)["verdicts"][0]["severity"] == "error"
