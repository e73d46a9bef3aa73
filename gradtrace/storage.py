"""JSON save and load. Loading never runs code: plain JSON, checked field by field.

A trace file is untrusted input: traces are mailed around and attached to bug
reports. ``load`` reads at most ``MAX_FILE_BYTES``, estimates the work of
reading and reporting it (``LoadWork``, before the parser runs and before any
analysis) and refuses more than ``MAX_LOAD_WORK``, turns a parser that runs
out of stack (deep nesting) or digits into a GradtraceError, and checks every
field of every record against the schema read off the records' type hints
(``schema.py``), so that whatever it returns, ``report``, ``verdicts`` and
``diff`` can read. Anything else is a GradtraceError naming the file and the field.

``save`` writes a regular file and nothing else: a new file in an existing
folder, or a regular file replaced atomically (through a symlink, the file it
points to is replaced and the link kept). A device, FIFO, socket or folder at
the path, or a link to one, is refused, never renamed over.

Non-finite floats are stored as the strings "nan", "inf", "-inf" (JSON has no
NaN). That is unambiguous because decoding is typed: only a field the schema
declares a number turns such a string back into a float, so a pass, tensor or
scalar named "nan" stays a string.
"""
from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import json
import math
import os
import stat
import tempfile
from typing import Any, Callable, Dict, List, Optional

from . import schema
from .errors import GradtraceError
from .fields import Count, RankFigures, stored, stored_name
from .records import (Cut, GradRecord, InnerProduct, OptimizerRecord, PassTrace, ScalarRecord, TensorRecord,
                      TraceMeta)
from .schema import Bad, label

FORMAT = "gradtrace-trace"
VERSION = 1

# Far above any real trace (the demo's is ~40 KiB; a trace of 100k parameters over
# a few passes is tens of MiB), far below what would exhaust memory. A module
# constant so a caller with a genuinely larger trace can raise it.
MAX_FILE_BYTES = 256 * 2 ** 20
# A trace nests 6 deep; the JSON parser recurses once per level, and would overflow
# the C stack long before Python's recursion limit if that limit had been raised.
MAX_DEPTH = 64
# What reading and reporting a trace may cost, in work units (see LoadWork): about 1.5 s of CPU
# where the costs were measured, so a trace that loads is reported in under 2 s. Its size in
# bytes does not bound that: 240 KB can hold 10,000 parameters whose coverage changes in each of
# 1,000 passes (refused: ~2 s); 5,000 parameters x 300 such passes load (~0.3 s). A module
# constant, like MAX_FILE_BYTES, for a caller with a larger trace.
MAX_LOAD_WORK = 1_500_000


