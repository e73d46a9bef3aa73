"""JSON save and load. Loading never runs code: plain JSON, checked field by field."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict

from .errors import GradtraceError
from .records import (Cut, GradRecord, PassTrace, ScalarRecord, TensorGradFacts, TensorRecord,
                      ValueStats)

FORMAT = "gradtrace-trace"
VERSION = 1


def _number(x: float) -> Any:
    """JSON has no NaN/Inf: store them as strings, read them back as floats."""
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)  # 'nan', 'inf', '-inf'
    return x


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = sorted(value) if isinstance(value, set) else value
        return [_encode(v) for v in items]
    if isinstance(value, float):
        return _number(value)
    return value


def _encode_pass(p: PassTrace) -> Dict[str, Any]:
    out = {f.name: _encode(getattr(p, f.name)) for f in dataclasses.fields(p)
           if not f.name.startswith("_") and f.name != "params"}  # params are stored once, at the top
    out["records"] = {name: _encode(r) for name, r in p.records.items()}
    return out


def to_dict(trace) -> Dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "meta": _encode(trace.meta),
        "params": list(trace.params),
        "param_shapes": _encode(trace.param_shapes),
        "passes": [_encode_pass(p) for p in trace.passes.values()],
        "tensors": [_encode(t) for t in trace.tensors.values()],
        "scalars": [_encode(s) for s in trace.scalars.values()],
        "cuts": [_encode(c) for c in trace.cuts],
        "inner_products": _encode(trace.inner_products),
        "rank_coverage": _encode(getattr(trace, "rank_coverage", None)),
        "rank_figures": _encode(getattr(trace, "rank_figures", None) or None),
    }


def save(trace, path) -> None:
    data = to_dict(trace)
    tmp = f"{os.fspath(path)}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, allow_nan=False)
        os.replace(tmp, path)  # never leave a half-written trace behind
    except OSError as e:
        raise GradtraceError(f"cannot write trace to {os.fspath(path)!r}: {e.strerror or e}") from e


def read(path, factory):
    """Read a trace written by ``Trace.save`` and build it with ``factory`` (the plain ``Trace``).

    Raises GradtraceError for anything else.
    """
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as f:
            data = json.load(f, parse_constant=lambda c: float(c))
    except FileNotFoundError:
        raise GradtraceError(f"no such trace file: {where!r}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GradtraceError(f"cannot read {where!r}: {e}") from None
    except json.JSONDecodeError as e:
        raise GradtraceError(f"{where!r} is not a gradtrace trace: not valid JSON ({e.msg} at line {e.lineno})") from None
    try:
        return from_dict(data, factory, where)
    except GradtraceError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise GradtraceError(f"{where!r} is a damaged gradtrace trace: {type(e).__name__}: {e}") from None


def from_dict(data: Any, factory, where: str):
    """Check ``data`` (as ``to_dict`` wrote it) field by field and build a trace with ``factory``."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise GradtraceError(f"{where!r} is not a gradtrace trace (no \"format\": \"{FORMAT}\" field); "
                             "write one with trace.save(path)")
    version = data.get("version")
    if version != VERSION:
        raise GradtraceError(f"{where!r} is trace format version {version!r}; this gradtrace reads version "
                             f"{VERSION}. Upgrade gradtrace or re-save the trace.")
    params = _str_list(data["params"], "params")
    passes = {}
    for raw in data["passes"]:
        records = {name: _make(GradRecord, r) for name, r in raw.pop("records").items()}
        p = _make(PassTrace, raw, params=tuple(params))
        p.records = records
        passes[p.name] = p
    tensors = {}
    for raw in data["tensors"]:
        values = _make(ValueStats, raw.pop("values"))
        grads = {k: _make(TensorGradFacts, v) for k, v in raw.pop("grads").items()}
        t = _make(TensorRecord, raw)
        t.values, t.grads = values, grads
        tensors[t.name] = t
    scalars = {}
    for raw in data["scalars"]:
        s = _make(ScalarRecord, raw)
        scalars[s.name] = s
    return factory(params, data.get("param_shapes") or {}, data.get("meta") or {}, passes=passes,
                   tensors=tensors, scalars=scalars, cuts=[_make(Cut, c) for c in data["cuts"]],
                   inner_products=_decode_numbers(data.get("inner_products") or []),
                   rank_coverage=_int_ranks(data.get("rank_coverage")),
                   rank_figures=_int_ranks(_decode_numbers(data.get("rank_figures"))))


def _int_ranks(per_pass: Any) -> Any:
    """JSON keys are strings: give ``{pass: {rank: ...}}`` its int ranks back (so 2 sorts before 10)."""
    if per_pass is None:
        return None
    return {name: {int(rank): value for rank, value in ranks.items()} for name, ranks in per_pass.items()}


def _make(cls, raw: Dict[str, Any], **override):
    if not isinstance(raw, dict):
        raise TypeError(f"{cls.__name__} must be an object, got {type(raw).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    unknown = set(raw) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    values = {k: _decode_numbers(v) for k, v in raw.items() if k not in override}
    values.update(override)
    return cls(**values)


def _decode_numbers(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, list):
        return [_decode_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode_numbers(v) for k, v in value.items()}
    return value


def _str_list(value: Any, field: str):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{field!r} must be a list of strings")
    return value
