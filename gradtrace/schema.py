"""The trace file's schema, read off the records' type hints: one declaration per field.

A record field is declared once, in ``records.py``, with a type from
``fields.py``; ``check_for(type)`` turns that type into a check
``value -> value`` that accepts what ``storage.save`` writes for it and raises
``Bad`` for anything else (the path to the field is added as it unwinds). A field someone adds to a
record is saved and checked on load with no change here; a type this module
cannot check fails when its check is first built (any test that loads a trace
finds it), never silently.

How types map to JSON:

* ``bool``, ``str`` (at most ``MAX_TEXT`` characters), ``float`` (also ``"nan"``,
  ``"inf"``, ``"-inf"``, how NaN/Inf are saved) and ``int`` (64 bits); ``Count``,
  ``Magnitude``, ``Amount``, ``Name`` add their ``Constraint``, ``RankFigures`` its
  ``Items``; ``Literal[...]`` one of its words; ``Any`` free-form JSON (nested at
  most ``MAX_FREE_DEPTH``);
* ``Optional[X]``: null or X; ``Union[X, Y, ...]``: the first that accepts it;
  ``List``/``Sequence``/``Tuple[X, ...]``/sets: an array;
  ``Dict[K, V]``: an object (``int`` keys are written as decimal strings);
* a dataclass: an object with its stored fields (``fields.stored``), required
  when they have no default; a ``ValueError`` from its constructor (an invariant,
  as ``InnerProduct`` keeps) is a damaged field. A dataclass naming a
  ``FREE_FORM_FIELD`` takes unknown keys into it (free-form) instead of refusing them.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import re
import typing
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional, Union

from .fields import FINITE_NON_NEGATIVE, NON_EMPTY, NON_NEGATIVE, Constraint, Items, stored, stored_name

__all__ = ["Bad", "Check", "check_for", "fields_check", "object_check", "array", "free_form", "show", "label",
           "MAX_COUNT", "MAX_FREE_DEPTH", "MAX_TEXT"]

MAX_COUNT = 2 ** 63 - 1  # counts are int64 on the device
# Every string a record holds (names, locations, messages) and every object key: far above a real name or a
# file path (PATH_MAX is 4096), far below what makes rendering slow (a 1 MB name took 28 s to lay out in a table).
MAX_TEXT = 4096 + 64
# Free-form values (``meta``'s own keys) nest at most this deep; every other field's depth is fixed by its type.
MAX_FREE_DEPTH = 8
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

Check = Callable[[Any], Any]  # value -> the checked value, or raise Bad


class Bad(Exception):
    """A field that fails its check. Where it is (``passes[0].records['w'].norm``) is added on the way
    out, one container at a time, so a file that passes builds no path strings; the loader adds the
    file name."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message, self.where = message, []  # path parts, innermost first

    def within(self, part: str) -> "Bad":
        self.where.append(part)
        return self

    @property
    def path(self) -> str:
        return "".join(reversed(self.where)).lstrip(".")

    def __str__(self) -> str:
        return f"{self.path or 'top level'}: {self.message}"


