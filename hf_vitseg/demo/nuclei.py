"""The nuclei sample's leak-free split, tiling and normalisation: one home for `hf-vitseg demo` and `benchmarks/`.

The 512 x 512 fluorescence-nuclei image (BBBC038 / 2018 Data Science Bowl, shipped in hf-vitseg as
`hf_vitseg.demo.assets.load_nuclei_sample`) is cut down the middle: models train on tiles of the LEFT half and
are tested on the whole RIGHT half. The two halves are separated *before* anything else happens to them, so
no resampling filter, normalisation statistic or tile ever mixes pixels of both:

1. split the uint16 image and its mask into columns `[0, W/2)` and `[W/2, W)`;
2. fit the intensity normalisation on the left half only (its 1st and 99.5th percentiles map to 0 and 1,
   clipped) and apply that same mapping to both halves (the right half is dimmer: it stays dimmer);
3. resample each half on its own by `scale` (bilinear image, nearest-neighbour mask): nuclei span about
   1.5 patches of 14 pixels at the native scale, so 2x gives a patch-based model a fairer chance;
4. tile the left half (tiles of `tile` pixels, `stride` apart, the last row and column moved back to end on
   the border) for training.

```python
from hf_vitseg.demo.nuclei import nuclei_split
split = nuclei_split(scale=2)
tiles = split.train_tiles(tile=224, stride=112)    # [(image (224, 224) float32, mask (224, 224) uint8), ...]
split.test_image.shape                              # (1024, 512): the right half at 2x
```
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Normalisation", "NucleiSplit", "nuclei_split", "resample", "tile_starts", "write_nuclei_folders"]


@dataclass(frozen=True)
class Normalisation:
    """16-bit intensities -> [0, 1]: `clip((x - low) / (high - low), 0, 1)`, fitted on the training half only."""

    low: float
    high: float
    percentiles: tuple[float, float] = (1.0, 99.5)

    @classmethod
    def fit(cls, reference: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.5)) -> Normalisation:
        """The mapping whose `percentiles` of `reference` (the training half) become 0 and 1."""
        low, high = np.percentile(np.asarray(reference, dtype=np.float64), percentiles)
        if not high > low:
            raise ValueError(f"The training half is flat (percentiles {percentiles} both {low}); cannot normalise.")
        return cls(float(low), float(high), tuple(percentiles))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return np.clip((image.astype(np.float32) - self.low) / (self.high - self.low), 0.0, 1.0)


def resample(array: np.ndarray, scale: float, nearest: bool) -> np.ndarray:
    """Resize a 2-D array by `scale` with PIL: bilinear in float32 for images, nearest for label maps."""
    from PIL import Image

    if scale == 1:
        return array.copy()
    height, width = array.shape
    size = (round(width * scale), round(height * scale))
    if nearest:
        if array.min() < 0 or array.max() > 255:
            raise ValueError("Label maps to resample must hold values in [0, 255].")
        return np.asarray(Image.fromarray(array.astype(np.uint8)).resize(size, Image.NEAREST)).astype(array.dtype)
    return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of `tile` pixels `stride` apart covering `[0, length)`, the last one ending on the
    border (mmsegmentation's sliding-window grid)."""
    if tile > length:
        raise ValueError(f"A tile of {tile} pixels does not fit in {length}; lower --crop or raise --scale.")
    if not 0 < stride <= tile:
        raise ValueError(f"stride must lie in (0, tile={tile}], got {stride}.")
    from ..inference.sliding_window import sliding_window_starts

    return sliding_window_starts(length, tile, stride)


