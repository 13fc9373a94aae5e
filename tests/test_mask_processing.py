"""Mask-classification targets and post-processing of `ViTSegImageProcessor` (issue 11): semantic, instance and
panoptic maps -> `mask_labels` / `class_labels`; semantic / instance / panoptic post-processing equal to transformers'
Mask2Former and EoMT processors on the same outputs, and padding cut exactly as for semantic models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import ModelOutput
from transformers.models.eomt.image_processing_pil_eomt import EomtImageProcessorPil
from transformers.models.mask2former.image_processing_pil_mask2former import (
    Mask2FormerImageProcessorPil,
    convert_segmentation_map_to_binary_masks,
)

from hf_vitseg import ViTSegImageProcessor
from hf_vitseg.modeling.image_processing_vitseg import (
    IGNORED_TARGET,
    NO_TARGET,
    panoptic_to_instance_map,
    segmentation_map_to_targets,
    targets_to_masks,
)

PATCH = 8


def mask_outputs(batch=2, queries=6, classes=3, height=384, width=384, seed=0) -> ModelOutput:
    """Synthetic outputs of a mask-classification model: confident classes, blobby masks."""
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(batch, queries, classes + 1, generator=generator) * 4
    # each cell of a coarse grid belongs to one query (mostly): masks that tile the image, with soft borders
    owner = torch.randint(0, queries, (batch, 1, 6, 6), generator=generator)
    coarse = torch.where(torch.arange(queries).view(1, -1, 1, 1) == owner, 6.0, -6.0)
    coarse = coarse + torch.randn(batch, queries, 6, 6, generator=generator)
    mask_logits = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    # patch_offsets: EoMT's processor reads it (None: the image was not split into patches)
    return ModelOutput(class_queries_logits=class_logits, masks_queries_logits=mask_logits, patch_offsets=None)


def random_map(values, shape=(20, 30), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.asarray(values), size=shape).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduce", [False, True])
def test_semantic_map_gives_one_mask_per_class_as_transformers(reduce):
    seg = random_map([0, 1, 2, 5, 255])
    target_map, classes = segmentation_map_to_targets(seg, None, ignore_index=255, do_reduce_labels=reduce)
    masks, labels = targets_to_masks(target_map, classes)
    # transformers' reduce turns 255 into 254; ours keeps ignore_index ignored (as the semantic `labels` do)
    reference_map = np.where(seg == 255, 0, seg) if reduce else seg
    expected_masks, expected_labels = convert_segmentation_map_to_binary_masks(
        reference_map, None, ignore_index=255, do_reduce_labels=reduce
    )
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(masks, expected_masks)
    assert masks.sum(0).max() == 1  # one target per pixel
    assert np.all(masks[:, seg == 255] == 0)  # ignored pixels are in no mask
    if reduce:
        assert np.all(masks[:, seg == 0] == 0)


def test_instance_map_with_a_dict_gives_one_mask_per_instance_as_transformers():
    seg = random_map([0, 3, 4, 9])
    mapping = {0: 0, 3: 2, 4: 2, 9: 1}  # background named: transformers needs every id in the dict
    masks, labels = targets_to_masks(*segmentation_map_to_targets(seg, mapping))
    expected_masks, expected_labels = convert_segmentation_map_to_binary_masks(seg, mapping)
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(masks, expected_masks)
    # 0 left out of the dict: background, in no mask; two instances of class 2 stay two masks
    masks, labels = targets_to_masks(*segmentation_map_to_targets(seg, {3: 2, 4: 2, 9: 1}))
    assert labels.tolist() == [2, 2, 1]
    assert np.all(masks[:, seg == 0] == 0)
    np.testing.assert_array_equal(masks[0], seg == 3)


def test_instance_map_with_reduced_labels_as_transformers():
    seg = random_map([0, 1, 2, 3], seed=5)
    mapping = {1: 1, 2: 3, 3: 2}  # ADE20K-style classes: 0 would be "other"
    target_map, classes = segmentation_map_to_targets(seg, mapping, do_reduce_labels=True)
    masks, labels = targets_to_masks(target_map, classes)
    expected_masks, expected_labels = convert_segmentation_map_to_binary_masks(
        seg, mapping, ignore_index=255, do_reduce_labels=True
    )
    np.testing.assert_array_equal(labels, expected_labels)  # [0, 2, 1]
    np.testing.assert_array_equal(masks, expected_masks)
    assert np.all(target_map[seg == 0] == IGNORED_TARGET)  # id 0 is "unlabelled" under reduce_labels


def test_instance_map_with_one_class_for_every_instance():
    seg = random_map([0, 1, 2, 7, 200], seed=1)
    seg[0, :5] = 255  # a region to ignore
    masks, labels = targets_to_masks(*segmentation_map_to_targets(seg, 4))
    assert labels.tolist() == [4, 4, 4, 4]  # ids 1, 2, 7, 200; 0 background, 255 ignored
    assert np.all(masks[:, seg == 0] == 0) and np.all(masks[:, seg == 255] == 0)
    np.testing.assert_array_equal(masks[3], seg == 200)
    # ids above ignore_index: fine while ignore_index itself is absent
    seg[seg == 255] = 300
    assert targets_to_masks(*segmentation_map_to_targets(seg, 4))[1].tolist() == [4] * 5


def test_instance_map_errors_name_the_problem():
    seg = np.array([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="Instance id 3 is in the instance map but not in instance_id_to_semantic_id"):
        segmentation_map_to_targets(seg, {1: 0, 2: 0})
    with pytest.raises(ValueError, match="ids above ignore_index=255"):
        segmentation_map_to_targets(np.array([[0, 255], [256, 1]]), 0)  # 255 is an instance there
    with pytest.raises(ValueError, match="negative class ids"):
        segmentation_map_to_targets(np.array([[0, -2]]))
    with pytest.raises(TypeError, match="instance_id_to_semantic_id must be"):
        segmentation_map_to_targets(seg, [0])
    with pytest.raises(ValueError, match="pass the instance maps too"):
        ViTSegImageProcessor(patch_size=PATCH)(np.zeros((8, 8, 3), np.uint8), instance_id_to_semantic_id=0)
    for bad in (0.5, float("nan"), float("inf"), "1", True):  # a fraction was truncated to class 0 before
        with pytest.raises(ValueError, match=r"gives instance 1 the class .*whole numbers"):
            segmentation_map_to_targets(seg, {1: bad, 2: 0, 3: 0})
    _, classes = segmentation_map_to_targets(seg, {1: 2.0, 2: np.int64(0), "3": 1})  # whole numbers, JSON keys
    assert classes.tolist() == [2, 0, 1]


def test_processor_mask_labels_are_padded_with_zeros_and_match_pixel_values():
    processor = ViTSegImageProcessor(patch_size=PATCH)
    images = [np.zeros((20, 30, 3), np.uint8), np.zeros((12, 9, 3), np.uint8)]
    semantic = random_map([0, 1, 2, 255])
    instances = random_map([0, 5, 6], shape=(12, 9))
    inputs = processor(images, segmentation_maps=[semantic, instances], return_mask_labels=True,
                       instance_id_to_semantic_id=[None, {5: 1, 6: 1}])
    assert "labels" not in inputs
    height, width = inputs["pixel_values"].shape[-2:]
    assert (height, width) == (24, 32)
    first, second = inputs["mask_labels"]
    assert first.dtype == torch.float32 and inputs["class_labels"][0].dtype == torch.int64
    assert first.shape == (3, 24, 32) and inputs["class_labels"][0].tolist() == [0, 1, 2]
    assert second.shape == (2, 24, 32) and inputs["class_labels"][1].tolist() == [1, 1]
    assert first[:, 20:].sum() == 0 and first[:, :, 30:].sum() == 0  # padding in no mask
    np.testing.assert_array_equal(second[0, :12, :9].numpy(), instances == 5)
    assert second[:, 12:].sum() == 0 and second[:, :, 9:].sum() == 0
    # numpy out
    numpy_inputs = processor(images[0], segmentation_maps=semantic, return_mask_labels=True, return_tensors="np")
    assert isinstance(numpy_inputs["mask_labels"][0], np.ndarray)


def test_mask_labels_follow_the_resize_and_crop_of_labels():
    """Masks are made from the resized (nearest) and cropped map: exactly the masks of the processor's `labels`."""
    processor = ViTSegImageProcessor(patch_size=PATCH, do_resize=True, size={"height": 37, "width": 45},
                                     size_divisor_mode="crop")
    image = np.zeros((50, 70, 3), np.uint8)
    seg = random_map([0, 1, 2, 3, 255], shape=(50, 70), seed=3)
    labels = processor(image, segmentation_maps=seg)["labels"][0].numpy()
    inputs = processor(image, segmentation_maps=seg, return_mask_labels=True)
    expected_masks, expected_classes = convert_segmentation_map_to_binary_masks(labels, None, ignore_index=255)
    np.testing.assert_array_equal(inputs["mask_labels"][0].numpy(), expected_masks)
    np.testing.assert_array_equal(inputs["class_labels"][0].numpy(), expected_classes)


