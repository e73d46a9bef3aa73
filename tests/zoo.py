"""A small model zoo for the oracle tests: one model per way a gradient can fail to flow.

Every entry builds ``(model, make_inputs, loss_fn)``:

* ``model`` - an ``nn.Module`` with deterministic weights,
* ``make_inputs(seed)`` - one microbatch, the same for the same seed,
* ``loss_fn(model, batch)`` - a scalar loss.

No dropout, no randomness in the forward: two copies of a model fed the same
microbatch produce bitwise identical gradients, which is what the oracles rely on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch import nn
import torch.nn.functional as F

D = 6  # feature width
V = 11  # vocabulary size (tied-weight model)
BATCH = 4


@dataclass(frozen=True)
class ZooCase:
    name: str
    build: Callable[[], Tuple[nn.Module, Callable, Callable]]

    def __repr__(self) -> str:  # readable ids in pytest output
        return self.name


def _features(seed: int, width: int = D) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(BATCH, width, generator=g)


def _tokens(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2000 + seed)
    return torch.randint(0, V, (BATCH, 5), generator=g)


def _mse(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).pow(2).mean()


# ---------------------------------------------------------------- the models


class FrozenLayer(nn.Module):
    """The first layer is frozen: it is not watched, the rest is reached."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.embed.requires_grad_(False)
        self.hidden = nn.Linear(D, D)
        self.out = nn.Linear(D, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(torch.tanh(self.embed(x)))))


class DetachedBranch(nn.Module):
    """One of two branches is detached inside forward: its parameters get nothing."""

    def __init__(self):
        super().__init__()
        self.left = nn.Linear(D, D)
        self.right = nn.Linear(D, D)
        self.head = nn.Linear(D, 1)

    def forward(self, x):
        a = torch.tanh(self.left(x))
        b = torch.tanh(self.right(x)).detach()
        return self.head(a + b)


class TiedWeights(nn.Module):
    """Embedding tied to the output head: one parameter, two uses, one name."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def _tied_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))


class UnusedHead(nn.Module):
    """``aux_head`` is a registered, trainable module that forward never calls."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(D, D)
        self.head = nn.Linear(D, 1)
        self.aux_head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


class LoRALinear(nn.Module):
    """Hand-written LoRA: frozen base plus ``lora_B @ lora_A`` with ``lora_B`` zero-init.

    On the first step ``lora_A``'s gradient is exactly zero (reached, zero), and
    ``lora_B``'s is not.
    """

    def __init__(self, d_in: int, d_out: int, r: int = 2, alpha: float = 4.0):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, d_in) / math.sqrt(d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T * self.scale


class LoRAModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = LoRALinear(D, D)
        self.v = LoRALinear(D, D)
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        return self.norm(torch.tanh(self.q(x)) * self.v(x))


class NestedSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(D, D), nn.Tanh()),
            nn.Sequential(nn.Sequential(nn.Linear(D, D), nn.ReLU()), nn.Linear(D, 2)),
        )

    def forward(self, x):
        return self.net(x)


class BufferAndFrozenParam(nn.Module):
    """A buffer and a ``requires_grad=False`` parameter take part in forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, D))
        self.temperature = nn.Parameter(torch.tensor(1.5), requires_grad=False)
        self.out = nn.Linear(D, 1)

    def forward(self, x):
        return self.out(torch.tanh((self.lin(x) + self.shift) / self.temperature))


class SharedTwice(nn.Module):
    """The same block is called twice in one forward."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(D, D)
        self.out = nn.Linear(D, 1)

    def forward(self, x):
        return self.out(self.block(torch.tanh(self.block(x))))


class NoGradEncoder(nn.Module):
    """The encoder runs under ``torch.no_grad()``: its parameters are cut off."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(D, D)
        self.decoder = nn.Linear(D, 1)

    def forward(self, x):
        with torch.no_grad():
            h = torch.tanh(self.encoder(x))
        return self.decoder(h)


class HalfPrecision(nn.Module):
    """bfloat16 parameters and activations."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.out = nn.Linear(D, 1)
        self.to(torch.bfloat16)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x.to(torch.bfloat16))))


def _builder(cls, loss_fn=_mse, make_inputs=_features):
    def build():
        torch.manual_seed(0)
        return cls(), make_inputs, loss_fn

    return build


ZOO = [
    ZooCase("frozen_layer", _builder(FrozenLayer)),
    ZooCase("detached_branch", _builder(DetachedBranch)),
    ZooCase("tied_weights", _builder(TiedWeights, _tied_loss, _tokens)),
    ZooCase("unused_head", _builder(UnusedHead)),
    ZooCase("lora_adapters", _builder(LoRAModel)),
    ZooCase("nested_sequential", _builder(NestedSequential)),
    ZooCase("buffer_and_frozen_param", _builder(BufferAndFrozenParam)),
    ZooCase("shared_module_twice", _builder(SharedTwice)),
    ZooCase("no_grad_encoder", _builder(NoGradEncoder)),
    ZooCase("bfloat16", _builder(HalfPrecision)),
]


