"""`load_model`: load a saved hf-vitseg model, with errors that name the file or value at fault.

transformers' own messages for the commonest broken folders do not say which file is broken
("Error while deserializing header: incomplete metadata, file not fully covered") or which config
holds a bad value, so this helper checks the folder first and says both, and what to do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise a `ValueError` naming `path` if it is not a complete safetensors file.

    Reads the header only (no tensor data), so it is cheap even for large shards. A truncated file is
    caught because its header promises more bytes than the file holds.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} is not a valid safetensors file ({error}). It is probably truncated or corrupt (an "
            "interrupted download or copy): download or save it again."
        ) from error


def check_vitseg_model_type(model_type: str | None, source: str | os.PathLike) -> None:
    """Refuse a model that is not a ViTSeg segmentation model: transformers would load another model type
    (a SegFormer, a plain backbone) without complaint, and predict with its random or foreign head.

    Args:
        model_type: the `model_type` of the config found at `source`.
        source: the folder or Hub repo id, for the message.

    Raises:
        ValueError: `model_type` is not `vitseg`; the message says how to build one on that checkpoint.
    """
    if model_type != "vitseg":
        raise ValueError(
            f"{source} holds a {model_type!r} model, not a ViTSeg segmentation model. To use it as a backbone, "
            "build one on it: ViTSegForSemanticSegmentation.from_pretrained_backbone(path, head=..., "
            "num_labels=...), or hf-vitseg train --backbone PATH; otherwise give the folder hf-vitseg saved."
        )


def lora_folder_message(folder) -> str:
    """The one message for a LoRA adapter folder (no `config.json`) given where a whole model is needed."""
    return (
        f"{folder} holds a LoRA adapter, not a model: `hf-vitseg evaluate` reads it as it is; to predict with it, "
        "serve or push it, merge it first (hf_vitseg.training.lora.load_lora(folder).merge_and_unload()) and save "
        "the merged model with save_pretrained."
    )


def check_model_folder(folder: str | os.PathLike, *, vitseg: bool = True) -> None:
    """Check a saved model folder before loading it: `config.json` parses and (with `vitseg`) says model_type
    `vitseg`, its `head` is known (when hf-vitseg is importable), and every `*.safetensors` weights file is
    complete.

    Args:
        folder: the folder.
        vitseg: refuse another model type (`check_vitseg_model_type`); `False` for a checkpoint that may be a
            plain backbone.

    Raises:
        FileNotFoundError: no `config.json`, or no safetensors weights.
        ValueError: a config that does not parse or is not a ViTSeg model's, an unknown head, or a broken
            weights file; the message names the file and the value.
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        if (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(lora_folder_message(folder))
        raise FileNotFoundError(
            f"{folder} has no config.json: it is not a saved model folder. Save one with "
            "model.save_pretrained(folder)."
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON ({error}); save the model again.") from error
    if vitseg:
        check_vitseg_model_type(config.get("model_type"), folder)
    if config.get("model_type") == "vitseg":
        from ..modeling.head_base import HEAD_REGISTRY, MASK_HEAD_NAMES, list_heads

        head = config.get("head")
        if head not in HEAD_REGISTRY and head not in MASK_HEAD_NAMES:
            raise ValueError(
                f"{config_file} names head {head!r}, which is not registered. Registered heads: "
                f"{', '.join(list_heads())}. If it is a head of your own, import the module that registers it "
                "(@hf_vitseg.register_head) before loading, or load with trust_remote_code=True if the folder "
                "carries its source."
            )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" It holds {', '.join(pickled)}: hf-vitseg loads safetensors only (no pickle)." if pickled else ""
        raise FileNotFoundError(
            f"{folder} has no *.safetensors weights.{hint} Save with model.save_pretrained(folder)."
        )
    for path in weights:
        check_safetensors_file(path)


def load_config(name_or_path: str | os.PathLike, **kwargs):
    """The config of a saved model folder (checked by `check_model_folder` first) or Hub repo: a `ViTSegConfig`,
    or the config of a plain backbone checkpoint (the caller checks `model_type`)."""
    from transformers import AutoConfig

    if os.path.isdir(name_or_path):
        check_model_folder(name_or_path, vitseg=False)
    return AutoConfig.from_pretrained(name_or_path, **kwargs)


def load_model(name_or_path: str | os.PathLike, *, device: str | torch.device | None = None, **kwargs):
    """Load a saved hf-vitseg model (a local folder or a Hub repo id) in eval mode.

    Same as `AutoModelForSemanticSegmentation.from_pretrained(name_or_path, **kwargs)`, but a local folder
    is checked first (`check_model_folder`), so a truncated or corrupt weights file, a config that is not
    JSON or a config naming an unknown head gets an error naming the file and the value; a model of another
    type (a folder's config, or a Hub repo's once loaded) is refused (`check_vitseg_model_type`).

    With `trust_remote_code=True` the model runs the code saved with the checkpoint (its `auto_map`), even where
    `import hf_vitseg` has registered its own classes, which transformers would otherwise prefer: a Space that
    carries hf-vitseg (`hf-vitseg push --space`) still runs each model with the code it was pushed with.

    Args:
        name_or_path: a folder written by `save_pretrained`, or a Hub repo id.
        device: move the model there (default: stay on the CPU).
        kwargs: passed to `from_pretrained` (`revision`, `dtype`, `trust_remote_code`, ...).
    """
    import transformers
    from transformers import PretrainedConfig

    from ..modeling.head_base import MASK_HEAD_NAMES

    if os.path.isdir(name_or_path):
        check_model_folder(name_or_path)
    hub_kwargs = {key: kwargs[key] for key in ("revision", "token", "cache_dir") if key in kwargs}
    config = PretrainedConfig.get_config_dict(name_or_path, **hub_kwargs)[0]
    # a mask transformer (head eomt / pmt) is a ViTSegForUniversalSegmentation
    auto_class = ("AutoModelForUniversalSegmentation" if config.get("head") in MASK_HEAD_NAMES
                  else "AutoModelForSemanticSegmentation")
    if kwargs.get("trust_remote_code"):
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        check_vitseg_model_type(config.get("model_type"), name_or_path)
        reference = (config.get("auto_map") or {}).get(auto_class)
        if reference:
            model_class = get_class_from_dynamic_module(reference, name_or_path, **hub_kwargs)
            kwargs = {key: value for key, value in kwargs.items() if key != "trust_remote_code"}
            model = model_class.from_pretrained(name_or_path, **kwargs)
            return (model.to(device) if device is not None else model).eval()
    model = getattr(transformers, auto_class).from_pretrained(name_or_path, **kwargs)
    check_vitseg_model_type(getattr(model.config, "model_type", None), name_or_path)  # a Hub id: known only now
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_image_processor(name_or_path: str | os.PathLike, model=None):
    """The image processor for inference with the model saved at `name_or_path`: `ViTSegImageProcessor.for_model(
    model, folder=name_or_path, check_labels=False)`, i.e. the processor saved beside it, else one built for the
    model (its size divisor, `ignore_index` and the backbone's mean and std), with a warning. Its `ignore_index`
    is not checked: it labels padding in segmentation maps, which inference has none of.

    Args:
        name_or_path: the model's folder or Hub repo id.
        model: the loaded model; default `load_model(name_or_path)`.
    """
    from ..modeling import ViTSegImageProcessor

    if model is None:
        model = load_model(name_or_path)
    return ViTSegImageProcessor.for_model(model, folder=name_or_path, check_labels=False)
