"""Command line: ``python -m gradtrace demo | show | diff | plot``.

Every failure gradtrace can explain (a missing or damaged trace file, an
unknown pass name) prints one line to stderr and exits with status 2.
``show`` and ``diff`` exit with status 1 when ``--fail-on`` finds a verdict
at or above its severity (for CI).

Only ``demo`` imports torch (the probe is a torch model): ``--help``,
``--version``, ``show``, ``diff`` and ``plot`` read trace files without it, so
the demo's list of bugs is looked up when ``demo`` runs or shows its help.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import List, Optional, Sequence

from .errors import GradtraceError
from .render.text import safe

_DIFF_USAGE = """\
  gradtrace diff TRACE.json PASS_A PASS_B
      pass PASS_A against pass PASS_B of the same trace
  gradtrace diff FIRST.json SECOND.json PASS_A PASS_B
      pass PASS_A of FIRST.json against pass PASS_B of SECOND.json
      (e.g. a healthy run's 'Y' against a broken run's 'Y')"""


def _output_options(parser: argparse.ArgumentParser) -> None:
    from .render.formats import FAIL_ON, FORMATS

    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="table (the human report, default), markdown (GitHub tables, e.g. for a CI job "
                             "summary) or json (verdicts and pass summaries)")
    parser.add_argument("--fail-on", choices=FAIL_ON, default="never",
                        help="exit with status 1 when a verdict of this severity or worse exists (default never)")


_BUG_LIST = "{bugs}"  # in the demo's help epilog: filled in only when that help is shown


class _DemoHelp(argparse.RawDescriptionHelpFormatter):
    """Writes the demo's bug list into its help; built only for ``demo --help`` (the list imports torch)."""

    def add_text(self, text):
        if text and _BUG_LIST in text:
            from .demo import BUGS
            text = text.replace(_BUG_LIST, "\n".join(f"  {name:<21} {line}" for name, line in BUGS.items()))
        super().add_text(text)


