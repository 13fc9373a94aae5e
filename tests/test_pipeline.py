"""transformers' image-segmentation pipeline on saved hf-vitseg models (in process, and where hf-vitseg cannot be
imported), hf-vitseg's exact-padding pipeline, and the `hf-vitseg predict` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image
from transformers import pipeline

from hf_vitseg import ViTSegImageProcessor
from hf_vitseg.cli import main
from hf_vitseg.cli.predict import predict_label_map
from hf_vitseg.hub import load_model
from hf_vitseg.modeling.pipeline_vitseg import ViTSegSegmentationPipeline, segmentation_pipeline

ID2LABEL = {0: "sky", 1: "tree", 2: "road"}
PATCH = 8


def save_model(folder: Path, num_labels: int = 3, id2label=None, **config_kwargs) -> Path:
    model = tiny_model(num_labels=num_labels, id2label=id2label if id2label is not None else ID2LABEL, **config_kwargs)
    model.save_pretrained(folder)
    ViTSegImageProcessor(patch_size=PATCH).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("pipeline_model"))


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def exact_label_map(folder: Path, image: Image.Image) -> np.ndarray:
    """The label map with the processor's padding cut away exactly (the reference)."""
    model, processor = load_model(folder), ViTSegImageProcessor.from_pretrained(folder)
    return predict_label_map(model, processor, image)


def segments_to_map(segments, id2label) -> np.ndarray:
    label2id = {label: int(i) for i, label in id2label.items()}
    masks = [np.array(segment["mask"]) > 0 for segment in segments]
    assert np.all(np.sum(masks, axis=0) == 1), "the masks partition the image"
    label_map = np.zeros(masks[0].shape, dtype=np.int64)
    for segment, mask in zip(segments, masks):
        label_map[mask] = label2id[segment["label"]]
    return label_map


def test_stock_pipeline_returns_one_labelled_mask_per_class_present(model_folder):
    # 48 x 64 pixels, a multiple of the patch size: no padding, so the stock pipeline is exact too
    image = random_image(48, 64)
    segmenter = pipeline("image-segmentation", model=str(model_folder), trust_remote_code=True)
    segments = segmenter(image)
    expected = exact_label_map(model_folder, image)
    present = np.unique(expected)
    assert len(present) > 1, "a test image on which the random model predicts one class only tests little"
    assert [s["label"] for s in segments] == [ID2LABEL[int(c)] for c in present]
    assert all(s["mask"].size == image.size and s["mask"].mode == "L" and s["score"] is None for s in segments)
    np.testing.assert_array_equal(segments_to_map(segments, ID2LABEL), expected)


def test_stock_pipeline_is_aligned_on_padded_images(model_folder):
    image = random_image(50, 70)  # padded to 56 x 72
    segments = pipeline("image-segmentation", model=str(model_folder), trust_remote_code=True)(image)
    np.testing.assert_array_equal(segments_to_map(segments, ID2LABEL), exact_label_map(model_folder, image))


def test_stock_pipeline_runs_the_exact_pipeline_saved_with_the_model(tmp_path):
    # save_pretrained names pipeline_vitseg.py in config.json, so the stock call gets the exact geometry, also for
    # a centre-cropping processor, whose lost border rows / columns take the nearest prediction.
    folder = save_model(tmp_path / "crop")
    ViTSegImageProcessor(patch_size=PATCH, size_divisor_mode="crop").save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["custom_pipelines"]["image-segmentation"]["impl"] == (
        "pipeline_vitseg.ViTSegSegmentationPipeline")
    segmenter = pipeline("image-segmentation", model=str(folder), trust_remote_code=True)
    assert type(segmenter).__name__ == "ViTSegSegmentationPipeline"
    image = random_image(50, 70)  # cropped to 48 x 64 at offset (1, 3)
    model, processor = load_model(folder), ViTSegImageProcessor.from_pretrained(folder)
    inputs = processor(image, return_input_sizes=True)
    input_boxes, _ = inputs.pop("input_boxes"), inputs.pop("input_sizes")
    assert input_boxes.tolist() == [[-1, -3, 50, 70]]
    with torch.no_grad():
        expected = processor.post_process_semantic_segmentation(
            model(**inputs), target_sizes=[(50, 70)], input_boxes=input_boxes,
            padded_size=inputs["pixel_values"].shape[-2:],
        )[0].numpy()
    np.testing.assert_array_equal(segments_to_map(segmenter(image), ID2LABEL), expected)


