"""Testing helpers: assert that gradients reach every parameter they should.

    from gradtrace.testing import assert_grads_flow

    def test_adapters_train():
        assert_grads_flow(model, lambda m, x: m(x).logits.mean(), batch,
                          frozen=["base.*"], allow_zero=["*.lora_A"])

``loss_fn(model, *args, **kwargs)`` returns the scalar loss; the helper runs it
and ``.backward()`` once under ``gradtrace.watch`` and raises ``AssertionError``
whose message is the diagnosis. The model's ``.grad`` tensors are put back as
they were, so the check can sit in the middle of a training test.

For pytest there is the fixture ``gradtrace_flow`` (the same function): add
``pytest_plugins = ["gradtrace.pytest_plugin"]`` to a conftest.py.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set

import torch
from torch import nn

from .analysis.names import describe_params
from .errors import GradtraceError
from .render.text import safe

PASS = "grads_flow"


def assert_grads_flow(model: nn.Module, loss_fn: Callable[..., torch.Tensor], *args,
                      params: Optional[Sequence[str]] = None, frozen: Iterable[str] = (),
                      allow_zero: Iterable[str] = (), **kwargs):
    """Run ``loss_fn(model, *args, **kwargs).backward()`` once; fail unless every checked parameter got a gradient.

    ``params``: glob patterns (``fnmatch``, on ``named_parameters()`` names) of
    the parameters to check; None checks every trainable one. ``frozen``:
    patterns of parameters that must *not* receive a gradient (a head frozen by
    design): they are not checked for flow, and fail if a gradient reaches
    them. ``allow_zero``: patterns whose gradient may be exactly zero (LoRA's
    ``lora_A`` while ``lora_B`` is still zero). A checked parameter fails when
    backward never reached it, when its gradient is exactly zero, or when it
    holds NaN/Inf. Returns the trace on success.
    """
    __tracebackhide__ = True  # pytest: show the caller's line, not this frame
    from .live import watch

    if not isinstance(model, nn.Module):
        raise GradtraceError(f"assert_grads_flow takes an nn.Module first, got {type(model).__name__}")
    if not callable(loss_fn):
        raise GradtraceError(f"assert_grads_flow(model, loss_fn, ...): loss_fn is called as loss_fn(model, *args, "
                             f"**kwargs) and returns the loss; got {type(loss_fn).__name__}")
    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    frozen_names = _matching(named, frozen, "frozen")
    checked = [n for n in _selected(trainable, params) if n not in frozen_names]
    saved = _clear_grads(named.values())
    try:
        with watch(model, cuts="ops") as trace:  # a test can afford op-level cut detection: it names the op
            with trace.pass_(PASS):
                loss = loss_fn(model, *args, **kwargs)
                _check_loss(loss, trace)
                loss.backward()
    finally:
        _restore_grads(saved)
    failures = _failures(trace.passes[PASS], checked, frozen_names & set(trainable),
                         _matching(named, allow_zero, "allow_zero"))
    if failures:
        # Parameter names and cut locations can hold anything a ModuleDict key can: escaped as report() does.
        raise AssertionError(safe(_message(failures, len(checked), trace)))
    return trace


def _selected(trainable: List[str], patterns: Optional[Sequence[str]]) -> List[str]:
    if patterns is None:
        return trainable
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen = _matching(dict.fromkeys(trainable), patterns, "params")
    return [n for n in trainable if n in chosen]


def _matching(names: Iterable[str], patterns: Iterable[str], option: str) -> Set[str]:
    """Names matching any pattern; a pattern that matches nothing is a typo, not a pass."""
    if isinstance(patterns, str):
        patterns = [patterns]
    names = list(names)
    found: Set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise GradtraceError(f"{option}={pattern!r} matches no parameter of the model "
                                 f"(names look like {names[0]!r}); patterns are fnmatch globs such as '*.lora_A'")
        found.update(hits)
    return found


def _clear_grads(params: Iterable[torch.Tensor]) -> Dict[torch.Tensor, Optional[torch.Tensor]]:
    """Set every ``.grad`` aside (the tensors themselves, untouched) so the check starts from None."""
    saved = {}
    for p in params:
        saved[p] = p.grad
        p.grad = None
    return saved


def _restore_grads(saved: Dict[torch.Tensor, Optional[torch.Tensor]]) -> None:
    for p, grad in saved.items():
        p.grad = grad


def _check_loss(loss, trace) -> None:
    __tracebackhide__ = True
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = type(loss).__name__ if not isinstance(loss, torch.Tensor) else f"a tensor of shape {tuple(loss.shape)}"
        raise GradtraceError(f"loss_fn(model, *args, **kwargs) must return a scalar loss tensor, got {what}")
    if not loss.requires_grad:
        cuts = "; ".join(_describe_cuts(trace)) or "no cut was seen at a module boundary"
        raise AssertionError(safe(f"gradients do not flow: the loss does not require grad, so no parameter can "
                                  f"receive a gradient ({cuts})"))


def _describe_cuts(trace) -> List[str]:
    from .analysis.cuts import describe_cut, outermost_cuts
    return [describe_cut(c) for c in outermost_cuts(list(trace.cuts))]


def _failures(p, checked: List[str], frozen: Set[str], allow_zero: Set[str]) -> Dict[str, List[str]]:
    records = p.records
    failures = {
        "received no gradient (backward never reached them)": [n for n in checked if n not in records],
        "got an exactly zero gradient": [n for n in checked if n in records and records[n].zero
                                         and n not in allow_zero],
        "got NaN/Inf gradients": [n for n in checked if n in records and records[n].nonfinite],
        "are expected frozen but received a gradient": sorted(n for n in frozen if n in records),
    }
    return {what: names for what, names in failures.items() if names}


def _message(failures: Dict[str, List[str]], checked: int, trace) -> str:
    failed = len({n for names in failures.values() for n in names})
    lines = [f"gradients do not flow: {failed} of {checked} checked parameter(s) failed"]
    for what, names in failures.items():
        shown = ", ".join(names[:6]) + (f", ... (+{len(names) - 6})" if len(names) > 6 else "")
        lines.append(f"  {len(names)} {what}: {shown}")
        lines.append(f"      by module: {describe_params(names, universe=trace.params)}")
    failed_names = {n for names in failures.values() for n in names}
    # Info findings are shown when they are about a failing parameter: they say why it failed (a zero gradient
    # expected while a LoRA B is still zero), where the assertion was stricter than the diagnosis.
    findings = [str(v) for v in trace.verdicts()
                if v.severity != "info" or failed_names & set(v.evidence.get("parameters") or ())]
    if findings:
        lines.append("gradtrace's diagnosis (most likely root cause first):")
        lines += [f"  {i}. {text}" for i, text in enumerate(findings, 1)]
    return "\n".join(lines)
