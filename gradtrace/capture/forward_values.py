"""Capture: where a forward first held NaN/Inf, checked at module boundaries on the device.

A NaN gradient is often only the echo of a forward that already went non-finite: a float16
matmul that passed 65504, a softmax over a row whose every score was masked to -inf. The
backward then blames the loss (its node is the first to see the NaN). This module finds the
forward's first non-finite value, in forward order, without a host sync per module call:

* every watched module call with grad enabled reduces its output (the first floating tensor
  in it) with one ``torch.aminmax``, grad switched off around it: NaN propagates, an overflow
  shows as ±inf, and a finite pair says how large the values got. Elementwise activations and
  dropout (``PASS_THROUGH``) cannot make NaN/Inf from finite values: their outputs are not reduced. Its first floating input is reduced
  too when no check in the same forward saw that tensor: a value made by the code *around*
  the submodules (``q @ k.T`` inside an attention module) is caught at the module it enters;
* mask arguments (``attention_mask``, ``key_padding_mask``...) of modules that take one are
  reduced to "has a fully masked row", once per mask tensor per forward;
* under ``watch(cuts="ops")`` the op-level mode adds each differentiable op's output
  (``check_op``), so the first non-finite value is named at its op and line.

The (min, max) pairs stay on the device, stacked every ``CHUNK`` checks. When a pass
finishes, the checks since the previous pass finished are its forward (``take``). They are
read (one transfer) only for a pass whose gradients turned out non-finite or that failed;
a healthy pass's checks are dropped unread.

Cost: about one small reduction per module call (measured in benchmarks/forward_checks.py).
Not checked: forwards without grad (generation, evaluation), integer outputs, empty tensors.
A tensor is checked once per forward (remembered with its version until the forward returns: changed
in place, it is checked again).
"""
from __future__ import annotations

import inspect
import math
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from .._torch_compat import set_grad_enabled
from ..records import ForwardNonfinite
from .frames import short_path

Tensor = torch.Tensor
_aminmax = torch.aminmax
_dynamo_compiling = torch.compiler.is_dynamo_compiling  # a compiled forward: checks stay out of its graph
is_grad_enabled = torch.is_grad_enabled

# Pairs stacked into one device tensor every this many checks (frees the small result tensors).
CHUNK = 512
# Checks kept while no pass finishes (forwards with grad that are never differentiated): the oldest go.
MAX_CHECKS = 1 << 20
# Ids of tensors checked in the current forward: cleared at every root call's end, or when this big.
_MAX_SEEN = 4096


@dataclass(frozen=True)
class Site:
    """Where a check was made: a module's output or input, an op's output, or a module's mask argument."""

    kind: str  # "output", "input", "op", "mask"
    module: str
    module_type: str = ""
    op: Optional[str] = None
    location: str = ""
    mask: Optional[str] = None  # kind "mask": the argument's name
    masked_when: str = ""  # kind "mask", boolean masks: "true" (True leaves out: key_padding_mask) or "false"


def parent_of(module: str) -> str:
    return module.rpartition(".")[0]


def first_floating(value: Any) -> Optional[Tensor]:
    """The first floating tensor in ``value`` (itself, or a shallow tuple/list/dict item)."""
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        if isinstance(item, Tensor) and item.is_floating_point():
            return item
    return None


# Modules from torch.nn whose boolean masks mean "True: leave out" (MultiheadAttention's attn_mask too).
_TRUE_MASKS_OUT = ("MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
                   "TransformerEncoder", "TransformerDecoder", "Transformer")
_SIGNATURES: Dict[Any, Tuple[Tuple[int, str], ...]] = {}


def mask_parameters(module: nn.Module) -> Tuple[Tuple[int, str], ...]:
    """``(position, name)`` of the forward's parameters named like an attention mask (cached per forward)."""
    forward = type(module).forward
    found = _SIGNATURES.get(forward)
    if found is None:
        try:
            params = list(inspect.signature(forward).parameters.values())[1:]  # without self
        except (TypeError, ValueError):
            params = []
        found = tuple((i if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else -1, p.name)
                      for i, p in enumerate(params) if "mask" in p.name and "head" not in p.name)
        _SIGNATURES[forward] = found
    return found


