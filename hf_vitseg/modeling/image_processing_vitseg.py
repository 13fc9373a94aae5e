"""`ViTSegImageProcessor`: images and segmentation maps in, patch-aligned `pixel_values` and `labels` out (or, for
mask-classification models, `mask_labels` / `class_labels`), and the post-processing of both kinds of model.

This file is self-contained on purpose: it imports only numpy, PIL, torch, transformers and the standard
library, never `hf_vitseg`, and has no relative imports. `save_pretrained` copies it verbatim next to a
checkpoint (after `register_for_auto_class("AutoImageProcessor")`), and
`AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)` loads it on machines that have never
installed hf-vitseg. It builds on transformers' PIL backend, so torchvision is never needed.
"""

import math
import numbers
import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_outputs import (
    SemanticSegmentationPostProcessorOutput,
)
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import rgb_to_id
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
)
from transformers.processing_utils import ImagesKwargs, Unpack

# PIL modes whose pixels numpy reads directly as one or three channels; every other mode goes through
# `Image.convert("RGB")` (P, PA, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV).
_DIRECT_PIL_MODES = {"1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F", "RGB"}
_ALPHA_LUMINANCE_MODES = {"LA", "La"}
_VALID_CHANNELS = (1, 3, 4)  # what an RGB processor (num_channels=3) converts from
_CHANNELS = 3  # the default num_channels: RGB
# Float images must lie in [0, 1]; this much overshoot (resampling ringing) is tolerated, more is an error.
_FLOAT_RANGE_TOLERANCE = 0.1
# Generic `ImagesKwargs` this processor does not implement; each has a ViTSeg-specific replacement.
_UNSUPPORTED_GENERIC_KWARGS = {
    "do_center_crop": 'size_divisor_mode="crop"',
    "crop_size": 'size_divisor_mode="crop"',
    "do_pad": "padding, which always happens (to the batch's largest size, or to pad_to_size)",
    "pad_size": "pad_to_size",
}
_INPUT_TYPES = "PIL.Image.Image, numpy.ndarray or torch.Tensor"


class ViTSegImageProcessorKwargs(ImagesKwargs, total=False):
    """The ViTSeg-specific keyword arguments; see `ViTSegImageProcessor` for their meaning."""

    patch_size: int
    size_divisor_mode: str
    ignore_index: int
    do_reduce_labels: bool
    pad_to_size: dict[str, int] | None
    return_input_sizes: bool
    return_mask_labels: bool
    num_channels: int


