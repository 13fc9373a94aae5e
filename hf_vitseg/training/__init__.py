"""Training helpers: streaming metrics, collator, optimizer parameter groups, feature cache, loops."""

from .collator import SegmentationCollator
from .metrics import (
    ConfusionMatrix,
    compute_segmentation_metrics,
    load_mean_iou_metric,
    preprocess_logits_for_metrics,
)

from .accelerate_loop import train_with_accelerate
from .train import evaluate_model, train

__all__ = ["train", "evaluate_model", "train_with_accelerate", "SegmentationCollator", "ConfusionMatrix", "compute_segmentation_metrics", "load_mean_iou_metric", "preprocess_logits_for_metrics"]
