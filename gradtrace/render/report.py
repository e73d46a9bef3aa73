"""Render: the human report, as tabulate tables.

Every magnitude is printed in scientific notation: the bug that started this
project was a value that printed as 0.000000.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from tabulate import tabulate

from ..analysis import Diff, group_by_module, outermost_cuts
from ..analysis.names import display_name
from ..records import InnerProduct
from .long_runs import LIST_EACH_UP_TO, collapse_verdicts, group_passes, recurrence
from .text import safe

TABLE_FORMAT = "simple"
TOP_PARAMS = 10


def sci(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3e}"


def _table(rows: List[List[Any]], headers: List[str]) -> str:
    # Names come from the trace file: a newline in one must not start a forged row.
    rows = [[safe(c, newlines=False) if isinstance(c, str) else c for c in row] for row in rows]
    headers = [safe(h, newlines=False) for h in headers]
    return tabulate(rows, headers=headers, tablefmt=TABLE_FORMAT, disable_numparse=True)


def report(trace) -> str:
    verdicts = trace.verdicts()
    passes = trace.passes
    groups = group_passes(passes)
    sections = [diagnosis(verdicts), _summary(trace, groups), _per_rank(trace),
                _verdicts(verdicts, list(passes))]
    if len(groups) >= 2:
        sections.append(_coverage_by_module(trace, groups))
    sections += [_top_params(passes), _cuts(trace), _tied(trace), _tensors(trace), _row_facts(trace), _scalars(trace),
                 _inner(trace)]
    # Escaped once, whole: every name, location and message taken from a trace file is in it.
    return safe("\n\n".join(s for s in sections if s) + "\n")


def diagnosis(verdicts) -> str:
    """The report's first line: the diagnosis in a sentence."""
    serious = [v for v in verdicts if v.severity != "info"]
    if not serious:
        return "gradtrace: no problems found."
    lead = serious[0]
    more = f" (+{len(serious) - 1} more findings below)" if len(serious) > 1 else ""
    return f"gradtrace diagnosis: {lead.code}: {lead.message}{more}"


def _summary(trace, groups) -> str:
    rows = []
    n = len(trace.params)
    # Which figures these are (local / reduced / sharded) is worth a column only where it varies from "local".
    with_scope = bool(trace.meta.world_size) or any(g.first.scope != "local" for g in groups)
    for group in groups:
        p, members = group.first, group.passes
        expected = f"{len(p.expected)}{'+' if p.expected_partial else ''}" if p.expected is not None else "-"
        norms = [q.total_norm for q in members]
        norm = sci(norms[0]) if len(norms) == 1 else f"{sci(min(norms))}..{sci(max(norms))}"
        largest = sci(max(q.max_abs for q in members))
        if any(q.unknown_because and q.cleared for q in members):  # a wrapper hid them: no number, not 0
            norm = largest = "unknown"
        row = [group.label, "/".join(p.kinds) or "-", sum(q.runs for q in members), f"{len(p.covered)}/{n}",
               expected, max(len(q.zero) for q in members), norm, largest,
               sum(q.nonfinite for q in members)]
        if with_scope:
            row.insert(2, _scope(trace, p))
        rows.append(row)
    dropped = trace.meta.dropped_passes
    note = (f"\n({dropped} older passes were dropped: watch(max_passes=...) keeps the newest)"
            if dropped else "")
    if not rows:
        return "passes: none recorded" + note
    world = trace.meta.world_size
    title = f"passes (merged over {world} ranks)" if world else "passes"
    headers = ["pass", "via", "runs", "covered", "expected", "zero", "total norm", "max |g|", "nonfinite"]
    if with_scope:
        headers.insert(2, "figures")
    return title + "\n" + _table(rows, headers) + note


def _scope(trace, p) -> str:
    """What the figures are: a shard's figures are global only once gathered."""
    if p.scope == "sharded":
        return "global (gathered shards)" if trace.meta.world_size else "shard-local"
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


