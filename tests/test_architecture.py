"""The layout's promises: data flows one way, torch internals sit in one module, reading needs no capture.

These read the package's source (every import statement, function-level ones
included) rather than trusting a diagram.
"""
import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradtrace
from gradtrace import GradtraceError, _torch_compat

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gradtrace"

# Names only torch's private surface has; a hit outside _torch_compat is a private API in the wrong place.
PRIVATE = re.compile(r"torch\._C\b|_execution_engine|_foreach_|_flatten_dense|_will_engine|_current_graph_task"
                     r"|_current_autograd_node|_call_impl|_get_current_function_mode_stack|_torch_function_stack")

# Lower layers never import higher ones: records, capture, analysis, render/storage, the plain trace, the live one, tools.
LAYERS = [
    {"gradtrace.errors", "gradtrace._torch_compat", "gradtrace.fields", "gradtrace.gc_pause"},
    {"gradtrace.records", "gradtrace.schema"},
    {"gradtrace.capture"},
    {"gradtrace.analysis"},
    {"gradtrace.render", "gradtrace.storage", "gradtrace.distributed"},
    {"gradtrace.trace"},
    {"gradtrace.live"},
    {"gradtrace.demo", "gradtrace.cli", "gradtrace.testing", "gradtrace.pytest_plugin", "gradtrace.integrations",
     "gradtrace.__main__", "gradtrace"},
]


def modules():
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


