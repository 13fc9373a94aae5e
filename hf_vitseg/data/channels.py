"""Images with any number of channels: reading TIFF files, and per-channel statistics of a training set.

- `read_image_file(path)`: an image file, fully decoded. TIFF files (`.tif`, `.tiff`) are read with tifffile (the
  optional extra `hf-vitseg[tiff]`) into a NumPy array with every channel and the file's own dtype (uint8, uint16,
  float32, ...), never converted to RGB: multispectral and 16-bit microscopy stacks stay as they are. Without
  tifffile, a TIFF that PIL can read (grayscale, RGB) is read with PIL; any other asks for the extra. Other formats
  are read with PIL (EXIF orientation applied).
- `decode_image(value)`: a dataset value (`{"path", "bytes"}` as `datasets.Image(decode=False)` stores it, a PIL
  image, an array or a nested list) -> a PIL image or an array, by the same rule. `load_image_folder` keeps TIFF
  images undecoded, so the training transform, the dataset check and evaluation decode them here.
- `channel_statistics(dataset, processor)`: the per-channel mean and standard deviation of the training images,
  on the scale the processor normalises on (after rescaling, [0, 1]), from one pass over the images: what
  `hf-vitseg train --image-stats auto` sets as the model's `image_mean` / `image_std`.

The channel layout of an array (channels-last or channels-first) is the image processor's rule
(`ViTSegImageProcessor`, "Input conversion"); tifffile returns `(H, W)`, `(H, W, C)` for interleaved samples and
`(C, H, W)` for planar ones or page stacks, all of which the processor reads.
"""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})
# The first four bytes of a TIFF (little / big endian) or BigTIFF file.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_TIFF_EXTRA = "pip install 'hf-vitseg[tiff]' (tifffile)"


def is_tiff(path: str | os.PathLike) -> bool:
    """Whether `path` names a TIFF file, by its extension."""
    return Path(path).suffix.lower() in TIFF_EXTENSIONS


def read_tiff(source: str | os.PathLike | bytes) -> np.ndarray:
    """A TIFF file (a path or its bytes) as a NumPy array with all its channels, in the file's dtype.

    Raises:
        ImportError: tifffile is not installed and PIL cannot read the file either (the message says how to
            install the extra).
        ValueError: a file that is not a readable TIFF, naming it.
    """
    name = "TIFF bytes" if isinstance(source, bytes) else str(source)
    try:
        import tifffile
    except ImportError:
        return _read_tiff_with_pil(source, name)
    try:
        return np.asarray(tifffile.imread(BytesIO(source) if isinstance(source, bytes) else source))
    except (ValueError, OSError, tifffile.TiffFileError) as error:
        raise ValueError(f"Cannot decode TIFF image {name}: {error}") from error


def _read_tiff_with_pil(source, name: str) -> np.ndarray:
    """Without tifffile: the TIFFs PIL reads faithfully (one page; one band, or 8 bits per sample), else an
    ImportError. PIL reads a multi-channel stack as its first page and 16-bit RGBA as 8 bits, silently."""
    problem = None
    try:
        with Image.open(BytesIO(source) if isinstance(source, bytes) else source) as image:
            bits = image.tag_v2.get(258, (8,)) if hasattr(image, "tag_v2") else (8,)
            bits = bits if isinstance(bits, tuple) else (bits,)
            if getattr(image, "n_frames", 1) != 1:
                problem = f"it holds {image.n_frames} pages or planes"
            elif len(image.getbands()) > 1 and any(int(b) != 8 for b in bits):
                problem = f"{len(image.getbands())} channels of {max(int(b) for b in bits)} bits"
            else:
                image.load()
                return np.array(image)
    except Exception as error:  # PIL reads only a few TIFF layouts (no 2 or 5+ channels, few float ones)
        problem = str(error)
    raise ImportError(f"Reading the TIFF image {name} needs tifffile, which is not installed (PIL cannot read it "
                      f"faithfully: {problem}); {_TIFF_EXTRA}.")


