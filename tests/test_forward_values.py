"""NONFINITE names where the forward first went non-finite (issue 20, item 5).

Module outputs are reduced to (min, max) on the device with every call; a pass's checks are read
once, and only when its gradients turned out non-finite. The reproductions: a float16 attention whose
scores overflow (the backward blames the loss), a float16 Linear past 65504, softmax over a row
whose every score is masked, a NaN born in backward behind a finite forward.
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradtrace
from gradtrace.capture import forward_values


def line_of(marker: str) -> str:
    """file:line of the line in this file that ends with ``# <marker>``."""
    lines = inspect.getsource(inspect.getmodule(line_of)).splitlines()
    number = next(i for i, text in enumerate(lines, 1) if text.rstrip().endswith(f"# <{marker}>"))
    return f"test_forward_values.py:{number}"


class Attention(nn.Module):
    """Attention written the usual way: the scores are computed by the module's own code, not a submodule."""

    def __init__(self, d: int):
        super().__init__()
        self.q, self.k, self.v, self.wo = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, mask=None):
        scores = self.q(x) @ self.k(x).transpose(-1, -2)  # <scores>
        if mask is not None:
            scores = scores.masked_fill(mask[:, None, :] == 0, float("-inf"))
        return self.wo(scores.softmax(-1) @ self.v(x))


class TinyAttentionModel(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.emb, self.attn, self.head = nn.Linear(8, d), Attention(d), nn.Linear(d, 1)

    def forward(self, x, mask=None):
        return self.head(self.attn(self.emb(x), mask))


def overflowing_fp16_attention() -> TinyAttentionModel:
    torch.manual_seed(0)
    model = TinyAttentionModel().half()
    with torch.no_grad():  # scores of about 1e5: past float16's 65504
        model.attn.q.weight.mul_(400)
        model.attn.k.weight.mul_(400)
    return model


def fp16_step(model, trace=None):
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)).half() * 4
    loss = F.mse_loss(model(x).float(), torch.zeros(2, 5, 1))
    loss.backward()
    return loss


def test_fp16_attention_overflow_is_named_where_the_forward_went_non_finite_not_at_the_loss():
    model = overflowing_fp16_attention()
    with gradtrace.watch(model) as trace:
        assert not torch.isfinite(fp16_step(model))
    first = trace.report().splitlines()[0]
    assert first.startswith("gradtrace diagnosis: NONFINITE: pass 'backward-1': the forward first went non-finite")
    assert "module 'attn' (Attention) itself" in first and "mse_loss" not in first
    assert "float16's max 65504" in first  # the magnitudes that overflowed are said, in the dtype's terms
    found = trace.passes["backward-1"].forward_nonfinite
    assert (found.site, found.module, found.made_by, found.after) == ("input", "attn.wo", "attn", "attn.v")
    assert found.dtype == "float16" and found.dtype_max == 65504.0 and found.nan


def test_cuts_ops_names_the_op_that_overflowed_and_its_line():
    model = overflowing_fp16_attention()
    with gradtrace.watch(model, cuts="ops") as trace:
        fp16_step(model)
    first = trace.report().splitlines()[0]
    assert f"op matmul at {line_of('scores')}" in first.replace("tests/", "")
    assert "in module 'attn' (Attention): its output has inf: float16 max 65504 exceeded" in first
    found = trace.passes["backward-1"].forward_nonfinite
    assert (found.site, found.op, found.cause) == ("op", "matmul", "overflow")


