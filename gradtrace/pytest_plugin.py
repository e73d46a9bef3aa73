"""pytest plugin: the ``gradtrace_flow`` fixture.

Registered through the ``pytest11`` entry point when gradtrace is installed;
without installing, add ``from gradtrace.pytest_plugin import gradtrace_flow``
to a conftest.py. Only pytest imports this module (it imports pytest).
"""
import pytest

from .testing import assert_grads_flow


@pytest.fixture
def gradtrace_flow():
    """``gradtrace_flow(model, loss_fn, *args, frozen=..., allow_zero=...)``: see ``assert_grads_flow``."""
    return assert_grads_flow
