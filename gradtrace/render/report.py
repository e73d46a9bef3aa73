"""Render: the human report, as tabulate tables.

Every magnitude is printed in scientific notation: the bug that started this
project was a value that printed as 0.000000.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from tabulate import tabulate

from ..analysis import Diff, group_by_module, outermost_cuts

TABLE_FORMAT = "simple"
TOP_PARAMS = 10


def sci(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3e}"


def _table(rows: List[List[Any]], headers: List[str]) -> str:
    return tabulate(rows, headers=headers, tablefmt=TABLE_FORMAT, disable_numparse=True)


def report(trace) -> str:
    verdicts = trace.verdicts()
    passes = trace.passes
    sections = [diagnosis(verdicts), _summary(trace, passes), _per_rank(trace), _verdicts(verdicts)]
    if len(passes) >= 2:
        sections.append(_coverage_by_module(trace, passes))
    sections += [_top_params(passes), _cuts(trace), _tensors(trace), _scalars(trace), _inner(trace)]
    return "\n\n".join(s for s in sections if s) + "\n"


def diagnosis(verdicts) -> str:
    """The report's first line: the diagnosis in a sentence."""
    serious = [v for v in verdicts if v.severity != "info"]
    if not serious:
        return "gradtrace: no problems found."
    lead = serious[0]
    more = f" (+{len(serious) - 1} more findings below)" if len(serious) > 1 else ""
    return f"gradtrace diagnosis: {lead.code}: {lead.message}{more}"


def _summary(trace, passes) -> str:
    rows = []
    n = len(trace.params)
    for p in passes.values():
        expected = f"{len(p.expected)}{'+' if p.expected_partial else ''}" if p.expected is not None else "-"
        rows.append([p.name, "/".join(p.kinds) or "-", _scope(trace, p), p.runs, f"{len(p.covered)}/{n}",
                     expected, len(p.zero), sci(p.total_norm), sci(p.max_abs), p.nonfinite])
    if not rows:
        return "passes: none recorded"
    world = trace.meta.get("world_size")
    title = f"passes (merged over {world} ranks)" if world else "passes"
    return title + "\n" + _table(rows, ["pass", "via", "figures", "runs", "covered", "expected", "zero",
                                        "total norm", "max |g|", "nonfinite"])


def _scope(trace, p) -> str:
    """What the figures are: a shard's figures are global only once gathered."""
    if p.scope == "sharded":
        return "global (gathered shards)" if trace.meta.get("world_size") else "shard-local"
    return p.scope


def _per_rank(trace) -> str:
    """Each rank's own figures, for the passes whose figures differ across ranks."""
    out = []
    for name, per_rank in (getattr(trace, "rank_figures", None) or {}).items():
        rows = []
        for rank, figures in sorted(per_rank.items()):
            values = list(figures.values())
            rows.append([rank, f"{len(figures)}/{len(trace.params)}", sci(sum(v[0] ** 2 for v in values) ** 0.5),
                         sci(max((v[1] for v in values), default=0.0)), sum(v[2] for v in values)])
        out.append(f"per-rank figures in {name!r}\n" +
                   _table(rows, ["rank", "covered", "total norm", "max |g|", "nonfinite"]))
    return "\n\n".join(out)


def _verdicts(verdicts) -> str:
    if not verdicts:
        return ""
    rows = [[i + 1, v.severity, v.code, v.message] for i, v in enumerate(verdicts)]
    return "verdicts (most likely root cause first)\n" + tabulate(
        rows, headers=["#", "severity", "code", "message"], tablefmt=TABLE_FORMAT,
        maxcolwidths=[None, None, None, 100], disable_numparse=True)


def _coverage_by_module(trace, passes) -> str:
    names = list(passes)
    groups = group_by_module(trace.params)
    rows = []
    for module, params in groups.items():
        counts = [sum(1 for q in params if q in passes[n].covered) for n in names]
        if len(set(counts)) == 1 and counts[0] == len(params) and len(groups) > 12:
            continue  # long reports show only modules whose coverage is partial or differs
        rows.append([module, len(params)] + [f"{c}/{len(params)}" for c in counts])
    if not rows:
        return "coverage by module: every module fully covered in every pass"
    return "coverage by module\n" + _table(rows, ["module", "params"] + names)


def _top_params(passes) -> str:
    out = []
    for p in passes.values():
        if not p.records:
            continue
        top = sorted(p.records.values(), key=lambda r: -r.norm)[:TOP_PARAMS]
        rows = [[r.name, r.hits, sci(r.norm), sci(r.max_abs), "yes" if r.zero else "", r.nonfinite or ""]
                for r in top]
        out.append(f"top parameters in {p.name!r}\n" +
                   _table(rows, ["parameter", "hits", "norm", "max |g|", "zero", "nonfinite"]))
    return "\n\n".join(out)