def _verdicts(verdicts, pass_names) -> str:
    if not verdicts:
        return ""
    rows = [[i + 1, v.severity, v.code, v.message + recurrence(seen)]
            for i, (v, seen) in enumerate(collapse_verdicts(verdicts, pass_names))]
    return "verdicts (most likely root cause first)\n" + tabulate(
        rows, headers=["#", "severity", "code", "message"], tablefmt=TABLE_FORMAT,
        maxcolwidths=[None, None, None, 100], disable_numparse=True)


# Coverage columns beyond this many pass groups: only the newest are shown.
MAX_COVERAGE_COLUMNS = 8


def _coverage_by_module(trace, pass_groups) -> str:
    shown = pass_groups[-MAX_COVERAGE_COLUMNS:]
    groups = group_by_module(trace.params)
    rows = []
    for module, params in groups.items():
        counts = [sum(1 for q in params if q in g.first.covered) for g in shown]
        if len(set(counts)) == 1 and counts[0] == len(params) and len(groups) > 12:
            continue  # long reports show only modules whose coverage is partial or differs
        rows.append([display_name(module), len(params)] + [f"{c}/{len(params)}" for c in counts])
    older = len(pass_groups) - len(shown)
    note = f" (the newest {len(shown)} of {len(pass_groups)} coverage patterns)" if older else ""
    if not rows:
        return "coverage by module: every module fully covered in every pass"
    return f"coverage by module{note}\n" + _table(rows, ["module", "params"] + [g.short_label for g in shown])


def _top_params(passes) -> str:
    out = []
    listed = list(passes.values())
    if len(listed) > LIST_EACH_UP_TO:
        listed = listed[-1:]  # a long run: the newest pass speaks for the others
    for p in listed:
        if not p.records:
            continue
        top = sorted(p.records.values(), key=lambda r: -r.norm)[:TOP_PARAMS]
        rows = [[display_name(r.name), r.hits, "unknown" if r.cleared else sci(r.norm),
                 "unknown" if r.cleared else sci(r.max_abs), "yes" if r.zero else "cleared" if r.cleared else "",
                 r.nonfinite or ""]
                for r in top]
        out.append(f"top parameters in {p.name!r}\n" +
                   _table(rows, ["parameter", "hits", "norm", "max |g|", "zero", "nonfinite"]))
    return "\n\n".join(out)


def _cuts(trace) -> str:
    cuts = outermost_cuts(list(trace.cuts))
    if not cuts:
        return ""
    rows = [[c.kind, display_name(c.module) or f"(root {c.module_type})", c.op or "", pass_label, count,
             c.params, c.location + (f" (in {c.library_location})" if c.library_location else "")]
            for c, pass_label, count in _cut_rows(cuts)]
    return "graph cuts (outermost module of each region)\n" + _table(
        rows, ["kind", "module", "op", "pass", "seen", "trainable", "location"])


# Tied groups listed in the report; a model with more says how many it left out.
TIED_SHOWN = 10


def _tied(trace) -> str:
    """Tensors reachable under several names: gradtrace reports each under its first name only."""
    tied = list(trace.meta.tied_params or ())
    if not tied:
        return ""
    rows = [[", ".join(t.names), "yes" if t.requires_grad else "no (frozen through every name)",
             "x".join(map(str, t.shape))] for t in tied[:TIED_SHOWN]]
    more = f"\n(and {len(tied) - TIED_SHOWN} more)" if len(tied) > TIED_SHOWN else ""
    return ("tied parameters (one tensor under several names; figures are under the first name)\n"
            + _table(rows, ["names", "trainable", "shape"]) + more)