def test_instance_maps_without_mask_labels_give_semantic_labels():
    processor = ViTSegImageProcessor(patch_size=PATCH)
    instances = random_map([0, 5, 6, 255], shape=(16, 16))
    labels = processor(np.zeros((16, 16, 3), np.uint8), segmentation_maps=instances,
                       instance_id_to_semantic_id={5: 1, 6: 2})["labels"][0].numpy()
    np.testing.assert_array_equal(labels, np.select([instances == 5, instances == 6], [1, 2], default=255))


def test_instances_lost_to_the_resize_are_dropped():
    processor = ViTSegImageProcessor(patch_size=PATCH, do_resize=True, size={"height": 8, "width": 8})
    instances = np.zeros((64, 64), np.int64)
    instances[:32] = 1
    instances[40, 40] = 2  # one pixel: gone at 1/8 scale
    inputs = processor(np.zeros((64, 64, 3), np.uint8), segmentation_maps=instances, instance_id_to_semantic_id=0,
                       return_mask_labels=True)
    assert inputs["class_labels"][0].tolist() == [0]
    assert inputs["mask_labels"][0].shape == (1, 8, 8) and inputs["mask_labels"][0][0, :4].all()


def test_panoptic_png_with_segments_info():
    ids = np.zeros((10, 12), np.int64)
    ids[:5] = 1 + 256 * 2  # segment 513
    ids[5:, :6] = 70000  # segment 70000 (B channel used)
    ids[5:, 6:] = 9  # a crowd region
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    rgb[0, 0] = 0  # unlabelled
    segments_info = [
        {"id": 513, "category_id": 17, "iscrowd": 0},
        {"id": 70000, "category_id": 90, "iscrowd": 0},
        {"id": 9, "category_id": 17, "iscrowd": 1},
    ]
    instance_map, mapping = panoptic_to_instance_map(rgb, segments_info, category_id_to_label={17: 0, 90: 1})
    assert mapping == {513: 0, 70000: 1, 9: 255, 0: 255}  # crowd and unlabelled (COCO's void) are ignored
    assert instance_map[0, 0] == 0 and instance_map[1, 0] == 513 and instance_map[9, 0] == 70000
    inputs = ViTSegImageProcessor(patch_size=PATCH)(
        np.zeros((10, 12, 3), np.uint8), segmentation_maps=instance_map, instance_id_to_semantic_id=mapping,
        return_mask_labels=True,
    )
    masks, classes = inputs["mask_labels"][0], inputs["class_labels"][0]
    assert classes.tolist() == [0, 1]  # the crowd region is in no mask
    assert masks[0, 0, 0] == 0 and masks[0, 1, 0] == 1 and masks[1, 9, 0] == 1 and masks[:, 9, 11].sum() == 0
    with pytest.raises(ValueError, match="segments_info does not describe"):
        panoptic_to_instance_map(rgb, segments_info[:1])


