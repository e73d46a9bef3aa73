"""Tied parameters: listed in every report, TIED_FROZEN when a freeze went through the twin (issue 20, item 7).

``named_parameters()`` gives a tied tensor once, under its first name: a loop that unfreezes
``lm_head`` by name never sees ``lm_head.weight``, and freezing the embeddings freezes the head.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gradtrace
from gradtrace.capture.tied import tied_parameters


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 16, d: int = 8, head_bias: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.body = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=head_bias)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.embed(ids)))).logsumexp(-1).mean()


def _ids():
    return torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))


def test_freezing_the_embeddings_froze_the_head_with_a_bias_that_trains():
    torch.manual_seed(0)
    model = TiedLM(head_bias=True)
    model.embed.weight.requires_grad_(False)  # meant: freeze the input embeddings only
    with gradtrace.watch(model) as trace:
        model(_ids()).backward()
    first = trace.report().splitlines()[0]
    assert first.startswith("gradtrace diagnosis: TIED_FROZEN: 'head.weight' is frozen because it is the same "
                            "tensor as 'embed.weight' (tied weights): freezing one froze both, but 'head.bias' in "
                            "the same module trains")
    assert trace.verdicts()[0].severity == "warning"
    assert trace.meta.tied_params[0].names == ["embed.weight", "head.weight"]


def test_every_report_lists_tied_pairs_and_a_trainable_pair_is_no_finding():
    model = TiedLM()
    with gradtrace.watch(model) as trace:
        model(_ids()).backward()
    report = trace.report()
    assert report.startswith("gradtrace: no problems found")
    section = report.split("tied parameters (one tensor under several names; figures are under the first name)\n")[1]
    assert "embed.weight, head.weight  yes" in section.splitlines()[2]


@pytest.mark.slow  # seconds each: the dev loop stays under a minute
def test_a_shared_module_under_two_names_and_a_deep_chain():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    found = {tuple(names) for _, names in tied_parameters(model)}
    assert found == {("0.weight", "2.weight"), ("0.bias", "2.bias")}
    deep = nn.Sequential()
    node = deep
    for _ in range(3000):  # no recursion
        child = nn.Sequential(nn.Linear(1, 1))
        node.append(child)
        node = child
    assert tied_parameters(deep) == []


@pytest.mark.slow
def test_gpt2_unfrozen_by_name_keeps_its_tied_lm_head_frozen():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    for name, p in model.named_parameters():  # the usual "train only the head" loop: lm_head.weight never comes
        p.requires_grad = "lm_head" in name or "ln_f" in name
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with gradtrace.watch(model) as trace:
        model(input_ids=ids, labels=ids).loss.backward()
    first = trace.report().splitlines()[0]
    assert first.startswith("gradtrace diagnosis: TIED_FROZEN: 'lm_head.weight' is frozen because it is the same "
                            "tensor as 'transformer.wte.weight'")
    assert "'lm_head' is named like a part that is trained" in first


@pytest.mark.slow
def test_lora_on_a_tied_qwen2_is_healthy_and_lists_the_frozen_pair():
    pytest.importorskip("peft")
    from tiny_trainer import make_qwen2, with_lora

    model = with_lora(make_qwen2(32))
    ids = torch.randint(1, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    with gradtrace.watch(model) as trace:
        model(input_ids=ids, labels=ids).loss.backward()
    assert not [v for v in trace.verdicts() if v.code == "TIED_FROZEN"]  # adapters train: a frozen head is the plan
    tied = trace.meta.tied_params
    assert len(tied) == 1 and not tied[0].requires_grad
    assert [n.rsplit(".", 2)[-2] for n in tied[0].names] == ["embed_tokens", "lm_head"]
    assert "no (frozen through every name)" in trace.report()
