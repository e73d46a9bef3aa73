"""What a live trace is handed, and how it is entered: a clear ``GradtraceError`` for each misuse.

Issue 24 items 9 and 11: ``scalar`` of an int too large for a float (OverflowError), of a
meta tensor, of a complex number (recorded as 0.0); ``tensor`` of a nested tensor;
re-entering one ``watch(...)`` object; two threads entering ``watch(m)`` at once (the
overlap check was not atomic: both succeeded about once in 500).
"""
from __future__ import annotations

import sys
import threading

import pytest
import torch
from torch import nn

import gradtrace
from gradtrace import GradtraceError


@pytest.fixture
def trace():
    with gradtrace.watch(nn.Linear(2, 2)) as t:
        yield t


@pytest.mark.parametrize("value, says", [
    (10 ** 400, "does not fit a float"),
    (-(10 ** 5000), "does not fit a float"),  # too many digits even to print
    (1j, "complex"),
    (complex(2.5, 0.0), "complex"),
    (torch.tensor(0.5j), "complex"),
    (torch.empty((), device="meta"), "meta tensor"),
], ids=["int_10e400", "int_10e5000", "complex", "complex_zero_imag", "complex_tensor", "meta_tensor"])
def test_scalar_refuses_what_is_not_a_real_float(trace, value, says):
    with pytest.raises(GradtraceError, match=says):
        trace.scalar("s", value)
    assert "s" not in trace.scalars  # nothing recorded


def test_scalar_still_takes_real_numbers_and_one_element_tensors(trace):
    assert trace.scalar("a", 10 ** 300) == 1e300
    assert trace.scalar("b", torch.tensor([2.5], dtype=torch.float16)) == 2.5
    assert trace.scalar("c", torch.tensor(3.0).to_sparse()) == 3.0
    assert trace.scalars["a"].value == 1e300


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
def test_nested_tensors_are_refused_with_what_to_do(trace, layout):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype
        nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=layout)
    with pytest.raises(GradtraceError, match="to_padded_tensor"):
        trace.tensor("rows", nested)
    with pytest.raises(GradtraceError, match="nested tensor"):
        trace.scalar("rows", nested)
    assert "rows" not in trace.tensors


def test_a_watch_is_entered_once():
    model = nn.Linear(2, 2)
    watching = gradtrace.watch(model)
    with watching as trace:
        with pytest.raises(GradtraceError, match="already entered"):
            watching.__enter__()  # nested in itself
        model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(GradtraceError, match="already entered"):
        with watching:
            pass
    assert len(trace.passes) == 1
    with gradtrace.watch(model) as again:  # nothing stayed registered: a new watch works
        model(torch.ones(1, 2)).sum().backward()
    assert len(again.passes) == 1


def test_two_threads_entering_watch_on_one_model_never_both_succeed():
    """A barrier releases both threads together, many times; the interpreter switches threads as often
    as it can. Counting outcomes, not timing: exactly one entry may succeed each time."""
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(100)])
    tries, both, none = 40, 0, 0
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(tries):
            start = threading.Barrier(2)
            entered, refused = [], []

            def enter(start=start, entered=entered, refused=refused):
                start.wait()
                watching = gradtrace.watch(model, cuts="off")
                try:
                    watching.__enter__()
                    entered.append(watching)
                except GradtraceError as e:
                    refused.append(str(e))

            threads = [threading.Thread(target=enter) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            both += len(entered) == 2
            none += not entered
            for watching in entered:
                watching.__exit__(None, None, None)
            assert all("already watched" in message for message in refused)
    finally:
        sys.setswitchinterval(interval)
    assert (both, none) == (0, 0), f"both entered in {both} of {tries} tries, neither in {none}"