# ----------------------------------------------------------------------------------------------------------------
# Post-processing, equal to transformers
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_sizes", [None, [(384, 384)] * 2])
def test_semantic_post_processing_equals_mask2former(target_sizes):
    # Mask2Former's processor resamples masks to 384 x 384 before anything else (whatever the input size): masks of
    # that size and no other target size are where its results and ours (one resampling, straight onto the image)
    # must agree exactly
    outputs = mask_outputs()
    ours = ViTSegImageProcessor().post_process_semantic_segmentation(
        outputs, target_sizes=target_sizes, return_segmentation_scores=True)
    theirs = Mask2FormerImageProcessorPil().post_process_semantic_segmentation(
        outputs, target_sizes=target_sizes, return_segmentation_scores=True)
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine.segmentation_scores, reference.segmentation_scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(mine.segmentation, reference.segmentation, rtol=0, atol=0)
    assert len(np.unique(ours[0].segmentation)) > 1


def test_semantic_post_processing_in_query_chunks_is_the_same(monkeypatch):
    from hf_vitseg.modeling import image_processing_vitseg

    outputs = mask_outputs(batch=1, queries=7, height=16, width=24, seed=6)
    whole = ViTSegImageProcessor().post_process_semantic_segmentation(
        outputs, target_sizes=[(64, 96)], return_segmentation_scores=True)[0]
    monkeypatch.setattr(image_processing_vitseg, "_MASK_ELEMENTS_AT_ONCE", 3 * 64 * 96)  # chunks of 3, 3 and 1
    chunked = ViTSegImageProcessor().post_process_semantic_segmentation(
        outputs, target_sizes=[(64, 96)], return_segmentation_scores=True)[0]
    torch.testing.assert_close(chunked.segmentation_scores, whole.segmentation_scores, rtol=0, atol=1e-6)
    assert (chunked.segmentation == whole.segmentation).float().mean() > 0.999


