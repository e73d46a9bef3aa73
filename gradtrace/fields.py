"""The vocabulary of record fields: what each value may be.

A record field is declared once, in ``records.py``, with one of these types;
the storage schema (``schema.py``) reads the type to check the field in a
trace file, so a type here is both documentation and the loader's rule.

* ``Literal`` types name the closed sets of words gradtrace writes (a cut's
  kind, how a gradient arrived, what a pass's figures are, a verdict's severity);
* ``Count``, ``Magnitude`` and ``Name`` narrow ``int``, ``float`` and ``str``
  with a ``Constraint`` the loader enforces (not negative, not empty).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, List, Literal, get_args

__all__ = [
    "Constraint", "NON_NEGATIVE", "FINITE_NON_NEGATIVE", "NON_EMPTY", "Items", "Count", "Magnitude", "Amount",
    "Name", "RankFigures",
    "CutKind", "Via", "RunKind", "Scope", "Severity", "TensorRole", "CutsMode", "Wrapper", "ForwardValues",
    "ForwardSite", "ForwardCause", "FailureKind",
    "SEVERITIES", "TENSOR_ROLES", "CUT_KINDS", "NOT_STORED", "stored_as", "stored", "stored_name",
]


@dataclass(frozen=True)
class Constraint:
    """A rule beyond the Python type, in words for the error message (``expected ...``)."""

    name: str


NON_NEGATIVE = Constraint("non-negative")
FINITE_NON_NEGATIVE = Constraint("finite, non-negative")
NON_EMPTY = Constraint("non-empty")


@dataclass(frozen=True)
class Items:
    """How many items an array holds: from ``at_least`` to ``at_most``."""

    at_least: int
    at_most: int


# Counts are int64 on the device: 0 .. 2**63 - 1.
Count = Annotated[int, NON_NEGATIVE]
# A norm or a max |g|: not negative (NaN allowed: a NaN gradient has a NaN norm).
Magnitude = Annotated[float, NON_NEGATIVE]
# A count or length summed as a float (a registered tensor's row facts): finite, not negative.
Amount = Annotated[float, FINITE_NON_NEGATIVE]
# Pass, tensor and scalar names: non-empty, as the live API requires.
Name = Annotated[str, NON_EMPTY]
# One rank's own figures for one parameter, after gather(): [norm, max |g|, non-finite, stale (0/1)]
# (traces saved before staleness was gathered hold the first three).
RankFigures = Annotated[List[float], Items(3, 4)]

# How the graph was cut upstream of something trainable.
CutKind = Literal["no_grad", "inference_mode", "detach", "non_differentiable", "checkpoint"]
# How a parameter's gradient arrived: ``.grad`` written, handed back by autograd.grad, or both.
Via = Literal["backward", "grad", "both"]
# The engine calls a pass held.
RunKind = Literal["backward", "grad"]
# What a pass's figures are: this process's own gradients, ``.grad`` after DDP's all-reduce,
# or this rank's FSDP shard (global only after gather()).
Scope = Literal["local", "reduced", "sharded"]
Severity = Literal["error", "warning", "info"]
# What ``trace.tensor(name, t, role=...)`` accepts: masks get row lengths, attention masks their
# padding side, completion masks their alignment with an attention mask, groups a per-row std histogram.
TensorRole = Literal["mask", "attention_mask", "completion_mask", "group"]
# ``watch(cuts=...)``.
CutsMode = Literal["modules", "ops", "off"]
# The distributed wrapper a watched model was in.
Wrapper = Literal["DDP", "FSDP1", "FSDP2", "DeepSpeed"]
# Were the forward values of the op that made a NaN/Inf gradient already non-finite?
ForwardValues = Literal["finite", "nonfinite", "unknown"]
# Where a forward's first NaN/Inf was seen: a module's output, a module's input that no module made
# (the code around the modules made it), or an op's output (cuts="ops").
ForwardSite = Literal["output", "input", "op"]
# What made it: a 16-bit value past its dtype's largest ("overflow"), another inf (a division by zero, log 0,
# an input that held inf: "inf"), a softmax over a row whose every score was masked ("masked_softmax"), or
# a NaN from finite values otherwise ("nan").
ForwardCause = Literal["overflow", "inf", "masked_softmax", "nan"]
# How a watched parameter was lost: another object in its module ("replaced"), or the same object
# with another tensor inside ("swapped": torch.utils.swap_tensors).
Replacement = Literal["replaced", "swapped"]

# What gradtrace found behind a failed pass (``records.FailureCause``): an inference-mode tensor saved for
# backward, a tensor saved for backward and then changed in place, a loss that carries no graph.
FailureKind = Literal["inference_tensor", "inplace", "no_graph"]

SEVERITIES = get_args(Severity)
TENSOR_ROLES = get_args(TensorRole)
CUT_KINDS = get_args(CutKind)


# ---- how a field is stored -------------------------------------------------------------------
# ``field(metadata=NOT_STORED)``: kept elsewhere in the file (a pass's ``params`` are stored once, at the top).
NOT_STORED = MappingProxyType({"stored": False})


def stored_as(key: str) -> MappingProxyType:
    """``field(metadata=stored_as("pass"))``: the file's key for a field whose name cannot be it."""
    return MappingProxyType({"stored_as": key})


def stored(f: dataclasses.Field) -> bool:
    """Is this field written to a trace file? (Private fields and NOT_STORED ones are not.)"""
    return not f.name.startswith("_") and f.metadata.get("stored", True)


def stored_name(f: dataclasses.Field) -> str:
    return f.metadata.get("stored_as", f.name)
