"""keep_grads inner products and Adam preconditioning, against the formula computed by hand."""
import math

import pytest
import torch
from torch import nn

import gradtrace


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-7)
    for _ in range(3):  # real optimizer steps, so exp_avg_sq and step exist
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
    xs = [torch.randn(5, 4) for _ in range(3)]
    ys = [torch.randn(5, 4) for _ in range(2)]
    return model, opt, xs, ys


def loss_x(model, x):
    return model(x).logsumexp(-1).mean()


def loss_y(model, y):
    return model(y).log_softmax(-1)[:, 0].sum()


def hand_gradients(model, xs, ys):
    params = list(model.parameters())
    gx = [torch.zeros_like(p) for p in params]
    for x in xs:
        for acc, g in zip(gx, torch.autograd.grad(loss_x(model, x), params), strict=True):
            acc += g
    gy = [torch.zeros_like(p) for p in params]
    for y in ys:
        for acc, g in zip(gy, torch.autograd.grad(loss_y(model, y), params), strict=True):
            acc += g
    return params, gx, gy


def run_probe(model, xs, ys):
    params = list(model.parameters())
    with gradtrace.watch(model, keep_grads=True) as trace:
        model.zero_grad(set_to_none=True)
        with trace.pass_("X"):
            for x in xs:
                loss_x(model, x).backward()
        with trace.pass_("Y"):
            for y in ys:
                torch.autograd.grad(loss_y(model, y), params)
    return trace


def test_dot_and_cosine(setup):
    model, opt, xs, ys = setup
    params, gx, gy = hand_gradients(model, xs, ys)
    trace = run_probe(model, xs, ys)
    d = trace.diff("X", "Y")
    dot = sum((a.double() * b.double()).sum().item() for a, b in zip(gx, gy, strict=True))
    nx = math.sqrt(sum(a.double().pow(2).sum().item() for a in gx))
    ny = math.sqrt(sum(b.double().pow(2).sum().item() for b in gy))
    assert d.dot == pytest.approx(dot, rel=1e-5)
    assert d.cosine == pytest.approx(dot / (nx * ny), rel=1e-5)
    assert sum(t["contribution"] for t in d.top) == pytest.approx(dot, rel=1e-5)
    assert "dominant parameters" in str(d)


def test_adam_preconditioned_u_cross(setup):
    model, opt, xs, ys = setup
    params, gx, gy = hand_gradients(model, xs, ys)
    trace = run_probe(model, xs, ys)
    d = trace.diff("X", "Y", precondition=opt)
    (group,) = opt.param_groups
    beta2, eps = group["betas"][1], group["eps"]
    u_cross, ny_pre = 0.0, 0.0
    for p, a, b in zip(params, gx, gy, strict=True):
        state = opt.state[p]
        v_hat = state["exp_avg_sq"].double() / (1 - beta2 ** float(state["step"]))
        denom = v_hat.sqrt() + eps
        u_cross += (a.double() * b.double() / denom).sum().item()
        ny_pre += (b.double() / denom).pow(2).sum().item()
    assert d.inner["preconditioned"] is True
    assert d.dot == pytest.approx(u_cross, rel=1e-5)
    assert d.inner["norm_b_pre"] == pytest.approx(math.sqrt(ny_pre), rel=1e-5)
    assert d.inner["optimizer"] == "AdamW"
    # Recorded on the trace: it reaches the report and the JSON file.
    assert any(s["preconditioned"] for s in trace.inner_products)
    assert "preconditioned by AdamW" in trace.report()


def test_extreme_second_moments_explain_a_zero_print(setup):
    model, opt, xs, ys = setup
    for p in model.parameters():
        opt.state[p]["exp_avg_sq"].fill_(1e12)
    trace = run_probe(model, xs, ys)
    d = trace.diff("X", "Y", precondition=opt)
    trace.scalars["deltaH1"] = gradtrace.ScalarRecord("deltaH1", -1e-3 * d.dot)  # as the probe would record it
    v = next(v for v in trace.verdicts() if v.code == "ROUNDS_TO_ZERO")
    assert "preconditioning" in v.message and "shrinks" in v.message
