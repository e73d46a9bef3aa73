"""Analysis cost bounded (issue 24, item 2): results reused from call to call are the ones a
computation from scratch gives, and a long run's per-call work follows what changed, not what is kept.

The oracle for the cache (``analysis.memo``): every verdict, judged on a trace that changes between
calls (passes added and dropped as ``max_passes`` does, coverage changing every step, a cut, an
optimizer), equals the verdict judged on the same trace with nothing kept. Costs are counted
(computations done, names parsed), never timed.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

import gradtrace
from gradtrace.analysis import names as names_module
from gradtrace.analysis.memo import memo_of
from gradtrace.records import Cut, GradRecord, OptimizerRecord, PassTrace
from gradtrace.trace import Trace

sys.path.insert(0, str(Path(__file__).parent))
from scenarios import SCENARIOS  # noqa: E402


def _fresh(trace):
    """The trace's verdicts with nothing reused from earlier calls."""
    trace.__dict__.pop("_analysis_memo", None)
    return _seen(trace.verdicts())


def _seen(found):
    return [(v.code, v.severity, v.message, v.evidence) for v in found]


def _moe_params(experts: int):
    params = ["embed.weight"]
    for layer in range(2):
        params += [f"layers.{layer}.router.weight"]
        params += [f"layers.{layer}.experts.{e}.{w}.weight" for e in range(experts) for w in ("up", "down")]
    return params + ["head.weight"]


def _moe_pass(name: str, params, rng: random.Random, experts: int, k: int = 2, zero: bool = False) -> PassTrace:
    """A pass of a top-k MoE: the shared parameters and k experts per layer, chosen anew each step."""
    covered = ["embed.weight", "head.weight"]
    for layer in range(2):
        covered.append(f"layers.{layer}.router.weight")
        for e in rng.sample(range(experts), k):
            covered += [f"layers.{layer}.experts.{e}.up.weight", f"layers.{layer}.experts.{e}.down.weight"]
    records = {n: GradRecord(name=n, hits=1, norm=0.0 if zero and n == "head.weight" else 1.0,
                             max_abs=0.0 if zero and n == "head.weight" else 1.0,
                             zero=zero and n == "head.weight", nonfinite=0, via="backward", order=i)
               for i, n in enumerate(covered)}
    p = PassTrace(name=name, params=params, runs=1, kinds=["backward"])
    p.records = records
    return p


def _step_through(trace, steps: int, keep: int, rng: random.Random, experts: int, check_every: int = 1):
    """Add a pass per step, drop the oldest past ``keep`` (as max_passes does), and compare each call's
    verdicts with verdicts from scratch on an identical trace."""
    table = trace._passes
    for step in range(steps):
        table[f"step {step}"] = _moe_pass(f"step {step}", trace.params, rng, experts, zero=(step % 7 == 3))
        while len(table) > keep:
            del table[next(iter(table))]
        if step == steps // 2:  # the context changes part-way: a cut, then an optimizer stepping some passes
            trace._cuts.append(Cut(kind="no_grad", module="layers.1.experts.3", location="model.py:1",
                                   pass_name=f"step {step}", seq=1, params=2))
        cached = _seen(trace.verdicts())
        if step % check_every == 0:
            twin = Trace(trace.params, passes=dict(trace.passes), cuts=list(trace.cuts),
                         optimizers=dict(trace.optimizers))
            assert cached == _fresh(twin), f"step {step}"


def test_verdicts_kept_between_calls_equal_verdicts_from_scratch_over_a_moving_window():
    rng = random.Random(0)
    trace = Trace(_moe_params(8))
    _step_through(trace, steps=40, keep=10, rng=rng, experts=8)
    assert memo_of(trace).computed["gap"] > 0  # the cache was used, not bypassed


