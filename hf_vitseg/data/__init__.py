"""Data for training: dataset loaders (image folders, HF datasets), augmentation, the collator.

Not imported by `import hf_vitseg` (it pulls in `datasets`); import `hf_vitseg.data` where you need it.
"""

from .augment import AugmentationEpochCallback, SegmentationTransform, set_augmentation_epoch
from .collator import SegmentationCollator
from .datasets import load_hf_dataset, load_image_folder, load_instance_folder, prepare_datasets, validate_dataset

__all__ = [
    "AugmentationEpochCallback",
    "SegmentationCollator",
    "SegmentationTransform",
    "load_hf_dataset",
    "load_image_folder",
    "load_instance_folder",
    "prepare_datasets",
    "set_augmentation_epoch",
    "validate_dataset",
]
