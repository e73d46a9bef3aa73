"""The bug scenarios of ``tests/scenarios.py``: the first line names the cause; the fixed twin is clean.

Each scenario is a bug users report, rebuilt on real torch / transformers / peft
code; its twin is the same code with the fix. ``python tests/scenarios.py``
prints the suite's first-line accuracy (also against another gradtrace, with
PYTHONPATH).
"""
import pytest

from scenarios import HEALTHY, SCENARIOS, judge, serious


def marks(s):
    return [pytest.mark.slow] if s.slow else []


CASES = [pytest.param(s, id=s.name, marks=marks(s)) for s in SCENARIOS]


@pytest.mark.parametrize("s", CASES)
def test_the_first_line_names_the_cause(s):
    trace = s.run(False)
    ok, line = judge(s, trace)
    assert ok, f"{s.name} ({s.source}): expected {s.expect} naming {s.names}, got:\n{line}"
    assert trace.verdicts()[0].code == s.expect


@pytest.mark.parametrize("s", CASES)
def test_the_fixed_twin_has_no_error_or_warning(s):
    found = serious(s.run(True))
    assert found == [], [str(v) for v in found]


def test_the_suite_covers_many_codes():
    assert len(SCENARIOS) >= 20
    assert len({s.expect for s in SCENARIOS}) >= 12


HEALTHY_CASES = [pytest.param(run, id=name, marks=[pytest.mark.slow] if "trl" in name or "trainer" in name else [])
                 for name, run in HEALTHY]


@pytest.mark.parametrize("run", HEALTHY_CASES)
def test_healthy_runs_give_no_error_or_warning(run):
    found = serious(run())
    assert found == [], [str(v) for v in found]
