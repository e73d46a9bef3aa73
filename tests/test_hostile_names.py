"""Names from a trace file or a model are text from someone else (issue 24, items 9 and 10).

* ``--format markdown`` (for ``$GITHUB_STEP_SUMMARY``): a backtick or newline in a pass or
  parameter name broke out of its code span; links, images and HTML rendered, rows were forged.
  Checked with a real CommonMark + GFM-tables parser (markdown-it-py).
* a parameter name with 5,000 digits: ``report()`` raised ValueError, ``show`` printed a traceback.
* ``assert_grads_flow``'s message carried raw escape sequences from parameter names; ``loss_fn=None``
  raised TypeError.
"""
from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
from torch import nn

import gradtrace
from gradtrace import GradtraceError, cli
from gradtrace.render import formats
from gradtrace.testing import assert_grads_flow
from test_typed_records import LEGACY

HOSTILE = [
    "a`b", "``tick``", "`", "x\n| forged | row |", "[click](https://evil.example)", "![img](https://evil.example/i.png)",
    "<img src=x onerror=alert(1)>", "**bold** _em_ ~~s~~", "pipe|in|name", "back\\slash`", " spaced ", "\x1b[31mred",
    "&lt;entity&gt;", "#heading", "a\u202eb",
]


def load_with_names(tmp_path, pass_name, param_name, module=None):
    doc = json.loads(LEGACY.read_text())
    doc["passes"][0]["name"] = pass_name
    old = "head.bias"
    doc["params"][doc["params"].index(old)] = param_name
    for p in doc["passes"]:
        if old in p["records"]:
            record = p["records"].pop(old)
            record["name"] = param_name
            p["records"][param_name] = record
    for t in doc["tensors"]:
        if t.get("reachable") and old in t["reachable"]:
            t["reachable"][t["reachable"].index(old)] = param_name
    for s in doc["inner_products"]:
        for c in s["top"]:
            if c["param"] == old:
                c["param"] = param_name
    doc["rank_coverage"] = doc["rank_figures"] = None
    if module is not None:
        doc["cuts"][0]["module"] = module
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    return path


def markdown_it():
    mdit = pytest.importorskip("markdown_it")
    return mdit.MarkdownIt("commonmark").enable("table")


def inline_tokens(tokens):
    for token in tokens:
        yield token
        yield from inline_tokens(token.children or [])


def structure(markdown: str) -> Counter:
    """Every token kind but text and code spans, counted: headings, the bold diagnosis, tables, rows,
    cells, and anything a name should never make (links, images, HTML, emphasis, line breaks)."""
    return Counter(t.type for t in inline_tokens(markdown_it().parse(markdown))
                   if t.type not in ("text", "code_inline"))


def code_spans(markdown: str) -> list:
    return [t.content for t in inline_tokens(markdown_it().parse(markdown)) if t.type == "code_inline"]


def undotted(name: str) -> str:
    """The hostile name as a parameter of module ``head`` (a dot would make another module, another row)."""
    return name.replace(".", "_")


def markdown_of(capsys, argv) -> str:
    assert cli.main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_markdown_keeps_every_name_inside_its_code_span(tmp_path, capsys, name):
    """The report of a trace whose pass, parameter and module names are hostile has exactly the structure
    of the same trace with plain names, and each hostile name is one whole code span."""
    plain = markdown_of(capsys, ["show", str(load_with_names(tmp_path, "P", "head.p", module="blocks.m")),
                                 "--format", "markdown"])
    hostile = markdown_of(capsys, ["show", str(load_with_names(tmp_path, name, "head." + undotted(name),
                                                                module="blocks." + name)), "--format", "markdown"])
    assert structure(hostile) == structure(plain)
    assert not {"link_open", "image", "html_inline", "html_block", "em_open", "s_open", "softbreak",
                "hardbreak"} & set(structure(hostile))
    shown = gradtrace.render.text.safe(name, newlines=False)
    spans = code_spans(hostile)
    assert shown in spans or shown.strip() in spans  # CommonMark strips the padding a leading backtick needs
    assert any(s in (f"blocks.{shown}", f"blocks.{shown}".strip()) for s in spans)


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_markdown_diff_keeps_names_inside_code_spans(tmp_path, capsys, name):
    plain = markdown_of(capsys, ["diff", str(load_with_names(tmp_path, "P", "head.p")), "P", "Y",
                                 "--format", "markdown"])
    path = load_with_names(tmp_path, name, "head." + undotted(name))
    hostile = markdown_of(capsys, ["diff", str(path), name, "Y", "--format", "markdown"])
    assert structure(hostile) == structure(plain)


def test_markdown_text_escapes_what_would_render():
    assert formats._text("[x](y) ![i](j) <b> *a* _b_ `c`") == \
        "\\[x\\]\\(y\\) \\!\\[i\\]\\(j\\) \\<b\\> \\*a\\* \\_b\\_ \\`c\\`"
    assert formats._code("a``b") == "```a``b```" and formats._code("`x") == "`` `x ``"
    assert formats._code("line\nbreak") == "`line\\x0abreak`"


