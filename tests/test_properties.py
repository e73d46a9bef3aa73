"""Property test: random graphs with random cuts, checked against plain autograd.

Hypothesis draws a small DAG of ops (matmul, add, mul, tanh, sum) over a handful
of 3x3 parameters (some frozen, some never used) and an input, and cuts edges at
random: ``detach``, ``no_grad``, an integer cast, ``round`` (differentiable, zero
gradient) and multiply-by-zero; a data-dependent branch makes microbatches reach
different parameters. gradtrace's coverage, zero flags, hits and norms
must equal the oracle's for ``.backward()`` and for
``torch.autograd.grad(allow_unused=True)``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import List, Tuple

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import gradtrace
from zoo import oracle_backward, oracle_grad, trainable

OPS = ("matmul", "add", "mul", "tanh", "sum", "branch")
CUTS = ("none", "none", "none", "detach", "no_grad", "int_cast", "round", "times_zero")
SHAPE = (3, 3)


@dataclass(frozen=True)
class GraphSpec:
    n_params: int
    frozen: Tuple[bool, ...]
    steps: Tuple[Tuple[str, int, int, str], ...]  # (op, lhs node, rhs node, cut)
    outputs: Tuple[int, ...]  # nodes summed into the loss
    seed: int
    microbatches: int


@st.composite
def graph_specs(draw):
    n_params = draw(st.integers(1, 5))
    frozen = tuple(
        draw(st.lists(st.sampled_from([False, False, True]), min_size=n_params, max_size=n_params))
    )
    n_steps = draw(st.integers(1, 7))
    steps = []
    for i in range(n_steps):
        available = n_params + 1 + i  # parameters, the input, earlier results
        steps.append(
            (
                draw(st.sampled_from(OPS)),
                draw(st.integers(0, available - 1)),
                draw(st.integers(0, available - 1)),
                draw(st.sampled_from(CUTS)),
            )
        )
    n_nodes = n_params + 1 + n_steps
    outputs = draw(
        st.lists(st.integers(0, n_nodes - 1), min_size=1, max_size=3, unique=True).map(
            lambda xs: tuple(sorted(xs))
        )
    )
    # bias toward the last result so that most graphs are deep
    if draw(st.booleans()) and n_nodes - 1 not in outputs:
        outputs = outputs + (n_nodes - 1,)
    return GraphSpec(
        n_params,
        frozen,
        tuple(steps),
        outputs,
        draw(st.integers(0, 2**16)),
        draw(st.integers(1, 3)),
    )


class RandomGraph(nn.Module):
    def __init__(self, spec: GraphSpec):
        super().__init__()
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed)
        for i in range(spec.n_params):
            p = nn.Parameter(torch.randn(SHAPE, generator=g) * 0.7)
            p.requires_grad_(not spec.frozen[i])
            setattr(self, f"p{i}", p)

    def forward(self, x):
        nodes: List[torch.Tensor] = [getattr(self, f"p{i}") for i in range(self.spec.n_params)]
        nodes.append(x)
        for op, a, b, cut in self.spec.steps:
            lhs, rhs = nodes[a], nodes[b]
            if op == "branch":  # data-dependent: microbatches may reach different parameters
                lhs, rhs = (lhs, lhs) if float(x[0, 0]) > 0 else (rhs, rhs)
                op = "add"
            if cut == "no_grad":
                with torch.no_grad():
                    out = _apply(op, lhs, rhs)
            else:
                out = _apply(op, lhs, rhs)
            if cut == "detach":
                out = out.detach()
            elif cut == "int_cast":
                out = (out * 4).to(torch.int64).to(out.dtype)
            elif cut == "round":
                out = torch.round(out * 4)
            elif cut == "times_zero":
                out = out * 0.0
            nodes.append(out)
        return sum(nodes[i].sum() for i in self.spec.outputs)


def _apply(op, lhs, rhs):
    if op == "matmul":
        return lhs @ rhs
    if op == "add":
        return lhs + rhs
    if op == "mul":
        return lhs * rhs
    if op == "tanh":
        return torch.tanh(lhs)
    return lhs.sum(dim=1, keepdim=True) + rhs  # "sum"


def _loss(model, x):
    return model(x)


def _inputs(spec: GraphSpec):
    g = torch.Generator().manual_seed(spec.seed + 1)
    return [torch.randn(SHAPE, generator=g) for _ in range(spec.microbatches)]


def _check(pt, want):
    assert pt.covered == want.covered
    assert pt.missing == want.missing
    assert pt.zero == {n for n in want.covered if want.zero(n)}
    for n in want.covered:
        rec = pt.records[n]
        assert rec.hits == want.hits[n], n
        assert rec.nonfinite == want.nonfinite(n), n
        if want.nonfinite(n) == 0:
            assert math.isclose(rec.norm, want.norm(n), rel_tol=1e-5), (n, rec.norm, want.norm(n))
            assert math.isclose(rec.max_abs, want.max_abs(n), rel_tol=1e-5), n


def _run(spec: GraphSpec, cuts: str):
    model = RandomGraph(spec)
    batches = _inputs(spec)
    # a fully cut graph cannot be backpropagated at all
    assume(all(model(x).requires_grad for x in batches))
    want_x = oracle_backward(copy.deepcopy(model), batches, _loss)
    want_y = oracle_grad(copy.deepcopy(model), batches, _loss)
    params = [p for _, p in trainable(model)]

    with gradtrace.watch(model, cuts=cuts) as trace:
        with trace.pass_("X"):
            for x in batches:
                _loss(model, x).backward()
        with trace.pass_("Y"):
            for x in batches:
                torch.autograd.grad(_loss(model, x), params, allow_unused=True)

    _check(trace.passes["X"], want_x)
    _check(trace.passes["Y"], want_y)


PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@PROPERTY_SETTINGS
@given(spec=graph_specs())
def test_random_graph_matches_oracle(spec):
    _run(spec, "modules")


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(spec=graph_specs())
@pytest.mark.parametrize("cuts", ["ops", "off"])
def test_random_graph_matches_oracle_in_every_cut_mode(spec, cuts):
    _run(spec, cuts)
