"""TRL's GRPO-style trainers: what ``GradtraceCallback(...).attach(trainer)`` registers by itself.

TRL's ``GRPOTrainer`` (and subclasses such as ``trl.experimental.gmpo.GMPOTrainer``)
and ``RLOOTrainer`` share one structure (trl 1.16):

* ``_generate_and_score_completions(batch)`` generates, scores
  (``_calculate_rewards`` returns every rank's rewards, one column per reward
  function) and computes the advantages *in group order*: ``num_generations``
  consecutive completions per prompt. ``_prepare_inputs`` then shuffles the
  result and splits it into ``steps_per_generation`` batches, so what
  ``compute_loss`` receives has lost the groups.
* ``_compute_loss`` computes the per-token log-probs of the policy through
  ``_get_per_token_logps_and_entropies`` (the same method, under ``no_grad``,
  gives the old and the reference log-probs during generation).

So, wrapping those three methods on the trainer instance, gradtrace registers
at the first ``compute_loss`` of every optimizer step the facts of the
generation the step's batch came from, still in group order:

* the rewards, grouped (``role="group"``): ``rewards/<function>`` with one reward
  function, else ``rewards`` (their weighted sum, as TRL sums them) plus
  ``rewards/<function>`` for a function that scored no completion at all
  (NaN everywhere: TRL's ``nansum`` would hide it). Rows are groups, so
  CONSTANT_ROWS gives the fraction of zero-variance groups (TRL's
  ``frac_reward_zero_std``) and NaN rewards are counted apart from it;
* ``advantages``: the advantages, grouped (``role="group"``);
* ``completion_mask``: the loss mask (completion mask times tool mask) paired with
  the positions that hold a generated token (up to and including the first
  EOS / padding token), so a misaligned mask shows as MASK_ON_PADDING and a
  zero-length generation as EMPTY_ROWS. With ``mask_truncated_completions``
  the rows TRL empties by design are left out of it and counted in
  ``completions kept by mask_truncated_completions`` (one flag per
  completion): only a step where every completion was truncated is a finding;

and, inside ``compute_loss``, the policy's per-token log-probs as ``S``
(``expect_grad=True``), registered where TRL computes them: a ``no_grad`` or a
``.detach()`` on their way is named with its line. Nothing is patched beyond
the trainer instance.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch

from ..analysis.tensor_checks import TRUNCATION_FLAGS  # the analysis explains an all-zero one by its name
from .patching import InstancePatches
from .steps import StepTracer

__all__ = ["GRPOWiring", "is_grpo_like", "TRUNCATION_FLAGS"]

REQUIRED = ("_generate_and_score_completions", "_calculate_rewards", "_get_per_token_logps_and_entropies",
            "num_generations")


# Data, never meant to carry a gradient: a cut seen while it was built (generation, scoring) is not its fault.
DATA = {"expect_grad": False}
GROUP = dict(DATA, role="group")


def is_grpo_like(trainer: Any) -> bool:
    """A trainer with GRPO's structure (GRPOTrainer, its subclasses, RLOOTrainer)."""
    return all(hasattr(trainer, name) for name in REQUIRED)


@dataclass
class Generation:
    """One training generation's tensors, in group order, as they will be registered (still on the device)."""

    tensors: List[Tuple[str, torch.Tensor, dict]]  # (name, tensor, trace.tensor options)


