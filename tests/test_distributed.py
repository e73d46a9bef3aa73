"""trace.gather() and capture under torch.distributed (gloo, loopback, two processes).

One spawn runs every scenario of ``dist_scenarios`` (each rank checks its own
figures against an oracle there); each test below reads one scenario's result.
"""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradtrace

import dist_scenarios
from spawn_ranks import result, run_ranks

pytestmark = [pytest.mark.slow,  # real subprocesses: run by the full suite, not the dev loop
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")]
WORLD = 2


@pytest.fixture(scope="module", params=[
    "gloo", pytest.param("nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < WORLD or not dist.is_nccl_available(),
                                                          reason=f"NCCL needs {WORLD} GPUs"))])
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    only = [n for n in os.environ.get("GRADTRACE_DIST_ONLY", "").split(",") if n]
    if request.param == "nccl":
        only = [n for n in dist_scenarios.NCCL_SCENARIOS if not only or n in only]
    return run_ranks(dist_scenarios.worker, WORLD, str(out), (only, request.param))


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """A world of three ranks (a group of two of them; a late rank among three)."""
    return run_ranks(dist_scenarios.worker, 3, str(tmp_path_factory.mktemp("trio")), ([], "gloo", "trio"))


def test_ddp_figures_are_grad_after_backward_returns(ranks):
    for r in result(ranks, "ddp_figures"):
        assert set(r) == {f"bucket_view={b},labelled={l}" for b in (True, False) for l in (True, False)}
        for case in r.values():
            assert case == {"mismatches": 0, "scopes": ["reduced"], "passes": dist_scenarios.STEPS}


def test_no_sync_accumulation_is_local_then_the_averaged_sum(ranks):
    for r in result(ranks, "ddp_no_sync"):
        assert r["local_scope"] == "local" and r["local_mismatches"] == []
        assert r["step_scope"] == "reduced" and r["step_mismatches"] == []
        assert r["stale"] == []


def test_autograd_grad_on_the_module_gives_local_gradients(ranks):
    for r in result(ranks, "ddp_autograd_grad"):
        assert r["scope"] == "local" and r["mismatches"] == []
        assert r["rank_figures_match"] and r["ranks"] == [0, 1]


@pytest.mark.parametrize("name", ["fsdp2", "fsdp1"])
def test_fsdp_gather_gives_global_figures(ranks, name):
    results = result(ranks, name)
    for r in results:
        assert r["scope"] == "sharded"
        assert r["unlabelled_bad"] == [] and r["labelled_bad"] == []
        assert "ZERO_GRADS" not in r["local_codes"] and "NO_COVERAGE" not in r["local_codes"]
        assert r["merged_codes"] == []


def test_fsdp2_local_trace_counts_runs_and_says_it_is_shard_local(ranks):
    for r in result(ranks, "fsdp2"):
        assert r["passes"] == ["backward-1", "X"] and r["runs"] == 1
        assert r["local_report_says_shard_local"] and r["merged_report_says_global"]
        assert r["empty_shards_zero"] == []


def test_fsdp1_names_are_the_users(ranks):
    for r in result(ranks, "fsdp1"):
        assert r["params"] == [n for n, _ in dist_scenarios.fsdp_model().named_parameters()]


def test_nonfinite_on_one_rank_is_in_the_merged_verdicts_naming_it(ranks):
    for r in result(ranks, "nan_on_rank_1"):
        assert r["ranks"] == [[1]] and "on rank(s) 1" in r["messages"][0]
        assert r["report_has_per_rank"]


def test_stale_grads_on_one_rank_name_it(ranks):
    for r in result(ranks, "stale_on_rank_1"):
        assert r["ranks"] == [[1]]


def test_merged_view_uses_the_union_and_names_the_diverging_rank(ranks):
    for r in result(ranks, "union_and_divergence"):
        assert "UNUSED_PARAMS" not in r["codes"]  # rank 1 used head b
        assert r["divergence"] == [["error", "X", [0], ["b.bias", "b.weight"]]]
        assert r["loaded_rank_keys"] == {"X": [0, 1]} and r["loaded_key_types"] == ["int"]
        assert "RANK_DIVERGENCE" in r["loaded_codes"] and r["report_world"]


