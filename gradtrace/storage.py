"""JSON save and load. Loading never runs code: plain JSON, checked field by field.

A trace file is untrusted input: traces are mailed around and attached to bug
reports. ``load`` reads at most ``MAX_FILE_BYTES``, turns a parser that runs
out of stack (deep nesting) or digits into a GradtraceError, and checks every
field of every record against a schema (type and bounds), so that whatever it
returns, ``report``, ``verdicts`` and ``diff`` can read. Anything else is a
GradtraceError naming the file and the field.

Non-finite floats are stored as the strings "nan", "inf", "-inf" (JSON has no
NaN). That is unambiguous because decoding is typed: only a field the schema
declares a number turns such a string back into a float, so a pass, tensor or
scalar named "nan" stays a string.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import stat
import tempfile
from typing import Any, Callable, Dict, List, Optional

from .errors import GradtraceError
from .records import (Cut, GradRecord, PassTrace, ScalarRecord, TensorGradFacts, TensorRecord,
                      ValueStats)

FORMAT = "gradtrace-trace"
VERSION = 1

# Far above any real trace (the demo's is ~40 KiB; a trace of 100k parameters over
# a few passes is tens of MiB), far below what would exhaust memory. A module
# constant so a caller with a genuinely larger trace can raise it.
MAX_FILE_BYTES = 256 * 2 ** 20
# A trace nests 6 deep; the JSON parser recurses once per level, and would overflow
# the C stack long before Python's recursion limit if that limit had been raised.
MAX_DEPTH = 64
# The schema fixes the depth of every field but ``meta``, whose values are free-form.
MAX_META_DEPTH = 8
MAX_COUNT = 2 ** 63 - 1  # counts are int64 on the device
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# ---- saving -----------------------------------------------------------------
def _encode_float(x: float) -> Any:
    """JSON has no NaN/Inf: store them as strings; the typed decoder reads them back as floats."""
    if not math.isfinite(x):
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
        return _encode_float(value)
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
    """Write ``trace`` to ``path`` atomically: readers see the previous file or the whole new one."""
    data = to_dict(trace)
    target = os.fspath(path)
    try:
        _write_atomically(target, data)
    except OSError as e:
        raise GradtraceError(f"cannot write trace to {target!r}: {e.strerror or e}") from e


def _write_atomically(target: str, data: Dict[str, Any]) -> None:
    # mkstemp: a fresh name, O_CREAT|O_EXCL (never opens a file or symlink planted in
    # advance), in the target's own folder so that os.replace is a rename, not a copy.
    folder = os.path.dirname(os.path.abspath(target))
    prefix = "." + os.path.basename(target)[:100] + "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _new_file_mode(target))
            json.dump(data, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, target)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _new_file_mode(target: str) -> int:
    """mkstemp creates mode 0600; give the trace what ``open(path, "w")`` would have."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)  # overwriting: keep the old file's mode
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    # os.umask can only be read by setting it, which races with other threads creating files.
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return 0o022