def _cuts(trace) -> str:
    cuts = outermost_cuts(list(trace.cuts))
    if not cuts:
        return ""
    rows = [[c.kind, c.module or f"(root {c.module_type})", c.op or "", c.pass_name or "-", c.count,
             c.params, c.location] for c in cuts]
    return "graph cuts (outermost module of each region)\n" + _table(
        rows, ["kind", "module", "op", "pass", "seen", "trainable", "location"])


def _tensors(trace) -> str:
    tensors = trace.tensors
    if not tensors:
        return ""
    rows = []
    for t in tensors.values():
        v = t.values
        reached = ", ".join(f"{name}: {sci(f.norm)} x{f.hits}" for name, f in t.grads.items()) or "-"
        rg = "yes" if t.requires_grad else ("some" if t.requires_grad_calls else "no")
        reach = (f"{len(t.reachable)}{'+' if t.reach_partial else ''}" if t.reachable is not None else "-")
        const = f"{v.constant_rows}/{v.rows}" if v.rows else "-"
        rows.append([t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype, rg, t.grad_fn or "-", reach,
                     sci(v.min), sci(v.max), sci(v.std), f"{v.zero_fraction:.0%}", const, reached])
    return "registered tensors\n" + _table(rows, ["tensor", "shape", "dtype", "req. grad", "grad_fn",
                                                  "reaches", "min", "max", "std", "zeros", "const rows",
                                                  "grad norm per pass"])


def _scalars(trace) -> str:
    if not trace.scalars:
        return ""
    rows = [[s.name, sci(s.value), f"{s.value:.6f}", "PRINTS AS ZERO" if s.prints_as_zero else "",
             s.pass_name or "-"] for s in trace.scalars.values()]
    return "scalars\n" + _table(rows, ["scalar", "value", "as %.6f", "", "pass"])


def _inner(trace) -> str:
    out = []
    for s in trace.inner_products:
        out.append(render_inner(s))
    return "\n\n".join(out)


def render_inner(s: Dict[str, Any]) -> str:
    title = f"inner product <{s['a']}, {s['b']}>" + (f" preconditioned by {s.get('optimizer')}"
                                                      if s["preconditioned"] else "")
    rows = [["dot", sci(s["dot"])], ["cosine", sci(s["cosine"])],
            [f"norm {s['a']}", sci(s["norm_a"])], [f"norm {s['b']}", sci(s["norm_b"])]]
    if s["preconditioned"]:
        rows += [[f"norm {s['a']} preconditioned", sci(s.get("norm_a_pre"))],
                 [f"norm {s['b']} preconditioned", sci(s.get("norm_b_pre"))]]
    top = [[t["param"], sci(t["contribution"]), f"{t['share']:.1%}"] for t in s["top"]]
    return (title + "\n" + _table(rows, ["", "value"]) + "\n" +
            _table(top, ["dominant parameters", "contribution", "share"]))


class RenderedDiff(Diff):
    """A ``Diff`` whose ``str()`` is the rendered table (what ``Trace.diff`` returns)."""

    def __str__(self) -> str:
        return render_diff(self)


def rendered(d: Diff) -> RenderedDiff:
    return d if isinstance(d, RenderedDiff) else RenderedDiff(**{f: getattr(d, f) for f in d.__dataclass_fields__})


def render_diff(d: Diff) -> str:
    lines = [f"diff {d.a!r} vs {d.b!r}: {len(d.both)} reached in both, {len(d.only_a)} only in {d.a!r}, "
             f"{len(d.only_b)} only in {d.b!r}; total norm {sci(d.norm_a)} vs {sci(d.norm_b)}"]
    rows = [[r["module"], r["only_a"], r["only_b"], r["both"]] for r in d.by_module()]
    if rows:
        lines.append(_table(rows, ["module", f"only {d.a}", f"only {d.b}", "both"]))
    finite = [(n, r) for n, r in d.ratios.items() if r == r]
    if finite:
        extreme = sorted(finite, key=lambda x: abs(_log10(x[1])), reverse=True)[:TOP_PARAMS]
        lines.append(_table([[n, sci(r)] for n, r in extreme],
                            ["parameter", f"norm ratio {d.b}/{d.a}"]))
    if d.inner:
        lines.append(render_inner(d.inner))
    return "\n\n".join(lines)


def _log10(x: float) -> float:
    if x == 0:
        return -300.0
    if x == float("inf"):
        return 300.0
    return math.log10(abs(x))