def test_declared_branching_makes_divergence_a_warning(ranks):
    for r in result(ranks, "find_unused"):
        assert r["divergence"] == [["warning", "X", [0], ["b.bias", "b.weight"]]]


def test_a_wrapper_prefix_on_one_rank_is_not_divergence(ranks):
    for r in result(ranks, "wrapper_prefix"):
        assert r["codes"] == []
        assert r["params"] == [n for n, _ in dist_scenarios.six_params().named_parameters()]


def test_ranks_that_differ_are_named(ranks):
    for r in result(ranks, "mismatched_passes"):
        assert "passes differ: rank 0 has ['X'], rank 1 has ['Y']" in r["names"]
        assert "rank 1 has ['backward-1', 'backward-2']" in r["extra"]
        assert ("only rank 1 watches 2 parameter(s): bias, weight; rank 1 does not watch 6 parameter(s): "
                "0.bias, 0.weight, 2.bias, 2.weight, 4.bias, ...") in r["params"]


def test_the_local_trace_survives_ddps_unfinished_reduction_error(ranks):
    for r in result(ranks, "expected_reduction"):
        assert r["error"]
        assert r["missing"] == {"backward-1": ["module.b.bias", "module.b.weight"]}
        # the first line names the cause: the head no rank used, not the failure it led to
        assert r["first"] == ["UNUSED_PARAMS", "error", ["module.b.bias", "module.b.weight"]]
        assert r["failure_points_to"] == ["UNUSED_PARAMS"]
        # and the failure itself names what DDP waited for, from the coverage of the iteration before (issue 20)
        assert r["failure"].startswith(
            "the watched block ended with an exception: DDP's reduction waited on 2 parameter(s) that got no "
            "gradient in the previous iteration: module.b"), r["failure"]


def test_the_ddp_example_names_the_rank_its_docstring_names(ranks):
    for r in result(ranks, "example_probe"):
        assert r["divergence"] == [["warning", [1], ["b.bias", "b.weight"]]] * 2  # two steps
        assert "naming ``b`` and rank 1" in " ".join(r["docstring"].split())


def test_every_rank_names_the_late_rank_within_the_timeout(ranks):
    early, late = result(ranks, "late_rank")
    for r in (early, late):
        assert "rank(s) 1 of the 2-rank group did not call gather() within 2 s" in r["message"], r["message"]
        assert r["seconds"] < 30
    assert "seen from rank 0" in early["message"]
    assert "this rank (rank 1) arrived after rank(s) 0 had stopped waiting" in late["message"]


def test_every_rank_of_three_names_the_late_one_not_the_rank_that_checks_arrivals(trio):
    messages = [r["message"] for r in result(trio, "late_rank")]
    for message in messages:
        assert "rank(s) 2 of the 3-rank group did not call gather() within 2 s" in message, message
    assert "seen from rank 1" in messages[1] and "rank 0" not in messages[1].split("(")[1]


def test_a_group_of_global_ranks_1_and_2_is_named_1_and_2(trio):
    r1, r2 = result(trio, "subgroup")[1:]
    for r in (r1, r2):
        assert r["coverage_keys"] == [1, 2] and r["figure_keys"] == [1, 2]
        assert r["meta_ranks"] == [1, 2] and r["world_size"] == 2
        assert r["divergence"] == [[2]]  # global rank 2 skipped head b
        assert r["nonfinite"] == [[2]]  # global rank 2 fed the NaN
        assert "passes differ: rank 1 has ['A'], rank 2 has ['B']" in r["mismatch"], r["mismatch"]


# ---- one pass per microbatch during accumulation ----------------------------------------------
def test_ddp_microbatch_passes_are_exact_or_unknown_never_per_rank_under_reduced(ranks):
    for r in result(ranks, "ddp_microbatches"):
        assert r["scopes"] == {"mb0": "local", "mb1": "reduced", "step": "reduced", "synced0": "reduced",
                               "synced1": "reduced", "backward-1": "local", "after_zero": "reduced"}
        assert r["mb0_bad"] == [] and r["step_bad"] == [] and r["synced_bad"] == [] and r["after_zero_bad"] == []
        mb1 = r["mb1"]
        assert len(mb1["cleared"]) == mb1["covered"] == 6 and mb1["no_numbers"]
        assert "no_sync" in mb1["because"] and "one pass" in mb1["because"]
        assert r["codes"] == {"FIGURES_UNKNOWN": ["mb1"]} and r["errors"] == []