class FeedForward(nn.Module):
    """T5's DenseReluDense: ``wo`` is where float16 overflows in T5."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.wi, self.wo = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.wo(torch.relu(self.wi(x)))


def test_a_float16_linear_past_65504_is_named_with_the_dtype_max():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), FeedForward(), nn.Linear(16, 1)).half()
    with torch.no_grad():
        model[1].wo.weight.mul_(1e5)
    with gradtrace.watch(model) as trace:
        model(torch.randn(3, 4).half() * 8).float().sum().backward()
    first = trace.report().splitlines()[0]
    assert "module '1.wo' (Linear) output has inf: float16 max 65504 exceeded" in first


def test_a_fully_masked_key_padding_row_is_named_in_multihead_attention():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.attn, self.head = nn.Linear(4, 16), nn.MultiheadAttention(16, 2, batch_first=True), \
                nn.Linear(16, 1)

        def forward(self, x, pad):
            h = self.emb(x)
            return self.head(self.attn(h, h, h, key_padding_mask=pad)[0]).mean()

    torch.manual_seed(0)
    model = Encoder()
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1] = True  # the second sequence is all padding
    with gradtrace.watch(model) as trace:
        model(torch.randn(2, 5, 4), pad).backward()
    first = trace.report().splitlines()[0]
    assert ("module 'attn' (MultiheadAttention) output has NaN from a fully masked softmax row (every score -inf): "
            "key_padding_mask of 'attn'") in first
    assert trace.passes["backward-1"].forward_nonfinite.cause == "masked_softmax"


def test_a_fully_masked_row_of_a_positional_0_1_mask_in_the_modules_own_code():
    torch.manual_seed(0)
    model = TinyAttentionModel(8)
    mask = torch.ones(2, 5)
    mask[0] = 0  # a float 0/1 mask (1 keeps) that keeps nothing in the first row
    with gradtrace.watch(model) as trace:
        model(torch.randn(2, 5, 8), mask).mean().backward()
    found = trace.passes["backward-1"].forward_nonfinite
    assert (found.site, found.made_by, found.cause, found.mask) == ("input", "attn", "masked_softmax",
                                                                   "mask of 'attn'")
    assert "fully masked softmax row" in trace.report().splitlines()[0]


def test_a_nan_born_in_backward_says_the_forward_was_finite():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with gradtrace.watch(model) as trace:
        (model(torch.randn(4, 3)) * 0).sqrt().sum().backward()  # sqrt at 0: a NaN-free forward, NaN gradient
    p = trace.passes["backward-1"]
    assert p.nonfinite and p.forward_nonfinite is None and p.forward_checked >= 2
    message = trace.verdicts()[0].message
    assert "every module output of the forward was finite" in message and "born in backward" in message


def test_checks_are_read_only_for_a_pass_with_nonfinite_gradients(monkeypatch):
    reads = []
    read = forward_values.Window.read
    monkeypatch.setattr(forward_values.Window, "read", lambda self: reads.append(1) or read(self))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for step in range(3):
            with trace.pass_(f"step-{step}"):
                model(torch.randn(5, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        with trace.pass_("bad"):
            (model(torch.randn(5, 4)) * float("inf")).sum().backward()
    assert trace.verdicts()[0].code == "NONFINITE"
    assert len(reads) == 1  # the healthy passes' checks were dropped unread: no host transfer for them
    checked = [p.forward_checked for p in trace.passes.values()]
    assert checked[:3] == [None, None, None] and checked[3] == 3  # x, the two Linear outputs (Tanh: pass-through)
    assert trace.passes["bad"].forward_nonfinite is None  # the multiply by inf is outside every module


def test_nothing_changes_with_forward_checks_weights_grads_optimizer_state_and_rng():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.drop, self.fc, self.head = nn.LayerNorm(6), nn.Dropout(0.3), nn.Linear(6, 6), \
                nn.Linear(6, 2)
            self.extra = [nn.Linear(6, 6)]  # unregistered: seen by the global hook, changed by nothing

        def forward(self, x):
            return self.head(self.extra[0](self.drop(torch.relu(self.fc(self.ln(x))))))

    def run(watched: bool):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.Adam(list(model.parameters()) + list(model.extra[0].parameters()), lr=1e-2)
        context = gradtrace.watch(model) if watched else None
        trace = context.__enter__() if watched else None
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 6)).pow(2).mean().backward()
            opt.step()
        grads = [p.grad.clone() for p in model.parameters()]
        if watched:
            context.__exit__(None, None, None)
            assert trace.report()
        return model, opt, grads, torch.get_rng_state()

    plain, watched = run(False), run(True)
    for a, b in zip(plain[0].state_dict().values(), watched[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    extra = zip(plain[0].extra[0].parameters(), watched[0].extra[0].parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in extra)
    assert all(torch.equal(a, b) for a, b in zip(plain[2], watched[2], strict=True))
    for sa, sb in zip(plain[1].state_dict()["state"].values(), watched[1].state_dict()["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(plain[3], watched[3])


def test_an_inference_tensor_a_module_returns_does_not_break_the_forward():
    """A module handing back a cached inference tensor (no version counter): not checked, never an error."""
    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            with torch.inference_mode():
                self.table = torch.ones(3, 4)

        def forward(self, x):
            return self.table

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.cache, self.fc = Cached(), nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) + self.cache(x)  # an add saves nothing: torch allows it

    model = Net()
    with gradtrace.watch(model) as trace:
        model(torch.randn(3, 4)).sum().backward()
    assert trace.report().startswith("gradtrace: no problems found")


def test_forward_values_off_and_a_bad_option():
    model = overflowing_fp16_attention()
    with gradtrace.watch(model, forward_values=False) as trace:
        fp16_step(model)
    assert trace.passes["backward-1"].forward_nonfinite is None and trace.passes["backward-1"].forward_checked is None
    assert "the forward first went non-finite" not in trace.verdicts()[0].message
    with pytest.raises(gradtrace.GradtraceError, match="forward_values is True or False"):
        gradtrace.watch(model, forward_values="yes").__enter__()


def test_a_saved_trace_keeps_where_the_forward_went_non_finite(tmp_path):
    model = overflowing_fp16_attention()
    with gradtrace.watch(model, cuts="ops") as trace:
        fp16_step(model)
    trace.save(tmp_path / "t.json")
    loaded = gradtrace.load(tmp_path / "t.json")
    assert loaded.passes["backward-1"].forward_nonfinite == trace.passes["backward-1"].forward_nonfinite
    assert loaded.report().splitlines()[0] == trace.report().splitlines()[0]


def test_checks_kept_while_no_pass_finishes_are_bounded(monkeypatch):
    monkeypatch.setattr(forward_values, "MAX_CHECKS", 2 * forward_values.CHUNK)
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(8)])
    with gradtrace.watch(model) as trace:
        for _ in range(300):  # forwards with grad that are never differentiated (evaluation without no_grad)
            model(torch.randn(1, 2))
        checks = trace._recording.forward_values
        assert sum(len(sites) for sites, _, _ in checks.chunks) <= 3 * forward_values.CHUNK
        assert len(checks.outputs) <= 2 * forward_values.MAX_CHECKS


def test_hooks_a_deepcopied_model_carries_are_harmless():
    """copy.deepcopy of a watched model copies its hooks (a reference model, an EMA copy): the copy's forward
    runs, is not checked under the original's names, and its layers are not 'unregistered modules'."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with gradtrace.watch(model) as trace:
        twin = copy.deepcopy(model)
        (twin(torch.randn(3, 2)) * float("nan")).sum().backward()
        model(torch.randn(3, 2)).sum().backward()
    assert twin[0].weight.grad is not None
    assert not trace.meta.unregistered_modules and not trace.verdicts()


