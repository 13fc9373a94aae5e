"""The image-segmentation pipeline on mask-classification models (issue 11 item 4): `subtask="panoptic"`,
`"instance"` and `"semantic"` through hf-vitseg's pipeline and through transformers' stock `pipeline(...,
trust_remote_code=True)` on a saved `ViTSegForUniversalSegmentation` folder, padding cut exactly."""

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
from conftest import tiny_backbone_config, tiny_model
from PIL import Image
from transformers import ImageSegmentationPipeline, pipeline

from hf_vitseg import ViTSegConfig, ViTSegImageProcessor
from hf_vitseg.modeling import ViTSegForUniversalSegmentation
from hf_vitseg.modeling.pipeline_vitseg import (
    CUSTOM_PIPELINES,
    ViTSegSegmentationPipeline,
    custom_pipelines,
    segmentation_pipeline,
)

ID2LABEL = {0: "nucleus", 1: "debris", 2: "cell"}
PATCH = 8
# Random weights give unsure classes and mask logits near 0: thresholds low enough that segments come out
LOW = {"threshold": 0.0, "mask_threshold": 0.0, "overlap_mask_area_threshold": 0.0}


@pytest.fixture(scope="module")
def universal_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = ViTSegConfig(backbone_config=tiny_backbone_config("dinov2"), head="eomt", num_labels=3, id2label=ID2LABEL,
                          head_kwargs={"num_queries": 6, "num_blocks": 2})
    folder = tmp_path_factory.mktemp("universal")
    ViTSegForUniversalSegmentation(config).eval().save_pretrained(folder)
    ViTSegImageProcessor(patch_size=PATCH).save_pretrained(folder)
    return folder