@dataclass
class NucleiSplit:
    """The nuclei image's left (training) and right (test) halves, normalised and resampled independently.

    Attributes:
        scale: the resampling factor applied to each half.
        train_image / test_image: float32 `(H, W)` in [0, 1] (training-half statistics for both).
        train_mask / test_mask: uint8 `(H, W)`, 1 = nucleus.
        normalisation: the intensity mapping, fitted on the raw training half.
        columns: the raw image's column ranges `{"train": (0, W/2), "test": (W/2, W)}` at the native scale.
    """

    scale: float
    train_image: np.ndarray
    train_mask: np.ndarray
    test_image: np.ndarray
    test_mask: np.ndarray
    normalisation: Normalisation
    columns: dict = field(default_factory=dict)

    def train_tiles(self, tile: int, stride: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """`(image, mask)` tiles of the training half, `stride` (default `tile // 2`) apart, covering it all."""
        stride = stride or tile // 2
        height, width = self.train_image.shape
        return [
            (self.train_image[y : y + tile, x : x + tile], self.train_mask[y : y + tile, x : x + tile])
            for y in tile_starts(height, tile, stride)
            for x in tile_starts(width, tile, stride)
        ]

    def describe(self) -> dict:
        """Plain data for a results file."""
        return {
            "scale": self.scale,
            "train_shape": list(self.train_image.shape),
            "test_shape": list(self.test_image.shape),
            "raw_columns": {k: list(v) for k, v in self.columns.items()},
            "normalisation": {"low": self.normalisation.low, "high": self.normalisation.high,
                              "percentiles": list(self.normalisation.percentiles), "fitted_on": "train half"},
            "train_foreground": float(self.train_mask.mean()),
            "test_foreground": float(self.test_mask.mean()),
        }


def nuclei_split(
    scale: float = 1.0,
    image: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    region: int | None = None,
) -> NucleiSplit:
    """The leak-free split of the nuclei image (see the module docstring).

    Args:
        scale: resampling factor of each half (1 = native, 2 = twice the size).
        image / mask: a uint16 `(H, W)` image and its boolean foreground; default the shipped nuclei sample.
        region: use only the central `region x region` pixels of the image (quick runs and tests).
    """
    if image is None or mask is None:
        from .assets import load_nuclei_sample

        image, mask = load_nuclei_sample()
    image, mask = np.asarray(image), np.asarray(mask)
    if image.ndim != 2 or image.shape != mask.shape:
        raise ValueError(f"Expected a 2-D image and a mask of its shape, got {image.shape} and {mask.shape}.")
    if region is not None:
        height, width = image.shape
        if region > min(height, width):
            raise ValueError(f"region {region} is larger than the image {image.shape}.")
        top, left = (height - region) // 2, (width - region) // 2
        image, mask = image[top : top + region, left : left + region], mask[top : top + region, left : left + region]
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}.")
    half = image.shape[1] // 2
    train_raw, test_raw = image[:, :half], image[:, half:]
    train_mask, test_mask = mask[:, :half].astype(np.uint8), mask[:, half:].astype(np.uint8)
    normalisation = Normalisation.fit(train_raw)  # statistics of the training half only
    return NucleiSplit(
        scale=scale,
        train_image=resample(normalisation(train_raw), scale, nearest=False),
        train_mask=resample(train_mask, scale, nearest=True),
        test_image=resample(normalisation(test_raw), scale, nearest=False),
        test_mask=resample(test_mask, scale, nearest=True),
        normalisation=normalisation,
        columns={"train": (0, half), "test": (half, image.shape[1])},
    )


def write_nuclei_folders(dest, scale: float = 2.0, tile: int = 224, region: int | None = None) -> dict:
    """The nuclei split as image folders, the layout `hf-vitseg train` and `hf-vitseg compare` read:
    `dest/train/{images,masks}` (tiles of the left half, `tile // 2` apart) and `dest/eval/{images,masks}` (tiles
    of the right half, `tile` apart, the last ones moved back to end on the border); 8-bit grey PNG images
    (the [0, 1] intensities x 255) and PNG masks (0 background, 1 nucleus). Refuses a `dest` that holds files.

    Returns:
        `{"train": count, "eval": count}`.
    """
    from pathlib import Path

    from PIL import Image

    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} already holds files; choose an empty or new folder.")
    split = nuclei_split(scale, region=region)
    height, width = split.test_image.shape
    eval_tiles = [(split.test_image[y : y + tile, x : x + tile], split.test_mask[y : y + tile, x : x + tile])
                  for y in tile_starts(height, tile, tile) for x in tile_starts(width, tile, tile)]
    counts = {}
    for role, tiles in (("train", split.train_tiles(tile)), ("eval", eval_tiles)):
        for kind in ("images", "masks"):
            (dest / role / kind).mkdir(parents=True, exist_ok=True)
        for i, (image, mask) in enumerate(tiles):
            Image.fromarray(np.round(image * 255).astype(np.uint8)).save(dest / role / "images" / f"{i:03d}.png")
            Image.fromarray(mask.astype(np.uint8)).save(dest / role / "masks" / f"{i:03d}.png")
        counts[role] = len(tiles)
    return counts
