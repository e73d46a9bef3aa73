"""Deeper diagnosis (issue 11): where a NaN is born, what a detach cut off, empty generations,
exact places and names, expected patterns that stay quiet, and the demo's story.

Every scenario really produces its fault on a model built here; each assertion is checked
against what torch itself says (autograd.grad, the tensors' own values) or against the source
line that caused it.
"""
import os

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradtrace
from gradtrace.analysis.names import describe_params, group_by_module

from cut_helpers import codes
from zoo import LoRALinear

HERE = os.path.basename(__file__)
SOURCE = open(__file__).read().splitlines()


def line_of(marker):
    """``test_diagnosis.py:N`` of the one source line that ends with ``# <marker>`` (locations end with it)."""
    (number,) = [i + 1 for i, text in enumerate(SOURCE) if text.rstrip().endswith(f"# <{marker}>")]
    return f"{HERE}:{number}"


def verdict(trace, code):
    found = [v for v in trace.verdicts() if v.code == code]
    assert found, [str(v) for v in trace.verdicts()]
    return found[0]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.side = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


# ---- 1. where a NaN/Inf gradient is born --------------------------------------------------


def sqrt_at_zero_loss(net, x):
    h = net.body(x)
    spread = (h - h).pow(2).sum(-1)  # exactly zero: sqrt's derivative there is infinite
    return net.head(h).sum() + spread.sqrt().sum()  # <sqrt>


def test_ops_mode_names_the_op_line_and_a_finite_forward(net):
    with gradtrace.watch(net, cuts="ops") as trace:
        with trace.pass_("X"):
            sqrt_at_zero_loss(net, torch.randn(3, 4)).backward()
    assert trace.passes["X"].nonfinite > 0
    assert not torch.isfinite(net.body.weight.grad).all()  # the fault is real
    origin = trace.passes["X"].nonfinite_origin
    assert origin["op"] == "sqrt" and origin["node"] == "SqrtBackward0"
    assert origin["location"].endswith(line_of("sqrt")) and origin["forward"] == "finite"
    v = trace.verdicts()[0]
    assert v.code == "NONFINITE" and v.evidence["origin"] == origin
    assert "sqrt" in v.message and line_of("sqrt") in v.message and "only the gradient" in v.message


def test_a_non_finite_forward_value_is_told_apart(net):
    with gradtrace.watch(net, cuts="ops") as trace:
        with trace.pass_("X"):
            h = net.body(torch.randn(3, 4))
            wall = torch.tensor([0.0, float("inf"), 0.0, 0.0])
            (net.head(h).sum() + (h * wall).sum()).backward()  # <mul-inf>
    origin = trace.passes["X"].nonfinite_origin
    assert origin["op"] == "mul" and origin["location"].endswith(line_of("mul-inf"))
    assert origin["forward"] == "nonfinite"
    # The forward went non-finite first, at that op: that, not the backward that only carried it, leads.
    message = trace.verdicts()[0].message
    assert "forward first went non-finite in op mul" in message and line_of("mul-inf") in message
    assert "has inf (" in message and "max" not in message  # float32: not called an overflow


