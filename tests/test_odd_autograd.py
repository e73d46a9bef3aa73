"""Odd but legal autograd uses, threads, and cost that must not grow: each a regression named after what broke."""
import sys
import threading
import time

import pytest
import torch
from torch import nn

import gradtrace


def test_is_grads_batched_works_under_watch_and_says_figures_are_unknown():
    """Regression: autograd.grad(..., is_grads_batched=True) raised at pass end (flatten_dense_tensors)."""
    lin = nn.Linear(3, 2)
    out = lin(torch.randn(3))
    with gradtrace.watch(lin) as trace:
        with trace.pass_("J"):
            (jac,) = torch.autograd.grad(out, [lin.weight], grad_outputs=torch.eye(2), is_grads_batched=True)
    assert jac.shape == (2, 2, 3)
    p = trace.passes["J"]
    assert p.covered == {"weight"} and p.cleared == {"weight"} and p.zero == set()
    assert [v.code for v in trace.verdicts() if v.severity != "info"] == ["UNUSED_PARAMS"]  # the bias: not asked for


def test_complex_parameters_keep_the_imaginary_part():
    """Regression: norm and max |g| of complex gradients dropped the imaginary part."""
    p = nn.Parameter(torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64))
    with gradtrace.watch([("p", p)]) as trace:
        with trace.pass_("X"):
            (p * torch.tensor([2j, -1 + 1j], dtype=torch.complex64)).abs().sum().backward()
    record = trace.passes["X"].records["p"]
    assert record.norm == pytest.approx(torch.linalg.vector_norm(p.grad).item(), rel=1e-6)
    assert record.max_abs == pytest.approx(p.grad.abs().max().item(), rel=1e-6)


def test_a_meta_tensor_is_refused_when_registered_not_at_report_time():
    """Regression: trace.tensor() accepted a meta tensor, then report() raised NotImplementedError."""
    model = nn.Linear(2, 1)
    with gradtrace.watch(model) as trace:
        with pytest.raises(gradtrace.GradtraceError, match="meta tensor"):
            trace.tensor("S", torch.empty(3, device="meta"))
        model(torch.ones(1, 2)).sum().backward()
    assert isinstance(trace.report(), str)


def test_a_pass_label_in_one_thread_does_not_capture_runs_of_another():
    """Regression: the open label was shared by every thread."""
    model = nn.Linear(2, 1)
    labelled, other_done = threading.Event(), threading.Event()

    def other_thread():
        labelled.wait(10)
        model(torch.ones(1, 2)).sum().backward()  # unlabelled: a pass of its own
        other_done.set()

    with gradtrace.watch(model) as trace:
        worker = threading.Thread(target=other_thread)
        worker.start()
        with trace.pass_("main"):
            labelled.set()
            assert other_done.wait(10)
            model(torch.ones(1, 2)).sum().backward()
        worker.join(10)
    assert trace.passes["main"].runs == 1 and not trace.passes["main"].auto
    assert len(trace.passes) == 2 and sum(p.auto for p in trace.passes.values()) == 1


def test_two_threads_two_models_two_watches_match_the_oracle():
    models = [nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)) for _ in range(2)]
    models[1][1].requires_grad_(False)
    traces, grads = {}, {}

    def train(i):
        model = models[i]
        with gradtrace.watch(model) as trace:
            for step in range(20):
                with trace.pass_(f"step{step}", step_start=True):
                    model(torch.randn(4, 3)).sum().backward()
                    grads.setdefault(i, []).append({n for n, p in model.named_parameters() if p.grad is not None})
                model.zero_grad()
        traces[i] = trace

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(2):
        assert [p.covered for p in traces[i].passes.values()] == grads[i]
        assert all(p.runs == 1 for p in traces[i].passes.values())


