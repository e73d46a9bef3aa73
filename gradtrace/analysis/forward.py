"""Analysis: what the forward and the module tree say beyond the gradients.

* where a pass's forward first went non-finite (``ForwardNonfinite``), as the lead of NONFINITE;
* the culprit behind a failed pass (``FailureCause``, and DDP's unfinished reduction read off the
  coverage of the passes before it), as the lead of PASS_FAILED;
* ``UNREGISTERED_MODULE``: modules that ran in the watched forward without being submodules;
* ``UNREGISTERED_PARAM``: tensors requiring grad held by the model's modules, not registered parameters;
* ``FREEZE_IGNORED``: a module "frozen" by a plain attribute ``requires_grad = False``;
* ``TIED_FROZEN``: one tensor under two names, frozen through the name that was not meant to freeze.

Pure Python over the records, like every check.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

from ..records import Cut, FailureCause, ForwardNonfinite, LooseTensor, PassTrace, UnregisteredModule, Verdict
from .cuts import describe_cut
from .names import describe_params
from .registry import verdict


# ---- the forward's first NaN/Inf -------------------------------------------------------------
def _module(name: Optional[str], module_type: str = "") -> str:
    label = f"module {name!r}" if name else "the root module"
    return f"{label} ({module_type})" if module_type else label


def _held(f: ForwardNonfinite) -> str:
    if f.nan and f.inf:
        return "NaN and inf"
    return "NaN" if f.nan else "inf"


def _overflow(f: ForwardNonfinite) -> str:
    if f.cause != "overflow":
        return ("has inf (a division by zero, a log of 0, an exp of a large value, or an input that already held "
                "inf)")
    limit = f"{f.dtype} max {f.dtype_max:g} exceeded" if f.dtype_max is not None else f"past {f.dtype}'s range"
    return f"has inf: {limit}"


def _nan_cause(f: ForwardNonfinite) -> str:
    if f.cause == "masked_softmax":
        return (f"has NaN from a fully masked softmax row (every score -inf): {f.mask} masks every position "
                "of a row (an empty sequence?)")
    hint = ""
    if f.largest is not None and f.dtype_max is not None and f.largest * f.largest > f.dtype_max:
        hint = (f" (values just before reached |x| = {f.largest:.3g} in {_module(f.largest_in)}: a product of two "
                f"such values passes {f.dtype}'s max {f.dtype_max:g}, and inf - inf or a softmax of inf is NaN)")
    return f"has NaN{hint}"


def describe_origin(f: ForwardNonfinite) -> str:
    """One clause: where the forward first held NaN/Inf and what made it."""
    what = _nan_cause(f) if f.nan else _overflow(f)
    if f.site == "op":
        where = f" in {_module(f.module, f.module_type)}" if f.module else ""
        return f"op {f.op} at {f.location}{where}: its output {what}"
    if f.site == "input":
        after = f", after {f.after!r}" if f.after and f.after != f.made_by else ""
        return (f"the code of {_module(f.made_by, f.made_by_type)} itself (between its submodules{after}): the "
                f"value it passed to {_module(f.module, f.module_type)} {what}; run under cuts=\"ops\" to name "
                f"the op")
    return f"{_module(f.module, f.module_type)} output {what}"


def forward_lead(p: PassTrace) -> str:
    """NONFINITE's opening for a pass: where its forward first held NaN/Inf ("" when not known)."""
    f = p.forward_nonfinite
    return f"the forward first went non-finite in {describe_origin(f)}; then " if f is not None else ""


def forward_finite_note(p: PassTrace) -> str:
    if p.forward_nonfinite is None and p.forward_checked:
        return (f"; every module output of the forward was finite ({p.forward_checked} checked): "
                "the NaN/Inf is born in backward, or in code outside the modules (the loss: a log of 0, "
                "a division by 0)")
    return ""