class ViTSegImageProcessor(PilBackend):
    r"""
    Prepares images (and optionally segmentation maps) for a ViT-backbone segmentation model: converts any
    image to 3-channel RGB, optionally resizes, rescales and normalises, then makes height and width multiples
    of the backbone's patch size by padding (or centre-cropping), and pads a batch to one common size.

    Every argument below is stored as an attribute, saved in `preprocessor_config.json` and can be overridden
    per call (`processor(images, do_resize=True, size=...)`).

    Args:
        do_resize (`bool`, *optional*, defaults to `False`):
            Whether to resize images (and segmentation maps) to `size`.
        size (`dict[str, int]`, *optional*):
            Either `{"shortest_edge": n}` (shorter side becomes `n`, the longer side `int(n * long / short)`,
            aspect ratio kept) or `{"height": h, "width": w}` (exact size). A bare int is read as
            `{"shortest_edge": n}`. Required when `do_resize=True`.
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BILINEAR`):
            Filter for resizing images (each channel is resized in PIL's 32-bit float mode, so nothing is
            quantised). Segmentation maps are always resized with nearest-neighbour, so label values are kept.
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to multiply pixel values by `rescale_factor`. Every input is first brought onto the
            0..255 scale (see "Input conversion" below), so with the default factor `1 / 255` every input
            ends up in [0, 1] whatever its dtype.
        rescale_factor (`float`, *optional*, defaults to `1 / 255`):
            The factor used when `do_rescale=True`.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalise with `(x - image_mean) / image_std`, per channel.
        image_mean (`list[float]`, *optional*, defaults to the ImageNet mean `[0.485, 0.456, 0.406]`):
            Per-channel mean. Set it from the backbone the model was pretrained with (ImageNet statistics suit
            ViT, DeiT, DINOv2 and DINOv3; SAM and others use their own).
        image_std (`list[float]`, *optional*, defaults to the ImageNet std `[0.229, 0.224, 0.225]`):
            Per-channel standard deviation, set from the backbone like `image_mean`. Both hold `num_channels`
            values (or one for all channels). With `num_channels` other than 3 they default to the average of
            ImageNet's RGB values for every channel (0.449 and 0.226); set them from your data (`hf-vitseg train
            --image-stats auto` computes them from the training set).
        num_channels (`int`, *optional*, defaults to 3):
            Channels of every output image, the model's input channels (`ViTSegConfig.num_channels`). 3: RGB, with
            the conversions below. Any other count (1 for grayscale microscopy, 4 for RGB + near infrared, 13 for
            Sentinel-2): images must have exactly that many channels and are taken as they are, never converted
            (see "Input conversion").
        do_convert_rgb (`bool`, *optional*, defaults to `True`):
            Whether to convert every input to 3-channel RGB (grey replicated, alpha dropped, other PIL modes
            through `convert("RGB")`, see "Input conversion"). With `False` nothing is converted, so only RGB
            inputs (PIL mode `RGB`, 3-channel arrays) are accepted and anything else is a `ValueError`.
        patch_size (`int`, *optional*, defaults to 14):
            The backbone's patch size (14 for DINOv2, 16 for ViT / DeiT / DINOv3 / SAM). Output height and
            width are always multiples of it.
        size_divisor_mode (`str`, *optional*, defaults to `"pad"`):
            How an image becomes a multiple of `patch_size`: `"pad"` pads bottom and right up to the next
            multiple (images with 0 *after* normalisation, i.e. with the mean colour; labels with
            `ignore_index`, so padding never reaches the loss); `"crop"` centre-crops down to the previous
            multiple (images smaller than one patch are an error).
        ignore_index (`int`, *optional*, defaults to 255):
            Label value for pixels that carry no label: padding, and background under `do_reduce_labels`.
            Match the model config's `ignore_index`.
        do_reduce_labels (`bool`, *optional*, defaults to `False`):
            ADE20K convention, for datasets whose label 0 means "unlabelled": 0 becomes `ignore_index`,
            every other value `v` becomes `v - 1`, and `ignore_index` stays `ignore_index`.
        pad_to_size (`dict[str, int]`, *optional*):
            `{"height": h, "width": w}`: pad every image to this fixed size instead of to the batch's largest
            size (e.g. `{"height": 1024, "width": 1024}` for SAM's image encoder). Both must be multiples of
            `patch_size`; an image larger than it (after resizing) is an error.
        return_input_sizes (`bool`, *optional*, defaults to `False`):
            Whether to add the geometry of each image inside the padded batch to the output: `input_sizes`, a
            `(B, 2)` int64 array of each image's `(height, width)` after resizing / cropping and before padding,
            and `input_boxes`, a `(B, 4)` int64 array `(top, left, height, width)` saying where each image, as
            resized, lies in `pixel_values` (`(0, 0, h, w)` when padded; negative offsets when centre-cropped).
            Pop them before calling the model and pass them to `post_process_semantic_segmentation`, which then
            maps the logits back onto each original image exactly. Off by default so that `model(**inputs)`
            gets the model's inputs only.
        return_mask_labels (`bool`, *optional*, defaults to `False`):
            Whether segmentation maps become mask-classification targets, `mask_labels` and `class_labels` (for
            `ViTSegForUniversalSegmentation`; `for_model` sets it for such a model), instead of `labels`. See
            `preprocess` and `segmentation_map_to_targets`.

    Input conversion (images). Inputs are `PIL.Image.Image`, `numpy.ndarray` or `torch.Tensor`; a batch is a
    list of them or one 4-D array / tensor. With `num_channels=3` (the default) the result is always RGB:

    - Layout. 2-D arrays are `(H, W)` grayscale. 3-D arrays are `(H, W, C)` or `(C, H, W)` with `C` in
      {1, 3, 4}, whichever end holds a valid channel count; when both ends could (e.g. `(3, 8, 4)`), torch
      tensors are read as `(C, H, W)` and numpy arrays as `(H, W, C)`, unless `input_data_format` says
      otherwise. A 3-D array is always one image: pass a list or a 4-D array for a batch.
    - Channels. One channel (PIL `1`, `L`, `I`, `I;16`, `F`, or a 1-channel array) is replicated to RGB;
      alpha is dropped, not composited (PIL `RGBA`, `LA`, 4-channel arrays keep their first 3 channels);
      every other PIL mode (`P`, `PA`, `CMYK`, `YCbCr`, ...) goes through PIL's `convert("RGB")`. Any other
      channel count (2, 5, ...) raises a `ValueError` naming the shape.
    - Value range, by dtype, onto the 0..255 scale that `rescale_factor` expects: `bool` (PIL `1`) -> 0 or
      255; `uint8` as is; `uint16` (PIL `I;16`) x 255 / 65535; other integer dtypes (PIL `I` is int32, which
      is how PIL often opens 16-bit files) are read as 16-bit data, x 255 / 65535, and must lie in
      [0, 65535]; floating dtypes (PIL `F`) must already lie in [0, 1] (up to 0.1 of overshoot) and are
      x 255; a float image outside that is a `ValueError`, as it is almost always 0..255 data or an
      already-normalised tensor. NaN or infinite pixels are a `ValueError` (one would make every logit NaN).

    With `num_channels=k` other than 3, nothing is converted: a 2-D array (or a one-band PIL image: `L`, `I`,
    `I;16`, `F`) is one channel and fits `k=1`; a 3-D array is `(H, W, k)` or `(C, H, W)` with `k` channels,
    whichever end holds `k` (when both do, as in `(4, 8, 4)`, the same tie rule as above: torch tensors
    channels-first, numpy arrays channels-last, unless `input_data_format` says otherwise); a PIL image must have
    `k` bands. Any other channel count is a `ValueError` naming the shape and `num_channels`. The value range rule
    is the same (uint8, 16-bit and float images, per dtype), and so is the refusal of NaN and infinity.

    Segmentation maps: PIL (`L`, `P`, `I`, `I;16`, `1`) or 2-D integer arrays / tensors (a singleton channel
    axis is dropped; floats are accepted when every value is a whole number), one per image, each the same
    size as its image. A multi-channel (colour-coded) map is a `ValueError`: convert colours to class indices
    first. Maps come back as `labels`, `(B, H, W)` int64, resized with nearest-neighbour and padded with
    `ignore_index`.

    Example:

    ```python
    >>> processor = ViTSegImageProcessor(patch_size=14)
    >>> inputs = processor(images=[image_a, image_b], segmentation_maps=[mask_a, mask_b])
    >>> inputs["pixel_values"].shape  # (2, 3, H, W), H and W multiples of 14
    >>> inputs["labels"].shape        # (2, H, W), padding = 255
    >>> processor = ViTSegImageProcessor.for_model(model)  # patch size, ignore_index and statistics from the model
    ```

    The steps applied to each sample are public methods (`process_image`, `process_segmentation_map`,
    `resized_size`, `resize_sample`, `normalize_sample`, `crop_to_multiple`, `padded_size`, `pad_sample`), so that
    training augmentation runs exactly these and sees what inference sees.
    """

    valid_kwargs = ViTSegImageProcessorKwargs
    model_input_names = ["pixel_values"]

    do_resize = False
    size = None
    default_to_square = False  # a bare int `size` means the shortest edge, keeping the aspect ratio
    resample = PILImageResampling.BILINEAR
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    patch_size = 14
    size_divisor_mode = "pad"
    ignore_index = 255
    do_reduce_labels = False
    pad_to_size = None
    return_input_sizes = False
    return_mask_labels = False
    do_convert_rgb = True
    num_channels = _CHANNELS

    def __init__(self, **kwargs: Unpack[ViTSegImageProcessorKwargs]):
        channels = kwargs.get("num_channels")
        if channels is not None and channels != _CHANNELS:
            # ImageNet's RGB statistics do not describe other channels: their average per channel, unless given
            for name, rgb in (("image_mean", IMAGENET_DEFAULT_MEAN), ("image_std", IMAGENET_DEFAULT_STD)):
                if kwargs.get(name) is None and isinstance(channels, int) and channels > 0:
                    kwargs[name] = [round(float(np.mean(rgb)), 4)] * channels
        super().__init__(**kwargs)

    def preprocess(
        self,
        images,
        segmentation_maps=None,
        instance_id_to_semantic_id=None,
        **kwargs: Unpack[ViTSegImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Prepare one image or a batch (and, optionally, the matching segmentation maps).

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, or a list of them, or a 4-D array):
                The images; see the class docstring for the conversion rule.
            segmentation_maps (same kinds, *optional*):
                One integer map per image, each the size of its image: class ids, or instance ids with
                `instance_id_to_semantic_id`.
            instance_id_to_semantic_id (`dict[int, int]`, `int`, or a list of them, one per image, *optional*):
                Says the maps hold instance ids, and each instance's class: a dict `{instance id: class id}`, or one
                class id for every instance. Instance id 0 is background (in no mask) and `ignore_index` ignored,
                unless the dict names them; see `segmentation_map_to_targets`. For COCO panoptic PNGs,
                `panoptic_to_instance_map` gives the map and the dict.
            return_mask_labels (`bool`, *optional*, defaults to `False`):
                Return mask-classification targets (for `ViTSegForUniversalSegmentation`) instead of `labels`:
                `mask_labels`, a list of `(N_i, H, W)` float32 binary masks (one per class present in a semantic map,
                one per instance in an instance map; pixels of `ignore_index`, background and padding are 0 in every
                mask), and `class_labels`, a list of `(N_i,)` int64 classes. Masks are made after the resize
                (nearest-neighbour) and crop, at the size of `pixel_values`.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                `"pt"` for torch tensors, `"np"` or `None` for numpy arrays.
            kwargs:
                Any constructor argument, overriding the stored setting for this call.

        Returns:
            `BatchFeature` with `pixel_values` `(B, 3, H, W)` float32, `labels` `(B, H, W)` int64 when maps are
            given (each instance's class for instance maps), or `mask_labels` / `class_labels` with
            `return_mask_labels=True`, and `input_sizes` `(B, 2)` and `input_boxes` `(B, 4)` int64 when
            `return_input_sizes=True`.
        """
        kwargs.setdefault("return_tensors", "pt")
        if instance_id_to_semantic_id is not None and segmentation_maps is None:
            raise ValueError("instance_id_to_semantic_id describes segmentation_maps; pass the instance maps too.")
        return super().preprocess(images, segmentation_maps, instance_id_to_semantic_id, **kwargs)

    def _standardize_kwargs(self, **kwargs) -> dict:
        # Runs at construction and at every call, so bad settings fail early with a clear message.
        kwargs = super()._standardize_kwargs(**kwargs)
        for name, replacement in _UNSUPPORTED_GENERIC_KWARGS.items():
            if kwargs.get(name) is not None:
                raise ValueError(f"ViTSegImageProcessor does not use `{name}`; use {replacement} instead.")
        size = kwargs.get("size")
        if size is not None and set(dict(size)) not in ({"shortest_edge"}, {"height", "width"}):
            raise ValueError(f'`size` must be {{"shortest_edge": n}} or {{"height": h, "width": w}}, got {dict(size)}.')
        patch_size = kwargs.get("patch_size")
        if patch_size is not None and (not isinstance(patch_size, int) or patch_size < 1):
            raise ValueError(f"`patch_size` must be a positive int, got {patch_size!r}.")
        mode = kwargs.get("size_divisor_mode")
        if mode is not None and mode not in ("pad", "crop"):
            raise ValueError(f'`size_divisor_mode` must be "pad" or "crop", got {mode!r}.')
        pad_to_size = kwargs.get("pad_to_size")
        if pad_to_size is not None:
            if set(pad_to_size) != {"height", "width"}:
                raise ValueError(f'`pad_to_size` must be {{"height": h, "width": w}}, got {pad_to_size}.')
            if patch_size and (pad_to_size["height"] % patch_size or pad_to_size["width"] % patch_size):
                raise ValueError(
                    f"`pad_to_size` {pad_to_size} must be a multiple of `patch_size` ({patch_size}) in both sides."
                )
            kwargs["pad_to_size"] = dict(pad_to_size)
        channels = kwargs.get("num_channels")
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise ValueError(f"`num_channels` must be a positive int, got {channels!r}.")
        for name in ("image_mean", "image_std"):
            if kwargs.get(name) is not None:
                _check_channel_statistic(name, kwargs[name], channels or _CHANNELS)
        return kwargs

    # ----------------------------------------------------------------------------------------------
    # The processor for a model
    # ----------------------------------------------------------------------------------------------

    @classmethod
    def for_model(
        cls, model, folder: str | os.PathLike | None = None, check_labels: bool = True
    ) -> "ViTSegImageProcessor":
        r"""
        The image processor for `model`: the one saved in `folder`, else one built for the model; checked against
        the model either way (see `check_model`).

        The one answer to "which processor goes with this model", used by training, evaluation, `hf-vitseg
        predict` and `hf-vitseg push`.

        Args:
            model (`ViTSegForSemanticSegmentation`, or a PEFT model around one):
                Supplies `model.size_divisor` (what height and width must be multiples of) and
                `model.config.ignore_index`, and `model.config.backbone_name_or_path`, the pretrained backbone.
            folder (`str` or `os.PathLike`, *optional*):
                A saved model folder or Hub repo id. When it holds `preprocessor_config.json`, that processor is
                loaded; a local folder without one gets a warning, as predictions then depend on defaults rather
                than on the processor the model was trained with.
            check_labels (`bool`, *optional*, defaults to `True`):
                Also require the processor's `ignore_index` to be the model's. It only labels the padding of
                segmentation maps, so inference, which has none, passes `False`.

        A built processor pads to `model.size_divisor`, labels padding with the model's `ignore_index`, takes the
        model's `num_channels`, and normalises with the config's `image_mean` / `image_std` when set, else with
        those of the backbone's own image processor when `config.backbone_name_or_path` holds one (and they fit the
        channel count), else with the defaults (ImageNet's for RGB); for a mask-classification model
        (`ViTSegForUniversalSegmentation`) it returns `mask_labels` / `class_labels` (`return_mask_labels=True`).

        Raises:
            ValueError: the saved processor does not fit the model (patch size or `ignore_index`), or the folder's
                `preprocessor_config.json` holds another kind of processor.
        """
        processor = None
        if folder is not None:
            if os.path.isdir(folder):
                if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
                    processor = cls._load_saved(folder)
                else:
                    warnings.warn(
                        f"{folder} has no preprocessor_config.json; using a ViTSegImageProcessor built for the model "
                        f"(patch size {model.size_divisor}, the backbone's mean and std or ImageNet's). Save the "
                        "processor you trained with beside the model (processor.save_pretrained(folder)) to make "
                        "this exact."
                    )
            else:
                try:
                    processor = cls._load_saved(folder)
                except OSError:  # a Hub repo without a processor config, or out of reach: build one
                    processor = None
        if processor is None:
            config = model.config
            channels = int(getattr(config, "num_channels", _CHANNELS))
            kwargs = {"patch_size": int(model.size_divisor), "ignore_index": int(config.ignore_index),
                      "num_channels": channels}
            statistics = {name: getattr(config, name, None) for name in ("image_mean", "image_std")}
            if any(value is None for value in statistics.values()):
                statistics = _backbone_statistics(getattr(config, "backbone_name_or_path", None))
                if any(len(np.atleast_1d(value)) not in (1, channels) for value in statistics.values()):
                    statistics = {}  # an RGB backbone's statistics do not fit another channel count
            kwargs.update(statistics)
            if getattr(config, "is_mask_transformer", False):  # a mask-classification model's targets
                kwargs["return_mask_labels"] = True
            processor = cls(**kwargs)
        processor.check_model(model, check_labels=check_labels)
        return processor

    @classmethod
    def _load_saved(cls, folder) -> "ViTSegImageProcessor":
        settings, _ = cls.get_image_processor_dict(folder)
        kind = settings.get("image_processor_type")
        if kind not in (None, cls.__name__, f"{cls.__name__}Fast"):
            raise ValueError(
                f"{folder} holds a {kind} (preprocessor_config.json), not a {cls.__name__}; hf-vitseg models need "
                f"their own processor. Replace it: {cls.__name__}.for_model(model).save_pretrained(folder)."
            )
        return cls.from_pretrained(folder)

    def check_model(self, model, check_labels: bool = True) -> None:
        """Raise a `ValueError` saying what to change if this processor does not fit `model`: it must pad to a
        multiple of `model.size_divisor`, make `model.config.num_channels` channels and (with `check_labels`, for
        training and evaluation) label padding with `model.config.ignore_index`."""
        divisor = getattr(model, "size_divisor", None)
        if isinstance(divisor, int) and self.patch_size % divisor:
            raise ValueError(
                f"The image processor pads to multiples of {self.patch_size}, but the model needs multiples of "
                f"{divisor}: set processor.patch_size = {divisor} (or a multiple of it)."
            )
        channels = getattr(getattr(model, "config", None), "num_channels", self.num_channels)
        if isinstance(channels, int) and channels != self.num_channels:
            raise ValueError(
                f"The image processor makes {self.num_channels}-channel images, but the model takes {channels} "
                f"channel(s): set processor.num_channels = {channels} and give image_mean / image_std one value per "
                "channel (or build it with ViTSegImageProcessor.for_model(model))."
            )
        model_ignore = getattr(getattr(model, "config", None), "ignore_index", self.ignore_index)
        if check_labels and self.ignore_index != model_ignore:
            raise ValueError(
                f"The image processor pads labels with ignore_index={self.ignore_index}, but the model ignores "
                f"{model_ignore}: make them agree (processor.ignore_index = model.config.ignore_index)."
            )

    # ----------------------------------------------------------------------------------------------
    # The steps applied to one sample (public: training augmentation runs the same ones)
    # ----------------------------------------------------------------------------------------------

    def process_image(
        self, image, input_data_format=None, do_convert_rgb: bool | None = None, num_channels: int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """One raw image -> float32 `(num_channels, H, W)` on the 0..255 scale, by the rule in the class docstring.

        With `do_convert_rgb=False` (default: the processor's setting) only RGB inputs are accepted (3 channels).
        """
        return _to_uint8_scale(self.image_channels_first(image, input_data_format, do_convert_rgb, num_channels))

    def image_channels_first(
        self, image, input_data_format=None, do_convert_rgb: bool | None = None, num_channels: int | None = None
    ) -> np.ndarray:
        """One raw image -> `(num_channels, H, W)` in its own dtype: the layout and channel rule of the class
        docstring without the value scaling (`process_image` scales it). Overlays display from it."""
        convert = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        channels = self.num_channels if num_channels is None else num_channels
        if isinstance(image, Image.Image) and channels != _CHANNELS:
            array = np.array(image)  # its bands as they are, never converted
            return _channels_first(array, ChannelDimension.LAST, False, num_channels=channels)
        if isinstance(image, Image.Image):
            if not convert and image.mode != "RGB":
                raise ValueError(
                    f"do_convert_rgb=False: the image is a PIL image in mode {image.mode!r}, but the model takes RGB. "
                    "Pass do_convert_rgb=True (the default) to convert it, or convert it yourself "
                    "(image.convert('RGB'))."
                )
            array = _pil_image_to_array(image)
            layout = ChannelDimension.LAST
        else:
            array = _to_numpy(image, "image")
            layout = input_data_format
        return _channels_first(array, layout, prefer_first=isinstance(image, torch.Tensor), convert=convert,
                               num_channels=channels)

    def process_segmentation_map(self, segmentation_map) -> np.ndarray:
        """One raw segmentation map -> int64 `(H, W)`."""
        if isinstance(segmentation_map, Image.Image):
            if len(segmentation_map.getbands()) > 1:
                raise ValueError(
                    f"Segmentation maps must have one channel of class indices, got a PIL image in mode "
                    f"{segmentation_map.mode!r}. A colour-coded mask must be converted to class indices first "
                    "(map each colour to its class id), e.g. into a mode 'L', 'P' or 'I' image."
                )
            array = np.array(segmentation_map)
        else:
            array = _to_numpy(segmentation_map, "segmentation map")
        if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
            array = array.squeeze(0 if array.shape[0] == 1 else -1)
        if array.ndim != 2:
            hint = (
                " A colour-coded mask must be converted to class indices first (map each colour to its class id)."
                if array.ndim == 3
                else ""
            )
            raise ValueError(
                f"Segmentation maps must be 2-D (H, W) arrays of class indices, got shape {array.shape}.{hint}"
            )
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
                raise ValueError("Floating-point segmentation maps must hold whole numbers (class indices).")
        elif array.dtype.kind not in "biu":
            raise ValueError(f"Segmentation maps must hold integer class indices, got dtype {array.dtype}.")
        return array.astype(np.int64)

    def resized_size(self, input_hw: tuple[int, int], do_resize: bool | None = None, size=None) -> tuple[int, int]:
        """`(height, width)` an image of `input_hw` has after the resize step (`input_hw` itself without one)."""
        do_resize = self.do_resize if do_resize is None else do_resize
        if not do_resize:
            return tuple(int(side) for side in input_hw)
        return _resize_output_size(input_hw, self.size if size is None else size)

    def resize_sample(
        self,
        image: np.ndarray,
        seg_map: np.ndarray | None,
        out_hw: tuple[int, int],
        resample=None,
        window: tuple[int, int, int, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Resize a converted image `(3, H, W)` (float32, 0..255) and its map `(H, W)` to `out_hw`.

        The image is resized channel by channel in PIL's float mode "F" with `resample` (default: the processor's),
        so nothing is quantised; the map with nearest-neighbour (pixel centres, as PIL's NEAREST), so label values
        are kept. `window=(top, left, height, width)` computes only that window of the resized result, equal (to
        float rounding) to resizing everything and cropping, at the cost of the window alone: PIL resamples a
        source box with the filter scale of the whole resize.
        """
        resample = self.resample if resample is None else resample
        in_hw = tuple(image.shape[1:])
        out_hw = (int(out_hw[0]), int(out_hw[1]))
        top, left, height, width = window if window is not None else (0, 0, *out_hw)
        if in_hw == out_hw:
            rows, cols = slice(top, top + height), slice(left, left + width)
            return image[:, rows, cols], None if seg_map is None else seg_map[rows, cols]
        step_y, step_x = in_hw[0] / out_hw[0], in_hw[1] / out_hw[1]
        box = None
        if window is not None:
            box = (left * step_x, top * step_y, (left + width) * step_x, (top + height) * step_y)
        image = np.stack(
            [
                np.asarray(Image.fromarray(channel).resize((width, height), resample=resample, box=box))
                for channel in image
            ]
        )
        if seg_map is not None:
            rows = _nearest_indices(in_hw[0], out_hw[0])[top : top + height]
            cols = _nearest_indices(in_hw[1], out_hw[1])[left : left + width]
            seg_map = seg_map[rows[:, None], cols[None, :]]
        return image, seg_map

    def normalize_sample(
        self,
        image: np.ndarray,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean=None,
        image_std=None,
    ) -> np.ndarray:
        """Rescale (`x * rescale_factor`) and normalise (`(x - image_mean) / image_std`) a `(C, H, W)` image, as
        the processor's settings (or the arguments given) say; float32 out."""
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        if do_rescale:
            image = image * np.float32(self.rescale_factor if rescale_factor is None else rescale_factor)
        if do_normalize:
            channels = image.shape[0]
            mean = _check_channel_statistic("image_mean", self.image_mean if image_mean is None else image_mean,
                                            channels)
            std = _check_channel_statistic("image_std", self.image_std if image_std is None else image_std, channels)
            image = (image - mean.reshape(-1, 1, 1)) / std.reshape(-1, 1, 1)
        return image.astype(np.float32, copy=False)

    def crop_to_multiple(
        self,
        image: np.ndarray,
        seg_map: np.ndarray | None = None,
        patch_size: int | None = None,
        size_divisor_mode: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
        """With `size_divisor_mode="crop"`, centre-crop image `(C, H, W)` and map `(H, W)` down to multiples of
        `patch_size`; otherwise return them as they are. Also returns the `(top, left)` offset of the crop."""
        mode = self.size_divisor_mode if size_divisor_mode is None else size_divisor_mode
        if mode != "crop":
            return image, seg_map, (0, 0)
        patch_size = self.patch_size if patch_size is None else patch_size
        height, width = image.shape[1:]
        crop_h, crop_w = height // patch_size * patch_size, width // patch_size * patch_size
        if crop_h == 0 or crop_w == 0:
            raise ValueError(
                f'size_divisor_mode="crop" cannot crop an image of size {(height, width)} to a multiple of '
                f'patch_size {patch_size}; resize it up first or use size_divisor_mode="pad".'
            )
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        image = image[:, top : top + crop_h, left : left + crop_w]
        if seg_map is not None:
            seg_map = seg_map[top : top + crop_h, left : left + crop_w]
        return image, seg_map, (top, left)

    def padded_size(self, sizes, patch_size: int | None = None, pad_to_size=None) -> tuple[int, int]:
        """The `(height, width)` images of `sizes` (a list of `(height, width)`) are padded to together:
        `pad_to_size` when set (an error if an image is larger), else the largest size rounded up to `patch_size`."""
        patch_size = self.patch_size if patch_size is None else patch_size
        pad_to_size = self.pad_to_size if pad_to_size is None else pad_to_size
        sizes = [(int(h), int(w)) for h, w in sizes]
        if pad_to_size is not None:
            target_hw = (int(pad_to_size["height"]), int(pad_to_size["width"]))
            too_large = [hw for hw in sizes if hw[0] > target_hw[0] or hw[1] > target_hw[1]]
            if too_large:
                raise ValueError(
                    f"pad_to_size {target_hw} is smaller than image size(s) {too_large}; resize first "
                    "(do_resize=True with a suitable `size`) or raise pad_to_size."
                )
            return target_hw
        return tuple(int(math.ceil(max(sides) / patch_size) * patch_size) for sides in zip(*sizes))

    def pad_sample(
        self, image: np.ndarray, seg_map: np.ndarray | None, target_hw: tuple[int, int], ignore_index: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Pad image `(C, H, W)` with 0 (the mean colour after normalisation) and map `(H, W)` with `ignore_index`
        at the bottom and right up to `target_hw`."""
        ignore_index = self.ignore_index if ignore_index is None else ignore_index
        image = _pad_bottom_right(image, target_hw, 0.0)
        return image, None if seg_map is None else _pad_bottom_right(seg_map, target_hw, ignore_index)

    # ----------------------------------------------------------------------------------------------
    # The batch
    # ----------------------------------------------------------------------------------------------

    def _preprocess_image_like_inputs(self, images, segmentation_maps=None, instance_id_to_semantic_id=None,
                                      **kwargs) -> BatchFeature:
        images = [
            self.process_image(
                image, input_data_format=kwargs.get("input_data_format"), do_convert_rgb=kwargs.get("do_convert_rgb"),
                num_channels=kwargs.get("num_channels"),
            )
            for image in _as_batch(images, "images", batch_size=None)
        ]
        maps = None
        if segmentation_maps is not None:
            raw_maps = _as_batch(segmentation_maps, "segmentation_maps", batch_size=len(images))
            maps = [self.process_segmentation_map(seg_map) for seg_map in raw_maps]
            if len(maps) != len(images):
                raise ValueError(f"Got {len(images)} images but {len(maps)} segmentation maps; pass one map per image.")
            for index, (image, seg_map) in enumerate(zip(images, maps)):
                if image.shape[1:] != seg_map.shape:
                    raise ValueError(
                        f"Image {index} has size (H, W) = {tuple(image.shape[1:])} but its segmentation map has size "
                        f"{tuple(seg_map.shape)}; they must match."
                    )
        return self._preprocess(images, maps, instance_id_to_semantic_id=instance_id_to_semantic_id, **kwargs)

    def _preprocess(
        self,
        images: list[np.ndarray],
        segmentation_maps: list[np.ndarray] | None,
        do_resize: bool,
        size,
        resample,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        patch_size: int,
        size_divisor_mode: str,
        ignore_index: int,
        do_reduce_labels: bool,
        pad_to_size: dict[str, int] | None,
        return_input_sizes: bool,
        return_tensors=None,
        return_mask_labels: bool = False,
        instance_id_to_semantic_id=None,
        **kwargs,
    ) -> BatchFeature:
        maps = segmentation_maps if segmentation_maps is not None else [None] * len(images)
        map_fill, target_classes = ignore_index, None
        if segmentation_maps is not None and (return_mask_labels or instance_id_to_semantic_id is not None):
            # Targets travel as target maps (index of each pixel's target, IGNORED_TARGET in the padding)
            maps, target_classes = _targets_per_image(
                self, maps, instance_id_to_semantic_id, ignore_index, do_reduce_labels
            )
            map_fill, do_reduce_labels = IGNORED_TARGET, False
        processed_images, processed_maps, boxes = [], [], []
        for image, seg_map in zip(images, maps):
            if seg_map is not None and do_reduce_labels:
                seg_map = reduce_labels(seg_map, ignore_index)
            resized_hw = self.resized_size(image.shape[1:], do_resize, size)
            image, seg_map = self.resize_sample(image, seg_map, resized_hw, resample)
            image = self.normalize_sample(image, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            image, seg_map, (top, left) = self.crop_to_multiple(image, seg_map, patch_size, size_divisor_mode)
            boxes.append((-top, -left, *resized_hw))
            processed_images.append(image)
            processed_maps.append(seg_map)

        input_sizes = np.array([image.shape[1:] for image in processed_images], dtype=np.int64)
        target_hw = self.padded_size(input_sizes.tolist(), patch_size, pad_to_size)
        padded = [
            self.pad_sample(image, seg_map, target_hw, map_fill)
            for image, seg_map in zip(processed_images, processed_maps)
        ]
        data = {"pixel_values": np.stack([image for image, _ in padded])}
        if target_classes is not None and return_mask_labels:
            targets = [targets_to_masks(seg_map, classes) for (_, seg_map), classes in zip(padded, target_classes)]
            as_tensor = torch.from_numpy if return_tensors == "pt" else np.asarray
            data["mask_labels"] = [as_tensor(masks) for masks, _ in targets]
            data["class_labels"] = [as_tensor(classes) for _, classes in targets]
        elif target_classes is not None:
            data["labels"] = np.stack([targets_to_labels(seg_map, classes, ignore_index)
                                       for (_, seg_map), classes in zip(padded, target_classes)])
        elif segmentation_maps is not None:
            data["labels"] = np.stack([seg_map for _, seg_map in padded])
        if return_input_sizes:
            data["input_sizes"] = input_sizes
            data["input_boxes"] = np.array(boxes, dtype=np.int64)
        # mask_labels / class_labels stay lists: images have different numbers of targets
        return BatchFeature(data=data, tensor_type=return_tensors,
                            skip_tensor_conversion=["mask_labels", "class_labels"])

    # ----------------------------------------------------------------------------------------------
    # Post-processing
    # ----------------------------------------------------------------------------------------------

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes=None,
        input_sizes=None,
        padded_size=None,
        input_boxes=None,
        return_segmentation_scores: bool = False,
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        r"""
        Turn model logits into one label map per image, exactly aligned when the geometry is given.

        Args:
            outputs (`SemanticSegmenterOutput` or `torch.Tensor`):
                Model outputs; `outputs.logits` (or the tensor itself) is `(B, C, h, w)` at any resolution
                coarser or finer than the input, covering the whole padded `pixel_values`.
            target_sizes (`list[tuple[int, int]]` or `torch.Tensor` of shape `(B, 2)`, *optional*):
                `(height, width)` of each output map, usually each original image's size. Logits are resampled
                bilinearly (`align_corners=False` geometry), then the argmax is taken. When `None`, the argmax is
                taken at the logits' resolution.
            input_sizes (`list[tuple[int, int]]` or array / tensor `(B, 2)`, *optional*):
                Each image's `(height, width)` inside the padded batch (the processor's `input_sizes`, with
                `return_input_sizes=True`): the image is taken to start at the top-left corner, the rest is padding.
            padded_size (`tuple[int, int]`, *optional*):
                `(height, width)` of the padded `pixel_values` the model saw, `pixel_values.shape[-2:]`. Needed with
                `input_sizes` or `input_boxes`.
            input_boxes (array / tensor `(B, 4)`, *optional*):
                The processor's `input_boxes`: `(top, left, height, width)` of each image, as resized, in the padded
                `pixel_values`; it also describes centre-cropping (negative offsets), so prefer it to `input_sizes`.
                Parts of the image the model never saw (cropped away) take the nearest prediction.
            return_segmentation_scores (`bool`, *optional*, defaults to `False`):
                As in transformers: return, per image, a `SemanticSegmentationPostProcessorOutput` with
                `segmentation` (`(height, width)` class ids) and `segmentation_scores` (`(num_labels, height, width)`,
                the resampled logits) instead of the map alone.

        Without `input_sizes` / `input_boxes` nothing is assumed about how the model's input was made: the whole
        logits are resized to each target size. That is exact for inputs a user resized themselves (or that
        needed no padding) and off by up to the padding for padded ones, so pass the geometry for those; the
        processor returns it with `return_input_sizes=True`, and `ViTSegSegmentationPipeline` and `hf-vitseg
        predict` pass it.

        Returns:
            `list[torch.Tensor]`: `B` int64 maps of shape `(height, width)`, or, with `return_segmentation_scores`,
            `list[SemanticSegmentationPostProcessorOutput]`.

        Example:

        ```python
        >>> inputs = processor(images, return_input_sizes=True)
        >>> input_boxes, _ = inputs.pop("input_boxes"), inputs.pop("input_sizes")
        >>> outputs = model(**inputs)
        >>> maps = processor.post_process_semantic_segmentation(
        ...     outputs,
        ...     target_sizes=[image.size[::-1] for image in images],  # PIL sizes are (W, H)
        ...     input_boxes=input_boxes,
        ...     padded_size=inputs["pixel_values"].shape[-2:],
        ... )
        ```
        """
        if getattr(outputs, "class_queries_logits", None) is not None:  # a mask-classification model
            return self._post_process_mask_semantic(
                outputs, target_sizes, input_sizes, padded_size, input_boxes, return_segmentation_scores
            )
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        batch_size = logits.shape[0]
        target_sizes, input_boxes, padded_size = _output_geometry(
            batch_size, target_sizes, input_sizes, input_boxes, padded_size
        )

        results = []
        for index in range(batch_size):
            item_logits = logits[index : index + 1].float()  # (1, C, h, w)
            if not return_segmentation_scores:  # the label map alone: resample only the classes that can win
                results.append(_labels_of_resampled(item_logits, index, target_sizes, input_boxes, padded_size))
                continue
            scores = _to_output_geometry(item_logits, index, target_sizes, input_boxes, padded_size)[0]
            results.append(
                SemanticSegmentationPostProcessorOutput(
                    data={"segmentation": scores.argmax(dim=0), "segmentation_scores": scores}
                )
            )
        return results

    # ----------------------------------------------------------------------------------------------
    # Mask-classification models (ViTSegForUniversalSegmentation): targets and post-processing
    # ----------------------------------------------------------------------------------------------

    def segmentation_map_to_targets(
        self, segmentation_map: np.ndarray, instance_id_to_semantic_id=None, ignore_index: int | None = None,
        do_reduce_labels: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`segmentation_map_to_targets` with this processor's `ignore_index` and `do_reduce_labels` as defaults: a
        semantic or instance map `(H, W)` -> `(target_map, classes)`, the form in which targets are resized, cropped,
        flipped and padded (with `IGNORED_TARGET`) before `targets_to_masks` makes `mask_labels` / `class_labels`."""
        return segmentation_map_to_targets(
            segmentation_map,
            instance_id_to_semantic_id,
            self.ignore_index if ignore_index is None else ignore_index,
            self.do_reduce_labels if do_reduce_labels is None else do_reduce_labels,
        )

    def _post_process_mask_semantic(self, outputs, target_sizes, input_sizes, padded_size, input_boxes,
                                    return_segmentation_scores):
        class_logits, mask_logits = _mask_outputs(outputs, "post_process_semantic_segmentation")
        batch_size = class_logits.shape[0]
        target_sizes, input_boxes, padded_size = _output_geometry(
            batch_size, target_sizes, input_sizes, input_boxes, padded_size
        )
        class_probs = class_logits.float().softmax(dim=-1)[..., :-1]  # (B, Q, K): the last column is "no object"
        num_queries = class_logits.shape[1]
        results = []
        for index in range(batch_size):
            # Queries in chunks, so that large outputs never hold every query's full-size mask at once (one chunk,
            # i.e. transformers' single einsum, up to _MASK_ELEMENTS_AT_ONCE values)
            out_hw = target_sizes[index] if target_sizes is not None else mask_logits.shape[-2:]
            chunk = max(1, _MASK_ELEMENTS_AT_ONCE // max(1, int(out_hw[0]) * int(out_hw[1])))
            scores = None
            for start in range(0, num_queries, chunk):
                masks = _to_output_geometry(mask_logits[index : index + 1, start : start + chunk].float(), index,
                                            target_sizes, input_boxes, padded_size)[0]  # (chunk, H, W)
                part = torch.einsum("qc,qhw->chw", class_probs[index, start : start + chunk], masks.sigmoid())
                scores = part if scores is None else scores.add_(part)
            segmentation = scores.argmax(dim=0)
            if return_segmentation_scores:
                results.append(SemanticSegmentationPostProcessorOutput(
                    data={"segmentation": segmentation, "segmentation_scores": scores}))
            else:
                results.append(segmentation)
        return results

    def post_process_instance_segmentation(
        self,
        outputs,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes=None,
        return_binary_maps: bool = False,
        input_sizes=None,
        padded_size=None,
        input_boxes=None,
    ) -> list[dict]:
        r"""
        Instance segmentation from a mask-classification model (`ViTSegForUniversalSegmentation`), by transformers'
        Mask2Former algorithm and in its output format: the `num_queries` best (query, class) pairs, each scored by
        its class probability times its mean mask probability inside the mask; those scoring at least `threshold`
        and with a non-empty mask are the instances, painted in that order (a later one wins an overlap).

        Args:
            outputs: the model's outputs (`class_queries_logits` `(B, Q, K + 1)`, `masks_queries_logits`
                `(B, Q, h, w)`, mask logits over the padded `pixel_values`).
            threshold (`float`, defaults to 0.5): the least score an instance keeps.
            mask_threshold (`float`, defaults to 0.5): a pixel is in a mask when its mask probability exceeds this
                (transformers' Mask2Former ignores the argument and always uses 0.5, the default here).
            overlap_mask_area_threshold (`float`, defaults to 0.8): accepted for transformers' signature; the
                instance algorithm does not use it (as in transformers).
            target_sizes, input_sizes, padded_size, input_boxes: the output geometry, as for
                `post_process_semantic_segmentation`: mask logits are resampled bilinearly onto each image (through
                its box in the padded input when the geometry is given, so padding is cut exactly) before
                thresholding.
            return_binary_maps (`bool`, defaults to `False`): return the instances' binary masks `(N, H, W)` instead
                of the id map (when there is at least one instance, as transformers).

        Returns:
            `list[dict]`, one per image: `segmentation`, `(H, W)` float32 instance ids with -1 for no instance (or
            `(N, H, W)` binary maps); `segments_info`, a list of `{"id", "label_id", "was_fused": False, "score"}`.
        """
        class_logits, mask_logits = _mask_outputs(outputs, "post_process_instance_segmentation", threshold=threshold,
                                                  mask_threshold=mask_threshold,
                                                  overlap_mask_area_threshold=overlap_mask_area_threshold)
        batch_size, num_queries, num_columns = class_logits.shape
        num_classes = num_columns - 1
        target_sizes, input_boxes, padded_size = _output_geometry(
            batch_size, target_sizes, input_sizes, input_boxes, padded_size
        )
        mask_cut = math.log(mask_threshold / (1 - mask_threshold)) if 0 < mask_threshold < 1 else None
        results = []
        for index in range(batch_size):
            masks = _to_output_geometry(mask_logits[index : index + 1].float(), index, target_sizes, input_boxes,
                                        padded_size)[0]  # (Q, H, W)
            scores = class_logits[index].float().softmax(dim=-1)[:, :-1]
            labels = torch.arange(num_classes, device=scores.device).unsqueeze(0).repeat(num_queries, 1).flatten(0, 1)
            scores_per_image, topk_indices = scores.flatten(0, 1).topk(num_queries, sorted=False)
            pred_classes = labels[topk_indices]
            mask_pred = masks[torch.div(topk_indices, num_classes, rounding_mode="floor")]
            if mask_cut is None:
                pred_masks = (mask_pred.sigmoid() > mask_threshold).float()
            else:
                pred_masks = (mask_pred > mask_cut).float()
            mask_scores = (mask_pred.sigmoid().flatten(1) * pred_masks.flatten(1)).sum(1) / (
                pred_masks.flatten(1).sum(1) + 1e-6
            )
            pred_scores = scores_per_image * mask_scores
            segmentation = torch.zeros(masks.shape[1:], device=masks.device) - 1
            instance_maps, segments = [], []
            for query in range(num_queries):
                score = pred_scores[query].item()
                if score >= threshold and bool(pred_masks[query].any()):
                    segmentation[pred_masks[query] == 1] = len(segments)
                    segments.append({"id": len(segments), "label_id": pred_classes[query].item(),
                                     "was_fused": False, "score": round(score, 6)})
                    instance_maps.append(pred_masks[query])
            if return_binary_maps and instance_maps:
                segmentation = torch.stack(instance_maps, dim=0)
            results.append({"segmentation": segmentation, "segments_info": segments})
        return results

    def post_process_panoptic_segmentation(
        self,
        outputs,
        threshold: float = 0.8,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: set[int] | None = None,
        target_sizes=None,
        input_sizes=None,
        padded_size=None,
        input_boxes=None,
    ) -> list[dict]:
        r"""
        Panoptic segmentation from a mask-classification model (`ViTSegForUniversalSegmentation`), by transformers'
        Mask2Former algorithm and in its output format: queries whose best class is a real class (not "no
        object") with a probability above `threshold` compete for pixels (each pixel goes to the query with the
        highest score-weighted mask probability); a query keeps a segment when it wins pixels and they are more than
        `overlap_mask_area_threshold` of its own mask. Segments of a class in `label_ids_to_fuse` ("stuff") merge into
        one.

        Args:
            outputs: the model's outputs (`class_queries_logits`, `masks_queries_logits`).
            threshold (`float`, defaults to 0.8): the least class probability a query needs.
            mask_threshold (`float`, defaults to 0.5): binarises the score-weighted mask probabilities when measuring
                a query's own mask (as transformers).
            overlap_mask_area_threshold (`float`, defaults to 0.8): see above; removes small, disconnected remnants.
            label_ids_to_fuse (`set[int]`, *optional*): classes whose instances are fused into one segment.
            target_sizes, input_sizes, padded_size, input_boxes: the output geometry, as for
                `post_process_semantic_segmentation` (mask logits resampled onto each image, padding cut exactly).

        Returns:
            `list[dict]`, one per image: `segmentation`, `(H, W)` int32 segment ids from 1, with 0 for pixels of no
            segment (-1 everywhere when the image has no segment at all, as transformers); `segments_info`, a list of
            `{"id", "label_id", "was_fused", "score"}`. Given a semantic model's outputs (`logits`), each class present
            is one segment (`was_fused` True, `score` None), so that transformers' pipeline, which asks for panoptic
            segmentation first, still returns one mask per class for semantic models.
        """
        if getattr(outputs, "class_queries_logits", None) is None and (
            isinstance(outputs, torch.Tensor) or getattr(outputs, "logits", None) is not None
        ):
            # A semantic model's label map is a panoptic map of "stuff" only (transformers' pipeline asks a
            # processor for panoptic first, whatever the model): one fused segment per class present, no score.
            label_maps = self.post_process_semantic_segmentation(outputs, target_sizes, input_sizes, padded_size,
                                                                 input_boxes)
            return [_stuff_segments(label_map) for label_map in label_maps]
        class_logits, mask_logits = _mask_outputs(outputs, "post_process_panoptic_segmentation", threshold=threshold,
                                                  mask_threshold=mask_threshold,
                                                  overlap_mask_area_threshold=overlap_mask_area_threshold)
        batch_size, _, num_columns = class_logits.shape
        num_labels = num_columns - 1
        label_ids_to_fuse = set() if label_ids_to_fuse is None else set(label_ids_to_fuse)
        target_sizes, input_boxes, padded_size = _output_geometry(
            batch_size, target_sizes, input_sizes, input_boxes, padded_size
        )
        pred_scores, pred_labels = class_logits.float().softmax(dim=-1).max(-1)  # (B, Q)
        results = []
        for index in range(batch_size):
            keep = pred_labels[index].ne(num_labels) & (pred_scores[index] > threshold)
            queries = keep.nonzero()[:, 0] if bool(keep.any()) else torch.zeros(1, dtype=torch.long, device=keep.device)
            masks = _to_output_geometry(mask_logits[index : index + 1, queries].float(), index, target_sizes,
                                        input_boxes, padded_size)[0]  # (kept, H, W)
            if not bool(keep.any()):
                nothing = torch.full(masks.shape[1:], -1, dtype=torch.int32)
                results.append({"segmentation": nothing, "segments_info": []})
                continue
            segmentation, segments = _panoptic_segments(
                masks.sigmoid(), pred_scores[index][keep], pred_labels[index][keep], mask_threshold,
                overlap_mask_area_threshold, label_ids_to_fuse,
            )
            results.append({"segmentation": segmentation, "segments_info": segments})
        return results


def reduce_labels(segmentation_map: np.ndarray, ignore_index: int) -> np.ndarray:
    """ADE20K convention: 0 -> `ignore_index`, `v` -> `v - 1`, `ignore_index` stays `ignore_index`."""
    reduced = segmentation_map - 1
    reduced[(segmentation_map == 0) | (segmentation_map == ignore_index)] = ignore_index
    return reduced


# --------------------------------------------------------------------------------------------------
# Mask-classification targets (ViTSegForUniversalSegmentation): one binary mask and one class per target
# --------------------------------------------------------------------------------------------------

# The most mask values (queries x height x width) the semantic post-processing of a mask model resamples at once.
_MASK_ELEMENTS_AT_ONCE = 2**25

# What a target map holds where a pixel belongs to no target: background (no mask; for metrics, counted as
# background), or void (no mask; for metrics, ignored: ignore_index, ignored instances, crowd regions, padding).
NO_TARGET = -1
IGNORED_TARGET = -2


def segmentation_map_to_targets(
    segmentation_map: np.ndarray,
    instance_id_to_semantic_id=None,
    ignore_index: int | None = 255,
    do_reduce_labels: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    r"""
    A semantic or instance map -> a target map and the class of each target (mask-classification targets).

    Args:
        segmentation_map (`np.ndarray`): `(H, W)` integers.
        instance_id_to_semantic_id (`dict[int, int]`, `int` or `None`):
            `None`: the map holds class ids (a semantic map), and each class present is one target, as
            transformers' Mask2Former / EoMT processors do. A dict (keys may be strings, as after JSON): the map holds
            instance ids, each id is one target of the class the dict gives it. An int `k`: the map holds instance
            ids, and every instance is of class `k`. With instance maps, an id the dict does not name is background
            when it is 0, ignored when it is `ignore_index`, and an error otherwise; an instance whose class is
            `ignore_index` is ignored (COCO's crowd regions, say).
        ignore_index (`int`, *optional*): the class of pixels to ignore (semantic maps), and the instance id of such
            pixels (instance maps).
        do_reduce_labels (`bool`): ADE20K's convention, as `reduce_labels`: class 0 means "unlabelled" and is
            ignored, every other class `c` becomes `c - 1` (for instance maps, the classes the mapping gives; instance
            id 0 is then ignored even if the dict names it).

    Returns:
        `(target_map, classes)`: `target_map` `(H, W)` int64 holds, per pixel, the index of its target in
        `classes`, `NO_TARGET` (-1) for background (instance maps' unnamed id 0) or `IGNORED_TARGET` (-2) for pixels
        to ignore; none of these is in any mask, but metrics count background and skip ignored pixels. `classes`
        `(N,)` int64, ordered by class id (semantic maps) or instance id (instance maps), as transformers orders them.

    Raises:
        `ValueError`: a negative class, an instance id the dict does not name, or an int mapping with instance ids
        above `ignore_index` while `ignore_index` is present (it may be an instance: name it in a dict).
    """
    segmentation_map = np.asarray(segmentation_map)
    ids, inverse = np.unique(segmentation_map, return_inverse=True)
    inverse = inverse.reshape(segmentation_map.shape)
    if instance_id_to_semantic_id is None:  # a semantic map: one target per class
        classes = reduce_labels(ids, ignore_index) if do_reduce_labels else ids.copy()
        ignored = classes == ignore_index if ignore_index is not None else np.zeros(ids.shape, dtype=bool)
        negative = ids[(classes < 0) & ~ignored]
        classes[ignored] = IGNORED_TARGET
        if negative.size:
            raise ValueError(
                f"The segmentation map holds negative class ids {negative.tolist()}; class ids are 0..num_labels-1, "
                f"and pixels to ignore hold ignore_index={ignore_index}."
            )
    else:
        classes = np.array([_instance_class(int(i), instance_id_to_semantic_id, ignore_index, do_reduce_labels, ids)
                            for i in ids], dtype=np.int64).reshape(ids.shape)
    keep = classes >= 0
    index_of = np.where(keep, np.cumsum(keep) - 1, classes)  # a target's index, or what stands in for none
    return index_of[inverse].astype(np.int64), classes[keep].astype(np.int64)


def _instance_class(instance_id: int, mapping, ignore_index, reduce: bool, all_ids: np.ndarray) -> int:
    """The class of one instance id, `NO_TARGET` or `IGNORED_TARGET` (see `segmentation_map_to_targets`)."""
    if reduce and instance_id == 0:
        return IGNORED_TARGET
    if isinstance(mapping, (int, np.integer)) and not isinstance(mapping, bool):
        if instance_id == 0:
            return NO_TARGET
        if ignore_index is not None and instance_id == ignore_index:
            if int(all_ids.max()) > ignore_index:
                raise ValueError(
                    f"The instance map holds ids above ignore_index={ignore_index} (up to {int(all_ids.max())}), so "
                    f"id {ignore_index} is probably an instance, not a region to ignore. Pass "
                    "instance_id_to_semantic_id as a dict that names every id (e.g. {i: class_id for i in ids if i}), "
                    "or use an ignore_index that no instance uses."
                )
            return IGNORED_TARGET
        class_id = int(mapping)
    elif isinstance(mapping, dict):
        class_id = mapping.get(instance_id, mapping.get(str(instance_id)))
        if class_id is None:
            if instance_id == 0:
                return NO_TARGET
            if instance_id == ignore_index:
                return IGNORED_TARGET
            named = sorted(int(key) for key in mapping)
            raise ValueError(
                f"Instance id {instance_id} is in the instance map but not in instance_id_to_semantic_id (which names "
                f"ids {named[:10]}{' ...' if len(named) > 10 else ''}); give every instance its class (0 is background "
                f"and {ignore_index} ignored unless named)."
            )
        if isinstance(class_id, bool) or not isinstance(class_id, (int, np.integer, float, np.floating)) or (
                not float(class_id).is_integer()):  # NaN and inf included
            raise ValueError(f"instance_id_to_semantic_id gives instance {instance_id} the class {class_id!r}; "
                             "classes are whole numbers 0..num_labels-1.")
        class_id = int(class_id)
    else:
        raise TypeError(
            "instance_id_to_semantic_id must be a dict {instance id: class id}, an int (the class of every "
            f"instance), or a list of those (one per image); got {type(mapping).__name__}."
        )
    if class_id == ignore_index or (reduce and class_id == 0):
        return IGNORED_TARGET
    class_id = class_id - 1 if reduce else class_id
    if class_id < 0:
        raise ValueError(f"Instance {instance_id} has the negative class {class_id}; classes are 0..num_labels-1.")
    return class_id


def targets_to_masks(target_map: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A target map (see `segmentation_map_to_targets`) -> `mask_labels` `(N, H, W)` float32 in {0, 1} and
    `class_labels` `(N,)` int64. Targets with no pixel left (cropped away, or too small for a downscale) are
    dropped; pixels of no target (background, ignored, padding) are 0 in every mask."""
    target_map = np.asarray(target_map)
    classes = np.asarray(classes, dtype=np.int64)
    kept = np.unique(target_map[target_map >= 0])
    masks = target_map[None] == kept[:, None, None]
    return masks.astype(np.float32), classes[kept]


def targets_to_labels(target_map: np.ndarray, classes: np.ndarray, ignore_index: int) -> np.ndarray:
    """A target map -> a semantic label map: each pixel its target's class, `ignore_index` where there is none
    (background and ignored pixels alike)."""
    classes = np.asarray(classes, dtype=np.int64)
    return np.where(target_map >= 0, classes[np.clip(target_map, 0, None)] if len(classes) else 0, ignore_index)


def panoptic_to_instance_map(
    panoptic_map,
    segments_info,
    category_id_to_label: dict | None = None,
    ignore_index: int = 255,
) -> tuple[np.ndarray, dict[int, int]]:
    r"""
    A COCO-style panoptic annotation -> an instance map and its `instance_id_to_semantic_id`, for
    `ViTSegImageProcessor(images, segmentation_maps=instance_map, instance_id_to_semantic_id=mapping,
    return_mask_labels=True)`.

    Args:
        panoptic_map (`PIL.Image.Image` or `np.ndarray`): the panoptic PNG, RGB, segment id `R + 256 G + 256^2 B`
            per pixel (COCO's encoding; 0 = unlabelled), or an already decoded `(H, W)` id map.
        segments_info (`list[dict]`): the annotation's segments, each with `id` and `category_id`, and optionally
            `iscrowd` (COCO's `annotations[i]["segments_info"]`).
        category_id_to_label (`dict[int, int]`, *optional*): maps COCO category ids (not contiguous) to the model's
            class ids `0..num_labels-1`; a category it leaves out is ignored. Default: category ids are class ids.
        ignore_index (`int`): the class that crowd regions and left-out categories get, so that they are in no mask.

    Returns:
        `(instance_map, instance_id_to_semantic_id)`: `(H, W)` int64 segment ids, and each segment's class
        (`ignore_index` for crowd regions, and for the unlabelled id 0: COCO's void, in no mask and ignored).

    Raises:
        `ValueError`: a segment id in the map that `segments_info` does not describe, or a map that is not RGB / 2-D.
    """
    array = np.asarray(panoptic_map)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = rgb_to_id(np.ascontiguousarray(array[..., :3]).astype(np.int64))
    elif array.ndim != 2:
        raise ValueError(
            f"A panoptic map must be an RGB image (segment id = R + 256 G + 256^2 B) or a 2-D id map; got shape "
            f"{array.shape}."
        )
    instance_map = array.astype(np.int64)
    mapping = {}
    for segment in segments_info:
        category = int(segment["category_id"])
        if category_id_to_label is not None:
            category = category_id_to_label.get(category, category_id_to_label.get(str(category), ignore_index))
        mapping[int(segment["id"])] = ignore_index if segment.get("iscrowd", 0) else int(category)
    mapping.setdefault(0, ignore_index)  # COCO's unlabelled pixels are void: ignored, not background
    unknown = sorted(set(np.unique(instance_map).tolist()) - set(mapping))
    if unknown:
        raise ValueError(
            f"The panoptic map holds segment ids {unknown[:10]} that segments_info does not describe; pass the "
            "segments_info of this very image (COCO: the annotation whose file_name is this PNG)."
        )
    return instance_map, mapping


# --------------------------------------------------------------------------------------------------
# Mask-classification post-processing (transformers' Mask2Former algorithms, on the exact output geometry)
# --------------------------------------------------------------------------------------------------


def _mask_outputs(outputs, what: str, **thresholds) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs' `(class_queries_logits, masks_queries_logits)`, checked (shapes, finite values), and the
    `thresholds` (finite numbers: NaN would silently keep no segment)."""
    for name, value in thresholds.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{what}: {name} must be a finite number, got {value!r}.")
    class_logits = getattr(outputs, "class_queries_logits", None)
    mask_logits = getattr(outputs, "masks_queries_logits", None)
    if class_logits is None or mask_logits is None:
        raise ValueError(
            f"{what} needs the outputs of a mask-classification model (class_queries_logits and masks_queries_logits, "
            "e.g. ViTSegForUniversalSegmentation with head 'eomt' or 'pmt'); a semantic model's per-pixel logits only "
            "give post_process_semantic_segmentation."
        )
    if class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            f"class_queries_logits {tuple(class_logits.shape)} and masks_queries_logits {tuple(mask_logits.shape)} "
            "disagree on the batch size or the number of queries."
        )
    for name, logits in (("class_queries_logits", class_logits), ("masks_queries_logits", mask_logits)):
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(f"{what}: the model's {name} hold NaN or infinite values (a diverged model, or inputs "
                             "out of range); there is nothing to segment from.")
    return class_logits, mask_logits


def _stuff_segments(label_map: torch.Tensor) -> dict:
    """A semantic label map as a panoptic result: segment `i + 1` is the `i`-th class present."""
    classes, inverse = torch.unique(label_map, return_inverse=True)
    segments = [{"id": index + 1, "label_id": int(class_id), "was_fused": True, "score": None}
                for index, class_id in enumerate(classes.tolist())]
    return {"segmentation": (inverse + 1).to(torch.int32), "segments_info": segments}


def _segment_validity(mask_labels, mask_probs, k, mask_threshold, overlap_mask_area_threshold):
    """transformers' Mask2Former `check_segment_validity`: query `k` owns a segment when it wins pixels and the
    pixels it wins are more than `overlap_mask_area_threshold` of its own (score-weighted) mask."""
    mask_k = mask_labels == k
    mask_k_area = mask_k.sum()
    original_area = (mask_probs[k] >= mask_threshold).sum()
    exists = bool(mask_k_area > 0 and original_area > 0)
    if exists and not (mask_k_area / original_area).item() > overlap_mask_area_threshold:
        exists = False
    return exists, mask_k


def _panoptic_segments(mask_probs, pred_scores, pred_labels, mask_threshold, overlap_mask_area_threshold,
                       label_ids_to_fuse):
    """transformers' Mask2Former `compute_segments` on probabilities already at the output geometry."""
    segmentation = torch.zeros(mask_probs.shape[1:], dtype=torch.int32, device=mask_probs.device)
    segments = []
    mask_probs = mask_probs * pred_scores.view(-1, 1, 1)
    mask_labels = mask_probs.argmax(0)
    current_segment_id = 0
    stuff_memory: dict[int, int] = {}
    for k in range(pred_labels.shape[0]):
        pred_class = pred_labels[k].item()
        should_fuse = pred_class in label_ids_to_fuse
        exists, mask_k = _segment_validity(mask_labels, mask_probs, k, mask_threshold, overlap_mask_area_threshold)
        if not exists:
            continue
        if pred_class in stuff_memory:
            current_segment_id = stuff_memory[pred_class]
        else:
            current_segment_id += 1
        segmentation[mask_k] = current_segment_id
        segments.append({"id": current_segment_id, "label_id": pred_class, "was_fused": should_fuse,
                         "score": round(pred_scores[k].item(), 6)})
        if should_fuse:
            stuff_memory[pred_class] = current_segment_id
    return segmentation, segments


def _targets_per_image(processor, maps, instance_id_to_semantic_id, ignore_index, do_reduce_labels):
    """`segmentation_map_to_targets` for every map of a batch: `(target maps, classes per map)`."""
    mappings = instance_id_to_semantic_id
    if not isinstance(mappings, (list, tuple)):
        mappings = [mappings] * len(maps)
    elif len(mappings) != len(maps):
        raise ValueError(
            f"Got {len(mappings)} instance_id_to_semantic_id entries for {len(maps)} segmentation maps; pass one per "
            "map, or one dict / int for all."
        )
    converted = [
        processor.segmentation_map_to_targets(seg_map, mapping, ignore_index, do_reduce_labels)
        for seg_map, mapping in zip(maps, mappings)
    ]
    return [target_map for target_map, _ in converted], [classes for _, classes in converted]


# --------------------------------------------------------------------------------------------------
# Helpers (module level, so the file stays importable on its own)
# --------------------------------------------------------------------------------------------------


def _as_batch(inputs, name: str, batch_size: int | None) -> list:
    """Split `inputs` into a list of single items.

    A list / tuple is a batch; a 4-D array is a batch along axis 0; for segmentation maps (`batch_size` known) a
    3-D array whose first axis equals a batch size above one is a stack of 2-D maps. Anything else is one item.
    """
    if isinstance(inputs, (list, tuple)):
        if len(inputs) == 0:
            raise ValueError(f"`{name}` is an empty list.")
        return list(inputs)
    if isinstance(inputs, Image.Image):
        return [inputs]
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        if inputs.ndim == 4:
            return list(inputs)
        if batch_size is not None and batch_size > 1 and inputs.ndim == 3 and inputs.shape[0] == batch_size:
            return list(inputs)
        return [inputs]
    raise TypeError(f"`{name}` must be a {_INPUT_TYPES}, or a list of them; got {type(inputs).__name__}.")


def _to_numpy(value, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        # numpy has no bfloat16; widen low-precision floats losslessly.
        return (value.float() if value.is_floating_point() else value).numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"Each {what} must be a {_INPUT_TYPES}; got {type(value).__name__}.")


def _pil_image_to_array(image: Image.Image) -> np.ndarray:
    """A PIL image -> `(H, W)` or `(H, W, 3)` array, in the mode's own dtype."""
    if image.mode in _DIRECT_PIL_MODES:
        return np.array(image)
    if image.mode in _ALPHA_LUMINANCE_MODES:
        return np.array(image)[..., 0]  # drop alpha; PIL cannot convert "La" to RGB itself
    try:
        return np.array(image.convert("RGB"))
    except ValueError as error:
        raise ValueError(f"Cannot convert a PIL image in mode {image.mode!r} to RGB: {error}") from error


def _channels_first(
    array: np.ndarray, layout, prefer_first: bool, convert: bool = True, num_channels: int = _CHANNELS
) -> np.ndarray:
    """`(H, W)`, `(H, W, C)` or `(C, H, W)` -> `(3, H, W)`: grey replicated, alpha dropped (only RGB when not
    `convert`); or, for `num_channels` other than 3, -> `(num_channels, H, W)` as it is (exactly that many
    channels)."""
    if num_channels != _CHANNELS:
        return _channels_first_as_is(array, layout, prefer_first, num_channels)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        layout = ChannelDimension(layout) if layout is not None else None
        if layout is None:
            first_ok, last_ok = array.shape[0] in _VALID_CHANNELS, array.shape[-1] in _VALID_CHANNELS
            if not (first_ok or last_ok):
                raise ValueError(
                    f"Unsupported image shape {array.shape}: a 3-D image must be (H, W, C) or (C, H, W) with C in "
                    f"{_VALID_CHANNELS} (1 = grayscale, replicated to RGB; 3 = RGB; 4 = RGBA, alpha dropped)."
                )
            channels_first = first_ok and (prefer_first or not last_ok)
            layout = ChannelDimension.FIRST if channels_first else ChannelDimension.LAST
        if layout == ChannelDimension.LAST:
            array = np.moveaxis(array, -1, 0)
    else:
        raise ValueError(
            f"Unsupported image shape {array.shape}: an image must be 2-D (H, W) or 3-D (H, W, C) / (C, H, W) with "
            f"C in {_VALID_CHANNELS}; pass a list or a 4-D array for a batch."
        )
    channels = array.shape[0]
    if channels not in _VALID_CHANNELS:
        raise ValueError(
            f"Unsupported number of channels {channels} in an image of shape {tuple(array.shape)}: C must be in "
            f"{_VALID_CHANNELS} (1 = grayscale, replicated to RGB; 3 = RGB; 4 = RGBA, alpha dropped)."
        )
    if not convert and channels != _CHANNELS:
        raise ValueError(
            f"do_convert_rgb=False: the image has {channels} channel(s) (shape {tuple(array.shape)}), but the model "
            "takes 3-channel RGB. Pass do_convert_rgb=True (the default) to convert it."
        )
    if channels == 1:
        return np.repeat(array, 3, axis=0)
    return array[:3]


def _channels_first_as_is(array: np.ndarray, layout, prefer_first: bool, num_channels: int) -> np.ndarray:
    """`(H, W)` (one channel), `(H, W, k)` or `(k, H, W)` -> `(k, H, W)`, nothing converted; a `ValueError` naming
    the shape unless the image has exactly `k = num_channels` channels."""
    expected = (
        f"a model with num_channels={num_channels} takes images with exactly {num_channels} channel(s): "
        f"{'(H, W), ' if num_channels == 1 else ''}(H, W, {num_channels}) or ({num_channels}, H, W)"
    )
    shape = tuple(array.shape)
    if array.ndim == 2 and num_channels == 1:
        return array[None]
    if array.ndim != 3:
        raise ValueError(f"Unsupported image shape {shape}: {expected}; pass a list or a 4-D array for a batch.")
    layout = ChannelDimension(layout) if layout is not None else None
    if layout is None:
        first_ok, last_ok = array.shape[0] == num_channels, array.shape[-1] == num_channels
        layout = ChannelDimension.FIRST if first_ok and (prefer_first or not last_ok) else ChannelDimension.LAST
    if layout == ChannelDimension.LAST:
        array = np.moveaxis(array, -1, 0)
    if array.shape[0] != num_channels:
        raise ValueError(f"Unsupported image shape {shape}: {expected}.")
    return array


def _to_uint8_scale(array: np.ndarray) -> np.ndarray:
    """Any dtype -> float32 on the 0..255 scale, by the dtype's range (see the class docstring)."""
    if array.dtype == np.bool_:
        return array.astype(np.float32) * np.float32(255)
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    if array.dtype.kind in "iu":
        low, high = array.min(), array.max()
        if array.dtype != np.uint16 and (low < 0 or high > 65535):
            raise ValueError(
                f"Integer images other than uint8 are read as 16-bit data and must lie in [0, 65535]; got values "
                f"in [{low}, {high}] with dtype {array.dtype}. Convert to uint8, uint16 or float in [0, 1] first."
            )
        return array.astype(np.float32) * np.float32(255 / 65535)
    if array.dtype.kind == "f":
        # Checked first: min() / max() of an array holding NaN are NaN, which passes every range comparison.
        finite = np.isfinite(array)
        if not finite.all():
            bad_pixels = ~finite.all(axis=0)  # (H, W): a pixel with any channel NaN or inf
            raise ValueError(
                f"The image holds {int(bad_pixels.sum())} non-finite pixel value(s) (NaN or inf) of {bad_pixels.size} "
                "pixels; one is enough to make every prediction NaN. Fix or drop the image (e.g. np.nan_to_num)."
            )
        low, high = float(array.min()), float(array.max())
        if low < -_FLOAT_RANGE_TOLERANCE or high > 1 + _FLOAT_RANGE_TOLERANCE:
            raise ValueError(
                f"Floating-point images must lie in [0, 1]; got values in [{low:.4g}, {high:.4g}]. Pass 0..255 data "
                "as uint8 (or divide it by 255), and pass raw, not already normalised, images."
            )
        return array.astype(np.float32) * np.float32(255)
    raise ValueError(f"Unsupported image dtype {array.dtype}.")


def _check_channel_statistic(name: str, value, num_channels: int = _CHANNELS) -> np.ndarray:
    """`image_mean` / `image_std` as a float32 `(num_channels,)` array; one value per channel or one for all,
    finite, and a std above 0, or a `ValueError` naming the setting."""
    values = np.atleast_1d(np.asarray(value, dtype=np.float64)).ravel()
    if values.size == 1:
        values = np.repeat(values, num_channels)
    if values.size != num_channels:
        what = "one per RGB channel" if num_channels == _CHANNELS else "one per channel"
        raise ValueError(
            f"`{name}` must hold {num_channels} values ({what}; num_channels={num_channels}) or one for all "
            f"channels, got {values.size}: {np.asarray(value).ravel().tolist()}."
        )
    if not np.all(np.isfinite(values)) or (name == "image_std" and np.any(values <= 0)):
        above = " above 0" if name == "image_std" else ""
        raise ValueError(f"`{name}` must hold finite values{above}, got {list(values)}.")
    return values.astype(np.float32)


def _backbone_statistics(backbone_name_or_path) -> dict:
    """`image_mean` / `image_std` of the backbone's own image processor, when its folder or repo has one."""
    if not backbone_name_or_path:
        return {}
    try:
        settings, _ = ViTSegImageProcessor.get_image_processor_dict(backbone_name_or_path)
    except OSError:  # no preprocessor_config.json there (or the Hub is out of reach): keep ImageNet's
        return {}
    return {key: settings[key] for key in ("image_mean", "image_std") if key in settings}


def _as_int_rows(values) -> list[tuple[int, ...]]:
    """Sizes or boxes given as a list of tuples, a numpy array or a tensor -> a list of int tuples."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().tolist()
    elif isinstance(values, np.ndarray):
        values = values.tolist()
    return [tuple(int(v) for v in row) for row in values]


def _resize_output_size(input_hw: tuple[int, int], size) -> tuple[int, int]:
    if size.get("shortest_edge") is not None:
        height, width = input_hw
        short, long = min(height, width), max(height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)
    return size["height"], size["width"]


def _nearest_indices(in_len: int, out_len: int) -> np.ndarray:
    """Source indices of a nearest-neighbour resize, sampling pixel centres as PIL's NEAREST does."""
    return np.minimum(((np.arange(out_len) + 0.5) * (in_len / out_len)).astype(np.int64), in_len - 1)


def _pad_bottom_right(array: np.ndarray, target_hw: tuple[int, int], fill) -> np.ndarray:
    """Pad the last two axes of `(C, H, W)` or `(H, W)` to `target_hw`, at the bottom and right."""
    pad_h, pad_w = target_hw[0] - array.shape[-2], target_hw[1] - array.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return array
    widths = [(0, 0)] * (array.ndim - 2) + [(0, pad_h), (0, pad_w)]
    return np.pad(array, widths, mode="constant", constant_values=fill)


def _output_geometry(batch_size: int, target_sizes, input_sizes, input_boxes, padded_size):
    """Check and normalise the geometry arguments of the post-processing methods: one entry per image; `input_sizes`
    become boxes at the top-left corner. Returns `(target_sizes, input_boxes, padded_size)` as int tuples (or None)."""
    given = {"target_sizes": target_sizes, "input_sizes": input_sizes, "input_boxes": input_boxes}
    for name, values in given.items():
        if values is not None and len(values) != batch_size:
            raise ValueError(f"Got {len(values)} {name} for a batch of {batch_size} logits; pass one per image.")
    if input_boxes is not None and input_sizes is not None:
        raise ValueError("Pass `input_boxes` or `input_sizes`, not both (the boxes say everything the sizes do).")
    if input_boxes is None and input_sizes is not None:
        input_boxes = [(0, 0, int(h), int(w)) for h, w in _as_int_rows(input_sizes)]
    if input_boxes is not None:
        if padded_size is None:
            raise ValueError(
                "`input_sizes` / `input_boxes` need `padded_size`, the (height, width) of the padded pixel_values."
            )
        input_boxes = _as_int_rows(input_boxes)
        padded_size = (int(padded_size[0]), int(padded_size[1]))
    if target_sizes is not None:
        target_sizes = _as_int_rows(target_sizes)
        empty = [size for size in target_sizes if len(size) != 2 or min(size) < 1]
        if empty:
            raise ValueError(f"target_sizes must be (height, width) pairs of at least 1 pixel each; got {empty[0]}.")
    return target_sizes, input_boxes, padded_size


def _to_output_geometry(item_logits: torch.Tensor, index: int, target_sizes, input_boxes, padded_size) -> torch.Tensor:
    """`(1, C, h, w)` logits over the padded canvas of image `index` -> over the image itself: resampled to its
    target size (through its box when the geometry is known), or, without a target size, cut to the rows / columns
    that cover the image. Arguments as returned by `_output_geometry`."""
    logits_h, logits_w = item_logits.shape[-2:]
    if input_boxes is None:
        if target_sizes is not None and tuple(target_sizes[index]) != (logits_h, logits_w):
            item_logits = F.interpolate(item_logits, size=tuple(target_sizes[index]), mode="bilinear",
                                        align_corners=False)
    elif target_sizes is not None:
        item_logits = _resample_box(item_logits, input_boxes[index], padded_size, tuple(target_sizes[index]))
    else:
        # At the logits' own resolution: keep every row / column that covers part of the image.
        top, left, height, width = input_boxes[index]
        keep_h = math.ceil(min(top + height, padded_size[0]) * logits_h / padded_size[0])
        keep_w = math.ceil(min(left + width, padded_size[1]) * logits_w / padded_size[1])
        item_logits = item_logits[..., :keep_h, :keep_w]
    return item_logits


def _resample_box(
    logits: torch.Tensor, box: tuple[int, int, int, int], padded_hw: tuple[int, int], out_hw: tuple[int, int]
) -> torch.Tensor:
    """Bilinearly resample `(1, C, h, w)` logits, which cover a padded canvas of `padded_hw` pixels, onto an image
    that lies at `box = (top, left, height, width)` in that canvas, at `out_hw` pixels.

    One interpolation straight from the logits to the target, with `F.interpolate(mode="bilinear",
    align_corners=False)` geometry: output row `i` is canvas row `top + (i + 0.5) * height / out_h`, i.e. logits
    row `that * h / padded_h - 0.5`, clamped to the rows that cover the image's content (never the padding; parts
    of the image outside the canvas, cropped away, take the nearest row). With the box covering the whole canvas
    this is `F.interpolate` up to float rounding; with a box ending on a logits row it equals cropping those rows
    and calling `F.interpolate`, up to rounding.

    The arithmetic is spelled out (`_BilinearAxis`, `_combine` with `fused=False`): columns first, then rows, each
    a float32 `t0 * l0 + t1 * l1` of separate multiplications and an addition. Those operations round the same way
    on every device and for any subset of classes and pixels, which is what lets `_labels_of_resampled` compute
    only the classes that can win a pixel and still return this function's `argmax` bit for bit.
    """
    rows, cols = _box_source_indices(logits, box, padded_hw, out_hw)
    rows = _BilinearAxis.from_positions(rows, logits.shape[-2])
    cols = _BilinearAxis.from_positions(cols, logits.shape[-1])
    columns = cols.apply(logits, dim=-1, fused=False)  # (1, C, h, out_w)
    return rows.apply(columns, dim=-2, fused=False)


def _box_source_indices(
    logits: torch.Tensor, box: tuple[int, int, int, int], padded_hw: tuple[int, int], out_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_resample_box`'s source position of every output row and column, in logits rows / columns (float64),
    clamped to the rows / columns that cover the image's content."""
    def source_index(out_len: int, start: int, length: int, canvas: int, in_len: int) -> torch.Tensor:
        centres = torch.arange(out_len, dtype=torch.float64, device=logits.device) + 0.5
        index = (start + centres * (length / out_len)) * (in_len / canvas) - 0.5
        content_end = min(start + length, canvas) * in_len / canvas  # in logits rows; content starts at 0
        return index.clamp(0.0, max(content_end - 1.0, 0.0))

    top, left, height, width = box
    return (source_index(out_hw[0], top, height, padded_hw[0], logits.shape[-2]),
            source_index(out_hw[1], left, width, padded_hw[1], logits.shape[-1]))


class _BilinearAxis:
    """Bilinear sampling along one axis: output `i` is `l0[i] * source[i0[i]] + l1[i] * source[i1[i]]` (float32
    weights, int64 indices), combined by `_combine`."""

    def __init__(self, i0: torch.Tensor, i1: torch.Tensor, l0: torch.Tensor, l1: torch.Tensor):
        self.i0, self.i1, self.l0, self.l1 = i0, i1, l0, l1

    @classmethod
    def from_positions(cls, positions: torch.Tensor, in_len: int) -> "_BilinearAxis":
        """From float64 source positions (already clamped to `[0, in_len - 1]`): the two neighbours and weights."""
        i0 = positions.floor().long().clamp(0, in_len - 1)
        l1 = (positions - i0.double()).clamp(0.0, 1.0).float()
        return cls(i0, (i0 + 1).clamp(max=in_len - 1), 1.0 - l1, l1)

    @classmethod
    def like_interpolate(cls, in_len: int, out_len: int, fused: bool) -> "_BilinearAxis":
        """`F.interpolate(mode="bilinear", align_corners=False, size=...)`'s indices and weights for one axis, in the
        float32 arithmetic of ATen's CPU kernel (`compute_source_index_and_lambda`): `scale = in / out`, source
        `scale * (i + 0.5) - 0.5` (one fused multiply-add when `fused`, as compilers emit it with FMA
        instructions, else two roundings) clamped at 0, `l1 = min(max(source - floor, 0), 1)`, `l0 = 1 - l1`."""
        if in_len == out_len:
            index = torch.arange(out_len)
            return cls(index, index, torch.ones(out_len), torch.zeros(out_len))
        scale = torch.tensor(float(in_len), dtype=torch.float32) / torch.tensor(float(out_len), dtype=torch.float32)
        centres = torch.arange(out_len, dtype=torch.float32) + 0.5
        if fused:  # exact in float64 (24 + 15 significant bits, then a multiple of 0.5), so one rounding
            source = (scale.double() * centres.double() - 0.5).float()
        else:
            source = scale * centres - 0.5
        source = source.clamp(min=0.0)
        i0 = source.floor().long().clamp(max=in_len - 1)
        l1 = (source - i0.float()).clamp(0.0, 1.0)
        return cls(i0, i0 + (i0 < in_len - 1).long(), 1.0 - l1, l1)

    def apply(self, values: torch.Tensor, dim: int, fused: bool) -> torch.Tensor:
        """Resample `values` along `dim` (negative) onto this axis's outputs (None as `_combine` returns it)."""
        device = values.device
        i0, i1 = self.i0.to(device), self.i1.to(device)
        shape = [1] * (-dim)
        shape[0] = -1
        l0, l1 = self.l0.to(device).view(shape), self.l1.to(device).view(shape)
        if fused or (values.requires_grad and torch.is_grad_enabled()):  # (autograd refuses `out=`)
            return _combine(values.index_select(dim, i0), l0, values.index_select(dim, i1), l1, fused=fused)
        out_len = i0.numel()
        out = values.new_empty(values.shape[: values.dim() + dim] + (out_len,) + values.shape[values.dim() + dim + 1 :])
        step = max(1, (1 << 18) // max(1, values.numel() // values.shape[dim]))  # pieces that stay in cache
        for start in range(0, out_len, step):
            part = slice(start, start + step)
            torch.add(values.index_select(dim, i0[part]) * l0[part], values.index_select(dim, i1[part]) * l1[part],
                      out=out.narrow(dim, start, min(step, out_len - start)))
        return out


def _combine(t0: torch.Tensor, l0: torch.Tensor, t1: torch.Tensor, l1: torch.Tensor, fused: bool
             ) -> torch.Tensor | None:
    """`t0 * l0 + t1 * l1` in float32: three separate roundings, or, `fused`, `fma(t0, l0, t1 * l1)` as ATen's
    bilinear CPU kernel computes it when compiled with FMA instructions (None when that cannot be emulated
    exactly: a result in float32's subnormal range)."""
    if not fused:
        return t0 * l0 + t1 * l1
    return _fma(t0, l0, t1 * l1)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor | None:
    """`a * b + c` rounded once to float32 (a fused multiply-add), for float32 tensors, through float64: the product
    is exact there (24 + 24 significant bits); the sum is rounded to float64 and then to float32, which gives the
    once-rounded result except when the float64 sum lies exactly halfway between two float32 numbers while the
    true sum does not. TwoSum recovers the float64 rounding error, and those halfway cases are nudged towards the
    true sum before the last rounding. Returns None for results in float32's subnormal range (another rounding
    position; never met by logits in practice)."""
    product, addend = a.double() * b.double(), c.double()
    total = product + addend
    addend_part = total - product
    error = (product - (total - addend_part)) + (addend - addend_part)  # product + addend == total + error
    halfway = (total.view(torch.int64) & 0x1FFFFFFF) == 0x10000000  # the 29 bits float32 drops: 1000...0
    nudge = halfway & (error != 0)
    if bool(nudge.any()):
        toward = torch.where(error > 0, math.inf, -math.inf).to(total)
        total = torch.where(nudge, torch.nextafter(total, toward), total)
    magnitude = total.abs()
    if bool(((magnitude < 2.0**-126) & (magnitude > 0)).any()):
        return None
    return total.float()


# the largest share of (class, pixel) values the pruned label map may compute before resampling everything is faster
_PRUNED_FRACTION = 0.3
_FLOOR = 1e37  # the value padding slots of `_labels_of_rows` read (logits at least a quarter of it: full path)
_INTERPOLATE_ARITHMETIC: dict[tuple[int, int, int, int], tuple[bool, bool] | None] = {}


def _interpolate_arithmetic(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[bool, bool] | None:
    """Which float32 arithmetic this process's `F.interpolate(mode="bilinear", align_corners=False)` performs on the
    CPU for this geometry: `(fused source index, fused weighting)` such that `_BilinearAxis.like_interpolate` and
    `_combine` reproduce it bit for bit, or None when no variant does. Decided once per geometry by resampling a
    random plane both through `F.interpolate` and through the emulation (columns alone, as
    `_labels_of_resampled` uses them, and the whole result) and comparing every value."""
    key = (*in_hw, *out_hw)
    if key not in _INTERPOLATE_ARITHMETIC:
        if len(_INTERPOLATE_ARITHMETIC) >= 512:  # a bounded memo: a dataset of many image sizes
            _INTERPOLATE_ARITHMETIC.clear()
        probe = torch.randn(1, 1, *in_hw, generator=torch.Generator().manual_seed(sum(key))) * 8.0
        kernel = F.interpolate(probe, size=out_hw, mode="bilinear", align_corners=False)
        kernel_columns = F.interpolate(probe, size=(in_hw[0], out_hw[1]), mode="bilinear", align_corners=False)
        _INTERPOLATE_ARITHMETIC[key] = None
        for fused_index, fused in ((True, True), (False, False), (True, False), (False, True)):
            rows = _BilinearAxis.like_interpolate(in_hw[0], out_hw[0], fused_index)
            cols = _BilinearAxis.like_interpolate(in_hw[1], out_hw[1], fused_index)
            columns = cols.apply(probe, dim=-1, fused=fused)
            if columns is None or not torch.equal(columns, kernel_columns):
                continue
            emulated = rows.apply(columns, dim=-2, fused=fused)
            if emulated is not None and torch.equal(emulated, kernel):
                _INTERPOLATE_ARITHMETIC[key] = (fused_index, fused)
                break
    return _INTERPOLATE_ARITHMETIC[key]


@torch.no_grad()  # label maps: nothing to differentiate
def _labels_of_resampled(item_logits: torch.Tensor, index: int, target_sizes, input_boxes, padded_size):
    """`_to_output_geometry(item_logits, ...)[0].argmax(0)`, bit for bit, without resampling every class everywhere:
    the label map of post-processing.

    Resampling is separable: columns first (`columns[c, i, x]`, every class on every logits row: cheap, as there are
    few logits rows), then rows, where output pixel `(y, x)` of the band of rows that read logits rows `i0, i1`
    is `combine(columns[c, i0, x], l0[y], columns[c, i1, x], l1[y])`, a convex combination of two numbers up to
    float rounding: a line in the row's weight. So on that band and column a class can only win (be the argmax, ties
    included) if its line reaches the upper envelope of the others, less a rounding margin (`_row_candidates`).
    That leaves 1-2 candidates on a trained model's logits and about 5 of 150 even on flat ones (an untrained
    head), and only theirs are combined, with the same float32 operations as the full resampling; the first class
    with the largest value wins, as in `argmax`.

    The full resampling these values must equal is `_resample_box`'s arithmetic with `input_boxes`, and
    `F.interpolate`'s without: its CPU kernel's arithmetic (fused multiply-adds or not) is recognised once per
    geometry (`_interpolate_arithmetic`); there the candidates are first combined with plain float32 operations and
    only pixels whose best two values lie within the kernel's rounding of each other are recomputed in its exact
    arithmetic. Logits that are not finite or not on the CPU, an unrecognised kernel, or candidates too many to save
    time fall back to resampling everything, as `_to_output_geometry` does.
    """
    logits_h, logits_w = item_logits.shape[-2:]
    num_classes = item_logits.shape[1]
    target = None if target_sizes is None else tuple(target_sizes[index])

    def full() -> torch.Tensor:
        return _to_output_geometry(item_logits, index, target_sizes, input_boxes, padded_size)[0].argmax(dim=0)

    if (target is None or (input_boxes is None and target == (logits_h, logits_w)) or num_classes == 1
            or item_logits.device.type != "cpu" or not bool(torch.isfinite(item_logits).all())):
        return full()
    logits = item_logits[0]  # (C, h, w)
    if input_boxes is None:
        # ATen resamples NCHW float logits with its generic kernel, whose arithmetic `_interpolate_arithmetic`
        # recognises, except for outputs of at most 128 rows + columns, channels-last tensors and 3 channels
        # on one thread (`_use_vectorized_kernel_cond_2d`: a channels-last kernel); those are resampled in full
        if not (item_logits.is_contiguous() and num_classes >= 4 and sum(target) > 128
                and logits_h + target[1] > 128):
            return full()
        arithmetic = _interpolate_arithmetic((logits_h, logits_w), target)
        if arithmetic is None:
            return full()
        fused_index, fused = arithmetic
        rows = _BilinearAxis.like_interpolate(logits_h, target[0], fused_index)
        columns = F.interpolate(item_logits, size=(logits_h, target[1]), mode="bilinear", align_corners=False)[0]
        by_column = columns.permute(1, 2, 0).contiguous()  # (h, W, C): a unit's classes side by side
    else:
        row_positions, col_positions = _box_source_indices(item_logits, input_boxes[index], padded_size, target)
        rows = _BilinearAxis.from_positions(row_positions, logits_h)
        fused = False
        # the same operations as `_resample_box`'s column pass, element for element, in the (h, W, C) layout
        cols = _BilinearAxis.from_positions(col_positions, logits_w)
        by_column = cols.apply(logits.permute(1, 2, 0), dim=-2, fused=False)
    largest = 1.0001 * float(logits.abs().max())  # resampled values are convex combinations of the logits
    labels = _labels_of_rows(by_column, rows, fused, largest)
    return full() if labels is None else labels


def _row_candidates(t0: torch.Tensor, t1: torch.Tensor, largest: float) -> tuple[torch.Tensor, ...]:
    """The classes that can win some pixel of each unit (a band of output rows, one column), as `(unit, class)`
    pairs sorted by unit, then class, with their two numbers: `(unit_of, class_of, p0, p1)`; `t0`, `t1`:
    `(units, C)`, the two numbers each class mixes there.

    A pixel's value is, up to float rounding, the line `v(l) = t0 + l * (t1 - t0)` at its row's weight `l` in
    `[0, 1]`. First the cheap bound: `v` lies between `t0` and `t1`, so a class whose larger number is below
    another's smaller one cannot win. Then, on the remaining pairs, a tighter one: take `a`, the class largest
    at `l = 0`, and `b`, the one largest at `l = 1`; the winner's value is at least `max(v_a, v_b)`, so a class
    `c` cannot win where `g = max(v_a, v_b) - v_c > 0`. For any `mu` in `[0, 1]`, `g >= mu * v_a + (1 - mu) * v_b
    - v_c`, a line, so `g`'s minimum over `[0, 1]` is at least the smaller of that line's two ends (equal to it
    for the best `mu`, computed per class; any `mu` gives a valid bound, so its rounding cannot make the test
    wrong). A class whose bound exceeds the margin is dropped. The margin (2e-5 of the largest logit) is far above
    the few float32 roundings between these lines and the kernel's values."""
    margin = 2e-5 * largest + 1e-30
    candidates = torch.maximum(t0, t1) >= torch.minimum(t0, t1).amax(dim=1, keepdim=True) - margin
    unit_of, class_of = candidates.nonzero(as_tuple=True)
    counts = torch.bincount(unit_of, minlength=t0.shape[0])
    flat = unit_of * t0.shape[1] + class_of
    p0, p1 = t0.view(-1)[flat], t1.view(-1)[flat]

    def unit_max(values: torch.Tensor) -> torch.Tensor:
        return torch.segment_reduce(values, "max", lengths=counts)

    a_lo = unit_max(p0)  # every unit has at least one candidate: the class with the largest smaller number
    a_hi = unit_max(torch.where(p0 == a_lo[unit_of], p1, -math.inf))
    b_hi = unit_max(p1)
    b_lo = unit_max(torch.where(p1 == b_hi[unit_of], p0, -math.inf))
    a_lo, a_hi, b_lo, b_hi = a_lo[unit_of], a_hi[unit_of], b_lo[unit_of], b_hi[unit_of]
    spread = (a_lo - b_lo) + (b_hi - a_hi)  # >= 0: how much b gains on a from l = 0 to l = 1
    mu = torch.where(spread > 0, ((b_hi - b_lo) - (p1 - p0)) / spread, torch.ones_like(spread)).clamp(0.0, 1.0)
    at_0 = mu * a_lo + (1.0 - mu) * b_lo - p0  # the bounding line minus the class's, at l = 0 and l = 1
    at_1 = mu * a_hi + (1.0 - mu) * b_hi - p1
    keep = torch.minimum(at_0, at_1) <= margin
    return unit_of[keep], class_of[keep], p0[keep], p1[keep]


def _labels_of_rows(by_column: torch.Tensor, rows: _BilinearAxis, fused: bool, largest: float) -> torch.Tensor | None:
    """`rows.apply(columns, dim=-2, fused=fused).argmax(0)` for column-resampled logits given as `by_column`, `(h, W,
    C)`, computing only the classes that can win each band of rows and column (see `_labels_of_resampled`); None
    when pruning would not save time. `largest`: at least the largest magnitude in `by_column` (that of the logits
    it resamples)."""
    logits_rows, width, num_classes = by_column.shape
    height = rows.i0.numel()
    # bands: runs of output rows that read the same two logits rows
    starts = torch.ones(height, dtype=torch.bool)
    starts[1:] = (rows.i0[1:] != rows.i0[:-1]) | (rows.i1[1:] != rows.i1[:-1])
    # ... cut to at most the typical band's rows (the first and last bands, clamped, are longer), so that bands
    # padded to the longest waste little; pieces of one band share its two logits rows and candidates
    typical = -(-height // logits_rows)
    first_row = starts.nonzero()[:, 0]
    band_of_row = torch.cumsum(starts.long(), 0) - 1
    starts[(torch.arange(height) - first_row[band_of_row]) % typical == 0] = True
    band_start = starts.nonzero()[:, 0]
    band_length = torch.diff(band_start, append=torch.tensor([height]))
    if largest >= _FLOOR / 4:
        return None  # logits near float32's range: the padding value below could tie or overflow
    num_units = band_start.numel() * width  # unit = band * W + column
    # every (unit, candidate class) pair, by unit then ascending class (argmax keeps the first of equal values),
    # found a few bands at a time (the (units, C) arrays of a chunk stay in cache)
    parts = []
    bands_per_chunk = max(1, 4096 // width)
    for first in range(0, band_start.numel(), bands_per_chunk):
        chunk = band_start[first : first + bands_per_chunk]
        t0 = by_column[rows.i0[chunk]].view(-1, num_classes)  # (units of the chunk, C)
        t1 = by_column[rows.i1[chunk]].view(-1, num_classes)
        unit_of, class_of, p0, p1 = _row_candidates(t0, t1, largest)
        parts.append((unit_of + first * width, class_of, p0, p1))
    unit_of, class_of, p0, p1 = (torch.cat(part) for part in zip(*parts))
    counts = torch.bincount(unit_of, minlength=num_units)
    if int((counts * band_length.repeat_interleave(width)).sum()) > _PRUNED_FRACTION * num_classes * height * width:
        return None  # nearly every class may win nearly everywhere: resampling everything is cheaper
    labels = torch.empty(height * width, dtype=torch.long)
    longest = int(band_length.max())
    offsets = torch.arange(longest)
    slot_of = torch.arange(unit_of.numel()) - (torch.cumsum(counts, 0) - counts)[unit_of]
    # units grouped by their number of candidates, each group padded to its largest
    bounds = torch.tensor([1, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 64, 96, num_classes])
    bounds = bounds[bounds <= num_classes].unique()
    group_of_unit = torch.bucketize(counts, bounds)
    group_of_pair = group_of_unit[unit_of]
    pair_order = torch.argsort(group_of_pair, stable=True)
    pair_ends = torch.cumsum(torch.bincount(group_of_pair, minlength=len(bounds)), 0).tolist()
    position = torch.empty(num_units, dtype=torch.long)  # a unit's row in its group
    tie_margin = 1e-6 * largest + 1e-30  # > the kernel's rounding differences from plain float32
    for group, k in enumerate(bounds.tolist()):
        pairs = pair_order[(pair_ends[group - 1] if group else 0) : pair_ends[group]]
        if pairs.numel() == 0:
            continue
        units = (group_of_unit == group).nonzero()[:, 0]
        n = units.numel()
        position[units] = torch.arange(n)
        row_of = position[unit_of[pairs]]
        classes = torch.zeros(n * k, dtype=torch.long)
        place = row_of * k + slot_of[pairs]  # (unit's row, slot) in the group's padded (n, k) arrays
        classes[place] = class_of[pairs]
        classes = classes.view(n, k)
        band, column = units // width, units % width
        out_rows = (band_start[band][:, None] + offsets).clamp(max=height - 1)  # (n, longest)
        in_band = offsets < band_length[band][:, None]
        pixels = (out_rows * width + column[:, None])[in_band]
        if k == 1:  # one candidate: it wins
            labels[pixels] = classes.expand(-1, longest)[in_band]
            continue
        # padding slots read -FLOOR at both rows: below every real value (|logits| < FLOOR), finite once weighted
        a = torch.full((n * k,), -_FLOOR)
        b = torch.full((n * k,), -_FLOOR)
        a[place] = p0[pairs]
        b[place] = p1[pairs]
        a, b = a.view(n, 1, k), b.view(n, 1, k)
        l0, l1 = rows.l0[out_rows][..., None], rows.l1[out_rows][..., None]  # (n, longest, 1)
        values = a * l0 + b * l1  # (n, longest, k): the full resampling's values, unless `fused`
        best = values.argmax(dim=-1)  # (n, longest)
        if fused:
            # the kernel fuses multiply-adds: where another plain value is within its rounding of the best, recompute
            top = values.gather(-1, best[..., None])
            close = ((values >= top - tie_margin).sum(dim=-1) > 1) & in_band
            if bool(close.any()):
                unit_at, offset_at = close.nonzero(as_tuple=True)
                exact = _combine(a[unit_at, 0], l0[unit_at, offset_at], b[unit_at, 0], l1[unit_at, offset_at],
                                 fused=True)  # (m, k)
                if exact is None:
                    return None
                best[unit_at, offset_at] = exact.argmax(dim=-1)
        labels[pixels] = classes.gather(1, best)[in_band]
    return labels.view(height, width)


__all__ = [
    "IGNORED_TARGET",
    "NO_TARGET",
    "ViTSegImageProcessor",
    "panoptic_to_instance_map",
    "segmentation_map_to_targets",
    "targets_to_labels",
    "targets_to_masks",
]
