"""UNREGISTERED_MODULE: layers that run in the forward but were never registered (issue 20, item 6).

A plain Python list or dict of layers is invisible to ``nn.Module``: the layers run, but their
parameters are in no ``model.parameters()``, optimizer or state dict. gradtrace sees them through
torch's global module hook, registered only while the watched forward runs.
"""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.modules.module as module_globals
from torch import nn

import gradtrace


class Encoder(nn.Module):
    def __init__(self, registered: bool = False, d: int = 8):
        super().__init__()
        self.inp, self.out = nn.Linear(4, d), nn.Linear(d, 1)
        layers = [nn.Linear(d, d), nn.Linear(d, d)]
        self.layers = nn.ModuleList(layers) if registered else layers  # <the bug>

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.out(h)


class Model(nn.Module):
    def __init__(self, registered: bool = False):
        super().__init__()
        self.encoder = Encoder(registered)

    def forward(self, x):
        return self.encoder(x)


def _global_hooks():
    return {name: dict(getattr(module_globals, name)) for name in dir(module_globals)
            if name.startswith("_global_") and "hook" in name and isinstance(getattr(module_globals, name), dict)}


def test_layers_in_a_plain_list_are_named_with_their_attribute():
    torch.manual_seed(0)
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
    first = trace.report().splitlines()[0]
    assert first.startswith("gradtrace diagnosis: UNREGISTERED_MODULE: 2 modules 'encoder.layers[0]', "
                            "'encoder.layers[1]' (Linear) ran in the forward but are not registered: in the plain "
                            "list `self.layers` of module 'encoder'")
    assert "4 trainable parameter(s)" in first and "received gradients that nothing applies" in first
    v = trace.verdicts()[0]
    assert v.severity == "error" and v.evidence["owner"] == "encoder" and v.evidence["attribute"] == "layers"
    records = trace.meta.unregistered_modules
    assert [r.calls for r in records] == [2, 2] and all(r.called_in == "encoder" for r in records)


class PReLUFeedForward(nn.Module):
    """allennlp #4101: parametric activations kept in a private plain list (`self._activations`)."""

    def __init__(self):
        super().__init__()
        self._linear_layers = nn.ModuleList([nn.Linear(6, 8), nn.Linear(8, 2)])
        self._activations = [nn.PReLU(), nn.PReLU()]

    def forward(self, x):
        for layer, act in zip(self._linear_layers, self._activations, strict=True):
            x = act(layer(x))
        return x


def test_layers_in_a_private_plain_list_are_named_with_their_attribute():
    """A list under a leading-underscore attribute is still the user's, not nn.Module's bookkeeping."""
    torch.manual_seed(0)
    model = PReLUFeedForward()
    with gradtrace.watch(model) as trace:
        model(torch.randn(4, 6)).sum().backward()
    first = trace.report().splitlines()[0]
    assert first.startswith("gradtrace diagnosis: UNREGISTERED_MODULE: 2 modules '_activations[0]', "
                            "'_activations[1]' (PReLU)"), first
    assert "`self._activations`" in first and "made in the forward" not in first


def test_a_module_list_is_healthy_and_the_global_hook_is_gone_between_forwards():
    torch.manual_seed(0)
    model = Model(registered=True)
    before = _global_hooks()
    inside = []
    probe = lambda m, a, o: inside.append(_global_hooks() != before)  # noqa: E731
    model.encoder.inp.register_forward_hook(probe)
    with gradtrace.watch(model) as trace:
        model(torch.randn(3, 4)).sum().backward()
        between = _global_hooks()
        nn.Linear(2, 2)(torch.randn(1, 2))  # another module's forward, outside the watched one: not seen
    assert inside == [True] and between == before and _global_hooks() == before
    assert trace.report().startswith("gradtrace: no problems found")
    assert not trace.meta.unregistered_modules


def test_no_global_hook_in_a_forward_without_grad():
    """Generation and evaluation (grad off when the watched forward begins) do not pay for the global hook."""
    model, before = Model(registered=True), _global_hooks()
    inside = []
    model.encoder.inp.register_forward_hook(lambda m, a, o: inside.append(_global_hooks() != before))
    with gradtrace.watch(model):
        with torch.no_grad():
            model(torch.randn(3, 4))
        model(torch.randn(3, 4)).sum().backward()
    assert inside == [False, True] and _global_hooks() == before


def test_the_global_hook_comes_off_when_the_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            self.fc(x)
            raise ValueError("boom")

    model, before = Boom(), _global_hooks()
    with gradtrace.watch(model):
        with pytest.raises(ValueError):
            model(torch.randn(1, 2))
        assert _global_hooks() == before
    assert _global_hooks() == before