def _masked_when(module: nn.Module, name: str) -> str:
    if "padding" in name or type(module).__name__ in _TRUE_MASKS_OUT:
        return "true"
    return "false"


class _Thread(threading.local):
    def __init__(self):
        # id(tensor) -> (the tensor, its _version) when checked, in the current forward: compared by identity
        # (a freed activation's id comes back at once for the next one). Held, not weakly referenced (a weak
        # reference per output cost as much as the rest of the bookkeeping): only until the watched forward
        # returns (or the pass ends), and a forward with grad keeps most of its outputs for backward anyway.
        self.seen: Dict[int, Tuple[Tensor, int]] = {}


def _checked(seen: Dict[int, Tuple[Any, int]], t: Tensor) -> bool:
    """Was ``t`` itself checked in this forward, at its current version?"""
    entry = seen.get(id(t))
    return entry is not None and entry[0] is t and entry[1] == t._version


# Modules that cannot turn finite inputs into NaN/Inf (elementwise activations, dropout, identity): their
# outputs are not reduced (a NaN past them shows in the next module that is, with the same attribution);
# they are still logged in ``outputs`` (an in-place ReLU is what changed a saved tensor).
PASS_THROUGH = frozenset({
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "GELU", "SiLU", "Tanh", "Sigmoid", "Hardtanh", "Hardsigmoid",
    "Hardswish", "ELU", "CELU", "SELU", "Mish", "Softsign", "Tanhshrink", "Identity", "Dropout", "Dropout1d",
    "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout",
    # transformers' activations (transformers/activations.py)
    "NewGELUActivation", "GELUActivation", "FastGELUActivation", "QuickGELUActivation", "SiLUActivation",
    "GELUTanh", "PytorchGELUTanh", "AccurateGELUActivation", "MishActivation", "ReLUSquaredActivation",
})


