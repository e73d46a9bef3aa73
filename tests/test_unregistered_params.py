"""Tensors that require grad, held by the model's modules, that nn.Module never registered.

``self.bias2 = torch.zeros(4, requires_grad=True)`` and ``self.ws = [nn.Parameter(...)]`` take part in
the forward and even get a ``.grad``, yet ``model.parameters()`` (and so the optimizer and gradtrace's
own hooks) never see them. Before, gradtrace said "no problems found" on such a run.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import gradtrace
from zoo import classify_steps


class TensorAttribute(nn.Module):
    def __init__(self, fixed: bool = False):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        bias = torch.zeros(4, requires_grad=True)
        self.bias2 = nn.Parameter(bias.detach()) if fixed else bias

    def forward(self, x):
        return self.lin(x) + self.bias2


class ParameterList(nn.Module):
    def __init__(self, fixed: bool = False):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        scales = [nn.Parameter(torch.ones(4)) for _ in range(2)]
        self.ws = nn.ParameterList(scales) if fixed else scales

    def forward(self, x):
        h = self.lin(x)
        for w in self.ws:
            h = h * w
        return h


def _serious(trace):
    return [v for v in trace.verdicts() if v.severity in ("error", "warning")]


def test_a_plain_tensor_attribute_that_requires_grad_is_named_first():
    model = TensorAttribute()
    before = model.bias2.clone()
    trace = classify_steps(model)
    assert model.bias2.grad is not None and torch.equal(model.bias2, before)  # reached, never stepped
    first = trace.verdicts()[0]
    assert first.code == "UNREGISTERED_PARAM" and first.severity == "error"
    assert first.evidence["tensors"] == ["bias2"] and first.evidence["got_grad"]
    assert "self.bias2" in first.message and "nn.Parameter(" in first.message
    (loose,) = trace.meta.loose_tensors
    assert (loose.shape, loose.is_parameter, loose.in_optimizer) == ([4], False, False)


def test_parameters_in_a_plain_list_are_named_with_parameter_list_as_the_fix():
    trace = classify_steps(ParameterList())
    first = trace.verdicts()[0]
    assert first.code == "UNREGISTERED_PARAM" and first.severity == "error"
    assert first.evidence["tensors"] == ["ws[0]", "ws[1]"] and first.evidence["container"] == "list"
    assert "nn.ParameterList" in first.message


def test_the_fixed_twins_are_clean():
    for cls in (TensorAttribute, ParameterList):
        trace = classify_steps(cls(fixed=True))
        assert trace.meta.loose_tensors is None
        assert _serious(trace) == [], cls.__name__


def test_given_to_the_optimizer_it_trains_and_is_only_an_info():
    model = TensorAttribute()
    opt = torch.optim.SGD(list(model.parameters()) + [model.bias2], lr=0.1)
    trace = classify_steps(model, opt=opt)
    found = [v for v in trace.verdicts() if v.code == "UNREGISTERED_PARAM"]
    assert [v.severity for v in found] == ["info"] and "state_dict()" in found[0].message
    assert _serious(trace) == []


def test_without_an_optimizer_it_is_a_warning():
    model = TensorAttribute()
    with gradtrace.watch(model) as trace:
        F.cross_entropy(model(torch.randn(4, 8)), torch.randint(0, 4, (4,))).backward()
    (v,) = [v for v in trace.verdicts() if v.code == "UNREGISTERED_PARAM"]
    assert v.severity == "warning" and "does not watch" in v.message


class Innocent(nn.Module):
    """What is not a loose parameter: a cached activation, a frozen or a shared registered parameter, data."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.frozen = nn.Parameter(torch.ones(4), requires_grad=False)
        self.shared = [self.lin.weight]  # a registered parameter, also held in a list
        self.table = torch.arange(4.0)  # data
        self.last = None

    def forward(self, x):
        out = self.lin(x) * self.frozen + self.table
        self.last = out  # a non-leaf kept for logging
        return out


def test_cached_activations_frozen_shared_and_data_tensors_are_not_flagged(tmp_path):
    trace = classify_steps(Innocent())
    assert trace.meta.loose_tensors is None
    assert not any(v.code == "UNREGISTERED_PARAM" for v in trace.verdicts())


def test_the_record_survives_a_save_and_load(tmp_path):
    trace = classify_steps(ParameterList())
    trace.save(tmp_path / "t.json")
    loaded = gradtrace.load(tmp_path / "t.json")
    assert [t.name for t in loaded.meta.loose_tensors] == ["ws[0]", "ws[1]"]
    assert loaded.verdicts()[0].message == trace.verdicts()[0].message


