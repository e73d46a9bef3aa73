"""Trace.metrics(): flat {str: float} for trackers, checked against plain autograd."""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch

import gradtrace
from zoo import DetachedBranch, _features


def _oracle_norms(model, batch):
    """Per-parameter gradient norms of one backward on an independent copy (None: not reached)."""
    twin = copy.deepcopy(model)
    twin(batch).pow(2).mean().backward()
    return {n: (None if p.grad is None else torch.linalg.vector_norm(p.grad.double()).item())
            for n, p in twin.named_parameters()}


def _labelled_trace(model, batch, name="X"):
    with gradtrace.watch(model) as trace:
        with trace.pass_(name):
            model(batch).pow(2).mean().backward()
    return trace


def test_pass_metrics_match_plain_autograd():
    model, batch = DetachedBranch(), _features(0)
    norms = _oracle_norms(model, batch)
    m = _labelled_trace(model, batch).metrics()
    reached = [v for v in norms.values() if v is not None]
    assert m["gradtrace/X/params"] == len(norms) == 6
    assert m["gradtrace/X/covered"] == len(reached) == 4  # the detached branch (right.*) gets nothing
    assert m["gradtrace/X/coverage"] == pytest.approx(4 / 6)
    assert m["gradtrace/X/total_norm"] == pytest.approx(math.sqrt(sum(v * v for v in reached)), rel=1e-6)
    assert m["gradtrace/X/runs"] == 1 and m["gradtrace/X/nonfinite"] == 0 and m["gradtrace/X/zero"] == 0
    assert all(isinstance(k, str) and type(v) is float for k, v in m.items())


def test_max_abs_matches_plain_autograd():
    model, batch = DetachedBranch(), _features(1)
    twin = copy.deepcopy(model)
    twin(batch).pow(2).mean().backward()
    expected = max(p.grad.abs().max().item() for p in twin.parameters() if p.grad is not None)
    assert _labelled_trace(model, batch).metrics()["gradtrace/X/max_abs"] == pytest.approx(expected, rel=1e-6)


def test_per_module_coverage_and_norm():
    model, batch = DetachedBranch(), _features(0)
    norms = _oracle_norms(model, batch)
    m = _labelled_trace(model, batch).metrics(per_module=True)
    assert m["gradtrace/X/module/right/coverage"] == 0.0 and m["gradtrace/X/module/right/norm"] == 0.0
    assert m["gradtrace/X/module/left/coverage"] == 1.0
    left = math.sqrt(norms["left.weight"] ** 2 + norms["left.bias"] ** 2)
    assert m["gradtrace/X/module/left/norm"] == pytest.approx(left, rel=1e-6)
    assert not any("/module/" in k for k in _labelled_trace(model, batch).metrics())  # off by default


def test_last_pass_keys_are_the_same_every_step():
    """Unlabelled steps are passes backward-1, backward-2, ...: passes='last' logs fixed keys."""
    model = DetachedBranch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen_keys = []
    with gradtrace.watch(model) as trace:
        for step in range(3):
            batch = _features(step)
            expected = _oracle_norms(model, batch)
            opt.zero_grad()
            model(batch).pow(2).mean().backward()
            m = trace.metrics(passes="last")
            seen_keys.append(sorted(m))
            reached = [v for v in expected.values() if v is not None]
            assert m["gradtrace/total_norm"] == pytest.approx(math.sqrt(sum(v * v for v in reached)), rel=1e-6)
            opt.step()
    assert seen_keys[0] == seen_keys[1] == seen_keys[2]
    assert "gradtrace/coverage" in seen_keys[0] and not any("backward-" in k for k in seen_keys[0])
    every = trace.metrics()
    assert {"gradtrace/backward-1/coverage", "gradtrace/backward-3/coverage"} <= set(every)