def test_watching_ddps_module_finds_ddp_and_labels_reduced_figures_reduced(ranks):
    for r in result(ranks, "ddp_module_watched"):
        assert r["wrapper"] == "DDP"
        assert r["scopes"] == {"alone": "local", "mb0": "local", "step": "reduced"}
        assert r["mb0_bad"] == [] and r["step_bad"] == [] and r["step_vs_hand"] == []
        assert r["inner"] == ["DDP", "reduced", []]  # a model inside a wrapper inside DDP


def test_fsdp1_no_sync_pass_is_local_and_the_next_synced_one_unknown(ranks):
    for r in result(ranks, "fsdp1_no_sync"):
        assert r["scopes"] == {"mb0": "local", "mb1": "sharded", "step": "sharded"}
        assert r["mb0_bad"] == [] and r["merged_mb0_rank_bad"] == []
        assert r["merged_mb0_scope"] == "local"  # never summed as if shards of one gradient
        for mb1 in (r["mb1"], r["merged_mb1"]):
            assert len(mb1["cleared"]) == 6 and mb1["no_numbers"] and "reduced the gradients" in mb1["because"]
        assert r["step_bad"] == []
        assert r["merged_codes"] == ["FIGURES_UNKNOWN"]


def test_fsdp2_with_gradient_sync_off_is_seen_counted_and_never_no_coverage(ranks):
    for r in result(ranks, "fsdp2_sync_off"):
        assert r["scopes"] == {"mb0": "local", "mb1": "sharded", "step": "sharded"}
        assert r["runs"] == {"mb0": 1, "mb1": 1, "step": 2}
        assert r["mb0"]["covered"] == 6 and len(r["mb0"]["cleared"]) == 6 and r["mb0"]["no_numbers"]
        assert "set_requires_gradient_sync(False)" in r["mb0"]["because"]
        assert len(r["mb1"]["cleared"]) == 6 and "before the pass began" in r["mb1"]["because"]
        assert r["step_bad"] == []
        assert r["local_codes"] == ["FIGURES_UNKNOWN"] and r["merged_codes"] == ["FIGURES_UNKNOWN"]


def test_fsdp1_flat_parameters_are_named_as_such(ranks):
    for r in result(ranks, "fsdp1_flat"):
        assert r["flat_params"] is True and all("flat_param" in n for n in r["params"])
        assert ["FLAT_PARAMS", "info"] in r["codes"] and "use_orig_params=True" in r["message"]
        assert r["report_first_line"] == "gradtrace: no problems found."


def test_a_nan_born_on_rank_1_under_ddp_is_named_there_with_its_op(ranks):
    r0, r1 = result(ranks, "nan_under_ddp")
    assert not r0["local_origin"] and r1["local_origin"]  # only rank 1's backward made it
    for r in (r0, r1):
        assert r["ranks"] == [[1]] and r["seen_on"] == [[0, 1]] and r["origin_kept"] == [True]
        assert "born on rank(s) 1" in r["messages"][0]
        assert r["first_line"].startswith("gradtrace diagnosis: NONFINITE:")
    # Rank 0's forward was finite: the NaN came in through the all-reduce, born in rank 1's backward.
    assert "born in the backward of op" in r0["messages"][0]
    # Rank 1's own forward went non-finite (its input held the NaN): that leads, as without DDP. (On main
    # before the issue-23 merge this passed only when earlier scenarios of the worker ran first: alone,
    # main's rank 1 led with the forward too.)
    assert r1["messages"][0].startswith("pass 'X': the forward first went non-finite in op linear") \
        and "in module 'module.0'" in r1["messages"][0]


def test_gather_without_a_process_group_is_a_clear_error():
    model = nn.Linear(2, 2)
    with gradtrace.watch(model) as trace:
        pass
    with pytest.raises(gradtrace.GradtraceError, match="init_process_group"):
        trace.gather()
