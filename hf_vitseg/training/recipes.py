"""Three training recipes, each the published protocol it comes from, as data: `Recipe`.

- `linear_probe()`: DINOv2's linear evaluation (Oquab et al., TMLR 2024, sec. 7.4; the released mmseg
  config `dinov2_vit*14_ade20k_linear_config.py`): frozen backbone, BatchNorm + 1x1 conv on the last
  layer's normed patch tokens, AdamW lr 1e-3, weight decay 1e-4, 1500 warm-up iterations then poly
  (power 1) decay to 0 over 40k iterations, batch 16, 512x512 crops, sliding-window evaluation (512
  windows, stride 341).
- `full_finetune()`: BEiT's semantic-segmentation fine-tuning (Bao et al., ICLR 2022; mmsegmentation's
  `beit-base_upernet_8xb2-160k_ade20k-640x640.py`): everything trains, AdamW lr 3e-5, weight decay 0.05,
  layer decay 0.9, 1500 warm-up iterations then poly decay over 160k, batch 16, 640 crops, UperNet with
  an auxiliary FCN head (weight 0.4), sliding window 640 / 426.
- `lora()`: LoRA on the backbone's attention projections, the head trained in full (Hu et al., ICLR
  2022; PEFT's semantic-segmentation LoRA guide: lr 5e-4, LoRA dropout 0.1), on the linear probe's
  data and schedule.

Crop and window sizes are rounded up to a multiple of the patch size (512 -> 518 at patch 14, as
DINOv2 pads internally), window strides are 2/3 of the window as in both sources.

```python
recipe = linear_probe()
model = recipe.build_model("facebook/dinov2-small", num_labels=150)
optimizer, scheduler = recipe.build_optimizer(model)
trainer = Trainer(model=model, args=recipe.training_arguments("out"), optimizers=(optimizer, scheduler), ...)
```
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .optim import OptimizerSettings, build_optimizer

__all__ = ["Recipe", "full_finetune", "linear_probe", "lora"]


def round_to_patch(size: int, patch_size: int) -> int:
    """The smallest multiple of `patch_size` that is >= `size`."""
    if patch_size < 1 or size < 1:
        raise ValueError(f"size and patch_size must be positive, got {size} and {patch_size}.")
    return math.ceil(size / patch_size) * patch_size


def _sliding_window(crop: int) -> dict:
    """Keyword arguments of `hf_vitseg.inference.sliding_window_inference`: windows of the training crop,
    2/3 of it apart (mmsegmentation's 512 / 341 and 640 / 426)."""
    stride = crop * 2 // 3
    return {"crop_size": (crop, crop), "stride": (stride, stride)}


def _training_args(batch_size: int, max_steps: int, settings: OptimizerSettings) -> dict:
    """`TrainingArguments` keywords matching the recipe (Trainer's own optimizer would follow them, minus the
    parameter groups; pass `Recipe.build_optimizer`'s pair as `optimizers=` for those)."""
    return {
        "per_device_train_batch_size": batch_size,
        "max_steps": max_steps,
        "learning_rate": settings.lr,
        "weight_decay": settings.weight_decay,
        "warmup_steps": settings.warmup_steps,
        "lr_scheduler_type": "polynomial",
        "lr_scheduler_kwargs": {"power": settings.power, "lr_end": settings.min_lr_ratio * settings.lr},
        "remove_unused_columns": False,  # image datasets with set_transform need their raw columns
    }


@dataclass
class Recipe:
    """A training recipe: model settings, optimizer and schedule, training and evaluation sizes, its source.

    Attributes:
        name: `"linear_probe"`, `"full_finetune"` or `"lora"`.
        source: the protocol's publication and config it follows.
        patch_size: the backbone patch size the sizes below were rounded for.
        model_kwargs: `ViTSegConfig` keywords (`head`, `freeze_backbone`, ...).
        optimizer: `OptimizerSettings` for `build_optimizer`.
        training_args: `TrainingArguments` keywords (batch size, steps; `output_dir` comes at use).
        crop_size: the training crop, a patch multiple (for the augmentation / image processor).
        sliding_window: `sliding_window_inference` keywords (`crop_size`, `stride`) for evaluation.
        lora: `apply_lora` keywords, or `None` for no adapters.
    """

    name: str
    source: str
    patch_size: int
    model_kwargs: dict
    optimizer: OptimizerSettings
    training_args: dict
    crop_size: int
    sliding_window: dict
    lora: dict | None = field(default=None)

    def build_model(self, pretrained_backbone: str, num_labels: int | None = None, **config_overrides):
        """The recipe's model around a pretrained backbone (a Hub id or local folder of a plain HF model);
        a `PeftModel` for the LoRA recipe. `config_overrides` replace the recipe's `ViTSegConfig` keywords."""
        from ..modeling import ViTSegForSemanticSegmentation

        model = ViTSegForSemanticSegmentation.from_pretrained_backbone(
            pretrained_backbone, num_labels=num_labels, **{**self.model_kwargs, **config_overrides}
        )
        divisor = model.size_divisor
        if self.crop_size % divisor:
            raise ValueError(
                f"Recipe {self.name!r} was made for patch size {self.patch_size} (crop {self.crop_size}), but this "
                f"backbone needs multiples of {divisor}. Make the recipe with patch_size={divisor}."
            )
        if self.lora is not None:
            from .lora import apply_lora

            model = apply_lora(model, **self.lora)
        return model

    def build_optimizer(self, model, num_training_steps: int | None = None):
        """`(optimizer, scheduler)` for `Trainer(optimizers=...)`; steps default to `training_args["max_steps"]`."""
        return build_optimizer(model, self.optimizer, num_training_steps or self.training_args["max_steps"])

    def training_arguments(self, output_dir: str, **overrides):
        """`transformers.TrainingArguments` with the recipe's settings, `overrides` replacing any of them."""
        from transformers import TrainingArguments

        return TrainingArguments(output_dir=output_dir, **{**self.training_args, **overrides})

    def to_dict(self) -> dict:
        """Everything as plain data (for logs and run records)."""
        return dataclasses.asdict(self)


def _recipe(name: str, source: str, *, model_kwargs: dict, optimizer: OptimizerSettings, patch_size: int,
            crop_size: int, batch_size: int, max_steps: int, lora: dict | None = None) -> Recipe:
    """What every recipe derives the same way from its sizes: the crop rounded up to a patch multiple, the
    evaluation windows of that crop, the `TrainingArguments` keywords from the optimizer settings."""
    crop = round_to_patch(crop_size, patch_size)
    return Recipe(
        name=name, source=source, patch_size=patch_size, model_kwargs=model_kwargs, optimizer=optimizer,
        training_args=_training_args(batch_size, max_steps, optimizer), crop_size=crop,
        sliding_window=_sliding_window(crop), lora=lora,
    )


def linear_probe(
    patch_size: int = 14,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    crop_size: int = 512,
    max_steps: int = 40_000,
    batch_size: int = 16,
    warmup_steps: int = 1500,
) -> Recipe:
    """DINOv2's linear segmentation probe: frozen backbone, `linear` head (BatchNorm + 1x1 conv on the last
    layer's patch tokens after the backbone's final norm: `backbone_out_indices=[-1]`, where the `linear`
    head's own default is the last four layers), AdamW, poly schedule with linear warm-up.

    Source: Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024, sec. 7.4,
    and its released config `dinov2_vitb14_ade20k_linear_config.py` (mmseg 0.x): AdamW(lr=1e-3,
    weight_decay=1e-4, betas=(0.9, 0.999)), poly power 1.0 with 1500 linear warm-up iterations, min lr 0,
    40k iterations at 2 x 8 GPUs = 16 images, 512x512 random crops of images resized to 512 on the short
    side x [0.5, 2.0], flip, photometric distortion; `slide` test mode with 512 windows at stride 341.
    """
    settings = OptimizerSettings(
        lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, power=1.0, min_lr_ratio=0.0
    )
    return _recipe(
        "linear_probe",
        "DINOv2 (Oquab et al., TMLR 2024) sec. 7.4, dinov2_vit*14_ade20k_linear_config.py",
        model_kwargs={"head": "linear", "backbone_out_indices": [-1], "freeze_backbone": True,
                      "backbone_apply_layernorm": True},
        optimizer=settings, patch_size=patch_size, crop_size=crop_size, batch_size=batch_size, max_steps=max_steps,
    )


def full_finetune(
    layer_decay: float = 0.9,
    lr: float = 3e-5,
    head_lr: float | None = None,
    weight_decay: float = 0.05,
    head: str = "upernet",
    auxiliary_loss_weight: float = 0.4,
    patch_size: int = 14,
    crop_size: int = 640,
    max_steps: int = 160_000,
    batch_size: int = 16,
    warmup_steps: int = 1500,
) -> Recipe:
    """Full fine-tuning with layer-wise learning-rate decay (BEiT's segmentation recipe).

    Source: Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022, as configured in
    mmsegmentation's `configs/beit/beit-base_upernet_8xb2-160k_ade20k-640x640.py`: AdamW(lr=3e-5,
    weight_decay=0.05), `LayerDecayOptimizerConstructor` with `layer_decay_rate=0.9` over 12 layers (the
    head at the top layer's rate, hence `head_lr=None` = `lr`), linear warm-up over 1500 iterations then
    poly power 1.0 to 0, 160k iterations, 8 GPUs x 2 images, 640 crops, UperNet + auxiliary FCN head
    (loss weight 0.4), `slide` test mode 640 / 426. BEiT-large uses lr 2e-5 and layer decay 0.95.
    """
    settings = OptimizerSettings(
        lr=lr, head_lr=head_lr, weight_decay=weight_decay, layer_decay=layer_decay, warmup_steps=warmup_steps,
        power=1.0, min_lr_ratio=0.0,
    )
    return _recipe(
        "full_finetune",
        "BEiT (Bao et al., ICLR 2022), mmsegmentation beit-base_upernet_8xb2-160k_ade20k-640x640.py",
        model_kwargs={"head": head, "freeze_backbone": False, "auxiliary_loss_weight": auxiliary_loss_weight},
        optimizer=settings, patch_size=patch_size, crop_size=crop_size, batch_size=batch_size, max_steps=max_steps,
    )


def lora(
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.1,
    target_modules: str | list[str] | None = None,
    lr: float = 5e-4,
    head_lr: float | None = None,
    weight_decay: float = 0.0,
    head: str = "linear",
    patch_size: int = 14,
    crop_size: int = 512,
    max_steps: int = 40_000,
    batch_size: int = 16,
    warmup_steps: int = 1500,
) -> Recipe:
    """LoRA on the backbone's attention projections (`hf_vitseg.training.lora.apply_lora`), head in full.

    Sources: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (the method;
    `alpha / r` scaling); PEFT's task guide "Semantic segmentation using LoRA" (SegFormer on ADE20K: lr 5e-4,
    LoRA dropout 0.1, no weight decay, the decode head trained in full). Rank 8 with alpha 16 is a common
    starting point for ViT-S/B backbones; data, crops, batch and schedule follow `linear_probe`.
    """
    settings = OptimizerSettings(
        lr=lr, head_lr=head_lr, weight_decay=weight_decay, warmup_steps=warmup_steps, power=1.0, min_lr_ratio=0.0
    )
    return _recipe(
        "lora",
        "LoRA (Hu et al., ICLR 2022); PEFT task guide 'Semantic segmentation using LoRA'",
        model_kwargs={"head": head, "freeze_backbone": False},
        optimizer=settings, patch_size=patch_size, crop_size=crop_size, batch_size=batch_size, max_steps=max_steps,
        lora={"r": r, "alpha": alpha, "dropout": dropout, "target_modules": target_modules},
    )
