"""Verdict checks: each looks for one kind of evidence in the plain records.

Pure Python over the records, so a trace loaded from JSON is judged exactly
like a live one. Each check is registered with its code, rank and severities
(``registry.verdict``); ``verdicts`` runs them all and ranks what they find so
the most likely root cause comes first (a cut before the coverage gap it
explains, a zero-variance advantage tensor before the zero upstream gradient
it explains).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

from ..records import Cut, PassTrace, TensorRecord, Verdict
from .cuts import cut_params, describe_cut, outermost_cuts
from .diff import Diff, diff
from .names import describe_params, group_by_module, in_module
from .registry import ordered, sort_key, verdict
from .replaced import replaced_params

# The largest magnitude that `f"{x:.6f}"` prints as 0.000000.
PRINTS_AS_ZERO = 5e-7


def verdicts(trace) -> List[Verdict]:
    """Every registered check over ``trace``, most likely root cause first."""
    passes = trace.passes
    tensors = trace.tensors
    cuts = outermost_cuts(list(trace.cuts))
    found: List[Verdict] = []
    for kind in ordered():
        found.extend(kind.check(trace, passes, tensors, cuts))
    found.sort(key=sort_key)
    return found


@verdict("NONFINITE", rank=10, severities=("error",),
         meaning="NaN/Inf gradients; names the first parameter in backward order and, with `cuts=\"ops\"`, the op, module and line whose backward produced them and whether its forward values were already non-finite")
def check_nonfinite(trace, passes, tensors, cuts):
    out = []
    for p in passes.values():
        bad = [r for r in p.in_backward_order() if r.nonfinite]
        if bad:
            first = bad[0]
            seen = _ranks_where(trace, p.name, [r.name for r in bad], lambda figures: figures[2] > 0)
            where, ranks = _nonfinite_ranks(p, seen)
            evidence = _with_ranks({"pass": p.name, "parameter": first.name,
                                    "parameters": [r.name for r in bad], "count": sum(r.nonfinite for r in bad)},
                                   ranks)
            if ranks != seen:
                evidence["seen_on_ranks"] = seen
            if p.nonfinite_origin:
                evidence["origin"] = p.nonfinite_origin
            out.append(Verdict("NONFINITE", "error",
                               f"pass {p.name!r}: NaN/Inf gradients{where} in {len(bad)} parameter(s); "
                               f"the first in backward order is {first.name!r} ({first.nonfinite} non-finite "
                               f"elements){_nonfinite_origin(trace, p)}", evidence))
    for t in tensors.values():
        if t.values.nonfinite:
            out.append(Verdict("NONFINITE", "error",
                               f"tensor {t.name!r} holds {t.values.nonfinite} NaN/Inf values",
                               {"tensor": t.name, "count": t.values.nonfinite}))
        for pass_name, facts in t.grads.items():
            if facts.nonfinite:
                out.append(Verdict("NONFINITE", "error",
                                   f"pass {pass_name!r}: the gradient reaching tensor {t.name!r} holds "
                                   f"{facts.nonfinite} NaN/Inf values",
                                   {"tensor": t.name, "pass": pass_name, "count": facts.nonfinite}))
    return out


def _nonfinite_origin(trace, p: PassTrace) -> str:
    """Where the NaN/Inf was born (cuts="ops"), or the one-line change that finds it on the next run."""
    origin = p.nonfinite_origin
    if not origin:
        if trace.meta.cuts == "ops":
            return ""
        return ('; to name the op and line where it is born, run the same step under '
                'gradtrace.watch(model, cuts="ops")')
    module = f"module {origin.module!r}" if origin.module else "the root module or top-level code"
    forward = {
        "finite": "its forward values were finite: only the gradient is non-finite (e.g. sqrt or log at 0, "
                  "a norm of zeros)",
        "nonfinite": "its forward values were already NaN/Inf (look at what fed it in the forward)",
    }.get(origin.forward, "its forward values were not examined")
    return (f"; it is born in the backward of op {origin.op} ({origin.node}) in {module} at "
            f"{origin.location}: {forward}")


def _nonfinite_ranks(p: PassTrace, seen: Optional[List[int]]) -> Tuple[str, Optional[List[int]]]:
    """In a merged trace: the words that say which ranks, and the ranks to name (where it was born, if known).

    Under DDP the all-reduce carries a NaN born on one rank into every rank's
    ``.grad``: the ranks whose figures are non-finite are then not where to look.
    """
    if seen is None:
        return "", None
    born = list(p.nonfinite_ranks or [])
    if born:
        others = sorted(set(seen) - set(born))
        carried = f" (reduced into rank(s) {', '.join(map(str, others))}' gradients too)" if others else ""
        return f" born on rank(s) {', '.join(map(str, born))}{carried}", born
    if p.scope == "reduced" and len(seen) > 1:
        return (f"{_on_ranks(seen)} (an all-reduce gives every rank the same gradient: the rank where they were "
                "born is not known)", seen)
    return _on_ranks(seen), seen


def _ranks_where(trace, pass_name: str, params: List[str], test) -> Optional[List[int]]:
    """In a merged trace, the global ranks whose own figures pass ``test`` for any of ``params`` (None: not merged).

    A pass without per-rank figures had the same figures on every rank.
    """
    world = trace.meta.world_size
    if not world:
        return None
    per_rank = (getattr(trace, "rank_figures", None) or {}).get(pass_name)
    if per_rank is None:
        return list(trace.meta.ranks or range(world))
    return sorted(rank for rank, figures in per_rank.items()
                  if any(name in figures and test(figures[name]) for name in params))


def _on_ranks(ranks: Optional[List[int]]) -> str:
    return f" on rank(s) {', '.join(map(str, ranks))}" if ranks is not None else ""


def _with_ranks(evidence: Dict[str, Any], ranks: Optional[List[int]]) -> Dict[str, Any]:
    if ranks is not None:
        evidence["ranks"] = ranks
    return evidence


def _linked_cut(trace, record: TensorRecord) -> Optional[Cut]:
    """The cut of trainable parameters seen while the tensor was being built (the latest one)."""
    by_seq = {cut.seq: cut for cut in trace.cuts}
    candidates = [by_seq[seq] for seq in record.cuts if seq in by_seq]
    candidates = [c for c in candidates if c.params > 0 or c.kind in ("detach", "non_differentiable")]
    if not candidates:
        return None
    # The outermost of the latest region: the shortest module path among cuts of the last kind seen.
    last = candidates[-1]
    same = [c for c in candidates if c.kind == last.kind and c.pass_name == last.pass_name]
    return min(same, key=lambda c: (c.module.count(".") + bool(c.module), c.seq))


@verdict("TENSOR_NO_GRAD", rank=20, severities=("error",),
         meaning="a registered tensor does not require grad although trainable parameters were cut while it was built (or `expect_grad=True`); names the cut")
def check_tensor_no_grad(trace, passes, tensors, cuts):
    out = []
    for t in tensors.values():
        if t.requires_grad_calls == t.calls or t.expect_grad is False:
            continue
        cut = _linked_cut(trace, t) if _meant_to_carry_grad(t, passes) else None
        if cut is None and not t.expect_grad:
            continue  # data (a mask, rewards, advantages): only its values are checked
        how = "was created in inference mode" if t.inference else "does not require grad"
        because = f": {describe_cut(cut)}" if cut else " (it was expected to)" + (
            "; no module ran without grad, so a .detach() or .data in your code is the likely cut: "
            "gradtrace.watch(model, cuts=\"ops\") names the op and line" if trace.meta.cuts == "modules"
            and not t.inference else "")
        evidence = {"tensor": t.name, "calls": t.calls, "requires_grad_calls": t.requires_grad_calls}
        if cut is not None:
            evidence.update({"kind": cut.kind, "module": cut.module, "location": cut.location})
        out.append(Verdict("TENSOR_NO_GRAD", "error",
                           f"tensor {t.name!r} {how}, so no gradient can flow through it{because}",
                           evidence))
    return out


def _meant_to_carry_grad(t: TensorRecord, passes: Dict[str, PassTrace]) -> bool:
    """Is a registered tensor that does not require grad a symptom, not data?

    Data (advantages, rewards, masks) is computed next to no_grad regions by design
    (generation, reference log-probs, reward scoring), so a cut seen while it was
    built is no evidence by itself. It is one when the user said so
    (``expect_grad=True``), when the tensor required grad on other calls, or when
    nothing trained in the passes it was registered in (all passes, if it was
    registered outside every pass): then it is what the loss was built from.
    """
    if t.expect_grad or t.requires_grad_calls:
        return True
    own = [passes[n] for n in t.passes if n in passes] or list(passes.values())
    return not any(p.covered for p in own)


def _lost_coverage(reached_anywhere: Set[str], p: PassTrace) -> Set[str]:
    """Parameters this pass should have reached: reached by another pass, or reachable from its tensors.

    ``reached_anywhere`` is the union of every pass's coverage: minus this pass's own,
    it is what the others reached and this one did not (one union, not one per pass).
    With nothing to compare against, a cut recorded inside the pass itself may
    still explain every parameter the pass missed (see ``check_graph_cuts``).
    """
    return (reached_anywhere | set(p.expected or ())) - p.covered


@verdict("GRAPH_CUT", rank=30, severities=("error",),
         meaning="a cut (`no_grad`, `inference_mode`, `detach`, `non_differentiable`, `checkpoint`) upstream of parameters that lost coverage: module, location, fix")
def check_graph_cuts(trace, passes, tensors, cuts):
    explained: Dict[int, Dict[str, Any]] = {}
    reached_anywhere = set().union(*(p.covered for p in passes.values()))
    for p in passes.values():
        compared = _lost_coverage(reached_anywhere, p)
        for cut in cuts:
            if cut.pass_name not in (p.name, None):
                continue
            # Unlabelled cuts (generation, logging) must explain a real loss; a cut
            # inside the pass may explain whatever the pass missed.
            lost = compared if compared or cut.pass_name is None else p.missing
            hit = cut_params(cut, lost) & lost
            if not hit or (cut.kind not in ("detach", "non_differentiable") and cut.params == 0):
                continue
            entry = explained.setdefault(cut.seq, {"cut": cut, "passes": [], "lost": set()})
            entry["passes"].append(p.name)
            entry["lost"] |= hit
    for t in tensors.values():  # a registered tensor built across a cut: the cut is the cause even without a gap
        if t.requires_grad_calls < t.calls and t.expect_grad is not False and _meant_to_carry_grad(t, passes):
            cut = _linked_cut(trace, t)
            if cut is not None and cut.seq not in explained and cut.params > 0:
                explained[cut.seq] = {"cut": cut, "passes": list(t.passes), "lost": set(), "tensor": t.name}
    out = []
    for entry in explained.values():
        cut: Cut = entry["cut"]
        lost = entry["lost"]
        passes_txt = ", ".join(repr(n) for n in entry["passes"]) or "(outside any pass)"
        lost_txt = (f"; pass {passes_txt} lost {len(lost)} parameter(s): {describe_params(lost, universe=trace.params)}"
                    if lost else f"; tensor {entry.get('tensor')!r} was built across it")
        out.append(Verdict("GRAPH_CUT", "error",
                           f"graph cut: {describe_cut(cut)}{lost_txt}. {_cut_fix(cut)}",
                           {"kind": cut.kind, "module": cut.module, "module_type": cut.module_type,
                            "op": cut.op, "location": cut.location, "pass": cut.pass_name,
                            "passes": entry["passes"], "lost": sorted(lost)}))
    return out


def _cut_fix(cut: Cut) -> str:
    if cut.kind == "checkpoint" and cut.inputs_require_grad is False:
        return ("No input of the checkpointed segment requires grad, so reentrant checkpointing gives its "
                "parameters no gradient at all, in .backward() too (torch warns 'None of the inputs have "
                "requires_grad=True'): call model.enable_input_require_grads() (transformers/peft, with frozen "
                "embeddings), or checkpoint with use_reentrant=False.")
    return {
        "no_grad": "Compute it outside torch.no_grad() if it must carry a gradient.",
        "inference_mode": "Tensors made under torch.inference_mode() never carry gradients; "
                          "compute it with grad enabled.",
        "detach": "Remove the .detach() / .data on the path from the parameters to the loss.",
        "non_differentiable": "An integer/boolean op (argmax, comparison, cast) has no gradient; "
                              "use a differentiable surrogate.",
        "checkpoint": "Reentrant checkpointing hides the segment's parameters from torch.autograd.grad; "
                      "use torch.utils.checkpoint(..., use_reentrant=False) or .backward().",
    }.get(cut.kind, "")


@verdict("STALE_GRADS", rank=40, severities=("error",),
         meaning="`.grad` already held values when a backward pass began (not zeroed)")
def check_stale(trace, passes, tensors, cuts):
    out = []
    for p in passes.values():
        stale = sorted(p.stale)
        if stale:
            ranks = _ranks_where(trace, p.name, stale, lambda figures: len(figures) > 3 and bool(figures[3]))
            out.append(Verdict("STALE_GRADS", "error",
                               f"pass {p.name!r}: .grad already held values when the pass began{_on_ranks(ranks)} "
                               f"for {len(stale)} parameter(s) ({describe_params(stale, universe=trace.params)}): gradients were not "
                               "zeroed; call optimizer.zero_grad() before the pass",
                               _with_ranks({"pass": p.name, "parameters": stale}, ranks)))
    return out


def _is_data(t: TensorRecord) -> bool:
    return t.requires_grad_calls == 0


@verdict("CONSTANT_ROWS", rank=50, severities=("error", "warning", "info"),
         meaning="rows of a registered data tensor with zero variance (advantage groups), with the fraction: an error when every row, else a warning (half or more) or info")
def check_constant_rows(trace, passes, tensors, cuts):
    out = []
    for t in tensors.values():
        v = t.values
        if not _is_data(t) or not t.dtype.startswith(("float", "bfloat", "half", "double")) or not v.rows:
            continue
        # All ones is a full mask, not a degenerate group; all zeros is ALL_ZERO_VALUES's to report.
        if not v.constant_rows or v.min == v.max == 1.0 or v.zeros == v.numel:
            continue
        fraction = v.constant_fraction
        severity = "error" if fraction == 1.0 else "warning" if fraction >= 0.5 else "info"
        zero = " (all zero)" if v.zeros == v.numel else ""
        out.append(Verdict("CONSTANT_ROWS", severity,
                           f"tensor {t.name!r}: {v.constant_rows} of {v.rows} rows ({fraction:.0%}) have zero "
                           f"variance along the last dim{zero}; group-normalised advantages built from them "
                           "are zero and give the loss no gradient",
                           {"tensor": t.name, "fraction": fraction, "rows": v.rows,
                            "constant_rows": v.constant_rows}))
    return out


@verdict("ALL_ZERO_VALUES", rank=60, severities=("error",),
         meaning="a registered tensor is all zeros or empty (a mask that selects nothing)")
def check_all_zero_values(trace, passes, tensors, cuts):
    out = []
    for t in tensors.values():
        v = t.values
        if v.numel == 0:
            out.append(Verdict("ALL_ZERO_VALUES", "error", f"tensor {t.name!r} is empty (shape {t.shape})",
                               {"tensor": t.name, "numel": 0}))
        elif v.zeros == v.numel:
            mask_like = t.dtype == "bool" or t.dtype.startswith(("int", "uint"))
            what = "selects nothing" if mask_like else "is all zeros"
            rows = (f"; every one of its {v.rows} rows has zero variance (advantages from groups whose "
                    "rewards were all equal?)" if v.rows and not mask_like and _is_data(t) else "")
            out.append(Verdict("ALL_ZERO_VALUES", "error",
                               f"tensor {t.name!r} {what} ({v.numel} elements, every one 0){rows}",
                               {"tensor": t.name, "numel": v.numel, "rows": v.rows}))
    return out


def _lengths(facts: Dict[str, float]) -> str:
    rows = facts.get("rows") or 0
    mean = facts.get("selected_sum", 0.0) / rows if rows else 0.0
    return (f"selected length mean {mean:.1f}, min {facts.get('selected_min', 0):.0f}, "
            f"max {facts.get('selected_max', 0):.0f}")


ALIGN_HINT = ("ensure the mask aligns with the attention mask's padding (with left padding, generated tokens "
              "start at the padded prompt width, not at each prompt's own length)")


@verdict("EMPTY_ROWS", rank=65, severities=("error", "warning"),
         meaning="rows of a registered mask that select nothing (zero-length generations), with the count and fraction: an error when every row, else a warning")
def check_empty_rows(trace, passes, tensors, cuts):
    out = []
    for t in tensors.values():
        facts = t.row_facts
        rows, empty = facts.get("rows") or 0, facts.get("empty_rows") or 0
        if not empty or "selected_sum" not in facts:
            continue
        fraction = empty / rows if rows else 1.0  # a crafted file can hold empty rows without rows
        with_tokens = facts.get("empty_with_tokens") or 0
        hint = (f"; {with_tokens:.0f} of them are empty although the attention mask has tokens there: "
                f"{ALIGN_HINT}" if with_tokens else "")
        out.append(Verdict("EMPTY_ROWS", "error" if empty == rows else "warning",
                           f"tensor {t.name!r}: {empty:.0f} of {rows:.0f} rows ({fraction:.0%}) select nothing "
                           f"(zero-length generations contribute no token); {_lengths(facts)}{hint}",
                           {"tensor": t.name, "rows": int(rows), "empty_rows": int(empty), "fraction": fraction,
                            "empty_with_tokens": int(with_tokens)}))
    return out


@verdict("MASK_ON_PADDING", rank=66, severities=("error",),
         meaning="a completion mask paired with its attention mask selects padding positions")
def check_mask_on_padding(trace, passes, tensors, cuts):
    out = []
    for t in tensors.values():
        on_padding = t.row_facts.get("on_padding") or 0
        if not on_padding:
            continue
        side = t.padding_side
        padded = f" ({side}-padded)" if side in ("left", "right", "mixed") else ""
        out.append(Verdict("MASK_ON_PADDING", "error",
                           f"tensor {t.name!r}: {on_padding:.0f} selected position(s) fall on padding of its "
                           f"attention mask{padded}: {ALIGN_HINT}",
                           {"tensor": t.name, "on_padding": int(on_padding), "padding_side": side}))
    return out


@verdict("TENSOR_NOT_REACHED", rank=70, severities=("error",),
         meaning="a registered tensor requires grad but backward never reached it in a pass")
def check_tensor_not_reached(trace, passes, tensors, cuts):
    out = []
    for t in tensors.values():
        if t.requires_grad_calls == 0:
            continue
        targets = [n for n in t.passes if n in passes] or list(passes)
        missed = [n for n in targets if not (t.grads.get(n) and t.grads[n].reached)]
        if t.passes:
            report = missed
        else:
            report = targets if missed == targets else []
        if report:
            why = ("none of the requested inputs is reachable through it (reentrant checkpointing hides "
                   "the segment's parameters from autograd.grad)" if t.reach_partial
                   else "the loss does not depend on it, or no requested input is upstream of it")
            out.append(Verdict("TENSOR_NOT_REACHED", "error",
                               f"tensor {t.name!r} requires grad but backward never reached it in pass(es) "
                               f"{', '.join(repr(n) for n in report)}: {why}",
                               {"tensor": t.name, "passes": report}))
    return out


@verdict("NO_COVERAGE", rank=80, severities=("error",),
         meaning="no trainable parameter received a gradient in a pass; names the likely cut")
def check_no_coverage(trace, passes, tensors, cuts):
    out = []
    gone = set(replaced_params(trace))
    for p in passes.values():
        if p.covered or (gone and gone.issuperset(p.params)):  # every parameter replaced: gradtrace is blind
            continue
        likely = next((c for c in cuts if c.pass_name in (p.name, None) and c.params > 0), None)
        because = f"; likely cut: {describe_cut(likely)}" if likely else ""
        no_grad = [t.name for t in tensors.values() if p.name in t.passes and t.requires_grad_calls < t.calls]
        if no_grad:  # e.g. every trainable parameter was bypassed (adapters disabled): nothing carries grad
            because += (f"; tensor(s) {', '.join(repr(n) for n in no_grad)} registered in this pass do not "
                        "require grad: nothing trainable took part in computing them")
        runs = f"{p.runs} engine run(s)" if p.runs else "no engine run that reached a watched tensor"
        evidence = {"pass": p.name, "runs": p.runs}
        if likely is not None:
            evidence.update({"kind": likely.kind, "module": likely.module, "location": likely.location})
        out.append(Verdict("NO_COVERAGE", "error",
                           f"pass {p.name!r}: no trainable parameter received a gradient ({runs}){because}",
                           evidence))
    return out


def _comparable_pairs(passes: Dict[str, PassTrace]):
    named = [p for p in passes.values() if not p.auto and p.covered]
    if len(named) > 6:  # a long run of passes: compare neighbours only
        return list(zip(named, named[1:]))
    return [(a, b) for i, a in enumerate(named) for b in named[i + 1:]]


@verdict("COVERAGE_GAP", rank=90, severities=("error",),
         meaning="parameters reached in one pass but not another, grouped by module")
def check_coverage_gaps(trace, passes, tensors, cuts):
    out = []
    gone = set(replaced_params(trace))
    for a, b in _comparable_pairs(passes):
        d = diff(a, b)
        if gone:  # a parameter replaced between the two passes is not a gap
            d.only_a, d.only_b = d.only_a - gone, d.only_b - gone
        if not d.only_a and not d.only_b:
            continue
        parts = []
        for only, here, there in ((d.only_a, a, b), (d.only_b, b, a)):
            if only:
                parts.append(f"{len(only)} reached in {here.name!r} but not {there.name!r}: "
                             f"{describe_params(only, universe=trace.params)}")
        out.append(Verdict("COVERAGE_GAP", "error",
                           "coverage gap: " + "; ".join(parts) + _gap_hint(d),
                           {"a": a.name, "b": b.name, "only_a": sorted(d.only_a), "only_b": sorted(d.only_b),
                            "modules_only_a": list(group_by_module(sorted(d.only_a), trace.params)),
                            "modules_only_b": list(group_by_module(sorted(d.only_b), trace.params))}))
    return out


def _gap_hint(d: Diff) -> str:
    gap = d.only_a | d.only_b
    if gap and all(_is_adapter(p) for p in gap):
        side = d.b if d.only_a else d.a
        return (f". Every one is a LoRA adapter parameter: the adapters were bypassed in {side!r} "
                "(peft's disable_adapter(), merged weights, or a forward that skips them)")
    return " (not requested in autograd.grad's inputs, bypassed, or cut)"


def _is_adapter(param: str) -> bool:
    return any(part.startswith(("lora_", "adapter")) for part in param.split("."))


@verdict("ZERO_UPSTREAM", rank=100, severities=("error",),
         meaning="backward reached a registered tensor with an all-zero gradient")
def check_zero_upstream(trace, passes, tensors, cuts):
    out = []
    for t in tensors.values():
        for pass_name, facts in t.grads.items():
            if facts.zero:
                out.append(Verdict("ZERO_UPSTREAM", "error",
                                   f"pass {pass_name!r}: backward reached tensor {t.name!r} with an all-zero "
                                   "gradient: the loss gives it nothing (zero advantages or weights, an empty "
                                   "mask?)",
                                   {"tensor": t.name, "pass": pass_name, "hits": facts.hits}))
    return out


@verdict("ZERO_GRADS", rank=110, severities=("error", "warning", "info"),
         meaning="reached parameters whose gradient is exactly zero: an error when all are, else a warning; info when a zero partner explains it (LoRA A while B is still zero)")
def check_zero_grads(trace, passes, tensors, cuts):
    out = []
    for p in passes.values():
        zero = sorted(p.zero)
        if not zero:
            continue
        every = len(zero) == len(p.covered)
        if every:
            out.append(Verdict("ZERO_GRADS", "error",
                               f"pass {p.name!r}: every one of the {len(zero)} parameters reached got an exactly "
                               "zero gradient", {"pass": p.name, "parameters": zero, "all": True}))
            continue
        explained = _zero_partner_explained(p, zero)
        severity = "info" if explained else "warning"
        why = ("; each is a LoRA A matrix whose B partner got a nonzero gradient: B is still zero (its "
               "initialisation), so A's gradient B^T(...) is exactly zero. Expected on the first steps"
               if explained else "")
        out.append(Verdict("ZERO_GRADS", severity,
                           f"pass {p.name!r}: {len(zero)} of {len(p.covered)} parameters reached got an exactly "
                           f"zero gradient ({describe_params(zero, universe=trace.params)}){why}",
                           {"pass": p.name, "parameters": zero, "all": False, "zero_partner": explained}))
    return out


def _lora_partner(param: str) -> Optional[str]:
    """``...lora_A.weight`` -> ``...lora_B.weight`` (peft's and the demo's naming); None for other names."""
    parts = param.split(".")
    for i, part in enumerate(parts):
        if part == "lora_A":
            return ".".join(parts[:i] + ["lora_B"] + parts[i + 1:])
    return None


def _zero_partner_explained(p: PassTrace, zero: List[str]) -> bool:
    """Every zero gradient belongs to a LoRA A whose B was reached with a nonzero gradient.

    That is the signature of B == 0: dL/dA = B^T (dL/dy) x^T vanishes while dL/dB = (dL/dy)(A x)^T does not.
    """
    records = p.records
    for name in zero:
        partner = _lora_partner(name)
        record = records.get(partner) if partner else None
        if record is None or record.zero or record.nonfinite:
            return False
    return True


@verdict("RANK_DIVERGENCE", rank=120, severities=("error", "warning"),
         meaning="coverage differs across distributed ranks: parameters, passes, ranks; a warning when DDP was built with `find_unused_parameters=True` (branching was declared)")
def check_rank_divergence(trace, passes, tensors, cuts):
    out = []
    declared = bool(trace.meta.find_unused_parameters)
    for pass_name, per_rank in (getattr(trace, "rank_coverage", None) or {}).items():
        union = set().union(*per_rank.values()) if per_rank else set()
        differing = {}
        for rank, covered in per_rank.items():
            missing = union - set(covered)
            if missing:
                differing[rank] = sorted(missing)
        if differing:
            params = sorted(set().union(*map(set, differing.values())))
            note = (" (DDP was built with find_unused_parameters=True: branching was declared)" if declared
                    else "; DDP without find_unused_parameters=True fails on this with 'Expected to have "
                         "finished reduction in the prior iteration'" if trace.meta.wrapper == "DDP"
                    else "")
            out.append(Verdict("RANK_DIVERGENCE", "warning" if declared else "error",
                               f"pass {pass_name!r}: coverage differs across ranks; rank(s) "
                               f"{', '.join(map(str, sorted(differing)))} missed {len(params)} parameter(s) others "
                               f"reached ({describe_params(params, universe=trace.params)}){note}",
                               {"pass": pass_name, "ranks": sorted(differing), "parameters": params,
                                "missing_by_rank": {k: v for k, v in sorted(differing.items())}}))
    return out


@verdict("ROUNDS_TO_ZERO", rank=130, severities=("warning",),
         meaning="a recorded scalar prints as zero at 6 decimals but is not zero; says which factor made it small when an inner product was computed")
def check_rounds_to_zero(trace, passes, tensors, cuts):
    out = []
    for s in trace.scalars.values():
        if not s.prints_as_zero:
            continue
        why = _why_small(trace)
        out.append(Verdict("ROUNDS_TO_ZERO", "warning",
                           f"scalar {s.name!r} = {s.value:.6e} prints as {s.value:.6f} but is not zero{why}",
                           {"scalar": s.name, "value": s.value}))
    return out


def _why_small(trace) -> str:
    """Point at the factor that made it small, when an inner product was computed."""
    summaries = [s for s in trace.inner_products if s.preconditioned]
    if summaries:
        s = summaries[-1]
        numel = s.numel_b or 0
        rms = s.norm_b_pre / numel ** 0.5 if numel else None
        if rms is None:  # the two passes share no parameter: the inner product is an empty sum
            return (f"; the preconditioned inner product of {s.a!r} and {s.b!r} is an empty sum: "
                    "the two passes reached no parameter in common")
        # Adam-normalised gradients g / (sqrt(v_hat) + eps) are O(1) per element when healthy.
        if rms is not None and rms < 1e-3:
            return (f"; preconditioning by Adam's sqrt(v_hat)+eps shrinks pass {s.b!r}'s gradient to an RMS of "
                    f"{rms:.3e} per element (norm {s.norm_b:.3e} -> {s.norm_b_pre:.3e}; healthy Adam-normalised "
                    "gradients are ~1): the second moments are extreme")
        return (f"; the preconditioned inner product of {s.a!r} and {s.b!r} is {s.dot:.3e} and the "
                f"preconditioned gradients are healthy (RMS {rms:.3e}): the factor that makes it print as zero "
                "is the scale applied to it (learning rate?)")
    return "; print with scientific notation (e.g. f'{x:.3e}')"


@verdict("TINY_GRADS", rank=140, severities=("warning",),
         meaning="every gradient of a pass would print as `0.000000`")
def check_tiny_grads(trace, passes, tensors, cuts):
    out = []
    for p in passes.values():
        if p.covered and 0.0 < p.max_abs < PRINTS_AS_ZERO and not p.nonfinite:
            out.append(Verdict("TINY_GRADS", "warning",
                               f"pass {p.name!r}: the largest gradient magnitude is {p.max_abs:.3e}; "
                               "fixed 6-decimal printing shows every gradient as 0.000000",
                               {"pass": p.name, "max_abs": p.max_abs}))
    return out


@verdict("DETACHED_OUTPUT", rank=145, severities=("warning",),
         meaning="a module ran with grad and its output required grad, yet none of its parameters got a gradient in any pass: its output was detached or not used by the loss downstream (op and line with `cuts=\"ops\"`)")
def check_detached_output(trace, passes, tensors, cuts):
    ran = set(trace.meta.ran_with_grad or ())
    if not ran or not passes or not any(p.covered for p in passes.values()):
        return []
    reached = set().union(*(p.covered for p in passes.values()))
    out = []
    for module, params in _wholly_unreached_modules(trace.params, reached, ran).items():
        op_cut = next((c for c in cuts if c.op is not None and c.kind in ("detach", "non_differentiable")), None)
        where = (f": {describe_cut(op_cut)}" if op_cut is not None else
                 "; gradtrace.watch(model, cuts=\"ops\") names the op and line that cut it")
        out.append(Verdict("DETACHED_OUTPUT", "warning",
                           f"the output of {module!r} never received a gradient: it ran with grad and its output "
                           f"required grad, yet none of its {len(params)} parameter(s) got one in any pass; it was "
                           f"detached or not used by the loss downstream{where}",
                           {"module": module, "parameters": params,
                            **({"op": op_cut.op, "location": op_cut.location} if op_cut is not None else {})}))
    return out


def _wholly_unreached_modules(params, reached: Set[str], ran: Set[str]) -> Dict[str, List[str]]:
    """``{module: its params}`` for the outermost modules that ran with grad yet none of whose params was reached.

    Judged on the whole module: one reached parameter means its output did carry a gradient back.
    """
    unreached = [p for p in params if p not in reached]
    candidates = set()
    for p in unreached:  # only ancestors of an unreached parameter can qualify: the common case is cheap
        parts = p.split(".")[:-1]
        candidates.update(".".join(parts[:depth]) for depth in range(1, len(parts) + 1))
    by_module: Dict[str, List[str]] = {}
    for module in sorted(candidates & ran, key=lambda m: (m.count("."), m)):
        if any(in_module(p, module) for p in reached):
            continue
        inside = [p for p in unreached if in_module(p, module)]
        if any(in_module(module, outer) and module != outer for outer in by_module):
            continue  # inside a module already reported
        by_module[module] = inside
    return by_module


@verdict("UNUSED_PARAMS", rank=150, severities=("warning",),
         meaning="trainable parameters that received no gradient in any pass")
def check_unused(trace, passes, tensors, cuts):
    if not passes or not any(p.covered for p in passes.values()):
        return []
    reached = set().union(*(p.covered for p in passes.values())) | set(replaced_params(trace))
    unused = [n for n in trace.params if n not in reached]
    if not unused:
        return []
    return [Verdict("UNUSED_PARAMS", "warning",
                    f"{len(unused)} trainable parameter(s) received no gradient in any pass: "
                    f"{describe_params(unused, universe=trace.params)}",
                    {"parameters": unused, "modules": list(group_by_module(unused, trace.params))})]


@verdict("PASS_FAILED", rank=5, severities=("error",),
         meaning="a pass (or the watched block) ended with an exception: its backward did not complete")
def check_pass_failed(trace, passes, tensors, cuts):
    out = [Verdict("PASS_FAILED", "error",
                   f"pass {p.name!r} ended with an exception ({p.failed}): its backward did not complete, so "
                   "its figures are partial", {"pass": p.name, "error": p.failed})
           for p in passes.values() if p.failed]
    error = trace.meta.error
    if error and not out:
        out.append(Verdict("PASS_FAILED", "error",
                           f"the watched block ended with an exception ({error}): training did not complete",
                           {"pass": None, "error": error}))
    return out


@verdict("FROZEN_WHILE_WATCHED", rank=15, severities=("error",),
         meaning="parameters that were trainable when `watch` began stopped requiring grad while watched")
def check_frozen_while_watched(trace, passes, tensors, cuts):
    names = trace.meta.frozen_while_watched
    if not names:
        return []
    return [Verdict("FROZEN_WHILE_WATCHED", "error",
                    f"{len(names)} parameter(s) stopped requiring grad while watched ({describe_params(names)}): "
                    "they can no longer train (requires_grad_(False), or a freeze after the optimizer was built)",
                    {"parameters": names})]


@verdict("NO_PASSES", rank=85, severities=("error",),
         meaning="the watch saw the model run (forward calls, graph cuts) but no backward reached a watched parameter")
def check_no_passes(trace, passes, tensors, cuts):
    forwards = trace.meta.forward_calls or 0
    trainable_cuts = [c for c in cuts if c.params > 0]
    if passes or not (forwards or trainable_cuts) or set(replaced_params(trace)).issuperset(trace.params):
        return []
    seen = [f"{forwards} forward call(s) of the model"] if forwards else []
    if trainable_cuts:
        seen.append(f"{len(trainable_cuts)} graph cut(s) of trainable parameters")
    likely = trainable_cuts[0] if trainable_cuts else None
    because = f"; likely cause: {describe_cut(likely)}. {_cut_fix(likely)}" if likely else (
        " (did backward run? an exception, a leaked torch.set_grad_enabled(False), frozen parameters)")
    evidence = {"forward_calls": forwards, "cuts": len(trainable_cuts)}
    if likely is not None:
        evidence.update({"kind": likely.kind, "module": likely.module, "location": likely.location})
    return [Verdict("NO_PASSES", "error",
                    f"the watch saw {' and '.join(seen)} but no backward reached a watched parameter{because}",
                    evidence)]


@verdict("CLEARED_GRADS", rank=160, severities=("info",),
         meaning="gradients cleared (set to None or zeroed) before gradtrace could read them: figures unknown, not zero")
def check_cleared(trace, passes, tensors, cuts):
    out = []
    for p in passes.values():
        cleared = sorted(p.cleared) if not p.unknown_because else []  # a wrapper's: FIGURES_UNKNOWN says why
        if cleared:
            out.append(Verdict("CLEARED_GRADS", "info",
                               f"pass {p.name!r}: {len(cleared)} gradient(s) were cleared before gradtrace could "
                               f"read them ({describe_params(cleared)}); their figures are unknown, not zero. "
                               "Close the pass before zero_grad(), or open it with read_at='run_end'",
                               {"pass": p.name, "parameters": cleared}))
    return out
