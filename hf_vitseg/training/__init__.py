"""Training: `train` (Trainer), `compare_heads` (which head?), `evaluate_model`, streaming metrics, optimizer groups,
recipes, LoRA, feature cache, mask annealing (mask transformers)."""

from . import recipes
from .compare import compare_heads, recommend
from .evaluation import evaluate_model
from .feature_cache import CachedBackboneModel, FeatureCache, train_head_on_cache
from .lora import apply_lora, load_lora, save_lora
from .mask_annealing import MaskAnnealing, MaskAnnealingCallback
from .mask_metrics import MaskAP, PanopticQuality
from .metrics import (
    ConfusionMatrix,
    compute_segmentation_metrics,
    load_mean_iou_metric,
    preprocess_logits_for_metrics,
)
from .optim import OptimizerSettings, build_optimizer, param_groups, poly_schedule_with_warmup
from .trainer import SegmentationTrainer, train
from .universal_metrics import compute_universal_metrics

__all__ = [
    "CachedBackboneModel",
    "ConfusionMatrix",
    "FeatureCache",
    "MaskAnnealing",
    "MaskAP",
    "MaskAnnealingCallback",
    "OptimizerSettings",
    "PanopticQuality",
    "SegmentationTrainer",
    "apply_lora",
    "build_optimizer",
    "compare_heads",
    "compute_segmentation_metrics",
    "compute_universal_metrics",
    "evaluate_model",
    "load_lora",
    "load_mean_iou_metric",
    "param_groups",
    "poly_schedule_with_warmup",
    "preprocess_logits_for_metrics",
    "recipes",
    "recommend",
    "save_lora",
    "train",
    "train_head_on_cache",
]
