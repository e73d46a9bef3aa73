"""Plots of a trace (needs matplotlib: ``pip install matplotlib``, or the ``plot`` extra of a checkout).

* ``flow``: gradient norm per module (log axis), one line per pass, in model
  order; modules that got nothing are marked along the bottom, not left blank.
* ``coverage``: passes x parameters (modules, on big models), three states:
  nonzero / exactly zero / not reached.
* ``inner``: the parameters that dominate each inner product ``<X, Y>``
  (traces that computed one: ``watch(keep_grads=True)`` and ``trace.diff``).

Figures are ``matplotlib.figure.Figure`` objects on an Agg canvas: pyplot is
never imported, so the user's backend and open figures are left alone.
Written against the read API only (``params``, ``passes``,
``inner_products``): a loaded trace plots like a live one.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

from ..analysis.names import module_of
from ..errors import GradtraceError

KINDS = ("flow", "coverage", "inner")
# Pass lines avoid the two colours that mean something: red = not reached, orange = exactly zero.
PASS_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#7f7f7f", "#bcbd22", "#e377c2")
OK_COLOR, ZERO_COLOR, MISSING_COLOR, NONFINITE_COLOR = "#4c9f70", "#ff7f0e", "#d62728", "#000000"
MAX_LINES = len(PASS_COLORS)  # passes drawn in a flow plot (the newest)
MAX_ROWS = 40  # passes drawn in a coverage map (the newest)
MAX_COLUMNS = 60  # more parameters than this: the coverage map shows modules
MAX_TICKS = 40  # tick labels per axis, at most (evenly spaced)
MAX_LABEL = 60  # characters of a tick label: longer names keep their ends (a name from a file can be 4,000 long)
MAX_INNER = 4  # inner products drawn
MAX_BARS = 48  # modules x passes up to which the flow plot uses grouped bars
DPI = 100

OK, ZERO, MISSING, NONFINITE = 0, 1, 2, 3  # cell states (the coverage map shows the first three)
STATE_NAMES = ("nonzero gradient", "exactly zero", "not reached")


def plot(trace, path=None, kind: str = "flow", passes: Optional[Sequence[str]] = None):
    """Draw ``kind`` ("flow", "coverage" or "inner") and return the Figure; write it to ``path`` if given."""
    if kind not in KINDS:
        raise GradtraceError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    figure_class, canvas_class = _matplotlib()
    if kind == "inner":
        figure = _inner(figure_class, trace)
    else:
        chosen = _chosen_passes(trace.passes, passes, MAX_LINES if kind == "flow" else MAX_ROWS)
        figure = (_flow if kind == "flow" else _coverage)(figure_class, trace, chosen)
    canvas_class(figure)  # attaches itself: savefig and draw work without pyplot
    if path is not None:
        named = isinstance(path, (str, bytes, os.PathLike))  # else a file object: matplotlib writes PNG to it
        written = image_path(path) if named else path
        try:
            figure.savefig(written, dpi=DPI, format=os.path.splitext(written)[1][1:].lower() if named else None)
        except (OSError, ValueError) as e:
            raise GradtraceError(f"cannot write the plot to {str(written)!r}: {e}") from None
    return figure


def image_path(path) -> str:
    """Where ``plot(trace, path)`` writes: ``path``, with ``.png`` added when it has no extension
    (matplotlib's own default), so callers can say which file they wrote."""
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    return name if os.path.splitext(name)[1] not in ("", ".") else name.rstrip(".") + ".png"


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise GradtraceError("Trace.plot needs matplotlib: pip install matplotlib (from a checkout of gradtrace, "
                             'pip install -e ".[plot]" installs it too)') from None
    return Figure, FigureCanvasAgg


def _chosen_passes(all_passes, names: Optional[Sequence[str]], newest: int) -> List:
    if not all_passes:
        raise GradtraceError("the trace has no passes to plot; record one inside gradtrace.watch first")
    if names is None:
        return list(all_passes.values())[-newest:]
    unknown = [n for n in names if n not in all_passes]
    if unknown:
        raise GradtraceError(f"no pass named {', '.join(map(repr, unknown))}; the trace has "
                             f"{', '.join(map(repr, all_passes))}")
    return [all_passes[n] for n in names]


# ---- modules and states ------------------------------------------------------------
def _modules(params: Sequence[str]) -> Dict[str, List[str]]:
    """``{module: [params]}`` in model order (each parameter's owner; the root is "(root)")."""
    groups: Dict[str, List[str]] = {}
    for name in params:
        groups.setdefault(module_of(name) or "(root)", []).append(name)
    return groups


def _state(p, names: Sequence[str]) -> int:
    """The worst state among ``names`` in pass ``p``: not reached > exactly zero > nonzero."""
    records = p.records
    if any(n not in records for n in names):
        return MISSING
    return ZERO if any(records[n].zero for n in names) else OK


def _module_norm(p, names: Sequence[str]) -> Tuple[float, int]:
    """``(norm of the module's reached gradients, state)``; a module is missing only if nothing reached it."""
    records = p.records
    reached = [records[n] for n in names if n in records]
    if not reached:
        return 0.0, MISSING
    if any(r.nonfinite for r in reached):
        return float("nan"), NONFINITE  # a log axis cannot place it: it gets a mark of its own
    norm = sum(r.norm * r.norm for r in reached) ** 0.5
    return norm, (ZERO if all(r.zero for r in reached) else OK)


def _ticks(axis_set_ticks, axis_set_labels, labels: Sequence[str], rotation: float = 0.0) -> None:
    """At most MAX_TICKS labels, evenly spaced: readable on a 100-layer model."""
    step = max(1, -(-len(labels) // MAX_TICKS))
    positions = list(range(0, len(labels), step))
    if positions[-1] != len(labels) - 1:  # always name the last one (often the head)
        positions[-1 if len(labels) - 1 - positions[-1] < step / 2 else len(positions):] = [len(labels) - 1]
    axis_set_ticks(positions)
    axis_set_labels([_shortened(labels[i]) for i in positions], rotation=rotation, fontsize=8)


def _shortened(label: str) -> str:
    half = (MAX_LABEL - 1) // 2
    return label if len(label) <= MAX_LABEL else label[:half] + "\u2026" + label[-half:]


def _width(columns: int) -> float:
    return min(20.0, max(8.0, 4.0 + 0.16 * columns))


# ---- flow -------------------------------------------------------------------------------
def _flow(Figure, trace, chosen):
    """Norm per module (log axis), and below it, on a strip of its own, a mark for every module that got
    nothing, exactly zero or NaN: a mark never sits inside the data range, on top of a real point."""
    modules = _modules(trace.params)
    names = list(modules)
    per_pass = [[_module_norm(p, modules[m]) for m in names] for p in chosen]
    seen = {state for figures in per_pass for _, state in figures}
    bars = len(names) * len(chosen) <= MAX_BARS  # few modules: grouped bars; many: one marker row per pass
    rows = 1 if bars else len(chosen)
    strip = bool(seen - {OK})
    figure = Figure(figsize=(_width(len(names)) + 2.5, 5.5 + (0.2 * rows if strip else 0)), layout="constrained")
    if strip:
        grid = figure.add_gridspec(2, 1, height_ratios=[5.0, 0.5 + 0.25 * rows])
        ax = figure.add_subplot(grid[0])
        marks = figure.add_subplot(grid[1], sharex=ax)
    else:
        ax = marks = figure.add_subplot()
    width = 0.8 / len(chosen)
    any_positive, unreached = False, []
    for i, (p, figures) in enumerate(zip(chosen, per_pass, strict=False)):
        color = PASS_COLORS[i % len(PASS_COLORS)]
        ys = [norm if state == OK and norm > 0 else float("nan") for norm, state in figures]
        any_positive = any_positive or any(y == y for y in ys)
        offset = (i - (len(chosen) - 1) / 2) * width if bars else 0.0
        x = [j + offset for j in range(len(names))]
        if bars:
            ax.bar(x, [0.0 if y != y else y for y in ys], width=width, color=color, label=p.name)
        else:
            # Markers only: modules are categories, and a line between two of them would mean nothing
            # (it zig-zags between attention and MLP norms).
            ax.plot(x, ys, color=color, marker="o", markersize=4, linestyle="none", label=p.name)
        if strip:
            _mark_states(marks, x, [state for _, state in figures], row=i if not bars else 0)
        missing = [m for m, (_, state) in zip(names, figures, strict=False) if state == MISSING]
        if missing:
            unreached.append(f"not reached in {p.name!r}: {_compress(missing)}")
    if any_positive:
        ax.set_yscale("log")
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no module received a nonzero gradient", transform=ax.transAxes, ha="center")
    if strip:
        marks.set_ylim(rows - 0.5, -0.5)  # first pass on top
        marks.set_yticks(range(rows))
        marks.set_yticklabels([p.name for p in chosen] if not bars else ["state"], fontsize=8)
        marks.tick_params(axis="y", length=0)
        ax.tick_params(axis="x", labelbottom=False)
    _ticks(marks.set_xticks, marks.set_xticklabels, names, rotation=90 if len(names) > 8 else 0)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylabel("gradient norm per module (log)" if any_positive else "gradient norm per module")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    _flow_legend(ax, chosen, trace.passes, unreached, bars, seen)
    return figure


MARKS = ((MISSING, "x", MISSING_COLOR, "not reached"), (ZERO, "v", ZERO_COLOR, "exactly zero"),
         (NONFINITE, "*", NONFINITE_COLOR, "NaN/Inf"))


def _mark_states(ax, x: List[float], states: List[int], row: int) -> None:
    """On the state strip: a mark for every module that got nothing, exactly zero or NaN, never a blank."""
    for state, mark, color, _ in MARKS:
        at = [xj for xj, s in zip(x, states, strict=False) if s == state]
        if at:
            ax.plot(at, [row] * len(at), linestyle="none", marker=mark, markersize=7, color=color,
                    markeredgewidth=2)


def _compress(modules: List[str]) -> str:
    """``layers.0 .. layers.40`` for runs of consecutive indices; at most a few items."""
    items: List[str] = []
    run: List[Tuple[str, int]] = []

    def close():
        if run:
            (prefix, first), (_, last) = run[0], run[-1]
            items.append(f"{prefix}{first}" if first == last else f"{prefix}{first}..{last}")
            run.clear()

    for m in modules:
        head, _, tail = m.rpartition(".")
        index = _index(tail)
        if index is not None and run and run[-1][0] == head + "." and run[-1][1] + 1 == index:
            run.append((head + ".", index))
            continue
        close()
        if index is not None:
            run.append((head + "." if head else "", index))
        else:
            items.append(m)
    close()
    return ", ".join(items[:4]) + (f", +{len(items) - 4} more" if len(items) > 4 else "")


def _index(part: str) -> Optional[int]:
    """A module path component that is a list index, as an int (a name from a trace file may be any text:
    superscript digits pass ``isdigit`` but not ``int``, and 5,000 digits are past what ``int`` converts)."""
    return int(part) if part.isascii() and part.isdigit() and len(part) <= 18 else None


def _flow_legend(ax, chosen, all_passes, unreached: List[str], bars: bool, seen: set) -> None:
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    rows = "below its bar" if bars else "one row per pass, below"
    for state, mark, color, text in MARKS:
        if state in seen:  # only the marks the plot shows: a healthy run's plot has no red in it
            handles.append(Line2D([], [], linestyle="none", marker=mark, color=color, markeredgewidth=2))
            labels.append(f"{text} ({rows})")
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    shown = f"newest {len(chosen)} of {len(all_passes)} passes" if len(chosen) < len(all_passes) else "per pass"
    lines = [f"gradient flow: norm per module in model order, {shown}"] + unreached[:3]
    if len(unreached) > 3:
        lines.append(f"(+{len(unreached) - 3} more passes with modules not reached)")
    ax.set_title("\n".join(lines), fontsize=10)


# ---- coverage -----------------------------------------------------------------------------
def _coverage(Figure, trace, chosen):
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    by_param = len(trace.params) <= MAX_COLUMNS
    columns = {n: [n] for n in trace.params} if by_param else _modules(trace.params)
    labels = list(columns)
    grid = [[_state(p, columns[c]) for c in labels] for p in chosen]
    longest = min(max(map(len, labels)), MAX_LABEL)
    figure = Figure(figsize=(_width(len(labels)), 2.8 + 0.25 * len(chosen) + 0.06 * longest),
                    layout="constrained")
    ax = figure.add_subplot()
    ax.imshow(grid, cmap=ListedColormap([OK_COLOR, ZERO_COLOR, MISSING_COLOR]), vmin=0, vmax=2,
              aspect="auto", interpolation="nearest")
    _ticks(ax.set_xticks, ax.set_xticklabels, labels, rotation=90)
    _ticks(ax.set_yticks, ax.set_yticklabels, [p.name for p in chosen])
    what = "parameters" if by_param else "modules (worst state of their parameters)"
    ax.set_title(f"coverage: passes x {what}", fontsize=10)
    ax.legend([Patch(color=c) for c in (OK_COLOR, ZERO_COLOR, MISSING_COLOR)], STATE_NAMES, fontsize=8,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


# ---- inner products --------------------------------------------------------------------------
def _inner(Figure, trace):
    summaries = list(trace.inner_products)[-MAX_INNER:]
    if not summaries:
        raise GradtraceError("the trace has no inner products to plot: open it with "
                             "gradtrace.watch(model, keep_grads=True) and call trace.diff('X', 'Y')")
    rows = max(len(s.top) for s in summaries)
    figure = Figure(figsize=(9, 0.6 + len(summaries) * (1.0 + 0.3 * rows)), layout="constrained")
    for i, s in enumerate(summaries):
        _inner_axes(figure.add_subplot(len(summaries), 1, i + 1), s)
    return figure


def _inner_axes(ax, s) -> None:
    top = s.top
    names = [t.param for t in top]
    values = [t.contribution for t in top]
    y = list(range(len(top)))
    ax.barh(y, values, color=["#1f77b4" if v >= 0 else "#9467bd" for v in values])
    ax.set_yticks(y)
    ax.set_yticklabels([_shortened(n) for n in names], fontsize=8)
    ax.invert_yaxis()  # largest contribution on top
    ax.axvline(0.0, color="black", linewidth=0.8)
    for yi, t in zip(y, top, strict=False):
        ax.annotate(f"{t.share:.1%}", (t.contribution, yi), xytext=(4 if t.contribution >= 0 else -4, 0),
                    textcoords="offset points", va="center", ha="left" if t.contribution >= 0 else "right",
                    fontsize=8)
    ax.margins(x=0.15)
    pre = f", preconditioned by {s.optimizer}" if s.preconditioned else ""
    cosine = f", cosine {s.cosine:.3e}" if s.cosine is not None else ""
    ax.set_title(f"<{s.a}, {s.b}>{pre}: dot {s.dot:.3e}{cosine}; per-parameter contributions "
                 f"(share of the dot product)", fontsize=9)
    ax.set_xlabel("contribution to the inner product", fontsize=8)