def deep(depth):
    class Nest(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.inner = Nest(d - 1) if d > 1 else None

    return Nest(depth)


@pytest.mark.slow  # seconds each: the dev loop stays under a minute
def test_watch_entry_on_a_3000_deep_model_is_fast():
    """Regression: entry was cubic in the nesting depth (3,000 deep: ~250 s)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))  # the model itself: building it recurses
    try:
        model = deep(3000)
        start = time.thread_time()  # CPU time of this thread: a busy machine does not fail it
        with gradtrace.watch(model) as trace:
            pass
        cpu = time.thread_time() - start
    finally:
        sys.setrecursionlimit(limit)
    assert len(trace.params) == 6000
    assert cpu < 3.0, cpu  # ~0.5 s of CPU; the cubic walk took ~250 s


@pytest.mark.slow  # 20,000 training steps
def test_report_after_20000_passes_is_fast():
    """Regression: report() was quadratic in the number of passes (20,000 steps: ~445 s)."""
    lin = nn.Linear(2, 1)
    with gradtrace.watch(lin, max_passes=None) as trace:
        for _ in range(20_000):
            lin(torch.ones(1, 2)).sum().backward()
    start = time.thread_time()
    report = trace.report()
    assert time.thread_time() - start < 5.0  # ~1.3 s of CPU; the quadratic report took ~445 s
    assert len(trace.passes) == 20_000 and len(report.splitlines()) < 60


@pytest.mark.slow  # seconds each: the dev loop stays under a minute
def test_report_on_a_flat_1000_module_model_is_fast():
    """Regression: report() was O(module groups x passes x params) on a flat nn.Sequential."""
    flat = nn.Sequential(*[nn.Linear(2, 2) for _ in range(1000)])
    with gradtrace.watch(flat) as trace:
        for i in range(10):
            with trace.pass_(f"p{i}"):
                flat(torch.randn(1, 2)).sum().backward()
            flat.zero_grad()
    start = time.thread_time()
    trace.report()
    assert time.thread_time() - start < 2.0  # ~0.15 s of CPU


def test_a_hook_registered_after_watch_that_changes_the_gradient_is_never_recorded_wrong():
    """Regression: .backward() passes recorded the modified gradient, autograd.grad passes the unmodified one."""
    lin = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    with gradtrace.watch(lin) as trace:
        lin.weight.register_hook(lambda g: g * 3)  # after watch: runs after gradtrace's hook
        with trace.pass_("first"):
            (g1,) = torch.autograd.grad(lin(x).sum(), [lin.weight])
        with trace.pass_("second"):
            (g2,) = torch.autograd.grad(lin(x).sum(), [lin.weight])
        with trace.pass_("backward", step_start=True):
            lin(x).sum().backward()
    first, second = trace.passes["first"].records["weight"], trace.passes["second"].records["weight"]
    assert first.cleared and not first.zero  # could not see the changed value: unknown, not wrong
    assert second.norm == pytest.approx(torch.linalg.vector_norm(g2).item(), rel=1e-6)  # what was handed back
    assert trace.passes["backward"].records["weight"].norm == pytest.approx(
        torch.linalg.vector_norm(lin.weight.grad).item(), rel=1e-6)
    assert torch.equal(g1, g2)  # the user's hook still runs, once, on every run


@pytest.mark.slow  # compiling costs seconds per backend
@pytest.mark.parametrize("cuts", ["modules", "ops"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("when", ["inside_the_watch", "before_the_watch"])
def test_torch_compile_after_an_eager_run_inside_the_watch(cuts, backend, when):
    """Issue 10 reported InternalTorchDynamoError from torch.compile once the model had run eagerly
    inside watch(cuts="ops"). Not reproduced on torch 2.13; this pins what does hold: the compiled
    model trains under the open watch with the eager gradients, the same coverage and norms, and a
    healthy report."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    x = torch.randn(4, 8)
    compiled = torch.compile(model, backend=backend) if when == "before_the_watch" else None
    if compiled is not None:
        compiled(x).sum().backward()
        model.zero_grad(set_to_none=True)
    with gradtrace.watch(model, cuts=cuts) as trace:
        with trace.pass_("eager"):
            model(x).sum().backward()
        eager = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        compiled = compiled or torch.compile(model, backend=backend)
        for i in range(2):
            model.zero_grad(set_to_none=True)
            with trace.pass_(f"compiled{i}"):
                compiled(x).sum().backward()
        for n, p in model.named_parameters():
            assert torch.equal(p.grad, eager[n]) or torch.allclose(p.grad, eager[n], rtol=1e-6, atol=1e-7), n
    passes = trace.passes
    assert passes["compiled1"].covered == passes["eager"].covered == set(eager)
    assert passes["compiled1"].total_norm == pytest.approx(passes["eager"].total_norm, rel=1e-6)
    assert trace.verdicts() == [] and trace.report().startswith("gradtrace: no problems found")
    torch._dynamo.reset()


@pytest.mark.slow  # inductor compiles C++: tens of seconds
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_the_op_mode_stays_out_of_compiled_graphs(backend):
    """Issue 24: torch.compile(inductor) under cuts="ops" fell back to eager with graph breaks (the mode's
    frame walks and grad_fn reads were traced). The mode steps aside while dynamo traces: no graph
    break, the eager gradients; cuts in eager code are still found op by op."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    x = torch.randn(4, 8)
    with gradtrace.watch(model, cuts="ops") as trace:
        with trace.pass_("eager"):
            model(x).sum().backward()
        eager = {n: p.grad.clone() for n, p in model.named_parameters()}
        compiled = torch.compile(model, backend=backend)
        counters.clear()
        for i in range(2):
            model.zero_grad(set_to_none=True)
            with trace.pass_(f"compiled{i}"):
                compiled(x).sum().backward()
        breaks, graphs = dict(counters["graph_break"]), counters["stats"]["unique_graphs"]
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, eager[n], rtol=1e-5, atol=1e-6), n
        with trace.pass_("eager-cut"):  # the mode still works in eager code after compiling
            h = model[0](x)
            model[2](h.detach()).sum().backward()
    assert breaks == {} and graphs >= 1  # compiled, without a break (a recompile on the 2nd call is fine)
    assert trace.passes["compiled1"].covered == trace.passes["eager"].covered == set(eager)
    assert [(c.kind, c.op, c.pass_name) for c in trace.cuts] == [("detach", "detach", "eager-cut")]
    torch._dynamo.reset()