def random_image(height: int = 50, width: int = 70, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def expected_result(folder: Path, image: Image.Image, subtask: str, **kwargs):
    """The processor's post-processing with the exact geometry (the reference)."""
    model = ViTSegForUniversalSegmentation.from_pretrained(folder).eval()
    processor = ViTSegImageProcessor.from_pretrained(folder)
    inputs = processor(image, return_input_sizes=True)
    input_boxes, _ = inputs.pop("input_boxes"), inputs.pop("input_sizes")
    with torch.no_grad():
        outputs = model(**inputs)
    post_process = getattr(processor, f"post_process_{subtask}_segmentation")
    return post_process(outputs, target_sizes=[(image.height, image.width)], input_boxes=input_boxes,
                        padded_size=inputs["pixel_values"].shape[-2:], **kwargs)[0]


def check_segments(segments, result, image):
    assert len(segments) == len(result["segments_info"]) > 0
    segmentation = result["segmentation"].numpy()
    for segment, info in zip(segments, result["segments_info"]):
        assert segment["label"] == ID2LABEL[info["label_id"]] and segment["score"] == info["score"]
        assert segment["mask"].mode == "L" and segment["mask"].size == image.size
        np.testing.assert_array_equal(np.array(segment["mask"]) > 0, segmentation == info["id"])


def test_saved_folder_names_the_universal_auto_class(universal_folder):
    config = json.loads((universal_folder / "config.json").read_text())
    entry = config["custom_pipelines"]["image-segmentation"]
    assert entry["pt"] == ["AutoModelForUniversalSegmentation"]
    assert entry["impl"] == "pipeline_vitseg.ViTSegSegmentationPipeline"
    # what hf-vitseg push writes: the same entry; semantic models keep theirs
    assert custom_pipelines(config) == config["custom_pipelines"]
    assert custom_pipelines({"architectures": ["ViTSegForSemanticSegmentation"]}) == CUSTOM_PIPELINES


@pytest.mark.parametrize("subtask", ["panoptic", "instance"])
def test_stock_pipeline_panoptic_and_instance(universal_folder, subtask):
    image = random_image()  # 50 x 70, padded to 56 x 72
    segmenter = pipeline("image-segmentation", model=str(universal_folder), trust_remote_code=True)
    assert type(segmenter).__name__ == "ViTSegSegmentationPipeline"  # the folder's own copy
    thresholds = LOW if subtask == "panoptic" else {"threshold": 0.0}  # instance: masks where logits > 0
    segments = segmenter(image, subtask=subtask, **thresholds)
    check_segments(segments, expected_result(universal_folder, image, subtask, **thresholds), image)
    if subtask == "panoptic":  # the default subtask of a mask model, as in transformers
        assert [s["label"] for s in segmenter(image, **LOW)] == [s["label"] for s in segments]


def test_stock_pipeline_semantic_on_a_mask_model(universal_folder):
    image = random_image(seed=1)
    segments = pipeline("image-segmentation", model=str(universal_folder), trust_remote_code=True)(
        image, subtask="semantic")
    expected = expected_result(universal_folder, image, "semantic").numpy()
    assert [s["label"] for s in segments] == [ID2LABEL[int(c)] for c in np.unique(expected)]
    assert all(s["score"] is None for s in segments)
    for segment, class_id in zip(segments, np.unique(expected)):
        np.testing.assert_array_equal(np.array(segment["mask"]) > 0, expected == class_id)


def test_label_ids_to_fuse_and_bad_subtask(universal_folder):
    image = random_image(seed=2)
    segmenter = segmentation_pipeline(str(universal_folder))
    assert isinstance(segmenter, ViTSegSegmentationPipeline)
    fused = segmenter(image, subtask="panoptic", label_ids_to_fuse={0, 1, 2}, **LOW)
    check_segments(fused, expected_result(universal_folder, image, "panoptic", label_ids_to_fuse={0, 1, 2}, **LOW),
                   image)
    assert len({s["label"] for s in fused}) == len(fused), "one segment per fused class"
    with pytest.raises(ValueError, match="subtask must be one of"):
        segmenter(image, subtask="depth")


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_vitseg"] = None  # hf-vitseg is "not installed"
    from PIL import Image
    from transformers import pipeline

    folder, image_path, out = sys.argv[1:]
    segmenter = pipeline("image-segmentation", model=folder, trust_remote_code=True)
    segments = segmenter(Image.open(image_path), subtask="panoptic", threshold=0.0, mask_threshold=0.0,
                         overlap_mask_area_threshold=0.0)
    for i, segment in enumerate(segments):
        segment["mask"].save(f"{out}/mask_{i}.png")
    json.dump({"model": type(segmenter.model).__module__, "pipeline": type(segmenter).__name__,
               "labels": [s["label"] for s in segments], "scores": [s["score"] for s in segments]},
              open(f"{out}/result.json", "w"))
    """
)


@pytest.mark.slow
def test_stock_pipeline_where_hf_vitseg_is_not_installed(universal_folder, tmp_path):
    image = random_image(seed=3)
    image.save(tmp_path / "image.png")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    process = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(universal_folder), str(tmp_path / "image.png"), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["model"].startswith("transformers_modules.") and result["pipeline"] == "ViTSegSegmentationPipeline"
    expected = expected_result(universal_folder, image, "panoptic", **LOW)
    assert result["labels"] == [ID2LABEL[info["label_id"]] for info in expected["segments_info"]]
    assert result["scores"] == [info["score"] for info in expected["segments_info"]]
    for i, info in enumerate(expected["segments_info"]):
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / f"mask_{i}.png")) > 0,
                                      expected["segmentation"].numpy() == info["id"])


def test_processor_for_a_mask_model_feeds_its_loss(universal_folder):
    model = ViTSegForUniversalSegmentation.from_pretrained(universal_folder)
    processor = ViTSegImageProcessor.for_model(model)  # built, not loaded: mask targets by default
    assert processor.return_mask_labels
    instances = np.zeros((20, 30), np.int64)
    instances[2:9, 3:12], instances[10:18, 15:28] = 1, 2
    inputs = processor([np.zeros((20, 30, 3), np.uint8)] * 2, segmentation_maps=[instances, instances],
                       instance_id_to_semantic_id={1: 0, 2: 2})
    assert set(inputs) == {"pixel_values", "mask_labels", "class_labels"}
    loss = model(**inputs).loss
    assert torch.isfinite(loss) and loss > 0


def test_transformers_own_pipeline_class_still_segments_semantic_models():
    """transformers' ImageSegmentationPipeline asks for panoptic segmentation first when the processor has it: a
    semantic model's answer is one mask per class present, as before the processor learnt panoptic."""
    model = tiny_model(num_labels=3, id2label=ID2LABEL).eval()
    processor = ViTSegImageProcessor(patch_size=PATCH)
    image = random_image(48, 64)  # a patch multiple: transformers' pipeline passes no padding geometry
    segmenter = pipeline("image-segmentation", model=model, image_processor=processor,
                         pipeline_class=ImageSegmentationPipeline)
    segments = segmenter(image)
    with torch.no_grad():
        expected = processor.post_process_semantic_segmentation(model(**processor(image)),
                                                                target_sizes=[(48, 64)])[0].numpy()
    assert [s["label"] for s in segments] == [ID2LABEL[int(c)] for c in np.unique(expected)]
    for segment, class_id in zip(segments, np.unique(expected)):
        np.testing.assert_array_equal(np.array(segment["mask"]) > 0, expected == class_id)