def _fsync_folder(folder: str) -> None:
    """Make the rename durable too (POSIX); where a folder cannot be opened (Windows), skip it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- loading ------------------------------------------------------------------
def read(path, factory):
    """Read a trace written by ``Trace.save`` and build it with ``factory`` (the plain ``Trace``).

    Raises GradtraceError for anything else; never runs code from the file.
    """
    where = os.fspath(path)
    return from_dict(_parse(_read(where), where), factory, where)


def _read(where: str) -> bytes:
    try:
        with open(where, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_FILE_BYTES:
                raise _too_big(where)
            raw = f.read(MAX_FILE_BYTES + 1)  # a device or pipe has no size: stop one byte past the limit
    except FileNotFoundError:
        raise GradtraceError(f"no such trace file: {where!r}") from None
    except OSError as e:
        raise GradtraceError(f"cannot read {where!r}: {e.strerror or e}") from None
    except MemoryError:
        raise _too_big(where) from None
    if len(raw) > MAX_FILE_BYTES:
        raise _too_big(where)
    return raw


def _too_big(where: str) -> GradtraceError:
    return GradtraceError(f"{where!r} is larger than gradtrace.storage.MAX_FILE_BYTES "
                          f"({MAX_FILE_BYTES} bytes); raise that limit if this really is a trace")


def _parse(raw: bytes, where: str) -> Any:
    not_trace = f"{where!r} is not a gradtrace trace"
    if _nesting_bound(raw) > MAX_DEPTH:  # before the parser recurses, not after
        raise GradtraceError(f"{not_trace}: arrays and objects nested deeper than {MAX_DEPTH}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GradtraceError(f"{not_trace}: not UTF-8 text (bad byte at offset {e.start})") from None
    try:
        return json.loads(text, parse_constant=float)  # NaN / Infinity literals: accepted as numbers
    except json.JSONDecodeError as e:
        raise GradtraceError(f"{not_trace}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        raise GradtraceError(f"{not_trace}: it holds a number with too many digits") from None
    except RecursionError:  # _nesting_bound keeps it from happening; kept in case it misjudges
        raise GradtraceError(f"{not_trace}: arrays and objects nested too deeply") from None
    except MemoryError:
        raise GradtraceError(f"{not_trace}: too large to parse in the memory available") from None


_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_INNERMOST = re.compile(rb"\[\]|\{\}")


def _nesting_bound(raw: bytes) -> int:
    """How deep arrays and objects nest (exact for valid JSON; an upper bound otherwise), at C speed.

    Escaped backslashes and quotes go first, then everything but brackets and
    quotes; splitting at the quotes leaves what lies outside strings. Each pass
    deletes the innermost pairs, so valid JSON nested d deep is empty after d
    passes; what never pairs up (invalid JSON) counts in full: ``[`` 100,000
    times is as deep as it looks.
    """
    skeleton = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    # Two quotes side by side (an empty string, or one string ending where the next begins) hide
    # nothing outside strings: dropping them first leaves few quotes for the split.
    skeleton = b"".join(skeleton.replace(b'""', b"").split(b'"')[::2])
    passes = 0
    while skeleton and passes <= MAX_DEPTH:
        shorter = _INNERMOST.sub(b"", skeleton)
        if len(shorter) == len(skeleton):
            break
        skeleton, passes = shorter, passes + 1
    return passes + skeleton.count(b"[") + skeleton.count(b"{")


def from_dict(data: Any, factory, where: str):
    """A trace (built by ``factory``, the plain ``Trace``) holding the checked contents of ``data``."""
    c = contents_of(data, where)
    return factory(c["params"], c["param_shapes"], c["meta"], passes={p.name: p for p in c["passes"]},
                   tensors={t.name: t for t in c["tensors"]}, scalars={s.name: s for s in c["scalars"]},
                   cuts=c["cuts"], inner_products=c["inner_products"], rank_coverage=c["rank_coverage"],
                   rank_figures=c["rank_figures"])


def contents_of(data: Any, where: str) -> Dict[str, Any]:
    """Check ``data`` field by field; return plain records: params, passes, tensors, scalars, cuts, ..."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise GradtraceError(f"{where!r} is not a gradtrace trace (no \"format\": \"{FORMAT}\" field); "
                             "write one with trace.save(path)")
    version = data.get("version")
    if version != VERSION or isinstance(version, bool):
        raise GradtraceError(f"{where!r} is trace format version {_show(version)}; this gradtrace reads version "
                             f"{VERSION}. Upgrade gradtrace or re-save the trace.")
    try:
        return _contents(data)
    except _Bad as e:
        raise GradtraceError(f"{where!r} is a damaged gradtrace trace: {e}") from None


# ---- the schema ---------------------------------------------------------------------
class _Bad(Exception):
    """A field that fails its check; ``contents_of`` adds the file name."""


Check = Callable[[Any, str], Any]  # (value, path in the file) -> the checked value, or raise _Bad


def _show(value: Any) -> str:
    """A short description of a bad value: the file is untrusted, so never echo much of it."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    if isinstance(value, int) and abs(value) > MAX_COUNT:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fail(path: str, expected: str, value: Any):
    raise _Bad(f"{path}: expected {expected}, got {_show(value)}")


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        _fail(path, "a string", value)
    return value


def _name(value: Any, path: str) -> str:
    """Pass, tensor and scalar names: non-empty strings, as the live API requires."""
    if not isinstance(value, str) or not value:
        _fail(path, "a non-empty string", value)
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        _fail(path, "true or false", value)
    return value


def _count(value: Any, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
        _fail(path, f"an integer from 0 to {MAX_COUNT}", value)
    return value


def _number(value: Any, path: str) -> float:
    """Any float; "nan", "inf", "-inf" are how ``save`` writes the non-finite ones."""
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, float):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2 ** 1023:
        return float(value)  # JSON has one number type: 0 for 0.0
    return _fail(path, "a number", value)


def _magnitude(value: Any, path: str) -> float:
    """A norm or a max |g|: not negative (NaN allowed: a NaN gradient has a NaN norm)."""
    x = _number(value, path)
    if x < 0:
        _fail(path, "a number >= 0", value)
    return x


def _optional(check: Check) -> Check:
    return lambda value, path: None if value is None else check(value, path)


def _list_of(check: Check) -> Check:
    def checked(value: Any, path: str) -> list:
        if not isinstance(value, list):
            _fail(path, "an array", value)
        return [check(item, f"{path}[{i}]") for i, item in enumerate(value)]
    return checked


def _dict_of(check: Check, key: Optional[Check] = None) -> Check:
    def checked(value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            _fail(path, "an object", value)
        return {(key(k, path) if key else k): check(v, f"{path}[{_label(k)}]") for k, v in value.items()}
    return checked


def _rank(value: str, path: str) -> int:
    """JSON object keys are strings: rank 3 was written as "3"."""
    if not re.fullmatch(r"[0-9]{1,9}", value):
        _fail(f"{path} key", "a rank number", value)
    return int(value)


def _label(name: str) -> str:
    text = repr(name)
    return text if len(text) <= 40 else text[:37] + "..."


def _plain(value: Any, path: str, depth: int = 0) -> Any:
    """A free-form ``meta`` value: JSON scalars, arrays and objects, nested at most MAX_META_DEPTH."""
    if depth > MAX_META_DEPTH:
        raise _Bad(f"{path}: nested deeper than {MAX_META_DEPTH}")
    if isinstance(value, list):
        return [_plain(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _plain(v, f"{path}[{_label(k)}]", depth + 1) for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_COUNT:
        _fail(path, "an integer of at most 64 bits", value)
    return value


def _fields(value: Any, path: str, what: str, schema: Dict[str, Check], required=()) -> Dict[str, Any]:
    """Check an object field by field: no unknown field, none of ``required`` missing."""
    where = path or "top level"  # the top-level object's fields are named bare: "passes[0].norm"
    if not isinstance(value, dict):
        _fail(where, f"a {what} object", value)
    unknown = [k for k in value if k not in schema]
    if unknown:
        raise _Bad(f"{where}: unknown {what} field(s): {', '.join(_label(k) for k in sorted(unknown))}")
    missing = [k for k in required if k not in value]
    if missing:
        raise _Bad(f"{where}: {what} lacks field(s) {', '.join(missing)}")
    return {k: schema[k](v, f"{path}.{k}" if path else k) for k, v in value.items()}


def _record(cls, schema: Dict[str, Check]) -> Check:
    """A check that builds ``cls`` (a records dataclass) from a checked object."""
    required = [f.name for f in dataclasses.fields(cls) if f.name in schema
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    return lambda value, path: cls(**_fields(value, path, cls.__name__, schema, required))


_grad_record = _record(GradRecord, {
    "name": _str, "hits": _count, "norm": _magnitude, "max_abs": _magnitude, "zero": _bool,
    "nonfinite": _count, "via": _str, "order": _count, "stale": _bool, "cleared": _bool})

_PASS = {
    "name": _name, "runs": _count, "kinds": _list_of(_str), "expected": _optional(_list_of(_str)),
    "expected_partial": _bool, "auto": _bool, "kept_grads": _bool, "step_start": _bool,
    "failed": _optional(_str), "scope": _str, "nonfinite_origin": _optional(_dict_of(_plain)), "records": _dict_of(_grad_record)}

_value_stats = _record(ValueStats, {
    "numel": _count, "min": _number, "max": _number, "mean": _number, "std": _magnitude, "zeros": _count,
    "nonfinite": _count, "rows": _count, "constant_rows": _count})

_tensor_grad_facts = _record(TensorGradFacts, {
    "hits": _count, "norm": _magnitude, "max_abs": _magnitude, "nonfinite": _count})

_tensor_record = _record(TensorRecord, {
    "name": _name, "calls": _count, "requires_grad": _bool, "requires_grad_calls": _count,
    "grad_fn": _optional(_str), "is_leaf": _bool, "inference": _bool, "shape": _list_of(_count),
    "dtype": _str, "device": _str, "expect_grad": _optional(_bool), "values": _value_stats,
    "grads": _dict_of(_tensor_grad_facts), "passes": _list_of(_str), "cuts": _list_of(_count),
    "reachable": _optional(_list_of(_str)), "reach_partial": _bool, "trainable_upstream": _bool,
    "role": _optional(_str), "row_facts": _dict_of(_number)})

_cut = _record(Cut, {
    "kind": _str, "module": _str, "op": _optional(_str), "location": _str, "library_location": _str,
    "inputs_require_grad": _optional(_bool), "pass_name": _optional(_str),
    "module_type": _str, "count": _count, "params": _count, "seq": _count})

_scalar = _record(ScalarRecord, {
    "name": _name, "value": _number, "pass_name": _optional(_str), "history": _list_of(_number)})

_CONTRIBUTION = {"param": _str, "contribution": _number, "share": _number}
_INNER = {
    "a": _str, "b": _str, "preconditioned": _bool, "dot": _number, "cosine": _optional(_number),
    "norm_a": _magnitude, "norm_b": _magnitude, "numel_b": _count,
    "top": _list_of(lambda v, path: _fields(v, path, "contribution", _CONTRIBUTION, list(_CONTRIBUTION))),
    "norm_a_pre": _magnitude, "norm_b_pre": _magnitude, "optimizer": _str}
_INNER_REQUIRED = ("a", "b", "preconditioned", "dot", "cosine", "norm_a", "norm_b", "top")
_INNER_PRECONDITIONED = ("norm_a_pre", "norm_b_pre", "optimizer")  # what the report shows for one


def _inner_product(value: Any, path: str) -> Dict[str, Any]:
    summary = _fields(value, path, "inner product", _INNER, _INNER_REQUIRED)
    if summary["preconditioned"]:
        _fields(value, path, "preconditioned inner product", _INNER, _INNER_PRECONDITIONED)
    return summary


def _meta(value: Any, path: str) -> Dict[str, Any]:
    """``meta`` is free-form, except the keys gradtrace itself reads back: those have their types."""
    meta = _dict_of(_plain)(value, path)
    for key, check in _META_KNOWN.items():
        if meta.get(key) is not None:
            meta[key] = check(meta[key], f"{path}[{key!r}]")
    return meta


# meta keys the analysis and the renderer read (None is always allowed: "not recorded").
_META_KNOWN: Dict[str, Check] = {
    "cuts": _str, "wrapper": _str, "name_prefix": _str, "error": _str, "torch": _str, "model": _str,
    "keep_grads": _bool, "find_unused_parameters": _bool,
    "dropped_passes": _count, "forward_calls": _count, "world_size": _count, "max_passes": _count,
    "ran_with_grad": _list_of(_str), "frozen_while_watched": _list_of(_str),
    "replaced_params": _dict_of(_str),
}


def _checked_later(value: Any, path: str) -> Any:
    return value  # a pass needs the checked params list: _contents checks passes after it


_TOP = {
    "format": _str, "version": _count, "meta": _optional(_meta), "params": _list_of(_str),
    "param_shapes": _optional(_dict_of(_list_of(_count))), "passes": _list_of(_checked_later),
    "tensors": _list_of(_tensor_record), "scalars": _list_of(_scalar), "cuts": _list_of(_cut),
    "inner_products": _optional(_list_of(_inner_product)),
    "rank_coverage": _optional(_dict_of(_dict_of(_list_of(_str), key=_rank))),
    "rank_figures": _optional(_dict_of(_dict_of(_dict_of(_list_of(_number)), key=_rank)))}
_TOP_REQUIRED = ("params", "passes", "tensors", "scalars", "cuts")


def _contents(data: Dict[str, Any]) -> Dict[str, Any]:
    top = _fields(data, "", "trace", _TOP, _TOP_REQUIRED)
    params = _unique(top["params"], "params", lambda name: name)
    passes = [_pass(raw, f"passes[{i}]", tuple(params)) for i, raw in enumerate(top["passes"])]
    _unique(passes, "passes", lambda p: p.name)
    _unique(top["tensors"], "tensors", lambda t: t.name)
    _unique(top["scalars"], "scalars", lambda s: s.name)
    seqs = {cut.seq for cut in top["cuts"]}
    _unique(top["cuts"], "cuts", lambda cut: str(cut.seq))
    for i, t in enumerate(top["tensors"]):
        bad = [c for c in t.cuts if c not in seqs]
        if bad:  # a live trace only records cuts it holds (max_passes drops a pass's cuts and their links)
            raise _Bad(f"tensors[{i}].cuts: cut {bad[0]} is not among the trace's {len(seqs)} cut(s)")
    return {"params": params, "param_shapes": top.get("param_shapes") or {}, "meta": top.get("meta") or {},
            "passes": passes, "tensors": top["tensors"], "scalars": top["scalars"], "cuts": top["cuts"],
            "inner_products": top.get("inner_products") or [], "rank_coverage": top.get("rank_coverage"),
            "rank_figures": top.get("rank_figures")}


def _pass(raw: Any, path: str, params: tuple) -> PassTrace:
    values = _fields(raw, path, "PassTrace", _PASS, ("name",))
    records: Dict[str, GradRecord] = values.pop("records", {})
    for key, record in records.items():
        if record.name != key:  # analysis reads names from both places
            raise _Bad(f"{path}.records[{_label(key)}].name is {_label(record.name)}")
    p = PassTrace(params=params, **values)
    p.records = records
    return p


def _unique(items: List[Any], path: str, name_of: Callable[[Any], str]) -> List[Any]:
    seen = set()
    for item in items:
        name = name_of(item)
        if name in seen:  # a live trace cannot hold two of anything under one name
            raise _Bad(f"{path}: {_label(name)} appears twice")
        seen.add(name)
    return items
