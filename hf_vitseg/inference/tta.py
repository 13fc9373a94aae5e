"""Test-time augmentation: multi-scale and horizontal-flip inference, averaged in probability space."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from ..modeling.head_base import resize
from .sliding_window import (
    forward_logits,
    resolve_device,
    resolve_size_divisor,
    sliding_window_inference,
)


def _view_logits(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    scale: float,
    patch_size: int,
    sliding_window: dict | None,
    device: torch.device,
) -> torch.Tensor:
    """Logits `(B, C, H, W)` of one rescaled view, brought back to the input size `(H, W)`."""
    height, width = pixel_values.shape[-2:]
    image = pixel_values
    if scale != 1.0:
        image = resize(image, (max(1, round(height * scale)), max(1, round(width * scale))))
    scaled_h, scaled_w = image.shape[-2:]
    if sliding_window is not None:
        # Windows have the crop size whatever the image size, so no padding to a patch multiple here.
        logits = sliding_window_inference(model, image, patch_size=patch_size, device=device, **sliding_window)
    else:
        padded = F.pad(image, (0, -scaled_w % patch_size, 0, -scaled_h % patch_size))
        logits = forward_logits(model, padded.to(device)).to(image.device)[..., :scaled_h, :scaled_w]
    return resize(logits, (height, width))


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    sliding_window: dict | None = None,
    patch_size: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Predict with multi-scale and flip test-time augmentation, averaging softmax probabilities.

    Every view (each scale, and its horizontal mirror when `flip`) is predicted at the input size:
    the image is rescaled bilinearly (`align_corners=False`), then either zero-padded at the bottom
    / right to a multiple of `model.size_divisor` for plain inference, the padding cropped from the logits, or run
    through `sliding_window_inference`, whose windows need no such padding; the logits are resized
    back to `(H, W)` and, for a mirrored view, flipped back. The views are then averaged as
    **probabilities**, not logits: a view that is unsure cannot outvote a confident one by the scale
    of its logits, which is mmsegmentation's convention too.

    Convention: the result is the log of the averaged probabilities, `log(mean_v softmax(logits_v))`,
    computed stably with `logaddexp`. These are valid logits: `softmax` of them is the averaged
    probability, `argmax` over dim 1 is the TTA prediction, and they go straight into the image
    processor's post-processing. With `scales=(1.0,)` and `flip=False` the result is exactly
    `log_softmax(forward_logits(model, pixel_values), dim=1)`.

    Args:
        model: a segmentation model (`model(pixel_values=x).logits`, coarse logits); call `model.eval()`.
        pixel_values: `(B, 3, H, W)`, any `H` and `W`.
        scales: image scale factors, e.g. `(0.75, 1.0, 1.25)`.
        flip: also predict the horizontally mirrored image of every scale.
        sliding_window: `None` for plain inference of each whole view, or the keyword arguments of
            `sliding_window_inference` (`crop_size`, `stride`, `blend`, optionally `batch_size`).
        patch_size: what view sides are padded to multiples of; default `model.size_divisor`.
        device: where the model runs; default the model's device. The result stays on
            `pixel_values.device`.

    Returns:
        float32 log-probabilities `(B, num_labels, H, W)` on `pixel_values.device`.
    """
    if not scales or any(scale <= 0 for scale in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}.")
    patch_size = resolve_size_divisor(model, patch_size)
    device = resolve_device(model, device, pixel_values.device)
    views = [(scale, mirrored) for scale in scales for mirrored in ((False, True) if flip else (False,))]

    log_prob_sum = None  # log of the summed probabilities, (B, C, H, W)
    for scale, mirrored in views:
        image = pixel_values.flip(-1) if mirrored else pixel_values
        log_probs = _view_logits(model, image, scale, patch_size, sliding_window, device).log_softmax(dim=1)
        if mirrored:
            log_probs = log_probs.flip(-1)
        if log_prob_sum is None:
            log_prob_sum = log_probs
        else:
            torch.logaddexp(log_prob_sum, log_probs, out=log_prob_sum)
    return log_prob_sum.sub_(math.log(len(views)))