def test_origin_is_inside_the_module_that_ran_it():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x):
            return self.inner(x).sum(-1)

    class Normalised(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Root()

        def forward(self, x):
            y = self.block(x)
            return y / (y - y)  # <div-zero>

    torch.manual_seed(0)
    model = Normalised()
    with gradtrace.watch(model, cuts="ops") as trace:
        model(torch.randn(2, 3)).sum().backward()
    (p,) = trace.passes.values()
    assert p.nonfinite_origin["location"].endswith(line_of("div-zero"))
    assert p.nonfinite_origin["op"] in ("div", "__truediv__")


def test_default_mode_says_the_one_line_change(net):
    with gradtrace.watch(net) as trace:
        with trace.pass_("X"):
            sqrt_at_zero_loss(net, torch.randn(3, 4)).backward()
    v = trace.verdicts()[0]
    assert v.code == "NONFINITE" and trace.passes["X"].nonfinite_origin is None
    assert 'cuts="ops"' in v.message


def test_ops_mode_leaves_gradients_alone_and_a_healthy_run_quiet(net):
    x = torch.randn(3, 4)
    used = [net.body.weight, net.body.bias, net.head.weight, net.head.bias]
    expected = torch.autograd.grad(net(x).sum(), used)
    with gradtrace.watch(net, cuts="ops") as trace:
        with trace.pass_("Y"):
            got = torch.autograd.grad(net(x).sum(), used)
    assert all(torch.equal(e, g) for e, g in zip(expected, got, strict=True))
    assert trace.passes["Y"].nonfinite_origin is None
    assert "NONFINITE" not in codes(trace)


def test_origin_survives_save_and_load(net, tmp_path):
    with gradtrace.watch(net, cuts="ops") as trace:
        with trace.pass_("X"):
            sqrt_at_zero_loss(net, torch.randn(3, 4)).backward()
    trace.save(tmp_path / "t.json")
    loaded = gradtrace.load(tmp_path / "t.json")
    assert loaded.passes["X"].nonfinite_origin == trace.passes["X"].nonfinite_origin
    assert loaded.verdicts() == trace.verdicts()


# ---- 2. a module whose output was cut downstream, in the default mode ---------------------


class SideNet(Net):
    def forward(self, x):
        h = self.body(x)
        aux = self.side(h).detach()  # <detach-side>
        return self.head(h + aux)


def side_model():
    torch.manual_seed(0)
    return SideNet()


def test_detached_module_output_is_explained_in_the_default_mode():
    model = side_model()
    x = torch.randn(3, 4)
    oracle = torch.autograd.grad(model(x).sum(), list(model.parameters()), allow_unused=True)
    unreached = {n for (n, _), g in zip(model.named_parameters(), oracle, strict=True) if g is None}
    assert unreached == {"side.weight", "side.bias"}
    with gradtrace.watch(model) as trace:
        model(x).sum().backward()
    v = verdict(trace, "DETACHED_OUTPUT")
    assert v.evidence["module"] == "side" and set(v.evidence["parameters"]) == unreached
    assert "the output of 'side' never received a gradient" in v.message and 'cuts="ops"' in v.message
    assert codes(trace).index("DETACHED_OUTPUT") < codes(trace).index("UNUSED_PARAMS")


def test_with_op_cuts_it_names_the_detach_and_its_line():
    model = side_model()
    with gradtrace.watch(model, cuts="ops") as trace:
        model(torch.randn(3, 4)).sum().backward()
    v = verdict(trace, "DETACHED_OUTPUT")
    assert v.evidence["op"] == "detach" and v.evidence["location"].endswith(line_of("detach-side"))


@pytest.mark.parametrize("how", ["never_called", "partly_reached", "under_no_grad"])
def test_no_detached_output_when_the_module_output_did_not_need_one(how, net):
    """A module never called, one of whose parameters got a gradient, or run without grad: no claim."""
    with gradtrace.watch(net) as trace:
        if how == "partly_reached":
            (net(torch.randn(3, 4)).sum() + net.side.weight.sum()).backward()
        elif how == "under_no_grad":
            with torch.no_grad():
                net.side(torch.randn(3, 4))
            net(torch.randn(3, 4)).sum().backward()
        else:
            net(torch.randn(3, 4)).sum().backward()
    assert "DETACHED_OUTPUT" not in codes(trace)
    # what was recorded: the pass, its coverage, and the side module's no_grad call (a cut, no claim)
    (recorded,) = trace.passes.values()
    main = {"body.weight", "body.bias", "head.weight", "head.bias"}
    assert recorded.covered == main | ({"side.weight"} if how == "partly_reached" else set())
    assert [(c.kind, c.module) for c in trace.cuts] == ([("no_grad", "side")] if how == "under_no_grad" else [])


# ---- 3. row facts of masks and groups -----------------------------------------------------


def left_padded(rows=16, prompt=6, new=8, seed=0):
    """A left-padded batch: prompts of 3..6 tokens, then ``new`` generated tokens in every row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, prompt + 1, (rows,), generator=g)
    attn = torch.zeros(rows, prompt + new, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        attn[i, prompt - n:] = 1
    return attn


def generation_mask(attn, prompt_len, eos_at=None):
    mask = torch.zeros_like(attn, dtype=torch.bool)
    mask[:, prompt_len:] = True
    if eos_at is not None:
        for row in eos_at:
            mask[row] = False  # a zero-length generation (EOS first)
    return mask


def test_five_empty_generations_of_sixteen_are_a_warning_with_lengths():
    attn = left_padded()
    mask = generation_mask(attn, 6, eos_at=[1, 4, 7, 9, 13])
    with gradtrace.watch(nn.Linear(2, 2)) as trace:
        trace.tensor("gen_mask", mask)  # a bool tensor is a mask without being told
    v = verdict(trace, "EMPTY_ROWS")
    assert v.severity == "warning"
    assert v.evidence["empty_rows"] == 5 and v.evidence["rows"] == 16
    assert v.evidence["fraction"] == pytest.approx(5 / 16)
    lengths = mask.sum(-1).float()
    facts = trace.tensors["gen_mask"].row_facts
    assert facts["selected_min"] == lengths.min() and facts["selected_max"] == lengths.max()
    assert facts["selected_sum"] / facts["rows"] == pytest.approx(lengths.mean().item())
    report = trace.report()
    assert f"mean {lengths.mean().item():.1f}, min 0, max 8" in report and "5/16" in report


def test_every_row_empty_is_an_error():
    with gradtrace.watch(nn.Linear(2, 2)) as trace:
        trace.tensor("gen_mask", torch.zeros(4, 7), role="mask")  # a 0/1 float mask, said in one word
    v = verdict(trace, "EMPTY_ROWS")
    assert v.severity == "error" and v.evidence["empty_rows"] == 4 and v.evidence["fraction"] == 1.0


def test_rows_merge_over_microbatches():
    attn = left_padded()
    mask = generation_mask(attn, 6, eos_at=[0, 9])
    with gradtrace.watch(nn.Linear(2, 2)) as trace:
        for part in mask.split(4):
            trace.tensor("gen_mask", part)
    assert verdict(trace, "EMPTY_ROWS").evidence == {
        "tensor": "gen_mask", "rows": 16, "empty_rows": 2, "fraction": 2 / 16, "empty_with_tokens": 0}


def test_padding_side_and_a_completion_mask_on_padding():
    attn = left_padded()
    with gradtrace.watch(nn.Linear(2, 2)) as trace:
        trace.tensor("attention_mask", attn, role="attention_mask")
        # a loss mask that starts at position 1 for every row: it covers the left padding too
        own = torch.zeros_like(attn, dtype=torch.bool)
        own[:, 1:] = True
        trace.tensor("gen_mask", own, role="completion_mask", attention_mask=attn)
    assert trace.tensors["attention_mask"].padding_side == "left"
    on_padding = int((own & (attn == 0)).sum())
    assert on_padding > 0
    v = verdict(trace, "MASK_ON_PADDING")
    assert v.evidence["on_padding"] == on_padding and "left padding" in v.message
    assert "left" in trace.report()


def test_an_empty_completion_mask_where_the_sequence_has_tokens_points_at_alignment():
    attn = left_padded()
    mask = generation_mask(attn, attn.size(1))  # prompt_len read from the sequences' width
    with gradtrace.watch(nn.Linear(2, 2)) as trace:
        trace.tensor("gen_mask", mask, role="completion_mask", attention_mask=attn)
    v = verdict(trace, "EMPTY_ROWS")
    assert v.severity == "error" and v.evidence["empty_with_tokens"] == 16
    assert "aligns with the attention mask's padding" in v.message


def test_a_next_token_mask_pairs_with_the_attention_mask_shifted():
    attn = left_padded()
    mask = generation_mask(attn, 6)[:, 1:]  # over log p(ids[t+1] | ids[:t+1])
    with gradtrace.watch(nn.Linear(2, 2)) as trace:
        trace.tensor("mask", mask, role="completion_mask", attention_mask=attn)
    assert trace.tensors["mask"].row_facts["on_padding"] == 0
    assert codes(trace) == []


def test_aligned_masks_and_varied_groups_are_quiet():
    attn = left_padded()
    with gradtrace.watch(nn.Linear(2, 2)) as trace:
        trace.tensor("attention_mask", attn, role="attention_mask")
        trace.tensor("gen_mask", generation_mask(attn, 6), role="completion_mask", attention_mask=attn)
        trace.tensor("A", torch.randn(4, 4), role="group")
    assert codes(trace) == []
    assert trace.report().startswith("gradtrace: no problems found.")


def test_group_std_histogram():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1e-7, 0.0], [0.0, 0.5, 1.0], [0.2, 0.2, 0.2]])
    with gradtrace.watch(nn.Linear(2, 2)) as trace:
        trace.tensor("rewards", rewards, role="group")
    facts = trace.tensors["rewards"].row_facts
    std = rewards.double().std(-1, unbiased=False)
    assert facts["std 0"] == int((std == 0).sum()) == 2
    assert facts["std <1e-6"] == int(((std > 0) & (std < 1e-6)).sum()) == 1
    assert facts["std >=1e-1"] == 1
    assert "0: 2, <1e-6: 1, >=1e-1: 1" in trace.report()


def test_row_facts_survive_save_and_load(tmp_path):
    attn = left_padded()
    with gradtrace.watch(nn.Linear(2, 2)) as trace:
        trace.tensor("gen_mask", generation_mask(attn, 6, eos_at=[2]), role="completion_mask", attention_mask=attn)
    trace.save(tmp_path / "t.json")
    loaded = gradtrace.load(tmp_path / "t.json")
    assert loaded.tensors["gen_mask"].row_facts == trace.tensors["gen_mask"].row_facts
    assert loaded.verdicts() == trace.verdicts() and loaded.report() == trace.report()


@pytest.mark.parametrize("kwargs, message", [
    ({"role": "advantages"}, "role is one of"),
    ({"role": "completion_mask", "attention_mask": torch.ones(3, 9)}, "shape"),
    ({"role": "completion_mask", "attention_mask": [1, 0]}, "takes a torch.Tensor"),
], ids=["unknown-role", "shape-mismatch", "not-a-tensor"])
def test_bad_row_options_are_one_clear_error(kwargs, message):
    with gradtrace.watch(nn.Linear(2, 2)) as trace:
        with pytest.raises(gradtrace.GradtraceError, match=message):
            trace.tensor("m", torch.ones(2, 5, dtype=torch.bool), **kwargs)
        assert "m" not in trace.tensors  # nothing half-recorded


# ---- 4. exact places and names --------------------------------------------------------------


class CheckpointedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(4, 1)

    def block(self, x):
        return self.layers[1](self.layers[0](x))

    def forward(self, x):
        x = x.requires_grad_()
        h = checkpoint(self.block, x, use_reentrant=True)  # <checkpoint-call>
        return self.head(h)


def test_a_checkpoint_cut_points_at_the_checkpoint_call():
    torch.manual_seed(0)
    model = CheckpointedNet()
    with gradtrace.watch(model) as trace:
        with trace.pass_("Y"):
            loss = model(torch.randn(3, 4)).sum()
            torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    cuts = [c for c in trace.cuts if c.kind == "checkpoint"]
    assert cuts and all(c.location.endswith(line_of("checkpoint-call")) for c in cuts)


def test_module_groups_name_the_members_concerned():
    universe = [f"layers.{i}.fc.{w}" for i in range(4) for w in ("weight", "bias")] + ["head.weight"]
    assert list(group_by_module(["layers.0.fc.weight", "layers.0.fc.bias"], universe)) == ["layers.0.fc"]
    assert list(group_by_module(["layers.0.fc.weight", "layers.3.fc.weight"], universe)) == ["layers.{0,3}.fc"]
    assert list(group_by_module([p for p in universe if p.startswith("layers.")], universe)) == ["layers.*.fc"]
    # without the model's parameter list, several members are listed, never rolled into "*"
    assert list(group_by_module(["layers.1.fc.weight", "layers.2.fc.weight"])) == ["layers.{1,2}.fc"]
    nested = [f"blocks.{i}.attn.q.weight" for i in range(3)]
    assert describe_params(nested[:1], universe=nested) == "blocks.0.attn.q (1 param)"
    assert describe_params(nested, universe=nested) == "blocks.*.attn.q (3 params)"


def test_a_cut_of_layer_zero_only_is_written_layer_zero():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(3, 3), nn.Tanh()) for _ in range(3)])
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            model(torch.randn(2, 3)).sum().backward()
        with trace.pass_("Y"):
            with torch.no_grad():
                h = model[0](torch.randn(2, 3))
            torch.autograd.grad(model[2](model[1](h)).sum(), list(model.parameters()), allow_unused=True)
    v = verdict(trace, "GRAPH_CUT")
    assert set(v.evidence["lost"]) == {"0.0.weight", "0.0.bias"}
    assert "0.0 (2 params)" in v.message and "*" not in v.message


# ---- 5. expected patterns stay quiet ----------------------------------------------------------


def test_lora_a_zero_while_b_is_zero_is_info_below_everything():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(4, 4), nn.Tanh(), LoRALinear(4, 4))
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            model(torch.randn(5, 4)).pow(2).sum().backward()
    for i in (0, 2):  # the fault pattern is real: A's gradient is exactly zero, B's is not
        assert model[i].lora_A.grad.abs().max() == 0 and model[i].lora_B.grad.abs().max() > 0
    v = verdict(trace, "ZERO_GRADS")
    assert v.severity == "info" and v.evidence["zero_partner"] is True
    assert trace.report().startswith("gradtrace: no problems found.")


def test_a_zero_gradient_without_that_explanation_stays_a_warning():
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            (model["a"](torch.randn(2, 3)).sum() + 0 * model["b"](torch.randn(2, 3)).sum()).backward()
    v = verdict(trace, "ZERO_GRADS")
    assert v.severity == "warning" and not v.evidence["zero_partner"]
    assert trace.report().startswith("gradtrace diagnosis: ZERO_GRADS")


@pytest.mark.slow
def test_healthy_tiny_gpt2_lora_first_step_reports_no_problems():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    base = transformers.GPT2LMHeadModel(config)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    ids = torch.randint(0, 64, (2, 12))
    with gradtrace.watch(model) as trace:
        with trace.pass_("step1"):
            model(input_ids=ids, labels=ids).loss.backward()
    zero = trace.passes["step1"].zero
    assert zero and all("lora_A" in n for n in zero)  # the expected pattern happened
    assert all(model.get_parameter(n).grad.abs().max() == 0 for n in zero)
    v = verdict(trace, "ZERO_GRADS")
    assert v.severity == "info"
    assert trace.report().startswith("gradtrace: no problems found."), trace.report()[:400]


# ---- 6. the inner-product table -------------------------------------------------------------


def test_share_has_the_sign_of_the_contribution_and_the_figures_are_explained():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    with gradtrace.watch(model, keep_grads=True) as trace:
        x = torch.randn(4, 3)
        with trace.pass_("X"):
            model(x).sum().backward()
        model.zero_grad()
        with trace.pass_("Y"):
            torch.autograd.grad(-model(x).sum() + model.weight.pow(2).sum() * 0.01, list(model.parameters()))
        d = trace.diff("X", "Y")
    assert d.dot < 0
    table = str(d)
    for t in d.top:
        share = t["contribution"] / abs(d.dot)
        assert (t["share"] > 0) == (t["contribution"] > 0)
        assert f"{share:.1%}" in table
    assert "share: a parameter's contribution / |dot|" in table and "-100%" in table
    assert "cosine: dot / (norm a * norm b)" in table


# ---- 7. the demo tells the story ---------------------------------------------------------------


@pytest.mark.slow
def test_demo_without_flags_shows_the_symptom_and_the_cause(capsys):
    from gradtrace import cli, demo

    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "deltaH1: -0.000000" in out  # the original symptom
    first = next(line for line in out.splitlines() if line.startswith("gradtrace diagnosis:"))
    assert "ROUNDS_TO_ZERO" in first and "second moments are extreme" in first
    assert "a loss scale never unscaled" in first  # the hidden cause, on gradtrace's own first line
    assert demo.BUGS[demo.STORY_BUG] in out  # the hidden cause, said after gradtrace found it
    assert "deltaH1 = -lr * U_cross" in out and "U_cross = sum over parameters" in out
    assert "cosine: not given for a preconditioned product" in out
    assert "python -m gradtrace demo --healthy" in out and "--bug all" in out
    assert all(name in out for name in demo.BUGS)


@pytest.mark.slow
def test_demo_healthy_and_bug_none_are_the_same_probe(capsys):
    from gradtrace import cli

    assert cli.main(["demo", "--bug", "none"]) == 0
    first = capsys.readouterr().out
    assert cli.main(["demo", "--healthy"]) == 0
    assert capsys.readouterr().out == first
    assert "healthy run (no bug)" in first and "gradtrace: no problems found." in first


def test_a_graph_built_in_the_watch_and_run_after_it_records_nothing(net):
    with gradtrace.watch(net, cuts="ops") as trace:
        loss = sqrt_at_zero_loss(net, torch.randn(3, 4))
    loss.backward()  # the node hooks outlive the watch; they must not record into a closed trace
    assert trace._recording.origins.flags == [] and trace.passes == {}
