"""Watched parameters whose values are all zero: what explains a sibling's exactly zero gradient.

Low-rank adapters start with one factor at zero so that they begin as the
identity: peft's ``lora_B`` (and its Embedding LoRA's ``lora_embedding_A``),
cloneofsimo's ``lora_up``. While that factor is zero, its sibling's gradient is
exactly zero (dL/dA = B^T (...) with B = 0) in a perfectly healthy first step.
gradtrace tells that apart from a real fault by the values themselves, not by
names: when a parameter's gradient is exactly zero and a parameter of the same
module is all zeros, the zero is that initialisation.

Cost, kept to the parameters that can matter:

* at watch entry, up to ``SAMPLE`` evenly spaced elements of every watched
  parameter are read once (one host read per device and dtype): a parameter
  whose sample is not all zero cannot be all zero, and is never looked at again;
* when a pass begins, the remaining candidates' max |value| is computed on the
  device (one foreach norm with ord=inf, no host read): the values the
  pass's forward used, before any optimizer step inside it;
* they are read to the host with the pass's record (one small transfer, while
  candidates last): a candidate read as nonzero is dropped for later passes (a
  LoRA B after its first step), and only a pass that had exactly zero gradients
  keeps the names (``PassTrace.zero_valued``).
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

import torch

from .._torch_compat import foreach_norm
from .optim import SAMPLE, _sample

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _readable(p: torch.Tensor) -> bool:
    return type(p) in _PLAIN and p.layout == torch.strided and not p.is_meta and p.numel() > 0


class ZeroValued:
    """The watch's candidates: parameters that may still be all zero (indices into the watched list)."""

    def __init__(self, params: List[torch.Tensor]):
        self.params = params
        self.lock = threading.Lock()
        self.candidates: List[int] = self._sampled_zero(params)

    @staticmethod
    def _sampled_zero(params: List[torch.Tensor]) -> List[int]:
        """Indices whose sampled elements are all zero: one concatenation and one segment max per device and
        dtype, one host read each (no foreach kernel: its first call in a process costs a warm-up)."""
        by_kind: Dict[tuple, List[int]] = {}
        for i, p in enumerate(params):
            if _readable(p):
                by_kind.setdefault((p.device, p.dtype), []).append(i)
        found: List[int] = []
        with torch.no_grad():
            for (device, _), indices in by_kind.items():
                samples = [_sample(params[i]) if params[i].numel() > SAMPLE else params[i].detach().reshape(-1)
                           for i in indices]
                values = torch.cat(samples).abs()
                lengths = torch.tensor([len(x) for x in samples], device=device)
                segment = torch.repeat_interleave(torch.arange(len(samples), device=device), lengths)
                top = torch.zeros(len(samples), dtype=values.dtype, device=device)
                top.scatter_reduce_(0, segment, values, "amax")
                found.extend(indices[k] for k in (top == 0).nonzero().flatten().tolist())
        return sorted(found)

    def probe(self) -> Optional[Tuple[List[int], List[torch.Tensor]]]:
        """At a pass's beginning: the candidates' max |value|, still on the device (None: no candidate)."""
        candidates = self.candidates
        if not candidates:
            return None
        params = self.params
        with torch.no_grad():
            tops = foreach_norm([params[i].detach() for i in candidates], float("inf"))
        return list(candidates), list(tops)

    def read(self, probe: Tuple[List[int], List[torch.Tensor]]) -> List[int]:
        """The probed parameters that were all zero (one host read); the others are candidates no more."""
        indices, tops = probe
        values = to_host(tops)
        zero = [indices[k] for k, v in enumerate(values) if v == 0.0]
        gone = {indices[k] for k, v in enumerate(values) if v != 0.0}
        if gone:
            with self.lock:
                self.candidates = [i for i in self.candidates if i not in gone]
        return zero


def to_host(tops: List[torch.Tensor]) -> List[float]:
    """0-d device tensors as floats: one transfer per device."""
    by_device: Dict[torch.device, List[int]] = {}
    for k, t in enumerate(tops):
        by_device.setdefault(t.device, []).append(k)
    values = [0.0] * len(tops)
    for ks in by_device.values():
        read = torch.stack([tops[k].to(torch.float32) for k in ks]).tolist()
        for position, k in enumerate(ks):
            values[k] = read[position]
    return values
