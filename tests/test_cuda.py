"""On CUDA, gradtrace must not synchronise the host inside backward (skipped without a GPU).

torch.cuda.set_sync_debug_mode("error") turns every synchronising call
(.item(), .cpu(), .tolist(), nonzero, ...) into an error, so backward under
watch raises if any hook or end-of-run callback syncs.
"""
import pytest
import torch
from torch import nn

import gradtrace

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def model_on_gpu():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 8)).cuda()


@cuda
@pytest.mark.parametrize("options", [{}, {"keep_grads": True}, {"cuts": "off"}], ids=["default", "keep_grads", "no_cuts"])
def test_no_host_sync_inside_backward(options):
    model = model_on_gpu()
    params = list(model.parameters())
    x = torch.randn(32, 64, device="cuda")
    with gradtrace.watch(model, **options) as trace:
        S = trace.tensor("S", model(x).logsumexp(-1))
        y_loss = model(x).pow(2).mean()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with trace.pass_("X"):
                S.sum().backward()
            torch.autograd.grad(y_loss, params)  # an unlabelled run: its pass is built inside backward
        finally:
            torch.cuda.set_sync_debug_mode("default")
    passes = trace.passes  # one host transfer per pass, here, outside backward
    assert passes["X"].covered == {n for n, _ in model.named_parameters()}
    assert passes["grad-1"].covered == passes["X"].covered
    assert trace.tensors["S"].grads["X"].reached
    for name, p in model.named_parameters():
        assert passes["X"].records[name].norm == pytest.approx(p.grad.norm().item(), rel=1e-5)


@cuda
def test_gradients_bitwise_identical_on_cuda():
    x = torch.randn(32, 64, device="cuda")
    plain, watched = model_on_gpu(), model_on_gpu()
    plain(x).sum().backward()
    with gradtrace.watch(watched):
        watched(x).sum().backward()
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


@cuda
def test_no_host_sync_in_forward_checks_global_hooks_or_healthy_passes():
    """Module outputs checked for NaN/Inf, masks, the unregistered-module hook: nothing reads back during
    forward or backward; a NaN pass's checks are read once, when the trace is read (issue 20, items 5-6)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.attn = nn.Linear(8, 16), nn.MultiheadAttention(16, 2, batch_first=True)
            self.extra = [nn.Linear(16, 16)]  # unregistered: the global hook sees it
            self.head = nn.Linear(16, 1)

        def forward(self, x, pad):
            h = self.emb(x)
            return self.head(self.extra[0](self.attn(h, h, h, key_padding_mask=pad)[0])).mean()

    model = Net().cuda()
    model.extra[0].cuda()
    x, pad = torch.randn(2, 5, 8, device="cuda"), torch.zeros(2, 5, dtype=torch.bool, device="cuda")
    with gradtrace.watch(model) as trace:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(3):
                with trace.pass_(f"step-{step}"):
                    model(x, pad).backward()
            pad[1] = True  # a fully masked row: NaN
            with trace.pass_("nan"):
                model(x, pad).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert trace.passes["nan"].forward_nonfinite.cause == "masked_softmax"
    assert trace.passes["step-0"].forward_checked is None  # healthy: never read


@cuda
def test_no_host_sync_inside_an_optimizer_step():
    """The step hooks sample weights and gradients on the device: no host read until the trace is read."""
    model = model_on_gpu()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)  # capturable: AdamW itself never syncs
    x = torch.randn(32, 64, device="cuda")
    with gradtrace.watch(model) as trace:
        for step in range(3):
            opt.zero_grad()
            model(x).sum().backward()
            torch.cuda.synchronize()
            # The first step lays out the sample once per optimizer (one host-to-device copy of its segments).
            torch.cuda.set_sync_debug_mode("error" if step else "default")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    (record,) = trace.optimizers.values()
    assert record.steps == 3 and set(record.updates) == {n for n, _ in model.named_parameters()}
    assert 0 < record.max_ratio < 1