def test_vitseg_pipeline_cuts_the_padding_away_exactly(model_folder):
    image = random_image(50, 70)  # padded to 56 x 72
    segmenter = segmentation_pipeline(str(model_folder))
    assert isinstance(segmenter, ViTSegSegmentationPipeline)
    segments = segmenter(image)
    np.testing.assert_array_equal(segments_to_map(segments, ID2LABEL), exact_label_map(model_folder, image))
    with pytest.raises(ValueError, match="semantic segmentation only"):
        segmenter(image, subtask="panoptic")


class _ProcessorWithoutBoxes(ViTSegImageProcessor):
    """What a processor saved by an older hf-vitseg returns: `input_sizes` only."""

    def preprocess(self, images, segmentation_maps=None, **kwargs):
        outputs = super().preprocess(images, segmentation_maps, **kwargs)
        outputs.pop("input_boxes", None)
        return outputs


def test_vitseg_pipeline_with_a_processor_that_returns_input_sizes_only(model_folder):
    image = random_image(50, 70)  # padded to 56 x 72
    segmenter = segmentation_pipeline(str(model_folder), image_processor=_ProcessorWithoutBoxes(patch_size=PATCH))
    np.testing.assert_array_equal(segments_to_map(segmenter(image), ID2LABEL), exact_label_map(model_folder, image))


