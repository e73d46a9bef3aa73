"""Oracle tests: what gradtrace records equals what plain autograd computes.

For every model in the zoo, coverage, hit counts, norms, max-abs, zero flags,
non-finite counts and backward order of each pass are compared with
``torch.autograd.grad(..., allow_unused=True)`` and ``p.grad`` computed on an
independent copy of the model, outside ``watch``.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradtrace
from zoo import PassOracle, assert_pass_matches, oracle_backward, oracle_grad, trainable

X_SEEDS = (0, 1, 2)  # three microbatches for the X pass
Y_SEEDS = (10, 11)  # two for the Y pass


def _grad_all(model, loss):
    return torch.autograd.grad(loss, [p for _, p in trainable(model)], allow_unused=True)


@pytest.mark.parametrize("target", ["module", "named_parameters"])
def test_x_backward_and_y_grad_passes_match_oracle(zoo_case, target):
    name, model, make_inputs, loss_fn = zoo_case
    x_batches = [make_inputs(s) for s in X_SEEDS]
    y_batches = [make_inputs(s) for s in Y_SEEDS]
    want_x = oracle_backward(copy.deepcopy(model), x_batches, loss_fn)
    want_y = oracle_grad(copy.deepcopy(model), y_batches, loss_fn)
    assert want_x.covered, f"zoo model {name} reaches nothing: not a useful oracle"

    watched = model if target == "module" else list(model.named_parameters())
    with gradtrace.watch(watched) as trace:
        with trace.pass_("X"):
            for batch in x_batches:
                loss_fn(model, batch).backward()
        with trace.pass_("Y"):
            for batch in y_batches:
                _grad_all(model, loss_fn(model, batch))

    assert list(trace.passes) == ["X", "Y"]
    x, y = trace.passes["X"], trace.passes["Y"]
    assert x.runs == len(X_SEEDS) and y.runs == len(Y_SEEDS)
    assert not x.auto and not y.auto
    assert_pass_matches(x, want_x, via="backward")
    assert_pass_matches(y, want_y, via="grad")
    # .grad started empty in X; autograd.grad never writes .grad, so Y is never stale
    # even though X left .grad full.
    assert x.stale == set() and y.stale == set()
    assert "STALE_GRADS" not in {v.code for v in trace.verdicts()}


def test_runs_outside_pass_get_one_automatic_pass_each(zoo_case):
    name, model, make_inputs, loss_fn = zoo_case
    batches = [make_inputs(s) for s in (3, 4, 5)]
    ref = copy.deepcopy(model)
    wants = [
        oracle_backward(copy.deepcopy(ref), batches[:1], loss_fn),
        oracle_backward(copy.deepcopy(ref), batches[1:2], loss_fn),
        oracle_grad(copy.deepcopy(ref), batches[2:], loss_fn),
    ]

    with gradtrace.watch(model) as trace:
        loss_fn(model, batches[0]).backward()
        model.zero_grad(set_to_none=True)
        loss_fn(model, batches[1]).backward()
        _grad_all(model, loss_fn(model, batches[2]))

    names = list(trace.passes)
    assert len(names) == 3 and len(set(names)) == 3, names
    for pass_name, want, kind in zip(names, wants, ("backward", "backward", "grad"), strict=True):
        pt = trace.passes[pass_name]
        assert pt.auto, pass_name
        assert pt.runs == 1, pass_name
        assert pt.kinds == [kind], pass_name
        assert_pass_matches(pt, want, via=kind)


def test_backward_with_inputs_covers_only_the_requested(zoo_case):
    name, model, make_inputs, loss_fn = zoo_case
    names = [n for n, _ in trainable(model)]
    requested = set(names[::2])
    batches = [make_inputs(s) for s in (6, 7)]
    want = oracle_backward(copy.deepcopy(model), batches, loss_fn, inputs=requested)
    assert want.covered <= requested

    params = dict(model.named_parameters())
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            for batch in batches:
                loss_fn(model, batch).backward(inputs=[params[n] for n in names if n in requested])

    pt = trace.passes["X"]
    assert pt.runs == len(batches)
    assert_pass_matches(pt, want, via="backward")
    assert pt.missing == set(names) - want.covered
    for n in set(names) - requested:
        assert model.get_parameter(n).grad is None, f"{n} was not requested but got .grad"


class LargeParam(nn.Module):
    """Weights above 65,536 elements next to small ones, a frozen large one, and an unused one."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(6, 11_000)
        self.narrow = nn.Linear(11_000, 1)
        self.frozen = nn.Parameter(torch.randn(70_000), requires_grad=False)
        self.unused = nn.Parameter(torch.randn(70_000))
        self.zeroed = nn.Parameter(torch.randn(70_000))

    def forward(self, x):
        out = self.narrow(torch.tanh(self.wide(x))).mean()
        return out + (self.zeroed * 0.0).sum() + self.frozen[:3].sum()


