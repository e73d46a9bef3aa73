"""The packaging contract: public names, light import, the README's example runs."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gradtrace

ROOT = Path(__file__).resolve().parents[1]


def test_public_names():
    assert set(gradtrace.__all__) == {
        "watch", "load", "Trace", "PassTrace", "GradRecord", "TensorRecord", "TensorGradFacts", "ValueStats",
        "ScalarRecord", "Cut", "Diff", "Verdict", "TraceMeta", "InnerProduct", "Contribution", "NonfiniteOrigin",
        "GradtraceError", "__version__"}
    for name in gradtrace.__all__:
        assert getattr(gradtrace, name) is not None
    assert issubclass(gradtrace.GradtraceError, Exception)


@pytest.mark.slow  # a fresh interpreter importing torch
def test_import_registers_nothing_and_pulls_nothing_heavy():
    code = ("import sys, torch; before = set(sys.modules); import gradtrace; "
            "heavy = {'transformers', 'peft', 'matplotlib', 'hypothesis'} & set(sys.modules); "
            "print(sorted(heavy)); "
            "from torch.nn.modules import module as m; print(len(m._global_forward_hooks))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "0"


@pytest.mark.slow
def test_readme_worked_example_prints_exactly_the_output_shown(tmp_path):
    """Golden output: the README's example, run as ``python example.py``, prints the README's text."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(b for b in blocks if "gradtrace.watch" in b and "report()" in b)
    shown = re.search(r"Real output \(run as `python example.py`; a test keeps it exact\):\n\n```text\n(.*?)```", readme, flags=re.S).group(1)
    (tmp_path / "example.py").write_text(example)
    # Locations under the working directory are printed relative to it: example.py:LINE.
    result = subprocess.run([sys.executable, "example.py"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == shown


@pytest.mark.slow  # a fresh interpreter
def test_submodules_named_in_the_readme_work_after_a_plain_import_gradtrace():
    """The README's ``gradtrace.testing.assert_grads_flow`` and ``gradtrace.integrations.<framework>``
    after ``import gradtrace`` alone (an AttributeError before); still no torch until one is named."""
    child = ("import sys, gradtrace\n"
             "assert 'torch' not in sys.modules\n"
             "assert gradtrace.testing.assert_grads_flow.__name__ == 'assert_grads_flow'\n"
             "assert gradtrace.integrations.steps.StepTracer.__name__ == 'StepTracer'\n"
             "for bad in ('gradtrace.nothing', 'gradtrace.integrations.nothing'):\n"
             "    try:\n"
             "        eval(bad)\n"
             "    except AttributeError:\n"
             "        pass\n"
             "    else:\n"
             "        raise SystemExit(bad + ' resolved')\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
