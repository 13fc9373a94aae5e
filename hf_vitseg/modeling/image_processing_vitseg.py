"""`ViTSegImageProcessor`: images and segmentation maps in, patch-aligned `pixel_values` and `labels` out.

This file is self-contained on purpose: it imports only numpy, PIL, torch, transformers and the standard
library, never `hf_vitseg`, and has no relative imports. `save_pretrained` copies it verbatim next to a
checkpoint (after `register_for_auto_class("AutoImageProcessor")`), and
`AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)` loads it on machines that have never
installed hf-vitseg. It builds on transformers' PIL backend, so torchvision is never needed.
"""

import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ChannelDimension, PILImageResampling
from transformers.processing_utils import ImagesKwargs, Unpack


# PIL modes whose pixels numpy reads directly as one or three channels; every other mode goes through
# `Image.convert("RGB")` (P, PA, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV).
_DIRECT_PIL_MODES = {"1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F", "RGB"}
_ALPHA_LUMINANCE_MODES = {"LA", "La"}
_VALID_CHANNELS = (1, 3, 4)
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
            Per-channel standard deviation, set from the backbone like `image_mean`.
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
            Whether to add `input_sizes`, a `(B, 2)` int64 array of each image's `(height, width)` after
            resizing / cropping and before padding, to the output. Pop it before calling the model and pass it
            to `post_process_semantic_segmentation` to cut the padding away. Off by default so that
            `model(**inputs)` keeps working.

    Input conversion (images). Inputs are `PIL.Image.Image`, `numpy.ndarray` or `torch.Tensor`; a batch is a
    list of them or one 4-D array / tensor. The result is always 3 channels:

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
      already-normalised tensor.

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
    ```
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

    def __init__(self, **kwargs: Unpack[ViTSegImageProcessorKwargs]):
        super().__init__(**kwargs)

    def preprocess(
        self,
        images,
        segmentation_maps=None,
        **kwargs: Unpack[ViTSegImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Prepare one image or a batch (and, optionally, the matching segmentation maps).

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, or a list of them, or a 4-D array):
                The images; see the class docstring for the conversion rule.
            segmentation_maps (same kinds, *optional*):
                One integer map per image, each the size of its image.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                `"pt"` for torch tensors, `"np"` or `None` for numpy arrays.
            kwargs:
                Any constructor argument, overriding the stored setting for this call.

        Returns:
            `BatchFeature` with `pixel_values` `(B, 3, H, W)` float32, `labels` `(B, H, W)` int64 when maps are
            given, and `input_sizes` `(B, 2)` int64 when `return_input_sizes=True`.
        """
        kwargs.setdefault("return_tensors", "pt")
        return super().preprocess(images, segmentation_maps, **kwargs)

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
        return kwargs

    # ----------------------------------------------------------------------------------------------
    # Conversion of one raw input
    # ----------------------------------------------------------------------------------------------

    def process_image(self, image, input_data_format=None, **kwargs) -> np.ndarray:
        """One raw image -> float32 `(3, H, W)` on the 0..255 scale, by the rule in the class docstring."""
        if isinstance(image, Image.Image):
            array = _pil_image_to_array(image)
            layout = ChannelDimension.LAST
        else:
            array = _to_numpy(image, "image")
            layout = input_data_format
        array = _channels_first(array, layout, prefer_first=isinstance(image, torch.Tensor))
        return _to_uint8_scale(array)

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

    # ----------------------------------------------------------------------------------------------
    # The pipeline
    # ----------------------------------------------------------------------------------------------

    def _preprocess_image_like_inputs(self, images, segmentation_maps=None, **kwargs) -> BatchFeature:
        images = [
            self.process_image(image, input_data_format=kwargs.get("input_data_format"))
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
        return self._preprocess(images, maps, **kwargs)

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
        **kwargs,
    ) -> BatchFeature:
        maps = segmentation_maps if segmentation_maps is not None else [None] * len(images)
        processed_images, processed_maps = [], []
        for image, seg_map in zip(images, maps):
            if seg_map is not None and do_reduce_labels:
                seg_map = reduce_labels(seg_map, ignore_index)
            if do_resize:
                out_hw = _resize_output_size(image.shape[1:], size)
                image = _resize_image(image, out_hw, resample)
                seg_map = None if seg_map is None else _resize_nearest(seg_map, out_hw)
            if do_rescale:
                image = image * np.float32(rescale_factor)
            if do_normalize:
                mean = np.asarray(image_mean, dtype=np.float32).reshape(-1, 1, 1)
                std = np.asarray(image_std, dtype=np.float32).reshape(-1, 1, 1)
                image = (image - mean) / std
            if size_divisor_mode == "crop":
                image, seg_map = _center_crop_to_multiple(image, seg_map, patch_size)
            processed_images.append(image.astype(np.float32, copy=False))
            processed_maps.append(seg_map)

        input_sizes = np.array([image.shape[1:] for image in processed_images], dtype=np.int64)
        if pad_to_size is not None:
            target_hw = (pad_to_size["height"], pad_to_size["width"])
            too_large = [tuple(hw.tolist()) for hw in input_sizes if hw[0] > target_hw[0] or hw[1] > target_hw[1]]
            if too_large:
                raise ValueError(
                    f"pad_to_size {target_hw} is smaller than image size(s) {too_large}; resize first "
                    "(do_resize=True with a suitable `size`) or raise pad_to_size."
                )
        else:
            # Largest size in the batch, rounded up to the patch grid ("crop" sizes already lie on it).
            target_hw = tuple(int(math.ceil(side / patch_size) * patch_size) for side in input_sizes.max(axis=0))

        data = {"pixel_values": np.stack([_pad_bottom_right(image, target_hw, 0.0) for image in processed_images])}
        if segmentation_maps is not None:
            data["labels"] = np.stack([_pad_bottom_right(m, target_hw, ignore_index) for m in processed_maps])
        if return_input_sizes:
            data["input_sizes"] = input_sizes
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ----------------------------------------------------------------------------------------------
    # Post-processing
    # ----------------------------------------------------------------------------------------------

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes=None,
        input_sizes=None,
        padded_size=None,
        infer_padding: bool = True,
    ) -> list[torch.Tensor]:
        r"""
        Turn model logits into one label map per image.

        Args:
            outputs (`SemanticSegmenterOutput` or `torch.Tensor`):
                Model outputs; `outputs.logits` (or the tensor itself) is `(B, C, h, w)` at any resolution
                coarser or finer than the input, covering the whole padded `pixel_values`.
            target_sizes (`list[tuple[int, int]]` or `torch.Tensor` of shape `(B, 2)`, *optional*):
                `(height, width)` of each output map, usually each original image's size. Logits are resized
                bilinearly (`align_corners=False`), then the argmax is taken. When `None`, the argmax is taken at
                the logits' resolution.
            input_sizes (`list[tuple[int, int]]` or array / tensor `(B, 2)`, *optional*):
                Each image's `(height, width)` inside the padded batch, i.e. after resizing / cropping and before
                padding: the processor's `input_sizes` output (`return_input_sizes=True`). When given, the padded
                bottom/right area is cut away *before* resizing to the target size, so the predicted map is
                exactly aligned with the image. Requires `padded_size`. Without `target_sizes`, the logits are
                cropped at their own resolution, keeping every row/column that covers part of the image.
            padded_size (`tuple[int, int]`, *optional*):
                `(height, width)` of the padded `pixel_values` the model saw, i.e. `pixel_values.shape[-2:]`.
            infer_padding (`bool`, *optional*, defaults to `True`):
                When `target_sizes` are given without `input_sizes` (as transformers' `ImageSegmentationPipeline`
                does), take each target size to be the original image's size and recompute the resizing and
                padding this processor applied to it, so the padded area is still cut away. This happens only
                when the result is consistent with the logits (the recomputed padded canvas has the logits'
                aspect ratio) and never with `size_divisor_mode="crop"`, which discards pixels instead.
                Set it to `False` to stretch the whole logits over each target size.

        Returns:
            `list[torch.Tensor]`: `B` int64 maps of shape `(height, width)`.

        Example:

        ```python
        >>> inputs = processor(images, return_input_sizes=True)
        >>> input_sizes = inputs.pop("input_sizes")
        >>> outputs = model(**inputs)
        >>> maps = processor.post_process_semantic_segmentation(
        ...     outputs,
        ...     target_sizes=[image.size[::-1] for image in images],  # PIL sizes are (W, H)
        ...     input_sizes=input_sizes,
        ...     padded_size=inputs["pixel_values"].shape[-2:],
        ... )
        ```
        """
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        batch_size, _, logits_h, logits_w = logits.shape
        for name, sizes in (("target_sizes", target_sizes), ("input_sizes", input_sizes)):
            if sizes is not None and len(sizes) != batch_size:
                raise ValueError(f"Got {len(sizes)} {name} for a batch of {batch_size} logits; pass one per image.")
        if input_sizes is not None and padded_size is None:
            raise ValueError("`input_sizes` needs `padded_size`, the (height, width) of the padded pixel_values.")

        if input_sizes is None and target_sizes is not None and infer_padding:
            input_sizes, padded_size = self._infer_input_geometry(target_sizes, (logits_h, logits_w))

        label_maps = []
        for index in range(batch_size):
            item_logits = logits[index : index + 1].float()  # (1, C, h, w)
            # Share of the logits (per side) that covers the image rather than padding.
            if input_sizes is None:
                covered = (1.0, 1.0)
            else:
                covered = (
                    int(input_sizes[index][0]) / int(padded_size[0]),
                    int(input_sizes[index][1]) / int(padded_size[1]),
                )
            if target_sizes is not None:
                target_hw = (int(target_sizes[index][0]), int(target_sizes[index][1]))
                item_logits = _resample_top_left_region(item_logits, covered, target_hw)
            else:
                keep_h, keep_w = math.ceil(covered[0] * logits_h), math.ceil(covered[1] * logits_w)
                item_logits = item_logits[..., :keep_h, :keep_w]
            label_maps.append(item_logits[0].argmax(dim=0))
        return label_maps

    def _infer_input_geometry(self, target_sizes, logits_hw: tuple[int, int]):
        """`(input_sizes, padded_size)` this processor would have produced for images of `target_sizes`, or
        `(None, None)` when they cannot be recomputed or do not fit the logits."""
        if self.size_divisor_mode == "crop":
            return None, None
        input_sizes = []
        for target in target_sizes:
            hw = (int(target[0]), int(target[1]))
            input_sizes.append(_resize_output_size(hw, self.size) if self.do_resize else hw)
        if self.pad_to_size is not None:
            padded = (int(self.pad_to_size["height"]), int(self.pad_to_size["width"]))
        else:
            patch = self.patch_size
            padded = tuple(int(math.ceil(max(sizes) / patch) * patch) for sizes in zip(*input_sizes))
        if any(h > padded[0] or w > padded[1] for h, w in input_sizes):
            return None, None
        # The padded canvas must be what the logits cover: the same aspect ratio (any output stride).
        if abs(padded[0] * logits_hw[1] - padded[1] * logits_hw[0]) > 1e-6 * padded[0] * logits_hw[1]:
            return None, None
        return input_sizes, padded


def reduce_labels(segmentation_map: np.ndarray, ignore_index: int) -> np.ndarray:
    """ADE20K convention: 0 -> `ignore_index`, `v` -> `v - 1`, `ignore_index` stays `ignore_index`."""
    reduced = segmentation_map - 1
    reduced[(segmentation_map == 0) | (segmentation_map == ignore_index)] = ignore_index
    return reduced


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


def _channels_first(array: np.ndarray, layout, prefer_first: bool) -> np.ndarray:
    """`(H, W)`, `(H, W, C)` or `(C, H, W)` -> `(3, H, W)`: grey replicated, alpha dropped."""
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
    if channels == 1:
        return np.repeat(array, 3, axis=0)
    return array[:3]


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
        low, high = float(array.min()), float(array.max())
        if low < -_FLOAT_RANGE_TOLERANCE or high > 1 + _FLOAT_RANGE_TOLERANCE:
            raise ValueError(
                f"Floating-point images must lie in [0, 1]; got values in [{low:.4g}, {high:.4g}]. Pass 0..255 data "
                "as uint8 (or divide it by 255), and pass raw, not already normalised, images."
            )
        return array.astype(np.float32) * np.float32(255)
    raise ValueError(f"Unsupported image dtype {array.dtype}.")


def _resize_output_size(input_hw: tuple[int, int], size) -> tuple[int, int]:
    if size.get("shortest_edge") is not None:
        height, width = input_hw
        short, long = min(height, width), max(height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)
    return size["height"], size["width"]


def _resize_image(image: np.ndarray, out_hw: tuple[int, int], resample) -> np.ndarray:
    """`(C, H, W)` float32 -> `(C, *out_hw)`, each channel resized in PIL's float mode "F" (no quantisation)."""
    if tuple(image.shape[1:]) == tuple(out_hw):
        return image
    width_height = (out_hw[1], out_hw[0])
    return np.stack([np.asarray(Image.fromarray(channel).resize(width_height, resample=resample)) for channel in image])


def _resize_nearest(seg_map: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer map, sampling pixel centres as PIL's NEAREST does."""
    rows = _nearest_indices(seg_map.shape[0], out_hw[0])
    cols = _nearest_indices(seg_map.shape[1], out_hw[1])
    return seg_map[rows[:, None], cols[None, :]]


def _nearest_indices(in_len: int, out_len: int) -> np.ndarray:
    return np.minimum(((np.arange(out_len) + 0.5) * (in_len / out_len)).astype(np.int64), in_len - 1)


def _center_crop_to_multiple(image: np.ndarray, seg_map: np.ndarray | None, patch_size: int):
    height, width = image.shape[1:]
    crop_h, crop_w = height // patch_size * patch_size, width // patch_size * patch_size
    if crop_h == 0 or crop_w == 0:
        raise ValueError(
            f'size_divisor_mode="crop" cannot crop an image of size {(height, width)} to a multiple of patch_size '
            f'{patch_size}; resize it up first or use size_divisor_mode="pad".'
        )
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    image = image[:, top : top + crop_h, left : left + crop_w]
    if seg_map is not None:
        seg_map = seg_map[top : top + crop_h, left : left + crop_w]
    return image, seg_map


def _pad_bottom_right(array: np.ndarray, target_hw: tuple[int, int], fill) -> np.ndarray:
    """Pad the last two axes of `(C, H, W)` or `(H, W)` to `target_hw`, at the bottom and right."""
    pad_h, pad_w = target_hw[0] - array.shape[-2], target_hw[1] - array.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return array
    widths = [(0, 0)] * (array.ndim - 2) + [(0, pad_h), (0, pad_w)]
    return np.pad(array, widths, mode="constant", constant_values=fill)


def _resample_top_left_region(
    logits: torch.Tensor, covered: tuple[float, float], out_hw: tuple[int, int]
) -> torch.Tensor:
    """Bilinearly resample the top-left `covered` fraction (per side) of `(1, C, h, w)` logits to `out_hw`.

    One interpolation straight from the logits to the target, with `F.interpolate(mode="bilinear",
    align_corners=False)` geometry applied to the region: output row `i` samples logits row
    `(i + 0.5) * covered_h * h / out_h - 0.5`, clamped to `[0, covered_h * h - 1]` so that nothing beyond the region
    (the padding) is blended in. With `covered = (1, 1)` this is exactly `F.interpolate`; with a region that ends
    on a logits row it equals cropping that row range and calling `F.interpolate`.
    """
    _, _, height, width = logits.shape

    def normalised_coordinates(out_len: int, share: float, in_len: int) -> torch.Tensor:
        centres = torch.arange(out_len, dtype=torch.float32, device=logits.device) + 0.5
        index = centres * (share * in_len / out_len) - 0.5
        index = index.clamp(0.0, max(share * in_len - 1.0, 0.0))
        return (2.0 * index + 1.0) / in_len - 1.0  # grid_sample's align_corners=False convention

    ys = normalised_coordinates(out_hw[0], covered[0], height)
    xs = normalised_coordinates(out_hw[1], covered[1], width)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]  # (1, out_h, out_w, 2), (x, y) order
    return F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)


__all__ = ["ViTSegImageProcessor"]