def file_with_indices(tmp_path, digits: int):
    doc = json.loads(LEGACY.read_text())
    names = [f"layers.{'9' * digits}.fc.w", f"layers.{'1' * digits}.fc.w", "layers.\u00b2.fc.w", "layers.\u0663.fc.w"]
    doc["params"] += names + ["layers.5.fc.w"]  # a member no pass reaches: the others are listed, not "*"
    doc["passes"][0]["records"].update({n: {"name": n, "hits": 1, "norm": 1.0, "max_abs": 1.0} for n in names[:2]})
    doc["passes"][1]["records"].update({n: {"name": n, "hits": 1, "norm": 1.0, "max_abs": 1.0} for n in names[2:]})
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("digits", [4100, 50])
def test_parameter_names_with_long_or_odd_indices_report(tmp_path, capsys, digits):
    """Regression: ``layers.<5,000 digits>.w`` made report() raise ValueError (int() of the index), and
    ``layers.².w`` (isdigit() but not int()) broke the plot; 4,100 digits is the longest a file may hold."""
    path = file_with_indices(tmp_path, digits)
    trace = gradtrace.load(path)
    grouped = f"layers.{{{'1' * digits},{'9' * digits}}}.fc"  # in numeric order, without int()
    assert any(grouped in v.message for v in trace.verdicts()) and trace.report()
    assert cli.main(["show", str(path)]) == 0
    out = capsys.readouterr()
    assert out.err == "" and "Traceback" not in out.out


@pytest.mark.parametrize("digits", [pytest.param(4100, marks=pytest.mark.slow), 50])  # 4,100: ~10 s of layout
def test_parameter_names_with_long_or_odd_indices_plot(tmp_path, digits):
    pytest.importorskip("matplotlib")
    trace = gradtrace.load(file_with_indices(tmp_path, digits))
    for kind in ("flow", "coverage"):
        assert trace.plot(tmp_path / f"{kind}.png", kind=kind) is not None
        assert (tmp_path / f"{kind}.png").stat().st_size > 0


def test_a_file_with_a_5000_digit_parameter_name_is_a_gradtrace_error(tmp_path, capsys):
    """Regression: `show` printed a traceback; now the name is longer than a file's strings may be."""
    path = file_with_indices(tmp_path, 5000)
    assert cli.main(["show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradtrace: error: ") and "params[8]: expected a string of at most" in err


def test_a_live_trace_with_a_5000_digit_module_key_reports():
    """A ModuleDict key can be any string: the live trace (whose names are not limited) still reports, and
    the two long indices a coverage gap concerns are listed in numeric order."""
    long_a, long_b = "7" * 5000, "8" * 5000
    model = nn.ModuleDict({"layers": nn.ModuleDict({k: nn.Sequential(nn.Linear(2, 2)) for k in (long_b, long_a, "5")})})
    layers = model["layers"]
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            (layers[long_a](torch.randn(3, 2)).sum() + layers[long_b](torch.randn(3, 2)).sum()).backward()
        with trace.pass_("Y"):
            layers["5"](torch.randn(3, 2)).sum().backward()
    gaps = [v.message for v in trace.verdicts() if v.code == "COVERAGE_GAP"]
    assert any(f"layers.{{{long_a},{long_b}}}.0" in m for m in gaps)
    assert trace.report().startswith("gradtrace diagnosis:")


class Named(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.body = nn.ModuleDict({name: nn.Linear(3, 3), "ok": nn.Linear(3, 1)})
        self.key = name

    def forward(self, x):
        return self.body["ok"](self.body[self.key](x).detach())


def test_assert_grads_flow_escapes_names_in_its_message():
    """Regression: a ModuleDict key holding an escape sequence reached the assertion message raw."""
    torch.manual_seed(0)
    model = Named("evil\x1b]0;pwned\x07\x1b[2J")
    with pytest.raises(AssertionError) as info:
        assert_grads_flow(model, lambda m, x: m(x).sum(), torch.randn(2, 3))
    message = str(info.value)
    assert "\x1b" not in message and "\x07" not in message
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J" in message and "\n" in message  # escaped, still multi-line


@pytest.mark.parametrize("loss_fn", [None, 3, "loss"])
def test_assert_grads_flow_refuses_a_loss_fn_that_is_not_callable(loss_fn):
    """Regression: loss_fn=None raised TypeError from inside the watch."""
    model = nn.Linear(2, 1)
    with pytest.raises(GradtraceError, match="loss_fn is called as loss_fn"):
        assert_grads_flow(model, loss_fn, torch.randn(2, 2))
    assert all(p.grad is None for p in model.parameters())
    copy.deepcopy(model)  # nothing of gradtrace's was left on it