def test_a_dict_of_heads_and_a_frozen_teacher_in_a_list():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.heads = {"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)}
            self.teacher = [nn.Linear(4, 4).requires_grad_(False)]  # hidden on purpose, frozen

        def forward(self, x):
            with torch.no_grad():
                target = self.teacher[0](x)
            h = self.body(x)
            return self.heads["a"](h).sum() + self.heads["b"](h).sum() + (h - target).pow(2).sum()

    model = Net()
    with gradtrace.watch(model) as trace:
        model(torch.randn(2, 4)).backward()
    by_attribute = {v.evidence["attribute"]: v for v in trace.verdicts() if v.code == "UNREGISTERED_MODULE"}
    assert by_attribute["heads"].severity == "error"
    assert by_attribute["heads"].evidence["modules"] == ["heads['a']", "heads['b']"]
    assert "the plain dict `self.heads` of the root module" in by_attribute["heads"].message
    assert by_attribute["teacher"].severity == "warning"  # frozen, under no_grad: nothing meant to train is lost
    assert trace.verdicts()[0].code == "UNREGISTERED_MODULE" and trace.verdicts()[0].severity == "error"


def test_parameter_free_modules_made_on_the_fly_are_not_findings():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, y):
            return nn.CrossEntropyLoss()(nn.ReLU()(self.fc(x)), y)  # fresh modules, no parameters

    model = Net()
    with gradtrace.watch(model) as trace:
        model(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert trace.report().startswith("gradtrace: no problems found")


def test_a_layer_made_on_every_forward_is_named_by_type_and_caller():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return nn.Linear(4, 1)(self.fc(x))  # new random weights on every call: never trains

    model = Net()
    with gradtrace.watch(model) as trace:
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
    v = [v for v in trace.verdicts() if v.code == "UNREGISTERED_MODULE"]
    assert len(v) == 1 and v[0].severity == "error"
    assert v[0].message.startswith("3 modules '<Linear #0 made in the forward of the root module>', '<Linear #1 ")
    assert "outside the module tree (made on the fly" in v[0].message


def test_the_global_hook_is_sampled_after_the_first_forwards():
    """Issue 23: the global hook slows every module call, so it is on in the first 3 grad-enabled watched
    forwards and then in one out of 64; the plain-list layers are found, and so is a module made only in a
    later forward (seen in a sampled one)."""
    from gradtrace.capture import unregistered

    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            h = self.encoder(x)
            return nn.Linear(1, 1)(h) if self.calls >= 60 else h  # made on the fly, from the 60th forward on

    torch.manual_seed(0)
    model, before = Late(), _global_hooks()
    inside = []
    model.encoder.inp.register_forward_hook(lambda m, a, o: inside.append(_global_hooks() != before))
    with gradtrace.watch(model) as trace:
        with torch.no_grad():
            model(torch.randn(3, 4))  # not counted: no grad
        for _ in range(unregistered.SAMPLE_EVERY):
            model(torch.randn(3, 4)).sum().backward()
    on = [i for i, present in enumerate(inside[1:], 1) if present]
    assert inside[0] is False and on == [1, 2, 3, unregistered.SAMPLE_EVERY]
    assert not inside[10] and _global_hooks() == before
    records = {r.module: r for r in trace.meta.unregistered_modules}
    assert records["encoder.layers[0]"].calls == 4 and records["encoder.layers[1]"].calls == 4
    assert "<Linear #0 made in the forward of the root module>" in records
    assert trace.report().splitlines()[0].startswith("gradtrace diagnosis: UNREGISTERED_MODULE: ")


def test_unregistered_parameters_the_optimizer_holds_are_a_warning():
    torch.manual_seed(0)
    model = Model()
    extra = [p for layer in model.encoder.layers for p in layer.parameters()]
    opt = torch.optim.SGD(list(model.parameters()) + extra, lr=0.1)
    with gradtrace.watch(model, optimizer=opt) as trace:
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    v = trace.verdicts()[0]
    assert v.code == "UNREGISTERED_MODULE" and v.severity == "warning"
    assert "in the optimizer" in v.message and "state_dict()" in v.message


def test_an_optimizer_seen_stepping_counts_without_being_passed_to_watch():
    torch.manual_seed(0)
    model = Model()
    extra = [p for layer in model.encoder.layers for p in layer.parameters()]
    opt = torch.optim.SGD(list(model.parameters()) + extra, lr=0.1)
    with gradtrace.watch(model) as trace:  # the step is seen through torch.optim's global step hooks
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    v = [v for v in trace.verdicts() if v.code == "UNREGISTERED_MODULE"]
    assert len(v) == 1 and v[0].severity == "warning" and "in the optimizer" in v[0].message


def test_another_threads_modules_during_the_watched_forward_are_not_counted():
    gate, done = threading.Event(), threading.Event()
    stray = nn.Linear(2, 2)

    def elsewhere():
        gate.wait(5)
        stray(torch.randn(1, 2))
        done.set()

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            gate.set()
            done.wait(5)  # the other thread runs its module while this forward is open
            return self.fc(x)

    worker = threading.Thread(target=elsewhere)
    worker.start()
    model = Slow()
    with gradtrace.watch(model) as trace:
        model(torch.randn(1, 2)).sum().backward()
    worker.join(5)
    assert done.is_set() and not trace.meta.unregistered_modules


@pytest.mark.slow
def test_a_real_llama_with_an_extra_head_in_a_list(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tiny_trainer import make_llama

    class WithValueHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = make_llama(32)
            self.value_head = [nn.Linear(32, 1)]  # a TRL-style value head kept out of the tree by mistake

        def forward(self, ids):
            hidden = self.lm(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            return self.value_head[0](hidden).mean()

    assert transformers
    model = WithValueHead()
    with gradtrace.watch(model) as trace:
        model(torch.randint(1, 32, (2, 6))).backward()
    first = trace.report().splitlines()[0]
    assert "UNREGISTERED_MODULE: module 'value_head[0]' (Linear)" in first
    assert "the plain list `self.value_head` of the root module" in first
    trace.save(tmp_path / "t.json")
    assert gradtrace.load(tmp_path / "t.json").report().splitlines()[0] == first
