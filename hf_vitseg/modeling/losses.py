"""Losses: logits at the head's resolution are upsampled to the label size, then cross-entropy with ignore_index."""

from __future__ import annotations

import torch
from torch.nn import functional as F


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


def upsample_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling of (B, C, h, w) logits to `size` (align_corners=False), a no-op at equal size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """Cross-entropy of `logits` (B, C, h, w) upsampled to `labels` (B, H, W), ignoring `config.ignore_index`."""
    if labels.ndim == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be (batch, height, width) with batch {logits.shape[0]}, got shape {tuple(labels.shape)}."
        )
    if labels.is_floating_point():
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}.")
    labels = labels.long()
    if config.validate_labels:
        check_labels(labels, config.num_labels, config.ignore_index)
    # upsampling in float32 keeps bf16/fp16 logits from losing detail at boundaries
    logits = upsample_logits(logits.float(), labels.shape[-2:])
    weight = None
    if config.class_weights is not None:
        weight = torch.tensor(config.class_weights, dtype=logits.dtype, device=logits.device)
    if not bool((labels != config.ignore_index).any()):
        # every pixel ignored: a zero loss that still depends on the logits (F.cross_entropy would give NaN)
        return logits.sum() * 0.0
    return F.cross_entropy(
        logits, labels, weight=weight, ignore_index=config.ignore_index, label_smoothing=config.label_smoothing
    )
