"""Verdict checks: each looks for one kind of evidence in the plain records.

Pure Python over the records, so a trace loaded from JSON is judged exactly
like a live one. Each check is registered with its code, rank and severities
(``registry.verdict``); ``verdicts`` runs them all and ranks what they find so
the most likely root cause comes first (a cut before the coverage gap it
explains, a zero-variance advantage tensor before the zero upstream gradient
it explains).
"""
from __future__ import annotations

import re
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

from ..records import Cut, PassTrace, TensorRecord, Verdict
from . import forward
from .cuts import describe_cut, outermost_cuts
from .optimizer_checks import nonfinite_updates, params_in_no_optimizer
from .paths import OUTPUT_CUTS, bypassed_adapters, carried_unreached, explainable, forward_rank, on_path
from .diff import Diff
from .names import describe_groups, describe_params, group_by_module, in_module
from .explain import order
from .memo import Ident, Memo, copied, covered_union, memo_of
from .registry import ordered, verdict
from .replaced import replaced_params
from .steps import consumed_by_step, step_windows, stepped_by
from .tensor_checks import nonfinite_values

# The largest magnitude that `f"{x:.6f}"` prints as 0.000000.
PRINTS_AS_ZERO = 5e-7


def verdicts(trace) -> List[Verdict]:
    """Every registered check over ``trace``, most likely root cause first.

    What a check computed from a pass (and from the context its key names) is kept on the trace for the
    next call (``memo.Memo``): judging a live trace every step costs what its new pass adds, not what
    every kept pass holds.
    """
    with memo_of(trace).call():
        passes = trace.passes
        tensors = trace.tensors
        cuts = outermost_cuts(list(trace.cuts))
        found: List[Verdict] = []
        for kind in ordered():
            found.extend(kind.check(trace, passes, tensors, cuts))
        return order(found)


@verdict("NONFINITE", rank=10, severities=("error", "info"),
         meaning="NaN/Inf gradients; names the first parameter in backward order and, with `cuts=\"ops\"`, the op, module and line whose backward produced them and whether its forward values were already non-finite; info where the optimizer step was skipped on them and later steps went on (a GradScaler settling its scale)")
def check_nonfinite(trace, passes, tensors, cuts):
    out = []
    skipped = _skipped_steps(trace, passes)
    for p in passes.values():
        bad = p.nonfinite_in_backward_order()
        if bad and p.name in skipped:
            out.append(Verdict("NONFINITE", "info",
                               f"pass {p.name!r}: NaN/Inf gradients in {len(bad)} parameter(s), and no optimizer "
                               "step was taken on them while later passes stepped: a GradScaler skipped this step "
                               "(expected while its scale settles), or the loop skipped it on purpose",
                               {"pass": p.name, "parameters": [r.name for r in bad], "skipped_step": True}))
        elif bad:
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
            if p.forward_nonfinite:
                evidence["forward"] = p.forward_nonfinite
            out.append(Verdict("NONFINITE", "error",
                               f"pass {p.name!r}: {forward.forward_lead(p)}NaN/Inf gradients{where} in "
                               f"{len(bad)} parameter(s); the first in backward order is {first.name!r} "
                               f"({first.nonfinite} non-finite elements){forward.forward_finite_note(p)}"
                               f"{_nonfinite_origin(trace, p)}", evidence))
    out.extend(nonfinite_values(trace, passes, tensors))
    out.extend(nonfinite_updates(trace))
    for t in tensors.values():
        for pass_name, facts in t.grads.items():
            if facts.nonfinite:
                out.append(Verdict("NONFINITE", "error",
                                   f"pass {pass_name!r}: the gradient reaching tensor {t.name!r} holds "
                                   f"{facts.nonfinite} NaN/Inf values",
                                   {"tensor": t.name, "pass": pass_name, "count": facts.nonfinite}))
    return out


def _skipped_steps(trace, passes: Dict[str, PassTrace]) -> Set[str]:
    """Passes no optimizer step took, followed by a pass whose gradients were finite and that one stepped."""
    steps = stepped_by(trace)
    if not steps:
        return set()
    skipped: Set[str] = set()
    later_ok = False
    for p in reversed(list(passes.values())):
        if p.name in steps:
            later_ok = later_ok or not p.nonfinite
        elif later_ok:
            skipped.add(p.name)
    return skipped


def _nonfinite_origin(trace, p: PassTrace) -> str:
    """Where the NaN/Inf was born (cuts="ops"), or the one-line change that finds it on the next run."""
    origin = p.nonfinite_origin
    if p.forward_nonfinite and (not origin or origin.forward != "finite"):
        return ""  # the forward's own first NaN/Inf, named above, is where to look
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
    """The cut of trainable parameters seen while the tensor was being built (the latest region).

    ``record.cuts`` lists the cuts seen since the previous registration, in the order of their latest
    sighting; a no_grad call of a module that then ran again with grad was already left out (live.py).
    A parameter-free module's cut (rotary embeddings' cos/sin) is never the reason a tensor lost its
    gradient: parameters upstream of it reach the loss by other paths.
    """
    by_seq = {cut.seq: cut for cut in trace.cuts}
    candidates = [by_seq[seq] for seq in record.cuts if seq in by_seq]
    candidates = [c for c in candidates if c.params > 0 or (c.op is not None and c.kind in OUTPUT_CUTS)]
    if not candidates:
        return None
    # The outermost cut of the latest region: the latest cut, or a cut of a module containing it.
    last = candidates[-1]
    same = [c for c in candidates if c.kind == last.kind and c.pass_name == last.pass_name
            and (c is last or (c.op is None and c.location == last.location and in_module(last.module, c.module)))]
    return min(same, key=lambda c: (c.module.count(".") + bool(c.module), c.seq))