def _bug_name(name: str) -> str:
    """``--bug``'s choices, looked up only when ``--bug`` is given (the list imports torch)."""
    from .demo import BUGS

    choices = [*BUGS, "all", "none"]
    if name not in choices:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(choices)})")
    return name


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .render.plot import KINDS

    parser = argparse.ArgumentParser(
        prog="gradtrace",
        description="Trace gradients through PyTorch autograd: which parameters got one, "
                    "how big, and where the graph was cut.",
        epilog="exit status: 0 ok, 1 a verdict at or above --fail-on, "
               "2 bad input (unreadable trace file, unknown pass, bad arguments)")
    parser.add_argument("--version", action="version", version=f"gradtrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,show,diff,plot}")
    sub.required = True

    demo = sub.add_parser(
        "demo", formatter_class=_DemoHelp,
        help="run the built-in entropy probe on a tiny LoRA policy and print its report",
        description="Run the built-in entropy probe on a tiny LoRA policy and print gradtrace's report.\n"
                    "  X pass: token entropy H, .backward() over microbatches\n"
                    "  Y pass: torch.autograd.grad of a GRPO loss on sequence log-probs S\n"
                    "  deltaH1 = -lr * sum(g_X * g_Y / (sqrt(v_hat) + eps)), v_hat from Adam",
        epilog=f"bugs (--bug NAME):\n{_BUG_LIST}\n\n--bug all runs every scenario and prints, "
               "per bug, the verdict gradtrace ranks first.")
    demo.add_argument("--bug", metavar="NAME", type=_bug_name,
                      help="inject one bug (see below), 'none' for the healthy probe, or 'all' for a "
                           "one-line summary of each; without it the demo shows deltaH1 printing as "
                           "-0.000000 and what gradtrace finds")
    demo.add_argument("--healthy", action="store_true", help="the healthy probe (the same as --bug none)")
    demo.add_argument("--seed", type=int, default=None, help="random seed (default 0; the story run uses 1)")
    demo.add_argument("--save", metavar="PATH", help="also write the trace as JSON (single run only)")
    demo.add_argument("--cuts", choices=("modules", "ops", "off"), default="modules",
                      help="how cuts are detected (gradtrace.watch's cuts=; default modules)")

    show = sub.add_parser("show", help="print the report of a saved trace",
                          description="Print the full report of a trace saved with Trace.save().")
    show.add_argument("trace", metavar="TRACE.json")
    _output_options(show)

    diff = sub.add_parser(
        "diff", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="gradtrace diff [-h] TRACE.json [SECOND.json] PASS_A PASS_B",
        help="compare two passes: what one reached that the other did not",
        description=f"Compare coverage and gradient norms of two passes.\n\n{_DIFF_USAGE}")
    diff.add_argument("args", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    _output_options(diff)

    plot = sub.add_parser("plot", help="draw a saved trace to an image (needs matplotlib)",
                          description="Draw a trace saved with Trace.save(): gradient flow per module, "
                                      "the coverage map, or the inner-product contributions.")
    plot.add_argument("trace", metavar="TRACE.json")
    plot.add_argument("-o", "--output", required=True, metavar="OUT.png",
                      help="image to write (format from the extension: png, svg, pdf)")
    plot.add_argument("--kind", choices=KINDS, default="flow", help="what to draw (default flow)")
    plot.add_argument("--passes", nargs="+", metavar="PASS", help="passes to draw (default: the newest)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m gradtrace`` and the ``gradtrace`` script; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "show":
            return _show(args)
        if args.command == "plot":
            return _plot(args)
        return _diff(args)
    except BrokenPipeError:  # `gradtrace show t.json | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (GradtraceError, OSError) as e:
        print(f"gradtrace: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, GradtraceError) else f"{type(e).__name__}: {e}"
    return safe(" ".join(text.split()), newlines=False)  # messages quote names from the trace file


def _demo(args) -> int:
    from .demo import BUGS, GLOSSARY, STORY_BUG, STORY_SEED, run_probe

    if args.healthy:
        if args.bug not in (None, "none"):
            raise GradtraceError(f"--healthy runs the probe without a bug; drop --bug {args.bug}")
        args.bug = "none"
    seed = args.seed if args.seed is not None else 0
    if args.bug == "all":
        if args.save:
            raise GradtraceError("--save writes one trace; use it with a single --bug NAME, not --bug all")
        for name in [None, *BUGS]:
            trace, _ = run_probe(name, seed=seed, cuts=args.cuts)
            verdicts = [v for v in trace.verdicts() if v.severity != "info"]
            code, message = (verdicts[0].code, verdicts[0].message) if verdicts else ("-", "no problems found")
            print(f"{name or 'healthy':<21} {code:<16} {message}", flush=True)  # progress, as each ends
        return 0
    story = args.bug is None
    bug = STORY_BUG if story else None if args.bug == "none" else args.bug
    if story and args.seed is None:
        seed = STORY_SEED
    trace, result = run_probe(bug, seed=seed, cuts=args.cuts)
    if args.save:  # before printing: a closed pipe must not lose the file
        trace.save(args.save)
    if story:
        heading = "the entropy probe's log says deltaH1 is zero; it is not, and something hides it"
    else:
        heading = f"bug {bug}: {BUGS[bug]}" if bug else "healthy run (no bug)"
    print(f"gradtrace demo, {heading}\n{result}\n" + "\n".join(GLOSSARY) + "\n")
    print(trace.report())
    if story:
        print(_story_ending(trace, BUGS))
    if args.save:
        print(f"\ntrace saved to {args.save}")
    return 0


def _story_ending(trace, bugs) -> str:
    from .demo import STORY_BUG

    lead = next((v for v in trace.verdicts() if v.severity != "info"), None)
    found = f"gradtrace's diagnosis: {lead.code}" if lead else "gradtrace found nothing"
    others = ", ".join(name for name in bugs if name != STORY_BUG)
    return (f"The hidden cause: {bugs[STORY_BUG]}. {found} names it (a loss scale never unscaled).\n"
            "Next:\n"
            "  python -m gradtrace demo --healthy      the same probe without the bug: no problems found\n"
            "  python -m gradtrace demo --bug NAME     one of the other bugs: " + others + "\n"
            "  python -m gradtrace demo --bug all      one line per bug: the verdict gradtrace ranks first")


def _show(args) -> int:
    from .render import formats
    from .trace import load

    trace = load(args.trace)
    verdicts = trace.verdicts()
    return _emit(args, verdicts, table=trace.report, markdown=lambda: formats.trace_markdown(trace, verdicts),
                 as_json=lambda: formats.trace_json(trace, verdicts))


def _emit(args, verdicts, table, markdown, as_json) -> int:
    """Print in ``--format`` (rendering only that one); the status ``--fail-on`` asks for."""
    from .render.formats import fails

    # Names and locations come from the trace file: escaped before they reach a terminal, in every format.
    print(safe({"table": table, "markdown": markdown, "json": as_json}[args.format]()))
    return 1 if fails(verdicts, args.fail_on) else 0


def _plot(args) -> int:
    from .render.plot import image_path
    from .trace import load

    load(args.trace).plot(args.output, kind=args.kind, passes=args.passes)
    print(safe(f"wrote {image_path(args.output)}"))  # matplotlib adds .png to a name without an extension
    return 0


def _diff(args) -> int:
    from .render import formats

    result, verdicts = _compare(args.args)
    return _emit(args, verdicts, table=lambda: str(result), markdown=lambda: formats.diff_markdown(result, verdicts),
                 as_json=lambda: formats.diff_json(result, verdicts))


def _compare(args: List[str]):
    """``(Diff, verdicts)``: the verdicts of the file(s) read, and, across files, the gap between the passes."""
    from . import analysis, render
    from .records import Verdict
    from .trace import load

    if len(args) == 3:
        path, a, b = args
        trace = load(path)
        return trace.diff(a, b), trace.verdicts()
    if len(args) != 4:
        raise GradtraceError(f"diff takes 3 or 4 arguments (TRACE.json PASS_A PASS_B, or FIRST.json "
                             f"SECOND.json PASS_A PASS_B), got {len(args)}; see gradtrace diff --help")
    first_path, second_path, a, b = args
    first, second = load(first_path), load(second_path)
    for trace, path, name in ((first, first_path, a), (second, second_path, b)):
        if name not in trace.passes:
            have = ", ".join(repr(n) for n in trace.passes) or "no passes"
            raise GradtraceError(f"{path!r} has no pass named {name!r}; it has {have}")
    label_a, label_b = _labels(first_path, second_path)
    result = replace(render.rendered(analysis.diff(first.passes[a], second.passes[b])), a=f"{label_a}:{a}",
                     b=f"{label_b}:{b}")
    verdicts = first.verdicts() + second.verdicts()
    if result.only_a or result.only_b:  # no trace holds both passes, so no verdict of its own sees this gap
        verdicts.insert(0, Verdict("COVERAGE_GAP", "error", f"coverage gap between {result.a!r} and {result.b!r}: "
                                   f"{len(result.only_a)} only in {result.a!r}, {len(result.only_b)} only in "
                                   f"{result.b!r}", {"a": result.a, "b": result.b, "only_a": sorted(result.only_a),
                                                     "only_b": sorted(result.only_b)}))
    return result, verdicts


def _labels(first: str, second: str):
    a, b = os.path.basename(first), os.path.basename(second)
    return (first, second) if a == b else (a, b)
