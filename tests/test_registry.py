"""The verdict registry: every code declared once, produced by a scenario, documented in the README.

Scenarios are built from plain records (what a loaded trace holds), so each
check is exercised on exactly the data it judges, in milliseconds.
"""
import re
from pathlib import Path

import pytest

import gradtrace
from gradtrace.analysis.registry import REGISTRY, markdown_table, ordered, verdict
from gradtrace.records import (Cut, GradRecord, IgnoredFreeze, LooseTensor, OptimizerRecord, PassTrace, ScalarRecord, TensorGradFacts,
                               TensorRecord, TiedParams, UnregisteredModule, ValueStats)

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ("body.weight", "body.bias", "head.weight")


def passes(*items):
    return {p.name: p for p in items}


def a_pass(name, reached=PARAMS, auto=False, **changes):
    """A pass whose reached parameters each got a healthy gradient, unless ``changes`` says otherwise."""
    p = PassTrace(name=name, params=PARAMS, runs=1, kinds=["backward"], auto=auto)
    records = {}
    for order, param in enumerate(reached):
        fields = dict(name=param, hits=1, norm=1.0, max_abs=0.5, order=order)
        fields.update(changes.get(param, {}))
        records[param] = GradRecord(**fields)
    p.records = records
    return p


def failed_pass(name, error):
    p = a_pass(name)
    p.failed = error
    return p


def unknown_pass(name, because):
    p = a_pass(name, **{"head.weight": {"norm": 0.0, "max_abs": 0.0, "cleared": True}})
    p.unknown_because = because
    return p


def trace(passes_=None, meta=None, **parts):
    return gradtrace.Trace(PARAMS, meta=meta or {}, passes=passes(a_pass("X")) if passes_ is None else passes_,
                           **parts)


def accumulation_reset():
    """Two optimizer steps of two microbatches each, zero_grad() before every backward: the second run of
    each step began on cleared gradients."""
    out = []
    for i in range(1, 5):
        p = a_pass(f"backward-{i}", auto=True, **{"head.weight": {"norm": float(i)}})
        p.grads_reset = 1 if i % 2 == 0 else None
        out.append(p)
    return out


def data_tensor(name, dtype="float32", **values):
    return TensorRecord(name=name, calls=1, dtype=dtype, values=ValueStats(**values))


