"""Checks of what the optimizer did with the gradients (``trace.optimizers``, seen by global step hooks).

Half of the gradient bugs users report have healthy gradients: the optimizer
does not own the parameters, the step rounds away in bf16, the learning rate
is 0 or 1e-9, the clip ran on scaled gradients. An optimizer that never
stepped while watched gives no verdict.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..records import OptimizerRecord, Verdict
from .memo import Ident, covered_union, memo_of
from .names import describe_params, display_name, group_by_module
from .registry import verdict

# An update-to-weight ratio ||dw|| / ||w|| per step: ~1e-3 is usual, 1e-5..1e-2 healthy. Below this in
# every step seen, the weights do not move in any useful sense (lr 1e-9, a schedule stuck near 0).
TINY_RATIO = 1e-7
# A scaler's scale below this hardly scales: a clip before unscaling would barely be wrong.
MIN_SCALE = 16.0
# A learning-rate schedule that decays to nothing: steps whose lr is below this share of the largest lr
# before them, and whose update-to-weight ratio is below ``DECAYED_RATIO`` of the largest before them
# (an lr 1e-4 times smaller moves Adam's weights ~1e-4 times less), over at least ``DECAYED_SHARE`` of
# the steps seen, through the latest. A cosine or linear decay to 0 spends well under 1% of its steps
# below 1e-4 of its peak; StepLR(step_size=1, gamma=0.1) stepped per batch spends all but its first four.
DECAYED_LR = 1e-4
DECAYED_RATIO = 1e-3
DECAYED_SHARE = 0.25


def _stepped(trace) -> List[OptimizerRecord]:
    return [o for o in (getattr(trace, "optimizers", None) or {}).values() if o.steps]


def params_in_no_optimizer(trace) -> List[str]:
    """Parameters that got a gradient (exactly zero included: LoRA A beside a zero B) but are in no param
    group of any optimizer that stepped."""
    stepped = _stepped(trace)
    if not stepped or (trace.meta.wrapper == "DeepSpeed" and trace.meta.zero_stage != 0):
        # DeepSpeed ZeRO's optimizer steps on its own flat fp32 partitions, never on the module's parameters
        return []
    memo = memo_of(trace)
    got = covered_union(memo, trace.passes.values())
    owners = tuple((o.name, tuple(o.params)) for o in stepped)

    def outside() -> List[str]:
        owned = set().union(*(params for _, params in owners))
        return [n for n in trace.params if n in got and n not in owned]

    return list(memo.get(("no_optimizer", Ident(trace.params), got, owners), outside))


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
         meaning="optimizer steps with nonzero gradients left parameter values bitwise unchanged (bf16/fp16 weights where lr x update is below half an ulp; lr 0; `zero_grad()` between backward and step), in every step or from step k on (a schedule that reached lr 0 early: a wrong `num_training_steps`): parameters, dtype, lr")
def check_weights_unchanged(trace, passes, tensors, cuts):
    part_way = frozen_part_way(trace)
    out = empty_steps(trace, passes) + part_way
    said = {v.evidence["optimizer"] for v in part_way}
    for o in _stepped(trace):
        frozen = [n for n, f in o.updates.items() if f[0] > 0 and f[1] == f[0]]
        if not frozen or o.name in said:  # parameters first moved in the steps before: the part-way finding
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
            why = _vanished(o, frozen, passes) or \
                "the step produced no change (lr 0 in their param group, or an update that vanishes)"
        every = len(frozen) == len(o.updates)
        out.append(Verdict("WEIGHTS_UNCHANGED", "error",
                           f"optimizer {o.name} stepped {o.steps} time(s) on nonzero gradients, yet left "
                           f"{'every one of the ' if every else ''}{len(frozen)} parameter(s) "
                           f"({describe_params(frozen, universe=trace.params)}) bitwise unchanged "
                           f"({', '.join(dtypes)}, {_lr_text(o)}): {why}",
                           {"optimizer": o.name, "parameters": sorted(frozen), "dtypes": dtypes, "lrs": o.lrs,
                            "steps": o.steps, "low_precision": bool(low), "lr_zero": lr_zero}))
    return out


# float32 resolves about 6e-8 of a weight: an update below ~1e-8 rounds away on weights of size ~0.1.
_VANISHING = 1e-8


def _vanished(o: OptimizerRecord, frozen: List[str], passes) -> str:
    """Why float32 weights did not move under a nonzero lr, when their gradients say so: the gradients vanish."""
    lr = max((x for x in o.lrs if x), default=None) if o.lrs else None
    stepped = [passes[name] for name in (o.passes or ()) if name in passes]
    largest = max((r.max_abs for p in stepped for n in frozen if (r := p.records.get(n)) is not None), default=None)
    if lr is None or largest is None or not largest or lr * largest >= _VANISHING:
        return ""
    return (f"their gradients vanish: the largest |g| among them is {largest:.1e}, so lr x |g| <= {lr * largest:.1e}, "
            "below what float32 weights resolve; the gradient flow is the fault, not the optimizer (a deep stack "
            "of saturating activations such as sigmoid/tanh, or a bad initialisation: use ReLU/GELU, "
            "normalisation, residual connections or a better init)")


def _frozen_from(o: OptimizerRecord) -> Optional[Tuple[int, List[List[Optional[float]]]]]:
    """The steps that end the watch, each of which left the weights unchanged although their gradients were
    nonzero (every sampled element with a nonzero gradient bitwise the same, or, not measured, an lr of 0):
    (the first of them, their history rows); None when the latest step moved the weights."""
    history = o.history
    k = len(history)
    while k > 0 and _left_unchanged(history[k - 1]):
        k -= 1
    if k == len(history):
        return None
    return int(history[k][0]), history[k:]


def _left_unchanged(row: List[Optional[float]]) -> bool:
    _, lr, ratio, moved, unchanged = row
    if moved:
        return unchanged == moved
    return lr == 0.0 and ratio is None  # not measured (updates=False): an lr of 0 moves nothing


def frozen_part_way(trace) -> List[Verdict]:
    """Steps from k on (k > 1, at least two of them) that left the weights unchanged: a schedule that
    reached lr 0 early (a wrong num_training_steps / t_total), or updates that round away."""
    out = []
    for o in _stepped(trace):
        found = _frozen_from(o)
        if found is None:
            continue
        first, rows = found
        count = o.steps - first + 1
        if first < 2 or count < 2:
            continue  # from the first step on: check_weights_unchanged; one last step: nothing lost
        lr_zero = all(row[1] == 0.0 for row in rows)
        measured = any(row[3] for row in rows)
        before = [row[1] for row in o.history if row[0] < first and row[1] is not None]
        was = f" (it was {max(before):.3e} before)" if before and max(before) > 0 else ""
        did_not = "the weights did not change" if measured else "no step can change a weight"
        if lr_zero:
            what = (f"its lr is 0.0{was} and {did_not}, although the gradients were nonzero: the learning-rate "
                    "schedule reached 0 early (get_linear_schedule_with_warmup / get_cosine_schedule_with_warmup "
                    "or a LambdaLR given a num_training_steps / t_total smaller than the steps run?). Give the "
                    "scheduler the real number of optimizer steps (epochs x batches / accumulation)")
        else:
            dtypes = sorted({o.dtypes.get(n, "?") for n in o.updates})
            what = (f"the weights did not change although the gradients were nonzero ({', '.join(dtypes)}, "
                    f"{_lr_text(o)}): the schedule made lr x update smaller than half an ulp of the weights")
        out.append(Verdict("WEIGHTS_UNCHANGED", "error",
                           f"optimizer {o.name}: from step {first} on ({count} of {o.steps} steps), {what}",
                           {"optimizer": o.name, "from_step": first, "steps": o.steps, "frozen_steps": count,
                            "lrs": o.lrs, "lr_zero": lr_zero, "parameters": sorted(o.updates),
                            "low_precision": False}))
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
        zeroed = o.zeroed_steps >= o.empty_steps  # .grad still there at every step, but zero
        how = ("was still there but zero when step() ran: it was zeroed in place between backward() and step() "
               "(optimizer.zero_grad(set_to_none=False) there, clip_grad_norm_(..., max_norm=0), or the gradients "
               "multiplied by 0); nothing may zero .grad between backward() and step()" if zeroed else
               "was cleared before step() used it (optimizer.zero_grad() between backward() and step(), or step() "
               "called before backward()); the order is zero_grad(), backward(), step()")
        out.append(Verdict("WEIGHTS_UNCHANGED", "error",
                           f"optimizer {o.name} stepped {o.steps} time(s) with no gradient to apply, although pass "
                           f"{name!r} had just given {len(params)} of its parameters nonzero gradients "
                           f"({describe_params(params, universe=trace.params)}): their .grad {how}",
                           {"optimizer": o.name, "parameters": params, "pass": name, "steps": o.steps,
                            "cleared_before_step": not zeroed, "zeroed_before_step": zeroed}))
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
         meaning="every optimizer step seen moved the weights by an update-to-weight ratio orders of magnitude below its usual range (~1e-3): lr 1e-9, a scheduler stuck near 0; the ratio per module group and the lr. Or, from step k on, for a quarter of the steps or more, lr and updates fell 1e-4 / 1e-3 below their peak (a scheduler meant per epoch stepped per batch)")
def check_tiny_updates(trace, passes, tensors, cuts):
    out = decayed_part_way(trace)
    for o in _stepped(trace):
        if not o.updates or o.max_ratio >= TINY_RATIO or _lr_zero(o) or o.nonfinite_steps \
                or _stepped_on_nonfinite(trace, o):
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


def _decayed_from(o: OptimizerRecord) -> Optional[Tuple[int, float, float, int, Optional[float]]]:
    """The steps that end the watch whose lr and update fell orders of magnitude below the largest before
    them: (the first of them, the peak lr, the latest lr, the peak lr's step, the largest ratio before)."""
    history = o.history
    peaks = []  # (largest lr before, its step, largest ratio before), per row
    peak_lr, peak_step, peak_ratio = 0.0, 0, 0.0
    for row in history:
        peaks.append((peak_lr, peak_step, peak_ratio))
        step, lr, ratio = row[0], row[1], row[2]
        if lr is not None and lr > peak_lr:
            peak_lr, peak_step = lr, int(step)
        if ratio is not None and ratio > peak_ratio:
            peak_ratio = ratio
    k = len(history)
    while k > 0 and _decayed(history[k - 1], *peaks[k - 1]):
        k -= 1
    if k == len(history):
        return None
    first_lr, first_step, first_ratio = peaks[k]
    return int(history[k][0]), first_lr, history[-1][1], first_step, first_ratio or None


def _decayed(row: List[Optional[float]], peak_lr: float, peak_step: int, peak_ratio: float) -> bool:
    _, lr, ratio, _, _ = row
    if lr is None or not lr > 0.0 or not peak_lr > 0.0 or lr > DECAYED_LR * peak_lr:
        return False
    return ratio is None or ratio < TINY_RATIO or (peak_ratio > 0 and ratio <= DECAYED_RATIO * peak_ratio)


def decayed_part_way(trace) -> List[Verdict]:
    """A schedule whose lr fell by orders of magnitude for a large share of the steps, through the latest."""
    out = []
    for o in _stepped(trace):
        found = _decayed_from(o)
        if found is None:
            continue
        first, peak_lr, latest_lr, peak_step, peak_ratio = found
        count = o.steps - first + 1
        if count < 2 or count < DECAYED_SHARE * o.steps:
            continue
        latest_ratio = o.history[-1][2]
        moved = (f" and the weights moved by {latest_ratio:.1e} of their norm in the latest step"
                 + (f" ({peak_ratio:.1e} at most before)" if peak_ratio else "")
                 if latest_ratio is not None else "")
        out.append(Verdict("TINY_UPDATES", "warning",
                           f"optimizer {o.name}: from step {first} on ({count} of {o.steps} steps) its lr fell to "
                           f"{latest_lr:.1e}, {latest_lr / peak_lr:.0e} of the {peak_lr:.1e} it had at step "
                           f"{peak_step}{moved}: the learning-rate schedule decays far too fast for anything to "
                           "train (a scheduler meant to step once per epoch, StepLR / ExponentialLR / "
                           "MultiStepLR, stepped once per batch?)",
                           {"optimizer": o.name, "from_step": first, "steps": o.steps, "decayed_steps": count,
                            "peak_lr": peak_lr, "lr": latest_lr, "lrs": o.lrs, "max_ratio": o.max_ratio,
                            "latest_ratio": latest_ratio}))
    return out


def nonfinite_updates(trace) -> List[Verdict]:
    """NONFINITE's share for optimizer steps: finite weights with finite gradients that a step made NaN/Inf."""
    out = []
    for o in _stepped(trace):
        if not o.nonfinite_steps:
            continue
        step, pass_name, params, count = o.nonfinite_steps[0]
        dtypes = sorted({o.dtypes.get(n, "?") for n in params})
        low = [d for d in dtypes if d in ("float16", "bfloat16")]
        adam = "adam" in o.name.lower()
        if low and adam:
            why = (f"the weights are {'/'.join(low)} and Adam's eps (1e-8 by default) is 0 in float16, so where "
                   "a gradient is small its second moment underflows and the update divides by zero. Keep float32 "
                   "master weights (autocast / mixed precision instead of model.half()), or set eps >= 1e-4")
        elif low:
            why = (f"the weights are {'/'.join(low)}: the update overflowed their range (keep float32 master "
                   "weights: autocast / mixed precision instead of model.half())")
        else:
            why = f"the update overflowed ({_lr_text(o)}: too large an lr, or a division by ~0 in the optimizer)"
        after = f" on the gradients of pass {pass_name!r}" if pass_name else ""
        out.append(Verdict("NONFINITE", "error",
                           f"optimizer {o.name}: its step {int(step)}{after} turned finite weights NaN/Inf although "
                           f"their gradients were finite ({int(count)} sampled element(s) of "
                           f"{describe_params(params, universe=trace.params)}, {', '.join(dtypes)}): {why}; every "
                           "later gradient is NaN because of it",
                           {"optimizer": o.name, "step": step, "pass": pass_name, "parameters": list(params),
                            "dtypes": dtypes, "updates": True}))
    return out


def _stepped_on_nonfinite(trace, o: OptimizerRecord) -> bool:
    """Did it step on NaN/Inf gradients? Then its weights became NaN: not a tiny update (NONFINITE says it)."""
    passes = trace.passes
    return any(name in passes and passes[name].nonfinite for name in o.passes)


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
