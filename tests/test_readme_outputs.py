"""Golden tests: every README/docs block that shows a command's output is that command's output.

Text is compared exactly. Numbers are compared to 1e-5 relative: their last
digits move with the number of intra-op threads (the order of float sums),
which is the machine's, not gradtrace's (the demo's deltaH1 is -6.371714e-10
on one thread and -6.371689e-10 on two: 4e-6 apart). In a shown block, a line that is just
``...`` stands for any number of lines, and a line ending in ``...`` for any
line that begins with it (long lines are cut). The demo's figures come from
torch 2.13's random streams: on another torch release these are skipped.

(The demo and diff blocks live in docs/cli.md; the README's worked example has its own exact golden test in test_api.py;
benchmark timings are measurements, not golden output.)
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,  # the demo's scenarios, in subprocesses
    pytest.mark.skipif(not torch.__version__.startswith("2.13."),
                       reason="the shown figures come from torch 2.13's random number streams"),
]
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def block(document: str, starts_with: str) -> str:
    """The ```text block of ``document`` (a path under the repo) whose first line starts with ``starts_with``."""
    text = (ROOT / document).read_text()
    found = [b for b in re.findall(r"```text\n(.*?)```", text, flags=re.S) if b.startswith(starts_with)]
    assert len(found) == 1, f"{document}: {len(found)} text blocks start with {starts_with!r}"
    return found[0]


def _tokens(line: str):
    parts = NUMBER.split(line)
    numbers = NUMBER.findall(line)
    return parts, numbers


def same_line(shown: str, actual: str) -> bool:
    prefix = shown.endswith("...")
    if prefix:
        shown = shown[:-3]
    shown_parts, shown_numbers = _tokens(shown)
    actual_parts, actual_numbers = _tokens(actual.rstrip() if not prefix else actual)
    if prefix:
        actual_parts, actual_numbers = actual_parts[:len(shown_parts)], actual_numbers[:len(shown_numbers)]
        if len(actual_parts) < len(shown_parts) or not actual_parts[-1].startswith(shown_parts[-1]):
            return False
        actual_parts[-1] = shown_parts[-1]
    else:
        shown_parts[-1] = shown_parts[-1].rstrip()
    if shown_parts != actual_parts or len(shown_numbers) != len(actual_numbers):
        return False
    pairs = zip(shown_numbers, actual_numbers, strict=True)
    return all(float(a) == pytest.approx(float(s), rel=1e-5, abs=0) for s, a in pairs)


def assert_shows(shown: str, actual: str) -> None:
    """``actual`` (a command's output) is what ``shown`` shows, line by line, with the rules above."""
    want, got = shown.rstrip("\n").splitlines(), actual.rstrip("\n").splitlines()
    i = 0
    for k, line in enumerate(want):
        if line.strip() == "...":
            following = want[k + 1] if k + 1 < len(want) else None
            while i < len(got) and (following is None or not same_line(following, got[i])):
                i += 1
            continue
        assert i < len(got), f"the output ends before the shown line {line!r}"
        assert same_line(line, got[i]), f"shown:  {line}\nactual: {got[i]}"
        i += 1
    assert i == len(got) or want[-1].strip() == "...", f"the output goes on: {got[i]!r}"


def test_matching_rules():
    assert same_line("norm 6.551e-01 -> x", "norm 6.5510001e-01 -> x")
    assert not same_line("norm 6.551e-01 -> x", "norm 6.552e-01 -> x")
    assert not same_line("coverage gap: blocks.*", "coverage gap: blocks.{0,1}")
    assert same_line("| 2 | error | long...", "| 2 | error | long line, cut in the README |")
    assert_shows("a\n...\nz 1.0", "a\nb\nc\nz 1.000001")
    with pytest.raises(AssertionError):
        assert_shows("a\nz", "a\nb\nz")


def gradtrace_cli(*args, cwd=ROOT) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "gradtrace", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)
    return done.stdout


def test_cli_page_demo_bug_all():
    assert_shows(block("docs/cli.md", "healthy "), gradtrace_cli("demo", "--bug", "all"))


def test_cli_page_demo_story(tmp_path):
    """Run from another directory: the locations it prints do not depend on where gradtrace sits."""
    assert_shows(block("docs/cli.md", "gradtrace demo, the entropy probe"), gradtrace_cli("demo", cwd=tmp_path))


def test_cli_page_diff_and_the_table_names_modules_as_the_verdict_does(tmp_path):
    gradtrace_cli("demo", "--healthy", "--save", "healthy.json", cwd=tmp_path)
    gradtrace_cli("demo", "--bug", "adapters_bypassed", "--save", "bypassed.json", cwd=tmp_path)
    out = gradtrace_cli("diff", "healthy.json", "bypassed.json", "Y", "Y", "--format", "markdown",
                        "--fail-on", "error", cwd=tmp_path)
    shown = block("docs/cli.md", "$ python -m gradtrace diff").split("\n", 1)[1].rsplit("exit 1", 1)[0]
    assert_shows(shown, out)
    # the table and the verdict (Markdown-escaped) name the same group, blocks.*
    assert "`blocks.*.fc.lora_A`" in out and "blocks.\\*.fc.lora\\_A \\(2 params\\)" in out and "{0,1}" not in out


def test_docs_plain_loop_output(tmp_path):
    (tmp_path / "docs" / "images").mkdir(parents=True)  # the example writes its plots there
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "examples" / "plain_loop.py")], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=600, check=True)
    assert_shows(block("docs/plain-loop.md", "step 0:"), done.stdout)


def _pytest_page_run(tmp_path, code: str, name: str) -> str:
    (tmp_path / name).write_text(code)
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["gradtrace.pytest_plugin"]\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=600)
    return done.stdout


def _assertion_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith("E "))


def test_pytest_page_outputs(tmp_path):
    """docs/pytest.md: the failing test's assertion message, and the one without allow_zero (an info finding about
    the failing parameters says why)."""
    page = (ROOT / "docs" / "pytest.md").read_text()
    code = re.search(r"## Real output: a detached adapter\n\n```python\n(.*?)```", page, flags=re.S).group(1)
    shown = _assertion_lines(block("docs/pytest.md", "$ python -m pytest -q test_adapters.py"))
    assert_shows(shown, _assertion_lines(_pytest_page_run(tmp_path, code, "test_adapters.py")))
    fixed_but_strict = code.replace(', allow_zero=["*.lora_A.*"]', "").replace(".detach())", ")")
    shown = block("docs/pytest.md", "E       AssertionError: gradients do not flow: 2 of 4 checked parameter(s) "
                                    "failed\nE         2 got an exactly zero gradient")
    assert_shows(shown, _assertion_lines(_pytest_page_run(tmp_path, fixed_but_strict, "test_strict.py")))