def test_semantic_post_processing_equals_eomt_with_coarse_masks():
    outputs = mask_outputs(height=16, width=24)  # masks at 1/4 of a 64 x 96 input, as the model gives them
    ours = ViTSegImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=[(64, 96)] * 2)
    theirs = EomtImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}).post_process_semantic_segmentation(
        outputs, target_sizes=[(64, 96)] * 2)
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)


@pytest.mark.parametrize("target_sizes", [None, [(384, 384)] * 2])
@pytest.mark.parametrize("return_binary_maps", [False, True])
def test_instance_post_processing_equals_mask2former(target_sizes, return_binary_maps):
    outputs = mask_outputs(seed=1)
    kwargs = {"threshold": 0.3, "target_sizes": target_sizes, "return_binary_maps": return_binary_maps}
    ours = ViTSegImageProcessor().post_process_instance_segmentation(outputs, **kwargs)
    theirs = Mask2FormerImageProcessorPil().post_process_instance_segmentation(outputs, **kwargs)
    assert sum(len(result["segments_info"]) for result in ours) > 2
    for mine, reference in zip(ours, theirs):
        assert mine["segments_info"] == reference["segments_info"]
        torch.testing.assert_close(mine["segmentation"], reference["segmentation"], rtol=0, atol=0)


@pytest.mark.parametrize("label_ids_to_fuse", [None, {0, 2}])
def test_panoptic_post_processing_equals_mask2former(label_ids_to_fuse):
    outputs = mask_outputs(seed=2, queries=10)
    kwargs = {"threshold": 0.6, "label_ids_to_fuse": label_ids_to_fuse}
    ours = ViTSegImageProcessor().post_process_panoptic_segmentation(outputs, **kwargs)
    theirs = Mask2FormerImageProcessorPil().post_process_panoptic_segmentation(outputs, **kwargs)
    assert sum(len(result["segments_info"]) for result in ours) > 2
    for mine, reference in zip(ours, theirs):
        assert mine["segments_info"] == reference["segments_info"]
        torch.testing.assert_close(mine["segmentation"], reference["segmentation"], rtol=0, atol=0)
    if label_ids_to_fuse:
        assert any(segment["was_fused"] for result in ours for segment in result["segments_info"])


def test_panoptic_post_processing_with_nothing_above_threshold():
    result = ViTSegImageProcessor().post_process_panoptic_segmentation(
        mask_outputs(height=8, width=8), threshold=1.0, target_sizes=[(5, 7)] * 2)[0]
    assert result["segments_info"] == []
    assert result["segmentation"].shape == (5, 7) and bool((result["segmentation"] == -1).all())


