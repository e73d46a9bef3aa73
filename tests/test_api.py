"""The packaging contract: public names, light import, the README's example runs."""
import re
import subprocess
import sys
from pathlib import Path

import gradtrace

ROOT = Path(__file__).resolve().parents[1]


def test_public_names():
    assert set(gradtrace.__all__) == {
        "watch", "load", "Trace", "PassTrace", "GradRecord", "TensorRecord", "TensorGradFacts", "ValueStats",
        "ScalarRecord", "Cut", "Diff", "Verdict", "GradtraceError", "__version__"}
    for name in gradtrace.__all__:
        assert getattr(gradtrace, name) is not None
    assert issubclass(gradtrace.GradtraceError, Exception)


def test_import_registers_nothing_and_pulls_nothing_heavy():
    code = ("import sys, torch; before = set(sys.modules); import gradtrace; "
            "heavy = {'transformers', 'peft', 'matplotlib', 'hypothesis'} & set(sys.modules); "
            "print(sorted(heavy)); "
            "from torch.nn.modules import module as m; print(len(m._global_forward_hooks))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "0"


def test_readme_example_runs_and_shows_real_output(tmp_path):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(b for b in blocks if "gradtrace.watch" in b and "report()" in b)
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "verdicts" in result.stdout or "no problems found" in result.stdout
