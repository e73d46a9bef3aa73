"""Fuzzing the loader: whatever a trace file holds, ``load`` and ``show`` fail cleanly or work.

Hypothesis writes random JSON documents and mutations of two real saved traces
(today's richest, with typed meta, inner products and a NaN origin; and one
saved by commit d1a6055, before the records were typed): a field removed,
retyped, set to an extreme, nested 50,000 deep, a 5,000-digit number,
NaN/Infinity literals, names full of terminal escapes or of Markdown that
breaks out of a code span or a table row, indices ``int()`` cannot read,
strings past ``schema.MAX_TEXT``, non-UTF-8 bytes, truncation. The invariant:

* ``gradtrace.load`` raises ``GradtraceError`` or returns a trace on which every
  read works (``read_everything``), and which saves and loads back unchanged;
* ``gradtrace show FILE`` exits 2 with one line on stderr when the file does
  not load, 0 with an empty stderr when it does (in every ``--format``), and
  never prints a control character (anything in Unicode's Cc/Cf/Cs/Zl/Zp but
  newline).

The default run takes a few seconds; ``GRADTRACE_FUZZ_EXAMPLES=5000`` sets the
number of examples of each fuzz test for a longer run.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import subprocess
import sys
import unicodedata

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import gradtrace
from gradtrace import GradtraceError, cli, storage
from gradtrace.records import NonfiniteOrigin
from test_storage import make_trace
from test_typed_records import LEGACY

EXAMPLES = int(os.environ.get("GRADTRACE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Strings a crafted trace would use: terminal escapes, bidi overrides, C1 CSI, a lone
# surrogate (JSON can spell one), a BOM, and names the old decoder turned into floats.
NASTY_TEXT = ["\x1b[31mred\x1b[0m", "\x1b]0;title\x07", "\x9b2J", "a\u202eb", "\u2066x\u2069", "\r\n",
              "\ud800", "\ufeff", "\x00", "nan", "inf", "-inf", "", "x" * 300,
              # issue 24: Markdown that breaks out of a code span or a table row, indices int() cannot read
              "a`b", "x\n| forged |", "[l](https://e.x)", "![i](https://e.x/i.png)", "<b>", "m.\u00b2.w",
              "layers." + "7" * 4100 + ".w", "y" * 5000]
# Raw JSON text spliced where a value goes: what json.dumps cannot write.
RAW = ["1" + "0" * 5000, "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "-0.0", "1e-400",
       "[" * 50000 + "]" * 50000, "{\"a\":" * 20000 + "0" + "}" * 20000, '"\\ud800"', '"\\u001b[2J"']
EXTREMES = [None, True, False, 0, -1, 1, 2 ** 63, -2 ** 63, 2 ** 64, 10 ** 300, 1e308, -1e308, 5e-324,
            "", [], {}, [[]], {"": None}]


# ---- what must work on any trace that loads --------------------------------------


def read_everything(trace) -> None:
    """Every read a loaded trace answers."""
    assert isinstance(trace.report(), str)
    assert all(isinstance(v, gradtrace.Verdict) for v in trace.verdicts())
    figures = trace.metrics()
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in figures.items())
    names = list(trace.passes)[:4]
    for a in names:
        for b in names:
            assert isinstance(str(trace.diff(a, b)), str)
    for p in trace.passes.values():
        _ = p.covered, p.missing, p.zero, p.stale, p.cleared, p.total_norm, p.max_abs, p.nonfinite
    repr(trace)


def control_characters(text: str) -> list:
    return [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")]


def show(path, *options) -> tuple:
    """``gradtrace show path`` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["show", str(path), *options])
    return code, out.getvalue(), err.getvalue()


