"""The web app of `hf-vitseg app`: a Gradio page to try a segmentation model on one's own images.

Upload an image and the page shows the overlay with its legend (the picture `hf-vitseg predict` writes), a table of
the area of every class present (pixels and share of the image), and a download of the label map (a PNG of class
ids, 8-bit, or 16-bit beyond 256 labels, as `predict` writes). Prediction is `predict`'s: the same decoding
(`read_image`: EXIF orientation, NaN refused), the same processor, the padding cut away exactly, and sliding windows
for an image too large for one pass (`MAX_PLAIN_TOKENS`) or always with `sliding_window=`. The model is loaded
once, by `hub.loading.load_model`.

The page works offline: Gradio serves its own scripts and fonts (no CDN), analytics are switched off
(`GRADIO_ANALYTICS_ENABLED=False` and `analytics_enabled=False`), server-side rendering (a Node server) is off.
Gradio is an optional dependency: `pip install "hf-vitseg[app]"`; it is imported only when a page is built.

The same app is what `hf-vitseg push --space` deploys to a Hugging Face Space (`hf_vitseg.hub.space`), where
`SegmentationApp.from_pretrained(repo_id, trust_remote_code=True)` loads the model with the code it was pushed with.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

# Gradio reads this when it is imported: no usage reports, no version check against the network.
ANALYTICS_ENVIRONMENT = {"GRADIO_ANALYTICS_ENABLED": "False"}
AREA_COLUMNS = ["class id", "class", "colour", "pixels", "area %"]


def import_gradio():
    """`gradio`, with analytics off; an `ImportError` saying how to install it when it is missing."""
    for name, value in ANALYTICS_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    try:
        import gradio
    except ImportError as error:
        raise ImportError(
            'The web app needs Gradio, an optional dependency: pip install "hf-vitseg[app]" (or pip install gradio).'
        ) from error
    return gradio


@dataclass
class AppPrediction:
    """What the page shows for one image.

    Attributes:
        label_map: `(H, W)` class ids, the image's size.
        overlay: the image blended with the class colours, with the legend strip below (`inference.overlay`).
        areas: one row per class present, largest first: `[class id, name, "#rrggbb", pixels, percent]`
            (`AREA_COLUMNS`); the colour is the class's colour in `overlay`.
        label_map_file: the label map saved as a PNG (`cli.predict.label_map_image`), for the download.
        seconds: the time the prediction took.
    """

    label_map: np.ndarray
    overlay: Image.Image
    areas: list[list]
    label_map_file: Path
    seconds: float


def class_areas(label_map: np.ndarray, id2label=None, colors=None) -> list[list]:
    """The area of every class present in `label_map`, largest first: `[class id, name, colour, pixels, percent]`.

    Args:
        label_map: `(H, W)` class ids.
        id2label: class names (`model.config.id2label`, keys int or str); default the ids.
        colors: `{class id: (r, g, b)}` for the colour column (`"#rrggbb"`); default an empty string.
    """
    labels = np.asarray(label_map)
    ids, counts = np.unique(labels, return_counts=True)
    total = labels.size
    names = {int(key): str(value) for key, value in (id2label or {}).items()}
    rows = []
    for class_id, count in sorted(zip(ids.tolist(), counts.tolist()), key=lambda item: (-item[1], item[0])):
        color = (colors or {}).get(class_id)
        rows.append([class_id, names.get(class_id, str(class_id)), "#%02x%02x%02x" % tuple(color) if color else "",
                     count, round(100.0 * count / total, 2)])
    return rows


class SegmentationApp:
    """A loaded model behind the web page: `predict(image)` for one image, `build()` for the Gradio page.

    Args:
        model: a `ViTSegForSemanticSegmentation` in eval mode (e.g. from `hub.loading.load_model`), or a
            `ViTSegForUniversalSegmentation` (eomt / pmt: its semantic segmentation of whole images).
        processor: its image processor (`hub.loading.load_image_processor`).
        sliding_window: window settings (`{"crop_size", "stride", "blend", "batch_size"}`) to predict every image
            window by window, or None for one pass.
        large_image_window: the window settings used for an image of more than `cli.predict.MAX_PLAIN_TOKENS` patch
            tokens when `sliding_window` is None (None: always one pass).
        device: where the model runs (default: where its weights are).
        alpha: the weight of the class colours in the overlay.
        title: the page's title (default: the model's name).
    """

    def __init__(self, model, processor, *, sliding_window=None, large_image_window=None, device=None,
                 alpha: float = 0.5, title: str | None = None):
        self.model = model
        self.processor = processor
        self.sliding_window = sliding_window
        self.large_image_window = large_image_window
        self.device = device
        self.alpha = alpha
        self.title = title or f"hf-vitseg: {getattr(model, 'name_or_path', '') or 'segmentation'}"
        # the label maps offered for download, one subfolder per prediction (two users may upload "image.png");
        # removed when the process exits (a result's file outlives the app object that made it)
        self.output_dir = Path(tempfile.mkdtemp(prefix="hf_vitseg_app_"))
        atexit.register(shutil.rmtree, self.output_dir, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, device=None, sliding_window: bool = False,
                        crop_size=None, stride=None, blend: str = "gaussian", window_batch_size: int = 1,
                        trust_remote_code: bool = False, **kwargs) -> SegmentationApp:
        """Load the model saved at `source` (a folder or a Hub repo id) with `hub.loading.load_model` and its
        processor, with `predict`'s sliding-window defaults (the backbone's image size, rounded down to the patch
        size; stride 2/3 of the window) unless `crop_size` / `stride` are given.

        Args:
            source: the model's folder or Hub repo id.
            device: e.g. "cuda" or "cpu" (default: stay on the CPU).
            sliding_window: predict every image window by window (else only images too large for one pass).
            crop_size, stride: window height and width, as lists of one or two ints (`--crop-size`, `--stride`).
            blend: "gaussian" or "uniform" averaging of overlapping windows.
            window_batch_size: windows per forward pass.
            trust_remote_code: load the model with the code saved beside it (what a Space does).
            kwargs: `SegmentationApp`'s `alpha`, `title`.
        """
        from ..cli.predict import _sliding_window_settings
        from ..hub.loading import load_image_processor, load_model

        model = load_model(source, device=device, trust_remote_code=trust_remote_code)
        processor = load_image_processor(source, model)
        flags = SimpleNamespace(sliding_window=sliding_window, crop_size=crop_size, stride=stride, blend=blend,
                                window_batch_size=window_batch_size)
        if getattr(model.config, "is_mask_transformer", False):  # whole images only (predict_label_map)
            if sliding_window or crop_size or stride:
                raise ValueError("sliding_window is for pixel heads: a mask transformer (head eomt / pmt) predicts "
                                 "whole images. Drop --sliding-window, --crop-size and --stride.")
            windows = None
        else:
            windows = _sliding_window_settings(flags, model, force=True)
        kwargs.setdefault("title", f"hf-vitseg: {Path(source).name if os.path.isdir(source) else source}")
        return cls(model, processor, sliding_window=windows if sliding_window else None, large_image_window=windows,
                   device=device, **kwargs)

    def predict(self, image: str | os.PathLike | Image.Image | np.ndarray) -> AppPrediction:
        """Segment one image: a file path (decoded as `hf-vitseg predict` decodes it), a PIL image or an array.

        Raises:
            ValueError: an image that cannot be decoded or holds NaN / infinite pixels (the message names it).
            FileNotFoundError: no such file.
        """
        from ..cli.predict import label_map_image, predict_label_map, read_image
        from .overlays import overlay

        stem = "image"
        if isinstance(image, (str, os.PathLike)):
            stem = Path(image).stem
            image = read_image(image)
        start = time.perf_counter()
        label_map = predict_label_map(self.model, self.processor, image, sliding_window=self.sliding_window,
                                      device=self.device, large_image_window=self.large_image_window)
        seconds = time.perf_counter() - start
        id2label = self.model.config.id2label
        picture = overlay(image, label_map, alpha=self.alpha, id2label=id2label, ignore_index=None)
        colors = {class_id: color for class_id, _, color in picture.info["legend"]}
        folder = Path(tempfile.mkdtemp(prefix="prediction_", dir=self.output_dir))
        label_map_file = folder / f"{stem}_labels.png"
        label_map_image(label_map, self.model.config.num_labels).save(label_map_file)
        return AppPrediction(label_map=label_map, overlay=picture, areas=class_areas(label_map, id2label, colors),
                             label_map_file=label_map_file, seconds=seconds)

    @property
    def num_channels(self) -> int:
        """The number of image channels the model takes (3 unless its backbone says otherwise)."""
        return int(getattr(self.model.config.backbone_config, "num_channels", 3) or 3)

    def _on_upload(self, path):
        """The page's handler: the overlay, the area table, the label map file and a status line."""
        gradio = import_gradio()
        if path is None:
            return None, [], None, ""
        try:
            result = self.predict(path)
        except (ValueError, OSError) as error:
            raise gradio.Error(str(error)) from error
        height, width = result.label_map.shape
        status = (f"{width} x {height} pixels, {len(result.areas)} classes present, predicted in "
                  f"{result.seconds:.2f} s.")
        return result.overlay, result.areas, str(result.label_map_file), status

    def build(self):
        """The Gradio page (`gradio.Blocks`); `launch(app.build())` serves it."""
        gradio = import_gradio()
        labels = ", ".join(str(name) for _, name in sorted(self.model.config.id2label.items()))
        with gradio.Blocks(title=self.title, analytics_enabled=False) as page:
            gradio.Markdown(f"## {self.title}\nUpload an image to segment it. Classes: {labels}.")
            with gradio.Row():
                if self.num_channels == 3:
                    image = gradio.Image(type="filepath", image_mode=None, label="image", sources=["upload"],
                                         elem_id="hf-vitseg-input")
                else:  # a browser cannot show a 4- or 13-channel TIFF: a file field, the overlay shows it
                    image = gradio.File(type="filepath", label=f"image ({self.num_channels} channels, e.g. TIFF)",
                                        elem_id="hf-vitseg-input")
                overlay = gradio.Image(type="pil", label="segmentation (overlay and legend)", interactive=False,
                                       format="png", buttons=["download", "fullscreen"],  # no share: offline
                                       elem_id="hf-vitseg-overlay")
            status = gradio.Markdown(elem_id="hf-vitseg-status")
            with gradio.Row():
                areas = gradio.Dataframe(headers=AREA_COLUMNS, label="area of each class", interactive=False,
                                         elem_id="hf-vitseg-areas")
                label_map = gradio.File(label="label map (PNG of class ids)", interactive=False,
                                        elem_id="hf-vitseg-label-map")
            image.upload(self._on_upload, inputs=image, outputs=[overlay, areas, label_map, status])
        return page


def launch(page, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve `page` (`SegmentationApp.build()`) at `http://host:port`, offline: no share link, no server-side
    rendering, no analytics. With `block=False`, return at once (the server runs in a thread)."""
    return page.launch(server_name=host, server_port=port, share=False, ssr_mode=False, pwa=False, mcp_server=False,
                       prevent_thread_lock=not block, quiet=False, show_error=True)


__all__ = ["AREA_COLUMNS", "AppPrediction", "SegmentationApp", "class_areas", "import_gradio", "launch"]
