"""What every rank runs in tests/test_deepspeed.py: DeepSpeed engines on gloo (CPU), ZeRO stages 0-3.

One spawn of two ranks runs every scenario for every stage (importing DeepSpeed
and starting a group cost seconds). Oracles, computed on the rank:

* DeepSpeed's own figures: ``deepspeed.utils.safe_get_full_grad`` per parameter
  (a collective: every rank calls it, after backward and before the step) and
  ``engine.get_global_grad_norm()`` after the step;
* by hand: the mean over ranks of every rank's loss, summed over the micro-steps
  and divided by the accumulation steps (DeepSpeed scales the loss so), on an
  unwrapped copy of the model.

DeepSpeed's CPU accelerator would JIT-compile its shared-memory all-reduce op on
first use (minutes on a 2-core machine, cached afterwards); gloo does the same
reduction, so the op is declared unavailable here and DeepSpeed reduces with
torch.distributed (what it does wherever the op is missing).
"""
from __future__ import annotations

import json
import os
import traceback
import warnings
from typing import Dict, List

import torch
from torch import nn

import gradtrace
from spawn_ranks import connect

STAGES = (0, 1, 2, 3)
ACCUMULATION = 2


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def data(rank: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * micro + rank)  # different data on every rank
    return torch.randn(5, 4, generator=g)


def engine_for(stage: int, accumulation: int = ACCUMULATION, lr: float = 0.1):
    import deepspeed
    config = {"train_micro_batch_size_per_gpu": 5, "gradient_accumulation_steps": accumulation,
              "optimizer": {"type": "SGD", "params": {"lr": lr}}, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True}
    m = model()
    engine, _, _, _ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=config)
    return engine


def by_hand(world: int, micro_steps: List[int], accumulation: int = ACCUMULATION) -> Dict[str, float]:
    reference = model()
    loss = sum(reference(data(r, s)).sum() for r in range(world) for s in micro_steps)
    (loss / world / accumulation).backward()
    return {n: float(p.grad.norm()) for n, p in reference.named_parameters()}


def close(a: float, b: float, rel: float = 1e-5) -> bool:  # float32 gradients, summed in another order
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def bad_figures(p, expected: Dict[str, float]) -> List[str]:
    got = {r.name: r.norm for r in p.records.values() if not r.cleared}
    return sorted(n for n in set(got) | set(expected) if not (n in got and n in expected and close(got[n], expected[n])))


def unknown(p) -> Dict:
    return {"cleared": len(p.cleared), "because": p.unknown_because or ""}


def one_pass_per_step(rank: int, world: int, stage: int) -> Dict:
    """The pass of an optimizer step (2 micro-steps): exact, equal to DeepSpeed's own figures."""
    from deepspeed.utils import safe_get_full_grad
    engine = engine_for(stage)
    with gradtrace.watch(engine) as trace:
        with trace.pass_("step"):
            for micro in range(ACCUMULATION):
                engine.backward(engine(data(rank, micro)).sum())
                if micro == ACCUMULATION - 1:  # DeepSpeed's full gradients exist until the step
                    full = {n[len("module."):]: float(safe_get_full_grad(p).float().norm())
                            for n, p in engine.named_parameters()}
                engine.step()
    engine_norm = engine.get_global_grad_norm()
    merged = trace.gather()
    step = merged.passes["step"]
    return {"wrapper": trace.meta.wrapper, "zero_stage": trace.meta.zero_stage,
            "scope": trace.passes["step"].scope, "runs": step.runs, "covered": len(step.covered),
            "bad_vs_deepspeed": bad_figures(step, full), "bad_vs_hand": bad_figures(step, by_hand(world, [0, 1])),
            "total": step.total_norm, "engine_norm": None if engine_norm is None else float(engine_norm),
            "hand_total": sum(v * v for v in by_hand(world, [0, 1]).values()) ** 0.5,
            "params": list(merged.params), "shapes": merged.param_shapes,
            "local_shapes": trace.param_shapes, "codes": [v.code for v in merged.verdicts()]}


