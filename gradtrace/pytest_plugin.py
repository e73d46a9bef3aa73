"""pytest plugin: the ``gradtrace_flow`` fixture.

Opt in from a conftest.py, with ``pytest_plugins = ["gradtrace.pytest_plugin"]``
or ``from gradtrace.pytest_plugin import gradtrace_flow``. It is deliberately
not a ``pytest11`` entry point: pytest loads those in every session, and
importing this module imports the gradtrace package and torch (6-7 s on a
loaded 2-core machine, measured) -- a cost for every test suite in the
environment, not only the ones that use the fixture.
"""
import pytest


@pytest.fixture
def gradtrace_flow():
    """``gradtrace_flow(model, loss_fn, *args, frozen=..., allow_zero=...)``: see ``assert_grads_flow``."""
    from .testing import assert_grads_flow

    return assert_grads_flow