# ---- a failed pass's culprit ----------------------------------------------------------------
def describe_failure(cause: Optional[FailureCause]) -> str:
    """The culprit behind a failure, as the opening of PASS_FAILED ("" when none was found)."""
    if cause is None:
        return ""
    if cause.kind == "inference_tensor" and cause.module is not None and cause.attribute is None:
        used = f" that {_module(cause.other, cause.other_type)} tried to save for backward" if cause.other else ""
        variable = f" ({cause.variable!r})" if cause.variable else ""
        at = f" at {cause.location}" if cause.location else ""
        return (f"{_module(cause.module, cause.module_type)} ran under torch.inference_mode(){at} inside a forward "
                f"with grad: its output{variable} is an inference tensor{used}; run it under torch.no_grad() "
                f"instead (and freeze it if it should not train), or clone its output")
    if cause.kind == "inference_tensor":
        held = f" ({cause.attribute})" if cause.attribute else ""
        made = (f"made under torch.inference_mode() at {cause.location}" if cause.location
                else "made under torch.inference_mode() before the watch began")
        used = f", used by {_module(cause.other, cause.other_type)}" if cause.other else ""
        variable = f" as {cause.variable!r}" if cause.variable else ""
        return (f"{_module(cause.module, cause.module_type)} holds a cached inference tensor{held}, {made}, and "
                f"a forward with grad reused it{used}{variable}; build the cache under torch.no_grad() instead, "
                f"or clone it")
    if cause.kind == "inplace" and cause.module is None:  # the op ran in a forward's own code, not as a module
        what = f" ({cause.tensor})" if cause.tensor else ""
        return (f"a tensor saved for backward{what} was then modified in place by "
                f"{_module(cause.other, cause.other_type)}, built with inplace=True; make it out of place "
                f"(inplace=False)")
    if cause.kind == "inplace":
        by = f" by {_module(cause.other, cause.other_type)}" if cause.other else ""
        what = f" ({cause.tensor})" if cause.tensor else ""
        return (f"the output of {_module(cause.module, cause.module_type)}{what} was saved for backward, then "
                f"modified in place{by}; make that step out of place (inplace=False, x = x + ... )")
    if cause.kind == "no_graph":
        dtype = f" an integer ({cause.dtype}) loss: argmax, a comparison or round made it" \
            if cause.dtype and not cause.dtype.startswith(("float", "bfloat", "complex")) else " a loss with no graph"
        last = (f"; the last module whose output carried a gradient was {_module(cause.module, cause.module_type)}"
                ", so the graph was cut after it (an argmax/comparison, .detach(), .item(), torch.tensor(...) or "
                "no_grad in the loss)") if cause.module is not None else \
            "; no module output carried a gradient (every parameter frozen, or the forward ran under no_grad)"
        return f"backward was called on{dtype}{last}"
    return ""


def unused_before(passes: Dict[str, PassTrace], failed: Optional[str], params) -> List[str]:
    """The parameters the last finished pass before ``failed`` (None: the last one) did not reach."""
    before = None
    for name, p in passes.items():
        if name == failed:
            break
        if not p.failed and p.covered:
            before = p
    return [n for n in params if n not in before.covered] if before is not None else []


def _cut_in(cuts: List[Cut], pass_name: Optional[str]) -> Optional[Cut]:
    """The latest cut that leaves a loss without a graph, seen in the failed pass (or outside any pass)."""
    found = [c for c in cuts if c.pass_name in (pass_name, None)
             and c.kind in ("non_differentiable", "detach", "no_grad", "inference_mode")]
    return max(found, key=lambda c: c.seq) if found else None


def failure_lead(trace, pass_name: Optional[str], error: str, cause: Optional[FailureCause], cuts) -> str:
    """The culprit of a failure, where gradtrace knows it: the opening of PASS_FAILED ("" when unknown)."""
    if "finished reduction in the prior iteration" in error:
        unused = unused_before(trace.passes, pass_name, trace.params)
        if unused:
            return (f"DDP's reduction waited on {len(unused)} parameter(s) that got no gradient in the previous "
                    f"iteration: {describe_params(unused, universe=trace.params)} (unused in the loss, e.g. an "
                    "auxiliary head); use them in the loss or build DDP with find_unused_parameters=True")
    if "does not require grad and does not have a grad_fn" in error:
        cut = _cut_in(cuts, pass_name)
        if cut is not None:
            return f"backward was called on a loss with no graph: {describe_cut(cut)}"
    return describe_failure(cause)


# ---- UNREGISTERED_MODULE ---------------------------------------------------------------------
def _held_where(m: UnregisteredModule) -> str:
    if m.attribute is not None:
        owner = f"module {m.owner!r}" if m.owner else "the root module"
        return f"in the plain {m.container or 'Python'} `self.{m.attribute}` of {owner}"
    return "outside the module tree (made on the fly, or held where gradtrace could not find it)"


def _trains_unseen(m: UnregisteredModule) -> bool:
    """Trainable parameters that took part with grad enabled and that no optimizer gradtrace knows holds."""
    return bool(m.trainable and m.with_grad and not m.in_optimizer)


def _listed(group: List[UnregisteredModule]) -> str:
    names = [m.module for m in group]
    shown = ", ".join(map(repr, names[:4])) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    types = ", ".join(dict.fromkeys(m.module_type for m in group))
    return f"module {shown} ({types})" if len(group) == 1 else f"{len(group)} modules {shown} ({types})"


