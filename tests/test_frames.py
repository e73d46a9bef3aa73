"""One rule for whose code a frame runs (capture/frames.py), and the stack walks built on it.

The rule decides by the package a file lives in, never by how its name ends:
before it, three copies disagreed about ``gradtrace/scratch_demo.py`` (one
took any ``*demo.py`` for the user's, another for gradtrace's), and a
``.detach()`` used only for logging in such a file was recorded as a cut.
"""
import contextlib
import os
import sys
import sysconfig

import pytest
import torch
from torch import nn

import gradtrace
from gradtrace.capture import frames

GRADTRACE_DIR = os.path.dirname(os.path.abspath(gradtrace.__file__))
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
SITE = os.path.dirname(TORCH_DIR)  # the site-packages directory torch was installed into

LOGGING_STEP = """
def step(model, x, history):
    loss = model(x).sum()
    logged = loss.detach()           # for logging only: never used for a gradient
    history.append(logged * 1.0)     # an op on the logged value, in this same file
    loss.backward()
"""


def compiled_at(filename: str):
    """``step`` from LOGGING_STEP, its code attributed to ``filename`` (nothing is written there)."""
    namespace = {"__name__": "scratch"}
    exec(compile(LOGGING_STEP, filename, "exec"), namespace)
    return namespace["step"]


@pytest.mark.parametrize("filename", [os.path.join(GRADTRACE_DIR, "scratch_demo.py"), "scratch_demo.py",
                                      os.path.join(os.getcwd(), "user_demo.py")],
                         ids=["inside-gradtrace", "relative-user-file", "user-file"])
def test_a_detach_for_logging_is_no_cut_whatever_the_file_is_called(filename):
    step = compiled_at(filename)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    history = []
    with gradtrace.watch(model, cuts="ops") as trace:
        with trace.pass_("X"):
            step(model, torch.randn(2, 3), history)
    assert trace.cuts == []
    assert len(history) == 1 and not history[0].requires_grad
    assert trace.passes["X"].covered == {"0.weight", "0.bias", "1.weight", "1.bias"}


def test_a_real_cut_in_the_same_files_is_recorded_at_the_users_line():
    """The rule hides gradtrace's own work only: the user's detach that rejoins a graph is a cut."""
    source = "def step(model, x):\n    h = model[0](x)\n    return model[1](h.detach()).sum()\n"
    namespace = {}
    exec(compile(source, os.path.join(os.getcwd(), "user_script.py"), "exec"), namespace)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with gradtrace.watch(model, cuts="ops") as trace:
        with trace.pass_("X"):
            namespace["step"](model, torch.randn(2, 3)).backward()
    (cut,) = [c for c in trace.cuts if c.op == "detach"]
    assert cut.location == "user_script.py:3"
    assert trace.passes["X"].missing == {"0.weight", "0.bias"}


@pytest.mark.parametrize("filename, kind", [
    (os.path.join(TORCH_DIR, "nn", "modules", "module.py"), frames.TORCH),
    (os.path.join(SITE, "torchvision", "ops", "boxes.py"), frames.LIBRARY),  # a sibling, not torch itself
    (os.path.join(SITE, "torch_geometric", "nn", "conv.py"), frames.LIBRARY),
    (os.path.join(SITE, "transformers", "trainer.py"), frames.LIBRARY),
    (os.path.join(GRADTRACE_DIR, "live.py"), frames.GRADTRACE),
    (os.path.join(GRADTRACE_DIR, "capture", "opcuts.py"), frames.GRADTRACE),
    (os.path.join(GRADTRACE_DIR, "scratch_demo.py"), frames.GRADTRACE),  # by package, not by name
    (os.path.join(GRADTRACE_DIR, "demo.py"), frames.USER),  # declared: the demo plays the user
    (contextlib.__file__, frames.PYTHON),
    (os.path.join(sysconfig.get_paths()["stdlib"], "threading.py"), frames.PYTHON),
    ("<frozen importlib._bootstrap>", frames.PYTHON),
    ("<stdin>", frames.USER),
    ("<string>", frames.USER),
    ("<ipython-input-3-1a2b3c>", frames.USER),
    (__file__, frames.USER),
], ids=lambda v: v if v in (frames.TORCH, frames.PYTHON, frames.GRADTRACE, frames.LIBRARY, frames.USER)
    else os.path.relpath(v, SITE) if v.startswith(SITE) else os.path.basename(v))
