"""Realistic gradient bugs, rebuilt in miniature, each with its fixed twin.

Each scenario reproduces a bug users report in public threads (PyTorch forum,
GitHub issues of transformers / peft / TRL): ``run(fixed=False)`` makes the bug
really happen on a small model under ``gradtrace.watch`` and returns the trace;
``run(fixed=True)`` is the same code with the one-line fix. ``expect`` is the
code the first printed line must carry and ``names`` the words it must contain
(the module, tensor, parameter or fix that is the cause).

Used by ``tests/test_scenarios.py`` (the assertions) and by
``python tests/scenarios.py`` (first-line accuracy of the whole suite, also
runnable against another gradtrace with PYTHONPATH, to measure before/after).
Only public gradtrace API is used here, so an older gradtrace runs it too.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import gradtrace


@dataclass
class Scenario:
    name: str
    source: str  # where users report it
    run: Callable[[bool], "gradtrace.Trace"]
    expect: str
    names: Tuple[str, ...]
    slow: bool = False


SCENARIOS: List[Scenario] = []


def scenario(expect: str, names: Tuple[str, ...], source: str, slow: bool = False):
    def register(fn):
        SCENARIOS.append(Scenario(fn.__name__, source, fn, expect, names, slow))
        return fn
    return register


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


class Tower(nn.Module):
    """embed -> block -> head, the shape of most small models in bug reports."""

    def __init__(self, detach: bool = False, encoder_no_grad: bool = False):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.block = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.detach, self.encoder_no_grad = detach, encoder_no_grad

    def forward(self, x):
        if self.encoder_no_grad:
            with torch.no_grad():  # "freeze the encoder" -- but it was meant to be fine-tuned
                h = self.embed(x)
        else:
            h = self.embed(x)
        h = torch.tanh(self.block(h))
        if self.detach:
            h = h.detach()  # "to save memory" / a stale copy-paste
        return self.head(h)


def batch(n: int = 6):
    return torch.randn(n, 8), torch.randint(0, 4, (n,))


def train_steps(model, steps=2, lr=0.1, opt=None, zero_grad=True, **watch):
    opt = opt or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    with gradtrace.watch(model, **watch) as trace:
        for _ in range(steps):
            x, y = batch()
            if zero_grad:
                opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return trace


# ---- cuts in the forward -----------------------------------------------------------------------------


@scenario("DETACHED_OUTPUT", ("'block'",), "forum: 'grad is None for the first layers' (a .detach() in forward)")
def detach_in_forward(fixed):
    seeded()
    return train_steps(Tower(detach=not fixed))


@scenario("GRAPH_CUT", ("embed", "no_grad"), "forum: 'encoder weights never change' (torch.no_grad in forward)")
def no_grad_in_forward(fixed):
    seeded()
    return train_steps(Tower(encoder_no_grad=not fixed))


@scenario("DETACHED_OUTPUT", ("'embed'",),
          "issue 19 item 1: a rollout under no_grad, then a .detach() on the path of the loss")
def rollout_then_detach(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for step in range(2):
            with trace.pass_(f"step-{step}"):
                x, y = batch()
                with torch.no_grad():  # generation / rollout: data only
                    model(x).argmax(-1)
                h = model.embed(x)
                h = h if fixed else h.detach()
                F.cross_entropy(model.head(torch.tanh(model.block(h))), y).backward()
            opt.step()
            opt.zero_grad()
    return trace


@scenario("DETACHED_OUTPUT", ("model", "argmax"), "forum: 'loss does not require grad' after argmax in the loss")
def argmax_in_loss(fixed):
    seeded()
    model = Tower()
    with gradtrace.watch(model) as trace:
        x, y = batch()
        logits = model(x)
        with contextlib.suppress(RuntimeError):
            with trace.pass_("step"):
                if fixed:
                    F.cross_entropy(logits, y).backward()
                else:  # "accuracy as a loss": argmax has no gradient
                    (logits.argmax(-1) != y).float().mean().backward()
    return trace


@scenario("NO_PASSES", ("model", ".item()"), "forum: 'loss = torch.tensor(loss.item(), requires_grad=True)'")
def loss_rebuilt_from_item(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            x, y = batch()
            loss = F.cross_entropy(model(x), y)
            if not fixed:
                loss = torch.tensor(loss.item(), requires_grad=True)  # "fix" for 'does not require grad'
            opt.zero_grad()
            loss.backward()
            opt.step()
    return trace


@scenario("GRAPH_CUT", ("no_grad",), "forum: torch.set_grad_enabled(False) left on after validation")
def grad_left_disabled_after_validation(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        torch.set_grad_enabled(False)  # validation
        model(batch()[0])
        if fixed:
            torch.set_grad_enabled(True)
        try:
            with contextlib.suppress(RuntimeError):
                with trace.pass_("train-step"):
                    x, y = batch()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
        finally:
            torch.set_grad_enabled(True)
    return trace


@scenario("PASS_FAILED", ("in place",), "forum: 'modified by an inplace operation' (ReLU(inplace=True) on a saved tensor)")
def inplace_on_saved_tensor(fixed):
    seeded()
    model = Tower()
    with gradtrace.watch(model) as trace:
        with contextlib.suppress(RuntimeError):
            with trace.pass_("step"):
                x, y = batch()
                h = torch.sigmoid(model.embed(x))  # sigmoid saves its output for backward
                if fixed:
                    h = h * 2
                else:
                    h.mul_(2)
                F.cross_entropy(model.head(model.block(h)), y).backward()
    return trace


@scenario("PASS_FAILED", (".detach()", "hidden state"), "forum: 'Trying to backward through the graph a second time' (RNN state)")
def rnn_state_not_detached(fixed):
    seeded()
    rnn, head = nn.GRUCell(8, 8), nn.Linear(8, 4)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = torch.randn(4, 8)
    with gradtrace.watch(model) as trace:
        with contextlib.suppress(RuntimeError):
            for step in range(3):
                with trace.pass_(f"step-{step}"):
                    h = rnn(torch.randn(4, 8), h.detach() if fixed else h)
                    opt.zero_grad()
                    F.cross_entropy(head(h), torch.randint(0, 4, (4,))).backward()
                    opt.step()
    return trace


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.embed.weight.requires_grad_(False)  # frozen embeddings, adapters/blocks trained
        self.block = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.reentrant = reentrant

    def forward(self, ids):
        h = self.embed(ids)
        h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h).mean(1)


@scenario("GRAPH_CUT", ("checkpoint", "enable_input_require_grads"),
          "transformers/peft: gradient checkpointing with frozen embeddings -> 'None of the inputs have requires_grad'")
def checkpointing_with_frozen_embeddings(fixed):
    seeded()
    model = Checkpointed(reentrant=not fixed)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_steps_ids(model)


def train_steps_ids(model, steps=2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with gradtrace.watch(model) as trace:
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(torch.randint(0, 20, (4, 5))), torch.randint(0, 4, (4,))).backward()
            opt.step()
    return trace


# ---- the optimizer ------------------------------------------------------------------------------------


@scenario("STALE_GRADS", ("zero_grad",), "forum: 'loss explodes' -- optimizer.zero_grad() never called")
def forgot_zero_grad(fixed):
    seeded()
    return train_steps(Tower(), steps=3, zero_grad=fixed)


@scenario("NOT_IN_OPTIMIZER", ("embed", "unfrozen"), "forum: 'unfrozen layers do not train' (optimizer built before unfreezing)")
def optimizer_built_before_unfreezing(fixed):
    seeded()
    model = Tower()
    model.embed.requires_grad_(False)
    opt = None if fixed else torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.embed.requires_grad_(True)  # stage 2: unfreeze the backbone
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1)
    return train_steps(model, opt=opt)


@scenario("NOT_IN_OPTIMIZER", ("another copy",), "forum: optimizer built from a deepcopy of the model")
def optimizer_of_another_copy(fixed):
    import copy
    seeded()
    model = Tower()
    opt = torch.optim.Adam((model if fixed else copy.deepcopy(model)).parameters(), lr=1e-3)
    return train_steps(model, opt=opt)


@scenario("WEIGHTS_UNCHANGED", ("zero_grad", "between backward() and step()"),
          "forum: 'model not learning' -- optimizer.zero_grad() between loss.backward() and optimizer.step()")
def zero_grad_between_backward_and_step(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradtrace.watch(model) as trace:
        for _ in range(3):
            x, y = batch()
            if fixed:
                opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if not fixed:
                opt.zero_grad()
            opt.step()
    return trace


@scenario("FROZEN_WHILE_WATCHED", ("embed", "momentum"),
          "forum: 'frozen layers still update' -- requires_grad=False with SGD momentum and zeroed grads")
def frozen_layer_still_updates(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with gradtrace.watch(model) as trace:
        for step in range(3):
            x, y = batch()
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if step == 0 and not fixed:
                model.embed.requires_grad_(False)  # stage 2: freeze the embedding
    return trace


@scenario("WEIGHTS_UNCHANGED", ("lr", "0"), "forum: 'weights do not change' -- LambdaLR returning 0")
def scheduler_stuck_at_zero(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if fixed else 0.0 * step)
    with gradtrace.watch(model) as trace:
        for _ in range(3):
            x, y = batch()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return trace


@scenario("WEIGHTS_UNCHANGED", ("bfloat16",), "forum: 'pure bf16 training: loss does not decrease'")
def bf16_weights_small_lr(fixed):
    seeded()
    model = Tower()
    if not fixed:
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5 if not fixed else 1e-3)
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            x, y = batch()
            opt.zero_grad()
            F.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y).backward()
            opt.step()
    return trace


@scenario("TINY_UPDATES", ("lr",), "forum: 'model does not learn' -- learning rate 1e-9 (a typo for 1e-4)")
def learning_rate_typo(fixed):
    seeded()
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-3)  # small weights: updates of 1e-9 still show (a tiny, not a rounded-away, step)
    return train_steps(model, lr=1e-4 if fixed else 1e-11, opt=None if fixed else torch.optim.SGD(model.parameters(), lr=1e-11))


@scenario("CLIP_BEFORE_UNSCALE", ("unscale_",), "forum: AMP -- clip_grad_norm_ called before scaler.unscale_")
def clip_before_unscale(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            x, y = batch()
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            if fixed:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
    return trace


class GAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.G = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
        self.D = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


@scenario("NOT_IN_OPTIMIZER", ("D.",), "forum: GAN -- the discriminator's optimizer built from the generator's parameters")
def gan_wrong_optimizer(fixed):
    seeded()
    gan = GAN()
    opt_g = torch.optim.Adam(gan.G.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam((gan.D if fixed else gan.G).parameters(), lr=1e-3)
    bce = nn.BCEWithLogitsLoss()
    with gradtrace.watch(gan) as trace:
        for _ in range(2):  # the DCGAN loop: one pass per optimizer step
            real, z = torch.randn(6, 8), torch.randn(6, 4)
            gan.D.zero_grad()
            (bce(gan.D(real), torch.ones(6, 1)) + bce(gan.D(gan.G(z).detach()), torch.zeros(6, 1))).backward()
            opt_d.step()
            gan.G.zero_grad()
            bce(gan.D(gan.G(z)), torch.ones(6, 1)).backward()
            opt_g.step()
    return trace


# ---- registered tensors: GRPO-shaped losses ----------------------------------------------------------------


class Policy(nn.Module):
    def __init__(self, vocab=12, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed(ids))))


def grpo_steps(policy, rewards_for, *, steps=3, s_no_grad_at=None, mask_for=None, register_s=True):
    """A GRPO step in miniature: generate under no_grad, score, group-normalise, -(A * S) masked mean."""
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    groups, size, length = 2, 4, 5
    with gradtrace.watch(policy) as trace:
        for step in range(steps):
            with trace.pass_(f"step-{step}", step_start=True):
                ids = torch.randint(0, 12, (groups * size, length))
                with torch.no_grad():  # generation: data only
                    policy(ids).argmax(-1)
                rewards = rewards_for(step, groups * size)
                grouped = rewards.view(groups, size)
                adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4))
                trace.tensor("rewards", grouped, role="group")
                A = trace.tensor("A", adv, role="group").reshape(-1)
                mask = mask_for(step) if mask_for else torch.ones(groups * size, length, dtype=torch.bool)
                trace.tensor("completion_mask", mask, role="mask")
                with torch.no_grad() if s_no_grad_at == step else contextlib.nullcontext():
                    logps = torch.log_softmax(policy(ids), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
                S = trace.tensor("S", logps) if register_s else logps
                loss = -((A.unsqueeze(1) * S) * mask).sum() / mask.sum().clamp(min=1)
                if loss.requires_grad:
                    loss.backward()
            opt.step()
            opt.zero_grad()
    return trace


def varied(step, n):
    return torch.arange(n, dtype=torch.float32) % 3 + step


@scenario("ALL_ZERO_VALUES", ("'A'", "step-1", "rewards"), "TRL issues: 'GRPO loss is zero' (every group's rewards equal)")
def grpo_rewards_saturate(fixed):
    seeded()
    return grpo_steps(Policy(), lambda step, n: varied(step, n) if fixed or step == 0 else torch.ones(n))


@scenario("ALL_ZERO_VALUES", ("completion_mask", "step-2"), "TRL issues: completion mask empty (prompt length mismatch)")
def grpo_mask_empty_at_step(fixed):
    seeded()
    full = torch.ones(8, 5, dtype=torch.bool)
    return grpo_steps(Policy(), varied, mask_for=lambda step: full if fixed or step < 2 else torch.zeros_like(full))


@scenario("TENSOR_NO_GRAD", ("'S'", "no_grad"), "issue 19: sequence log-probs computed under torch.no_grad()")
def grpo_logprobs_under_no_grad(fixed):
    seeded()
    return grpo_steps(Policy(), varied, steps=1, s_no_grad_at=None if fixed else 0)


@scenario("NONFINITE", ("rewards",), "TRL issues: NaN rewards from a reward function")
def grpo_nan_rewards(fixed):
    seeded()

    def rewards(step, n):
        r = varied(step, n)
        if not fixed and step == 1:
            r[0] = float("nan")
        return r
    return grpo_steps(Policy(), rewards)


@scenario("STALE_GRADS", ("zero_grad", "accumulate=True"), "issue 19 item 7: a probe that forgets zero_grad() before its X pass")
def probe_forgets_zero_grad(fixed):
    seeded()
    model = Tower()
    with gradtrace.watch(model) as trace:
        x, y = batch()
        F.cross_entropy(model(x), y).backward()  # a warm-up / sanity check left .grad filled
        if fixed:
            model.zero_grad()
        with trace.pass_("X"):
            F.cross_entropy(model(x), y).backward()
    return trace


# ---- transformers / peft ---------------------------------------------------------------------------------------


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    seeded()
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def lora(model):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))


@scenario("NO_COVERAGE", ("adapters", "disable_adapter"),
          "peft/TRL: policy log-probs computed inside disable_adapter() (the reference model's context)", slow=True)
def lora_policy_with_adapters_disabled(fixed):
    model = lora(tiny_llama())
    ids = torch.randint(0, 64, (2, 6))
    with gradtrace.watch(model) as trace:
        with contextlib.suppress(RuntimeError):
            with trace.pass_("step-1"):
                with torch.no_grad(), model.disable_adapter():
                    model(input_ids=ids)  # the reference forward: fine
                with contextlib.nullcontext() if fixed else model.disable_adapter():
                    out = model(input_ids=ids, labels=ids)
                out.loss.backward()
    return trace


@scenario("NOT_IN_OPTIMIZER", ("lora_A", "lora_B"),
          "peft issues: 'LoRA weights not updating' -- the optimizer was built before get_peft_model", slow=True)
def lora_optimizer_built_before_peft(fixed):
    base = tiny_llama()
    opt = torch.optim.AdamW(base.parameters(), lr=1e-3)
    model = lora(base)  # freezes the base, adds adapters the optimizer has never seen
    if fixed:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            ids = torch.randint(0, 64, (2, 6))
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    return trace


@scenario("WEIGHTS_UNCHANGED", ("step() called before backward()",),
          "forum: 'loss does not decrease' -- optimizer.step() before loss.backward()")
def step_before_backward(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for _ in range(3):
            x, y = batch()
            opt.zero_grad()
            if not fixed:
                opt.step()
            F.cross_entropy(model(x), y).backward()
            if fixed:
                opt.step()
    return trace


@scenario("FROZEN_WHILE_WATCHED", ("lora",), "peft issues: 'LoRA weights not updating' -- a callback froze the adapters",
          slow=True)
def lora_frozen_by_callback(fixed):
    model = lora(tiny_llama())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with gradtrace.watch(model) as trace:
        for step in range(2):
            ids = torch.randint(0, 64, (2, 6))
            with contextlib.suppress(RuntimeError):
                with trace.pass_(f"step-{step}"):
                    model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            if not fixed:  # "freeze the base model" written as a loop over every parameter
                for p in model.parameters():
                    p.requires_grad_(False)
    return trace


@scenario("GRAPH_CUT", ("layers.0", "detach"), "transformers forum: a forward hook that returns output.detach()", slow=True)
def llama_hook_detaches_a_layer(fixed):
    model = tiny_llama()
    handle = None
    if not fixed:
        handle = model.model.layers[0].register_forward_hook(
            lambda m, a, out: tuple(o.detach() if torch.is_tensor(o) else o for o in out)
            if isinstance(out, tuple) else out.detach())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    try:
        with gradtrace.watch(model) as trace:
            for _ in range(2):
                ids = torch.randint(0, 64, (2, 6))
                opt.zero_grad()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
    finally:
        if handle is not None:
            handle.remove()
    return trace


# ---- TRL's GRPOTrainer (a real GRPO loop: generation, rewards, group advantages, LoRA) ------------------------


def grpo_run(fixed_kwargs, bug_kwargs, fixed, reward=None, freeze_at=None):
    """A real trl.GRPOTrainer run on a tiny random Llama with LoRA; A and the completion mask registered."""
    import tempfile
    import warnings

    from gradtrace.integrations.transformers import GradtraceCallback
    from tiny_trainer import characters, grpo_trainer, make_llama, make_tokenizer, with_lora

    def register(trace, inputs):
        trace.tensor("A", inputs["advantages"])
        trace.tensor("completion_mask", inputs["completion_mask"])

    tokenizer = make_tokenizer()
    callbacks = [FreezeAdapters(freeze_at)] if freeze_at is not None and not fixed else []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = grpo_trainer(tmp, with_lora(make_llama(len(tokenizer))), tokenizer, callbacks,
                               **(fixed_kwargs if fixed else bug_kwargs))
        if reward is not None and not fixed:
            trainer.reward_funcs = [reward]
        callback = GradtraceCallback(register=register, print_errors=False).attach(trainer)
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            trainer.train()
    del characters
    return callback.trace


def _freeze_adapters_class():
    import transformers

    class _FreezeAdapters(transformers.TrainerCallback):
        """A user callback meant to freeze the base model; its loop also freezes the adapters."""

        def __init__(self, at):
            self.at = at

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == self.at:
                for p in model.parameters():
                    p.requires_grad_(False)
    return _FreezeAdapters


def FreezeAdapters(at):
    return _freeze_adapters_class()(at)


def constant_reward(completions, **kwargs):
    """A reward that cannot tell completions apart (a parser that always fails): every group's std is 0."""
    return [1.0 for _ in completions]


