"""Optimizer parameter groups with layer-wise learning-rate decay, and the poly schedule with warm-up.

`param_groups` follows BEiT (Bao et al., ICLR 2022, `get_layer_id_for_vit`) and mmsegmentation's
`LayerDecayOptimizerConstructor`: with `L` backbone layers, the embeddings are layer 0, transformer layer
`i` (1-based) is layer `i`, the backbone's final norm is layer `L + 1`, and a parameter of layer `k`
learns at `lr * layer_decay ** (L + 1 - k)`. Hierarchical backbones (Swin) count blocks across stages as
SimMIM's `get_swin_layer_id` does: block `j` of stage `s` is layer `sum(depths[:s]) + j + 1` and a stage's
patch merging belongs to its last block. The head, the neck and the auxiliary head learn at `head_lr`.

No weight decay on norms (LayerNorm, BatchNorm, GroupNorm, RMSNorm), biases and every other 1-D parameter
(layer-scale gammas), position embeddings, CLS / distillation / register / mask tokens and relative
position tables, and learned queries (`nn.Embedding`, the mask transformers'; Mask2Former's
`WEIGHT_DECAY_EMBED = 0`): decaying them towards zero has no regularising meaning, only a cost.

```python
optimizer, scheduler = build_optimizer(model, OptimizerSettings(lr=3e-5, layer_decay=0.9), num_training_steps=160_000)
trainer = Trainer(model=model, args=args, optimizers=(optimizer, scheduler), ...)
```
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import get_polynomial_decay_schedule_with_warmup

from ..unwrap import unwrap_model

__all__ = [
    "OptimizerSettings",
    "backbone_layer_ids",
    "build_optimizer",
    "param_groups",
    "poly_schedule_with_warmup",
]

# Substrings of parameter names that never get weight decay (besides norms and 1-D parameters).
NO_DECAY_NAME_KEYWORDS = (
    "position_embedding", "pos_embed", "cls_token", "distillation_token", "register_tokens", "mask_token",
    "relative_position", "rel_pos", "layer_scale", "lambda1", "gamma",
)
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
HEAD_PARTS = ("head", "neck", "auxiliary_head")


def _vitseg_model(model: nn.Module) -> nn.Module:
    """The `ViTSegForSemanticSegmentation` inside a PEFT model (or the model itself), checked to be one."""
    model = unwrap_model(model)
    if not (hasattr(model, "backbone") and hasattr(model.backbone, "model")):
        raise TypeError(
            f"Expected a ViTSegForSemanticSegmentation or ViTSegForUniversalSegmentation (or a PEFT model around "
            f"one), got {type(model).__name__}."
        )
    return model


def _head_group(name: str, prefix: str, mask_transformer: bool) -> str:
    """The group of a parameter outside the backbone: `"head"`, or for a mask transformer (`eomt`, `pmt`) its part,
    named by the first two levels of its name (`"head.query"`, `"head.class_predictor"`, `"head.mask_head"`,
    `"head.upscale_block"`, `pmt`'s `"head.layers"`): all learn at `head_lr`, but show apart in the groups."""
    if not mask_transformer:
        return "head"
    parts = name[len(prefix):].split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay (see the module docstring)."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            # nn.Embedding: learned queries (eomt, pmt), no decay as Mask2Former's `WEIGHT_DECAY_EMBED = 0`
            if (_is_norm(module) or isinstance(module, nn.Embedding) or param.ndim <= 1
                    or any(k in name for k in NO_DECAY_NAME_KEYWORDS)):
                names.add(name)
    return names


def backbone_layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Layer id of every backbone parameter (named as in `model.named_parameters()`), and the layer count `L`.

    Ids run from 0 (embeddings) to `L + 1` (the backbone's final norm); see the module docstring. The backbone
    adapter counts the layers as its family record says (`BackboneAdapter.layer_ids`). Works on a
    `ViTSegForSemanticSegmentation` or a PEFT model around one (LoRA weights get their layer's id).
    """
    vitseg = _vitseg_model(model)
    ids_by_param, num_layers = vitseg.backbone.layer_ids()
    prefix = _name_prefix(model, vitseg)
    layer_ids = {}
    for name, param in model.named_parameters():
        if name.startswith(prefix + "backbone."):
            layer_ids[name] = ids_by_param.get(id(param), 0)  # everything else in the backbone embeds
    return layer_ids, num_layers


def _name_prefix(model: nn.Module, vitseg: nn.Module) -> str:
    """What `model.named_parameters()` puts in front of the ViTSeg model's own names ('' unless PEFT)."""
    if model is vitseg:
        return ""
    for name, module in model.named_modules():
        if module is vitseg:
            return name + "."
    raise ValueError("The ViTSeg model is not a submodule of the model given.")


def param_groups(
    model: nn.Module,
    lr: float,
    head_lr: float | None = None,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
) -> list[dict]:
    """Optimizer parameter groups for a ViTSeg model (or a PEFT model around one).

    Args:
        model: the model; parameters with `requires_grad=False` (a frozen backbone, PEFT's frozen base
            weights) are left out.
        lr: learning rate of the backbone's top (its final norm; its last layer at `lr * layer_decay`).
        head_lr: learning rate of the head, the neck and the auxiliary head; default `lr`.
        weight_decay: decoupled weight decay (AdamW) of the parameters that take it.
        layer_decay: per-layer learning-rate factor in (0, 1] (0.65 for MAE, 0.9 for BEiT fine-tuning);
            `None` gives every backbone parameter `lr`.

    Returns:
        A list of torch parameter groups, each a dict with `params`, `param_names`, `lr`, `weight_decay`,
        `lr_scale` (its `lr` over the base `lr` or `head_lr`) and a `name` for inspection:
        `"backbone.layer_{k}.decay"` / `".no_decay"` (`"backbone.decay"` without layer decay),
        `"head.decay"`, `"head.no_decay"`. Empty groups are dropped. A mask transformer (`eomt`, `pmt`) gets one
        head group per part instead (`"head.query.no_decay"`, `"head.mask_head.decay"`, ..., all at `head_lr`);
        `eomt`'s query blocks are backbone layers and decay with them, as in EoMT's recipe (`llrd_l2_enabled`).
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}.")
    head_lr = lr if head_lr is None else head_lr
    if head_lr < 0 or weight_decay < 0:
        raise ValueError(f"head_lr and weight_decay must be >= 0, got {head_lr} and {weight_decay}.")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must lie in (0, 1] (e.g. 0.9), or be None; got {layer_decay}.")

    vitseg = _vitseg_model(model)
    prefix = _name_prefix(model, vitseg)
    no_decay = {prefix + n for n in _no_decay_names(vitseg)}
    layer_ids, num_layers = backbone_layer_ids(model) if layer_decay is not None else ({}, 0)
    mask_transformer = bool(getattr(vitseg.config, "is_mask_transformer", False))

    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = "no_decay" if name in no_decay else "decay"
        if name.startswith(prefix + "backbone."):
            if layer_decay is None:
                key, group_lr, scale = f"backbone.{decay}", lr, 1.0
            else:
                layer_id = layer_ids[name]
                scale = layer_decay ** (num_layers + 1 - layer_id)
                key, group_lr = f"backbone.layer_{layer_id}.{decay}", lr * scale
        else:
            key, group_lr, scale = f"{_head_group(name, prefix, mask_transformer)}.{decay}", head_lr, 1.0
        group = groups.setdefault(key, {
            "name": key, "params": [], "param_names": [], "lr": group_lr, "lr_scale": scale,
            "weight_decay": weight_decay if decay == "decay" else 0.0,
        })
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise ValueError("The model has no trainable parameters (all have requires_grad=False).")
    return list(groups.values())


def poly_schedule_with_warmup(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    power: float = 1.0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over `warmup_steps`, then polynomial decay to `min_lr_ratio` x each group's lr.

    The factor at step `t >= warmup_steps` is `(1 - min_lr_ratio) * (1 - (t - w) / (T - w)) ** power +
    min_lr_ratio`: mmsegmentation's `PolyLR` (power 1.0, `eta_min` 0 in the BEiT and DINOv2 recipes). It
    multiplies every group's own lr, so layer-decay ratios hold throughout. This is transformers'
    `get_polynomial_decay_schedule_with_warmup` with `lr_end = min_lr_ratio * optimizer.defaults["lr"]`.
    """
    if total_steps < 1 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"Need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}.")
    if not 0 <= min_lr_ratio < 1:
        raise ValueError(f"min_lr_ratio must lie in [0, 1), got {min_lr_ratio}.")
    if power <= 0:
        raise ValueError(f"power must be positive, got {power}.")
    base_lr = optimizer.defaults.get("lr")
    if not base_lr or base_lr <= 0:
        raise ValueError("The optimizer needs a positive default lr (`optimizer.defaults['lr']`).")
    return get_polynomial_decay_schedule_with_warmup(
        optimizer, warmup_steps, total_steps, lr_end=min_lr_ratio * base_lr, power=power
    )


@dataclass
class OptimizerSettings:
    """AdamW with parameter groups (`param_groups`) and the poly schedule (`poly_schedule_with_warmup`).

    Attributes:
        lr, head_lr, weight_decay, layer_decay: see `param_groups`.
        betas, eps: AdamW's.
        warmup_steps: warm-up steps; a float below 1 is a fraction of the training steps (as in
            `TrainingArguments.warmup_steps`).
        power, min_lr_ratio: see `poly_schedule_with_warmup`.
    """

    lr: float = 1e-4
    head_lr: float | None = None
    weight_decay: float = 0.05
    layer_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int | float = 0
    power: float = 1.0
    min_lr_ratio: float = 0.0

    # other spellings accepted by `from_any`: TrainingArguments' and the CLI's
    _ALIASES = {"learning_rate": "lr", "adam_epsilon": "eps", "poly_power": "power"}

    @classmethod
    def from_any(cls, source) -> "OptimizerSettings":
        """From an `OptimizerSettings`, a recipe (its `optimizer`), a dict, or an object with attributes
        (`argparse.Namespace`, `TrainingArguments`: `learning_rate`, `adam_beta1/2`, `adam_epsilon`,
        `weight_decay`, `warmup_steps`). Unknown dict keys are an error; attributes a namespace lacks keep
        their defaults."""
        if isinstance(source, cls):
            return source
        if isinstance(getattr(source, "optimizer", None), cls):
            return source.optimizer
        fields = {f.name for f in dataclasses.fields(cls)}
        if isinstance(source, Mapping):
            values = {cls._ALIASES.get(k, k): v for k, v in source.items()}
            unknown = set(values) - fields - {"adam_beta1", "adam_beta2"}
            if unknown:
                raise ValueError(f"Unknown optimizer settings {sorted(unknown)}; valid: {sorted(fields)}.")
        elif isinstance(source, argparse.Namespace) or hasattr(source, "__dict__"):
            values = {}
            for name in list(fields) + list(cls._ALIASES) + ["adam_beta1", "adam_beta2"]:
                if getattr(source, name, None) is not None:
                    values[cls._ALIASES.get(name, name)] = getattr(source, name)
        else:
            raise TypeError(f"Cannot read optimizer settings from {type(source).__name__}.")
        beta1, beta2 = values.pop("adam_beta1", None), values.pop("adam_beta2", None)
        if beta1 is not None or beta2 is not None:
            default = values.get("betas", cls.betas)
            values["betas"] = (beta1 if beta1 is not None else default[0], beta2 if beta2 is not None else default[1])
        return cls(**values)

    def num_warmup_steps(self, num_training_steps: int) -> int:
        """`warmup_steps` as a step count for a run of `num_training_steps`."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil(num_training_steps * self.warmup_steps)


def build_optimizer(
    model: nn.Module, recipe_or_args, num_training_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `param_groups(model, ...)` and `poly_schedule_with_warmup`, for `Trainer(optimizers=...)`.

    Args:
        model: a ViTSeg model, or a PEFT model around one.
        recipe_or_args: anything `OptimizerSettings.from_any` reads (a `Recipe`, `OptimizerSettings`, dict,
            `argparse.Namespace`, `TrainingArguments`).
        num_training_steps: optimizer steps of the whole run (the schedule's end).
    """
    settings = OptimizerSettings.from_any(recipe_or_args)
    groups = param_groups(
        model, settings.lr, head_lr=settings.head_lr, weight_decay=settings.weight_decay,
        layer_decay=settings.layer_decay,
    )
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps)
    scheduler = poly_schedule_with_warmup(
        optimizer, settings.num_warmup_steps(num_training_steps), num_training_steps,
        power=settings.power, min_lr_ratio=settings.min_lr_ratio,
    )
    return optimizer, scheduler