def _cut_rows(cuts):
    """``(cut, pass column, times seen)``; in a long run, one row per place a cut recurs in pass after pass."""
    if len(cuts) <= LIST_EACH_UP_TO:
        return [(c, c.pass_name or "-", c.count) for c in cuts]
    places: Dict[tuple, list] = {}
    for c in cuts:
        places.setdefault((c.kind, c.module, c.op, c.location), []).append(c)
    rows = []
    for same in places.values():
        names = [c.pass_name for c in same if c.pass_name]
        label = (same[0].pass_name or "-") if len(same) == 1 else f"{len(names)} passes: {names[0]} .. {names[-1]}" \
            if names else "-"
        rows.append((same[0], label, sum(c.count for c in same)))
    return rows


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


def _row_facts(trace) -> str:
    """Masks: empty rows and selected lengths, padding; groups: how many rows have each size of spread."""
    rows = []
    for t in trace.tensors.values():
        f = t.row_facts
        if not f:
            continue
        n = f.get("rows") or 0
        if "selected_sum" in f:
            lengths = (f"mean {f['selected_sum'] / n:.1f}, min {f.get('selected_min', 0):.0f}, "
                       f"max {f.get('selected_max', 0):.0f}" if n else "-")
            empty = f"{f.get('empty_rows', 0):.0f}/{n:.0f}"
        else:
            lengths, empty = "-", "-"
        on_padding = f"{f['on_padding']:.0f} on padding" if "on_padding" in f else ""
        padding = ", ".join(x for x in (t.padding_side or "", on_padding) if x) or "-"
        spread = ", ".join(f"{key[4:]}: {f[key]:.0f}" for key in f if key.startswith("std ") and f[key]) or "-"
        rows.append([t.name, t.role or "mask", f"{n:.0f}", empty, lengths, padding, spread])
    if not rows:
        return ""
    return "row facts (rows along the last dim)\n" + _table(
        rows, ["tensor", "role", "rows", "empty rows", "selected length", "padding", "per-row std"])


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


def render_inner(s: InnerProduct) -> str:
    title = f"inner product <{s.a}, {s.b}>" + (f" preconditioned by {s.optimizer}" if s.preconditioned else "")
    rows = [["dot", sci(s.dot)], ["cosine", sci(s.cosine)],
            [f"norm {s.a}", sci(s.norm_a)], [f"norm {s.b}", sci(s.norm_b)]]
    if s.preconditioned:
        rows += [[f"norm {s.a} preconditioned", sci(s.norm_a_pre)],
                 [f"norm {s.b} preconditioned", sci(s.norm_b_pre)]]
    dot = s.dot
    # share from contribution and |dot|, so it has the contribution's sign (also for traces saved before)
    top = [[t.param, sci(t.contribution), f"{t.contribution / abs(dot):.1%}" if dot else "-"] for t in s.top]
    return (title + "\n" + _table(rows, ["", "value"]) + "\n" +
            _table(top, ["dominant parameters", "contribution", "share"]) + "\n" + _inner_legend(s))


def _inner_legend(s: InnerProduct) -> str:
    """One line per figure of the inner-product table: what it is, and why one may be missing."""
    pre = s.preconditioned
    dot = (f"dot: sum over parameters of g_{s.a} * g_{s.b}"
           + (" / (sqrt(v_hat) + eps), Adam's preconditioner" if pre else ""))
    cosine = ("cosine: not given for a preconditioned product (it is not an inner product of the two "
              "gradients with their own norms); the plain diff gives it" if pre else
              "cosine: dot / (norm a * norm b)" if s.cosine is not None else
              "cosine: not defined, one of the gradients is zero")
    share = ("share: a parameter's contribution / |dot|, with the contribution's sign; the shares add up to "
             f"{'+' if s.dot >= 0 else '-'}100%")
    return "\n".join((dot, cosine, share))


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
    return safe("\n\n".join(lines))  # names from a trace file reach the terminal only escaped


def _log10(x: float) -> float:
    if x == 0:
        return -300.0
    if x == float("inf"):
        return 300.0
    return math.log10(abs(x))