def test_large_gradients_match_oracle():
    torch.manual_seed(0)
    model = LargeParam()
    batches = [torch.randn(2, 6, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    want_x = oracle_backward(copy.deepcopy(model), batches, lambda m, b: m(b))
    want_y = oracle_grad(copy.deepcopy(model), batches, lambda m, b: m(b))
    assert want_x.zero("zeroed") and "unused" in want_x.missing
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            for batch in batches:
                model(batch).backward()
        with trace.pass_("Y"):
            for batch in batches:
                _grad_all(model, model(batch))
    assert_pass_matches(trace.passes["X"], want_x, via="backward")
    assert_pass_matches(trace.passes["Y"], want_y, via="grad")


class ExtremeGrads(nn.Module):
    """Gradients of 1e-30 and 1e25: finite in float32, but their squares are not."""

    def __init__(self):
        super().__init__()
        self.tiny = nn.Parameter(torch.ones(4))
        self.tiny_large = nn.Parameter(torch.ones(70_000))
        self.huge = nn.Parameter(torch.ones(4))
        self.normal = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (
            (self.tiny * 1e-30).sum()
            + (self.tiny_large * 1e-30).sum()
            + (self.huge * 1e25).sum()
            + (self.normal * x).sum()
        )


def test_tiny_and_huge_gradients_keep_their_norm():
    model = ExtremeGrads()
    x = torch.randn(4)
    want = oracle_backward(copy.deepcopy(model), [x], lambda m, b: m(b))
    assert not want.zero("tiny") and want.max_abs("tiny") > 0
    assert want.nonfinite("huge") == 0
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            model(x).backward()
    pt = trace.passes["X"]
    assert pt.zero == set()
    assert pt.nonfinite == 0
    assert math.isclose(pt.records["tiny"].max_abs, 1e-30, rel_tol=1e-6)
    assert_pass_matches(pt, want, via="backward")


def test_grad_with_a_subset_of_inputs_covers_only_the_requested(zoo_case):
    name, model, make_inputs, loss_fn = zoo_case
    names = [n for n, _ in trainable(model)]
    requested = set(names[1::2]) or set(names)
    batches = [make_inputs(s) for s in (8, 9)]
    want = oracle_grad(copy.deepcopy(model), batches, loss_fn, inputs=requested)

    chosen = [p for n, p in trainable(model) if n in requested]
    with gradtrace.watch(model) as trace:
        with trace.pass_("Y"):
            for batch in batches:
                torch.autograd.grad(loss_fn(model, batch), chosen, allow_unused=True)

    assert_pass_matches(trace.passes["Y"], want, via="grad")
    assert trace.passes["Y"].covered <= requested


def test_retain_graph_backward_twice_is_two_runs(zoo_case):
    name, model, make_inputs, loss_fn = zoo_case
    batch = make_inputs(12)
    want = oracle_backward(copy.deepcopy(model), [batch, batch], loss_fn)
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            loss = loss_fn(model, batch)
            loss.backward(retain_graph=True)
            loss.backward()
    assert trace.passes["X"].runs == 2
    assert_pass_matches(trace.passes["X"], want, via="backward")


def test_functional_backward_with_grad_tensors(zoo_case):
    """``torch.autograd.backward`` on a non-scalar output with explicit ``grad_tensors``."""
    name, model, make_inputs, loss_fn = zoo_case
    batch = make_inputs(13)

    def weighted(m, b):
        return (m(b) * torch.linspace(-1.0, 1.0, m(b).shape[-1])).sum()

    want = oracle_backward(copy.deepcopy(model), [batch], weighted)
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            out = model(batch)
            torch.autograd.backward([out], [torch.linspace(-1.0, 1.0, out.shape[-1]).expand_as(out)])
    assert trace.passes["X"].runs == 1
    assert_pass_matches(trace.passes["X"], want, via="backward")


@pytest.mark.parametrize("where", ["earlier_pass", "before_watch"])
def test_stale_grad_records_what_the_pass_added(zoo_case, where):
    name, model, make_inputs, loss_fn = zoo_case
    first, second = make_inputs(20), make_inputs(21)
    ref = copy.deepcopy(model)
    oracle_backward(ref, [first], loss_fn)  # leaves .grad full, like the watched model
    stale_want = {
        n for n, p in trainable(ref) if p.grad is not None and bool((p.grad != 0).any())
    }
    want = oracle_backward(ref, [second], loss_fn)  # what .grad gains in the stale pass
    stale_want &= want.covered

    if where == "before_watch":
        loss_fn(model, first).backward()
    with gradtrace.watch(model) as trace:
        if where == "earlier_pass":
            with trace.pass_("fresh"):
                loss_fn(model, first).backward()
        with trace.pass_("again", step_start=True):  # starts an optimizer step: stale .grad is judged
            loss_fn(model, second).backward()  # no zero_grad in between

    pt = trace.passes["again"]
    assert_pass_matches(pt, want, via="backward")
    assert pt.stale == stale_want
    if where == "earlier_pass":
        assert trace.passes["fresh"].stale == set()
    stale_verdicts = [v for v in trace.verdicts() if v.code == "STALE_GRADS"]
    if stale_want:
        assert stale_verdicts, "stale .grad not reported"
        evidence = " ".join(str(v.evidence) + v.message for v in stale_verdicts)
        assert "again" in evidence
        assert any(n in evidence for n in stale_want)
        if where == "earlier_pass":
            assert "fresh" not in " ".join(str(v.evidence) for v in stale_verdicts)
    else:
        assert not stale_verdicts


def test_zeroed_grads_are_not_stale(zoo_case):
    name, model, make_inputs, loss_fn = zoo_case
    with gradtrace.watch(model) as trace:
        with trace.pass_("first"):
            loss_fn(model, make_inputs(0)).backward()
        model.zero_grad(set_to_none=False)  # .grad tensors exist, all zeros
        with trace.pass_("second"):
            loss_fn(model, make_inputs(1)).backward()
        model.zero_grad(set_to_none=True)
        with trace.pass_("third"):
            loss_fn(model, make_inputs(2)).backward()
    for pt in trace.passes.values():
        assert pt.stale == set(), pt.name
    assert "STALE_GRADS" not in {v.code for v in trace.verdicts()}


class NonFinite(nn.Module):
    """``w`` has one element at zero (sqrt' = inf there); ``u`` only feeds ``sqrt(u * 0)`` (NaN)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.0, 1.0, 4.0, 9.0]))
        self.u = nn.Parameter(torch.ones(3))
        self.v = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (self.v * x).sum() + torch.sqrt(self.w).sum() + torch.sqrt(self.u * 0.0).sum()


def _nonfinite_loss(model, x):
    return model(x)


def _nonfinite_input(seed):
    return torch.randn(4, generator=torch.Generator().manual_seed(seed))


def test_nonfinite_counts_match_oracle():
    model = NonFinite()
    batches = [_nonfinite_input(s) for s in (0, 1)]
    want_x = oracle_backward(copy.deepcopy(model), batches[:1], _nonfinite_loss)
    want_y = oracle_grad(copy.deepcopy(model), batches[:1], _nonfinite_loss)
    want_x2 = oracle_grad(copy.deepcopy(model), batches, _nonfinite_loss)
    assert want_x.nonfinite("w") == 1 and want_x.nonfinite("u") == 3 and want_x.nonfinite("v") == 0

    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            _nonfinite_loss(model, batches[0]).backward()
        model.zero_grad(set_to_none=True)
        with trace.pass_("Y"):
            _grad_all(model, _nonfinite_loss(model, batches[0]))
        with trace.pass_("X2"):
            for batch in batches:
                _nonfinite_loss(model, batch).backward()

    assert_pass_matches(trace.passes["X"], want_x, via="backward")
    assert_pass_matches(trace.passes["Y"], want_y, via="grad")
    x2 = trace.passes["X2"]
    assert x2.covered == want_x2.covered
    for n in want_x2.covered:
        assert (x2.records[n].nonfinite > 0) == (want_x2.nonfinite(n) > 0), n
        assert not x2.records[n].zero

    verdicts = [v for v in trace.verdicts() if v.code == "NONFINITE"]
    assert verdicts, "NaN/Inf gradients not reported"
    first = next(n for n in want_x.order if want_x.nonfinite(n))
    text = " ".join(str(v.evidence) + " " + v.message for v in verdicts)
    assert first in text and "X" in text
    assert all(v.severity == "error" for v in verdicts)


class Checkpointed(nn.Module):
    """A segment under activation checkpointing between a stem and a head."""

    def __init__(self, use_reentrant: bool, frozen_stem: bool):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.stem = nn.Linear(6, 6)
        self.stem.requires_grad_(not frozen_stem)
        self.segment = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        h = checkpoint(self.segment, h, use_reentrant=self.use_reentrant)
        return self.head(h).pow(2).mean()


def _oracle_from_dot_grad(model, batches):
    """Backward-only oracle: reached <=> ``.grad`` was written (zeros count as written).

    ``autograd.grad`` cannot be the oracle here: reentrant checkpointing refuses it.
    """
    params = trainable(model)
    order = []
    handles = [
        p.register_hook(lambda g, _n=n: order.append(_n) if _n not in order else None)
        for n, p in params
    ]
    try:
        for batch in batches:
            model(batch).backward()
    finally:
        for h in handles:
            h.remove()
    totals = {n: p.grad.clone() for n, p in params if p.grad is not None}
    return PassOracle([n for n, _ in params], totals, {n: len(batches) for n in totals}, order)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("frozen_stem", [False, True], ids=["trainable_stem", "frozen_stem"])
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpointed_segment_backward_matches_oracle(use_reentrant, frozen_stem):
    torch.manual_seed(0)
    model = Checkpointed(use_reentrant, frozen_stem)
    batches = [torch.randn(4, 6, generator=torch.Generator().manual_seed(s)) for s in X_SEEDS]
    want = _oracle_from_dot_grad(copy.deepcopy(model), batches)
    segment = {n for n, _ in trainable(model) if n.startswith("segment.")}
    # reentrant checkpointing with no grad-requiring input silently drops the segment
    assert (segment <= want.covered) != (use_reentrant and frozen_stem)

    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            for batch in batches:
                model(batch).backward()

    pt = trace.passes["X"]
    assert pt.runs == len(batches), "nested (reentrant) engine runs must not count as runs"
    assert_pass_matches(pt, want, via="backward")


def test_sparse_embedding_gradients_over_repeated_passes():
    # A sparse .grad is reduced over its values; the grouping cache must not compare tensors with ==.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 4, sparse=True), nn.Linear(4, 1))
    ids = torch.tensor([[1, 2, 3], [3, 4, 5]])
    with gradtrace.watch(model) as trace:
        for step in range(3):
            model.zero_grad(set_to_none=True)
            with trace.pass_(f"step{step}"):
                model(ids).sum().backward()
            record = trace.passes[f"step{step}"].records["0.weight"]
            values = model[0].weight.grad.coalesce().values()
            assert math.isclose(record.norm, values.norm().item(), rel_tol=1e-5)
            assert math.isclose(record.max_abs, values.abs().max().item(), rel_tol=1e-6)
