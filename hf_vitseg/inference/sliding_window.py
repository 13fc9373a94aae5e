"""Plain and sliding-window inference for segmentation models.

The model contract: `model(pixel_values=x)` with `x` of shape `(B, 3, H, W)`, `H` and `W` multiples
of `model.size_divisor` (the patch size, or a hierarchical backbone's coarsest stride), returns an
object with `.logits` of shape `(B, num_labels, h', w')` at the head's natural (coarser) resolution.
Callers upsample bilinearly (`align_corners=False`, `hf_vitseg.modeling.head_base.resize`) to the
input size; `forward_logits` is that plain inference, and `sliding_window_inference` is its
memory-bounded counterpart for images larger than the resolution the model was trained at.

The sliding window follows mmsegmentation's `slide_inference`: windows of `crop_size` step by
`stride`, and the last window of each row and column is moved back to end on the image border,
so every window has the full crop size and every pixel is covered. Overlapping predictions are
blended with uniform weights (a plain average) or nnU-Net's Gaussian importance map, which trusts
the centre of a window more than its border, where the context is cut off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from ..modeling.head_base import resize


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}.")
    return pair


def check_window(crop_size: int | Sequence[int], stride: int | Sequence[int], size_divisor: int):
    """`(crop, stride)` as `(H, W)` pairs; a `ValueError` for a window that is not a multiple of `size_divisor`
    or a stride larger than the window (pixels no window sees)."""
    crop_h, crop_w = _pair(crop_size, "crop_size")
    stride_h, stride_w = _pair(stride, "stride")
    if crop_h % size_divisor or crop_w % size_divisor:
        raise ValueError(
            f"crop_size {(crop_h, crop_w)} must be a multiple of the model's size divisor {size_divisor} (the "
            "patch size, or a hierarchical backbone's coarsest stride)."
        )
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(
            f"stride {(stride_h, stride_w)} larger than crop_size {(crop_h, crop_w)} leaves pixels unseen."
        )
    return (crop_h, crop_w), (stride_h, stride_w)


def resolve_size_divisor(model: torch.nn.Module, patch_size: int | None) -> int:
    """`patch_size` if given, else `model.size_divisor`: what input height and width must be multiples of (the
    patch size, or a hierarchical backbone's coarsest stride; a PEFT model forwards it)."""
    if patch_size is not None:
        return patch_size
    divisor = getattr(model, "size_divisor", None)
    if not isinstance(divisor, int):
        raise TypeError(
            f"{type(model).__name__} has no `size_divisor` (what input sizes must be multiples of); pass patch_size=."
        )
    return divisor


def resolve_device(model: torch.nn.Module, device: torch.device | str | None, fallback: torch.device) -> torch.device:
    """`device` if given, else the device of the model's parameters, else `fallback`."""
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else fallback


@torch.inference_mode()
def forward_logits(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    output_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Plain inference: one forward pass, logits upsampled bilinearly to `output_size`.

    Args:
        model: a segmentation model honouring the contract above (call `model.eval()` first).
        pixel_values: `(B, 3, H, W)`, `H` and `W` multiples of `model.size_divisor`.
        output_size: `(H_out, W_out)`; default the input size `(H, W)`.

    Returns:
        float32 logits `(B, num_labels, H_out, W_out)`.
    """
    logits = model(pixel_values=pixel_values).logits.float()  # (B, C, h', w')
    return resize(logits, output_size or pixel_values.shape[-2:])


def sliding_window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis of `length >= crop` pixels.

    mmsegmentation's grid: `ceil((length - crop) / stride) + 1` windows, `stride` apart, the last one
    moved back to end exactly on the border (so it may overlap its neighbour by more than the others).
    """
    num_windows = max(length - crop + stride - 1, 0) // stride + 1
    return [min(index * stride, length - crop) for index in range(num_windows)]


def gaussian_importance_map(crop_size: int | Sequence[int], sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """nnU-Net's Gaussian importance map for a window: `(h, w)` float32, peaking at 1 in the centre
    (between the middle pixels for an even side), > 0 everywhere.

    The standard deviation along each axis is `sigma_scale` times the window side. The map is the
    outer product of two 1D Gaussians (`gaussian_importance_profile`), which is what lets
    `sliding_window_inference` normalise without an `(H, W)` weight buffer.
    """
    crop_h, crop_w = _pair(crop_size, "crop_size")
    profile_h = gaussian_importance_profile(crop_h, sigma_scale)
    profile_w = gaussian_importance_profile(crop_w, sigma_scale)
    return profile_h[:, None] * profile_w[None, :]


def gaussian_importance_profile(length: int, sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """A 1D Gaussian over `length` pixel centres, 1 at the centre, standard deviation `sigma_scale * length`.

    At the window border (4 sigma from the centre for nnU-Net's 1/8) it is exp(-8) ~ 3e-4: small but
    positive, so pixels seen only near a window's border still get a prediction.
    """
    positions = torch.arange(length, dtype=torch.float64) - (length - 1) / 2
    sigma = sigma_scale * length
    return torch.exp(-0.5 * (positions / sigma) ** 2).float()


def _axis_weight_sum(length: int, starts: list[int], profile: torch.Tensor) -> torch.Tensor:
    """Sum over the windows along one axis of their (1D) weight profile: `(length,)` float32."""
    weight_sum = torch.zeros(length, dtype=torch.float32)
    for start in starts:
        weight_sum[start : start + profile.numel()] += profile
    return weight_sum


def _check_num_labels(channels: int, num_labels: int | None) -> int:
    if num_labels is not None and channels != num_labels:
        raise ValueError(f"The model returned {channels} channels, but num_labels={num_labels}.")
    return channels


@torch.inference_mode()
def sliding_window_inference(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    num_labels: int | None = None,
    crop_size: int | Sequence[int] = (518, 518),
    stride: int | Sequence[int] = (345, 345),
    blend: str = "uniform",
    batch_size: int = 1,
    output_size: tuple[int, int] | None = None,
    patch_size: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Segment an image of any size window by window, blending the overlapping window logits.

    Each window's logits are upsampled to the window size and added, weighted, into a float32
    `(num_labels, H, W)` accumulation buffer per image, then divided by the summed weights. Peak
    memory is therefore that buffer (which is the output itself when `output_size` is None) plus
    what the model needs for `batch_size` windows, whatever the image size: the model never sees
    more than `batch_size` windows at once, and no other full-resolution tensor is allocated.

    An image smaller than `crop_size` along an axis is zero-padded at the bottom / right up to the
    crop size (zero is the mean after the processor's normalisation), and the padding is cropped
    from the result. With a single window, the result is plain inference (`forward_logits`).

    Args:
        model: a segmentation model honouring the module's contract (call `model.eval()` first).
        pixel_values: `(B, 3, H, W)`, any `H` and `W`.
        num_labels: the number of channels of the logits; default read from the first window.
        crop_size: `(h, w)` window size (or one int), multiples of `model.size_divisor`: the
            resolution the model was trained at, e.g. 518 for DINOv2 at patch 14.
        stride: `(sh, sw)` step between windows (or one int), at most the crop size so that windows
            overlap or touch; 2/3 of the crop is a common choice.
        blend: `"uniform"` (every window counts the same) or `"gaussian"` (nnU-Net's importance
            map, sigma = 1/8 of the window: smooth seams, less weight on window borders).
        batch_size: windows per forward pass; trades memory for speed.
        output_size: `(H_out, W_out)` to resize the blended logits to (e.g. the original image size
            before the processor resized it); default the input size. When given (or when the
            image is padded), the `(num_labels, H, W)` buffer is a temporary per image, on top of
            the output.
        patch_size: what window sides must be multiples of; default `model.size_divisor`.
        device: where the windows run; default the model's device. The accumulation buffer and the
            result stay on `pixel_values.device`, so a large image can stay in CPU memory while its
            windows run on a GPU.

    Returns:
        float32 logits `(B, num_labels, H_out, W_out)` on `pixel_values.device`.
    """
    patch_size = resolve_size_divisor(model, patch_size)
    (crop_h, crop_w), (stride_h, stride_w) = check_window(crop_size, stride, patch_size)
    if blend not in ("uniform", "gaussian"):
        raise ValueError(f"blend must be 'uniform' or 'gaussian', got {blend!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}.")

    batch, _, height, width = pixel_values.shape
    output_size = tuple(output_size or (height, width))
    buffer_device = pixel_values.device
    device = resolve_device(model, device, buffer_device)

    padded_h, padded_w = max(height, crop_h), max(width, crop_w)
    if (padded_h, padded_w) != (height, width):
        pixel_values = F.pad(pixel_values, (0, padded_w - width, 0, padded_h - height))

    starts_h = sliding_window_starts(padded_h, crop_h, stride_h)
    starts_w = sliding_window_starts(padded_w, crop_w, stride_w)
    windows = [(top, left) for top in starts_h for left in starts_w]

    if blend == "gaussian":
        profile_h, profile_w = gaussian_importance_profile(crop_h), gaussian_importance_profile(crop_w)
        importance = gaussian_importance_map((crop_h, crop_w)).to(buffer_device)
    else:
        profile_h, profile_w = torch.ones(crop_h), torch.ones(crop_w)
        importance = None
    # The windows form a grid and the weights are an outer product, so the summed weight at (y, x)
    # is weight_sum_h[y] * weight_sum_w[x]: two vectors instead of an (H, W) buffer.
    weight_sum_h = _axis_weight_sum(padded_h, starts_h, profile_h).to(buffer_device)
    weight_sum_w = _axis_weight_sum(padded_w, starts_w, profile_w).to(buffer_device)
    # Accumulate straight into the output unless padding or a resize stands in between.
    accumulate_in_output = (padded_h, padded_w) == (height, width) == output_size

    output = None
    for image_index in range(batch):
        image = pixel_values[image_index]  # (3, H_pad, W_pad)
        accumulated = None  # (C, H_pad, W_pad) float32, allocated once C is known
        for first in range(0, len(windows), batch_size):
            chunk = windows[first : first + batch_size]
            crops = torch.stack([image[:, top : top + crop_h, left : left + crop_w] for top, left in chunk])
            window_logits = forward_logits(model, crops.to(device)).to(buffer_device)  # (n, C, crop_h, crop_w)
            if output is None:
                num_labels = _check_num_labels(window_logits.shape[1], num_labels)
                output = torch.zeros(batch, num_labels, *output_size, device=buffer_device)
            if accumulated is None:
                accumulated = (
                    output[image_index]
                    if accumulate_in_output
                    else torch.zeros(num_labels, padded_h, padded_w, device=buffer_device)
                )
            for (top, left), logits in zip(chunk, window_logits):
                target = accumulated[:, top : top + crop_h, left : left + crop_w]
                if importance is None:
                    target.add_(logits)
                else:
                    target.addcmul_(logits, importance)
            # Free this chunk's window logits before the next forward pass, or they add to its peak.
            del crops, window_logits, logits, target
        # Normalise in row strips of one window height, so the (H, W) weight product is never materialised.
        for top in range(0, padded_h, crop_h):
            rows = slice(top, top + crop_h)
            accumulated[:, rows].div_(weight_sum_h[rows, None] * weight_sum_w[None, :])
        if not accumulate_in_output:
            blended = accumulated[None, :, :height, :width]
            output[image_index] = resize(blended, output_size)[0]
        del accumulated
    return output


def _nearest(centres: torch.Tensor, value: float) -> int:
    """Index of the window centre nearest `value` (the first of two equally near)."""
    return int(torch.argmin((centres - value).abs()))


def paste_by_score(masks: Sequence[tuple[int, int, torch.Tensor]], scores: Sequence[float], size: tuple[int, int],
                   overlap_mask_area_threshold: float = 0.8) -> tuple[torch.Tensor, list[int]]:
    """Non-overlapping instances from scored, possibly overlapping masks, by Mask2Former's panoptic rule.

    In descending score order (ties: the earlier mask first) each mask takes its still free pixels, and is dropped
    when they are fewer than `overlap_mask_area_threshold` of its area.

    Args:
        masks: `(top, left, mask)` per instance: a boolean `(h, w)` mask placed with its top-left corner at
            `(top, left)` of the canvas.
        scores: one score per mask.
        size: `(H, W)` of the canvas.
        overlap_mask_area_threshold: the least share of its own area a mask must still find free.

    Returns:
        `(segmentation, kept)`: an `(H, W)` float32 map holding `k` on the pixels of the `k`-th kept mask (counted
        from 0) and -1 elsewhere, and the indices into `masks` of the kept masks, in that order.
    """
    if len(masks) != len(scores):
        raise ValueError(f"Got {len(masks)} masks and {len(scores)} scores; pass one score per mask.")
    segmentation = torch.full(size, -1.0)
    kept = []
    order = sorted(range(len(scores)), key=lambda index: -float(scores[index]))
    for index in order:
        top, left, mask = masks[index]
        height, width = mask.shape
        region = segmentation[top : top + height, left : left + width]
        free = mask & (region < 0)
        area = int(mask.sum())
        if area and int(free.sum()) >= overlap_mask_area_threshold * area:
            region[free] = len(kept)
            kept.append(index)
    return segmentation, kept


@torch.inference_mode()
def sliding_window_instances(
    model: torch.nn.Module,
    processor,
    pixel_values: torch.Tensor,
    crop_size: int | Sequence[int] = (518, 518),
    stride: int | Sequence[int] | None = None,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    batch_size: int = 1,
    input_boxes=None,
    return_binary_maps: bool = False,
    device: torch.device | str | None = None,
) -> list[dict]:
    """Instance segmentation of a large image by a mask transformer (head eomt / pmt), window by window.

    A mask transformer's queries are trained on crops: asked for the whole of a large image at once, a fixed number
    of queries must cover many times more objects over many times more tokens, and they miss most of them. Here
    each window of `crop_size` (the training crop) is segmented on its own by
    `processor.post_process_instance_segmentation`; every detection is kept only by the one window whose centre lies
    nearest its centroid (StarDist's tiling rule), so with windows half a window apart (the default stride) an
    object up to half a window across comes whole from a window that sees all of it, and objects cut by a window's
    border are taken from a neighbour instead. The kept detections are then pasted in descending score order,
    each taking its still free pixels, and dropped when that is under `overlap_mask_area_threshold` of its area
    (Mask2Former's panoptic rule; two windows may find overlapping objects).

    Windows follow `sliding_window_starts` (the last one ends on the border); an image smaller than the window along
    an axis is zero-padded up to it (zero is the mean after the processor's normalisation) and the padding cut.

    Args:
        model: a `ViTSegForUniversalSegmentation` (call `model.eval()` first).
        processor: its `ViTSegImageProcessor` (for the instance post-processing).
        pixel_values: `(B, C, H, W)` processor output, any `H` and `W`.
        crop_size: `(h, w)` window (or one int), multiples of `model.size_divisor`: the crop size the model was
            trained at.
        stride: `(sh, sw)` step between windows (or one int), at most the window; default half the window.
        threshold, mask_threshold: as `post_process_instance_segmentation`'s, per window.
        overlap_mask_area_threshold: the least share of its area a detection must find free when pasted.
        batch_size: windows per forward pass.
        input_boxes: the processor's `input_boxes` `(B, 4)` (`top, left, height, width` of each image in the padded
            `pixel_values`): only that box is segmented and the results cover it exactly. Default the whole input.
        return_binary_maps: return every kept detection's `(N, H, W)` boolean mask (before pasting, so they may
            overlap: what mask AP scores) instead of the id map.
        device: where the windows run; default the model's device. Results stay on the CPU.

    Returns:
        `list[dict]`, one per image, in `post_process_instance_segmentation`'s format: `segmentation`, an `(H, W)`
        float32 map of instance ids (-1 where no instance lies), or the `(N, H, W)` masks; `segments_info`, a list of
        `{"id", "label_id", "was_fused": False, "score"}` (`id` the instance's value in the map, or its mask's index).
        `(H, W)` is the image's box in `pixel_values`.
    """
    divisor = resolve_size_divisor(model, None)
    crop = _pair(crop_size, "crop_size")
    stride = tuple(max(1, side // 2) for side in crop) if stride is None else stride
    (crop_h, crop_w), (stride_h, stride_w) = check_window(crop, stride, divisor)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be (B, C, H, W), got shape {tuple(pixel_values.shape)}.")
    if not 0 <= overlap_mask_area_threshold <= 1:
        raise ValueError(f"overlap_mask_area_threshold must lie in [0, 1], got {overlap_mask_area_threshold}.")
    batch, _, canvas_h, canvas_w = pixel_values.shape
    if input_boxes is None:
        boxes = [(0, 0, canvas_h, canvas_w)] * batch
    else:
        boxes = [tuple(int(v) for v in box) for box in (input_boxes.tolist() if hasattr(input_boxes, "tolist")
                                                         else input_boxes)]
        if len(boxes) != batch or any(len(box) != 4 for box in boxes):
            raise ValueError(f"input_boxes must be {batch} (top, left, height, width) rows, one per image.")
        for top, left, height, width in boxes:
            if top < 0 or left < 0 or height < 1 or width < 1 or top + height > canvas_h or left + width > canvas_w:
                raise ValueError(f"input box {(top, left, height, width)} does not lie in the {canvas_h}x{canvas_w} "
                                 "pixel_values.")
    parameter = next(model.parameters())
    device = resolve_device(model, device, pixel_values.device)
    results = []
    for index, (top, left, height, width) in enumerate(boxes):
        image = pixel_values[index, :, top : top + height, left : left + width]
        padded_h, padded_w = max(height, crop_h), max(width, crop_w)
        if (padded_h, padded_w) != (height, width):
            image = F.pad(image, (0, padded_w - width, 0, padded_h - height))
        starts_h = sliding_window_starts(padded_h, crop_h, stride_h)
        starts_w = sliding_window_starts(padded_w, crop_w, stride_w)
        centres_h = torch.tensor(starts_h, dtype=torch.float64) + (crop_h - 1) / 2
        centres_w = torch.tensor(starts_w, dtype=torch.float64) + (crop_w - 1) / 2
        windows = [(row, column) for row in range(len(starts_h)) for column in range(len(starts_w))]
        detections, scores, infos = [], [], []  # (y0, x0, cut mask) in image coordinates; score; segments_info
        for first in range(0, len(windows), batch_size):
            chunk = windows[first : first + batch_size]
            crops = torch.stack([image[:, starts_h[r] : starts_h[r] + crop_h, starts_w[c] : starts_w[c] + crop_w]
                                 for r, c in chunk])
            outputs = model(pixel_values=crops.to(device, parameter.dtype))
            found = processor.post_process_instance_segmentation(
                outputs, threshold=threshold, mask_threshold=mask_threshold, return_binary_maps=True,
                target_sizes=[(crop_h, crop_w)] * len(chunk))
            for (row, column), result in zip(chunk, found):
                if not result["segments_info"]:
                    continue
                y0, x0 = starts_h[row], starts_w[column]
                # the part of the window inside the image (not its zero padding)
                masks = result["segmentation"].bool().cpu()[:, : height - y0, : width - x0]
                for mask, info in zip(masks, result["segments_info"]):
                    ys, xs = mask.nonzero(as_tuple=True)
                    if ys.numel() == 0 or (_nearest(centres_h, y0 + ys.double().mean().item()) != row
                                           or _nearest(centres_w, x0 + xs.double().mean().item()) != column):
                        continue  # empty inside the image, or another window's: the one nearest its centroid
                    r0, r1, c0, c1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
                    detections.append((y0 + r0, x0 + c0, mask[r0:r1, c0:c1].clone()))
                    scores.append(float(info["score"]))
                    infos.append({"label_id": int(info["label_id"]), "was_fused": False, "score": info["score"]})
        if return_binary_maps:
            order = sorted(range(len(scores)), key=lambda i: -scores[i])
            maps = torch.zeros(len(order), height, width, dtype=torch.bool)
            for number, i in enumerate(order):
                y, x, mask = detections[i]
                maps[number, y : y + mask.shape[0], x : x + mask.shape[1]] = mask
            results.append({"segmentation": maps,
                            "segments_info": [{"id": n, **infos[i]} for n, i in enumerate(order)]})
            continue
        segmentation, kept = paste_by_score(detections, scores, (height, width), overlap_mask_area_threshold)
        results.append({"segmentation": segmentation, "segments_info": [{"id": n, **infos[i]}
                                                                         for n, i in enumerate(kept)]})
    return results
