"""Checks of registered tensors' values (masks, advantages, rewards), judged pass by pass.

A live trace keeps each registered tensor's value and row facts per pass
(``TensorRecord.by_pass``): a mask that comes back empty at step 3 is found at
step 3, not diluted into the counts of every other step. Each finding is one
verdict per identity (code, tensor, severity): its message describes the first
pass where it held (and ends by naming it), so it reads the same however many later passes repeat it
(``evidence["passes"]`` lists them all). A trace without per-pass facts (saved
by an older gradtrace, or a tensor registered after the last pass) is judged
on its whole-watch figures, as before.
"""
from __future__ import annotations

import re

from typing import Dict, Iterator, List, Optional, Tuple

from ..records import TensorRecord, ValueStats, Verdict
from .registry import verdict

# Roles that mark a tensor as a mask: zero-variance rows of a mask are normal, never "advantages".
MASK_ROLES = ("mask", "attention_mask", "completion_mask")

# The name TRL GRPO's wiring (integrations/grpo.py) registers its per-completion flags under, with
# ``mask_truncated_completions``: 1 for a completion that ended on its own, 0 for one cut at
# ``max_completion_length`` (TRL masks those out of ``completion_mask``).
TRUNCATION_FLAGS = "completions kept by mask_truncated_completions"


def facts_by_pass(t: TensorRecord, passes) -> Iterator[Tuple[Optional[str], ValueStats, Dict[str, float]]]:
    """``(pass name or None, values, row facts)``: per pass where the trace keeps them, else the whole watch."""
    kept = [(name, facts) for name, facts in (t.by_pass or {}).items() if name in passes]
    if not kept:
        yield None, t.values, t.row_facts
        return
    order = {name: i for i, name in enumerate(passes)}
    for name, facts in sorted(kept, key=lambda item: order[item[0]]):
        yield name, facts.values, facts.row_facts


class Findings:
    """Per-pass findings folded into one verdict per identity: the first pass's message, every pass listed."""

    def __init__(self):
        self.by_identity: Dict[tuple, Verdict] = {}

    def add(self, code: str, severity: str, tensor: str, pass_name: Optional[str], message: str,
            evidence: dict) -> None:
        key = (code, tensor, severity)
        found = self.by_identity.get(key)
        if found is None:
            # The message starts with the tensor (a callback prints "step <n>: CODE: tensor ..."); the pass
            # where it first held closes it.
            where = f" (in pass {pass_name!r})" if pass_name is not None else ""
            evidence = {"tensor": tensor, **evidence}
            if pass_name is not None:
                evidence.update({"pass": pass_name, "passes": [pass_name]})
            self.by_identity[key] = Verdict(code, severity, message + where, evidence)
        elif pass_name is not None:
            found.evidence["passes"].append(pass_name)

    def verdicts(self) -> List[Verdict]:
        return list(self.by_identity.values())


def is_data(t: TensorRecord) -> bool:
    return t.requires_grad_calls == 0


@verdict("CONSTANT_ROWS", rank=50, severities=("error", "warning", "info"),
         meaning="rows of a registered data tensor with zero variance (advantage groups), with the fraction, judged per pass: an error when every row, else a warning (half or more) or info")
def check_constant_rows(trace, passes, tensors, cuts):
    found = Findings()
    for t in tensors.values():
        if not is_data(t) or t.role in MASK_ROLES or not t.dtype.startswith(("float", "bfloat", "half", "double")):
            continue
        grouped = t.role == "group"
        for pass_name, v, _ in facts_by_pass(t, passes):
            # All ones is a full mask, not a degenerate group (unless the rows are declared groups: rewards
            # of 1.0 for every completion); all zeros is ALL_ZERO_VALUES's to report.
            if not v.rows or not v.constant_rows or (v.min == v.max == 1.0 and not grouped) or v.zeros == v.numel:
                continue
            fraction = v.constant_fraction
            severity = "error" if fraction == 1.0 else "warning" if fraction >= 0.5 else "info"
            rows = (f"{v.constant_rows} of {v.rows} group{'s' if v.rows != 1 else ''} ({fraction:.0%}, as TRL's frac_reward_zero_std counts "
                    "them) have zero variance" if grouped else
                    f"{v.constant_rows} of {v.rows} rows ({fraction:.0%}) have zero variance along the last dim")
            same = (f" (every value is {v.min:g})" if fraction == 1.0 and v.min == v.max and v.min == v.min
                    else "")
            found.add("CONSTANT_ROWS", severity, t.name, pass_name,
                      f"tensor {t.name!r}: {rows}{same}; group-normalised advantages built from them are zero and "
                      "give the loss no gradient",
                      {"fraction": fraction, "rows": v.rows, "constant_rows": v.constant_rows})
    return found.verdicts()


ZERO_ADVANTAGE_HINT = ("every one of its {rows} rows has zero variance: groups whose rewards were all equal, or "
                       "rewards that were NaN and zeroed by the trainer (see the reward functions' outputs)")


# Names that say a tensor holds per-group values (advantages, rewards, returns, scores) or a mask: the rewards
# hint is only given for the former, and a float tensor named like a mask "selects nothing".
_GROUP_NAMES = re.compile(r"adv|reward|return|score|^a$", re.IGNORECASE)
_MASK_NAMES = re.compile(r"mask", re.IGNORECASE)


@verdict("ALL_ZERO_VALUES", rank=60, severities=("error",),
         meaning="a registered tensor is all zeros or empty in a pass (a mask that selects nothing)")
