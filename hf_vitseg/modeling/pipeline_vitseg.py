"""`ViTSegSegmentationPipeline`: transformers' image-segmentation pipeline, with the padding cut away exactly.

transformers' `ImageSegmentationPipeline` works with an hf-vitseg model as it is: it returns one mask per class
present (semantic models), or one per segment or instance (mask-classification models,
`ViTSegForUniversalSegmentation`, with `subtask="panoptic"`, `"instance"` or `"semantic"`), with its label. Two things
it cannot know about hf-vitseg, which this subclass adds:

- the image processor pads (or centre-crops) each image to a multiple of the model's size divisor, and the
  logits cover that padded canvas. The stock pipeline calls `post_process_semantic_segmentation(outputs,
  target_sizes)` without that geometry, so the predicted map would be stretched over the image by up to one
  patch. This pipeline asks the processor for `input_boxes` and passes them and the padded size back, so the map
  is exactly aligned with the image;
- hf-vitseg is not in transformers' list of segmentation models, so the stock pipeline logs "The model
  'ViTSegForSemanticSegmentation' is not supported for image-segmentation" although it is.

This file is self-contained (numpy, PIL, torch and transformers only, no relative imports):
`model.save_pretrained` (with remote code) copies it beside the model as `pipeline_vitseg.py` and names it in
`config.json`'s `custom_pipelines` (`add_to_saved_model`), and `hf-vitseg push` uploads it, so that
`pipeline("image-segmentation", model=folder_or_repo_id, trust_remote_code=True)` uses it, hf-vitseg installed
or not. `segmentation_pipeline(folder_or_repo)` builds it for any saved model without remote code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from transformers import ImageSegmentationPipeline, pipeline
from transformers.image_utils import load_image

# What `hf-vitseg push` writes into the uploaded config.json, with this file uploaded as `pipeline_vitseg.py`.
PIPELINE_FILENAME = "pipeline_vitseg.py"
CUSTOM_PIPELINES = {
    "image-segmentation": {
        "impl": "pipeline_vitseg.ViTSegSegmentationPipeline",
        "pt": ["AutoModelForSemanticSegmentation"],
        "type": "image",
    }
}
# The auto class transformers' pipeline() loads a model with, by the model class in config.json's `architectures`.
_AUTO_CLASSES = {"ViTSegForUniversalSegmentation": "AutoModelForUniversalSegmentation"}
SUBTASKS = ("panoptic", "instance", "semantic")


def custom_pipelines(config: dict) -> dict:
    """`config.json`'s `custom_pipelines` entry for a saved model's config (a dict): `CUSTOM_PIPELINES`, with the
    auto class that loads this model (`AutoModelForUniversalSegmentation` for `ViTSegForUniversalSegmentation`)."""
    architectures = config.get("architectures") or []
    auto_class = next((_AUTO_CLASSES[name] for name in architectures if name in _AUTO_CLASSES), None)
    if auto_class is None:
        return CUSTOM_PIPELINES
    entry = dict(CUSTOM_PIPELINES["image-segmentation"], pt=[auto_class])
    return {"image-segmentation": entry}


class ViTSegSegmentationPipeline(ImageSegmentationPipeline):
    """Segmentation with an hf-vitseg model: a list of `{"score", "label", "mask"}`, as transformers' pipeline.

    `mask` is an `L`-mode PIL image the size of the input, 255 where the segment is. Semantic models
    (`ViTSegForSemanticSegmentation`): one entry per class present, `score` `None` (no per-segment confidence);
    `subtask` may only be `None` or `"semantic"`. Mask-classification models (`ViTSegForUniversalSegmentation`):
    `subtask="panoptic"` (the default, as transformers' order), `"instance"` or `"semantic"`, through the image
    processor's `post_process_*_segmentation` with the exact geometry; panoptic and instance entries carry each
    segment's `score`, and `threshold` (default 0.9), `mask_threshold` (0.5), `overlap_mask_area_threshold` (0.5)
    and, for panoptic, `label_ids_to_fuse` pass through. Takes the same inputs as `ImageSegmentationPipeline` (PIL
    images, local paths, URLs, or lists of them); a model with other than 3 input channels also takes NumPy arrays
    (`(H, W)`, `(H, W, k)` or `(k, H, W)`), and reads PIL images and local files with their own bands, unconverted
    (multi-channel TIFFs: read them into an array first, e.g. with tifffile).
    """

    _load_video_processor = False  # the stock pipeline probes for one and prompts about remote code

    def _sanitize_parameters(self, **kwargs):
        label_ids_to_fuse = kwargs.pop("label_ids_to_fuse", None)
        preprocess_kwargs, forward_kwargs, postprocess_kwargs = super()._sanitize_parameters(**kwargs)
        if label_ids_to_fuse is not None:
            postprocess_kwargs["label_ids_to_fuse"] = label_ids_to_fuse
        return preprocess_kwargs, forward_kwargs, postprocess_kwargs

    def check_model_type(self, supported_models):
        if getattr(self.model.config, "model_type", None) == "vitseg":
            return
        super().check_model_type(supported_models)

    def preprocess(self, image, subtask=None, timeout=None):
        source = image
        channels = getattr(self.image_processor, "num_channels", 3)
        try:
            if channels != 3 and isinstance(image, str) and "://" not in image:
                with Image.open(image) as opened:  # its bands as they are: load_image converts to RGB
                    opened.load()
                    image = opened.copy()
            elif channels == 3 or not isinstance(image, (Image.Image, np.ndarray)):
                image = load_image(image, timeout=timeout)
        except Exception as error:  # PIL's UnidentifiedImageError, OSError for truncated files, ...
            name = source if isinstance(source, str) else type(source).__name__
            raise ValueError(f"Cannot decode image {name!r}: {error}") from error
        if isinstance(image, np.ndarray):  # a k-channel array, in the processor's layout rule
            height, width = self.image_processor.image_channels_first(image).shape[1:]
        else:
            height, width = image.height, image.width
        inputs = self.image_processor(images=[image], return_tensors="pt", return_input_sizes=True)
        input_sizes = inputs.pop("input_sizes")
        # A processor saved by an older hf-vitseg returns input_sizes only (padding, no centre-crop geometry).
        if "input_boxes" in inputs:
            geometry = {"input_boxes": inputs.pop("input_boxes")}
        else:
            geometry = {"input_sizes": input_sizes}
        inputs = inputs.to(self.dtype)
        inputs["target_size"] = [(height, width)]
        inputs["geometry"] = geometry
        return inputs

    def _forward(self, model_inputs):
        target_size = model_inputs.pop("target_size")
        geometry = model_inputs.pop("geometry")
        padded_size = tuple(model_inputs["pixel_values"].shape[-2:])
        model_outputs = self.model(**model_inputs)
        model_outputs["target_size"] = target_size
        model_outputs["geometry"] = geometry
        model_outputs["padded_size"] = padded_size
        return model_outputs

    def postprocess(self, model_outputs, subtask=None, threshold=0.9, mask_threshold=0.5,
                    overlap_mask_area_threshold=0.5, label_ids_to_fuse=None) -> list[dict[str, Any]]:
        geometry = {"target_sizes": model_outputs["target_size"], "padded_size": model_outputs["padded_size"],
                    **model_outputs["geometry"]}
        id2label = self.model.config.id2label
        mask_model = getattr(model_outputs, "class_queries_logits", None) is not None
        if subtask not in (None, *SUBTASKS):
            raise ValueError(f"subtask must be one of {SUBTASKS} or None, got {subtask!r}.")
        if not mask_model and subtask not in (None, "semantic"):
            raise ValueError(
                f"{type(self.model).__name__} does semantic segmentation only; got subtask={subtask!r}. Panoptic and "
                "instance segmentation need a mask-classification model (ViTSegForUniversalSegmentation, head eomt "
                "or pmt)."
            )
        if mask_model and subtask in (None, "panoptic", "instance"):
            thresholds = {"threshold": threshold, "mask_threshold": mask_threshold,
                          "overlap_mask_area_threshold": overlap_mask_area_threshold}
            if subtask == "instance":
                result = self.image_processor.post_process_instance_segmentation(model_outputs, **thresholds,
                                                                                 **geometry)[0]
            else:
                result = self.image_processor.post_process_panoptic_segmentation(
                    model_outputs, **thresholds, label_ids_to_fuse=label_ids_to_fuse, **geometry)[0]
            segmentation = result["segmentation"].cpu().numpy()
            return [
                {"score": segment["score"], "label": id2label[segment["label_id"]],
                 "mask": Image.fromarray(((segmentation == segment["id"]) * 255).astype(np.uint8), mode="L")}
                for segment in result["segments_info"]
            ]
        label_map = self.image_processor.post_process_semantic_segmentation(model_outputs, **geometry)[0].numpy()
        annotation = []
        for class_id in np.unique(label_map):
            mask = Image.fromarray(((label_map == class_id) * 255).astype(np.uint8), mode="L")
            annotation.append({"score": None, "label": id2label[int(class_id)], "mask": mask})
        return annotation


def add_to_saved_model(folder) -> None:
    """Copy this file into a saved model folder as `pipeline_vitseg.py` and name it in the folder's `config.json`
    (`custom_pipelines`), so that `pipeline("image-segmentation", model=folder, trust_remote_code=True)`, and the
    same on the Hub, runs `ViTSegSegmentationPipeline`: transformers' own pipeline class, given no geometry,
    would stretch the padded logits over the image."""
    folder = Path(folder)
    source = Path(__file__)
    if source.resolve() != (folder / PIPELINE_FILENAME).resolve():
        shutil.copyfile(source, folder / PIPELINE_FILENAME)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["custom_pipelines"] = custom_pipelines(config)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def segmentation_pipeline(model, **kwargs) -> ViTSegSegmentationPipeline:
    """`transformers.pipeline("image-segmentation", model=model, pipeline_class=ViTSegSegmentationPipeline)`.

    Args:
        model: a saved model folder, a Hub repo id, or a loaded `ViTSegForSemanticSegmentation` /
            `ViTSegForUniversalSegmentation` (then pass `image_processor=` too).
        kwargs: passed to `transformers.pipeline` (`device`, `image_processor`, `trust_remote_code`, ...).

    Example:
        >>> segmenter = segmentation_pipeline("path/to/saved_model")
        >>> [(segment["label"], segment["mask"].size) for segment in segmenter("image.png")]
        >>> segmenter("image.png", subtask="instance", threshold=0.5)  # a mask-classification model
    """
    return pipeline("image-segmentation", model=model, pipeline_class=ViTSegSegmentationPipeline, **kwargs)