@verdict("UNREGISTERED_MODULE", rank=16, severities=("error", "warning"),
         meaning="modules with parameters that ran inside the watched model's forward but are not its submodules "
                 "(kept in a plain list/dict): their parameters are in no `model.parameters()`, optimizer or "
                 "state dict; an error when they require grad and took part with grad enabled")
def check_unregistered(trace, passes, tensors, cuts):
    groups: Dict[tuple, List[UnregisteredModule]] = {}
    for m in trace.meta.unregistered_modules or ():
        if m.params:
            key = (m.owner, m.attribute, m.called_in if m.attribute is None else None, _trains_unseen(m))
            groups.setdefault(key, []).append(m)
    out = []
    for (_, _, _, trains), group in groups.items():
        first = group[0]
        fix = "hold them in nn.ModuleList / nn.ModuleDict (or assign each as an attribute)"
        if trains:
            trainable = sum(m.trainable for m in group)
            got = " and received gradients that nothing applies" if any(m.got_grad for m in group) else ""
            message = (f"{_listed(group)} ran in the forward but {'is' if len(group) == 1 else 'are'} not "
                       f"registered: {_held_where(first)}, so {trainable} trainable parameter(s) are in no "
                       f"model.parameters(), optimizer or state dict{got}: they never train; {fix}")
        else:
            why = ("their parameters are in the optimizer" if any(m.in_optimizer for m in group) else
                   "their parameters do not require grad, or they ran without grad")
            message = (f"{_listed(group)} ran in the forward but {'is' if len(group) == 1 else 'are'} not "
                       f"registered ({_held_where(first)}): {why}, but state_dict(), .to(device) and "
                       f".train()/.eval() do not reach them; {fix}")
        out.append(Verdict("UNREGISTERED_MODULE", "error" if trains else "warning", message,
                           {"modules": [m.module for m in group], "module_type": first.module_type,
                            "owner": first.owner, "attribute": first.attribute,
                            "params": sum(m.params for m in group), "trainable": sum(m.trainable for m in group),
                            "got_grad": any(m.got_grad for m in group)}))
    return out


# ---- UNREGISTERED_PARAM ----------------------------------------------------------------------
def _holder(t: LooseTensor) -> str:
    owner = f"module {t.owner!r}" if t.owner else "the root module"
    if t.container is None:
        return f"`self.{t.attribute}` of {owner}"
    return f"the plain {t.container} `self.{t.attribute}` of {owner}"


def _loose_fix(group: List[LooseTensor]) -> str:
    first = group[0]
    if first.container is None:
        return f"make it a parameter: self.{first.attribute} = nn.Parameter(...)"
    kind = "nn.ParameterDict (string keys) or nn.ParameterList" if first.container == "dict" else "nn.ParameterList"
    return f"hold them in {kind}"


@verdict("UNREGISTERED_PARAM", rank=18, severities=("error", "warning", "info"),
         meaning="tensors that require grad, held by the model's modules (an attribute, a plain list/dict) but not "
                 "registered as parameters: in no `model.parameters()`, optimizer built from it, or state dict; an "
                 "error when backward gave them gradients and no optimizer that stepped holds them")
def check_loose_tensors(trace, passes, tensors, cuts):
    groups: Dict[tuple, List[LooseTensor]] = {}
    for t in trace.meta.loose_tensors or ():
        groups.setdefault((t.owner, t.attribute), []).append(t)
    out = []
    for group in groups.values():
        first, n = group[0], len(group)
        what = (f"tensor {first.name!r} (shape {list(first.shape)})" if n == 1 else
                f"{n} tensors {', '.join(repr(t.name) for t in group[:4])}{' ...' if n > 4 else ''}")
        one = n == 1
        they, them, are = ("it", "it", "is") if one else ("they", "them", "are")
        if all(t.is_parameter for t in group):
            kind = "an nn.Parameter" if one else "nn.Parameter objects"
        else:
            kind = "a plain tensor" if one else "plain tensors"
        held = (f"{what} {'requires' if one else 'require'} grad and {are} held in {_holder(first)} as {kind}, "
                "which nn.Module does not register")
        got = any(t.got_grad for t in group)
        in_optimizer = [t.in_optimizer for t in group]
        copies = [t.copy_of for t in group if t.copy_of]
        if len(copies) == n and not any(o is True for o in in_optimizer):
            severity = "warning"  # a frozen copy (an anchor, a reference) that was left requiring grad
            shown = ", ".join(repr(c) for c in copies[:3]) + (" ..." if n > 3 else "")
            message = (f"{held}: {they} {are} {'a copy' if one else 'copies'} of {shown} (an anchor or reference "
                       f"kept for a penalty?) yet {'requires' if one else 'require'} grad, so backward computes "
                       f"{'a gradient' if one else 'gradients'} nothing applies; detach {them} "
                       f"(.detach() or requires_grad_(False)) if {they} {are} constant, or {_loose_fix(group)} if "
                       f"{they} should train")
        elif got and all(o is False for o in in_optimizer):
            severity = "error"
            message = (f"{held}: backward gave {them} {'a gradient' if one else 'gradients'}, but {they} {are} in "
                       f"no model.parameters() and no optimizer that stepped holds {them}: {they} never "
                       f"{'trains' if one else 'train'}; {_loose_fix(group)}")
        elif all(o is True for o in in_optimizer):
            severity = "info"
            message = (f"{held}: {they} {'trains' if one else 'train'} (the optimizer was given {them}), but "
                       f"state_dict(), .to(device) and model.parameters() do not reach {them}; {_loose_fix(group)}")
        else:
            severity = "warning"
            message = (f"{held}: {they} {are} in no model.parameters(), so an optimizer built from it does not "
                       f"train {them} and gradtrace does not watch {them}; {_loose_fix(group)}")
        out.append(Verdict("UNREGISTERED_PARAM", severity, message,
                           {"tensors": [t.name for t in group], "owner": first.owner, "attribute": first.attribute,
                            "container": first.container, "got_grad": got, "copies_of": copies}))
    return out