def read_image_file(path: str | os.PathLike) -> Image.Image | np.ndarray:
    """An image file, fully decoded: a NumPy array for TIFF (all channels, the file's dtype), else a PIL image
    (EXIF orientation applied). NaN or infinite pixels are refused.

    Raises:
        FileNotFoundError: no such file. ValueError: a folder, an undecodable file, or non-finite pixels (named).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an image; give image files (e.g. {path}/*.png).")
    if not path.is_file():
        raise FileNotFoundError(f"Image {path} does not exist.")
    if is_tiff(path):
        image = read_tiff(path)
        pixels = image
    else:
        try:
            with Image.open(path) as opened:
                opened.load()  # decode now: a truncated file fails here, not halfway through a run
                image = ImageOps.exif_transpose(opened)
        except Exception as error:  # UnidentifiedImageError, OSError (truncated), DecompressionBombError, ...
            raise ValueError(f"Cannot decode image {path}: {error}") from error
        pixels = np.asarray(image) if image.mode.startswith("F") else None
    if pixels is not None and pixels.dtype.kind in "fc" and not np.isfinite(pixels).all():
        # one NaN makes every logit NaN and the whole prediction class 0
        count = int((~np.isfinite(pixels)).sum())
        raise ValueError(f"Image {path} holds {count} non-finite pixel value(s) (NaN or infinite); replace them "
                         "(e.g. with 0) first.")
    return image


def decode_image(value):
    """A dataset value -> a PIL image or a NumPy array: `{"path", "bytes"}` (undecoded `datasets.Image`) is read
    (TIFF with tifffile, see `read_image_file`), a nested list becomes an array, anything else is returned as is."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            if bytes(data[:4]) in _TIFF_MAGIC:
                return read_tiff(bytes(data))
            import datasets

            return datasets.Image().decode_example(value)
        if path:
            return read_image_file(path)
        raise ValueError(f"An image value without a path or bytes: {value!r}.")
    if isinstance(value, list):
        return np.asarray(value)
    return value


def channel_statistics(dataset, processor, max_samples: int | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of a dataset's images, as the model sees them before normalising.

    Every image is converted by `processor.process_image` (its channel count and dtype rule) and rescaled by
    `processor.rescale_factor` (when `do_rescale`), so the result is on the scale `image_mean` / `image_std`
    are applied on; statistics are pooled over all pixels of all images (float64 sums, one pass).

    Args:
        dataset: a `datasets.Dataset` with an `image` column (any transform set on it is bypassed), or a list of
            images.
        processor (`ViTSegImageProcessor`): with the model's `num_channels`.
        max_samples (`int`, *optional*): use only the first `max_samples` images.

    Returns:
        `(mean, std)`, each a list of `processor.num_channels` floats; a std of 0 (a constant channel) becomes 1,
        so normalising never divides by 0.

    Raises:
        ValueError: no image, or an image the processor refuses (named by its index).
    """
    if hasattr(dataset, "with_format"):
        raw = dataset.with_format(None)
        features = getattr(raw, "features", None) or {}
        import datasets

        if isinstance(features.get("image"), datasets.Image):
            raw = raw.cast_column("image", datasets.Image(decode=False))
        images = (row["image"] for row in raw)
    else:
        images = iter(dataset)
    total = total_sq = None
    count = 0
    scale = float(processor.rescale_factor) if processor.do_rescale else 1.0
    for index, value in enumerate(images):
        if max_samples is not None and index >= max_samples:
            break
        try:
            image = processor.process_image(decode_image(value)).astype(np.float64) * scale  # (C, H, W)
        except (ValueError, TypeError) as error:
            raise ValueError(f"Image {index} of the training set: {error}") from error
        pixels = image.reshape(image.shape[0], -1)
        total = pixels.sum(axis=1) if total is None else total + pixels.sum(axis=1)
        total_sq = (pixels**2).sum(axis=1) if total_sq is None else total_sq + (pixels**2).sum(axis=1)
        count += pixels.shape[1]
    if count == 0:
        raise ValueError("No images to compute channel statistics from: the training set is empty.")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std[std <= 1e-12] = 1.0
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


__all__ = ["TIFF_EXTENSIONS", "channel_statistics", "decode_image", "is_tiff", "read_image_file", "read_tiff"]
