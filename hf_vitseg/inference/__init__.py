"""Inference beyond one forward pass: the pipeline, sliding windows, test-time augmentation, overlays."""

from ..modeling.pipeline_vitseg import ViTSegSegmentationPipeline, segmentation_pipeline
from .overlays import colorize, make_palette, overlay, overlay_instances, side_by_side
from .sliding_window import (
    forward_logits,
    gaussian_importance_map,
    paste_by_score,
    sliding_window_inference,
    sliding_window_instances,
    sliding_window_starts,
)
from .tta import predict_logits

__all__ = [
    "ViTSegSegmentationPipeline",
    "colorize",
    "forward_logits",
    "gaussian_importance_map",
    "make_palette",
    "overlay",
    "overlay_instances",
    "paste_by_score",
    "predict_logits",
    "segmentation_pipeline",
    "side_by_side",
    "sliding_window_inference",
    "sliding_window_instances",
    "sliding_window_starts",
]
