"""Exactly zero gradients explained by an all-zero parameter of the same module, not by names.

peft's Embedding LoRA starts ``lora_embedding_A`` at zero (so ``lora_embedding_B``'s first gradient is exactly
zero), cloneofsimo's LoRA starts ``lora_up`` at zero (so ``lora_down``'s is): healthy first steps, info. Both
factors at zero is a real fault (nothing can ever move): an error that names them. Oracles: the gradients
torch itself computes (``torch.autograd.grad``) and the parameters' values.
"""
import json

import pytest
import torch
from torch import nn

import gradtrace
from scenarios import InjectedLoRA  # cloneofsimo/lora's layer, as the scenario suite builds it


def zero_grads(trace):
    return [v for v in trace.verdicts() if v.code == "ZERO_GRADS"]


def lora_net(down_zero=False):
    torch.manual_seed(0)
    return nn.Sequential(InjectedLoRA(8, 8, down_zero=down_zero), nn.Tanh(), InjectedLoRA(8, 8, down_zero=down_zero))


def oracle_zero(model, x):
    """Which trainable parameters torch gives an exactly zero gradient."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(x).pow(2).mean(), [p for _, p in named], allow_unused=True)
    return {n for (n, _), g in zip(named, grads, strict=True) if g is not None and not g.any()}


def test_lora_down_with_lora_up_at_zero_is_info_naming_lora_up():
    model, x = lora_net(), torch.randn(4, 8)
    assert oracle_zero(model, x) == {"0.lora_down.weight", "2.lora_down.weight"}
    with gradtrace.watch(model) as trace:
        model(x).pow(2).mean().backward()
    (v,) = zero_grads(trace)
    assert v.severity == "info" and v.evidence["zero_valued"] == ["0.lora_up.weight", "2.lora_up.weight"]
    assert "because '0.lora_up.weight', '2.lora_up.weight' are all zeros (their initialisation)" in v.message
    assert trace.report().splitlines()[0] == "gradtrace: no problems found."


def test_both_factors_at_zero_is_an_error_naming_both():
    model, x = lora_net(down_zero=True), torch.randn(4, 8)
    assert oracle_zero(model, x) == {n for n, p in model.named_parameters() if p.requires_grad}
    with gradtrace.watch(model) as trace:
        model(x).pow(2).mean().backward()
    (v,) = zero_grads(trace)
    assert v.severity == "error" and set(v.evidence["zero_valued"]) == {
        "0.lora_down.weight", "0.lora_up.weight", "2.lora_down.weight", "2.lora_up.weight"}
    assert "where two factors of a product are both zero" in v.message


def test_the_values_are_those_the_pass_began_with():
    """A labelled pass that steps inside itself: lora_up has moved by the time the pass ends, not when it began."""
    model, x = lora_net(), torch.randn(4, 8)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    with gradtrace.watch(model) as trace:
        with trace.pass_("step"):
            model(x).pow(2).mean().backward()
            opt.step()
    assert model[0].lora_up.weight.abs().max() > 0  # moved inside the pass
    (v,) = zero_grads(trace)
    assert v.severity == "info" and "0.lora_up.weight" in v.evidence["zero_valued"]


def test_a_zero_bias_explains_nothing():
    """A weight's zero gradient beside a zero-initialised bias: the input was zero, not the bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    nn.init.constant_(model[0].bias, -100.0)  # every ReLU dead
    nn.init.zeros_(model[2].bias)
    x = torch.randn(3, 4)
    with gradtrace.watch(model) as trace:
        model(x).sum().backward()
    (v,) = zero_grads(trace)
    assert v.severity == "warning" and "zero_valued" not in v.evidence
    assert "the input of '2' was all zeros" in v.message


def test_peft_embedding_lora_first_step_is_info():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"], lora_dropout=0.0))
    ids = torch.randint(0, 64, (2, 6))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, [p for _, p in named])
    by_name = {n.split(".")[-2]: g for (n, _), g in zip(named, grads, strict=True)}
    assert not by_name["lora_embedding_B"].any() and by_name["lora_embedding_A"].any()  # the oracle
    with gradtrace.watch(model) as trace:
        model(input_ids=ids, labels=ids).loss.backward()
    (v,) = zero_grads(trace)
    assert v.severity == "info" and v.evidence["parameters"] == [
        "base_model.model.model.embed_tokens.lora_embedding_B.default"]
    assert v.evidence["zero_valued"] == ["base_model.model.model.embed_tokens.lora_embedding_A.default"]
    assert not [v for v in trace.verdicts() if v.severity in ("error", "warning")]


def test_a_trace_saved_without_values_keeps_peft_naming(tmp_path):
    """A trace from before values were probed (no ``zero_valued``): peft's lora_A / lora_B names still explain."""
    torch.manual_seed(0)

    class Peftish(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = nn.ModuleDict({"default": nn.Linear(4, 2, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 4, bias=False)})
            nn.init.zeros_(self.lora_B["default"].weight)

        def forward(self, x):
            return self.lora_B["default"](self.lora_A["default"](x))

    model = Peftish()
    with gradtrace.watch(model) as trace:
        model(torch.randn(3, 4)).sum().backward()
    path = tmp_path / "t.json"
    trace.save(path)
    data = json.loads(path.read_text())
    for p in data["passes"]:
        assert p.pop("zero_valued") == ["lora_B.default.weight"]
    path.write_text(json.dumps(data))
    (v,) = zero_grads(gradtrace.load(path))
    assert v.severity == "info" and "each is a LoRA A matrix" in v.message


def test_candidates_are_probed_cheaply_and_dropped_once_they_move():
    model = lora_net()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    with gradtrace.watch(model) as trace:
        zero_values = trace._recording.recorder.watched.zero_values
        # only the zero ones, at entry
        assert [zero_values.params[i] is model[k].lora_up.weight
                for i, k in zip(zero_values.candidates, (0, 2), strict=True)] == [True, True]
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
        trace.verdicts()
        assert zero_values.candidates == []  # read as nonzero in step 2: never probed again
    assert [p.zero_valued is not None for p in trace.passes.values()] == [True, False]
