"""Image processing: `ViTSegImageProcessor` (travels with checkpoints as remote code), augmentation, datasets."""

from .augment import AugmentationEpochCallback, SegmentationTransform, set_augmentation_epoch
from .data import load_hf_dataset, load_image_folder, prepare_datasets, validate_dataset
from .image_processing_vitseg import ViTSegImageProcessor

__all__ = [
    "AugmentationEpochCallback",
    "SegmentationTransform",
    "ViTSegImageProcessor",
    "load_hf_dataset",
    "load_image_folder",
    "prepare_datasets",
    "set_augmentation_epoch",
    "validate_dataset",
]
