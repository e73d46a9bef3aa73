"""The hook-overhead benchmark runs end to end and reports a sane row for every pair.

No timing assertions: only that every (workload, variant) pair was measured and
that the numbers are finite and of the right sign.
"""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "hook_overhead.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("hook_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


bench = load_bench()
# one intra-op thread: on a busy 2-core machine two OpenMP threads can stall a step for a second
TINY = ["--size", "tiny", "--rounds", "2", "--warmup", "1", "--threads", "1"]


def check_rows(result, workloads):
    rows = {(r["workload"], r["variant"]): r for r in result["rows"]}
    assert set(rows) == {(w, v) for w in workloads for v in bench.VARIANTS}
    for key, r in rows.items():
        assert "error" not in r, (key, r.get("error"))
        assert r["samples"] >= 2, key
        for col in ("median_ms", "min_ms", "max_ms", "fwd_median_ms", "ratio", "paired_ratio", "fwd_ratio"):
            assert math.isfinite(r[col]) and r[col] > 0, (key, col, r[col])
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"], key
        assert math.isfinite(r["us_per_param"]), key
        assert r["n_params"] > 0
        # peak RSS above the pre-step level never goes below zero
        assert math.isfinite(r["peak_mib"]) and r["peak_mib"] >= 0, (key, r["peak_mib"])
        assert math.isfinite(r["retained_mib"]), key
    for w in workloads:
        base = rows[(w, "baseline")]
        assert base["ratio"] == pytest.approx(1.0) and base["us_per_param"] == pytest.approx(0.0)
        assert base["paired_ratio"] == pytest.approx(1.0)
    ee = {e["workload"]: e for e in result["enter_exit"]}
    assert set(ee) == set(workloads)
    for e in ee.values():
        assert math.isfinite(e["us_per_param"]) and e["us_per_param"] > 0
        assert e["min_ms"] <= e["median_ms"] <= e["max_ms"]


@pytest.fixture(scope="module")
def torch_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    workloads = ["transformer", "linear_chain", "ypass"]
    result = bench.main(TINY + ["--workloads", ",".join(workloads), "--json", str(out)])
    return workloads, result, out


def test_every_pair_has_finite_numbers(torch_result):
    workloads, result, _ = torch_result
    check_rows(result, workloads)


def test_linear_chain_shapes():
    assert bench.SHAPES["full"]["linear_chain"]["n"] == bench.SHAPES["quick"]["linear_chain"]["n"] == 1000
    wl = bench.build_workload("linear_chain", "tiny", torch.device("cpu"))
    assert len(bench.trainable(wl.model)) == 2 * bench.SHAPES["tiny"]["linear_chain"]["n"]


def test_json_holds_the_rows_and_machine(torch_result, capsys):
    _, result, out = torch_result
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert saved["machine"]["torch"] == torch.__version__
    assert saved["machine"]["cpu_count"] >= 1
    report = bench.render_report(saved)
    for variant in bench.VARIANTS:
        assert variant in report


def test_lora_gpt2_workload(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    result = bench.main(TINY + ["--workloads", "lora_gpt2"])
    check_rows(result, ["lora_gpt2"])
    # only the adapters are trainable: LoRA A and B on c_attn, c_proj, c_fc, c_proj per layer
    assert {r["n_params"] for r in result["rows"]} == {2 * 4 * 2}


def test_variant_filter_always_keeps_the_baseline():
    args = bench.parse_args(["--size", "tiny", "--variants", "item_hooks"])
    assert args.variants == ["baseline", "item_hooks"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--workloads", "nope"])


def test_wandb_like_histogram_counts_every_element():
    model = torch.nn.Linear(5, 3)
    v = bench.WandbLike(model)
    model(torch.randn(7, 5)).sum().backward()
    v.close()
    counts, edges = v.row["weight"]
    assert len(counts) == bench.WANDB_BINS and len(edges) == bench.WANDB_BINS + 1
    assert sum(counts) == model.weight.numel()
    assert edges[0] == pytest.approx(model.weight.grad.min().item())
    assert edges[-1] == pytest.approx(model.weight.grad.max().item())


def test_foreach_floor_reads_every_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    v = bench.ForeachFloor(model)
    model(torch.randn(3, 4)).square().sum().backward()
    v.after(0, None)
    expected = [p.grad.norm().item() for p in model.parameters()]
    assert v.norms == pytest.approx(expected)


@pytest.mark.parametrize("name", sorted(bench.GRADTRACE_OPTIONS))
def test_gradtrace_variants_read_the_true_total_norm(name):
    # the timed step must be doing the real work: its pass figure matches plain autograd
    wl = bench.build_workload("transformer", "tiny", torch.device("cpu"))
    v = bench.GradtraceVariant(wl.model, name)
    try:
        with v.pass_(0):
            wl.loss(wl.model, wl.batch).backward()
        v.after(0, None)
    finally:
        v.close()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in v.params])).item()
    assert v.last_norm == pytest.approx(expected, rel=1e-5)