DATA_ROLES = ("mask", "attention_mask", "completion_mask", "group")


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
        evidence = {"tensor": t.name, "calls": t.calls, "requires_grad_calls": t.requires_grad_calls,
                    "passes": list(t.passes)}
        if cut is not None:
            evidence.update({"kind": cut.kind, "module": cut.module, "location": cut.location, "cut": cut.seq})
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
    registered outside every pass) and it was not registered as data (a ``role``):
    then it is what the loss was built from.
    """
    if t.expect_grad or t.requires_grad_calls:
        return True
    if t.role in DATA_ROLES:
        return False
    own = [passes[n] for n in t.passes if n in passes] or list(passes.values())
    return not any(p.covered for p in own)


def _lost_coverage(reached: FrozenSet[str], p: PassTrace, memo: Optional[Memo] = None) -> FrozenSet[str]:
    """Parameters this pass should have reached: reached by a comparable pass, or reachable from its tensors.

    ``reached`` is the union of the coverage of the passes comparable with ``p`` (see
    ``comparable``): minus this pass's own, it is what they reached and this one did not.
    With nothing to compare against, a cut recorded inside the pass itself may
    still explain every parameter the pass missed (see ``check_graph_cuts``).
    """
    memo = memo or Memo()
    return memo.get(("lost", Ident(p), p.covered, reached),
                    _lost_from_scratch, reached, p, memo)


def _lost_from_scratch(reached: FrozenSet[str], p: PassTrace, memo: Memo) -> FrozenSet[str]:
    return memo.canonical(frozenset((reached | set(p.expected or ())) - p.covered))


def _missing(p: PassTrace, memo: Memo) -> FrozenSet[str]:
    """``p.missing``, kept (its watched parameters and coverage do not change)."""
    return memo.get(("missing", Ident(p), p.covered, Ident(p.params)), _missing_from_scratch, p, memo)


def _missing_from_scratch(p: PassTrace, memo: Memo) -> FrozenSet[str]:
    return memo.canonical(frozenset(p.missing))


def _union_of(memo: Memo, a: FrozenSet[str], b: FrozenSet[str]) -> FrozenSet[str]:
    """``a | b``, canonical, kept per pair of canonical sets."""
    return memo.get(("union", (a, b)), _canonical_union, memo, a, b)


def _canonical_union(memo: Memo, a: FrozenSet[str], b: FrozenSet[str]) -> FrozenSet[str]:
    return memo.canonical(a | b)


def _carried_unreached(p: PassTrace, lost: FrozenSet[str], universe, memo: Memo) -> Dict[str, List[str]]:
    """``paths.carried_unreached``, kept per pass and lost set (read-only: the lists are shared)."""
    return memo.get(("carried", Ident(p), p.covered, lost, Ident(universe)),
                    carried_unreached, p, lost, universe)


def comparable(steps: Dict[str, frozenset], a: str, b: str) -> bool:
    """Passes that stepped different optimizers (a GAN's generator and discriminator steps, actor and
    critic) reach different parameters by design: they are not compared for coverage."""
    sa, sb = steps.get(a), steps.get(b)
    return not sa or not sb or sa == sb


def _reached_by_comparable(trace, passes: Dict[str, PassTrace]) -> Dict[str, FrozenSet[str]]:
    """For each pass, the union of the coverage of the passes it may be compared with.

    Kept while the passes, their coverage and the optimizers that stepped them stay the same; each
    union is canonical (``Memo.canonical``), so what is keyed on it is found by identity.
    """
    memo = memo_of(trace)
    steps = stepped_by(trace)
    key = ("reached", tuple(passes), tuple(p.covered for p in passes.values()),
           tuple(steps.get(name) for name in passes) if steps else None)
    return memo.get(key, _reached_from_scratch, passes, steps, memo)


def _reached_from_scratch(passes: Dict[str, PassTrace], steps: Dict[str, frozenset],
                          memo: Memo) -> Dict[str, FrozenSet[str]]:
    if not steps:
        everything = covered_union(memo, passes.values())
        return {name: everything for name in passes}
    by_group: Dict[frozenset, List[PassTrace]] = {}
    for name, p in passes.items():
        by_group.setdefault(steps.get(name) or None, []).append(p)
    unstepped = covered_union(memo, by_group.pop(None, ()), channel="unstepped")
    covered = {group: covered_union(memo, members, channel=group) for group, members in by_group.items()}
    everything = memo.canonical(unstepped.union(*covered.values()))
    reached = {group: _union_of(memo, union, unstepped)
               for group, union in covered.items()}
    return {name: reached[steps[name]] if steps.get(name) else everything for name in passes}


@verdict("GRAPH_CUT", rank=30, severities=("error",),
         meaning="a cut (`no_grad`, `inference_mode`, `detach`, `non_differentiable`, `checkpoint`) on the path of the forward a pass differentiated, upstream of parameters that lost coverage: module, location, fix")
def check_graph_cuts(trace, passes, tensors, cuts):
    memo = memo_of(trace)
    explained: Dict[int, Dict[str, Any]] = {}
    reached = _reached_by_comparable(trace, passes)
    by_pass: Dict[Optional[str], List[Cut]] = {}  # the cuts that can explain anything, by the pass they were in
    for cut in cuts:
        if cut.kind in OUTPUT_CUTS or cut.params != 0:
            by_pass.setdefault(cut.pass_name, []).append(cut)
    for p in passes.values():
        mine = by_pass.get(p.name, []) + by_pass.get(None, [])
        if not mine:
            continue
        compared = _lost_coverage(reached[p.name], p, memo)
        window = set(p.forward_cuts or ())
        for cut in sorted(mine, key=lambda c: c.seq):  # the order of ``cuts``
            # Unlabelled cuts (generation, logging) must explain a real loss; a cut
            # inside the pass, or in the forward it differentiated, may explain whatever the pass missed.
            inside = cut.pass_name == p.name or cut.seq in window
            lost = compared if compared or not inside else _missing(p, memo)
            hit = memo.get(("explainable", Ident(cut), lost, Ident(p)), explainable, cut, lost, p)
            if not hit:
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
    for entry in _without_weak_cuts(explained, passes, reached, trace.params, memo):
        cut: Cut = entry["cut"]
        lost = entry["lost"]
        passes_txt = ", ".join(repr(n) for n in entry["passes"]) or "(outside any pass)"
        lost_txt = (f"; pass {passes_txt} lost {len(lost)} parameter(s): {describe_params(lost, universe=trace.params)}"
                    if lost else f"; tensor {entry.get('tensor')!r} was built across it")
        out.append(Verdict("GRAPH_CUT", "error",
                           f"graph cut: {describe_cut(cut)}{lost_txt}. {_cut_fix(cut)}",
                           {"kind": cut.kind, "module": cut.module, "module_type": cut.module_type,
                            "op": cut.op, "location": cut.location, "pass": cut.pass_name,
                            "passes": entry["passes"], "lost": sorted(lost), "cut": cut.seq,
                            **({"tensor": entry["tensor"]} if "tensor" in entry else {})}))
    return out


def _without_weak_cuts(explained: Dict[int, Dict[str, Any]], passes, reached, universe,
                       memo: Memo) -> List[Dict[str, Any]]:
    """The explaining cuts, a parameter-free module's cut left out where something stronger explains the same
    loss (rotary embeddings' cos/sin never carry a gradient, by design): a cut of a module with parameters,
    an op-level cut, or a module whose output carried a gradient that never came back."""
    weak = [entry for entry in explained.values() if _weak(entry["cut"])]
    if not weak:
        return sorted(explained.values(), key=lambda entry: entry["cut"].seq)
    strong: Set[str] = set()
    for entry in explained.values():
        if not _weak(entry["cut"]):
            strong |= entry["lost"]
    for p in passes.values():
        lost, missing = _lost_coverage(reached[p.name], p, memo), _missing(p, memo)
        either = _union_of(memo, lost, missing)
        for params in _carried_unreached(p, either, universe, memo).values():
            strong.update(params)
    kept = [entry for entry in explained.values()
            if not _weak(entry["cut"]) or not entry["lost"] or not entry["lost"] <= strong]
    return sorted(kept, key=lambda entry: (_weak(entry["cut"]), entry["cut"].seq))


def _weak(cut: Cut) -> bool:
    """A parameter-free module's cut of fresh data (rotary cos/sin): never stronger than another explanation.
    One whose output is its input's own data, detached (``x.detach()`` in a wrapper), is a real cut."""
    return not cut.params and cut.op is None and not cut.passes_input


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


@verdict("STALE_GRADS", rank=40, severities=("error", "warning"),
         meaning="`.grad` already held values when a pass began: an error where an optimizer step began (seen by itself, or `step_start=True`), a warning in a labelled pass that began no step and whose gradients no optimizer step then applied (a forgotten `zero_grad()` before a probe; loss terms backpropagated in passes of their own and applied by one step are accumulation on purpose, as `pass_(name, accumulate=True)` says)")
def check_stale(trace, passes, tensors, cuts):
    out = []
    outside = set(params_in_no_optimizer(trace))
    steps = stepped_by(trace)
    owned = {o.name: set(o.params) for o in (getattr(trace, "optimizers", None) or {}).values()}
    windows = step_windows(trace, passes)
    previous: Optional[PassTrace] = None
    for p in passes.values():
        before, previous = previous, p
        stale = sorted(p.stale)
        if stale and not p.step_start and consumed_by_step(windows, p):
            # An optimizer step took these gradients as they stood, earlier passes' included, with no
            # zero_grad() in between: loss terms backpropagated in passes of their own, on purpose.
            continue
        if stale and steps.get(p.name):
            # Only what the step that took this pass's gradients will apply: in a GAN's generator step the
            # discriminator's .grad still holds its own step's gradients, and nothing steps on them.
            stepped = set().union(*(owned.get(o, set()) for o in steps[p.name]))
            stale = [n for n in stale if n in stepped or n in outside]
        if not stale or (not p.step_start and _accumulating(before, p, stale)):
            continue
        ranks = _ranks_where(trace, p.name, stale, lambda figures: len(figures) > 3 and bool(figures[3]))
        which = f"for {len(stale)} parameter(s) ({describe_params(stale, universe=trace.params)})"
        evidence = _with_ranks({"pass": p.name, "parameters": stale, "step_start": p.step_start}, ranks)
        if outside and set(stale) <= outside:
            message = (f"pass {p.name!r}: .grad already held values when the pass began{_on_ranks(ranks)} {which}: "
                       "they are in no param group of the optimizer that stepped, so its zero_grad() never clears "
                       "them and they are never updated (see NOT_IN_OPTIMIZER)")
        elif p.step_start:
            stepping = sorted(steps.get(p.name) or ())
            whose = (f" (the zero_grad() of {', '.join(stepping)}, the optimizer that steps them: zeroing another "
                     "optimizer's or model's parameters leaves these)" if stepping and len(owned) > 1 else "")
            message = (f"pass {p.name!r}: .grad already held values when the pass began an optimizer step"
                       f"{_on_ranks(ranks)} {which}: gradients were not zeroed after the previous step, so this "
                       f"step adds to them; call optimizer.zero_grad() before the pass{whose}")
        else:
            message = (f"pass {p.name!r} began on gradients left in .grad by earlier runs, with no optimizer step "
                       f"in between{_on_ranks(ranks)}, {which}. Either zero_grad() was forgotten before it (its "
                       ".grad, and whatever reads it, mixes in the earlier gradients; the figures here are the "
                       "pass's own), or they are accumulated across passes on purpose: then open it with "
                       f"trace.pass_({p.name!r}, accumulate=True)")
        out.append(Verdict("STALE_GRADS", "error" if p.step_start else "warning", message, evidence))
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
            unreached = [n for n in report if not passes[n].covered] if t.reachable else []
            why = ("none of the requested inputs is reachable through it (reentrant checkpointing hides "
                   "the segment's parameters from autograd.grad)" if t.reach_partial
                   else f"{len(t.reachable)} trainable parameter(s) are upstream of it and none got a gradient: "
                        "the loss was cut after it (a .detach() / .data or a tensor rebuilt from its values, "
                        ".item(), an integer op) or does not use it" if unreached
                   else "the loss does not depend on it, or no requested input is upstream of it")
            out.append(Verdict("TENSOR_NOT_REACHED", "error",
                               f"tensor {t.name!r} requires grad but backward never reached it in pass(es) "
                               f"{', '.join(repr(n) for n in report)}: {why}",
                               {"tensor": t.name, "passes": report, "upstream": list(t.reachable or ())}))
    return out


def likely_cut(cuts: List[Cut], p: PassTrace, params) -> Optional[Cut]:
    """The cut on the path of ``p``'s forward that explains losing ``params``: one made inside the pass
    first, then the latest (the one nearest the loss)."""
    found = [c for c in cuts if c.pass_name in (p.name, None) and (c.params > 0 or c.kind in OUTPUT_CUTS)
             and on_path(c, p) and explainable(c, params, p)]
    found = [c for c in found if c.params > 0 or c.op is not None or c.upstream]
    if not found:
        return None
    return max(found, key=lambda c: (c.pass_name == p.name, c.seq))


@verdict("NO_COVERAGE", rank=80, severities=("error",),
         meaning="no trainable parameter received a gradient in a pass; names the cut on the path of its forward, adapters that did not run, the module whose output was cut, or a backward that returned None for them")
def check_no_coverage(trace, passes, tensors, cuts):
    out = []
    gone = set(replaced_params(trace))
    memo = memo_of(trace)
    for p in passes.values():
        if p.covered or (gone and gone.issuperset(p.params)):  # every parameter replaced: gradtrace is blind
            continue
        likely = memo.get(("likely_cut", Ident(p), tuple(Ident(c) for c in cuts)), likely_cut, cuts, p, p.params)
        evidence = {"pass": p.name, "runs": p.runs}
        because = ""
        bypassed = memo.get(("bypassed", Ident(p)), bypassed_adapters, p, p.params)
        undefined = _undefined([p], set(p.params))
        if undefined:
            every = len(undefined) == len([n for n in p.params if n not in gone])
            because = "; " + _undefined_note(undefined, p.params, compiled=bool(trace.meta.compiled),
                                             subject="every watched parameter was" if every else None)
            evidence["undefined_grads"] = undefined
        elif likely is not None:
            because = f"; likely cut: {describe_cut(likely)}. {_cut_fix(likely)}"
            evidence.update({"kind": likely.kind, "module": likely.module, "location": likely.location,
                             "cut": likely.seq})
        elif bypassed:
            because = (f"; the LoRA adapters did not run: their layers ran but {describe_params(bypassed)} were "
                       "skipped (peft's disable_adapter(), merged or unloaded adapters, or a forward that bypasses "
                       "them)")
            evidence["adapters"] = bypassed
        else:
            cut_after = memo.get(("carried_all", Ident(p), p.covered), carried_unreached, p, set(p.params), p.params)
            if cut_after:
                last = max(cut_after, key=lambda m: forward_rank(p).get(m, -1))
                because = (f"; module {last!r} ran with grad and its output required grad, but no gradient came "
                           "back to it: its output was cut after it (a .detach() / .data, or argmax, a comparison "
                           "or an integer cast in your code)" + _ops_rerun(trace))
                evidence["module"] = last
            elif p.forward_modules is not None and not p.forward_modules:
                because = ("; no module with trainable parameters ran with grad enabled since the previous pass: "
                           "the loss was built from outputs computed without grad (torch.no_grad() / "
                           "set_grad_enabled(False) around the forward) or from cached outputs")
        no_grad = [t.name for t in tensors.values() if p.name in t.passes and t.requires_grad_calls < t.calls
                   and t.role not in DATA_ROLES]
        if no_grad:  # e.g. every trainable parameter was bypassed (adapters disabled): nothing carries grad
            because = because.rstrip(".") + (f"; tensor(s) {', '.join(repr(n) for n in no_grad)} registered in this pass do not "
                        "require grad: nothing trainable took part in computing them")
        runs = f"{p.runs} engine run(s)" if p.runs else "no engine run that reached a watched tensor"
        out.append(Verdict("NO_COVERAGE", "error",
                           f"pass {p.name!r}: no trainable parameter received a gradient ({runs}){because}",
                           evidence))
    return out


def _ops_rerun(trace) -> str:
    if trace.meta.cuts == "ops":
        return ""
    return "; gradtrace.watch(model, cuts=\"ops\") names the op and line"


def _undefined(passes: Iterable[PassTrace], missing) -> List[str]:
    """Parameters among ``missing`` that the engine reached with a None gradient in one of ``passes``."""
    return sorted({n for p in passes for n in (p.undefined_grads or ()) if n in missing})


def _undefined_note(undefined: List[str], universe, of: Optional[List[str]] = None, compiled: bool = False,
                    subject: Optional[str] = None) -> str:
    """They were in the backward graph, so nothing cut them off: a backward on the way returned None.
    Named unless they are every one of ``of`` (the parameters the sentence before named)."""
    one = len(undefined) == 1
    if subject is None and of is not None and len(undefined) == len(of):
        subject = "it was" if one else "they were"
    elif subject is None:
        subject = f"{describe_params(undefined, universe=universe)} {'was' if one else 'were'}"
    them = "it" if one else "them"
    if compiled:  # aot_autograd's compiled backward returns None for what a cut inside the region cut off
        return (f"{subject} in the backward graph but the engine brought None as gradient: under torch.compile "
                "that is what a cut inside the compiled region looks like (a .detach(), a threshold or an integer "
                "cast: rerun without torch.compile and gradtrace names it), or a custom torch.autograd.Function "
                f"whose backward returns None for {them}")
    return (f"{subject} in the backward graph but the engine brought "
            f"None as gradient: the backward of an op between the loss and {them} returned None for {them} (a custom "
            "torch.autograd.Function whose backward returns None for that input? Return a gradient for every "
            "input that needs one: ctx.needs_input_grad says which)")


def _comparable_pairs(trace, passes: Dict[str, PassTrace]):
    steps = stepped_by(trace)
    named = [p for p in passes.values() if not p.auto and p.covered]
    if len(named) > 6:  # a long run of passes: compare neighbours only (among those stepping the same optimizers)
        pairs = []
        for i, a in enumerate(named):
            b = next((named[k] for k in range(i + 1, len(named)) if comparable(steps, a.name, named[k].name)), None)
            if b is not None:
                pairs.append((a, b))
        return pairs
    return [(a, b) for i, a in enumerate(named) for b in named[i + 1:] if comparable(steps, a.name, b.name)]


@verdict("COVERAGE_GAP", rank=90, severities=("error",),
         meaning="parameters reached in one pass but not another, grouped by module (passes that step different optimizers are not compared)")
def check_coverage_gaps(trace, passes, tensors, cuts):
    out = []
    memo = memo_of(trace)
    gone = memo.canonical(frozenset(replaced_params(trace)))
    universe = trace.params
    compiled = bool(trace.meta.compiled)
    for a, b in _comparable_pairs(trace, passes):
        # Neighbours judged at an earlier step are judged the same now: kept per pair of pass objects.
        found = memo.get(("gap", Ident(a), a.covered, Ident(b), b.covered, gone, Ident(universe), compiled),
                         _coverage_gap, a, b, gone, universe, compiled)
        if found is not None:
            out.append(copied(found))
    return out


def _coverage_gap(a: PassTrace, b: PassTrace, gone: FrozenSet[str], universe, compiled: bool = False
                  ) -> Optional[Verdict]:
    only_a, only_b = a.covered - b.covered, b.covered - a.covered
    if gone:  # a parameter replaced between the two passes is not a gap
        only_a, only_b = only_a - gone, only_b - gone
    if not only_a and not only_b:
        return None
    sorted_a, sorted_b = sorted(only_a), sorted(only_b)
    groups_a, groups_b = group_by_module(sorted_a, universe), group_by_module(sorted_b, universe)
    parts = []
    for only, groups, here, there in ((only_a, groups_a, a, b), (only_b, groups_b, b, a)):
        if only:
            parts.append(f"{len(only)} reached in {here.name!r} but not {there.name!r}: {describe_groups(groups)}")
    d = Diff(a=a.name, b=b.name, only_a=set(only_a), only_b=set(only_b), both=set(), ratios={})
    undefined = _undefined([b], only_a) + _undefined([a], only_b)
    hint = ". " + _undefined_note(undefined, universe, compiled=compiled) if undefined else _gap_hint(d)
    return Verdict("COVERAGE_GAP", "error",
                   "coverage gap: " + "; ".join(parts) + hint,
                   {"a": a.name, "b": b.name, "only_a": sorted_a, "only_b": sorted_b,
                    "modules_only_a": list(groups_a), "modules_only_b": list(groups_b)})


def _gap_hint(d: Diff) -> str:
    gap = d.only_a | d.only_b
    if gap and all(_is_adapter(p) for p in gap):
        side = d.b if d.only_a else d.a
        return (f". Every one is a LoRA adapter parameter: the adapters were bypassed in {side!r} "
                "(peft's disable_adapter(), merged weights, or a forward that skips them)")
    return " (not requested in autograd.grad's inputs, bypassed, or cut)"


def _accumulating(before: Optional[PassTrace], p: PassTrace, stale: List[str]) -> bool:
    """One labelled pass per microbatch (``micro0``, ``micro1``, ...): each adds to what the one before left."""
    return (before is not None and not before.auto and _numbered(before.name) == _numbered(p.name)
            and set(stale) <= before.covered)


def _numbered(name: str) -> str:
    return re.sub(r"\d+", "#", name)


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
         meaning="reached parameters whose gradient is exactly zero: an error when all are, else a warning; info when an all-zero parameter of the same module explains it (a zero-initialised adapter factor: LoRA B, lora_up, lora_embedding_A, a zero gate); a tensor hook of the user's on them (a gradient mask) is named first")
