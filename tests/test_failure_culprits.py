"""PASS_FAILED names the culprit where gradtrace can know it (issue 20, item 8 and the failures beside it).

torch's messages say what broke; the first line gradtrace prints says where: the module holding an
inference-mode cache and the inference_mode region that made it, the module whose output was saved
and then changed in place (and the module that changed it), the cut that left the loss without a
graph. (DDP's unfinished reduction is in tests/test_distributed.py.)
"""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import gradtrace


def line_of(marker: str) -> str:
    lines = inspect.getsource(inspect.getmodule(line_of)).splitlines()
    number = next(i for i, text in enumerate(lines, 1) if text.rstrip().endswith(f"# <{marker}>"))
    return f"test_failure_culprits.py:{number}"


class Rotary(nn.Module):
    """A positional cache built on first use and kept: under inference_mode, an inference tensor."""

    def __init__(self):
        super().__init__()
        self.cos_cached = None

    def forward(self, x):
        if self.cos_cached is None or self.cos_cached.shape[0] < x.shape[-2]:
            positions = torch.arange(x.shape[-2], dtype=x.dtype)[:, None]
            self.cos_cached = (positions * torch.ones(x.shape[-1])).cos()
        return self.cos_cached[: x.shape[-2]]


class Attention(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.rotary, self.q = Rotary(), nn.Linear(d, d)

    def forward(self, x):
        cos = self.rotary(x)
        return self.q(x) * cos  # the multiply saves cos for backward


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = Attention(), nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.attn(x))


def _x(seed=0):
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(seed))


def test_an_inference_mode_cache_reused_in_training_names_its_module_and_region():
    torch.manual_seed(0)
    model = TinyLM()
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        with gradtrace.watch(model) as trace:
            with torch.inference_mode():
                model(_x())  # <validation>
            with trace.pass_("train"):
                model(_x(1)).sum().backward()
    first = trace.report().splitlines()[0]
    assert first.startswith(
        "gradtrace diagnosis: PASS_FAILED: pass 'train' ended with an exception: module 'attn.rotary' (Rotary) "
        "holds a cached inference tensor (cos_cached), made under torch.inference_mode() at ")
    assert f"{line_of('validation')}, and a forward with grad reused it" in first
    assert "used by module 'attn' (Attention) as 'cos'" in first
    cause = trace.passes["train"].failure
    assert (cause.kind, cause.module, cause.attribute, cause.other) == ("inference_tensor", "attn.rotary",
                                                                        "cos_cached", "attn")


def test_a_cache_made_before_the_watch_began_is_said_so():
    model = TinyLM()
    with torch.inference_mode():
        model(_x())
    with pytest.raises(RuntimeError):
        with gradtrace.watch(model) as trace:
            model(_x(1)).sum().backward()  # outside any pass: the watched block's error
    first = trace.report().splitlines()[0]
    assert "module 'attn.rotary' (Rotary) holds a cached inference tensor (cos_cached), made under " \
           "torch.inference_mode() before the watch began" in first
    assert trace.meta.error_cause.kind == "inference_tensor"


class FrozenBackboneByInferenceMode(nn.Module):
    """dinov2 #472: the backbone runs under inference_mode inside the training forward."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU())
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, img):
        with torch.inference_mode():
            feats = self.backbone(img)
        return self.head(feats)


def test_a_module_run_under_inference_mode_inside_the_forward_is_named_with_its_line():
    torch.manual_seed(0)
    model = FrozenBackboneByInferenceMode()
    with gradtrace.watch(model) as trace:
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
            with trace.pass_("train"):
                model(torch.randn(2, 3, 8, 8)).pow(2).mean().backward()
    first = trace.report().splitlines()[0]
    line = inspect.getsourcelines(FrozenBackboneByInferenceMode.forward)[1] + 2  # feats = self.backbone(img)
    assert first.startswith("gradtrace diagnosis: PASS_FAILED: pass 'train' ended with an exception: module "
                            "'backbone' (Sequential) ran under torch.inference_mode() at "), first
    assert f"test_failure_culprits.py:{line} inside a forward with grad" in first
    assert "module 'head' (Conv2d) tried to save for backward" in first and "'feats'" in first
    assert "before the watch began" not in first


def test_an_inplace_relu_after_tanh_names_both_modules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.ReLU(inplace=True), nn.Linear(8, 1))
    with gradtrace.watch(model) as trace:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            with trace.pass_("step"):
                model(torch.randn(4, 4)).sum().backward()
    first = trace.report().splitlines()[0]
    assert first.startswith("gradtrace diagnosis: PASS_FAILED: pass 'step' ended with an exception: the output of "
                            "module '1' (Tanh) ([torch.FloatTensor [4, 8]], output of Tanh) was saved for backward, "
                            "then modified in place by module '2' (ReLU)")


class FunctionalTanhThenInplaceReLU(nn.Module):
    """imgclsmob #13: torch.tanh in the forward's own code (no module), then a module ReLU(inplace=True)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.activ, self.fc2 = nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.activ(torch.tanh(self.fc1(x))))