class GRPOWiring:
    """The three wrapped methods and the per-step registration."""

    def __init__(self, trainer: Any, tracer: StepTracer, patches: InstancePatches):
        self.trainer = trainer
        self.tracer = tracer
        self.patches = patches
        self.latest: Optional[Generation] = None
        self.registered_for: Optional[int] = None  # the step that got the latest generation's tensors
        self.in_loss = 0
        self._rewards: Optional[torch.Tensor] = None  # set by _calculate_rewards during a generation
        patches.wrap("_calculate_rewards", self._wrap_rewards)
        patches.wrap("_generate_and_score_completions", self._wrap_generation)
        patches.wrap("_get_per_token_logps_and_entropies", self._wrap_logps)

    # ---- what compute_loss does around TRL's ------------------------------------
    def before_loss(self) -> None:
        """At each compute_loss of an open step: the step's generation facts, once per step."""
        step = self.tracer.open_step
        if step is None or self.latest is None or self.registered_for == step:
            return
        self.registered_for = step
        for name, tensor, options in self.latest.tensors:
            self.tracer.observe(name, tensor, **options)

    @contextlib.contextmanager
    def loss(self) -> Iterator[None]:
        """Log-probs computed inside this block are the policy's: ``S``."""
        self.in_loss += 1
        try:
            yield
        finally:
            self.in_loss -= 1

    # ---- the wrappers ----------------------------------------------------------
    def _wrap_rewards(self, original: Callable) -> Callable:
        def calculate_rewards_with_gradtrace(*args, **kwargs):
            rewards = original(*args, **kwargs)
            if self.patches.active and isinstance(rewards, torch.Tensor):
                self._rewards = rewards
            return rewards
        return calculate_rewards_with_gradtrace

    def _wrap_generation(self, original: Callable) -> Callable:
        def generate_and_score_with_gradtrace(*args, **kwargs):
            self._rewards = None
            output = original(*args, **kwargs)
            if self.patches.active and self.tracer.running and self._training():
                self.latest = self._generation(output, self._rewards)
                self.registered_for = None
            self._rewards = None
            return output
        return generate_and_score_with_gradtrace

    def _wrap_logps(self, original: Callable) -> Callable:
        def per_token_logps_with_gradtrace(*args, **kwargs):
            result = original(*args, **kwargs)
            if self.patches.active and self.in_loss and self.tracer.open_step is not None:
                logps = result[0] if isinstance(result, tuple) else result
                if isinstance(logps, torch.Tensor):
                    self.tracer.observe("S", logps, expect_grad=True)
            return result
        return per_token_logps_with_gradtrace

    # ---- the facts of one generation ---------------------------------------------
    def _training(self) -> bool:
        model = getattr(self.trainer, "model", None)
        return bool(getattr(model, "training", True))

    def _generation(self, output: Any, rewards_per_func: Optional[torch.Tensor]) -> Generation:
        tensors: List[Tuple[str, torch.Tensor, dict]] = []
        group = int(self.trainer.num_generations)
        if isinstance(rewards_per_func, torch.Tensor) and rewards_per_func.dim() == 2:
            tensors.extend(self._rewards_tensors(rewards_per_func.detach(), group))
        advantages = output.get("advantages") if isinstance(output, dict) else None
        if isinstance(advantages, torch.Tensor):
            tensors.append(("advantages", _grouped(advantages.detach(), group), GROUP))
        tensors.extend(self._mask_tensors(output))
        return Generation(tensors)

    def _rewards_tensors(self, per_func: torch.Tensor, group: int) -> List[Tuple[str, torch.Tensor, dict]]:
        names = list(getattr(self.trainer, "reward_func_names", None) or [])
        if len(names) != per_func.shape[1]:
            names = [str(i) for i in range(per_func.shape[1])]
        if len(names) == 1:
            return [(f"rewards/{names[0]}", _grouped(per_func[:, 0], group), GROUP)]
        weights = getattr(self.trainer, "reward_weights", None)
        weights = (weights.to(per_func.device, per_func.dtype) if isinstance(weights, torch.Tensor)
                   else torch.ones(per_func.shape[1], dtype=per_func.dtype, device=per_func.device))
        unscorable = torch.isnan(per_func).all(dim=1)
        total = (per_func * weights.unsqueeze(0)).nansum(dim=1)  # as TRL sums them
        total[unscorable] = float("nan")
        out = [("rewards", _grouped(total, group), GROUP)]
        # One host read per generation (TRL itself reads several here): which functions scored nothing.
        silent = torch.isnan(per_func).all(dim=0).tolist()
        out.extend((f"rewards/{name}", _grouped(per_func[:, i], group), GROUP)
                   for i, name in enumerate(names) if silent[i])
        return out

    def _mask_tensors(self, output: Any) -> List[Tuple[str, torch.Tensor, dict]]:
        if not isinstance(output, dict):
            return []
        mask, ids = output.get("completion_mask"), output.get("completion_ids")
        if not (isinstance(mask, torch.Tensor) and isinstance(ids, torch.Tensor) and mask.shape == ids.shape
                and mask.dim() == 2):
            return []
        tool_mask = output.get("tool_mask")
        loss_mask = mask * tool_mask if isinstance(tool_mask, torch.Tensor) else mask
        eos, pad = _eos_and_pad(self.trainer)
        tokens, finished = _token_positions(ids, eos, pad)
        out = []
        if getattr(self.trainer, "mask_truncated_completions", False) and eos:
            # TRL empties the rows of completions that hit max_completion_length without an EOS: by design.
            out.append((TRUNCATION_FLAGS, finished, DATA))
            loss_mask, tokens = loss_mask[finished], tokens[finished]
            if loss_mask.shape[0] == 0:
                return out
        out.append(("completion_mask", loss_mask.detach(), dict(DATA, role="completion_mask", attention_mask=tokens)))
        return out


def _grouped(t: torch.Tensor, group: int) -> torch.Tensor:
    """Rows of ``group`` consecutive completions (one prompt's), when the length allows it."""
    t = t.detach()
    if t.dim() == 1 and group > 1 and t.numel() % group == 0 and t.numel() > 0:
        return t.view(-1, group)
    return t


def _eos_and_pad(trainer: Any) -> Tuple[List[int], Optional[int]]:
    """TRL's EOS ids (``eos_token_ids``, falling back to the tokenizer's) and its padding id."""
    tokenizer = getattr(trainer, "_tokenizer", None) or getattr(trainer, "processing_class", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
    eos = getattr(trainer, "eos_token_ids", None)
    if not isinstance(eos, (list, tuple)):
        eos = [getattr(tokenizer, "eos_token_id", None)]
    pad = getattr(tokenizer, "pad_token_id", None)
    return [int(i) for i in eos if isinstance(i, int)], pad if isinstance(pad, int) else None


def _token_positions(ids: torch.Tensor, eos: List[int], pad: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(positions holding a generated token, rows that ended on their own), as TRL decides them.

    A completion runs up to and including its first EOS (TRL's completion mask
    before any masking); the rest of the row is padding. It was truncated when
    its last token is neither an EOS nor the padding token (TRL's
    ``mask_truncated_completions`` test).
    """
    if not eos:
        full = torch.ones_like(ids, dtype=torch.bool)
        return full, full.any(-1)
    is_eos = torch.isin(ids, torch.tensor(eos, device=ids.device, dtype=ids.dtype))
    tokens = is_eos.long().cumsum(-1) - is_eos.long() == 0
    last = ids.gather(-1, (tokens.sum(-1, keepdim=True) - 1).clamp(min=0)).squeeze(-1)
    enders = torch.tensor(eos + ([pad] if pad is not None else []), device=ids.device, dtype=ids.dtype)
    return tokens, torch.isin(last, enders)
