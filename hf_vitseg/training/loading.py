"""Models and processors for training and evaluation: a model given as is or loaded from a folder (LoRA
folders included), the processor that goes with it, and the dataset check against both."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig

from ..modeling import ViTSegForSemanticSegmentation, ViTSegImageProcessor
from ..data.datasets import validate_dataset
from .lora import VITSEG_CONFIG_FILE, load_lora


# -- model and processor ----------------------------------------------------------------------------------------
def load_trainable_model(model_or_path):
    """A `ViTSegForSemanticSegmentation` given as is, or loaded from a saved folder (or Hub id); a folder that
    `save_lora` wrote (the LoRA recipe's output) comes back as a trainable `PeftModel` (`lora.load_lora`)."""
    if isinstance(model_or_path, torch.nn.Module):
        return model_or_path
    if all((Path(model_or_path) / name).is_file() for name in ("adapter_config.json", VITSEG_CONFIG_FILE)):
        return load_lora(model_or_path, is_trainable=True)
    model_type = AutoConfig.from_pretrained(model_or_path).model_type
    if model_type != "vitseg":
        raise ValueError(
            f"{model_or_path} holds a {model_type!r} model, not a ViTSeg segmentation model. Build one on this "
            "backbone with ViTSegForSemanticSegmentation.from_pretrained_backbone(path, head=..., num_labels=...), "
            "or from the command line: hf-vitseg train --backbone PATH --head NAME ..."
        )
    return ViTSegForSemanticSegmentation.from_pretrained(model_or_path)


def default_processor(model) -> ViTSegImageProcessor:
    """A `ViTSegImageProcessor` for `model`: its patch size and `ignore_index`, and the mean and std of the
    backbone's own image processor when the backbone's folder (`config.backbone_name_or_path`) has one
    (ImageNet statistics otherwise)."""
    model = unwrap_model(model)
    kwargs = {"patch_size": model.size_divisor, "ignore_index": model.config.ignore_index}
    backbone = getattr(model.config, "backbone_name_or_path", None)
    if backbone:
        try:
            backbone_processor, _ = ViTSegImageProcessor.get_image_processor_dict(backbone)
        except OSError:  # no preprocessor_config.json there (or the Hub is out of reach): keep ImageNet's
            backbone_processor = {}
        kwargs.update({k: backbone_processor[k] for k in ("image_mean", "image_std") if k in backbone_processor})
    return ViTSegImageProcessor(**kwargs)


def resolve_processor(processor, model, model_or_path=None) -> ViTSegImageProcessor:
    """`processor`, else the one saved beside `model_or_path`, else `default_processor(model)`; checked
    against the model (patch size, `ignore_index`)."""
    if processor is None and isinstance(model_or_path, (str, os.PathLike)):
        if (Path(model_or_path) / "preprocessor_config.json").is_file():
            processor = ViTSegImageProcessor.from_pretrained(model_or_path)
    if processor is None:
        return default_processor(model)
    divisor, config = unwrap_model(model).size_divisor, unwrap_model(model).config
    patch_size = getattr(processor, "patch_size", None)
    if patch_size is not None and patch_size % divisor:
        raise ValueError(
            f"The image processor pads to multiples of {patch_size}, but the model needs multiples of {divisor}: "
            f"set processor.patch_size = {divisor} (or a multiple of it)."
        )
    processor_ignore = getattr(processor, "ignore_index", config.ignore_index)
    if processor_ignore != config.ignore_index:
        raise ValueError(
            f"The image processor pads labels with ignore_index={processor_ignore}, but the model ignores "
            f"{config.ignore_index}: make them agree (processor.ignore_index = model.config.ignore_index)."
        )
    return processor


def validate(dataset, config, processor, name: str) -> None:
    """`validate_dataset` against the model's classes and `ignore_index` and the processor's label reduction,
    its error naming the dataset (`name`: train or eval)."""
    try:
        validate_dataset(dataset, config.num_labels, config.ignore_index, processor.do_reduce_labels)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error


def unwrap_model(model):
    """The ViTSeg model inside a PEFT model (LoRA recipe), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