SCENARIOS = {
    "NONFINITE": lambda: trace(passes(a_pass("X", **{"head.weight": {"nonfinite": 3}}))),
    "TENSOR_NO_GRAD": lambda: trace(tensors={"S": TensorRecord(name="S", calls=1, expect_grad=True)}),
    "GRAPH_CUT": lambda: trace(passes(a_pass("X"), a_pass("Y", reached=("head.weight",))),
                               cuts=[Cut(kind="no_grad", module="body", location="probe.py:3", pass_name="Y",
                                         params=2)]),
    "STALE_GRADS": lambda: trace(passes(a_pass("X", **{"body.bias": {"stale": True}}))),
    "CONSTANT_ROWS": lambda: trace(tensors={"A": data_tensor("A", numel=8, min=0.5, max=0.5, rows=4,
                                                             constant_rows=4)}),
    "ALL_ZERO_VALUES": lambda: trace(tensors={"mask": data_tensor("mask", "bool", numel=8, zeros=8)}),
    "TENSOR_NOT_REACHED": lambda: trace(tensors={"S": TensorRecord(name="S", calls=1, requires_grad=True,
                                                                   requires_grad_calls=1, passes=["X"])}),
    "NO_COVERAGE": lambda: trace(passes(a_pass("X", reached=()))),
    "COVERAGE_GAP": lambda: trace(passes(a_pass("X"), a_pass("Y", reached=("head.weight",)))),
    "ZERO_UPSTREAM": lambda: trace(tensors={"S": TensorRecord(
        name="S", calls=1, requires_grad=True, requires_grad_calls=1, passes=["X"],
        grads={"X": TensorGradFacts(hits=1)})}),
    "ZERO_GRADS": lambda: trace(passes(a_pass("X", **{p: {"norm": 0.0, "max_abs": 0.0, "zero": True}
                                                     for p in PARAMS}))),
    "RANK_DIVERGENCE": lambda: trace(rank_coverage={"X": {0: list(PARAMS), 1: ["head.weight"]}}),
    "ROUNDS_TO_ZERO": lambda: trace(scalars={"deltaH1": ScalarRecord(name="deltaH1", value=-2e-8)}),
    "TINY_GRADS": lambda: trace(passes(a_pass("X", **{p: {"norm": 1e-8, "max_abs": 1e-8} for p in PARAMS}))),
    "UNUSED_PARAMS": lambda: trace(passes(a_pass("X", reached=("body.weight", "body.bias")))),
    "PASS_FAILED": lambda: trace(passes(failed_pass("X", "RuntimeError: boom"))),
    "FROZEN_WHILE_WATCHED": lambda: trace(meta={"frozen_while_watched": ["head.weight"]}),
    "PARAMS_REPLACED": lambda: trace(passes(a_pass("X", reached=("body.weight", "body.bias"))),
                                     meta={"replaced_params": {"head.weight": "replaced"}}),
    "NO_PASSES": lambda: trace({}, meta={"forward_calls": 3}),
    "CLEARED_GRADS": lambda: trace(passes(a_pass("X", **{"head.weight": {"norm": 0.0, "max_abs": 0.0,
                                                                         "cleared": True}}))),
    "EMPTY_ROWS": lambda: trace(tensors={"gen_mask": TensorRecord(
        name="gen_mask", calls=1, dtype="bool", values=ValueStats(numel=32, zeros=20),
        row_facts={"rows": 4, "empty_rows": 1, "selected_min": 0, "selected_max": 5, "selected_sum": 12})}),
    "MASK_ON_PADDING": lambda: trace(tensors={"gen_mask": TensorRecord(
        name="gen_mask", calls=1, dtype="bool", values=ValueStats(numel=32, zeros=20),
        row_facts={"rows": 4, "empty_rows": 0, "selected_min": 3, "selected_max": 3, "selected_sum": 12,
                   "on_padding": 2, "empty_with_tokens": 0, "left_padded": 3, "right_padded": 0})}),
    "UNREGISTERED_MODULE": lambda: trace(meta={"unregistered_modules": [UnregisteredModule(
        module="body.layers[0]", module_type="Linear", owner="body", attribute="layers", container="list",
        called_in="body", calls=1, params=2, trainable=2, with_grad=True, got_grad=True)]}),
    "UNREGISTERED_PARAM": lambda: trace(meta={"loose_tensors": [LooseTensor(
        name="scales[0]", owner="", attribute="scales", container="list", shape=[4], is_parameter=True,
        got_grad=True, in_optimizer=False)]}),
    "FREEZE_IGNORED": lambda: trace(meta={"ignored_freezes": [IgnoredFreeze(
        module="body", module_type="Linear", trainable=2, got_grad=True)]}),
    "TIED_FROZEN": lambda: trace(meta={"tied_params": [TiedParams(names=["embed.weight", "lm_head.weight"],
                                                                  requires_grad=False, shape=[8, 4])]}),
    "FIGURES_UNKNOWN": lambda: trace(passes(unknown_pass("X", "a sync averaged it with no_sync microbatches"))),
    "FLAT_PARAMS": lambda: gradtrace.Trace(("_flat_param",), meta={"wrapper": "FSDP1", "flat_params": True},
                                           passes={}),
    "DETACHED_OUTPUT": lambda: gradtrace.Trace(PARAMS, meta={"ran_with_grad": ["body", "head"]},
                                               passes=passes(a_pass("X", reached=("body.weight", "body.bias")))),
    "NOT_IN_OPTIMIZER": lambda: trace(optimizers={"SGD#0": OptimizerRecord(
        name="SGD#0", params=["body.weight", "body.bias"], lrs=[0.1], steps=1, passes={"X": 1})}),
    "WEIGHTS_UNCHANGED": lambda: trace(optimizers={"AdamW#0": OptimizerRecord(
        name="AdamW#0", params=list(PARAMS), lrs=[1e-5], steps=3, passes={"X": 3},
        updates={p: [3.0, 3.0, 0.0, 1.0, 0.0] for p in PARAMS}, dtypes=dict.fromkeys(PARAMS, "bfloat16"))}),
    "TINY_UPDATES": lambda: trace(optimizers={"SGD#0": OptimizerRecord(
        name="SGD#0", params=list(PARAMS), lrs=[1e-9], steps=2, passes={"X": 2}, max_ratio=1e-10,
        updates={p: [2.0, 0.0, 1e-20, 1.0, 1e-10] for p in PARAMS}, dtypes=dict.fromkeys(PARAMS, "float32"))}),
    "ACCUMULATION_RESET": lambda: trace(passes(*accumulation_reset()), optimizers={"SGD#0": OptimizerRecord(
        name="SGD#0", params=list(PARAMS), lrs=[0.1], steps=2, passes={"backward-2": 1, "backward-4": 1})}),
    "CLIP_BEFORE_UNSCALE": lambda: trace(passes(a_pass("X", **{p: {"norm": 1e3} for p in PARAMS})),
                                         optimizers={"SGD#0": OptimizerRecord(
        name="SGD#0", params=list(PARAMS), lrs=[0.1], steps=1, passes={"X": 1},
        scaled_steps=[["X", 1.0 / 65536, 65536.0]])}),
}


def test_every_registered_code_has_a_scenario():
    assert set(SCENARIOS) == set(REGISTRY)


@pytest.mark.parametrize("code", list(SCENARIOS), ids=list(SCENARIOS))
def test_each_check_fires_on_its_scenario_with_a_declared_severity(code):
    found = SCENARIOS[code]().verdicts()
    assert code in [v.code for v in found]
    for v in found:
        assert v.severity in REGISTRY[v.code].severities, (v.code, v.severity)


def test_a_healthy_trace_gives_nothing():
    assert trace().verdicts() == []


def test_ranks_order_root_causes_first():
    ranks = [kind.rank for kind in ordered()]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    found = SCENARIOS["GRAPH_CUT"]().verdicts()
    assert [v.code for v in found][:2] == ["GRAPH_CUT", "COVERAGE_GAP"]  # the cut explains the gap


def test_a_code_or_rank_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="twice"):
        verdict("NONFINITE", rank=999, severities=("error",), meaning="again")(lambda *a: [])
    with pytest.raises(ValueError, match="rank"):
        verdict("NEW_CODE", rank=REGISTRY["NONFINITE"].rank, severities=("error",), meaning="m")(lambda *a: [])
    with pytest.raises(ValueError, match="severities"):
        verdict("NEW_CODE", rank=998, severities=("fatal",), meaning="m")


def test_readme_verdict_table_is_the_registry():
    """docs/how-it-decides.md includes this table from the README (a snippet), so there is one copy."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- verdicts:start -->\n(.*?)\n<!-- verdicts:end -->", readme, flags=re.S)
    assert match, "README.md has no generated verdict table (between <!-- verdicts:start/end --> markers)"
    assert match.group(1).strip() == markdown_table(), (
        "README's verdict table is stale; regenerate it with:\n"
        "python -c 'from gradtrace.analysis.registry import markdown_table; print(markdown_table())'")