def test_instance_needs_mask_outputs_and_panoptic_reads_semantic_ones_as_stuff():
    logits = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    semantic = ModelOutput(logits=logits)
    with pytest.raises(ValueError, match="mask-classification model"):
        ViTSegImageProcessor().post_process_instance_segmentation(semantic)
    result = ViTSegImageProcessor().post_process_panoptic_segmentation(semantic, target_sizes=[(8, 8)])[0]
    label_map = ViTSegImageProcessor().post_process_semantic_segmentation(semantic, target_sizes=[(8, 8)])[0]
    assert [info["label_id"] for info in result["segments_info"]] == torch.unique(label_map).tolist()
    for info in result["segments_info"]:
        assert info["was_fused"] and info["score"] is None
        torch.testing.assert_close(result["segmentation"] == info["id"], label_map == info["label_id"])


@pytest.mark.parametrize("method", ["semantic", "instance", "panoptic"])
def test_non_finite_outputs_thresholds_and_empty_sizes_are_refused(method):
    """NaN logits or a NaN threshold used to give an empty result without a word; a 0-pixel target size failed
    inside torch."""
    generator = torch.Generator().manual_seed(0)
    outputs = ModelOutput(class_queries_logits=torch.randn(1, 4, 3, generator=generator),
                          masks_queries_logits=torch.randn(1, 4, 6, 6, generator=generator))
    post_process = getattr(ViTSegImageProcessor(), f"post_process_{method}_segmentation")
    assert len(post_process(outputs, target_sizes=[(12, 12)])) == 1
    for name in ("class_queries_logits", "masks_queries_logits"):
        poisoned = ModelOutput(**{**outputs, name: outputs[name].clone().index_fill_(1, torch.tensor([2]), math.nan)})
        with pytest.raises(ValueError, match=f"{name} hold NaN or infinite values"):
            post_process(poisoned)
    with pytest.raises(ValueError, match=r"at least 1 pixel each; got \(0, 12\)"):
        post_process(outputs, target_sizes=[(0, 12)])
    if method != "semantic":
        for threshold in ("threshold", "mask_threshold", "overlap_mask_area_threshold"):
            with pytest.raises(ValueError, match=f"{threshold} must be a finite number, got nan"):
                post_process(outputs, **{threshold: math.nan})


# ----------------------------------------------------------------------------------------------------------------
# Padding cut exactly, as for semantic models
# ----------------------------------------------------------------------------------------------------------------


def cropped(outputs: ModelOutput, rows: int, cols: int) -> ModelOutput:
    return ModelOutput(class_queries_logits=outputs.class_queries_logits,
                       masks_queries_logits=outputs.masks_queries_logits[..., :rows, :cols])


@pytest.mark.parametrize("method", ["semantic", "instance", "panoptic"])
def test_padding_is_cut_exactly(method):
    """An image of 24 x 28 padded to 32 x 40, masks at 1/4 (8 x 10): post-processing with the geometry equals
    post-processing the masks of the image alone (6 x 7 rows and columns) with no geometry."""
    outputs = mask_outputs(batch=1, height=8, width=10, seed=4)
    processor = ViTSegImageProcessor()
    post_process = getattr(processor, f"post_process_{method}_segmentation")
    extra = {"threshold": 0.3} if method != "semantic" else {}
    with_geometry = post_process(outputs, target_sizes=[(24, 28)], input_sizes=[(24, 28)], padded_size=(32, 40),
                                 **extra)[0]
    alone = post_process(cropped(outputs, 6, 7), target_sizes=[(24, 28)], **extra)[0]
    stretched = post_process(outputs, target_sizes=[(24, 28)], **extra)[0]
    if method == "semantic":
        torch.testing.assert_close(with_geometry, alone, rtol=0, atol=0)
        assert not torch.equal(stretched, alone)
    else:
        assert with_geometry["segments_info"] == alone["segments_info"] and alone["segments_info"]
        torch.testing.assert_close(with_geometry["segmentation"], alone["segmentation"], rtol=0, atol=0)
    # without target sizes: cut to the mask rows / columns that cover the image
    at_mask_resolution = post_process(outputs, input_sizes=[(24, 28)], padded_size=(32, 40), **extra)[0]
    segmentation = at_mask_resolution if method == "semantic" else at_mask_resolution["segmentation"]
    assert segmentation.shape == (6, 7)