def _freeze_first_layer(how: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    if how == "attribute":
        model[0].requires_grad = False  # the bug: an attribute on the module object, not the method
    else:
        model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return model, classify_steps(model, opt=opt)


def test_a_module_frozen_by_a_plain_requires_grad_attribute_is_said_to_freeze_nothing():
    model, trace = _freeze_first_layer("attribute")
    assert all(p.requires_grad and p.grad is not None for p in model[0].parameters())  # not frozen at all
    first = trace.verdicts()[0]
    assert first.code == "FREEZE_IGNORED" and first.evidence == {"module": "0", "trainable": 2, "got_grad": True}
    assert "requires_grad_(False)" in first.message


def test_requires_grad_underscore_freezes_and_is_clean():
    model, trace = _freeze_first_layer("method")
    assert trace.meta.ignored_freezes is None
    assert _serious(trace) == []


def _train_with_hook(hook):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if hook is not None:
        model[2].weight.register_hook(hook)  # before the watch, as a pruning helper would
    return classify_steps(model)


def test_a_gradient_zeroed_by_a_tensor_hook_of_the_users_is_blamed_on_the_hook():
    """Before, an exactly zero weight gradient beside a nonzero bias gradient was blamed on dead ReLUs."""
    trace = _train_with_hook(lambda g: g * 0)
    first = trace.verdicts()[0]
    assert first.code == "ZERO_GRADS" and first.evidence["user_hooked"] == ["2.weight"]
    # the hook first; the other explanation (dead activations) after it, not dropped
    assert first.message.index("tensor hook of yours") < first.message.index("otherwise, ")
    assert trace.meta.user_hooked == ["2.weight"]


def test_a_harmless_hook_does_not_hide_a_real_cause_nor_lower_the_severity():
    """A per-parameter clamp hook on every parameter and a step function in the loss: still an error that
    lists the step functions (review: the hook had replaced them and made it a warning)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    for p in model.parameters():
        p.register_hook(lambda g: g.clamp(-1, 1))
    with gradtrace.watch(model) as trace:
        torch.round(model(torch.randn(4, 8))).pow(2).mean().backward()
    first = trace.verdicts()[0]
    assert first.code == "ZERO_GRADS" and first.severity == "error"
    assert "tensor hook of yours" in first.message and "torch.round" in first.message


def test_a_masking_hook_that_keeps_some_gradient_and_no_hook_are_clean():
    mask = (torch.arange(64).reshape(4, 16) % 2).float()
    for hook in (lambda g: g * mask, None):
        trace = _train_with_hook(hook)
        assert _serious(trace) == []
    assert _train_with_hook(None).meta.user_hooked is None


def test_gradtraces_own_hook_on_a_parameter_registered_as_a_tensor_is_not_the_users():
    model = nn.Sequential(nn.Linear(8, 4))
    with gradtrace.watch(model) as trace:
        w = trace.tensor("w", model[0].weight)
        F.cross_entropy(model(torch.randn(4, 8)), torch.randint(0, 4, (4,))).backward()
        assert w is model[0].weight
        trace.verdicts()  # judged while the tensor's hook is in
        assert trace.meta.user_hooked is None


class OddContainers(nn.Module):
    """Attributes a scan must survive: a dict whose items() raises, a key whose repr raises, a long key,
    a nested tensor that requires grad."""

    class Refusing(dict):
        def items(self):
            raise RuntimeError("no")

    class BadKey:
        def __repr__(self):
            raise RuntimeError("no repr")

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.refusing = self.Refusing(a=torch.ones(2, requires_grad=True))
        self.bad_keys = {self.BadKey(): torch.ones(2, requires_grad=True)}
        self.long_keys = {"k" * 5000: torch.ones(2, requires_grad=True)}
        self.nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], requires_grad=True)

    def forward(self, x):
        return self.lin(x)


def test_odd_attributes_never_raise_into_the_users_code_and_names_stay_loadable(tmp_path):
    trace = classify_steps(OddContainers())
    names = [t.name for t in trace.meta.loose_tensors or ()]
    assert len(names) == 1 and names[0].startswith("long_keys['kkk") and len(names[0]) <= 300
    trace.save(tmp_path / "t.json")
    assert [t.name for t in gradtrace.load(tmp_path / "t.json").meta.loose_tensors] == names


class Anchored(nn.Module):
    """L2-SP: the starting weights kept to pull the fine-tuned ones back, deep-copied (so still requiring
    grad) instead of detached."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.anchor = [copy.deepcopy(p) for p in self.lin.parameters()]

    def forward(self, x):
        self.penalty = sum(((p - a) ** 2).sum() for p, a in zip(self.lin.parameters(), self.anchor, strict=True))
        return self.lin(x)


def test_a_frozen_copy_left_requiring_grad_is_a_warning_that_says_detach():
    model = Anchored()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            opt.zero_grad()
            x, y = torch.randn(4, 8), torch.randint(0, 4, (4,))
            (F.cross_entropy(model(x), y) + model.penalty).backward()
            opt.step()
    (v,) = [v for v in trace.verdicts() if v.code == "UNREGISTERED_PARAM"]
    assert v.severity == "warning" and v.evidence["copies_of"] == ["lin.weight", "lin.bias"]
    assert "detach" in v.message


class OwnFlag(nn.Module):
    """A module keeping its own requires_grad flag for torch.set_grad_enabled: nothing is meant to freeze it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.requires_grad = False

    def forward(self, x):
        with torch.set_grad_enabled(self.requires_grad):
            return self.lin(x)


def test_a_requires_grad_flag_the_module_honours_itself_is_not_named():
    model = nn.Sequential(OwnFlag(), nn.Linear(4, 4))
    trace = classify_steps(model)
    assert trace.meta.ignored_freezes is None
    assert not any(v.code == "FREEZE_IGNORED" for v in trace.verdicts())