@scenario("ALL_ZERO_VALUES", ("'A'",), "TRL issues: 'GRPO loss is always 0' (a reward with no variance)", slow=True)
def trl_grpo_constant_reward(fixed):
    return grpo_run({}, {}, fixed, reward=constant_reward)


@scenario("WEIGHTS_UNCHANGED", ("learning rate is 0",), "TRL/transformers: learning_rate=0 in the config", slow=True)
def trl_grpo_lr_zero(fixed):
    return grpo_run({}, {"learning_rate": 0.0}, fixed)


@scenario("TINY_UPDATES", ("lr",), "TRL issues: 'LoRA weights do not change' -- learning_rate=1e-9", slow=True)
def trl_grpo_lr_tiny(fixed):
    return grpo_run({}, {"learning_rate": 1e-9}, fixed)


@scenario("FROZEN_WHILE_WATCHED", ("lora",), "peft/TRL: a callback freezing 'the base model' froze the adapters",
          slow=True)
def trl_grpo_adapters_frozen(fixed):
    return grpo_run({"max_steps": 3}, {"max_steps": 3}, fixed, freeze_at=1)


# ---- healthy runs that must stay clean (no error, no warning) ------------------------------------------------

HEALTHY: List[Tuple[str, Callable[[], "gradtrace.Trace"]]] = []


