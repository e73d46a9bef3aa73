"""Shared by the tests: optional Hugging Face extras, source lines of cut locations, verdict codes."""
import linecache
import os

import pytest

try:
    import peft
    import transformers
except ImportError:  # optional test extras: the small-model tests still run
    peft = transformers = None

needs_hf = pytest.mark.skipif(transformers is None or peft is None, reason="needs transformers and peft")


def source_line(location: str, test_file: str) -> str:
    """The source line a cut points at; it must be in ``test_file``."""
    path, line = location.rsplit(":", 1)
    here = os.path.basename(test_file)
    assert os.path.basename(path) == here, f"cut location {location!r} is not in {here}"
    return linecache.getline(path, int(line))


def verdicts_of(trace, code):
    return [v for v in trace.verdicts() if v.code == code]


def codes(trace):
    """The verdict codes of ``trace``, most likely cause first."""
    return [v.code for v in trace.verdicts()]