def test_selected_passes_prefix_and_unsafe_names():
    model = DetachedBranch()
    with gradtrace.watch(model) as trace:
        for name in ("warm up", "step:2"):
            with trace.pass_(name):
                model(_features(0)).sum().backward()
    m = trace.metrics(prefix="gt.", passes=["step:2"])
    assert "gt.step_2/coverage" in m and not any("warm" in k for k in m)
    assert {"gt.errors", "gt.warnings"} <= set(m)
    with pytest.raises(gradtrace.GradtraceError, match="no pass named 'nope'"):
        trace.metrics(passes=["nope"])
    with pytest.raises(gradtrace.GradtraceError, match="'last'"):
        trace.metrics(passes="first")


def test_verdict_counts():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            model(torch.randn(4, 3)).sum().backward()
    assert trace.metrics()["gradtrace/errors"] == 0.0
    model.zero_grad()
    with gradtrace.watch(model) as broken:
        with broken.pass_("X"):
            model(torch.full((4, 3), float("nan"))).sum().backward()  # NaN input: NONFINITE
    m = broken.metrics()
    expected = sum(int((~torch.isfinite(p.grad)).sum()) for p in model.parameters())
    assert expected == 15  # every element but the output bias's (its gradient does not depend on x)
    assert m["gradtrace/errors"] >= 1.0 and m["gradtrace/X/nonfinite"] == expected


def test_loaded_trace_gives_the_same_metrics(tmp_path):
    trace = _labelled_trace(DetachedBranch(), _features(0))
    trace.save(tmp_path / "t.json")
    assert gradtrace.load(tmp_path / "t.json").metrics(per_module=True) == trace.metrics(per_module=True)


def test_tensorboard_round_trip(tmp_path):
    """The documented one-liner writes scalars TensorBoard reads back unchanged."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = DetachedBranch()
    logged = {}
    writer = SummaryWriter(log_dir=str(tmp_path))
    with gradtrace.watch(model) as trace:
        for step in range(2):
            model.zero_grad()
            model(_features(step)).pow(2).mean().backward()
            logged[step] = trace.metrics(passes="last")
            for key, value in logged[step].items():
                writer.add_scalar(key, value, step)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(logged[0])
    for key in logged[0]:
        read = {e.step: e.value for e in events.Scalars(key)}
        assert read == {s: pytest.approx(logged[s][key], rel=1e-6) for s in logged}


@pytest.mark.slow  # subprocesses that import torch: seconds each
def test_import_gradtrace_pulls_in_no_optional_extra():
    code = ("import sys, gradtrace, gradtrace.analysis.metrics, gradtrace.testing, gradtrace.render.plot, gradtrace.render.formats, "
            "gradtrace.cli, gradtrace.integrations; gradtrace.cli._parser(); "
            "print([m for m in ('matplotlib', 'lightning', 'pytorch_lightning', 'tensorboard', 'transformers') "
            "if m in sys.modules])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_verdict_counts_follow_the_selected_passes():
    """Four steps, the graph cut in the last: three gaps (A-D, B-D, C-D), each concerning its two passes."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    with gradtrace.watch(model) as trace:
        for name in "ABCD":
            model.zero_grad()
            with trace.pass_(name):
                h = model[1](model[0](torch.randn(4, 3)))
                model[2](h.detach() if name == "D" else h).sum().backward()
    gaps = [(v.evidence["a"], v.evidence["b"]) for v in trace.verdicts() if v.code == "COVERAGE_GAP"]
    assert gaps == [("A", "D"), ("B", "D"), ("C", "D")]
    errors = sum(v.severity == "error" for v in trace.verdicts())
    assert trace.metrics()["gradtrace/errors"] == errors
    assert trace.metrics(passes="last")["gradtrace/errors"] == errors  # every error involves D
    assert trace.metrics(passes=["A"])["gradtrace/errors"] == errors - 3  # not B-D, C-D, D's cut output
    assert set(trace.metrics(passes="last")) - set(trace.metrics(passes="last", verdicts=False)) == {
        "gradtrace/errors", "gradtrace/warnings"}