def healthy(fn):
    HEALTHY.append((fn.__name__, fn))
    return fn


@healthy
def trl_grpo_beta_kl_and_accumulation():
    """beta > 0: the reference forward runs with the adapters disabled under no_grad, every step."""
    return grpo_run({"beta": 0.04, "gradient_accumulation_steps": 2}, {}, True)


@healthy
def trl_grpo_gradient_checkpointing():
    return grpo_run({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}},
                    {}, True)


@healthy
def trainer_warmup_from_zero():
    """A linear warmup starts at lr 0: the first step moves nothing, by design."""
    import tempfile
    import warnings

    import transformers

    from gradtrace.integrations.transformers import GradtraceCallback
    from tiny_trainer import lm_data, make_llama, make_tokenizer, training_args, with_lora
    tokenizer = make_tokenizer()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=with_lora(make_llama(len(tokenizer))),
                                       args=training_args(tmp, warmup_steps=2, max_steps=3, max_grad_norm=1.0),
                                       train_dataset=lm_data(tokenizer), data_collator=transformers.default_data_collator)
        callback = GradtraceCallback(print_errors=False).attach(trainer)
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            trainer.train()
    return callback.trace


@healthy
def bf16_autocast_with_float32_weights():
    seeded()
    model = Tower()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            x, y = batch()
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
    return trace