def imports_of(name, path, known):
    """Every gradtrace module ``name`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name and not name.startswith(t + ".")}
    return out


def graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer_of(name):
    for depth, layer in enumerate(LAYERS):
        if any(name == top or (top != "gradtrace" and name.startswith(top + ".")) for top in layer):
            return depth
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def test_import_graph_is_acyclic():
    edges = graph()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(path + [nxt])}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_imports_only_flow_downwards():
    wrong = [(a, b) for a, targets in graph().items() for b in targets
             if b != "gradtrace" and layer_of(b) > layer_of(a)]
    assert wrong == [], f"a lower layer imports a higher one: {wrong}"


def test_analysis_and_render_never_import_torch_or_capture():
    for name, path in modules().items():
        if name.startswith(("gradtrace.analysis", "gradtrace.render", "gradtrace.records", "gradtrace.storage",
                            "gradtrace.fields", "gradtrace.schema")) \
                or name == "gradtrace.trace":
            source = path.read_text()
            assert not re.search(r"^\s*(import torch|from torch)", source, flags=re.M), name
            assert "capture" not in " ".join(imports_of(name, path, modules())), name


def test_private_torch_apis_live_in_one_module():
    offenders = {}
    for name, path in modules().items():
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        hits = sorted(set(PRIVATE.findall(code)))
        if hits and name != "gradtrace._torch_compat":
            offenders[name] = hits
    assert offenders == {}


def _release(version: str):
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())


def test_the_installed_torch_is_in_the_declared_range_and_every_probe_works_on_it():
    low, high = _torch_compat.TORCH_RANGE
    assert low <= _release(torch.__version__) < high, "the suite runs on a torch gradtrace does not declare"
    assert _torch_compat.missing(p.feature for p in _torch_compat.PROBES) == [], _torch_compat.BROKEN
    _torch_compat.require("capture", "stats", "ops", "gather", "fsdp1")  # nothing missing: no error


def test_setup_cfg_declares_the_range_the_probes_were_tested_on():
    low, high = _torch_compat.TORCH_RANGE
    requirement = re.search(r"^\s*torch\s*([^\n#]*)$", (ROOT / "setup.cfg").read_text(), flags=re.M).group(1)
    assert requirement.replace(" ", "") == f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"
    assert f"{low[0]}.{low[1]}" in _torch_compat.TESTED_TORCH


# Private torch attributes gradtrace touches outside _torch_compat; each must have a probe that names it.
TORCH_PRIVATE_ATTRIBUTES = ("_backward_hooks", "_post_accumulate_grad_hooks", "_register_hook_dict",
                            "_forward_hooks_with_kwargs", "next_id", "_modules", "_parameters", "_call_impl",
                            "CheckpointFunction", "BackwardCFunction", "_flat_param")


def test_every_private_torch_attribute_used_has_a_probe():
    probed = " ".join(p.name for p in _torch_compat.PROBES)
    used = set()
    for path in modules().values():
        code = path.read_text()
        used |= {attribute for attribute in TORCH_PRIVATE_ATTRIBUTES if re.search(rf"\b{attribute}\b", code)}
    assert used and all(attribute in probed for attribute in used), sorted(a for a in used if a not in probed)


@pytest.mark.parametrize("probe", [p for p in _torch_compat.PROBES if p.check is not None],
                         ids=[p.name for p in _torch_compat.PROBES if p.check is not None])
def test_each_self_test_passes_here_and_a_failing_one_refuses_the_watch(probe, monkeypatch):
    probe.check(_torch_compat._find(probe))  # the behaviour gradtrace relies on holds on this torch

    def broken(found):
        raise AssertionError("what a new torch changed")

    changed = dataclasses.replace(probe, check=broken)
    monkeypatch.setattr(_torch_compat, "PROBES", tuple(changed if p is probe else p for p in _torch_compat.PROBES))
    monkeypatch.setattr(_torch_compat, "_CHECKED", set())
    monkeypatch.setattr(_torch_compat, "FOUND", {})
    monkeypatch.setattr(_torch_compat, "BROKEN", {})
    model = torch.nn.Linear(2, 2)
    with pytest.raises(GradtraceError) as caught:
        if probe.feature in ("gather", "fsdp1"):
            _torch_compat.require(probe.feature)
        with gradtrace.watch(model, cuts="ops" if probe.feature == "ops" else "modules"):
            pass
    message = str(caught.value)
    assert probe.name in message and "self-test: AssertionError: what a new torch changed" in message
    assert torch.__version__ in message and probe.needed_for in message
    assert model.weight._backward_hooks is None and not model._forward_hooks  # nothing was registered


def test_the_frame_probes_detect_a_torch_that_moved_its_frames(monkeypatch):
    """The self-tests look for what frames.py looks for: a torch whose frames moved fails them."""
    checks = {p.name: p.check for p in _torch_compat.PROBES}
    monkeypatch.setattr(_torch_compat, "MODULE_CALL_CODE", _release.__code__)
    with pytest.raises(AssertionError, match="_call_impl frame"):
        checks["torch.nn.Module._call_impl"](None)
    monkeypatch.undo()
    monkeypatch.setattr(_torch_compat, "CHECKPOINT_FILE", "/nowhere/checkpoint.py")
    with pytest.raises(AssertionError, match="CheckpointFunction's file"):
        checks["torch.utils.checkpoint.CheckpointFunction"](None)
    monkeypatch.undo()
    monkeypatch.setattr(_torch_compat, "FUNCTION_BACKWARD_CODES", frozenset())
    with pytest.raises(AssertionError, match="BackwardCFunction.apply"):
        checks["torch.autograd.function.BackwardCFunction.apply"](None)
    monkeypatch.undo()

    class NoCounter(torch.utils.hooks.RemovableHandle):
        next_id = "0"

    with pytest.raises(AssertionError, match="next_id"):
        checks["torch.utils.hooks.RemovableHandle.next_id"](NoCounter)


@pytest.mark.slow  # seconds each: the dev loop stays under a minute
def test_the_fsdp1_probe_is_looked_up_only_when_an_fsdp1_module_is_watched():
    code = ("import sys, torch, gradtrace; m = torch.nn.Linear(2, 2)\n"
            "with gradtrace.watch(m, cuts='ops'):\n    m(torch.ones(1, 2)).sum().backward()\n"
            "print([n for n in sys.modules if n.startswith('torch.distributed.fsdp')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         timeout=120)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("probe", _torch_compat.PROBES, ids=[p.name for p in _torch_compat.PROBES])
def test_a_missing_private_api_is_an_error_naming_torch_and_the_feature(probe, monkeypatch):
    monkeypatch.setitem(_torch_compat.FOUND, probe.name, None)
    model = torch.nn.Linear(2, 2)
    cuts = "ops" if probe.feature == "ops" else "modules"
    with pytest.raises(GradtraceError) as caught:
        if probe.feature in ("gather", "fsdp1", "fsdp2", "ddp_module"):  # asked by gather() / watch of a wrapped module only
            _torch_compat.require(probe.feature)
        with gradtrace.watch(model, cuts=cuts):
            pass
    message = str(caught.value)
    assert torch.__version__ in message and probe.name in message and probe.needed_for in message
    assert model.weight._backward_hooks is None and not model._forward_hooks  # nothing was registered
    standin = _torch_compat._Absent(probe)
    with pytest.raises(GradtraceError, match=re.escape(probe.name)):
        standin()


def test_the_ops_apis_are_needed_only_for_ops_mode(monkeypatch):
    ops_probe = next(p for p in _torch_compat.PROBES if p.feature == "ops")
    monkeypatch.setitem(_torch_compat.FOUND, ops_probe.name, None)
    model = torch.nn.Linear(2, 2)
    with gradtrace.watch(model) as trace:  # module-level cuts do not use them
        model(torch.randn(1, 2)).sum().backward()
    assert trace.passes["backward-1"].covered == {"weight", "bias"}


def test_loading_and_reading_a_trace_imports_neither_torch_nor_capture(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            model(torch.randn(2, 3)).sum().backward()
        with trace.pass_("Y"):
            torch.autograd.grad(model(torch.randn(2, 3)).sum(), list(model[0].parameters()))
    path = tmp_path / "t.json"
    trace.save(path)
    code = ("import sys, json, gradtrace; t = gradtrace.load(sys.argv[1]); t.report(); t.verdicts(); "
            "str(t.diff('X', 'Y')); t.save(sys.argv[1] + '.again'); "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('gradtrace.capture') "
            "or m == 'gradtrace.live')))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         cwd=ROOT, timeout=120)
    assert json.loads(out.stdout) == []


def test_a_watched_trace_is_a_trace_and_a_loaded_one_is_read_only(tmp_path):
    model = torch.nn.Linear(2, 1)
    with gradtrace.watch(model) as trace:
        model(torch.randn(1, 2)).sum().backward()
    assert isinstance(trace, gradtrace.Trace)
    trace.save(tmp_path / "t.json")
    loaded = gradtrace.load(tmp_path / "t.json")
    assert type(loaded) is gradtrace.Trace
    for call in (lambda: loaded.scalar("x", 1.0), lambda: loaded.tensor("t", torch.ones(1)),
                 lambda: loaded.pass_("P").__enter__()):
        with pytest.raises(GradtraceError, match="read-only"):
            call()


def test_reading_changes_nothing_that_report_or_save_show(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    with gradtrace.watch(model) as trace:
        for name in ("X", "Y"):
            with trace.pass_(name):
                model(torch.randn(4, 3)).sum().backward()
    first_report = trace.report()
    trace.save(tmp_path / "a.json")
    for _ in range(2):
        trace.passes, trace.tensors, trace.cuts, trace.verdicts(), str(trace.diff("X", "Y"))
    assert trace.report() == first_report
    trace.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_every_package_declares_all_and_every_name_in_it_resolves():
    import importlib

    packages = sorted(str(init.parent.relative_to(ROOT)).replace("/", ".") for init in PACKAGE.rglob("__init__.py"))
    assert "gradtrace.capture" in packages and "gradtrace.integrations" in packages
    for name in packages:
        package = importlib.import_module(name)
        assert isinstance(getattr(package, "__all__", None), list), f"{name} has no __all__"
        assert all(getattr(package, attribute, None) is not None for attribute in package.__all__), name