def check_zero_grads(trace, passes, tensors, cuts):
    out = []
    for p in passes.values():
        zero = sorted(p.zero)
        if not zero:
            continue
        every = len(zero) == len(p.covered)
        if every:
            factors = sorted(_zero_factors(p))
            why = (f"; {describe_params(factors, universe=trace.params)} "
                   f"{'is' if len(factors) == 1 else 'are'} all zeros "
                   f"({_quoted(factors)}): where two factors of a product are both zero, every factor's "
                   "gradient is zero and none can move. Initialise at most one factor of each pair to zero "
                   "(LoRA: the up / B matrix), the other randomly" if factors else "")
            if not factors:
                why = ("; no parameter passes a gradient, so the loss's derivative is zero where it leaves the "
                       "model: a step function on the way (torch.round / floor / sign / a threshold turned into "
                       "float; a straight-through estimator x + (round(x) - x).detach() keeps the gradient), a clamp / "
                       "hardtanh / ReLU with every input outside its range (saturated), a softmax over a dimension of size 1 "
                       "(always 1.0: softmax(x, dim=1) of an [N, 1] output), a loss multiplied by 0, a mask that selects nothing, or a loss with no target left (every label "
                       "-100 / ignore_index: cross_entropy then returns NaN with zero gradients)")
            evidence = {"pass": p.name, "parameters": zero, "all": True}
            if factors:
                evidence["zero_valued"] = factors
            hooked = _user_hooked(trace, zero)
            if hooked:
                why, evidence["user_hooked"] = _hooked_note(hooked, zero, trace.params) + _otherwise(why), hooked
            out.append(Verdict("ZERO_GRADS", "error",
                               f"pass {p.name!r}: every one of the {len(zero)} parameters reached got an exactly "
                               f"zero gradient{why}", evidence))
            continue
        explained = _zero_partners(p, zero, trace.params)
        severity = "info" if explained is not None else "warning"
        if explained:
            one = len(explained) == 1
            why = (f" because {_quoted(explained)} {'is' if one else 'are'} all zeros ({'its' if one else 'their'} "
                   "initialisation): a factor that is zero makes the other factor's gradient exactly zero until "
                   "the first optimizer step moves it. Expected on the first steps")
        elif explained is not None:
            why = ("; each is a LoRA A matrix whose B partner got a nonzero gradient: B is still zero (its "
                   "initialisation), so A's gradient B^T(...) is exactly zero. Expected on the first steps")
        else:
            why = _dead_input(p, zero)
        evidence = {"pass": p.name, "parameters": zero, "all": False, "zero_partner": explained is not None,
                    **({"zero_valued": explained} if explained else {})}
        hooked = _user_hooked(trace, zero) if explained is None else []
        if hooked:
            why, evidence["user_hooked"] = _hooked_note(hooked, zero, trace.params) + _otherwise(why), hooked
        out.append(Verdict("ZERO_GRADS", severity,
                           f"pass {p.name!r}: {len(zero)} of {len(p.covered)} parameters reached got an exactly "
                           f"zero gradient ({describe_params(zero, universe=trace.params)}){why}", evidence))
    return out