def test_whose_file(filename, kind):
    assert frames.kind_of(filename) == kind


def test_a_sibling_of_the_package_is_not_gradtrace_whatever_its_files_are_called():
    """``gradtrace_extras/demo.py`` beside the package is whatever its directory is (the user's in a
    checkout, a library's in site-packages): neither gradtrace's nor the demo."""
    parent = os.path.dirname(GRADTRACE_DIR)
    assert frames.kind_of(os.path.join(GRADTRACE_DIR + "_extras", "demo.py")) == \
        frames.kind_of(os.path.join(parent, "anything_else", "module.py")) != frames.GRADTRACE


def test_the_demo_is_user_code_by_its_module_name():
    from gradtrace import demo

    assert frames.PLAYS_THE_USER == ("gradtrace.demo",)
    assert frames.kind_of(demo.__file__) == frames.USER
    assert frames.kind_of(demo.__file__.replace("demo.py", "cli.py")) == frames.GRADTRACE


def test_locations_name_the_user_line_and_the_library_line():
    """locations(): machinery and gradtrace are stepped over; the first library frame is kept beside."""

    class Place:
        def __init__(self, filename, line, back=None):
            self.f_code = type("Code", (), {"co_filename": filename})()
            self.f_lineno, self.f_back = line, back

    user = Place(os.path.join(os.getcwd(), "train.py"), 7)
    library = Place(os.path.join(SITE, "transformers", "trainer.py"), 120, user)
    outer_library = Place(os.path.join(SITE, "accelerate", "utils.py"), 5, library)
    own = Place(os.path.join(GRADTRACE_DIR, "live.py"), 3, outer_library)
    inner = Place(os.path.join(TORCH_DIR, "nn", "modules", "module.py"), 1, own)
    assert frames.locations(inner) == ("train.py:7", "accelerate/utils.py:5")
    assert frames.locations(Place(contextlib.__file__, 1, Place("<stdin>", 2))) == ("<stdin>:2", "")
    assert frames.locations(Place(os.path.join(GRADTRACE_DIR, "live.py"), 1)) == ("<unknown>", "")


def test_innermost_module_and_module_caller_walk_the_real_stack():
    outer, inner, seen = nn.Sequential(), nn.Identity(), []

    def hook(module, args, output):
        frame = sys._getframe(1)
        seen.append((frames.innermost_module(frame, {id(outer)}), frames.innermost_module(frame, {id(inner)}),
                     frames.module_caller(frame).f_code.co_name))

    outer.append(inner)
    inner.register_forward_hook(hook)
    outer(torch.zeros(1))
    assert seen == [(outer, inner, "forward")]  # inner was called by Sequential.forward


def test_a_nested_engine_run_is_seen_under_a_custom_function_backward():
    seen = []

    class Nested(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(frames.function_backward_on_stack(sys._getframe()))
            return g * 2

    Nested.apply(torch.ones(1, requires_grad=True)).sum().backward()
    assert seen == [True] and not frames.function_backward_on_stack(sys._getframe())


def test_locations_name_installed_files_from_their_package_not_the_machine(monkeypatch, tmp_path):
    """A location never depends on where gradtrace or a library is installed, or on the working
    directory: the demo's lines read gradtrace/demo.py:N (the README shows them)."""
    from gradtrace import demo

    monkeypatch.chdir(tmp_path)  # not the checkout: the demo's file is outside the working directory
    assert frames.short_path(demo.__file__) == os.path.join("gradtrace", "demo.py")
    assert frames.short_path(os.path.join(SITE, "transformers", "trainer.py")) == "transformers/trainer.py"
    assert frames.short_path(str(tmp_path / "train.py")) == "train.py"
    elsewhere = os.path.join(os.sep, "opt", "jobs", "train.py")
    assert frames.short_path(elsewhere) == elsewhere  # the user's own file outside: as it is