def check_all_zero_values(trace, passes, tensors, cuts):
    found = Findings()
    for t in tensors.values():
        mask_like = t.dtype == "bool" or t.dtype.startswith(("int", "uint")) or t.role in MASK_ROLES \
            or bool(_MASK_NAMES.search(t.name))
        grouped = t.role == "group" or bool(_GROUP_NAMES.search(t.name))
        for pass_name, v, _ in facts_by_pass(t, passes):
            if v.numel == 0:
                found.add("ALL_ZERO_VALUES", "error", t.name, pass_name, f"tensor {t.name!r} is empty (shape {t.shape})",
                          {"numel": 0})
            elif v.zeros == v.numel and t.name == TRUNCATION_FLAGS:
                found.add("ALL_ZERO_VALUES", "error", t.name, pass_name,
                          f"every completion hit max_completion_length ({v.numel} of {v.numel} truncated) and "
                          "mask_truncated_completions=True masked them all out of 'completion_mask': no token is "
                          "left for the loss. Raise max_completion_length (or set mask_truncated_completions=False);"
                          f" tensor {t.name!r} selects nothing",
                          {"numel": v.numel, "rows": v.rows, "mask": True, "truncated": v.numel})
            elif v.zeros == v.numel:
                what = "selects nothing" if mask_like else "is all zeros"
                rows = ("; " + ZERO_ADVANTAGE_HINT.format(rows=v.rows)
                        if v.rows and not mask_like and grouped and is_data(t) else "")
                found.add("ALL_ZERO_VALUES", "error", t.name, pass_name,
                          f"tensor {t.name!r} {what} ({v.numel} elements, every one 0){rows}",
                          {"numel": v.numel, "rows": v.rows, "mask": mask_like})
    return found.verdicts()


def _lengths(facts: Dict[str, float]) -> str:
    rows = facts.get("rows") or 0
    mean = facts.get("selected_sum", 0.0) / rows if rows else 0.0
    return (f"selected length mean {mean:.1f}, min {facts.get('selected_min', 0):.0f}, "
            f"max {facts.get('selected_max', 0):.0f}")


ALIGN_HINT = ("ensure the mask aligns with the attention mask's padding (with left padding, generated tokens "
              "start at the padded prompt width, not at each prompt's own length)")


@verdict("EMPTY_ROWS", rank=65, severities=("error", "warning"),
         meaning="rows of a registered mask that select nothing (zero-length generations), with the count and fraction, judged per pass: an error when every row, else a warning")
def check_empty_rows(trace, passes, tensors, cuts):
    found = Findings()
    for t in tensors.values():
        for pass_name, values, facts in facts_by_pass(t, passes):
            rows, empty = facts.get("rows") or 0, facts.get("empty_rows") or 0
            if not empty or "selected_sum" not in facts:
                continue
            fraction = empty / rows if rows else 1.0  # a crafted file can hold empty rows without rows
            with_tokens = facts.get("empty_with_tokens") or 0
            if len(t.shape or ()) <= 1 and values.numel and values.zeros == values.numel:
                continue  # one flag per item, none set: ALL_ZERO_VALUES says it ("1 of 1 rows" would add nothing)
            hint = (f"; {with_tokens:.0f} of them are empty although the attention mask has tokens there: "
                    f"{ALIGN_HINT}" if with_tokens else "")
            found.add("EMPTY_ROWS", "error" if empty == rows else "warning", t.name, pass_name,
                      f"tensor {t.name!r}: {empty:.0f} of {rows:.0f} rows ({fraction:.0%}) select nothing "
                      f"(zero-length generations contribute no token); {_lengths(facts)}{hint}",
                      {"rows": int(rows), "empty_rows": int(empty), "fraction": fraction,
                       "empty_with_tokens": int(with_tokens)})
    return found.verdicts()


@verdict("MASK_ON_PADDING", rank=66, severities=("error",),
         meaning="a completion mask paired with its attention mask selects padding positions")
def check_mask_on_padding(trace, passes, tensors, cuts):
    found = Findings()
    for t in tensors.values():
        for pass_name, _, facts in facts_by_pass(t, passes):
            on_padding = facts.get("on_padding") or 0
            if not on_padding:
                continue
            side = _padding_side(facts)
            padded = f" ({side}-padded)" if side in ("left", "right", "mixed") else ""
            found.add("MASK_ON_PADDING", "error", t.name, pass_name,
                      f"tensor {t.name!r}: {on_padding:.0f} selected position(s) fall on padding of its "
                      f"attention mask{padded}: {ALIGN_HINT}",
                      {"on_padding": int(on_padding), "padding_side": side})
    return found.verdicts()


def _padding_side(facts: Dict[str, float]) -> Optional[str]:
    left, right = facts.get("left_padded"), facts.get("right_padded")
    if left is None or right is None:
        return None
    return {(False, False): "none", (True, False): "left", (False, True): "right"}.get((left > 0, right > 0), "mixed")


def nonfinite_values(trace, passes, tensors) -> List[Verdict]:
    """NONFINITE's share for registered tensors' values (rewards that came back NaN), per pass."""
    found = Findings()
    for t in tensors.values():
        for pass_name, v, _ in facts_by_pass(t, passes):
            if v.nonfinite:
                found.add("NONFINITE", "error", t.name, pass_name, f"tensor {t.name!r} holds {v.nonfinite} NaN/Inf values",
                          {"count": v.nonfinite, "values": True})
    return found.verdicts()
