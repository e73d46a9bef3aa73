"""Machine-readable and Markdown renderings of a trace or a diff, for scripts and CI.

``python -m gradtrace show/diff --format markdown|json`` print these;
``--fail-on`` uses ``fails``. Written against the read API (``passes``,
``verdicts()``, ``cuts``) so a loaded trace renders like a live one.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, List

from tabulate import tabulate

from ..analysis.cuts import outermost_cuts
from ..analysis.registry import SEVERITY_RANK
from ..records import ReadsLikeADict, Verdict
from .report import diagnosis, sci
from .text import safe

FAIL_ON = ("error", "warning", "never")
FORMATS = ("table", "markdown", "json")


def fails(verdicts: List[Verdict], fail_on: str) -> bool:
    """True when a verdict at or above ``fail_on`` exists ("never": never)."""
    if fail_on == "never":
        return False
    worst = SEVERITY_RANK[fail_on]
    return any(SEVERITY_RANK[v.severity] <= worst for v in verdicts)


# ---- JSON ----------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON-safe: sets sorted into lists, NaN/Inf as the strings 'nan'/'inf' (as trace files store them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, ReadsLikeADict):  # InnerProduct, NonfiniteOrigin: the keys a trace file stores
        return {k: _plain(value[k]) for k in value.keys()}
    if isinstance(value, (set, frozenset)):
        return [_plain(v) for v in sorted(value, key=str)]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def pass_summary(p) -> Dict[str, Any]:
    total = len(p.params)
    return {"name": p.name, "via": list(p.kinds), "runs": p.runs, "params": total, "covered": len(p.covered),
            "coverage": len(p.covered) / total if total else 0.0, "missing": sorted(p.missing),
            "zero": sorted(p.zero), "total_norm": p.total_norm, "max_abs": p.max_abs, "nonfinite": p.nonfinite}


def verdict_summary(v: Verdict) -> Dict[str, Any]:
    return {"code": v.code, "severity": v.severity, "message": v.message, "evidence": v.evidence}


def trace_json(trace, verdicts: List[Verdict]) -> str:
    data = {"diagnosis": diagnosis(verdicts), "passes": [pass_summary(p) for p in trace.passes.values()],
            "verdicts": [verdict_summary(v) for v in verdicts]}
    return json.dumps(_plain(data), indent=1, allow_nan=False)


def diff_json(d, verdicts: List[Verdict]) -> str:
    data = {"a": d.a, "b": d.b, "only_a": sorted(d.only_a), "only_b": sorted(d.only_b), "both": sorted(d.both),
            "norm_a": d.norm_a, "norm_b": d.norm_b, "by_module": d.by_module(), "ratios": d.ratios,
            "inner": d.inner, "verdicts": [verdict_summary(v) for v in verdicts]}
    return json.dumps(_plain(data), indent=1, allow_nan=False)


# ---- Markdown --------------------------------------------------------------------------------
# Names, messages and locations come from the trace file: in Markdown a backtick could close a code
# span, a newline end a table row, and [text](url) / ![](url) / <tag> render as links, images and HTML.
# Text is escaped (``_text``), names sit in code spans nothing inside can close (``_code``), and a
# cell never holds a raw newline or an unescaped '|'.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!~&])")
_BACKTICKS = re.compile(r"`+")


def _text(message: Any) -> str:
    """Plain Markdown text: no emphasis (rolled-up names such as ``blocks.*.fc``), links, images or HTML."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", safe(str(message), newlines=False))


def _code(name: Any) -> str:
    """``name`` as a code span: fenced by more backticks than it holds in a row, padded when it starts or
    ends with a backtick or a space (Markdown strips one space from each side)."""
    text = safe(str(name), newlines=False)
    fence = "`" * (max(map(len, _BACKTICKS.findall(text)), default=0) + 1)
    pad = " " if text[:1] in ("`", " ") or text[-1:] in ("`", " ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _md(rows: List[List[Any]], headers: List[str]) -> str:
    """A GitHub table; '|' inside a cell (code spans too) is escaped so nothing breaks the table."""
    def cell(c: Any) -> str:
        return safe(str(c), newlines=False).replace("|", "\\|")

    return tabulate([[cell(c) for c in row] for row in rows], headers=[cell(h) for h in headers],
                    tablefmt="github", disable_numparse=True)


def _md_verdicts(verdicts: List[Verdict]) -> str:
    if not verdicts:
        return ""
    rows = [[i, v.severity, _code(v.code), _text(v.message)] for i, v in enumerate(verdicts, 1)]
    return "### Verdicts (most likely root cause first)\n\n" + _md(rows, ["#", "severity", "code", "message"])


def trace_markdown(trace, verdicts: List[Verdict]) -> str:
    n = len(trace.params)
    rows = [[_code(p.name), "/".join(p.kinds) or "-", p.runs, f"{len(p.covered)}/{n}", len(p.zero),
             sci(p.total_norm), sci(p.max_abs), p.nonfinite] for p in trace.passes.values()]
    sections = [f"**{_text(diagnosis(verdicts))}**", "### Passes\n\n" + _md(
        rows, ["pass", "via", "runs", "covered", "zero", "total norm", "max |g|", "nonfinite"])]
    sections.append(_md_verdicts(verdicts))
    cuts = outermost_cuts(list(trace.cuts))
    if cuts:
        rows = [[c.kind, _code(c.module or "(root)"), _code(c.op) if c.op else "", _code(c.pass_name or "-"),
                 c.count, _code(c.location)] for c in cuts]
        sections.append("### Graph cuts\n\n" + _md(rows, ["kind", "module", "op", "pass", "seen", "location"]))
    return "\n\n".join(s for s in sections if s)


def diff_markdown(d, verdicts: List[Verdict]) -> str:
    a, b = _code(d.a), _code(d.b)
    head = (f"**diff {a} vs {b}**: {len(d.both)} reached in both, {len(d.only_a)} only in {a}, "
            f"{len(d.only_b)} only in {b}; total norm {sci(d.norm_a)} vs {sci(d.norm_b)}")
    rows = [[_code(r["module"]), r["only_a"], r["only_b"], r["both"]] for r in d.by_module()]
    headers = ["module", f"only {_text(d.a)}", f"only {_text(d.b)}", "both"]
    sections = [head, _md(rows, headers) if rows else ""]
    sections.append(_md_verdicts(verdicts))
    return "\n\n".join(s for s in sections if s)