# ---- FREEZE_IGNORED --------------------------------------------------------------------------
@verdict("FREEZE_IGNORED", rank=19, severities=("warning",),
         meaning="a module given a plain attribute `requires_grad = False` (`model.encoder.requires_grad = False`): "
                 "nn.Module has no such switch, so its parameters still require grad and train; "
                 "`requires_grad_(False)` freezes")
def check_ignored_freezes(trace, passes, tensors, cuts):
    out = []
    for f in trace.meta.ignored_freezes or ():
        shown = f"module {f.module!r}" if f.module else "the model (its root module)"
        got = " and got gradients" if f.got_grad else ""
        last = f.module.rsplit(".", 1)[-1] if f.module else "model"
        call = f"{last}.requires_grad_(False)" if last.isidentifier() else "the module's .requires_grad_(False)"
        out.append(Verdict("FREEZE_IGNORED", "warning",
                           f"{shown} ({f.module_type}) was set requires_grad = False as a plain attribute, which "
                           f"freezes nothing: its {f.trainable} parameter(s) still require grad{got}; "
                           f"freeze it with {call}",
                           {"module": f.module, "trainable": f.trainable, "got_grad": f.got_grad}))
    return out


# ---- TIED_FROZEN -----------------------------------------------------------------------------
# Module names that say "this is trained" when the rest of a model is frozen: heads and classifiers.
_MEANT_TO_TRAIN = re.compile(r"(^|[._])(lm_head|head|heads|classifier|score|cls|decoder|output_projection|"
                             r"embed_out|proj_out)([._]|$)", re.IGNORECASE)
# Trainable parameters of adapters (peft's LoRA, prompt tuning): with them, a frozen head is the plan.
_ADAPTER = re.compile(r"(^|[._])(lora_\w+|adapter\w*|prompt_encoder|prefix_encoder|ia3_\w+)([._]|$)", re.IGNORECASE)


def _meant_to_train(name: str, trainable: List[str]) -> Optional[str]:
    """Why a frozen name looks meant to train: a sibling parameter that trains, or a head-like module in a
    model that trains its own weights (not adapters, which freeze every head on purpose)."""
    module = name.rpartition(".")[0]
    siblings = [n for n in trainable if n.rpartition(".")[0] == module]
    if siblings:
        return f"{siblings[0]!r} in the same module trains"
    if _MEANT_TO_TRAIN.search(module) and not any(_ADAPTER.search(n) for n in trainable):
        return f"{module!r} is named like a part that is trained, and no adapter is"
    return None


@verdict("TIED_FROZEN", rank=17, severities=("warning",),
         meaning="a frozen parameter tied to another (one tensor under two names, e.g. `lm_head.weight` and "
                 "`wte.weight`): freezing one froze both, while the other's module looks meant to train")
def check_tied_frozen(trace, passes, tensors, cuts):
    trainable = list(trace.params)
    out = []
    for tied in trace.meta.tied_params or ():
        if tied.requires_grad:
            continue
        for name in tied.names:
            why = _meant_to_train(name, trainable)
            if why is None:
                continue
            twins = [n for n in tied.names if n != name]
            out.append(Verdict(
                "TIED_FROZEN", "warning",
                f"{name!r} is frozen because it is the same tensor as {', '.join(map(repr, twins))} (tied weights): "
                f"freezing one froze both, but {why}. Untie them (e.g. tie_word_embeddings=False) or unfreeze the "
                f"tensor through either name",
                {"parameter": name, "tied_to": twins, "names": list(tied.names)}))
            break
    return out