def per_micro_step(rank: int, world: int, stage: int) -> Dict:
    """One pass per micro-step: exact where DeepSpeed holds the pass's own share, else unknown with why."""
    engine = engine_for(stage)
    with gradtrace.watch(engine) as trace:
        for micro in range(ACCUMULATION):
            with trace.pass_(f"mb{micro}"):
                engine.backward(engine(data(rank, micro)).sum())
                engine.step()
    merged = trace.gather()
    mb0, mb1 = merged.passes["mb0"], merged.passes["mb1"]
    return {"mb0": unknown(mb0), "mb1": unknown(mb1), "mb0_bad": bad_figures(mb0, by_hand(world, [0])),
            "codes": sorted({v.code for v in merged.verdicts()}),
            "errors": [v.message for v in merged.verdicts() if v.severity == "error"]}


def unlabelled(rank: int, world: int, stage: int) -> Dict:
    """engine.backward() outside any pass: one pass per call, read once DeepSpeed reduced it (no accumulation;
    lr 0 keeps the weights, so the oracle of the second step is computed on the same copy)."""
    engine = engine_for(stage, accumulation=1, lr=0.0)
    with gradtrace.watch(engine) as trace:
        for micro in range(2):
            engine.backward(engine(data(rank, micro)).sum())
            engine.step()
    merged = trace.gather()
    return {"passes": list(merged.passes),
            "bad": [bad_figures(merged.passes[f"backward-{k + 1}"], by_hand(world, [k], 1)) for k in range(2)],
            "codes": [v.code for v in merged.verdicts()]}


def plain_backward(rank: int, world: int, stage: int) -> Dict:
    """loss.backward() on the engine's output (ZeRO's PyTorch-style backward) inside a pass, then engine.step()."""
    engine = engine_for(stage, accumulation=1)
    with gradtrace.watch(engine) as trace:
        with trace.pass_("X"):
            engine(data(rank, 0)).sum().backward()
            engine.step()
    merged = trace.gather()
    return {"bad": bad_figures(merged.passes["X"], by_hand(world, [0], 1)), "unknown": unknown(merged.passes["X"]),
            "codes": [v.code for v in merged.verdicts()]}


def module_watched(rank: int, world: int, stage: int) -> Dict:
    """engine.module watched instead of the engine: ZeRO's figures are unknown, and the warning says what to watch."""
    engine = engine_for(stage, accumulation=1)
    with gradtrace.watch(engine.module) as trace:
        with trace.pass_("X"):
            engine.backward(engine(data(rank, 0)).sum())
            engine.step()
    found = trace.verdicts()
    return {"unknown": unknown(trace.passes["X"]), "shapes": trace.param_shapes,
            "codes": sorted({v.code for v in found}), "errors": [v.message for v in found if v.severity == "error"]}


SCENARIOS = {"one_pass_per_step": one_pass_per_step, "per_micro_step": per_micro_step, "unlabelled": unlabelled,
             "plain_backward": plain_backward, "module_watched": module_watched}
# PyTorch-style backward needs a ZeRO optimizer (stages 1-3); engine.module hides only ZeRO's partitions.
ONLY = {"plain_backward": (1, 2, 3), "module_watched": (1, 2, 3)}