@dataclasses.dataclass
class LoadWork:
    """What reading a trace costs, in work units of about a microsecond of CPU.

    Each count is weighted by what it cost in ``benchmarks/load_work.py`` (CPython
    3.11 on a 2-core runner): a JSON value is parsed, checked and built (0.5); a
    byte is scanned before parsing and may be rendered (1/32), and the brackets
    are scanned again for each level they nest (1/500 a byte); the analysis
    compares the coverage of each pair of passes whose coverage differs, with set
    operations over every parameter (1/5 a parameter: the names are grouped by
    module once per call, and each gap describes only its own names); cuts are compared pairwise to find the outermost (0.5 a pair) and with
    every registered tensor (0.3 a pair). The counts before parsing come from the
    bytes (values: commas and brackets outside strings), the rest from the
    checked records, before any analysis runs.
    """

    values: int = 0
    text: int = 0  # bytes
    scanned: int = 0  # bytes scanned to find how deep the file nests (once per level)
    coverage: int = 0  # parameters x pairs of passes whose coverage differs
    cuts: int = 0
    tensors: int = 0

    def parts(self) -> Dict[str, int]:
        return {"JSON values": self.values // 2, "bytes": self.text // 32, "nesting": self.scanned // 500,
                "parameters x coverage changes": self.coverage // 5,
                "cut pairs": self.cuts * self.cuts // 4, "tensors x cuts": self.tensors * self.cuts * 3 // 10}

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    def check(self, where: str) -> None:
        total = self.total
        if total > MAX_LOAD_WORK:
            part, size = max(self.parts().items(), key=lambda item: item[1])
            raise GradtraceError(
                f"{where!r} would take too long to read and report: about {total:,} work units (~{total / 1e6:.1f} s "
                f"of CPU), most of it for {part} ({size:,}); gradtrace.storage.MAX_LOAD_WORK is {MAX_LOAD_WORK:,}. "
                "Raise that limit if you trust this trace to be this large.")


# ---- saving -----------------------------------------------------------------
def _encode_float(x: float) -> Any:
    """JSON has no NaN/Inf: store them as strings; the typed decoder reads them back as floats."""
    if not math.isfinite(x):
        return repr(x)  # 'nan', 'inf', '-inf'
    return x


def _encode(value: Any, path: str) -> Any:
    """JSON for a record (its stored fields, under their stored names), a container or a scalar."""
    if isinstance(value, collections.abc.Mapping):  # dicts, and TraceMeta (its fields that are set, its own keys)
        return {str(k): _encode(v, f"{path}[{label(k)}]") for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # A field at its default None is left out: readers fill it in, and so did gradtrace before the
        # records were typed (which refused null for some of them: older readers keep reading new files).
        return {stored_name(f): _encode(getattr(value, f.name), f"{path}.{f.name}")
                for f in dataclasses.fields(value)
                if stored(f) and not (f.default is None and getattr(value, f.name) is None)}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return [_encode(v, path) for v in sorted(value)]
    if isinstance(value, float):
        return _encode_float(value)
    if value is None or isinstance(value, (str, bool, int)):
        return value
    raise GradtraceError(f"cannot save {path} = {type(value).__name__}: a trace holds JSON values only "
                         "(str, int, float, bool, None, lists and dicts of them)")


def _encode_pass(p: PassTrace, path: str) -> Dict[str, Any]:
    out = _encode(p, path)  # params are stored once, at the top
    out["records"] = {name: _encode(r, f"{path}.records[{label(name)}]") for name, r in p.records.items()}
    return out


def to_dict(trace) -> Dict[str, Any]:
    data = {
        "format": FORMAT,
        "version": VERSION,
        "meta": _encode(trace.meta, "trace.meta"),
        "params": list(trace.params),
        "param_shapes": _encode(trace.param_shapes, "trace.param_shapes"),
        "passes": [_encode_pass(p, f"trace.passes[{label(p.name)}]") for p in trace.passes.values()],
        "tensors": [_encode(t, f"trace.tensors[{label(t.name)}]") for t in trace.tensors.values()],
        "scalars": [_encode(s, f"trace.scalars[{label(s.name)}]") for s in trace.scalars.values()],
        "cuts": _encode(trace.cuts, "trace.cuts"),
        "inner_products": _encode(trace.inner_products, "trace.inner_products"),
        "rank_coverage": _encode(getattr(trace, "rank_coverage", None), "trace.rank_coverage"),
        "rank_figures": _encode(getattr(trace, "rank_figures", None) or None, "trace.rank_figures"),
    }
    optimizers = list((getattr(trace, "optimizers", None) or {}).values())
    if optimizers:  # written only when one stepped: a trace without any is the file an older gradtrace wrote
        data["optimizers"] = _encode(optimizers, "trace.optimizers")
    return data


def save(trace, path) -> None:
    """Write ``trace`` to ``path`` atomically: readers see the previous file or the whole new one.

    ``path`` is a new file in an existing folder or a regular file (through a
    symlink: the file it points to, the link kept); anything else is refused.
    """
    target = _path_argument(path, "trace.save")
    data = to_dict(trace)
    try:
        _write_atomically(_destination(target), data)
    except OSError as e:
        raise GradtraceError(f"cannot write trace to {target!r}: {e.strerror or e}") from e


def _path_argument(path: Any, what: str) -> str:
    """``path`` as a str, or a GradtraceError saying why it is not a file name."""
    try:
        name = os.fspath(path)
    except TypeError:
        raise GradtraceError(f"{what}(path) takes a file name (str or os.PathLike), got "
                             f"{type(path).__name__}") from None
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if "\0" in name or not name:
        raise GradtraceError(f"{what}(path): {name!r} is not a usable file name"
                             + (" (it holds a NUL character)" if name else " (it is empty)"))
    return name


def _destination(target: str) -> str:
    """The path to rename the new file onto: ``target``, or the regular file a symlink at ``target`` names."""
    try:
        link = os.lstat(target)
    except FileNotFoundError:
        return target  # a new file (a missing folder fails in mkstemp, with the OS's words)
    if not stat.S_ISLNK(link.st_mode):
        _refuse_unless_regular(target, link.st_mode)
        return target
    try:
        pointed = os.stat(target)
    except FileNotFoundError:
        raise GradtraceError(f"cannot write trace to {target!r}: it is a symlink to a missing file "
                             f"({os.readlink(target)!r}); remove the link or save to another path") from None
    _refuse_unless_regular(target, pointed.st_mode, "it is a symlink to")
    return os.path.realpath(target)


def _refuse_unless_regular(target: str, mode: int, what: str = "it is") -> None:
    if stat.S_ISREG(mode):
        return
    kind = ("a folder" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode) else
            "a block device" if stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "something other than a file")
    raise GradtraceError(f"cannot write trace to {target!r}: {what} {kind}, not a regular file; trace.save "
                         "writes a new file or replaces a regular one, nothing else")


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
        _still_replaceable(target)  # writing took time: what is at the name now?
        os.replace(tmp, target)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _still_replaceable(target: str) -> None:
    """Right before the rename: never rename over something that is not a regular file (or nothing)."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    _refuse_unless_regular(target, mode)


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
    where = _path_argument(path, "gradtrace.load")
    raw = _read(where)
    work = LoadWork(text=len(raw))
    return from_dict(_parse(raw, where, work), factory, where, work)


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


def _parse(raw: bytes, where: str, work: LoadWork) -> Any:
    """The JSON document in ``raw``; counts its values into ``work`` and checks the limit before parsing."""
    not_trace = f"{where!r} is not a gradtrace trace"
    skeleton = _skeleton(raw)
    # Before the parser builds them: every value costs a Python object, a check and a record. Commas and
    # brackets count every value of a valid document (an empty array or object twice: an upper bound).
    work.values = skeleton.count(b",") + skeleton.count(b"[") + skeleton.count(b"{") + 1
    work.check(where)
    if _nesting_bound(skeleton.replace(b",", b""), work, where) > MAX_DEPTH:  # before the parser recurses
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


_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}",')


def _skeleton(raw: bytes) -> bytes:
    """The brackets and commas of ``raw`` that lie outside strings, at C speed.

    Escaped backslashes and quotes go first, then everything but brackets,
    commas and quotes; splitting at the quotes leaves what lies outside strings.
    """
    skeleton = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    # Two quotes side by side (an empty string, or one string ending where the next begins) hide
    # nothing outside strings: dropping them first leaves few quotes for the split.
    return b"".join(skeleton.replace(b'""', b"").split(b'"')[::2])


_ONE_BRACKET = bytes.maketrans(b"{}", b"[]")


def _nesting_bound(skeleton: bytes, work: Optional["LoadWork"] = None, where: str = "") -> int:
    """How deep the brackets of ``skeleton`` nest (exact for valid JSON; an upper bound otherwise).

    Braces become brackets (the parser recurses into both alike; a brace closed
    by a bracket is invalid JSON the parser stops at), then each pass deletes the
    innermost pairs: ``bytes.replace`` does not rescan what it wrote, so a pass
    takes exactly one level off, and valid JSON nested d deep is empty after d
    passes. What never pairs up counts in full: ``[`` 100,000 times is as deep
    as it looks. Each pass scans what is left: with ``work``, that is counted,
    and a file deep and wide at once is refused before the passes add up.
    """
    skeleton = skeleton.translate(_ONE_BRACKET)
    passes = 0
    while skeleton and passes <= MAX_DEPTH:
        if work is not None:
            work.scanned += len(skeleton)
            work.check(where)
        shorter = skeleton.replace(b"[]", b"")
        if len(shorter) == len(skeleton):
            break
        skeleton, passes = shorter, passes + 1
    return passes + skeleton.count(b"[")


def from_dict(data: Any, factory, where: str, work: Optional[LoadWork] = None):
    """A trace (built by ``factory``, the plain ``Trace``) holding the checked contents of ``data``."""
    c = contents_of(data, where, work)
    return factory(c["params"], c["param_shapes"], c["meta"], passes={p.name: p for p in c["passes"]},
                   tensors={t.name: t for t in c["tensors"]}, scalars={s.name: s for s in c["scalars"]},
                   cuts=c["cuts"], inner_products=c["inner_products"], rank_coverage=c["rank_coverage"],
                   rank_figures=c["rank_figures"], optimizers={o.name: o for o in c["optimizers"]})


def contents_of(data: Any, where: str, work: Optional[LoadWork] = None) -> Dict[str, Any]:
    """Check ``data`` field by field; return plain records: params, passes, tensors, scalars, cuts, ...

    ``work`` is what reading the file cost so far; with what analysing these records will cost, it
    must stay under MAX_LOAD_WORK.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise GradtraceError(f"{where!r} is not a gradtrace trace (no \"format\": \"{FORMAT}\" field); "
                             "write one with trace.save(path)")
    version = data.get("version")
    if version != VERSION or isinstance(version, bool):
        raise GradtraceError(f"{where!r} is trace format version {schema.show(version)}; this gradtrace reads "
                             f"version {VERSION}. Upgrade gradtrace or re-save the trace.")
    try:
        contents = _contents(data)
    except Bad as e:
        raise GradtraceError(f"{where!r} is a damaged gradtrace trace: {e}") from None
    _add_analysis_work(work or LoadWork(), contents).check(where)
    return contents


def _add_analysis_work(work: LoadWork, contents: Dict[str, Any]) -> LoadWork:
    """Adds the parts of LoadWork that grow faster than the file: pairs of what the analysis compares."""
    covered = [frozenset(p.records) for p in contents["passes"] if p.records]
    changes = sum(1 for a, b in zip(covered, covered[1:], strict=False) if a != b)
    distinct = min(len(set(covered)), 6)  # a few passes are compared pairwise, a long run neighbour to neighbour
    work.coverage = len(contents["params"]) * (changes + distinct * (distinct - 1) // 2)
    work.cuts, work.tensors = len(contents["cuts"]), len(contents["tensors"])
    return work


# ---- the file's layout (each record's fields come from its type hints: schema.py) ------------------
# A pass is stored with its records beside its fields; its params are stored once, at the top.
_pass_fields = schema.fields_check(PassTrace, extra={"records": Dict[str, GradRecord]})

_TOP_TYPES = {
    "format": str, "version": int, "meta": Optional[TraceMeta], "params": List[str],
    "param_shapes": Optional[Dict[str, List[Count]]], "tensors": List[TensorRecord],
    "scalars": List[ScalarRecord], "cuts": List[Cut], "inner_products": Optional[List[InnerProduct]],
    "rank_coverage": Optional[Dict[str, Dict[Count, List[str]]]],  # {pass: {rank: [covered parameters]}}
    "rank_figures": Optional[Dict[str, Dict[Count, Dict[str, RankFigures]]]],  # {pass: {rank: {param: figures}}}
    "optimizers": Optional[List[OptimizerRecord]],  # the optimizers seen stepping (global step hooks)
}
_top_fields = schema.object_check(
    "trace", {**{key: schema.check_for(tp) for key, tp in _TOP_TYPES.items()},
              "passes": schema.array(_pass_fields)},  # built into PassTrace once params are checked
    required=("params", "passes", "tensors", "scalars", "cuts"))


def _contents(data: Dict[str, Any]) -> Dict[str, Any]:
    top = _top_fields(data)
    params = _unique(top["params"], "params", lambda name: name)
    passes = [_pass(values, f"passes[{i}]", tuple(params)) for i, values in enumerate(top["passes"])]
    _unique(passes, "passes", lambda p: p.name)
    _unique(top["tensors"], "tensors", lambda t: t.name)
    _unique(top["scalars"], "scalars", lambda s: s.name)
    seqs = {cut.seq for cut in top["cuts"]}
    _unique(top["cuts"], "cuts", lambda cut: str(cut.seq))
    for i, t in enumerate(top["tensors"]):
        bad = [c for c in t.cuts if c not in seqs]
        if bad:  # a live trace only records cuts it holds (max_passes drops a pass's cuts and their links)
            raise Bad(f"cut {bad[0]} is not among the trace's {len(seqs)} cut(s)").within(f"tensors[{i}].cuts")
    return {"params": params, "param_shapes": top.get("param_shapes") or {},
            "meta": top.get("meta") or TraceMeta(), "passes": passes, "tensors": top["tensors"],
            "scalars": top["scalars"], "cuts": top["cuts"], "inner_products": top.get("inner_products") or [],
            "rank_coverage": top.get("rank_coverage"), "rank_figures": top.get("rank_figures"),
            "optimizers": _unique(top.get("optimizers") or [], "optimizers", lambda o: o.name)}


def _pass(values: Dict[str, Any], path: str, params: tuple) -> PassTrace:
    records: Dict[str, GradRecord] = values.pop("records", {})
    for key, record in records.items():
        if record.name != key:  # analysis reads names from both places
            raise Bad(f"{label(record.name)} is not the name it is stored under").within(
                f"{path}.records[{label(key)}].name")
    p = PassTrace(params=params, **values)
    p.records = records
    return p


def _unique(items: List[Any], path: str, name_of: Callable[[Any], str]) -> List[Any]:
    seen = set()
    for item in items:
        name = name_of(item)
        if name in seen:  # a live trace cannot hold two of anything under one name
            raise Bad(f"{label(name)} appears twice").within(path)
        seen.add(name)
    return items
