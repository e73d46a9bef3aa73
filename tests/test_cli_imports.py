"""The command line reads traces without torch (issue 25, item 5).

Every CLI call imported torch (``cli._parser()`` imported ``gradtrace.demo`` to list the demo's
bugs): 2.5-3.1 s of CPU where reading a trace needs 0.1 s. Only ``demo`` needs torch. One fresh
interpreter runs each command in turn and reports, after each, whether torch was imported.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_typed_records import LEGACY

CHILD = r"""
import contextlib, io, json, sys
from gradtrace import cli
seen = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(argv)
    seen.append({"argv": argv, "code": code, "torch": "torch" in sys.modules, "out": out.getvalue()[:200]})
print(json.dumps(seen))
"""


def run_in_fresh_interpreter(commands):
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(commands)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow  # a fresh interpreter (and matplotlib for plot)
def test_help_version_show_diff_and_plot_do_not_import_torch(tmp_path):
    trace = str(LEGACY)
    commands = [["--help"], ["--version"], ["show", "--help"], ["show", trace], ["show", trace, "--format", "json"],
                ["show", trace, "--format", "markdown"], ["diff", trace, "X", "Y"], ["diff", trace, trace, "X", "Y"],
                ["plot", trace, "-o", str(tmp_path / "flow.png")], ["show", str(tmp_path / "missing.json")]]
    seen = run_in_fresh_interpreter(commands)
    assert [r["code"] for r in seen] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 2], seen
    assert [r["argv"] for r in seen if r["torch"]] == []
    assert (tmp_path / "flow.png").stat().st_size > 0


@pytest.mark.slow  # two fresh interpreters that import torch
def test_only_demo_imports_torch_and_it_still_lists_the_bugs():
    seen = run_in_fresh_interpreter([["--version"], ["demo", "--help"]])
    version, demo_help = seen
    assert not version["torch"] and demo_help["torch"] and demo_help["code"] == 0
    from gradtrace.demo import BUGS
    proc = subprocess.run([sys.executable, "-m", "gradtrace", "demo", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0
    assert all(f"  {name:<21} {line}" in proc.stdout for name, line in BUGS.items())


def test_an_unknown_bug_is_a_usage_error(capsys):
    from gradtrace import cli
    assert cli.main(["demo", "--bug", "no_such_bug"]) == 2
    err = capsys.readouterr().err
    assert "argument --bug: invalid choice: 'no_such_bug' (choose from tiny_lr, " in err