def check_file(path, scratch) -> bool:
    """The invariant for one file; True when it loaded."""
    try:
        trace = gradtrace.load(path)
    except GradtraceError:
        trace = None
    if trace is not None:
        read_everything(trace)
        again = scratch / "resaved.json"
        trace.save(again)
        assert gradtrace.load(again).report() == trace.report()
    code, out, err = show(path)
    if trace is None:
        assert code == 2 and out == "", (code, out[:200])
        assert err.startswith("gradtrace: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    else:
        assert code == 0 and err == "" and out == trace.report() + "\n"
        for fmt in ("markdown", "json"):  # the other formats render whatever loads, too
            code, formatted, err = show(path, "--format", fmt)
            assert code == 0 and err == "" and control_characters(formatted) == [], (fmt, err[:200])
    assert control_characters(out) == [] and control_characters(err) == [], (out[:200], err[:200])
    return trace is not None


# ---- a real trace to mutate ------------------------------------------------------------


def make_rich_trace():
    """test_storage's trace (two passes, a no_grad cut, tensors, a scalar, an inner product), plus
    a preconditioned inner product, a NaN origin, typed meta beside a free-form key, and per-rank
    coverage and figures, so that every part of the format is there."""
    trace = make_trace()
    plain = trace.inner_products[0]
    trace.inner_products.append(dataclasses.replace(plain, preconditioned=True, cosine=None, norm_a_pre=3.0,
                                                    norm_b_pre=1e-3, optimizer="Adam"))
    trace.passes["X"].nonfinite_origin = NonfiniteOrigin(op="div", location="model.py:3", node="DivBackward0",
                                                         module="0", forward="finite", pass_name="X")
    trace.rank_coverage = {"X": {0: sorted(trace.passes["X"].covered), 1: ["0.weight"]}}
    trace.rank_figures = {"X": {0: {"0.weight": [1.0, 0.5, 0.0, 0.0]}, 1: {"0.weight": [2.0, 1.0, 1.0, 0.0]}}}
    trace.meta.update(world_size=2, wrapper="DDP", name_prefix="module.", find_unused_parameters=False,
                      error="ValueError: boom", note={"free": ["form", 1.5, None]})
    return trace


# Two traces to mutate: today's richest, and one saved by gradtrace at commit d1a6055 (before typed records).
BASES = [storage.to_dict(make_rich_trace()), json.loads(LEGACY.read_text())]
BASE = BASES[0]


def paths_in(value, prefix=()):
    """Every path (tuple of keys / indices) to a value inside a JSON document."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths_in(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths_in(v, prefix + (i,))


BASE_PATHS = [list(paths_in(base))[1:] for base in BASES]

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.text(max_size=12) | st.sampled_from(NASTY_TEXT))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def similar(value):
    """Values of the same JSON type as ``value``, extremes first."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.sampled_from([0, 1, 2 ** 31, 2 ** 63 - 1]) | st.integers(0, 2 ** 63 - 1)
    if isinstance(value, float) or value in ("nan", "inf", "-inf"):
        return st.sampled_from(["nan", "inf", "-inf", 0.0, -0.0, 5e-324, 1e-300, 1e308, -1e308]) | st.floats()
    if isinstance(value, str):
        return st.sampled_from(NASTY_TEXT) | st.text(max_size=8)
    if isinstance(value, list):
        return st.just([]) | st.permutations(value) | st.just(value + value)
    if isinstance(value, dict):
        return st.just({})
    return st.sampled_from(NASTY_TEXT) | st.booleans() | st.floats()  # null: an optional field, set


def reach(doc, path):
    """The container at ``path`` in ``doc``, or None when a mutation took it away."""
    for key in path:
        if isinstance(doc, dict) and key in doc or isinstance(doc, list) and isinstance(key, int) and key < len(doc):
            doc = doc[key]
        else:
            return None
    return doc if isinstance(doc, (dict, list)) else None


@st.composite
def mutated_trace_text(draw) -> bytes:
    """The base trace with 1-3 fields removed, retyped or replaced, serialised; raw splices allowed."""
    which = draw(st.sampled_from(range(len(BASES))))
    doc = copy.deepcopy(BASES[which])
    raw = {}
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(BASE_PATHS[which]))
        parent = reach(doc, path[:-1])
        if parent is None or path[-1] not in (parent if isinstance(parent, dict) else range(len(parent))):
            continue  # an earlier mutation removed or retyped an ancestor
        kind = draw(st.sampled_from(["similar"] * 5 + ["remove", "random", "extreme", "nasty", "raw", "rename"]))
        if kind == "similar":  # the same type, a strange value: loads, and stresses what reads it
            parent[path[-1]] = draw(similar(parent[path[-1]]))
        elif kind == "remove":
            del parent[path[-1]]
        elif kind == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(NASTY_TEXT))] = parent.pop(path[-1])
        elif kind == "raw":
            marker = f"@@raw{len(raw)}@@"
            raw[json.dumps(marker)] = draw(st.sampled_from(RAW))
            parent[path[-1]] = marker
        else:
            pool = {"random": json_values, "extreme": st.sampled_from(EXTREMES),
                    "nasty": st.sampled_from(NASTY_TEXT), "rename": json_values}[kind]
            parent[path[-1]] = draw(pool)
    text = json.dumps(doc, allow_nan=True)  # the strategies draw NaN/Infinity floats too
    for marker, splice in raw.items():
        text = text.replace(marker, splice)
    data = text.encode("utf-8", "surrogatepass")  # a lone surrogate as raw bytes: not UTF-8
    return draw(byte_damage(data))