@pytest.mark.slow
def test_a_real_llama_in_float16_names_the_attention_whose_scores_overflowed():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, tie_word_embeddings=False)
    config._attn_implementation = "eager"  # scores computed by the attention's own code, in float16
    model = transformers.LlamaForCausalLM(config).half()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(3000)
        model.model.layers[0].self_attn.k_proj.weight.mul_(3000)
    ids = torch.randint(1, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    for cuts, expected in (("modules", "the code of module 'model.layers.0.self_attn' (LlamaAttention) itself"),
                           ("ops", "in module 'model.layers.0.self_attn' (LlamaAttention): its output has inf: "
                                   "float16 max 65504 exceeded")):
        model.zero_grad()
        with gradtrace.watch(model, cuts=cuts) as trace:
            model(input_ids=ids, labels=ids).loss.backward()
        first = trace.report().splitlines()[0]
        assert "NONFINITE" in first and "the forward first went non-finite" in first and expected in first, first
        assert "NllLoss" not in first and "cross_entropy" not in first


def test_an_op_check_under_no_grad_leaves_grad_off():
    """cuts="ops" checks an in-place op's output under no_grad (it still requires grad): grad stays off."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with gradtrace.watch(model, cuts="ops"):
        h = model[0](torch.randn(2, 3))
        with torch.no_grad():
            h.mul_(2)
            assert not torch.is_grad_enabled()
        assert torch.is_grad_enabled()


def test_a_log_of_zero_under_ops_is_named_at_the_log_not_the_next_op():
    """-inf beside finite values is an additive mask only where a mask is built or moved; a log of 0 is where the
    forward went non-finite (the old code skipped it and named the mean after it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with gradtrace.watch(model, cuts="ops") as trace:
        with trace.pass_("p"):
            probs = torch.softmax(model(torch.randn(16, 4)), -1) * torch.tensor([1.0, 0.0])
            logp = torch.log(probs)
            (-logp.mean()).backward()
    first = trace.report().splitlines()[0]
    assert first.startswith("gradtrace diagnosis: NONFINITE: pass 'p': the forward first went non-finite in op log "
                            "at "), first
    assert "test_forward_values.py:" in first
