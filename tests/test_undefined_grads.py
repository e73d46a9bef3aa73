"""Parameters the engine reached with a None gradient: a backward on the way returned None for them.

A custom ``torch.autograd.Function`` whose backward returns None for a parameter input leaves that
parameter in the backward graph (nothing cut it off), yet it never gets a gradient. Before, gradtrace
said only "received no gradient" (UNUSED_PARAMS, naming a root-level parameter "(root)") or blamed a
cut output (DETACHED_OUTPUT "a .detach() / .data, argmax ..."). The parameter's hook is called with
None in exactly this case: the pass remembers it (``PassTrace.undefined_grads``) and the coverage
verdicts say what it means.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradtrace
from gradtrace.analysis.names import describe_params
from zoo import classify_steps


class ScaleBy(torch.autograd.Function):
    """x * w, with a backward that forgets w's gradient unless ``fixed``."""

    @staticmethod
    def forward(ctx, x, w, fixed):
        ctx.save_for_backward(x, w)
        ctx.fixed = fixed
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0) if ctx.fixed else None, None


class Gated(nn.Module):
    def __init__(self, fixed: bool):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.gate = nn.Parameter(torch.ones(8))  # the model's own parameter, no submodule
        self.head = nn.Linear(8, 3)
        self.fixed = fixed

    def forward(self, x):
        return self.head(ScaleBy.apply(self.inp(x), self.gate, self.fixed))


def _train(model):
    return classify_steps(model, steps=3, opt=torch.optim.AdamW(model.parameters(), lr=1e-3), classes=3)


def test_a_parameter_a_custom_backward_returns_none_for_is_named_with_why():
    torch.manual_seed(0)
    model = Gated(fixed=False)
    loss = F.cross_entropy(model(torch.randn(4, 8)), torch.randint(0, 3, (4,)))
    oracle = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert [n for (n, _), g in zip(model.named_parameters(), oracle, strict=True) if g is None] == ["gate"]

    trace = _train(model)
    assert all(p.undefined_grads == ["gate"] for p in trace.passes.values())
    assert all("gate" not in p.covered for p in trace.passes.values())
    first = trace.verdicts()[0]
    assert first.code == "UNUSED_PARAMS" and first.evidence["undefined_grads"] == ["gate"]
    assert "'gate' (the model's own parameter)" in first.message  # not "(root)"
    assert "in the backward graph" in first.message and "autograd.Function" in first.message
    assert not any(v.code == "DETACHED_OUTPUT" for v in trace.verdicts())


def test_the_fixed_backward_is_clean_and_records_no_undefined_gradient():
    trace = _train(Gated(fixed=True))
    assert all(p.undefined_grads is None for p in trace.passes.values())
    assert [v for v in trace.verdicts() if v.severity in ("error", "warning")] == []


class StopEverything(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return None


def test_a_backward_returning_none_above_the_model_is_no_coverage_not_a_cut(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with gradtrace.watch(model) as trace:
        StopEverything.apply(model(torch.randn(3, 4))).sum().backward()
    names = sorted(n for n, _ in model.named_parameters())
    (only,) = trace.passes.values()
    assert only.undefined_grads == names and not only.covered
    assert all(p.grad is None for p in model.parameters())  # the oracle: nothing arrived
    first = trace.verdicts()[0]
    assert first.code == "NO_COVERAGE" and "in the backward graph" in first.message
    assert "detach" not in first.message
    trace.save(tmp_path / "t.json")
    loaded = gradtrace.load(tmp_path / "t.json")
    assert loaded.passes[only.name].undefined_grads == names
    assert loaded.verdicts()[0].message == first.message


def test_a_pass_through_the_broken_function_against_one_without_it_names_the_gap_cause():
    torch.manual_seed(0)
    model = Gated(fixed=False)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            F.cross_entropy(model.head(model.inp(x) * model.gate), y).backward()  # plain ops
        model.zero_grad()
        with trace.pass_("Y"):
            F.cross_entropy(model(x), y).backward()  # through ScaleBy
    gap = next(v for v in trace.verdicts() if v.code == "COVERAGE_GAP")
    assert gap.evidence["only_a"] == ["gate"]
    assert "in the backward graph" in gap.message and "returned None" in gap.message
    assert trace.passes["Y"].undefined_grads == ["gate"] and trace.passes["X"].undefined_grads is None


@pytest.mark.parametrize("names, shown", [
    (["gate"], "'gate' (the model's own parameter)"),
    (["gate", "scale"], "'gate', 'scale' (the model's own parameters)"),
    (["gate", "inp.weight"], "'gate' (the model's own parameter), inp (1 param)"),
])
def test_root_level_parameters_are_named_themselves(names, shown):
    assert describe_params(names) == shown


@pytest.mark.slow  # torch.compile (aot_eager): seconds
def test_under_torch_compile_a_none_gradient_points_at_a_cut_in_the_compiled_region_first():
    """aot_autograd's compiled backward returns None for parameters a .detach() inside the region cut off:
    the same None a custom Function gives. Under compile the cut is named first (review of 6765ec2)."""
    torch.manual_seed(0)

    class Cut(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.head(torch.tanh(self.embed(x)).detach())

    model = torch.compile(Cut(), backend="aot_eager")
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            model(torch.randn(4, 8)).pow(2).mean().backward()
    assert trace.meta.compiled
    first = trace.verdicts()[0]
    assert first.code == "UNUSED_PARAMS" and "under torch.compile" in first.message
    assert first.message.index("compiled region") < first.message.index("autograd.Function")