def trainer_steps(rank: int, world: int, stage: int, out: str) -> Dict:
    """The HF Trainer with deepspeed=: the engine (trainer.model_wrapped) watched, one pass per optimizer step;
    the merged figures equal the grad_norm the Trainer logs."""
    import transformers
    from tiny_trainer import LogCollector, lm_data, make_llama, make_tokenizer, training_args

    class StepPasses(transformers.TrainerCallback):
        def __init__(self):
            self.watch = self.trace = self.label = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.watch is None:
                self.watch = gradtrace.watch(self.trainer.model_wrapped)
                self.trace = self.watch.__enter__()
            self.label = self.trace.pass_(f"step-{state.global_step + 1}")
            self.label.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self.label.__exit__(None, None, None)

        def on_train_end(self, args, state, control, **kwargs):
            self.watch.__exit__(None, None, None)

    tokenizer = make_tokenizer()
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True}
    collector, steps = LogCollector(), StepPasses()
    args = training_args(os.path.join(out, f"trainer{stage}-{rank}"), max_steps=2, gradient_accumulation_steps=2,
                         deepspeed=config, max_grad_norm=1.0)
    trainer = transformers.Trainer(model=make_llama(len(tokenizer)), args=args, train_dataset=lm_data(tokenizer, 16),
                                   data_collator=transformers.default_data_collator, callbacks=[collector, steps])
    steps.trainer = trainer
    trainer.train()
    merged = steps.trace.gather()
    return {"engine": type(trainer.model_wrapped).__name__, "wrapper": steps.trace.meta.wrapper,
            "grad_norm": {str(k): v for k, v in collector.grad_norms().items()},
            "traced": {n: p.total_norm for n, p in merged.passes.items()},
            "unknown": [len(p.cleared) for p in merged.passes.values()],
            "codes": [v.code for v in merged.verdicts() if v.severity != "info"]}


def trainer_callback(rank: int, world: int, stage: int, out: str) -> Dict:
    """gradtrace's own Trainer callback (attached) with deepspeed=: it watches the engine; its merged trace at
    train end equals the Trainer's grad_norm; its per-step metrics say shard-local figures are a shard's."""
    import transformers
    from gradtrace.integrations.transformers import GradtraceCallback
    from tiny_trainer import LogCollector, lm_data, make_llama, make_tokenizer, training_args

    tokenizer = make_tokenizer()
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True}
    collector, callback = LogCollector(), GradtraceCallback(print_errors=False)
    args = training_args(os.path.join(out, f"callback{stage}-{rank}"), max_steps=2, gradient_accumulation_steps=2,
                         deepspeed=config, max_grad_norm=1.0)
    trainer = transformers.Trainer(model=make_llama(len(tokenizer)), args=args, train_dataset=lm_data(tokenizer, 16),
                                   data_collator=transformers.default_data_collator, callbacks=[collector])
    callback.attach(trainer)
    trainer.train()
    merged = callback.merged
    logged = [logs for _, logs in collector.logs if "grad_norm" in logs]
    return {"wrapper": callback.trace.meta.wrapper, "zero_stage": callback.trace.meta.zero_stage,
            "grad_norm": [float(v) for v in collector.grad_norms().values()],
            "merged": [p.total_norm for p in merged.passes.values()] if merged is not None else None,
            "logged_keys": sorted({k for logs in logged for k in logs if k.startswith("gradtrace/")
                                   and k.endswith("total_norm")}),
            "codes": [v.code for v in merged.verdicts() if v.severity != "info"] if merged is not None else None}


TRAINER_STAGES = (2, 3)


def worker(rank: int, world: int, port: int, out: str, only: List[str]) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    connect(rank, world, port)
    import deepspeed
    import deepspeed.ops
    import logging
    deepspeed.utils.logger.setLevel(logging.ERROR)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # gloo reduces; no JIT build (module doc)
    deepspeed.init_distributed(dist_backend="gloo")  # finds the group initialised: uses it
    results = {}
    try:
        for name, scenario in SCENARIOS.items():
            for stage in ONLY.get(name, STAGES):
                key = f"{name}/{stage}"
                if only and name not in only and key not in only:
                    continue
                results[key] = _run(scenario, rank, world, stage)
        if not only or "trainer" in only:
            import transformers
            transformers.logging.set_verbosity_error()
            for stage in TRAINER_STAGES:
                results[f"trainer/{stage}"] = _run(trainer_steps, rank, world, stage, out)
            results["callback/3"] = _run(trainer_callback, rank, world, 3, out)
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f, default=str)
        import torch.distributed as dist
        dist.destroy_process_group()


def _run(scenario, *args) -> Dict:
    try:
        return scenario(*args)
    except Exception:  # the test shows the traceback; the other scenarios still run
        return {"crashed": traceback.format_exc()}