def show(value: Any) -> str:
    """A short description of a bad value: the file is untrusted, so never echo much of it."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str) and len(value) > MAX_TEXT:
        return f"a string of {len(value)} characters"
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    if isinstance(value, int) and abs(value) > MAX_COUNT:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def label(name: Any) -> str:
    text = repr(name)
    return text if len(text) <= 40 else text[:37] + "..."


def _fail(expected: str, value: Any):
    raise Bad(f"expected {expected}, got {show(value)}")


# ---- scalars -----------------------------------------------------------------------------
def _bool(value: Any) -> bool:
    if value is not True and value is not False:
        _fail("true or false", value)
    return value


def _str(value: Any) -> str:
    if type(value) is not str or len(value) > MAX_TEXT:
        _fail(f"a string of at most {MAX_TEXT} characters (gradtrace.schema.MAX_TEXT)", value)
    return value


def _name(value: Any) -> str:
    if type(value) is not str or not value or len(value) > MAX_TEXT:
        _fail(f"a non-empty string of at most {MAX_TEXT} characters (gradtrace.schema.MAX_TEXT)", value)
    return value


def _int(value: Any) -> int:
    if type(value) is not int or abs(value) > MAX_COUNT:  # type(): bool is an int subclass
        _fail("an integer of at most 64 bits", value)
    return value


def _count(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        _fail(f"an integer from 0 to {MAX_COUNT}", value)
    return value


def _number(value: Any) -> float:
    """Any float; "nan", "inf", "-inf" are how ``save`` writes the non-finite ones."""
    kind = type(value)
    if kind is float:
        return value
    if kind is int and abs(value) <= 2 ** 1023:
        return float(value)  # JSON has one number type: 0 for 0.0
    if kind is str and value in _NON_FINITE:
        return _NON_FINITE[value]
    return _fail("a number", value)


def _magnitude(value: Any) -> float:
    x = _number(value)
    if x < 0:
        _fail("a number >= 0", value)
    return x


def _amount(value: Any) -> float:
    x = _number(value)
    if not 0 <= x < math.inf:
        _fail("a finite number >= 0", value)
    return x


def free_form(value: Any, depth: int = 1) -> Any:
    """Free-form JSON (scalars, arrays, objects), nested at most MAX_FREE_DEPTH."""
    if depth > MAX_FREE_DEPTH:
        raise Bad(f"nested deeper than {MAX_FREE_DEPTH}")
    if isinstance(value, list):
        out = []
        for i, v in enumerate(value):
            try:
                out.append(free_form(v, depth + 1))
            except Bad as e:
                raise e.within(f"[{i}]") from None
        return out
    if isinstance(value, dict):
        checked = {}
        for k, v in value.items():
            try:
                checked[k] = free_form(v, depth + 1)
            except Bad as e:
                raise e.within(f"[{label(k)}]") from None
        return checked
    if type(value) is int and abs(value) > MAX_COUNT:
        _fail("an integer of at most 64 bits", value)
    return value


_PLAIN: Dict[Any, Check] = {bool: _bool, str: _str, int: _int, float: _number, Any: free_form, object: free_form}
_CONSTRAINED: Dict[tuple, Check] = {(int, NON_NEGATIVE): _count, (float, NON_NEGATIVE): _magnitude,
                                    (float, FINITE_NON_NEGATIVE): _amount, (str, NON_EMPTY): _name}


# ---- composite types -----------------------------------------------------------------------
def _optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def _array(check: Check, build: Callable[[list], Any] = list) -> Check:
    def checked(value: Any):
        if type(value) is not list:
            _fail("an array", value)
        out = []
        for i, item in enumerate(value):
            try:
                out.append(check(item))
            except Bad as e:
                raise e.within(f"[{i}]") from None
        return out if build is list else build(out)
    return checked


def _counted(check: Check, items: Items) -> Check:
    expected = f"an array of {items.at_least} to {items.at_most} items"

    def checked(value: Any):
        if type(value) is not list or not items.at_least <= len(value) <= items.at_most:
            _fail(expected, value if type(value) is not list else f"{len(value)} items")
        return check(value)
    return checked


def _decimal_key(value: str) -> int:
    """JSON object keys are strings: rank 3 was written as "3"."""
    if not re.fullmatch(r"[0-9]{1,18}", value):
        _fail("a decimal number", value)
    return int(value)


def _object(check: Check, key: Optional[Check]) -> Check:
    def checked(value: Any) -> dict:
        if type(value) is not dict:
            _fail("an object", value)
        out = {}
        for k, v in value.items():
            try:
                name = _str(k) if key is None else key(k)
            except Bad as e:
                raise e.within(" key") from None
            try:
                out[name] = check(v)
            except Bad as e:
                raise e.within(f"[{label(k)}]") from None
        return out
    return checked


def _first_of(checks: List[Check], optional: bool) -> Check:
    """``Union[A, B, ...]``: the first check that accepts the value (order matters: ``Union[float, str]``
    reads "nan" as a number, ``Union[str, float]`` as a string)."""
    def checked(value: Any):
        if value is None and optional:
            return None
        failures = []
        for check in checks:
            try:
                return check(value)
            except Bad as e:
                failures.append(e.message)
        raise Bad(" or ".join(failures))
    return checked


def _literal(words: tuple) -> Check:
    expected = "one of " + ", ".join(repr(w) for w in words)
    allowed = frozenset((type(w), w) for w in words)

    def checked(value: Any):
        try:
            known = (type(value), value) in allowed
        except TypeError:  # unhashable: an array or object
            known = False
        if not known:
            _fail(expected, value)
        return value
    return checked


_SEQUENCES = {list: list, collections.abc.Sequence: list, collections.abc.Set: set, set: set,
              frozenset: frozenset, tuple: tuple}
_MAPPINGS = (dict, collections.abc.Mapping)
_BUILT: Dict[Any, Check] = {}


def check_for(tp: Any) -> Check:
    """The check for a field of type ``tp`` (built once per type)."""
    try:
        return _BUILT[tp]
    except (KeyError, TypeError):  # TypeError: an unhashable type annotation
        pass
    check = _build(tp)
    try:
        _BUILT[tp] = check
    except TypeError:
        pass
    return check


def _build(tp: Any) -> Check:
    if tp in _PLAIN:
        return _PLAIN[tp]
    if dataclasses.is_dataclass(tp):
        return _record(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        base, *constraints = args
        if len(constraints) == 1 and isinstance(constraints[0], Constraint) and (base, constraints[0]) in _CONSTRAINED:
            return _CONSTRAINED[base, constraints[0]]
        if len(constraints) == 1 and isinstance(constraints[0], Items):
            return _counted(check_for(base), constraints[0])
    elif origin is Literal:
        return _literal(args)
    elif origin is Union and type(None) in args and len(args) == 2:
        return _optional(check_for(next(a for a in args if a is not type(None))))
    elif origin is Union:
        return _first_of([check_for(a) for a in args if a is not type(None)], type(None) in args)
    elif origin in _SEQUENCES and (len(args) == 1 or (origin is tuple and len(args) == 2 and args[1] is ...)):
        return _array(check_for(args[0]), _SEQUENCES[origin])
    elif origin in _MAPPINGS and len(args) == 2:
        return _object(check_for(args[1]), None if args[0] is str else _key_check(args[0]))
    elif tp is dict:
        return _object(free_form, None)
    raise TypeError(f"gradtrace.schema cannot check a field of type {tp!r}: use a type from gradtrace.fields, "
                    "a dataclass, or Optional/List/Dict of them")


def _key_check(key: Any) -> Check:
    if key is int or key == typing.Annotated[int, NON_NEGATIVE]:
        return _decimal_key
    raise TypeError(f"gradtrace.schema cannot check object keys of type {key!r} (str or int keys only)")


# ---- records -----------------------------------------------------------------------------------
def object_check(what: str, checks: Dict[str, Check], required: Iterable[str] = (),
                 free: Optional[str] = None, names: Optional[Dict[str, str]] = None) -> Check:
    """A check ``value -> {name: checked value}`` of an object, key by key with ``checks``: none of
    ``required`` missing; an unknown key is refused, or with ``free`` gathered free-form under that
    name. ``names`` maps a stored key to the name it gets (default: the key)."""
    required, names = frozenset(required), names or {}
    known = checks.keys()

    def checked(value: Any) -> Dict[str, Any]:
        if type(value) is not dict:
            _fail(f"a {what} object", value)
        keys = value.keys()
        if free is None and not keys <= known:
            unknown = sorted(k for k in keys if k not in known)
            raise Bad(f"unknown {what} field(s): {', '.join(label(k) for k in unknown)}")
        if not keys >= required:
            raise Bad(f"{what} lacks field(s) {', '.join(k for k in checks if k in required and k not in keys)}")
        out: Dict[str, Any] = {}
        key = None
        try:
            if plain:  # the common case, kept to one dict store per field
                for key, item in value.items():
                    out[key] = checks[key](item)
                return out
            for key, item in value.items():
                check = checks.get(key)
                if check is not None:
                    out[names.get(key, key)] = check(item)
                else:
                    out.setdefault(free, {})[key] = free_form(item)
        except Bad as e:
            raise e.within(f".{key}" if key in checks else f"[{label(key)}]") from None
        return out
    plain = free is None and not names
    return checked


def fields_check(cls: type, extra: Optional[Dict[str, Any]] = None) -> Check:
    """The ``object_check`` of dataclass ``cls``'s stored fields, plus ``extra`` (``{key: type}``) for
    what a file holds beside them; the result is keyed by field name, ready for ``cls(**result)``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [f for f in dataclasses.fields(cls) if stored(f)]
    checks = {stored_name(f): check_for(hints[f.name]) for f in fields}
    checks.update({key: check_for(tp) for key, tp in (extra or {}).items()})
    required = [stored_name(f) for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    return object_check(cls.__name__, checks, required, getattr(cls, "FREE_FORM_FIELD", None),
                        {stored_name(f): f.name for f in fields if stored_name(f) != f.name})


def array(check: Check) -> Check:
    """An array whose items pass ``check``."""
    return _array(check)


def _record(cls: type) -> Check:
    """A check that builds ``cls`` from a checked object; its check of fields is built on first use
    (records refer to one another, and a class may be declared after the first that names it)."""
    built: List[Callable] = []

    def checked(value: Any):
        if not built:
            built.append(fields_check(cls))
        values = built[0](value)
        try:
            return cls(**values)
        except ValueError as e:  # an invariant the record keeps (InnerProduct: preconditioned figures)
            raise Bad(str(e)) from None
    return checked
