"""Typed records: TraceMeta, InnerProduct, NonfiniteOrigin, and the storage schema read off the type hints.

Every record field is declared once (records.py, types from fields.py); the
loader's checks come from those declarations. These tests pin: old files still
load (a fixture saved by commit d1a6055), dict-style reads keep working, a
field added to a record is saved and checked with no other change, and every
stored field of every record refuses a value of the wrong type.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional

import pytest

import gradtrace
from gradtrace import GradtraceError, records, schema, storage
from gradtrace.fields import CUT_KINDS, Count, Magnitude, Name, stored, stored_as, stored_name
from gradtrace.records import (Contribution, Cut, GradRecord, InnerProduct, NonfiniteOrigin, PassTrace,
                               ScalarRecord, TensorGradFacts, TensorRecord, TraceMeta, ValueStats)

LEGACY = Path(__file__).parent / "fixtures" / "trace_d1a6055.json"


# ---- files written before the records were typed --------------------------------------------
def without_nulls(value, keep=()):
    """``value`` with every object key whose value is null removed (but those in ``keep``)."""
    if isinstance(value, dict):
        return {k: without_nulls(v, keep) for k, v in value.items() if v is not None or k in keep}
    if isinstance(value, list):
        return [without_nulls(v, keep) for v in value]
    return value


def test_a_trace_saved_by_commit_d1a6055_loads_with_typed_records(tmp_path):
    trace = gradtrace.load(LEGACY)
    meta = trace.meta
    assert isinstance(meta, TraceMeta)
    assert (meta.cuts, meta.keep_grads, meta.model, meta.max_passes, meta.dropped_passes) == ("ops", True, "Tiny", 256, 0)
    assert meta.world_size == 2 and meta.forward_calls == 2 and meta.frozen_while_watched == []
    assert meta.ran_with_grad == {"", "blocks.0", "blocks.1", "head"}
    assert meta.error == "ValueError: the reward function failed"
    assert meta["user_note"] == {"free": ["form", 1, True, None]}  # a key of the user's own, kept free-form
    origin = trace.passes["Z"].nonfinite_origin
    assert origin == NonfiniteOrigin(op="div", location="tests/fixtures/make_legacy_trace.py:57", node="DivBackward0",
                                     module="", forward="finite", pass_name="Z")
    plain, pre = trace.inner_products
    assert isinstance(plain, InnerProduct) and not plain.preconditioned and plain.cosine is not None
    assert pre.preconditioned and pre.optimizer == "Adam" and pre.norm_b_pre > 0 and pre.numel_b == 35
    assert all(isinstance(t, Contribution) for t in plain.top)
    assert {c.kind for c in trace.cuts} == {"no_grad", "detach"}
    codes = [v.code for v in trace.verdicts()]
    assert {"PASS_FAILED", "NONFINITE", "GRAPH_CUT"} <= set(codes)
    assert "born in the backward of op div (DivBackward0)" in trace.report()
    # Saved again by today's code: the same file, but for fields left at their default null (not written).
    trace.save(tmp_path / "again.json")
    old, new = json.loads(LEGACY.read_text()), json.loads((tmp_path / "again.json").read_text())
    assert without_nulls(old) == without_nulls(new) and new == without_nulls(new, keep=("cosine",))
    assert gradtrace.load(tmp_path / "again.json").report() == trace.report()


def test_dict_style_reads_keep_working_on_typed_records():
    trace = gradtrace.load(LEGACY)
    meta = trace.meta
    assert meta["dropped_passes"] == 0 and meta.get("world_size") == 2 and meta.get("wrapper") is None
    assert "cuts" in meta and "wrapper" not in meta and "nothing" not in meta
    with pytest.raises(KeyError):
        meta["wrapper"]  # not recorded: absent, as it was from the dict
    pre = trace.inner_products[1]
    assert pre["preconditioned"] is True and pre["norm_b_pre"] == pre.norm_b_pre and pre.get("nothing") is None
    assert pre["top"][0]["param"] == pre.top[0].param
    origin = trace.passes["Z"].nonfinite_origin
    assert origin["op"] == "div" and origin["pass"] == "Z" and origin["location"].endswith(":57")
    assert dict(origin) == {"op": "div", "location": origin.location, "node": "DivBackward0", "module": "",
                            "forward": "finite", "pass": "Z"}
    assert {**pre}["optimizer"] == "Adam"


def test_trace_meta_is_a_mutable_mapping_with_typed_fields():
    meta = TraceMeta.of({"cuts": "modules", "dropped_passes": 0, "run_id": "abc"})
    assert meta.cuts == "modules" and meta["run_id"] == "abc"
    assert list(meta) == ["cuts", "dropped_passes", "run_id"] and len(meta) == 3
    assert meta == {"cuts": "modules", "dropped_passes": 0, "run_id": "abc"}
    meta["dropped_passes"] += 2  # a known key sets the attribute
    meta["world_size"] = 4
    assert meta.dropped_passes == 2 and meta.world_size == 4
    del meta["run_id"], meta["cuts"]
    assert meta.cuts is None and "run_id" not in meta
    meta.update(error="boom", note=[1, 2])
    copied = meta.copy()
    copied.error = None
    assert meta.error == "boom" and "error" not in copied and copied["note"] == [1, 2]
    assert dict(TraceMeta.of(meta)) == dict(meta)


def test_a_dict_assigned_to_meta_becomes_a_trace_meta():
    trace = gradtrace.load(LEGACY)
    trace.meta = {"cuts": "ops", "world_size": 3, "mine": 1}
    assert isinstance(trace.meta, TraceMeta) and trace.meta.world_size == 3 and trace.meta["mine"] == 1
    assert "on rank(s) 0, 1, 2" in trace.report()  # the analysis reads the attribute


def test_a_users_own_meta_keys_are_saved_and_must_be_json(tmp_path):
    trace = gradtrace.load(LEGACY)
    trace.meta["run"] = {"id": 7, "tags": ["a"]}
    trace.save(tmp_path / "t.json")
    assert gradtrace.load(tmp_path / "t.json").meta["run"] == {"id": 7, "tags": ["a"]}
    trace.meta["model_object"] = object()
    with pytest.raises(GradtraceError, match=r"cannot save trace\.meta\['model_object'\] = object"):
        trace.save(tmp_path / "t.json")
    assert gradtrace.load(tmp_path / "t.json").meta["run"] == {"id": 7, "tags": ["a"]}  # the old file stays


# ---- the schema is derived from the type hints --------------------------------------------------------
@dataclass
class Inner:
    """A test-only record nested in ``Everything``."""

    label: Name
    weight: Magnitude = 0.0


@dataclass
class Everything:
    """A test-only record with one field of each kind of type the schema reads."""

    required_count: Count
    flag: bool = False
    text: str = ""
    signed: int = -3
    ratio: float = 0.5
    kind: Literal["a", "b"] = "a"
    maybe: Optional[Magnitude] = None
    names: List[str] = field(default_factory=list)
    by_rank: Dict[int, List[float]] = field(default_factory=dict)
    nested: Optional[Inner] = None
    items: List[Inner] = field(default_factory=list)
    renamed: str = field(default="", metadata=stored_as("class"))
    mixed: List[typing.Union[str, float, None]] = field(default_factory=list)
    anything: typing.Any = None
    _private: int = 0


def check(value, cls=Everything):
    return schema.check_for(cls)(value)


def test_a_new_record_type_is_checked_from_its_hints_alone():
    full = Everything(3, True, "t", -9, float("inf"), "b", 2.0, ["n"], {4: [1.0]}, Inner("i", 1.0), [Inner("j")],
                      "r", ["nan", 1.5, None], {"free": [1]})
    encoded = json.loads(json.dumps(storage._encode(full, "x")))
    assert encoded["ratio"] == "inf" and encoded["class"] == "r" and "_private" not in encoded
    assert encoded["by_rank"] == {"4": [1.0]}
    assert check(encoded) == full  # the round trip through a file
    assert check({"required_count": 0}) == Everything(0)
    for bad, message in [
        ({}, "Everything lacks field\\(s\\) required_count"),
        ({"required_count": -1}, "^required_count: expected an integer from 0"),
        ({"required_count": 1, "kind": "c"}, "^kind: expected one of 'a', 'b', got 'c'"),
        ({"required_count": 1, "maybe": -1.0}, "^maybe: expected a number >= 0"),
        ({"required_count": 1, "signed": 2 ** 64}, "^signed: expected an integer of at most 64 bits"),
        ({"required_count": 1, "by_rank": {"one": []}}, "^by_rank key: expected a decimal number"),
        ({"required_count": 1, "nested": {"label": ""}}, "^nested.label: expected a non-empty string"),
        ({"required_count": 1, "items": [{"label": "l", "weight": "heavy"}]}, r"^items\[0\].weight: expected a number"),
        ({"required_count": 1, "renamed": "r"}, "unknown Everything field\\(s\\): 'renamed'"),
        ({"required_count": 1, "mixed": [[1]]}, r"^mixed\[0\]: expected a string .* or expected a number, got a JSON array"),
        ({"required_count": 1, "_private": 1}, "unknown Everything field\\(s\\): '_private'"),
        ({"required_count": 1, "anything": [[[[[[[[[[1]]]]]]]]]]}, "nested deeper than 8"),
    ]:
        with pytest.raises(schema.Bad, match=message):
            check(bad)


def test_a_type_the_schema_cannot_check_fails_when_its_check_is_built():
    @dataclass
    class Odd:
        value: complex = 0j

    with pytest.raises(TypeError, match="cannot check a field of type"):
        check({"value": 1}, Odd)


def test_a_field_added_to_a_record_is_saved_and_checked_without_touching_storage(tmp_path, monkeypatch):
    """What another engineer adding a per-pass tensor fact gets: the field is written and checked on load."""
    @dataclass
    class TensorGradFactsPlus(TensorGradFacts):
        first_norm: Optional[Magnitude] = None
        where: Literal["input", "output"] = "input"

    # TensorRecord.grads is declared Dict[str, TensorGradFacts]: the hint now names the extended class.
    monkeypatch.setattr(records, "TensorGradFacts", TensorGradFactsPlus)
    fresh = schema.fields_check(TensorRecord)
    stored_fact = {"hits": 1, "norm": 2.0, "max_abs": 1.0, "nonfinite": 0, "first_norm": 0.5, "where": "output"}
    values = fresh({"name": "S", "grads": {"Y": stored_fact}})
    assert values["grads"]["Y"] == TensorGradFactsPlus(1, 2.0, 1.0, 0, 0.5, "output")
    assert storage._encode(values["grads"]["Y"], "x") == stored_fact
    with pytest.raises(schema.Bad, match=r"^grads\['Y'\].first_norm: expected a number >= 0"):
        fresh({"name": "S", "grads": {"Y": {**stored_fact, "first_norm": -1}}})
    with pytest.raises(schema.Bad, match=r"^grads\['Y'\].where: expected one of"):
        fresh({"name": "S", "grads": {"Y": {**stored_fact, "where": "inside"}}})


RECORD_CLASSES = [GradRecord, PassTrace, TensorGradFacts, ValueStats, TensorRecord, Cut, ScalarRecord, TraceMeta,
                  InnerProduct, Contribution, NonfiniteOrigin]


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda c: c.__name__)
def test_every_stored_field_of_every_record_has_a_check(cls):
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        if stored(f):
            assert callable(schema.check_for(hints[f.name])), f.name


def _with_wrong_value(doc, path, value):
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _stored_paths(doc):
    """Every stored field of every record in a saved trace, as key paths, with the record class it belongs to."""
    yield from ((("meta", k), TraceMeta) for k in doc["meta"])
    for i, p in enumerate(doc["passes"]):
        yield from (((("passes", i, k), PassTrace)) for k in p if k != "records")
        for name, r in p["records"].items():
            yield from ((("passes", i, "records", name, k), GradRecord) for k in r)
        if p["nonfinite_origin"]:
            yield from ((("passes", i, "nonfinite_origin", k), NonfiniteOrigin) for k in p["nonfinite_origin"])
    for i, t in enumerate(doc["tensors"]):
        yield from ((("tensors", i, k), TensorRecord) for k in t)
        yield from ((("tensors", i, "values", k), ValueStats) for k in t["values"])
        for name, g in t["grads"].items():
            yield from ((("tensors", i, "grads", name, k), TensorGradFacts) for k in g)
    for i, c in enumerate(doc["cuts"]):
        yield from ((("cuts", i, k), Cut) for k in c)
    for i, s in enumerate(doc["scalars"]):
        yield from ((("scalars", i, k), ScalarRecord) for k in s)
    for i, s in enumerate(doc["inner_products"]):
        yield from ((("inner_products", i, k), InnerProduct) for k in s)
        yield from ((("inner_products", i, "top", 0, k), Contribution) for k in s["top"][0])


def test_every_stored_field_refuses_a_value_of_the_wrong_type():
    """A JSON object where any stored field goes (no field of any record is an object of free keys but
    meta's own, grads, records and row_facts) is refused with the field's path; so is a list of objects
    where any scalar or list of scalars goes."""
    base = json.loads(LEGACY.read_text())
    tried = 0
    for path, cls in _stored_paths(base):
        if path[0] == "meta" and path[1] not in TraceMeta._KNOWN:
            continue  # a user's own key: free-form
        current = base
        for key in path:
            current = current[key]
        wrong = [{"x": [{"y": 1}]}] if isinstance(current, dict) else {"x": 1}
        doc = copy.deepcopy(base)
        _with_wrong_value(doc, path, wrong)
        with pytest.raises(GradtraceError, match="is a damaged gradtrace trace") as info:
            storage.contents_of(doc, "t.json")  # what load does after parsing
        assert str(path[-1]) in str(info.value), (path, cls.__name__, str(info.value))
        tried += 1
    assert tried > 150  # every record class is in the fixture


@pytest.mark.parametrize("where, value, message", [
    (("cuts", 0, "kind"), "bogus", r"cuts\[0\]\.kind: expected one of 'no_grad'"),
    (("passes", 0, "scope"), "global", r"passes\[0\]\.scope: expected one of 'local', 'reduced', 'sharded'"),
    (("passes", 0, "kinds"), ["backward", "forward"], r"passes\[0\]\.kinds\[1\]: expected one of 'backward', 'grad'"),
    (("passes", 0, "records", "head.weight", "via"), "both ways", r"\.via: expected one of 'backward', 'grad', 'both'"),
    (("tensors", 1, "role"), "weights", r"tensors\[1\]\.role: expected one of 'mask'"),
    (("meta", "cuts"), "all", r"meta\.cuts: expected one of 'modules', 'ops', 'off'"),
    (("meta", "wrapper"), "Horovod", r"meta\.wrapper: expected one of 'DDP', 'FSDP1', 'FSDP2', 'DeepSpeed'"),
    (("passes", 2, "nonfinite_origin", "forward"), "maybe", r"nonfinite_origin\.forward: expected one of 'finite'"),
    (("passes", 2, "nonfinite_origin", "extra"), 1, r"unknown NonfiniteOrigin field\(s\): 'extra'"),
    (("inner_products", 1, "optimizer"), None, r"inner_products\[1\]: a preconditioned inner product needs"),
])
def test_closed_vocabularies_are_checked_at_load(tmp_path, where, value, message):
    doc = json.loads(LEGACY.read_text())
    _with_wrong_value(doc, where, value)
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(GradtraceError, match=message):
        gradtrace.load(tmp_path / "t.json")


def test_the_vocabularies_are_the_ones_capture_writes():
    assert set(CUT_KINDS) == {"no_grad", "inference_mode", "detach", "non_differentiable", "checkpoint"}
    assert records.SEVERITIES == ("error", "warning", "info")
    assert stored_name(next(f for f in dataclasses.fields(NonfiniteOrigin) if f.name == "pass_name")) == "pass"
