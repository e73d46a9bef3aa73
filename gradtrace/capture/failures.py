"""Capture: the culprit behind a pass that failed, found from the exception while it is still alive.

torch's messages say what broke, not where in the model. With the exception's traceback (its
frames still hold the loss and the failing forward's variables) and what the watch saw, three
of them get a culprit:

* "Inference tensors cannot be saved for backward": a tensor made under
  ``torch.inference_mode()`` (a rotary or positional cache filled during validation) reused in a
  forward with grad. The watched modules' buffers and tensor attributes are searched for
  inference tensors (the one the failing code held first); the ``inference_mode`` cut the watch
  recorded around that module says where it was made.
* "modified by an inplace operation": torch names the tensor by its op and version; the module
  call whose output it was is found in the forward's outputs log (``ForwardValues.outputs``:
  storage address and version of each module's output), with the module that changed it in
  place when one did (its output: the same storage, a higher version).
* "does not require grad and does not have a grad_fn": the loss's dtype (an integer loss came
  from argmax or a comparison) and the last module whose output still carried a gradient.

Runs only when a pass fails, never on the hot path.
"""
from __future__ import annotations

import re
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..records import FailureCause
from .frames import innermost_module, is_machinery



class FailureContext:
    """What a failure's culprit is looked up in: the module tree, the cut log, the forward's node map."""

    def __init__(self, walk: List[Tuple[str, nn.Module]], cut_log, forward_values=None):
        self.walk = walk
        self.names = {id(m): name for name, m in walk}
        self.modules = dict(walk)
        self.cut_log = cut_log
        self.forward_values = forward_values

    def cause(self, error: BaseException) -> Optional[FailureCause]:
        text = str(error)
        try:
            if "Inference tensors cannot be saved for backward" in text:
                return self._inference_tensor(error)
            if "modified by an inplace operation" in text:
                return self._inplace(error, text)
            if "does not require grad and does not have a grad_fn" in text:
                return self._no_graph(error)
        except Exception:  # noqa: BLE001  (a culprit is a bonus: the failure itself is recorded anyway)
            return None
        return None

    def _type(self, name: Optional[str]) -> str:
        module = self.modules.get(name) if name is not None else None
        return type(module).__name__ if module is not None else ""

    # ---- inference tensors -------------------------------------------------------------------
    def _inference_tensor(self, error: BaseException) -> Optional[FailureCause]:
        frames = list(_frames(error))
        failed_in = self._failing_module(frames)
        variable, held = _inference_local(frames)
        holders = list(self._inference_holders())
        if not holders:
            made = self._latest_inference_forward()
            if made is not None:  # made in this forward: a module run under inference_mode fed one with grad
                return FailureCause(kind="inference_tensor", module=made.module, module_type=made.module_type,
                                    location=made.location, other=failed_in, other_type=self._type(failed_in),
                                    variable=variable)
            if failed_in is None and variable is None:
                return None
            return FailureCause(kind="inference_tensor", other=failed_in, other_type=self._type(failed_in),
                                variable=variable, location=self._region(failed_in or ""))
        module, attribute = _best_holder(holders, held, failed_in)
        return FailureCause(kind="inference_tensor", module=module, module_type=self._type(module),
                            attribute=attribute, location=self._region(module), other=failed_in,
                            other_type=self._type(failed_in), variable=variable)

    def _failing_module(self, frames) -> Optional[str]:
        """The innermost watched module whose forward was running when the error was raised."""
        module = innermost_module(frames[-1], self.names) if frames else None
        return self.names[id(module)] if module is not None else None

    def _inference_holders(self) -> Iterator[Tuple[str, str, torch.Tensor]]:
        """(module, attribute, tensor) for every inference tensor a watched module keeps."""
        for name, module in self.walk:
            for attribute, value in list(module._buffers.items()) + list(vars(module).items()):
                for label, t in _tensors_in(attribute, value):
                    if t.is_inference():
                        yield name, label, t

    def _latest_inference_forward(self):
        """The latest cut where a watched module ran under inference_mode (the outermost of its region)."""
        regions = [c for c in self.cut_log.cuts if c.kind == "inference_mode" and c.module]
        return max(regions, key=lambda c: c.seq, default=None)

    def _region(self, module: str) -> str:
        """Where the watch saw ``module`` run under inference_mode: the call of the outermost module of the
        region (the user's line inside ``with torch.inference_mode():``), the first time."""
        regions = [c for c in self.cut_log.cuts if c.kind == "inference_mode"
                   and (not c.module or module == c.module or module.startswith(c.module + "."))]
        outermost = min(regions, key=lambda c: (c.module.count(".") + bool(c.module), c.seq), default=None)
        return outermost.location if outermost is not None else ""

    # ---- in-place changes --------------------------------------------------------------------
    def _inplace(self, error: BaseException, text: str) -> Optional[FailureCause]:
        """torch names the tensor by its op and versions ("output 0 of Tanh, is at version 1; expected
        version 0"): the module call whose output that was (``ForwardValues.changed_in_place``)."""
        described = re.search(r"(\[[^\]]*\[[^\]]*\]\]), which is output \d+ of (\w+)", text)
        versions = re.search(r"expected version (\d+)", text)
        if self.forward_values is None or described is None or versions is None:
            return None
        op = re.sub(r"Backward\d*$", "", described.group(2))
        made_by, changed_by = self.forward_values.changed_in_place(int(versions.group(1)), op)
        if made_by is None and changed_by is None:
            return None
        return FailureCause(kind="inplace", module=made_by, module_type=self._type(made_by), other=changed_by,
                            other_type=self._type(changed_by), tensor=f"{described.group(1)}, output of {op}")

    # ---- a loss with no graph ------------------------------------------------------------------
    def _no_graph(self, error: BaseException) -> Optional[FailureCause]:
        loss = next(iter(_losses(error, with_graph=False)), None)
        last = self.forward_values.last_with_grad() if self.forward_values is not None else None
        if loss is None and last is None:
            return None
        return FailureCause(kind="no_graph", module=last, module_type=self._type(last),
                            dtype=str(loss.dtype).replace("torch.", "") if loss is not None else "")


