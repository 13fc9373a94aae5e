"""Mask annealing for mask transformers (`eomt`, `pmt`): masked attention during training, plain attention at the end.

EoMT (Kerssies et al., CVPR 2025, Sec. 3.3) trains with masked attention (each query attends only to the patches its
previous mask prediction covers) and then anneals it away, block by block, so that the trained model runs plain
attention and needs no intermediate masks at inference. `model.attn_mask_probs[i]` is the probability that block `i`
(counted from the first block that holds the queries) applies its mask in a training step. Per block it follows
EoMT's polynomial schedule (`training/lightning_module.py`, `mask_annealing`):

    prob(step) = 1                                          for step <  start[i]
                 (1 - (step - start[i]) / (end[i] - start[i])) ** power   in between (power 0.9)
                 0                                          for step >= end[i]

EoMT's configurations split the run of `T` steps into `num_blocks + 2` equal parts: block `i` anneals over part
`i + 1` (start `(i + 1) T / (N + 2)`, end `(i + 2) T / (N + 2)`): the first part trains fully masked, the last
one fully unmasked. That is the default here (`annealing_steps`); other start/end steps can be given.

Two ways in:

- `MaskAnnealingCallback()` for `transformers.Trainer` (`hf_vitseg.training.train` adds it to a mask model's
  run by itself): sets the probabilities at the start (from the step a resumed run is at) and after every
  optimizer step, and to 0 when training ends, whatever the schedule said.
- `MaskAnnealing(model, total_steps)` for a plain (Accelerate) loop: call `annealer.step(global_step)` after each
  optimizer step, `annealer.finish()` at the end (see `examples/accelerate_train.py`).

Both reach the model through PEFT wrappers (`hf_vitseg.unwrap`) and DDP / `accelerate` wrappers (`.module`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from ..unwrap import unwrap_model

__all__ = [
    "DEFAULT_POWER",
    "MaskAnnealing",
    "MaskAnnealingCallback",
    "annealing_probability",
    "annealing_steps",
    "attn_mask_probs_of",
    "set_attn_mask_probs",
]

DEFAULT_POWER = 0.9  # EoMT's poly_power


def annealing_probability(step: int, start: int, end: int, power: float = DEFAULT_POWER) -> float:
    """EoMT's probability of masked attention at `step` for a block annealed from `start` to `end` (see the module
    docstring): 1 before `start`, 0 from `end` on, `(1 - progress) ** power` in between."""
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    progress = (step - start) / (end - start)
    return float((1.0 - progress) ** power)


def annealing_steps(num_blocks: int, total_steps: int) -> tuple[list[int], list[int]]:
    """EoMT's default start and end steps: the run split into `num_blocks + 2` equal parts, block `i` annealed over
    part `i + 1`. E.g. 4 blocks over 40000 steps: starts `[6666, 13333, 20000, 26666]`, ends
    `[13333, 20000, 26666, 33333]` (EoMT's ADE20K configurations: `[6520, ...]` for 39120 steps).

    Every end is at most `total_steps`, so the masks are off before the run ends (for runs of fewer than
    `num_blocks + 2` steps, several blocks share a step)."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    part = total_steps / (num_blocks + 2)
    starts = [int((i + 1) * part) for i in range(num_blocks)]
    ends = [max(int((i + 2) * part), start + 1) for i, start in enumerate(starts)]
    return starts, [min(end, total_steps) for end in ends]


def _model_with_probs(model: nn.Module) -> nn.Module:
    """The hf-vitseg model inside DDP / accelerate (`.module`) and PEFT wrappers, checked to have
    `attn_mask_probs`."""
    seen = model
    for _ in range(4):  # DDP(PeftModel(model)) at most; a few levels for safety
        if hasattr(seen, "attn_mask_probs"):
            return seen
        inner = unwrap_model(seen)
        if inner is seen:
            inner = getattr(seen, "module", seen)
        if inner is seen:
            break
        seen = inner
    if hasattr(seen, "attn_mask_probs"):
        return seen
    raise TypeError(
        f"Mask annealing needs a mask-transformer model (head 'eomt' or 'pmt', which has `attn_mask_probs`); got "
        f"{type(unwrap_model(model)).__name__}. Train pixel heads without MaskAnnealingCallback."
    )


def attn_mask_probs_of(model: nn.Module) -> torch.Tensor:
    """The model's `attn_mask_probs` buffer (through PEFT / DDP wrappers)."""
    return _model_with_probs(model).attn_mask_probs


def set_attn_mask_probs(model: nn.Module, probs: Sequence[float] | float) -> None:
    """Write `probs` (one per block, or one value for all) into the model's `attn_mask_probs`, in place (the buffer
    keeps its device and dtype, and travels with `save_pretrained` and checkpoints)."""
    buffer = attn_mask_probs_of(model)
    values = torch.as_tensor(probs, dtype=buffer.dtype).to(buffer.device)
    if values.ndim == 0:
        values = values.expand_as(buffer)
    if values.shape != buffer.shape:
        raise ValueError(f"Got {values.numel()} probabilities for a model with {buffer.numel()} masked blocks.")
    with torch.no_grad():
        buffer.copy_(values)


class MaskAnnealing:
    """EoMT's mask-annealing schedule for one run; drives a model's `attn_mask_probs`.

    Args:
        model: the mask-transformer model (`ViTSegForUniversalSegmentation`, or a PEFT / DDP wrapper around one).
        total_steps: optimizer steps of the run (the default schedule ends before it).
        start_steps, end_steps: per block (as many as `model.attn_mask_probs`), the step where annealing starts
            and where it reaches 0; default `annealing_steps(num_blocks, total_steps)`.
        power: the polynomial's power (EoMT: 0.9).

    Example (Accelerate loop):

        annealer = MaskAnnealing(model, total_steps=num_steps)
        for step, batch in enumerate(loader, start=1):
            ...; optimizer.step()
            annealer.step(step)
        annealer.finish()  # plain attention from here on
    """

    def __init__(self, model: nn.Module, total_steps: int, start_steps: Sequence[int] | None = None,
                 end_steps: Sequence[int] | None = None, power: float = DEFAULT_POWER):
        self.model = model
        num_blocks = attn_mask_probs_of(model).numel()
        if not power > 0:
            raise ValueError(f"power must be > 0, got {power}.")
        default_starts, default_ends = annealing_steps(num_blocks, total_steps)
        self.start_steps = list(default_starts if start_steps is None else start_steps)
        self.end_steps = list(default_ends if end_steps is None else end_steps)
        for name, steps in (("start_steps", self.start_steps), ("end_steps", self.end_steps)):
            if len(steps) != num_blocks:
                raise ValueError(f"{name} needs one step per masked block ({num_blocks}), got {len(steps)}.")
        for block, (start, end) in enumerate(zip(self.start_steps, self.end_steps)):
            if not 0 <= start < end:
                raise ValueError(f"Block {block}: need 0 <= start_steps < end_steps, got {start} and {end}.")
        self.total_steps = total_steps
        self.power = power

    def probs(self, step: int) -> list[float]:
        """The probability of masked attention of every block after `step` optimizer steps."""
        return [annealing_probability(step, start, end, self.power)
                for start, end in zip(self.start_steps, self.end_steps)]

    def step(self, global_step: int) -> list[float]:
        """Set the model's probabilities for the training step that follows `global_step` completed steps; returns
        them."""
        probs = self.probs(global_step)
        set_attn_mask_probs(self.model, probs)
        return probs

    def finish(self) -> None:
        """Masks off in every block: the model runs plain attention (inference) from here on."""
        set_attn_mask_probs(self.model, 0.0)


class MaskAnnealingCallback(TrainerCallback):
    """`TrainerCallback` that anneals a mask transformer's masked attention with EoMT's schedule (`MaskAnnealing`).

    At the start of training (also of a resumed one: from the step it resumes at) and after every optimizer step it
    sets `model.attn_mask_probs`; at the end of training it sets them to 0, so that evaluation after training, the
    saved model and inference run plain attention. The run's length is `state.max_steps` unless `total_steps` is
    given.

    Args:
        total_steps: length of the annealing horizon; default the run's `max_steps`.
        start_steps, end_steps, power: see `MaskAnnealing`.
    """

    def __init__(self, total_steps: int | None = None, start_steps: Sequence[int] | None = None,
                 end_steps: Sequence[int] | None = None, power: float = DEFAULT_POWER):
        self.total_steps = total_steps
        self.start_steps = start_steps
        self.end_steps = end_steps
        self.power = power
        self.annealing: MaskAnnealing | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("MaskAnnealingCallback needs the model (Trainer passes it to callbacks).")
        self.annealing = MaskAnnealing(
            model, self.total_steps or state.max_steps, self.start_steps, self.end_steps, self.power
        )
        self.annealing.step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.annealing is not None:
            self.annealing.step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.annealing is not None:
            self.annealing.finish()