def test_an_inplace_module_after_a_functional_op_is_named():
    model = FunctionalTanhThenInplaceReLU()
    with gradtrace.watch(model) as trace:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            with trace.pass_("train"):
                model(torch.randn(4, 8)).sum().backward()
    first = trace.report().splitlines()[0]
    assert first.startswith("gradtrace diagnosis: PASS_FAILED: pass 'train' ended with an exception: a tensor "
                            "saved for backward ([torch.FloatTensor [4, 8]], output of Tanh) was then modified in "
                            "place by module 'activ' (ReLU), built with inplace=True"), first


def test_an_inplace_change_in_the_parents_own_code():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.Sigmoid()

        def forward(self, x):
            h = self.act(self.fc(x))
            h.mul_(2)  # sigmoid saved its output: changed in place here
            return h

    model = nn.Sequential(Block(), nn.Linear(4, 1))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        with gradtrace.watch(model) as trace:
            model(torch.randn(3, 4)).sum().backward()
    cause = trace.meta.error_cause
    assert (cause.kind, cause.module, cause.other) == ("inplace", "0.act", "0")
    assert "the output of module '0.act' (Sigmoid)" in trace.report().splitlines()[0]


def _argmax_loss(model, x):
    logits = model(x)
    return (logits.argmax(-1) == torch.tensor([0, 1, 2, 0])).float().mean()  # <accuracy>


def test_an_accuracy_used_as_a_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    for cuts, culprit in (("modules", "the last module whose output carried a gradient was the root module "
                                      "(Sequential), so the graph was cut after it (an argmax/comparison"),
                          ("ops", f"code outside any module produced a non-differentiable (integer/bool) output at "
                                  f"op argmax (non_differentiable, tests/{line_of('accuracy')}")):
        with pytest.raises(RuntimeError, match="does not require grad"):
            with gradtrace.watch(model, cuts=cuts) as trace:
                _argmax_loss(model, torch.randn(4, 4)).backward()
        first = trace.report().splitlines()[0]
        assert first.startswith("gradtrace diagnosis: PASS_FAILED: the watched block ended with an exception: "
                                "backward was called on a loss with no graph")
        assert culprit in first, first


def test_an_integer_loss_says_so():
    model = nn.Linear(4, 3)
    with gradtrace.watch(model) as trace:
        with pytest.raises(RuntimeError, match="does not require grad"):
            with trace.pass_("step"):
                model(torch.randn(4, 4)).argmax(-1).sum().backward()
    failed = next(v for v in trace.verdicts() if v.code == "PASS_FAILED")
    assert failed.message.startswith("pass 'step' ended with an exception: backward was called on an integer (int64) "
                                     "loss: argmax, a comparison or round made it")
    # The first line is the cause that explains the failure: the model's output, cut after it.
    assert trace.report().splitlines()[0].startswith("gradtrace diagnosis: DETACHED_OUTPUT: pass 'step': the output of "
                                                     "the model (its root module) never received a gradient")


def test_a_model_run_under_no_grad_names_the_cut():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    with pytest.raises(RuntimeError, match="does not require grad"):
        with gradtrace.watch(model) as trace:
            with torch.no_grad():
                out = model(torch.randn(2, 4))  # <no-grad>
            out.sum().backward()
    first = trace.report().splitlines()[0]
    assert "backward was called on a loss with no graph: the root module (Sequential) ran under torch.no_grad()" \
        in first and line_of("no-grad") in first


def test_an_error_gradtrace_cannot_explain_keeps_the_plain_message():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError):
        with gradtrace.watch(model) as trace:
            with trace.pass_("step"):
                model(torch.randn(1, 2)).sum().backward()
                raise ValueError("data loader broke")
    assert trace.verdicts()[0].message == ("pass 'step' ended with an exception (ValueError: data loader broke): "
                                           "its backward did not complete, so its figures are partial")
    assert trace.passes["step"].failure is None


def test_a_caught_failure_keeps_nothing_of_the_failed_step_alive():
    """The culprit is read off the traceback, but the exception (its frames, their tensors) is not kept:
    a loop that catches the error and trains on must not hold the failed step's activations."""
    import gc
    import weakref

    model = TinyLM()
    with gradtrace.watch(model) as trace:
        with torch.inference_mode():
            model(_x())
        x = _x(1)
        ref = weakref.ref(x)
        try:
            with trace.pass_("train"):
                model(x).sum().backward()
        except RuntimeError:
            pass
        del x
        gc.collect()
        assert ref() is None
    assert trace.passes["train"].failure.kind == "inference_tensor"
