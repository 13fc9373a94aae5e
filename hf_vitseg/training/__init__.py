"""Training helpers: streaming metrics, collator, optimizer parameter groups, recipes, LoRA, feature cache, loops."""

from . import recipes
from .accelerate_loop import train_with_accelerate
from .collator import SegmentationCollator
from .feature_cache import CachedBackboneModel, FeatureCache, train_head_on_cache
from .lora import apply_lora, load_lora, save_lora
from .metrics import (
    ConfusionMatrix,
    compute_segmentation_metrics,
    load_mean_iou_metric,
    preprocess_logits_for_metrics,
)
from .optim import OptimizerSettings, build_optimizer, param_groups, poly_schedule_with_warmup
from .train import evaluate_model, train


__all__ = [
    "CachedBackboneModel",
    "ConfusionMatrix",
    "FeatureCache",
    "OptimizerSettings",
    "SegmentationCollator",
    "apply_lora",
    "build_optimizer",
    "compute_segmentation_metrics",
    "evaluate_model",
    "load_lora",
    "load_mean_iou_metric",
    "param_groups",
    "poly_schedule_with_warmup",
    "preprocess_logits_for_metrics",
    "recipes",
    "save_lora",
    "train",
    "train_head_on_cache",
    "train_with_accelerate",
]