# ---- reading the traceback ---------------------------------------------------------------------
def _frames(error: BaseException) -> Iterator[Any]:
    """The traceback's frames, outermost first."""
    tb = error.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _losses(error: BaseException, with_graph: bool = True) -> Iterator[torch.Tensor]:
    """The tensors backward was called on, from the frames of ``Tensor.backward`` / ``autograd.backward``
    / ``autograd.grad`` in the traceback."""
    for frame in _frames(error):
        code = frame.f_code
        if code is torch.Tensor.backward.__code__:
            candidates = [frame.f_locals.get("self")]
        elif code in (torch.autograd.backward.__code__, torch.autograd.grad.__code__):
            value = frame.f_locals.get("tensors", frame.f_locals.get("outputs"))
            candidates = list(value) if isinstance(value, (tuple, list)) else [value]
        else:
            continue
        for t in candidates:
            if isinstance(t, torch.Tensor) and (t.grad_fn is not None or not with_graph):
                yield t
        return


def _inference_local(frames) -> Tuple[Optional[str], Optional[torch.Tensor]]:
    """The innermost frame outside torch that holds an inference tensor: (its variable, the tensor)."""
    for frame in reversed(frames):
        if is_machinery(frame.f_code.co_filename):
            continue
        for name, value in frame.f_locals.items():
            if isinstance(value, torch.Tensor) and value.is_inference():
                return name, value
    return None, None


def _tensors_in(attribute: str, value: Any) -> Iterator[Tuple[str, torch.Tensor]]:
    if isinstance(value, nn.Parameter):
        return
    if isinstance(value, torch.Tensor):
        yield attribute, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value[:64]):
            if isinstance(item, torch.Tensor):
                yield f"{attribute}[{i}]", item
    elif isinstance(value, dict):
        for key, item in list(value.items())[:64]:
            if isinstance(item, torch.Tensor):
                yield f"{attribute}[{key!r}]", item


def _storage(t: torch.Tensor) -> Optional[int]:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return None


def _best_holder(holders, held: Optional[torch.Tensor], failed_in: Optional[str]) -> Tuple[str, str]:
    """The holder of the tensor the failing code held (same storage), else the one nearest the failure."""
    if held is not None:
        storage = _storage(held)
        for module, attribute, t in holders:
            if storage is not None and _storage(t) == storage:
                return module, attribute
    if failed_in is not None:
        near = [h for h in holders if failed_in == h[0] or failed_in.startswith(h[0] + ".")
                or h[0].startswith(failed_in + ".")]
        if near:
            return near[0][0], near[0][1]
    return holders[0][0], holders[0][1]
