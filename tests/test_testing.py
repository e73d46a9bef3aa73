"""gradtrace.testing.assert_grads_flow and the gradtrace_flow fixture."""
import copy

import pytest
import torch
from torch import nn

import gradtrace
from gradtrace.pytest_plugin import gradtrace_flow  # noqa: F401  (the fixture, as a conftest.py would)
from gradtrace.testing import assert_grads_flow
from zoo import DetachedBranch, LoRAModel, UnusedHead, _features


def mse(model, x):
    return model(x).pow(2).mean()


def oracle_unreached(model, x):
    """Trainable parameters plain autograd gives None, on an independent copy."""
    twin = copy.deepcopy(model)
    names = [n for n, p in twin.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(mse(twin, x), [p for n, p in twin.named_parameters() if p.requires_grad],
                                allow_unused=True)
    return {n for n, g in zip(names, grads, strict=True) if g is None}


def test_healthy_model_passes_and_returns_the_trace():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    trace = assert_grads_flow(model, mse, torch.randn(3, 4))
    assert trace.passes["grads_flow"].missing == set()


def test_detached_branch_fails_naming_the_parameters_and_the_cut():
    model, x = DetachedBranch(), _features(0)
    unreached = oracle_unreached(model, x)
    assert unreached == {"right.weight", "right.bias"}
    with pytest.raises(AssertionError) as info:
        assert_grads_flow(model, mse, x)
    message = str(info.value)
    assert "2 of 6 checked parameter(s) failed" in message
    assert "received no gradient (backward never reached them): right.weight, right.bias" in message
    assert "GRAPH_CUT" in message and "at op detach" in message and "zoo.py:" in message  # the line of the bug


def test_expected_frozen_parameters_are_not_a_failure_but_must_stay_frozen():
    model, x = UnusedHead(), _features(0)
    assert oracle_unreached(model, x) == {"aux_head.weight", "aux_head.bias"}
    with pytest.raises(AssertionError, match="aux_head.weight, aux_head.bias"):
        assert_grads_flow(model, mse, x)
    assert_grads_flow(model, mse, x, frozen=["aux_head.*"])
    with pytest.raises(AssertionError, match="expected frozen but received a gradient: body.bias, body.weight"):
        assert_grads_flow(model, mse, x, frozen=["aux_head.*", "body.*"])


def test_lora_a_is_exactly_zero_on_the_first_step_unless_allowed():
    model, x = LoRAModel(), _features(0)
    twin = copy.deepcopy(model)
    mse(twin, x).backward()
    zero = {n for n, p in twin.named_parameters() if p.grad is not None and not p.grad.any()}
    assert zero == {"q.lora_A", "v.lora_A"}  # lora_B starts at zero
    with pytest.raises(AssertionError, match="2 got an exactly zero gradient: q.lora_A, v.lora_A"):
        assert_grads_flow(model, mse, x)
    assert_grads_flow(model, mse, x, allow_zero=["*.lora_A"])


def test_params_selects_what_is_checked():
    model, x = DetachedBranch(), _features(0)
    assert_grads_flow(model, mse, x, params=["left.*", "head.*"])
    with pytest.raises(AssertionError, match="1 of 1 checked"):
        assert_grads_flow(model, mse, x, params="right.bias")


def test_nan_gradients_fail():
    model = nn.Linear(3, 1)
    with pytest.raises(AssertionError, match="got NaN/Inf gradients: weight") as info:
        assert_grads_flow(model, mse, torch.full((2, 3), float("nan")))
    assert "NONFINITE" in str(info.value)


def test_loss_that_does_not_require_grad_fails_with_the_cut():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))

    def loss_under_no_grad(m, x):
        with torch.no_grad():
            return m(x).sum()

    with pytest.raises(AssertionError, match="the loss does not require grad.*no_grad"):
        assert_grads_flow(model, loss_under_no_grad, torch.randn(2, 3))


def test_grads_are_restored_exactly_even_on_failure():
    model, x = DetachedBranch(), _features(0)
    before = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if i % 2 == 0:  # half hold a gradient already, half hold None
            p.grad = torch.full_like(p, 7.0)
        before[name] = (p.grad, None if p.grad is None else p.grad.clone())
    with pytest.raises(AssertionError):
        assert_grads_flow(model, mse, x)
    for name, p in model.named_parameters():
        held, values = before[name]
        assert p.grad is held
        if values is not None:
            assert torch.equal(p.grad, values)


def test_kwargs_go_to_loss_fn():
    model = nn.Linear(3, 1)
    seen = {}

    def loss_fn(m, x, *, scale):
        seen["scale"] = scale
        return m(x).sum() * scale

    assert_grads_flow(model, loss_fn, torch.randn(2, 3), scale=2.0)
    assert seen == {"scale": 2.0}


def test_bad_usage_is_a_gradtrace_error():
    model = nn.Linear(3, 1)
    with pytest.raises(gradtrace.GradtraceError, match="frozen='head.*' matches no parameter"):
        assert_grads_flow(model, mse, torch.randn(2, 3), frozen=["head.*"])
    with pytest.raises(gradtrace.GradtraceError, match="scalar loss tensor"):
        assert_grads_flow(model, lambda m, x: m(x), torch.randn(2, 3))


def test_fixture(gradtrace_flow):  # noqa: F811  (the fixture imported above, as pytest passes it)
    assert gradtrace_flow is assert_grads_flow
    with pytest.raises(AssertionError, match="right.weight"):
        gradtrace_flow(DetachedBranch(), mse, _features(0))

