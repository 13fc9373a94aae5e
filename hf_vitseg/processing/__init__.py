"""Image processing: `ViTSegImageProcessor` (travels with checkpoints as remote code), augmentation, datasets."""

from .image_processing_vitseg import ViTSegImageProcessor

__all__ = ["ViTSegImageProcessor"]
