"""Models and processors for training and evaluation: a model given as is or loaded from a folder (LoRA
folders included), the processor that goes with it, and the dataset check against both.

Inference loads with `hf_vitseg.hub.load_model` (checked folder, eval mode); training and evaluation load with
`load_trainable_model`, which also opens the LoRA recipe's folders. Both check a local folder the same way
(`hf_vitseg.hub.loading.check_model_folder`), so a broken file gets the same message whichever command met it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..data.datasets import validate_dataset
from ..hub.loading import check_vitseg_model_type, load_config
from ..modeling import ViTSegForSemanticSegmentation, ViTSegImageProcessor
from ..unwrap import unwrap_model
from .lora import VITSEG_CONFIG_FILE, load_lora


# -- model and processor ----------------------------------------------------------------------------------------
def is_mask_model(model_or_config) -> bool:
    """Whether a model (PEFT / DDP wrappers looked through) or config is a mask transformer (head `eomt` or `pmt`:
    `ViTSegForUniversalSegmentation`, trained on `mask_labels` / `class_labels`) rather than a pixel head."""
    config = getattr(model_or_config, "config", None)
    if config is None and hasattr(model_or_config, "module"):  # DDP / accelerate wrappers
        config = getattr(model_or_config.module, "config", None)
    if config is None:
        config = model_or_config
    return bool(getattr(config, "is_mask_transformer", False))


def model_class_for(config):
    """The model class a `ViTSegConfig` needs: `ViTSegForUniversalSegmentation` for a mask transformer
    (`config.is_mask_transformer`), else `ViTSegForSemanticSegmentation`."""
    if is_mask_model(config):
        from ..modeling import ViTSegForUniversalSegmentation

        return ViTSegForUniversalSegmentation
    return ViTSegForSemanticSegmentation


def load_trainable_model(model_or_path):
    """A `ViTSegForSemanticSegmentation` (or, for a mask-transformer config, `ViTSegForUniversalSegmentation`) to
    train or evaluate: given as is, or loaded from a saved folder (checked
    first, see `check_model_folder`) or Hub id; a folder that `save_lora` wrote (the LoRA recipe's output) comes
    back as a trainable `PeftModel` (`lora.load_lora`).

    Args:
        model_or_path: a model (returned unchanged), a folder written by `save_pretrained` / `save_lora`, or a
            Hub repo id.

    Raises:
        ValueError: the folder holds another kind of model, or a broken file (named).
    """
    if isinstance(model_or_path, torch.nn.Module):
        return model_or_path
    if all((Path(model_or_path) / name).is_file() for name in ("adapter_config.json", VITSEG_CONFIG_FILE)):
        return load_lora(model_or_path, is_trainable=True)
    config = load_config(model_or_path)
    check_vitseg_model_type(config.model_type, model_or_path)
    return model_class_for(config).from_pretrained(model_or_path)


def resolve_processor(processor, model, model_or_path=None) -> ViTSegImageProcessor:
    """`processor` checked against `model` (`ViTSegImageProcessor.check_model`), or, when it is `None`,
    `ViTSegImageProcessor.for_model(model, folder=model_or_path)`: the one saved with the model, else one built
    for it.

    Args:
        processor: the processor the caller chose, or `None`.
        model: the model (a PEFT model around one works too).
        model_or_path: where the model came from, when it was loaded (a folder or Hub id).
    """
    if processor is None:
        folder = model_or_path if isinstance(model_or_path, (str, os.PathLike)) else None
        return ViTSegImageProcessor.for_model(model, folder=folder)
    if isinstance(processor, ViTSegImageProcessor):
        processor.check_model(model)
    return processor


def validate(dataset, config, processor, name: str) -> None:
    """`validate_dataset` against the model's classes and `ignore_index` and the processor's label reduction,
    its error naming the dataset (`name`: train or eval)."""
    try:
        validate_dataset(dataset, config.num_labels, config.ignore_index, processor.do_reduce_labels,
                         num_channels=int(getattr(processor, "num_channels", 3)))
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error


__all__ = ["is_mask_model", "load_trainable_model", "model_class_for", "resolve_processor", "unwrap_model", "validate"]
