"""Shared fixtures: the model zoo, parametrized with readable ids."""
from __future__ import annotations

import pytest
import torch

from zoo import ZOO

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