def test_vitseg_pipeline_names_an_undecodable_file(model_folder, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ValueError, match="Cannot decode image") as info:
        segmentation_pipeline(str(model_folder))(str(bad))
    assert str(bad) in str(info.value)


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_vitseg"] = None  # hf-vitseg is "not installed"
    from PIL import Image
    from transformers import pipeline

    folder, image_path, out = sys.argv[1:]
    segmenter = pipeline("image-segmentation", model=folder, trust_remote_code=True)
    segments = segmenter(Image.open(image_path))
    for i, segment in enumerate(segments):
        segment["mask"].save(f"{out}/mask_{i}.png")
    json.dump({"model": type(segmenter.model).__module__, "pipeline": type(segmenter).__name__,
               "labels": [s["label"] for s in segments]},
              open(f"{out}/result.json", "w"))
    """
)


@pytest.mark.slow
def test_stock_pipeline_on_a_folder_where_hf_vitseg_is_not_installed(model_folder, tmp_path):
    image = random_image(50, 70)  # padded to 56 x 72: exact only through the pipeline_vitseg.py saved with the model
    image.save(tmp_path / "image.png")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    process = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(model_folder), str(tmp_path / "image.png"), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["model"].startswith("transformers_modules."), "the folder's own code ran, not hf_vitseg"
    assert result["pipeline"] == "ViTSegSegmentationPipeline"
    expected = exact_label_map(model_folder, image)
    assert result["labels"] == [ID2LABEL[int(c)] for c in np.unique(expected)]
    for i, class_id in enumerate(np.unique(expected)):
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / f"mask_{i}.png")) > 0, expected == class_id)


# -- hf-vitseg predict ---------------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path) -> list[Path]:
    paths = [tmp_path / "field.png", tmp_path / "street.jpg"]
    random_image(50, 70, seed=1).save(paths[0])
    random_image(40, 36, seed=2).convert("L").save(paths[1])
    return paths


def test_predict_writes_label_maps_and_overlays(model_folder, images, tmp_path, capsys):
    out = tmp_path / "predictions"
    assert main(["predict", *map(str, images), "--model", str(model_folder), "--out", str(out)]) == 0
    for path in images:
        labels = Image.open(out / f"{path.stem}_labels.png")
        assert labels.mode == "L"
        with Image.open(path) as image:
            expected = exact_label_map(model_folder, image)
            size = image.size
        np.testing.assert_array_equal(np.array(labels), expected)
        with Image.open(out / f"{path.stem}_overlay.png") as overlay:
            assert overlay.mode == "RGB" and overlay.width == size[0] and overlay.height > size[1], "legend strip below"
    assert "field_labels.png" in capsys.readouterr().out


def test_predict_16_bit_label_maps_for_many_classes(tmp_path, images):
    folder = save_model(tmp_path / "many", num_labels=300, id2label={i: f"class_{i}" for i in range(300)},
                        ignore_index=-100)
    out = tmp_path / "out"
    assert main(["predict", str(images[0]), "--model", str(folder), "--out", str(out)]) == 0
    labels = Image.open(out / "field_labels.png")
    assert labels.mode.startswith("I;16") or labels.mode == "I"
    with Image.open(images[0]) as image:
        np.testing.assert_array_equal(np.array(labels).astype(np.int64), exact_label_map(folder, image))


def test_predict_sliding_window_and_tta_flags(model_folder, tmp_path):
    image_path = tmp_path / "square.png"
    random_image(48, 64, seed=3).save(image_path)  # a patch multiple: no processor padding
    out = tmp_path / "out"
    # one window covering the whole image, scale 1, no flip: the same map as plain inference
    args = ["predict", str(image_path), "--model", str(model_folder), "--out", str(out), "--sliding-window",
            "--crop-size", "48", "64", "--stride", "48", "64", "--scales", "1"]
    assert main(args) == 0
    with Image.open(image_path) as image:
        plain = exact_label_map(model_folder, image)
    np.testing.assert_array_equal(np.array(Image.open(out / "square_labels.png")), plain)
    # several windows, three scales and flips: runs, and gives a valid map of the image's size
    args = ["predict", str(image_path), "--model", str(model_folder), "--out", str(tmp_path / "tta"),
            "--sliding-window", "--crop-size", "32", "--stride", "16", "--scales", "0.75", "1", "1.25", "--flip"]
    assert main(args) == 0
    labels = np.array(Image.open(tmp_path / "tta" / "square_labels.png"))
    assert labels.shape == (48, 64) and set(np.unique(labels)) <= {0, 1, 2}


def test_predict_bad_input(model_folder, images, tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(images[0].read_bytes()[:200])
    for path in (bad, truncated):
        assert main(["predict", str(images[0]), str(path), "--model", str(model_folder), "--out", str(out)]) == 1
        assert f"Cannot decode image {path}" in capsys.readouterr().err
        assert not out.exists(), "nothing is written when an input cannot be read"

    assert main(["predict", str(tmp_path / "missing.png"), "--model", str(model_folder), "--out", str(out)]) == 1
    assert "missing.png does not exist" in capsys.readouterr().err

    assert main(["predict", str(images[0]), "--model", str(model_folder), "--out", str(out)]) == 0
    written = (out / "field_labels.png").read_bytes()
    assert main(["predict", str(images[0]), "--model", str(model_folder), "--out", str(out), "--scales", "2"]) == 1
    assert "already exist" in capsys.readouterr().err and (out / "field_labels.png").read_bytes() == written
    assert main(["predict", str(images[0]), "--model", str(model_folder), "--out", str(out), "--overwrite"]) == 0

    same_stem = tmp_path / "other" / "field.png"
    same_stem.parent.mkdir()
    same_stem.write_bytes(images[0].read_bytes())
    assert main(["predict", str(images[0]), str(same_stem), "--model", str(model_folder), "--out",
                 str(tmp_path / "o2")]) == 1
    assert "would both write" in capsys.readouterr().err

    assert main(["predict", str(images[0]), "--model", str(model_folder), "--out", str(tmp_path / "o3"),
                 "--crop-size", "32"]) == 1
    assert "need --sliding-window" in capsys.readouterr().err