def _user_hooked(trace, zero: List[str]) -> List[str]:
    """Of the parameters with an exactly zero gradient, those carrying a tensor hook of the user's."""
    hooked = trace.meta.user_hooked
    if not hooked:
        return []
    hooked = set(hooked)
    return [n for n in zero if n in hooked]


def _hooked_note(hooked: List[str], zero: List[str], universe) -> str:
    """A hook of the user's returns the gradient: the likeliest reason for a zero one, named first."""
    which = "every one of them carries" if len(hooked) == len(zero) else \
        f"{describe_params(hooked, universe=universe)} of them {'carries' if len(hooked) == 1 else 'carry'}"
    return (f"; {which} a tensor hook of yours (Tensor.register_hook), and what a hook returns is the gradient: "
            "check it first (a mask that is all zeros, g * 0)")


def _otherwise(why: str) -> str:
    """The other explanations, after the hook's: '; otherwise, ...'."""
    return f"; otherwise,{why[1:]}" if why.startswith(";") else why


def _dead_input(p: PassTrace, zero: List[str]) -> str:
    """A module whose weight's gradient is exactly zero while its bias's is not saw an all-zero input:
    dW = dY^T X vanishes, db = sum(dY) does not. Named, the last such module in forward order."""
    records = p.records
    dead = []
    for name in zero:
        module, _, leaf = name.rpartition(".")
        bias = records.get(f"{module}.bias" if module else "bias")
        if leaf == "weight" and bias is not None and not bias.zero and not bias.nonfinite:
            dead.append(module)
    if not dead:
        return ""
    order = {m: i for i, m in enumerate(p.forward_modules or ())}
    last = max(dead, key=lambda m: order.get(m, -1))
    shown = repr(last) if last else "the root module"
    return (f"; the input of {shown} was all zeros (its weight's gradient is exactly zero while its bias's is "
            "not), so nothing upstream of it gets a gradient: dead activations before it (a ReLU that outputs 0 "
            "for every input: biases pushed far negative, too high a learning rate, a bad initialisation), or an "
            "input that is zero")


