"""Real benchmark data that cannot leak: the stardist nuclei image split into a training and a test half.

The split, tiling and normalisation live in `hf_vitseg/demo/nuclei.py` (shared with `hf-vitseg demo`, which
describes the steps) and are re-exported here: the 512 x 512 nuclei image is cut down the middle, models train on
tiles of the LEFT half and are tested on the whole RIGHT half, and nothing (resampling, normalisation statistics,
tiles) ever mixes pixels of both halves.

The quokka photo with its polygon (imgaug's `quokka.jpg`) is a one-image sanity case: a model that cannot
fit one clear, large object in one photo is broken, whatever its nuclei score.

```python
from benchmarks.data import nuclei_split, otsu_threshold
split = nuclei_split(scale=2)
tiles = split.train_tiles(tile=224, stride=112)    # [(image (224, 224) float32, mask (224, 224) uint8), ...]
split.test_image.shape                              # (1024, 512): the right half at 2x
```
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hf_vitseg.demo.nuclei import (
    Normalisation,
    NucleiSplit,
    nuclei_split,
    resample,
    tile_starts,
)

__all__ = [
    "Normalisation",
    "NucleiSplit",
    "QuokkaCase",
    "foreground_iou",
    "nuclei_split",
    "otsu_threshold",
    "patch_grid_ceiling",
    "quokka_case",
    "resample",
    "tile_starts",
]


# --------------------------------------------------------------------------------------------------
# the quokka sanity case
# --------------------------------------------------------------------------------------------------


@dataclass
class QuokkaCase:
    """One RGB photo (float32 `(H, W, 3)` in [0, 1]) and its object mask (uint8, 1 = quokka)."""

    image: np.ndarray
    mask: np.ndarray


def quokka_case(size: int | None = 448, image: np.ndarray | None = None, mask: np.ndarray | None = None) -> QuokkaCase:
    """imgaug's quokka photo with its polygon mask, resized so its shorter side is `size` (None: as is).

    `image` / `mask` default to `hf_vitseg.demo.assets.load_quokka()` (the imgaug 0.4.0 wheel, fetched from the
    package registry once and cached).
    """
    if image is None or mask is None:
        from hf_vitseg.demo.assets import load_quokka

        image, mask = load_quokka()
    rgb = np.asarray(image, dtype=np.float32) / (255.0 if np.asarray(image).dtype == np.uint8 else 1.0)
    mask = np.asarray(mask).astype(np.uint8)
    if size is not None:
        scale = size / min(mask.shape)
        rgb = np.stack([resample(rgb[..., c], scale, nearest=False) for c in range(3)], axis=-1).clip(0, 1)
        mask = resample(mask, scale, nearest=True)
    return QuokkaCase(rgb, mask)


# --------------------------------------------------------------------------------------------------
# two reference predictors that need no network: Otsu and the patch-grid ceiling
# --------------------------------------------------------------------------------------------------


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] | None = None) -> float:
    """Otsu's threshold (Otsu, IEEE Trans. SMC 1979): the cut of the histogram of `values` that maximises the
    between-class variance `w0 * w1 * (mu0 - mu1) ** 2`. Returns the upper edge of the last bin of the lower
    class (the middle cut when empty bins make several cuts equal): `values > threshold` is the bright class."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("Otsu needs at least one value.")
    low, high = value_range or (float(values.min()), float(values.max()))
    if not high > low:
        return low
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(counts)  # pixels at or below each cut
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean0 = sum0 / weight0
        mean1 = (sum0[-1] - sum0) / weight1
        between = weight0 * weight1 * (mean0 - mean1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)  # the last cut leaves the upper class empty
    # Empty bins between the classes give a plateau of equal cuts: take its middle, not its first bin.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-12))
    plateau = best[best <= best[0] + np.argmin(np.diff(np.append(best, -1)) == 1)]
    return float(edges[int(plateau[len(plateau) // 2]) + 1])


def patch_grid_ceiling(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """The ground truth taken down to the patch grid and back: the best a head that decides per patch can do.

    Each `patch_size` square gets its foreground fraction (partial squares at the border: the fraction of their
    pixels inside the image); the grid of fractions is upsampled bilinearly (`align_corners=False`, as the
    models' logits are) to the pixel grid and thresholded at 1/2. Returns a uint8 mask of `mask`'s shape.
    """
    import torch
    from torch.nn import functional as F

    mask = np.asarray(mask)
    height, width = mask.shape
    grid_h, grid_w = -(-height // patch_size), -(-width // patch_size)
    padded = np.zeros((grid_h * patch_size, grid_w * patch_size), np.float64)
    inside = np.zeros_like(padded)
    padded[:height, :width] = mask > 0
    inside[:height, :width] = 1.0
    blocks = (grid_h, patch_size, grid_w, patch_size)
    fraction = padded.reshape(blocks).sum((1, 3)) / inside.reshape(blocks).sum((1, 3))
    upsampled = F.interpolate(
        torch.from_numpy(fraction)[None, None], size=padded.shape, mode="bilinear", align_corners=False
    )[0, 0, :height, :width].numpy()
    return (upsampled > 0.5).astype(np.uint8)


def foreground_iou(prediction: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """`(foreground IoU, mean IoU over background and foreground)` of two binary masks."""
    prediction, truth = np.asarray(prediction) > 0, np.asarray(truth) > 0
    ious = []
    for p, t in ((prediction, truth), (~prediction, ~truth)):
        union = np.logical_or(p, t).sum()
        ious.append(float(np.logical_and(p, t).sum() / union) if union else float("nan"))
    return ious[0], float(np.nanmean(ious))
