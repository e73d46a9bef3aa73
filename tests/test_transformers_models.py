"""Oracle tests on real architectures: a tiny GPT-2 from transformers and its peft LoRA.

Random weights built from a config object: nothing is downloaded.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import gradtrace
from zoo import assert_pass_matches, oracle_backward, oracle_grad, trainable

pytestmark = pytest.mark.slow  # real transformers models: run by the full suite, not the dev loop

transformers = pytest.importorskip("transformers")

# peft asks transformers a deprecated question; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

VOCAB = 64
SEQ = 12


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _lora_gpt2():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _gpt2(),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True),
    )
    # a trainable final norm, so that a pass with the adapters disabled still has a graph
    for name, p in model.named_parameters():
        if ".ln_f." in name:
            p.requires_grad_(True)
    return model


def _tokens(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (2, SEQ), generator=g)


def loss_x(model, ids):
    """Language-model loss (the X pass)."""
    return model(input_ids=ids, labels=ids).loss


def loss_y(model, ids, tap=lambda name, t: t):
    """Policy-gradient-style loss on sequence log-probs ``S`` (the Y pass)."""
    logits = model(input_ids=ids).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    S = tap("S", token_logp.sum(-1))
    A = tap("A", torch.tensor([1.0, -0.5]))
    return -(S * A).mean()


@pytest.fixture(params=["gpt2", "gpt2_lora"])
def lm(request):
    return _gpt2() if request.param == "gpt2" else _lora_gpt2()


def test_x_and_y_passes_match_oracle(lm):
    x_batches = [_tokens(s) for s in (0, 1, 2)]
    y_batches = [_tokens(s) for s in (10, 11)]
    want_x = oracle_backward(copy.deepcopy(lm), x_batches, loss_x)
    want_y = oracle_grad(copy.deepcopy(lm), y_batches, loss_y)
    names = [n for n, _ in trainable(lm)]
    params = [p for _, p in trainable(lm)]

    with gradtrace.watch(lm) as trace:
        with trace.pass_("X"):
            for ids in x_batches:
                loss_x(lm, ids).backward()
        with trace.pass_("Y"):
            for ids in y_batches:
                torch.autograd.grad(loss_y(lm, ids, trace.tensor), params, allow_unused=True)

    assert_pass_matches(trace.passes["X"], want_x, via="backward")
    assert_pass_matches(trace.passes["Y"], want_y, via="grad")
    assert trace.passes["X"].runs == 3 and trace.passes["Y"].runs == 2
    assert set(trace.passes["X"].params) == set(names)

    S = trace.tensors["S"]
    assert S.requires_grad and S.grads["Y"].reached and not S.grads["Y"].zero
    assert S.grads["Y"].hits == 2
    assert "X" not in S.grads or not S.grads["X"].reached
    # upstream gradient at S: the oracle is dL/dS from plain autograd on a copy
    ref = copy.deepcopy(lm)
    upstream = []
    for ids in y_batches:
        taps = {}
        loss = loss_y(ref, ids, lambda name, t, taps=taps: taps.setdefault(name, t))
        upstream.append(torch.autograd.grad(loss, taps["S"])[0])
    want_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in upstream))
    assert math.isclose(S.grads["Y"].norm, want_norm, rel_tol=1e-5)
    assert math.isclose(S.grads["Y"].max_abs, max(float(g.abs().max()) for g in upstream), rel_tol=1e-5)
    assert S.grads["Y"].nonfinite == 0
    assert not trace.tensors["A"].requires_grad
    assert not [v for v in trace.verdicts() if v.severity == "error"], trace.report()

    if any("lora_" in n for n in names):
        lora_a = {n for n in names if "lora_A" in n}
        lora_b = {n for n in names if "lora_B" in n}
        assert lora_a and lora_b
        # lora_B starts at zero: lora_A is reached with an exactly-zero gradient
        assert trace.passes["X"].zero == lora_a
        assert lora_b <= trace.passes["X"].covered - trace.passes["X"].zero
    else:
        # tied weights: one name for the embedding and the head, reached once per run
        assert "lm_head.weight" not in names
        assert trace.passes["X"].records["transformer.wte.weight"].hits == 3


def test_disable_adapter_gap_is_exactly_the_lora_params():
    model = _lora_gpt2()
    names = [n for n, _ in trainable(model)]
    lora = {n for n in names if "lora_" in n}
    rest = set(names) - lora
    assert lora and rest
    batches = [_tokens(s) for s in (0, 1)]
    want_on = oracle_backward(copy.deepcopy(model), batches, loss_x)
    base = copy.deepcopy(model)
    with base.disable_adapter():
        want_off = oracle_backward(base, batches, loss_x)

    with gradtrace.watch(model) as trace:
        with trace.pass_("adapters"):
            for ids in batches:
                loss_x(model, ids).backward()
        model.zero_grad(set_to_none=True)
        with model.disable_adapter():
            with trace.pass_("no_adapters"):
                for ids in batches:
                    loss_x(model, ids).backward()

    assert_pass_matches(trace.passes["adapters"], want_on, via="backward")
    off = trace.passes["no_adapters"]
    assert off.covered == want_off.covered == rest
    assert off.missing == lora
    for n in rest:
        assert math.isclose(off.records[n].norm, want_off.norm(n), rel_tol=1e-5), n
        assert off.records[n].hits == 2

    d = trace.diff("adapters", "no_adapters")
    assert d.only_a == lora
    assert d.only_b == set()
    assert d.both == rest
    for n in rest:
        assert math.isclose(d.ratios[n], want_off.norm(n) / want_on.norm(n), rel_tol=1e-5), n
    gaps = [v for v in trace.verdicts() if v.code == "COVERAGE_GAP"]
    assert gaps, "the gap between the passes is not reported"
    evidence = " ".join(str(v.evidence) for v in gaps)
    assert "adapters" in evidence and "no_adapters" in evidence