def trainable(model: nn.Module):
    """``[(name, param)]`` of every parameter that requires grad, in model order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------- oracles
#
# Computed on an independent copy of the model with plain autograd, never
# through gradtrace: the answers gradtrace's records are checked against.


@dataclass
class PassOracle:
    """What a pass should record, from plain autograd on a copy of the model."""

    names: list  # trainable parameter names, model order
    totals: dict  # name -> pass-total gradient (float32 tensor) for reached names
    hits: dict  # name -> engine runs that delivered a gradient
    order: list  # reached names in the order backward first reached them

    @property
    def covered(self) -> set:
        return set(self.totals)

    @property
    def missing(self) -> set:
        return set(self.names) - set(self.totals)

    def norm(self, name: str) -> float:
        return torch.linalg.vector_norm(self.totals[name].double()).item()

    def max_abs(self, name: str) -> float:
        t = self.totals[name]
        return t.abs().max().item() if t.numel() else 0.0

    def zero(self, name: str) -> bool:
        t = self.totals[name]
        return bool((t == 0).all().item())

    def nonfinite(self, name: str) -> int:
        return int((~torch.isfinite(self.totals[name])).sum().item())


def _order_hooks(params, order):
    handles = []
    for n, p in params:
        def hook(grad, _n=n):
            if grad is not None and _n not in order:  # None: an undefined gradient, the parameter is not reached
                order.append(_n)
        handles.append(p.register_hook(hook))
    return handles


def oracle_grad(model, batches, loss_fn, inputs=None) -> PassOracle:
    """``torch.autograd.grad(loss, inputs, allow_unused=True)`` per microbatch, summed."""
    params = trainable(model)
    names = [n for n, _ in params]
    chosen = params if inputs is None else [(n, p) for n, p in params if n in inputs]
    totals, hits, order = {}, {n: 0 for n in names}, []
    handles = _order_hooks(chosen, order)
    try:
        for batch in batches:
            grads = torch.autograd.grad(
                loss_fn(model, batch), [p for _, p in chosen], allow_unused=True
            )
            for (n, _), g in zip(chosen, grads, strict=True):
                if g is None:
                    continue
                hits[n] += 1
                totals[n] = g.detach().clone() if n not in totals else totals[n] + g
    finally:
        for h in handles:
            h.remove()
    return PassOracle(names, totals, {n: h for n, h in hits.items() if h}, order)


def oracle_backward(model, batches, loss_fn, inputs=None) -> PassOracle:
    """``loss.backward(inputs=...)`` per microbatch: what ``.grad`` gained during the pass.

    Coverage comes from ``autograd.grad(allow_unused=True)`` on a second copy; the
    two oracles must agree with each other before gradtrace is judged by them.
    """
    import copy

    reach = oracle_grad(copy.deepcopy(model), batches, loss_fn, inputs)
    params = trainable(model)
    names = [n for n, _ in params]
    before = {n: None if p.grad is None else p.grad.detach().clone() for n, p in params}
    order = []
    handles = _order_hooks(
        params if inputs is None else [(n, p) for n, p in params if n in inputs], order
    )
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            if inputs is None:
                loss.backward()
            else:
                loss.backward(inputs=[p for n, p in params if n in inputs])
    finally:
        for h in handles:
            h.remove()
    totals = {}
    for n, p in params:
        if n not in reach.covered:
            continue
        assert p.grad is not None, f"oracle disagreement: {n} reached but .grad is None"
        gained = p.grad.detach().clone()
        if before[n] is not None:
            gained = gained - before[n]
        totals[n] = gained
        # .grad minus what it held is exact only up to rounding at the old .grad's size
        slack = 0.0 if before[n] is None else 4 * torch.finfo(gained.dtype).eps * float(before[n].abs().max())
        torch.testing.assert_close(
            gained.float(), reach.totals[n].float(), rtol=1e-5, atol=1e-6 + slack, equal_nan=True
        )
    assert order == reach.order, "oracle disagreement on backward order"
    return PassOracle(names, totals, reach.hits, order)


def assert_pass_matches(pt, oracle: PassOracle, *, via=None):
    """Every recorded fact of pass ``pt`` equals the oracle's."""
    assert set(pt.params) == set(oracle.names), "watched parameters are not the trainable ones"
    assert pt.covered == oracle.covered, (
        f"covered: extra {sorted(pt.covered - oracle.covered)}, "
        f"lacking {sorted(oracle.covered - pt.covered)}"
    )
    assert pt.missing == oracle.missing
    for name in sorted(oracle.covered):
        rec = pt.records[name]
        assert rec.hits == oracle.hits[name], f"{name}: hits"
        nonfinite = oracle.nonfinite(name)
        assert rec.nonfinite == nonfinite, f"{name}: nonfinite"
        assert rec.zero == oracle.zero(name), f"{name}: zero flag"
        if nonfinite == 0:
            assert math.isclose(rec.norm, oracle.norm(name), rel_tol=1e-5), (
                f"{name}: norm {rec.norm!r} != oracle {oracle.norm(name)!r}"
            )
            assert math.isclose(rec.max_abs, oracle.max_abs(name), rel_tol=1e-5), (
                f"{name}: max_abs {rec.max_abs!r} != oracle {oracle.max_abs(name)!r}"
            )
        if via is not None:
            assert rec.via == via, f"{name}: via"
    assert [r.name for r in pt.in_backward_order()] == oracle.order, "backward order"
    if all(oracle.nonfinite(n) == 0 for n in oracle.covered):
        total = math.sqrt(sum(oracle.norm(n) ** 2 for n in oracle.covered))
        assert math.isclose(pt.total_norm, total, rel_tol=1e-5)
        peak = max((oracle.max_abs(n) for n in oracle.covered), default=0.0)
        assert math.isclose(pt.max_abs, peak, rel_tol=1e-5)


def classify_steps(model: nn.Module, steps: int = 2, opt=None, classes: int = 4):
    """``steps`` optimizer steps of cross-entropy on random (4, 8) batches (seed 1) under one watch: its trace.
    ``opt`` defaults to SGD(lr=0.1) over every parameter."""
    import gradtrace

    torch.manual_seed(1)
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(4, 8)), torch.randint(0, classes, (4,))).backward()
            opt.step()
    return trace