def test_target_maps_tell_background_from_ignored_pixels():
    instances = np.array([[0, 1, 255], [2, 2, 0]])
    target_map, classes = segmentation_map_to_targets(instances, {1: 3, 2: 4})
    assert target_map.tolist() == [[NO_TARGET, 0, IGNORED_TARGET], [1, 1, NO_TARGET]] and classes.tolist() == [3, 4]
    target_map, classes = segmentation_map_to_targets(np.array([[0, 255, 2]]))
    assert target_map.tolist() == [[0, IGNORED_TARGET, 1]] and classes.tolist() == [0, 2]
    # the padding of a batch is ignored too
    processor = ViTSegImageProcessor(patch_size=PATCH)
    padded = processor.pad_sample(np.zeros((3, 2, 3)), target_map, (8, 8), IGNORED_TARGET)[1]
    assert (padded[2:] == IGNORED_TARGET).all() and (padded[:, 3:] == IGNORED_TARGET).all()


# ----------------------------------------------------------------------------------------------------------------
# Overlays of instances
# ----------------------------------------------------------------------------------------------------------------


def test_overlay_instances_distinct_colours_and_contours():
    from hf_vitseg.inference import make_palette, overlay_instances

    image = np.full((20, 30, 3), 100, np.uint8)
    ids = np.zeros((20, 30), np.int64)
    ids[2:10, 2:12] = 4
    ids[2:10, 12:22] = 9  # touching the first: a per-class overlay would merge them
    result = overlay_instances(image, ids, alpha=0.5)
    drawn = np.asarray(result).astype(int)
    palette = make_palette(2).astype(int)
    assert [entry[:2] for entry in result.info["instances"]] == [(4, "#4"), (9, "#9")]
    assert not np.array_equal(palette[0], palette[1])
    np.testing.assert_array_equal(drawn[ids == 0], 100)  # background untouched
    np.testing.assert_array_equal(drawn[2, 5], palette[0])  # top edge: the contour, opaque
    np.testing.assert_array_equal(drawn[5, 11], palette[0])  # the shared border is drawn for each instance
    np.testing.assert_array_equal(drawn[5, 12], palette[1])
    np.testing.assert_array_equal(drawn[5, 6], np.round(0.5 * 100 + 0.5 * palette[0]))  # inside: blended
    thick = np.asarray(overlay_instances(image, ids, alpha=0.5, contour_width=2)).astype(int)
    np.testing.assert_array_equal(thick[3, 6], palette[0])


def test_overlay_instances_from_post_processing_outputs():
    from hf_vitseg.inference import overlay_instances

    outputs = mask_outputs(batch=1, height=24, width=32, seed=1)
    processor = ViTSegImageProcessor()
    image = np.zeros((24, 32), np.uint16)  # 16-bit grey, stretched for display
    panoptic = processor.post_process_panoptic_segmentation(outputs, threshold=0.5)[0]
    drawn = overlay_instances(image, panoptic["segmentation"], panoptic["segments_info"],
                              id2label={0: "a", 1: "b", 2: "c"}, legend=True)
    assert drawn.height > 24  # the legend strip
    captions = [caption for _, caption, _ in drawn.info["instances"]]
    assert captions == [f"{'abc'[s['label_id']]} {s['score']:.2f}" for s in panoptic["segments_info"]]
    instances = processor.post_process_instance_segmentation(outputs, threshold=0.1, return_binary_maps=True)[0]
    binary = overlay_instances(image, instances["segmentation"], instances["segments_info"])
    assert len(binary.info["instances"]) == len(instances["segments_info"]) > 0
    with pytest.raises(ValueError, match="must have the same"):
        overlay_instances(np.zeros((5, 5)), panoptic["segmentation"])
