"""Losses: logits at the head's resolution are upsampled to the label size, then cross-entropy (or focal loss) with
ignore_index and optional class weights, plus optional Dice."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .head_base import resize


def check_labels(labels: torch.Tensor, num_labels: int, ignore_index: int) -> None:
    """Raise a clear error for label values outside [0, num_labels) other than ignore_index."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_labels))
    if bool(bad.any()):
        values = torch.unique(labels[bad])[:10].tolist()
        raise ValueError(
            f"labels contain values {values} outside [0, {num_labels}) that are not ignore_index={ignore_index}. "
            "Map them to class ids or to ignore_index (ADE20K-style labels with 0 = 'other' want "
            "do_reduce_labels=True in ViTSegImageProcessor), or change num_labels."
        )


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, eps: float = 1.0) -> torch.Tensor:
    """Soft multi-class Dice loss (Milletari et al., V-Net, 2016) on softmax probabilities, averaged over classes.

    `logits` (B, C, H, W) and `labels` (B, H, W) at the same size; ignored pixels count for nothing.
    """
    valid = (labels != ignore_index).unsqueeze(1)  # (B, 1, H, W)
    probs = logits.softmax(dim=1) * valid
    one_hot = F.one_hot(labels.clamp(0, logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2) * valid
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    cardinality = probs.sum(dims) + one_hot.sum(dims)
    return (1 - (2 * intersection + eps) / (cardinality + eps)).mean()


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, gamma: float = 2.0,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017), multi-class, per pixel:
    `-w[y] * (1 - p_y) ** gamma * log p_y`, averaged as weighted cross-entropy is (divided by the summed weight of
    the labelled pixels), so `gamma=0` is `F.cross_entropy(logits, labels, weight, ignore_index=...)`.

    `logits` (B, C, H, W) and `labels` (B, H, W) at the same size; `weight` (C,) per-class weights or None.
    """
    valid = labels != ignore_index
    target = torch.where(valid, labels, torch.zeros_like(labels))
    log_p = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)  # (B, H, W)
    # (1 - p) ** gamma; kept off 0 so that gamma < 1 has a finite gradient where p rounds to 1
    modulating = (1.0 - log_p.exp()).clamp(min=1e-12) ** gamma
    pixel_weight = valid.to(logits.dtype) if weight is None else weight[target] * valid
    return -(pixel_weight * modulating * log_p).sum() / pixel_weight.sum()


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, config, validate: bool = True) -> torch.Tensor:
    """Cross-entropy, or focal loss with `config.loss_type="focal"` (+ `config.dice_loss_weight` x Dice) of `logits`
    (B, C, h, w) upsampled to `labels` (B, H, W), ignoring `config.ignore_index`, weighted by `config.class_weights`."""
    if labels.ndim == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be (batch, height, width) with batch {logits.shape[0]}, got shape {tuple(labels.shape)}."
        )
    if labels.is_floating_point():
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}.")
    labels = labels.long()
    if validate and config.validate_labels:
        check_labels(labels, config.num_labels, config.ignore_index)
    # upsampling in float32 keeps bf16/fp16 logits from losing detail at boundaries
    logits = resize(logits.float(), labels.shape[-2:])
    weight = None
    if isinstance(config.class_weights, str):  # "auto", not resolved into numbers yet
        raise ValueError(
            "class_weights='auto' must be computed from the training labels before the loss runs: "
            "hf_vitseg.training.train does it, or set config.class_weights = "
            "hf_vitseg.training.class_weights.median_frequency_weights(dataset, num_labels, ignore_index)."
        )
    if config.class_weights is not None:
        weight = torch.tensor(config.class_weights, dtype=logits.dtype, device=logits.device)
    valid = labels != config.ignore_index
    # Cross-entropy's mean divides by the total weight of the labelled pixels: when it is zero (every pixel
    # ignored, or only classes of weight 0 present, e.g. class_weights=[0, 1, 1] on a background-only crop)
    # F.cross_entropy gives NaN and one optimizer step makes every parameter NaN. Then the loss is a zero that
    # still depends on the logits (so backward runs and every gradient is 0).
    total_weight = valid.sum() if weight is None else weight[labels[valid]].sum()
    if not bool(total_weight > 0):
        loss = logits.sum() * 0.0
    elif getattr(config, "loss_type", "cross_entropy") == "focal":
        loss = focal_loss(logits, labels, config.ignore_index, config.focal_gamma, weight)
    else:
        loss = F.cross_entropy(
            logits, labels, weight=weight, ignore_index=config.ignore_index, label_smoothing=config.label_smoothing
        )
    if config.dice_loss_weight:
        loss = loss + config.dice_loss_weight * dice_loss(logits, labels, config.ignore_index)
    return loss