@st.composite
def byte_damage(draw, data: bytes) -> bytes:
    """Sometimes: truncate, or splice in bytes that are not UTF-8."""
    kind = draw(st.sampled_from(["none"] * 6 + ["truncate", "bytes"]))
    at = draw(st.integers(0, len(data)))
    if kind == "truncate":
        return data[:at]
    if kind == "bytes":
        return data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\x1b["])) + data[at:]
    return data


def random_documents():
    """Random JSON, bare or dressed as a trace (the right format and version, random fields)."""
    dressed = st.dictionaries(st.sampled_from(list(BASE)), json_values).map(
        lambda d: {**d, "format": storage.FORMAT, "version": storage.VERSION})
    return (json_values | dressed).map(lambda d: json.dumps(d, allow_nan=True).encode("utf-8", "surrogatepass"))


# ---- the fuzz tests --------------------------------------------------------------------


@pytest.mark.parametrize("base", BASES, ids=["rich", "d1a6055"])
def test_the_base_traces_load_and_show(tmp_path, base):
    path = tmp_path / "base.json"
    path.write_text(json.dumps(base))
    assert check_file(path, tmp_path)


@pytest.mark.parametrize("key, value", [
    ("ran_with_grad", True), ("ran_with_grad", [1, 2]), ("frozen_while_watched", "0.weight"),
    ("dropped_passes", "3"), ("forward_calls", -1), ("world_size", 2.5), ("cuts", 7),
    ("find_unused_parameters", "yes"), ("error", ["boom"])])
def test_meta_keys_gradtrace_reads_are_typed(tmp_path, key, value):
    """Found by the fuzzer in CI: ``"ran_with_grad": true`` loaded, then ``report()`` raised
    TypeError ('bool' object is not iterable). meta stays free-form; the keys gradtrace reads
    back have their types, checked at load."""
    doc = copy.deepcopy(BASE)
    doc["meta"][key] = value
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(GradtraceError, match=key):
        gradtrace.load(path)
    doc["meta"][key] = None  # "not recorded" is fine
    doc["meta"]["anything_else"] = {"free": ["form", 1, True]}
    path.write_text(json.dumps(doc))
    assert check_file(path, tmp_path)


def check_bytes(data: bytes, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("fuzz", numbered=True)
    path = folder / "t.json"
    path.write_bytes(data)
    event("loaded" if check_file(path, folder) else "rejected")  # shown by --hypothesis-show-statistics


@FUZZ
@given(data=mutated_trace_text())
def test_fuzz_mutated_traces(data, tmp_path_factory):
    check_bytes(data, tmp_path_factory)


@FUZZ
@given(data=random_documents())
def test_fuzz_random_json(data, tmp_path_factory):
    check_bytes(data, tmp_path_factory)


# ---- a few cases through a real subprocess ---------------------------------------


def run_show(path):
    return subprocess.run([sys.executable, "-m", "gradtrace", "show", str(path)], capture_output=True,
                          timeout=120)


@pytest.mark.slow  # a fresh interpreter
def test_subprocess_show_of_a_deeply_nested_file(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"format": "gradtrace-trace", "version": 1, "params": ' + "[" * 100000 + "]" * 100000 + "}")
    proc = run_show(path)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b""
    assert err.startswith("gradtrace: error: ") and "nested deeper than" in err and err.count("\n") == 1


@pytest.mark.slow  # a fresh interpreter
def test_subprocess_show_escapes_a_hostile_pass_name(tmp_path):
    doc = copy.deepcopy(BASE)
    doc["passes"][0]["name"] = "X\x1b]0;pwned\x07\x1b[2J\u202e"
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(doc))
    proc = run_show(path)
    out = proc.stdout.decode()
    assert proc.returncode == 0 and proc.stderr == b""
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "X\\x1b]0;pwned\\x07\\x1b[2J\\u202e" in out  # shown, visibly escaped
