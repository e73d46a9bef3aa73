"""Shared fixtures: the model zoo, parametrized with readable ids."""
from __future__ import annotations

import os

import pytest
import torch

import gradtrace
from zoo import ZOO

if os.environ.get("GRADTRACE_EXPECT_INSTALLED"):  # CI's run against the built wheel
    _source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gradtrace")
    assert os.path.dirname(os.path.abspath(gradtrace.__file__)) != _source, (
        f"the tests import gradtrace from the source tree ({gradtrace.__file__}), not the installed wheel")

# Tests use tiny tensors: a second intra-op thread only contends for a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(params=ZOO, ids=[case.name for case in ZOO])
def zoo_case(request):
    """``(name, model, make_inputs, loss_fn)`` for every model in the zoo, freshly built."""
    model, make_inputs, loss_fn = request.param.build()
    return request.param.name, model, make_inputs, loss_fn


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