def test_verdicts_kept_between_calls_follow_optimizers_and_replaced_params():
    rng = random.Random(1)
    params = _moe_params(4)
    trace = Trace(params)
    table = trace._passes
    for step in range(12):
        table[f"s{step}"] = _moe_pass(f"s{step}", params, rng, 4)
        if step == 5:  # an optimizer appears, owning only part of the model, stepping the even passes
            trace._optimizers["opt"] = OptimizerRecord(name="opt", params=params[: len(params) // 2],
                                                       passes={f"s{i}": 1 for i in range(0, 6, 2)})
        if step == 8:
            trace.meta.replaced_params = {params[3]: "replaced"}
        assert _seen(trace.verdicts()) == _fresh(Trace(params, trace.param_shapes, dict(trace.meta),
                                                      passes=dict(trace.passes),
                                                      optimizers=dict(trace.optimizers))), step


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if not s.slow], ids=lambda s: s.name)
@pytest.mark.parametrize("fixed", [False, True], ids=["bug", "fixed"])
def test_scenario_verdicts_equal_with_and_without_the_cache(scenario, fixed):
    """The scenario suite's traces, judged pass by pass as a training loop would (each prefix of the
    passes on the same trace object), give every verdict a computation from scratch gives."""
    trace = scenario.run(fixed)
    passes = trace.passes
    names = list(passes)
    live = Trace(trace.params, trace.param_shapes, dict(trace.meta), tensors=trace.tensors, cuts=list(trace.cuts),
                 scalars=trace.scalars, optimizers=trace.optimizers, inner_products=trace.inner_products)
    for name in names:
        live._passes[name] = passes[name]
        cached = _seen(live.verdicts())
        twin = Trace(trace.params, trace.param_shapes, dict(trace.meta), passes=dict(live.passes),
                     tensors=trace.tensors, cuts=list(trace.cuts), scalars=trace.scalars,
                     optimizers=trace.optimizers, inner_products=trace.inner_products)
        assert cached == _fresh(twin), name
    assert _seen(trace.verdicts()) == _seen(trace.verdicts()) == _fresh(trace)


def test_a_long_run_computes_one_new_coverage_gap_per_step():
    """100 kept passes, coverage changing every step: each call judges the new neighbour pair only."""
    rng = random.Random(2)
    trace = Trace(_moe_params(64))
    table = trace._passes
    for step in range(130):
        table[f"step {step}"] = _moe_pass(f"step {step}", trace.params, rng, 64)
        while len(table) > 100:
            del table[next(iter(table))]
        memo = memo_of(trace)
        before = dict(memo.computed)
        found = trace.verdicts()
        if step > 110:
            assert sum(v.code == "COVERAGE_GAP" for v in found) == 99
            assert memo.computed["gap"] - before.get("gap", 0) == 1
            assert memo.computed["lost"] - before.get("lost", 0) <= 100  # a set difference per pass, in C
    assert len(memo) < 2000  # what is kept is one call's working set, not the run's history


def test_names_of_the_model_are_grouped_once_not_per_coverage_gap(monkeypatch):
    """Describing each coverage gap by module parses the gap's names, not every parameter name again."""
    rng = random.Random(3)
    params = _moe_params(64)
    trace = Trace(params, passes={f"p{i}": _moe_pass(f"p{i}", params, rng, 64) for i in range(50)})
    parsed = []
    members = names_module._members

    def counting(modules):
        modules = list(modules)
        parsed.append(len(modules))
        return members(modules)

    monkeypatch.setattr(names_module, "_members", counting)
    names_module._UNIVERSES.clear()
    found = trace.verdicts()
    gaps = [v for v in found if v.code == "COVERAGE_GAP"]
    assert len(gaps) == 49
    described = sum(len(v.evidence["only_a"]) + len(v.evidence["only_b"]) for v in gaps)
    # The universe once, then each gap's own names: far below 49 x every parameter (the old cost).
    assert sum(parsed) <= len(params) + 2 * described
    assert sum(parsed) < 49 * len(params) // 4


def test_a_copied_memo_or_a_saved_trace_starts_without_the_cache(tmp_path):
    import copy
    import pickle

    rng = random.Random(4)
    params = _moe_params(4)
    trace = Trace(params, passes={f"p{i}": _moe_pass(f"p{i}", params, rng, 4) for i in range(5)})
    first = _seen(trace.verdicts())
    assert len(memo_of(trace)) > 0
    kept = memo_of(trace)
    assert len(copy.deepcopy(kept)) == 0 and len(pickle.loads(pickle.dumps(kept))) == 0
    path = tmp_path / "t.json"
    trace.save(str(path))
    assert _seen(gradtrace.load(str(path)).verdicts()) == first


def test_a_pass_copied_with_replace_derives_its_figures_again():
    """gather() builds merged passes with dataclasses.replace: the cached figures of the local pass (here: no
    NaN) must not carry over to the merged one (the merged NONFINITE vanished: test_distributed)."""
    import dataclasses

    from gradtrace.records import GradRecord, PassTrace

    local = PassTrace(name="X", params=("a",), runs=1, kinds=["backward"])
    local.records = {"a": GradRecord("a", hits=1, norm=1.0, max_abs=1.0)}
    assert local.nonfinite == 0 and not local.nonfinite_in_backward_order()
    merged = dataclasses.replace(local, _records={"a": GradRecord("a", hits=1, norm=1.0, max_abs=1.0, nonfinite=3)},
                                 _columns=None, _covered=None)
    assert merged.nonfinite == 3 and [r.name for r in merged.nonfinite_in_backward_order()] == ["a"]