def _quoted(names: List[str], shown: int = 2) -> str:
    text = ", ".join(repr(n) for n in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _multiplies(param: str) -> bool:
    """A bias is added, never multiplies: its being zero explains no other parameter's zero gradient."""
    return param.rsplit(".", 1)[-1] != "bias"


def _zero_factors(p: PassTrace) -> List[str]:
    """Parameters reached in the pass whose values were all zero when it began (not biases)."""
    return [n for n in (p.zero_valued or ()) if n in p.covered and _multiplies(n)]


def _zero_partners(p: PassTrace, zero: List[str], universe) -> Optional[List[str]]:
    """What explains every exactly zero gradient of the pass, or None where something does not.

    A zero gradient is explained by an all-zero parameter (not a bias) that got a nonzero gradient in
    the pass and lies in the nearest module enclosing the zero one that holds such a parameter: a
    zero-initialised factor (LoRA's B, lora_up, lora_embedding_A, a zero gate or a zero-initialised
    norm at the end of a residual branch) multiplies the other's contribution, so the other's gradient
    is zero while the factor's is not, until a step moves it. Returns those parameters (an empty list
    where only peft's naming explains it: a trace recorded before values were probed).
    """
    records = p.records
    moving = [n for n in _zero_factors(p) if not records[n].zero and not records[n].nonfinite]
    found: List[str] = []
    for name in zero:
        partners = _nearest_enclosing(name, moving)
        if not partners:
            if p.zero_valued is None and _lora_b_moves(p, name):
                continue
            return None
        found.extend(q for q in partners if q not in found)
    return found


def _nearest_enclosing(param: str, candidates: List[str]) -> List[str]:
    """The candidates inside the nearest module enclosing ``param`` that holds any of them."""
    parts = param.split(".")[:-1]
    for depth in range(len(parts), -1, -1):
        module = ".".join(parts[:depth])
        inside = [c for c in candidates if c != param and in_module(c, module)]
        if inside:
            return inside
    return []


def _lora_partner(param: str) -> Optional[str]:
    """``...lora_A.weight`` -> ``...lora_B.weight`` (peft's and the demo's naming); None for other names."""
    parts = param.split(".")
    for i, part in enumerate(parts):
        if part == "lora_A":
            return ".".join(parts[:i] + ["lora_B"] + parts[i + 1:])
    return None


def _lora_b_moves(p: PassTrace, name: str) -> bool:
    """A LoRA A whose B was reached with a nonzero gradient: the signature of B == 0, read off peft's names
    (for traces saved before values were probed)."""
    partner = _lora_partner(name)
    record = p.records.get(partner) if partner else None
    return record is not None and not record.zero and not record.nonfinite


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
            # sqrt(v_hat) is ~1/rms times this gradient: Adam's state remembers gradients that much larger.
            return (f"; preconditioning by Adam's sqrt(v_hat)+eps shrinks the gradient of pass {s.b!r} to an RMS "
                    f"of {rms:.3e} per element (norm {s.norm_b:.3e} -> {s.norm_b_pre:.3e}; healthy Adam-normalised "
                    f"gradients are ~1): the second moments are extreme, as if earlier steps saw gradients "
                    f"{1 / rms:.1e} times larger (a loss scale never unscaled, such as fp16's 2**16, or a spike)")
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


def _never_reached(memo: Memo, universe, union: FrozenSet[str]) -> FrozenSet[str]:
    return memo.canonical(frozenset(set(universe) - union))


def _detached_candidates(p: PassTrace, never: FrozenSet[str], compared: Optional[FrozenSet[str]],
                         universe) -> Dict[str, List[str]]:
    """Modules that carried out a gradient the pass lost (``compared``: what comparable passes reached,
    for a backward pass), or one no pass ever got (``never``)."""
    lost = never | _lost_coverage(compared, p) if compared is not None else never
    return carried_unreached(p, lost, universe)


@verdict("DETACHED_OUTPUT", rank=145, severities=("warning", "error"),
         meaning="a module ran with grad and its output required grad, yet none of its parameters got a gradient in the pass: its output was cut (detached, argmax, an integer cast) or not used by the loss downstream; names the module whose output was cut (the last such module in forward order; op and line with `cuts=\"ops\"`). An error where it explains an error")
def check_detached_output(trace, passes, tensors, cuts):
    if not passes:
        return []
    if all(p.forward_carried is None for p in passes.values()):
        return _detached_over_the_watch(trace, passes, cuts)
    memo = memo_of(trace)
    reached = _reached_by_comparable(trace, passes)
    union = covered_union(memo, passes.values())
    never = memo.get(("never", Ident(trace.params), union), _never_reached, memo, trace.params, union)
    by_module: Dict[str, Verdict] = {}
    returned = trace.meta.returned_by_model or ()
    for p in passes.values():
        if p.forward_carried is None or (p.failed and p.runs):
            continue  # a backward cut short by an exception: its figures are partial
        backward = "backward" in p.kinds
        # What the pass lost and which modules carried it out: kept per pass while reached and never stay.
        compared = reached[p.name] if backward else None
        candidates = memo.get(("detached", Ident(p), p.covered, compared, never, Ident(trace.params)),
                              _detached_candidates, p, never, compared, trace.params)
        if not candidates:
            continue
        order = forward_rank(p)
        cut_at = max(candidates, key=lambda m: order.get(m, -1))
        if cut_at in returned and p.covered:
            continue  # the model returned its output and the loss used others: unused (UNUSED_PARAMS), not cut
        found = by_module.get(cut_at)
        if found is not None:
            found.evidence["passes"].append(p.name)
            continue
        params = candidates[cut_at]
        if not trace.meta.compiled and set(params) <= set(p.undefined_grads or ()):
            continue  # in the backward graph, reached with None: not cut (UNUSED_PARAMS / NO_COVERAGE say why)
        shown = repr(cut_at) if cut_at else "the model (its root module)"
        upstream = [m for m in candidates if m != cut_at and order.get(m, -1) < order.get(cut_at, -1)]
        victims = sorted(q for m in upstream for q in candidates[m])
        op_cut = next((c for c in cuts if c.op is not None and c.kind in OUTPUT_CUTS
                       and c.pass_name in (p.name, None)), None)
        where = (f": {describe_cut(op_cut)}" if op_cut is not None else
                 "; gradtrace.watch(model, cuts=\"ops\") names the op and line that cut it"
                 if trace.meta.cuts != "ops" else "")
        also = (f"; the modules that fed it lost theirs too ({describe_params(victims, universe=trace.params)})"
                if victims else "")
        before = [] if victims else _reached_before(p, cut_at, order)
        evidence = {"module": cut_at, "parameters": params + victims, "pass": p.name, "passes": [p.name],
                    "upstream": upstream}
        if op_cut is not None:
            evidence.update({"op": op_cut.op, "location": op_cut.location})
        if before:
            evidence["reached_before"] = before
            message = (f"pass {p.name!r}: none of the {len(params)} parameter(s) of {shown} got a gradient, though "
                       f"it ran with grad, its output required grad and modules that ran before it "
                       f"({', '.join(repr(m) for m in before[:3])}) got theirs: its parameters were cut from its "
                       "output inside its forward (a weight re-wrapped in nn.Parameter(...), .detach()ed or read "
                       "through .data: a new leaf on every call), or its output was cut after it (a .detach() / "
                       f".data, argmax, a comparison or an integer cast){where}")
        else:
            message = (f"pass {p.name!r}: the output of {shown} never received a gradient: it ran with grad and its "
                       f"output required grad, yet none of its {len(params)} parameter(s) got one; it was cut after "
                       f"it (a .detach() / .data, argmax, a comparison or an integer cast) or not used by the "
                       f"loss{also}{where}")
        by_module[cut_at] = Verdict("DETACHED_OUTPUT", "warning", message, evidence)
    return list(by_module.values())


def _reached_before(p: PassTrace, module: str, order: Dict[str, int]) -> List[str]:
    """Modules that ran before ``module`` (not enclosing it) and got gradients while it got none, where no module
    that ran after it got any: the gradient passed through it to its input, its parameters were cut from its
    output inside it. (A module after it with gradients means a path around it: its output was cut.)"""
    here = order.get(module, -1)
    reached = [m for m in (p.forward_carried or ()) if not in_module(module, m)
               and any(in_module(q, m) for q in p.covered)]
    if any(order.get(m, -1) > here for m in reached):
        return []
    return [m for m in reached if order.get(m, -1) < here]


def _detached_over_the_watch(trace, passes, cuts):
    """Traces without per-pass forwards: modules that ran with grad over the watch, never reached."""
    ran = set(trace.meta.ran_with_grad or ())
    if not ran or not any(p.covered for p in passes.values()):
        return []
    reached = set().union(*(p.covered for p in passes.values()))
    out = []
    for module, params in _wholly_unreached_modules(trace.params, reached, ran).items():
        op_cut = next((c for c in cuts if c.op is not None and c.kind in OUTPUT_CUTS), None)
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


def _unreached(universe, reached: FrozenSet[str], gone: FrozenSet[str]) -> Tuple[str, ...]:
    return tuple(n for n in universe if n not in reached and n not in gone)


@verdict("UNUSED_PARAMS", rank=150, severities=("warning", "error"),
         meaning="trainable parameters that received no gradient in any pass (an error where it explains an error: DDP's 'Expected to have finished reduction'); says when they were in the backward graph and a backward returned None for them (a custom autograd.Function)")
def check_unused(trace, passes, tensors, cuts):
    if not passes or not any(p.covered for p in passes.values()):
        return []
    memo = memo_of(trace)
    reached = covered_union(memo, passes.values())
    gone = frozenset(replaced_params(trace))
    unused = list(memo.get(("unused", Ident(trace.params), reached, gone), _unreached, trace.params, reached, gone))
    if not unused:
        return []
    evidence = {"parameters": unused, "modules": list(group_by_module(unused, trace.params))}
    ignored = _outputs_the_loss_ignored(trace, unused)
    undefined = _undefined(passes.values(), set(unused))
    said = ""
    if undefined:
        evidence["undefined_grads"] = undefined
        said = "; " + _undefined_note(undefined, trace.params, of=unused, compiled=bool(trace.meta.compiled))
    elif ignored:
        evidence["returned_unused"] = ignored
        said = (f"; the model returns the output of {', '.join(repr(m) for m in ignored)} and no loss used it "
                "(an auxiliary head or an extra output): add it to the loss, or leave it out of the model "
                "(under DDP: find_unused_parameters=True)")
    return [Verdict("UNUSED_PARAMS", "warning",
                    f"{len(unused)} trainable parameter(s) received no gradient in any pass: "
                    f"{describe_params(unused, universe=trace.params)}{said}", evidence)]


def _outputs_the_loss_ignored(trace, unused: List[str]) -> List[str]:
    """Modules the model returned the output of, none of whose parameters got a gradient."""
    returned = trace.meta.returned_by_model
    if not returned:
        return []
    lost = set(unused)
    return sorted(m for m in returned
                  if m and (inside := [n for n in trace.params if in_module(n, m)]) and lost.issuperset(inside))


# Exceptions whose text says what went wrong with the gradient, and what that means.
FAILURE_HINTS = (
    ("does not require grad and does not have a grad_fn",
     "the loss carries no graph: it was computed under torch.no_grad() / inference_mode, from .detach()ed or "
     "integer (argmax, comparison) values, or with every trainable parameter frozen"),
    ("Expected to have finished reduction in the prior iteration",
     "DDP found parameters that got no gradient in the previous iteration (unused in the forward, or cut): "
     "make every parameter take part in the loss, or build DDP with find_unused_parameters=True"),
    ("modified by an inplace operation",
     "a tensor saved for backward was changed in place after it was saved (x += ..., relu_(inplace=True), "
     "writing into a slice); torch.autograd.set_detect_anomaly(True) names the forward op"),
    ("backward through the graph a second time",
     "a graph was reused after backward freed it: a tensor carried over from a previous step (a hidden state "
     "or a running loss) needs .detach(), or the first backward retain_graph=True"),
    ("grad can be implicitly created only for scalar outputs",
     "backward() was called on a loss that is not a scalar: reduce it (.mean() / .sum()) or pass gradient="),
    ("leaf Variable that requires grad is being used in an in-place operation",
     "a parameter (a leaf that requires grad) was changed in place with grad enabled: do manual updates "
     "under torch.no_grad()"),
    ("appears to not have been used in the graph",
     "autograd.grad was asked for an input the loss does not depend on (unused, cut or detached): pass "
     "allow_unused=True and read which ones came back None; the coverage here lists them"),
    ("Inference tensors cannot be saved for backward",
     "a tensor made under torch.inference_mode() (a cache filled during validation or generation) was used in "
     "a forward with grad"),
)


def failure_hint(error: Optional[str]) -> str:
    for marker, hint in FAILURE_HINTS:
        if error and marker in error:
            return hint
    return ""


@verdict("PASS_FAILED", rank=5, severities=("error",),
         meaning="a pass (or the watched block) ended with an exception: its backward did not complete; names the culprit where gradtrace knows it (an inference-mode cache and where it was made, an output changed in place after it was saved, the cut that left the loss without a graph, the parameters DDP waited for), else says what the error means; a finding that explains it ranks first")
def check_pass_failed(trace, passes, tensors, cuts):
    out = []
    error, error_cause = trace.meta.error, trace.meta.error_cause
    for p in passes.values():
        if p.failed:
            cause = p.failure or (error_cause if p.failed == error else None)
            out.append(Verdict("PASS_FAILED", "error", _failure_message(f"pass {p.name!r}", trace, p.name, p.failed,
                                                                        cause, cuts, "its backward did not complete, "
                                                                        "so its figures are partial"),
                               _with_cause({"pass": p.name, "error": p.failed}, cause)))
    if error and not out:
        out.append(Verdict("PASS_FAILED", "error", _failure_message("the watched block", trace, None, error, error_cause,
                                                                    cuts, "training did not complete"),
                           _with_cause({"pass": None, "error": error}, error_cause)))
    return out


def _with_cause(evidence: Dict[str, Any], cause) -> Dict[str, Any]:
    if cause is not None:
        evidence["cause"] = cause
    return evidence


def _failure_message(what: str, trace, pass_name, error: str, cause, cuts, otherwise: str) -> str:
    """The culprit first, where gradtrace knows it (the first line is what gets read); else what the error means."""
    culprit = forward.failure_lead(trace, pass_name, error, cause, cuts)
    if culprit:
        return f"{what} ended with an exception: {culprit} ({error})"
    hint = failure_hint(error)
    return f"{what} ended with an exception ({error}): {hint or otherwise}"


@verdict("FROZEN_WHILE_WATCHED", rank=15, severities=("error",),
         meaning="parameters that were trainable when `watch` began stopped requiring grad while watched")
def check_frozen_while_watched(trace, passes, tensors, cuts):
    names = trace.meta.frozen_while_watched
    if not names:
        return []
    moving = sorted({n for o in (getattr(trace, "optimizers", None) or {}).values() for n in o.drift} & set(names))
    still = (f"; yet the optimizer still changes {describe_params(moving)} (momentum or weight decay acting on a "
             "zero .grad left by zero_grad(set_to_none=False)): set their .grad to None, or take them out of the "
             "optimizer" if moving else "")
    return [Verdict("FROZEN_WHILE_WATCHED", "error",
                    f"{len(names)} parameter(s) stopped requiring grad while watched ({describe_params(names)}): "
                    "they can no longer train (requires_grad_(False), or a freeze after the optimizer was built)"
                    + still, {"parameters": names, **({"still_updated": moving} if moving else {})})]


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
    likely = trainable_cuts[-1] if trainable_cuts else None
    carried = sorted(trace.meta.ran_with_grad or ())
    if likely is not None:
        because = f"; likely cause: {describe_cut(likely)}. {_cut_fix(likely)}"
    elif carried:
        outer = min(carried, key=lambda m: (m.count(".") + bool(m), m))
        shown = repr(outer) if outer else "the model"
        because = (f"; {shown} ran with grad and its output required grad, so the loss was cut from it before "
                   "backward: .item() / float() / .numpy() / torch.tensor(...) rebuilt it (a list of outputs made "
                   "into a tensor: use torch.stack), a .detach() or .data, argmax / one_hot / a comparison on the "
                   "way, or backward never ran (an exception, a skipped step, a missing loss.backward())"
                   + _ops_rerun(trace))
    else:
        because = " (did backward run? an exception, a leaked torch.set_grad_enabled(False), frozen parameters)"
    evidence = {"forward_calls": forwards, "cuts": len(trainable_cuts)}
    if likely is not None:
        evidence.update({"kind": likely.kind, "module": likely.module, "location": likely.location})
    stepped = [o for o in (getattr(trace, "optimizers", None) or {}).values() if o.steps]
    if stepped:
        steps = sum(o.steps for o in stepped)
        because += (f". Meanwhile {', '.join(o.name for o in stepped)} stepped {steps} time(s) with no gradient to "
                    "apply: nothing trained")
        evidence["optimizer_steps"] = steps
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