class ForwardValues:
    """The NaN/Inf checks of one watch: module hooks call ``for_module``'s checker; passes ``take`` windows."""

    def __init__(self):
        # Checks not stacked yet, in three parallel lists (no tuple per call): where, dtype, aminmax's (min, max).
        self.sites: List[Any] = []
        self.dtypes: List[torch.dtype] = []
        self.values: List[Any] = []
        self.chunks: List[Tuple[List[Any], List[torch.dtype], Tensor]] = []  # stacked: sites, dtypes, (2, n) values
        self.count = 0  # checks in the current window
        self.thread = _Thread()
        self.lock = threading.Lock()
        self.enabled = True
        self.types: Dict[str, str] = {}  # module path -> type name, for the description of what is read
        self.inplace: Set[str] = set()  # modules built to change their input in place (ReLU(inplace=True))
        # Every module call's output since the last take, in forward order: (module, storage address,
        # version, requires grad). What a failed backward's culprit is looked up in (``failures.py``).
        self.outputs: List[Tuple[str, int, int, bool]] = []

    # ---- the module hook's side (per call: keep it lean) ---------------------------------------
    def for_module(self, name: str, module: nn.Module):
        """The checker the module's forward hook calls with grad enabled: ``check(module, args, kwargs, output)``."""
        module_type = self.types[name] = type(module).__name__
        if getattr(module, "inplace", False) is True:
            self.inplace.add(name)
        out_site = Site("output", name, module_type)
        in_site = Site("input", name, module_type)
        masks = [(position, arg, Site("mask", name, module_type, mask=arg, masked_when=_masked_when(module, arg)))
                 for position, arg in mask_parameters(module)]
        thread = self.thread
        root = not name
        outputs = self.outputs.append  # the list is cleared in place, never replaced
        reduce = module_type not in PASS_THROUGH
        # The pending checks' lists are replaced by every fold: looked up per call (attribute reads, no method).
        this = self

        def check(mod, args, kwargs, output) -> None:
            if not this.enabled or mod is not module or _dynamo_compiling():
                return  # (a deepcopy carries the hook along; a compiled forward is not traced through checks)
            seen = thread.seen
            try:
                out = output if output.__class__ is Tensor else first_floating(output)
                if out is not None and out.is_floating_point():
                    version = out._version
                    outputs((name, out.data_ptr(), version, out.requires_grad))
                else:
                    out = None
                x = args[0] if args and args[0].__class__ is Tensor else (
                    first_floating(args) if args else first_floating(kwargs) if kwargs else None)
                if x is not None:  # was the input checked in this forward, at its current version? (inlined)
                    entry = seen.get(id(x))
                    x_checked = entry is not None and entry[0] is x and entry[1] == x._version
                if not reduce:
                    if out is not None and x is not None and x_checked:  # finite in, finite out
                        seen[id(out)] = (out, version)
                    return
                if x is not None and not x_checked and x is not out and x.is_floating_point():
                    this._log(in_site, x, seen)
                if masks:
                    this._check_masks(masks, args, kwargs, seen)
                if out is not None:
                    key = id(out)
                    entry = seen.get(key)
                    if entry is None or entry[0] is not out or entry[1] != version:
                        # _log, inlined: grad off around the reduction (no graph node, no detach op)
                        seen[key] = (out, version)
                        set_grad_enabled(False)
                        try:
                            pair = _aminmax(out)
                        finally:
                            set_grad_enabled(True)  # (module checks run with grad enabled)
                        values = this.values
                        values.append(pair)
                        this.sites.append(out_site)
                        this.dtypes.append(out.dtype)
                        if len(values) >= CHUNK:
                            this._fold()
            except (RuntimeError, TypeError, ValueError):
                pass  # an inference tensor (no version counter), a tensor without storage, an empty one: not checked
            finally:
                if root or len(seen) > _MAX_SEEN:
                    seen.clear()  # a new forward's tensors are new: the checked ones are let go

        return check

    def check_op(self, info: tuple, out: Tensor) -> None:
        """cuts="ops": an op's output (``info``: the op-level mode's (op, module, file, line, ...); made a
        ``Site`` only if it is ever read)."""
        if self.enabled and out.is_floating_point():
            self._log(info, out, self.thread.seen, grad_was=is_grad_enabled())  # (an in-place op under no_grad)

    def _log(self, site, t: Tensor, seen: Dict[int, Tuple[Any, int]], grad_was: bool = True) -> None:
        """Reduce ``t`` to (min, max) on the device. Module hooks call it with grad enabled (``grad_was``)."""
        seen[id(t)] = (t, t._version)
        # Grad off around the reduction: no graph node holding ``t`` for a min and a max, and no detach()
        # (an op of its own: it cost as much as the reduction).
        set_grad_enabled(False)
        try:
            pair = _aminmax(t)
        except RuntimeError:  # an empty tensor has no min: nothing to check
            return
        finally:
            set_grad_enabled(grad_was)
        self.sites.append(site)
        self.dtypes.append(t.dtype)
        self.values.append(pair)
        if len(self.values) >= CHUNK:
            self._fold()

    def _check_masks(self, masks, args, kwargs, seen) -> None:
        for position, arg, site in masks:
            m = kwargs.get(arg) if kwargs else None
            if m is None and 0 <= position < len(args):
                m = args[position]
            if not isinstance(m, Tensor) or not m.numel() or m.dim() == 0 or _checked(seen, m):
                continue
            seen[id(m)] = (m, m._version)
            m = m.detach()
            if m.is_floating_point():
                # (the smallest row maximum, the smallest value): an additive mask (negative values) masks a
                # row everywhere when its maximum is -inf; a 0/1 mask (no negative value) when it is 0.
                pair = (m.amax(-1).amin(), m.amin())
            elif site.masked_when == "true":
                flag = m.bool().all(-1).any()  # True: some row leaves every position out
                pair = (flag, flag)
            else:
                flag = (~m.bool().any(-1)).any()  # True: some row keeps no position
                pair = (flag, flag)
            self.sites.append(site)
            self.dtypes.append(m.dtype)
            self.values.append(pair)

    def _fold(self) -> None:
        with self.lock:
            sites, dtypes, values = self.sites, self.dtypes, self.values
            self.sites, self.dtypes, self.values = [], [], []
            if not values:
                return
            # (2, n): the lows, then the highs (one stack; dtypes promote: bool, half -> float).
            flat = [pair[0] for pair in values] + [pair[1] for pair in values]
            try:
                stacked = torch.stack(flat).view(2, -1)
            except RuntimeError:  # model parallel: values on several devices, stacked on the first one's
                stacked = torch.stack([v.to(flat[0].device) for v in flat]).view(2, -1)
            self.chunks.append((sites, dtypes, stacked))
            self.count += len(sites)
            if len(self.outputs) > MAX_CHECKS:
                del self.outputs[:len(self.outputs) // 2]
            while self.count > MAX_CHECKS and len(self.chunks) > 1:
                self.count -= len(self.chunks.pop(0)[0])

    # ---- the pass's side ---------------------------------------------------------------------
    def take(self) -> "Window":
        """The checks since the last ``take``: the forward of the pass that just finished (stacked, unread)."""
        self._fold()
        with self.lock:
            chunks, self.chunks, self.count = self.chunks, [], 0
            self.outputs.clear()
        self.thread.seen.clear()  # (a forward of submodules called without the root: its tensors let go)
        return Window(chunks, self.types)

    def close(self) -> None:
        self.enabled = False
        self.sites, self.dtypes, self.values = [], [], []
        self.chunks = []
        self.outputs.clear()
        self.thread.seen.clear()

    def last_with_grad(self) -> Optional[str]:
        """The last module (in forward order, since the last pass) whose output carried a gradient."""
        return next((name for name, _, _, grad in reversed(self.outputs) if grad), None)

    def changed_in_place(self, saved_at: int, op: str) -> Tuple[Optional[str], Optional[str]]:
        """(the module whose output, at version ``saved_at``, was later changed in place; the module that
        changed it, when one did), the latest such pair. torch names the tensor only by version and op:
        a later module call whose output was the same storage at a higher version is the change; without
        one, the latest module of the op's type (``Tanh``) whose output was at that version."""
        outputs = self.outputs
        for i in range(len(outputs) - 1, -1, -1):
            name, ptr, version, _ = outputs[i]
            if version != saved_at:
                continue
            later = next((o[0] for o in outputs[i + 1:] if o[1] == ptr and o[2] > version), None)
            if later is not None:
                return name, later
        wanted = op.lower()
        for name, _, version, _ in reversed(outputs):
            if version == saved_at and self.types.get(name, "").lower() == wanted:
                return name, None
        # The op ran in a forward's own code (torch.tanh), not as a module: an in-place module (ReLU(inplace=True))
        # whose output reached a higher version is the change.
        changer = next((o[0] for o in reversed(outputs) if o[0] in self.inplace and o[2] > saved_at), None)
        return None, changer


class Window:
    """One pass's checks, on the device until ``read``."""

    def __init__(self, chunks: List[Tuple[List[Any], List[torch.dtype], Tensor]], types: Dict[str, str]):
        self.chunks = chunks
        self.types = types

    def read(self) -> Tuple[int, Optional[ForwardNonfinite]]:
        """(values checked, where the forward first held NaN/Inf or None): one host transfer."""
        if not self.chunks:
            return 0, None
        device = self.chunks[0][2].device
        lows, highs = torch.cat([v.to(device, torch.float64) for _, _, v in self.chunks], dim=1).tolist()
        sites = [(_as_site(site), dtype) for entry_sites, dtypes, _ in self.chunks
                 for site, dtype in zip(entry_sites, dtypes, strict=False)]
        self.chunks = []
        pairs = list(zip(lows, highs, strict=False))
        found = first_nonfinite(sites, pairs)
        if found is not None:
            found.module_type = found.module_type or self.types.get(found.module, "")
            if found.made_by is not None:
                found.made_by_type = self.types.get(found.made_by, "")
        return sum(1 for site, _ in sites if site.kind != "mask"), found


def _as_site(site) -> Site:
    if isinstance(site, Site):
        return site
    op, module, filename, line = site[:4]  # the op-level mode's info
    return Site("op", module, op=op, location=f"{short_path(filename)}:{line}")


def _bad(low: float, high: float) -> bool:
    return not (math.isfinite(low) and math.isfinite(high))


# Ops that build additive attention masks (-inf where masked): their -inf is by design. Any other op's -inf
# (log of 0, a division by 0) is where the forward went non-finite.
_MASK_BUILDERS = frozenset({"masked_fill", "masked_fill_", "where", "full", "full_like", "new_full", "fill_",
                            "triu", "tril", "triu_", "tril_", "zeros", "zeros_like", "expand", "to", "add", "sub",
                            "__add__", "__radd__", "__sub__", "__rsub__", "unsqueeze", "view", "reshape", "repeat"})


def _negative_infinity_only(site: Site, low: float, high: float) -> bool:
    """Only -inf beside finite values: how additive masks look (a mask module's output, or an op that builds
    or moves one), not an overflow or a log of 0."""
    if not (low == -math.inf and math.isfinite(high)):
        return False
    return site.op is None or site.op in _MASK_BUILDERS


def first_nonfinite(sites: List[Tuple[Site, torch.dtype]], pairs: List[Tuple[float, float]]
                    ) -> Optional[ForwardNonfinite]:
    """The first check, in forward order, that held NaN/Inf, described (None: all finite)."""
    values = [i for i, (site, _) in enumerate(sites) if site.kind != "mask"]
    bad = [i for i in values if _bad(*pairs[i])]
    if not bad:
        return None
    first = next((i for i in bad if not _negative_infinity_only(sites[i][0], *pairs[i])), bad[0])
    site, dtype = sites[first]
    low, high = pairs[first]
    nan = math.isnan(low) or math.isnan(high)
    record = ForwardNonfinite(module=site.module, module_type=site.module_type, site=site.kind, nan=nan,
                              inf=not nan, dtype=str(dtype).replace("torch.", ""),
                              dtype_max=float(torch.finfo(dtype).max) if dtype.is_floating_point else None,
                              op=site.op, location=site.location, checked=sum(1 for i in values if i < first))
    if site.kind == "input":
        record.made_by = parent_of(site.module) if site.module else ""
    scope = record.made_by if site.kind == "input" else site.module
    _context(record, sites, pairs, values, first)
    # A 16-bit float passes its largest value easily (float16: 65504); float32's inf is rarely an overflow.
    record.cause = "nan" if nan else "overflow" if dtype.is_floating_point and dtype.itemsize <= 2 else "inf"
    if nan:
        mask = _fully_masked(sites, pairs, scope)
        if mask is not None:
            record.cause, record.mask = "masked_softmax", mask
    return record


def _context(record: ForwardNonfinite, sites, pairs, values: List[int], first: int) -> None:
    """The last finite module output before it, and the largest finite value checked before it."""
    largest, where = None, None
    for i in values:
        if i >= first:
            break
        low, high = pairs[i]
        if math.isfinite(low) and math.isfinite(high):
            size = max(abs(low), abs(high))
            if largest is None or size > largest:
                largest, where = size, sites[i][0].module
    record.largest, record.largest_in = largest, where
    before = [i for i in values if i < first and sites[i][0].kind in ("output", "op")]
    if before:
        record.after = sites[before[-1]][0].module


def _fully_masked(sites, pairs, scope: str) -> Optional[str]:
    """A mask argument with a fully masked row, of the module where the NaN was made or one around it."""
    for (site, dtype), (flag, smallest) in zip(sites, pairs, strict=False):
        if site.kind != "mask":
            continue
        if dtype.is_floating_point:
            masked = flag == -math.inf if smallest < 0 else flag == 0.0
        else:
            masked = flag >= 0.5
        related = not site.module or not scope or scope == site.module or scope.startswith(site.module + ".") \
            or site.module.startswith(scope + ".")
        if masked and related:
            return f"{site.mask} of {site.module!r}" if site.module else site.mask
    return None
