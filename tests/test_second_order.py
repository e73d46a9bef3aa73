"""Second-order gradients inside a pass: ``create_graph=True`` in both pass kinds (issue 19 item 6).

MAML, gradient penalties and Hessian-vector products differentiate through
gradients: the gradients handed back (or left in ``.grad``) require grad
themselves. Recording them used to raise ``RuntimeError: Can't call numpy() on
Tensor that requires grad`` from the statistics and stop training. Every
figure here is checked against ``torch.autograd.grad`` on an identical copy,
with both reductions.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gradtrace


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=g)


def _assert_figures(pt, names, grads):
    """The pass's records equal the oracle gradients ``grads`` (one per name)."""
    assert pt.covered == set(names)
    for name, g in zip(names, grads, strict=True):
        g = g.detach().double()
        record = pt.records[name]
        assert math.isclose(record.norm, g.norm().item(), rel_tol=1e-6), name
        assert record.max_abs == pytest.approx(g.abs().max().item(), rel=1e-6), name
        assert not record.zero and not record.cleared and record.nonfinite == 0, name


def _first_order():
    """A model, an identical oracle copy, the names, a batch, and the oracle's first-order gradients."""
    model = _model()
    oracle = copy.deepcopy(model)
    x = _batch()
    want = torch.autograd.grad(oracle(x).pow(2).mean(), list(oracle.parameters()))
    return model, oracle, [n for n, _ in model.named_parameters()], x, want


@pytest.fixture(params=["auto", "device"])
def statistics(request):
    return request.param


def test_autograd_grad_with_create_graph_is_recorded(statistics):
    """MAML's inner step: gradients handed back with their graph, then differentiated again."""
    model, oracle, names, x, want = _first_order()
    with gradtrace.watch(model, statistics=statistics) as trace:
        with trace.pass_("inner"):
            params = list(model.parameters())
            grads = torch.autograd.grad(model(x).pow(2).mean(), params, create_graph=True)
        assert all(g.requires_grad for g in grads)  # still differentiable: gradtrace took nothing away
        fast = [p - 0.1 * g for p, g in zip(params, grads, strict=True)]
        with trace.pass_("outer"):
            y = torch.func.functional_call(model, dict(zip(names, fast, strict=True)), (_batch(1),))
            y.pow(2).mean().backward()
    _assert_figures(trace.passes["inner"], names, want)
    # The outer pass: the meta-gradient through the inner step, as plain autograd gives it.
    o_params = list(oracle.parameters())
    o_grads = torch.autograd.grad(oracle(x).pow(2).mean(), o_params, create_graph=True)
    o_fast = [p - 0.1 * g for p, g in zip(o_params, o_grads, strict=True)]
    meta = torch.autograd.grad(torch.func.functional_call(oracle, dict(zip(names, o_fast, strict=True)), (_batch(1),))
                               .pow(2).mean(), o_params)
    _assert_figures(trace.passes["outer"], names, meta)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, dict(zip(names, meta, strict=True))[name])  # and the training itself is unchanged


def test_backward_with_create_graph_is_recorded(statistics):
    """``.backward(create_graph=True)`` leaves a ``.grad`` that requires grad."""
    model, oracle, names, x, want = _first_order()
    with gradtrace.watch(model, statistics=statistics) as trace:
        with trace.pass_("X"):
            model(x).pow(2).mean().backward(create_graph=True)
        assert all(p.grad.requires_grad for p in model.parameters())
        penalty = sum(p.grad.pow(2).sum() for p in model.parameters())  # the gradients still differentiable
        model.zero_grad(set_to_none=True)
        with trace.pass_("penalty"):
            penalty.backward()
    _assert_figures(trace.passes["X"], names, want)
    o_params = list(oracle.parameters())
    o_grads = torch.autograd.grad(oracle(x).pow(2).mean(), o_params, create_graph=True)
    want_penalty = torch.autograd.grad(sum(g.pow(2).sum() for g in o_grads), o_params)
    _assert_figures(trace.passes["penalty"], names, want_penalty)


def test_gradient_penalty_on_inputs_then_backward(statistics):
    """WGAN-GP: the penalty's gradient is taken with respect to the inputs, inside the pass."""
    model = _model()
    oracle = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]

    def loss(m, x):
        x = x.clone().requires_grad_(True)
        out = m(x)
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return out.mean() + 10 * (gx.norm(dim=1) - 1).pow(2).mean()

    want = torch.autograd.grad(loss(oracle, _batch()), list(oracle.parameters()))
    with gradtrace.watch(model, statistics=statistics) as trace:
        with trace.pass_("critic"):
            loss(model, _batch()).backward()
    pt = trace.passes["critic"]
    # The penalty's autograd.grad asks for the inputs only: no watched hook fires, so the pass holds one run.
    assert pt.runs == 1 and pt.kinds == ["backward"]
    _assert_figures(pt, names, want)


def test_hessian_vector_product_passes(statistics):
    """g = grad(L, create_graph=True), then Hv = grad(g . v): each pass's figures are what it handed back."""
    model = _model()
    oracle = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    vs = [torch.ones_like(p) for p in model.parameters()]

    def hvp(m, trace=None):
        params = list(m.parameters())
        with trace.pass_("grad") if trace else torch.enable_grad():
            grads = torch.autograd.grad(m(_batch()).pow(2).mean(), params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vs, strict=True))
        with trace.pass_("hvp") if trace else torch.enable_grad():
            return grads, torch.autograd.grad(dot, params)

    want_g, want_hv = hvp(oracle)
    with gradtrace.watch(model, statistics=statistics, keep_grads=True) as trace:
        hvp(model, trace)
    _assert_figures(trace.passes["grad"], names, want_g)
    _assert_figures(trace.passes["hvp"], names, want_hv)
    kept = trace._recording.kept
    assert not any(g.requires_grad for g in kept["grad"].values())  # kept copies hold no graph
    assert torch.equal(kept["hvp"][names[0]], want_hv[0])
    assert trace.diff("grad", "hvp").inner is not None