@healthy
def actor_critic_two_optimizers():
    seeded()
    actor, critic = nn.Linear(4, 2), nn.Linear(4, 1)
    both = nn.ModuleDict({"actor": actor, "critic": critic})
    opt_a, opt_c = torch.optim.Adam(actor.parameters(), 1e-3), torch.optim.Adam(critic.parameters(), 1e-3)
    with gradtrace.watch(both) as trace:
        for _ in range(3):
            s, r = torch.randn(6, 4), torch.randn(6)
            value = critic(s).squeeze(-1)
            opt_c.zero_grad()
            F.mse_loss(value, r).backward()
            opt_c.step()
            logp = torch.log_softmax(actor(s), -1)[:, 0]
            opt_a.zero_grad()
            (-(logp * (r - critic(s).squeeze(-1)).detach()).mean()).backward()
            opt_a.step()
    return trace


@healthy
def sparse_embedding_rows_with_adam():
    """Most embedding rows get no gradient in a step: Adam leaves them alone, that is not WEIGHTS_UNCHANGED."""
    seeded()
    model = nn.Sequential(nn.Embedding(1000, 8), nn.Flatten(), nn.Linear(24, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradtrace.watch(model) as trace:
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(torch.randint(0, 5, (4, 3))), torch.randint(0, 2, (4,))).backward()
            opt.step()
    return trace


# ---- running the suite --------------------------------------------------------------------------------------


def first_line(trace) -> str:
    return trace.report().splitlines()[0]


def judge(s: Scenario, trace) -> Tuple[bool, str]:
    line = first_line(trace)
    ok = line.startswith(f"gradtrace diagnosis: {s.expect}:") and all(n in line for n in s.names)
    return ok, line


def serious(trace) -> list:
    return [v for v in trace.verdicts() if v.severity in ("error", "warning")]


def accuracy(include_slow: bool = True) -> Tuple[int, int, int, int]:
    """(bugs named on the first line, bugs, fixed twins with no error/warning, twins); prints each."""
    named = clean = total = 0
    for s in SCENARIOS:
        if s.slow and not include_slow:
            continue
        total += 1
        try:
            ok, line = judge(s, s.run(False))
        except Exception as e:  # an older gradtrace may lack an option a scenario uses
            ok, line = False, f"raised {type(e).__name__}: {e}"
        try:
            healthy = not serious(s.run(True))
        except Exception as e:
            healthy, line = False, line + f" | fixed twin raised {type(e).__name__}: {e}"
        named += ok
        clean += healthy
        print(f"{'OK ' if ok else 'BAD'} {'clean' if healthy else 'NOISY'} {s.name}: {line[:160]}")
    return named, total, clean, total


def healthy_runs() -> Tuple[int, int]:
    """(healthy runs with no error or warning, healthy runs); prints each finding."""
    clean = 0
    for name, run in HEALTHY:
        try:
            found = [str(v)[:160] for v in serious(run())]
        except Exception as e:
            found = [f"raised {type(e).__name__}: {e}"]
        clean += not found
        print(f"{'clean' if not found else 'NOISY'} {name}: {found}")
    return clean, len(HEALTHY)


if __name__ == "__main__":
    named, total, clean, twins = accuracy(include_slow="--fast" not in sys.argv)
    quiet, runs = healthy_runs() if "--fast" not in sys.argv else (0, 0)
    print(f"\nfirst line names the cause: {named}/{total}; fixed twins with no error or warning: {clean}/{twins}; "
          f"other healthy runs clean: {quiet}/{runs}")
    print(f"gradtrace from {os.path.dirname(gradtrace.__file__)}")
