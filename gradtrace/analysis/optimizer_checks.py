"""Checks of what the optimizer did with the gradients (``trace.optimizers``, seen by global step hooks).

Half of the gradient bugs users report have healthy gradients: the optimizer
does not own the parameters, the step rounds away in bf16, the learning rate
is 0 or 1e-9, the clip ran on scaled gradients. An optimizer that never
stepped while watched gives no verdict.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from ..records import OptimizerRecord, Verdict
from .names import describe_params, display_name, group_by_module
from .registry import verdict

# An update-to-weight ratio ||dw|| / ||w|| per step: ~1e-3 is usual, 1e-5..1e-2 healthy. Below this in
# every step seen, the weights do not move in any useful sense (lr 1e-9, a schedule stuck near 0).
TINY_RATIO = 1e-7
# A scaler's scale below this hardly scales: a clip before unscaling would barely be wrong.
MIN_SCALE = 16.0


def _stepped(trace) -> List[OptimizerRecord]:
    return [o for o in (getattr(trace, "optimizers", None) or {}).values() if o.steps]


def params_in_no_optimizer(trace) -> List[str]:
    """Parameters that got a gradient (exactly zero included: LoRA A beside a zero B) but are in no param
    group of any optimizer that stepped."""
    stepped = _stepped(trace)
    if not stepped:
        return []
    owned = set().union(*(o.params for o in stepped))
    got = set()
    for p in trace.passes.values():
        got |= p.covered
    return [n for n in trace.params if n in got and n not in owned]


@verdict("NOT_IN_OPTIMIZER", rank=12, severities=("error",),
         meaning="parameters received gradients but are in no param group of any optimizer that stepped (built before they were unfrozen, or from another model copy): they never train")
def check_not_in_optimizer(trace, passes, tensors, cuts):
    outside = params_in_no_optimizer(trace)
    if not outside:
        return []
    stepped = _stepped(trace)
    names = ", ".join(o.name for o in stepped)
    none_watched = all(not o.params for o in stepped)
    why = (" (it holds none of the watched parameters: built before they existed or were unfrozen -- before "
           "get_peft_model(), say -- or from another copy of the model)" if none_watched else
           " (built before they were unfrozen, or from a filtered list?)")
    return [Verdict("NOT_IN_OPTIMIZER", "error",
                    f"{len(outside)} parameter(s) received gradients but are in no param group of the optimizer(s) "
                    f"that stepped ({names}){why}: {describe_params(outside, universe=trace.params)}. They never "
                    "train; build the optimizer after unfreezing, from the model being trained, or add them with "
                    "optimizer.add_param_group(...)",
                    {"parameters": outside, "optimizers": [o.name for o in stepped],
                     "modules": list(group_by_module(outside, trace.params))})]


def _lr_zero(o: OptimizerRecord) -> bool:
    known = [lr for lr in o.lrs if lr is not None]
    return bool(known) and all(lr == 0.0 for lr in known)


def _lr_text(o: OptimizerRecord) -> str:
    lrs = [lr for lr in o.lrs if lr is not None]
    if not lrs:
        return "lr unknown"
    distinct = sorted(set(lrs))
    return "lr " + ", ".join(f"{lr:.3e}" for lr in distinct[:4])


@verdict("WEIGHTS_UNCHANGED", rank=13, severities=("error",),
         meaning="optimizer steps with nonzero gradients left parameter values bitwise unchanged (bf16/fp16 weights where lr x update is below half an ulp; lr 0): parameters, dtype, lr")
def check_weights_unchanged(trace, passes, tensors, cuts):
    out = empty_steps(trace, passes)
    for o in _stepped(trace):
        frozen = [n for n, f in o.updates.items() if f[0] > 0 and f[1] == f[0]]
        if not frozen:
            continue
        judged = max(int(o.updates[n][0]) for n in frozen)
        lr_zero = _lr_zero(o)
        if lr_zero and judged < 2:
            continue  # one step at lr 0 is a warmup schedule's first step
        dtypes = sorted({o.dtypes.get(n, "?") for n in frozen})
        low = [d for d in dtypes if d in ("bfloat16", "float16")]
        if lr_zero:
            why = "its learning rate is 0 (a scheduler stuck at 0, or lr=0)"
        elif low:
            why = (f"the weights are {'/'.join(low)}: lr x update is below half an ulp of the weights, so every "
                   "update rounds away (keep float32 master weights: autocast or mixed precision instead of "
                   "model.to(bfloat16), or an optimizer with Kahan summation)")
        else:
            why = "the step produced no change (lr 0 in their param group, or an update that vanishes)"
        every = len(frozen) == len(o.updates)
        out.append(Verdict("WEIGHTS_UNCHANGED", "error",
                           f"optimizer {o.name} stepped {o.steps} time(s) on nonzero gradients, yet left "
                           f"{'every one of the ' if every else ''}{len(frozen)} parameter(s) "
                           f"({describe_params(frozen, universe=trace.params)}) bitwise unchanged "
                           f"({', '.join(dtypes)}, {_lr_text(o)}): {why}",
                           {"optimizer": o.name, "parameters": sorted(frozen), "dtypes": dtypes, "lrs": o.lrs,
                            "steps": o.steps, "low_precision": bool(low), "lr_zero": lr_zero}))
    return out


def empty_steps(trace, passes) -> List[Verdict]:
    """Every step of an optimizer came right after a pass that reached its parameters, yet had no gradient
    to apply: zero_grad() ran between backward() and step()."""
    out = []
    for o in _stepped(trace):
        if not o.empty_steps or o.empty_steps < o.steps:
            continue
        owned = set(o.params)
        reached = [(name, sorted((passes[name].covered - passes[name].zero) & owned))
                   for name in o.empty_passes if name in passes]
        reached = [(name, params) for name, params in reached if params]
        if not reached:
            continue
        name, params = reached[-1]
        out.append(Verdict("WEIGHTS_UNCHANGED", "error",
                           f"optimizer {o.name} stepped {o.steps} time(s) with no gradient to apply, although pass "
                           f"{name!r} had just given {len(params)} of its parameters nonzero gradients "
                           f"({describe_params(params, universe=trace.params)}): their .grad was cleared before "
                           "step() used it (optimizer.zero_grad() between backward() and step(), or step() called "
                           "before backward()); the order is zero_grad(), backward(), step()",
                           {"optimizer": o.name, "parameters": params, "pass": name, "steps": o.steps,
                            "cleared_before_step": True}))
    return out


def group_ratios(o: OptimizerRecord, universe) -> Dict[str, float]:
    """``{module group: ||update|| / ||weight||}`` at the latest step, from the sampled elements."""
    out: Dict[str, float] = {}
    for group, names in group_by_module(sorted(o.updates), universe).items():
        update = sum(o.updates[n][2] for n in names)
        weight = sum(o.updates[n][3] for n in names)
        if weight > 0:
            out[group] = (update / weight) ** 0.5
    return out


@verdict("TINY_UPDATES", rank=135, severities=("warning",),
         meaning="every optimizer step seen moved the weights by an update-to-weight ratio orders of magnitude below its usual range (~1e-3): lr 1e-9, a scheduler stuck near 0; the ratio per module group and the lr")
def check_tiny_updates(trace, passes, tensors, cuts):
    out = []
    for o in _stepped(trace):
        if not o.updates or o.max_ratio >= TINY_RATIO or _lr_zero(o):
            continue
        if o.max_ratio == 0.0 and any(d in ("bfloat16", "float16") for d in o.dtypes.values()):
            continue  # low-precision weights that never moved: WEIGHTS_UNCHANGED says why
        ratios = group_ratios(o, trace.params)
        # A group that starts at zero (LoRA B) moves relative to nothing: show the groups that stand still.
        still = {m: r for m, r in ratios.items() if r < TINY_RATIO} or ratios
        shown = ", ".join(f"{display_name(module)} {ratio:.1e}" for module, ratio in list(still.items())[:4])
        out.append(Verdict("TINY_UPDATES", "warning",
                           f"optimizer {o.name}: in each of its {o.steps} step(s) the weights moved by at most "
                           f"{o.max_ratio:.1e} of their norm{' (below their float resolution)' if not o.max_ratio else ''}"
                           f" (usual: ~1e-3), {_lr_text(o)}; per module: {shown}. "
                           "The learning rate (or its schedule) is far too small for anything to train",
                           {"optimizer": o.name, "max_ratio": o.max_ratio, "ratios": ratios, "lrs": o.lrs,
                            "steps": o.steps}))
    return out


def _clip_before_unscale(trace, o: OptimizerRecord) -> Optional[list]:
    """The first scaled step whose gradients were clipped while still scaled: [pass, norm, scale, raw]."""
    passes = trace.passes
    for pass_name, grad_norm, scale in o.scaled_steps:
        p = passes.get(pass_name) if pass_name is not None else None
        if p is None or scale < MIN_SCALE or not grad_norm or grad_norm != grad_norm:
            continue
        raw = p.total_norm  # the backward's own figures: the scaled gradients (read at run end)
        if not raw or raw != raw or raw == float("inf"):
            continue
        true_norm = raw / scale
        clipped_to = grad_norm * scale  # the max_norm the clip used, in scaled units
        if grad_norm < 0.5 * true_norm and grad_norm < 1e-2 and 1e-3 <= clipped_to <= 1e4:
            return [pass_name, grad_norm, scale, raw]
    return None


@verdict("CLIP_BEFORE_UNSCALE", rank=11, severities=("error",),
         meaning="gradients clipped (clip_grad_norm_) while still multiplied by a GradScaler's scale, before scaler.unscale_(optimizer): the clip sees norms ~scale x true and cuts nearly everything")
def check_clip_before_unscale(trace, passes, tensors, cuts):
    out = []
    for o in _stepped(trace):
        found = _clip_before_unscale(trace, o)
        if found is None:
            continue
        pass_name, grad_norm, scale, raw = found
        out.append(Verdict("CLIP_BEFORE_UNSCALE", "error",
                           f"pass {pass_name!r}: the gradients were clipped while still scaled by the GradScaler "
                           f"(scale {scale:.0f}): backward produced a total norm of {raw:.3e} ({raw / scale:.3e} "
                           f"unscaled), the clip cut it to {grad_norm * scale:.3g} in scaled units, so optimizer "
                           f"{o.name} stepped on {grad_norm:.3e}, {raw / scale / grad_norm:.1e}x smaller than the "
                           "true gradient. Call scaler.unscale_(optimizer) before torch.nn.utils.clip_grad_norm_",
                           {"pass": pass_name, "optimizer": o.name, "scale": scale, "grad_norm": grad_norm,
                            "backward_norm": raw}))
    return out
