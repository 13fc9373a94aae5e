"""Training helpers: streaming metrics, collator, optimizer parameter groups, feature cache, loops."""

from .collator import SegmentationCollator
from .metrics import (
    ConfusionMatrix,
    compute_segmentation_metrics,
    load_mean_iou_metric,
    preprocess_logits_for_metrics,
)

__all__ = ["SegmentationCollator", "ConfusionMatrix", "compute_segmentation_metrics", "load_mean_iou_metric", "preprocess_logits_for_metrics"]
