"""Instance-mask data for mask-classification models (issue 11 item 3): image folders with instance-id masks
(`load_instance_folder`), mask targets through `SegmentationTransform`'s own augmentation, and the collator's
per-image target lists."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from hf_vitseg import ViTSegImageProcessor
from hf_vitseg.data import (
    SegmentationCollator,
    SegmentationTransform,
    load_instance_folder,
    prepare_datasets,
    validate_dataset,
)

PATCH = 8


def instance_map(height=40, width=56, seed=0) -> np.ndarray:
    """Rectangles of instance ids 1..5 (some touching) on background 0."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((height, width), np.int64)
    for instance in range(1, 6):
        top, left = rng.integers(0, height - 10), rng.integers(0, width - 10)
        ids[top : top + rng.integers(5, 12), left : left + rng.integers(5, 14)] = instance
    return ids


def image_of(ids: np.ndarray) -> np.ndarray:
    """Each instance in its own grey level: the image says which instance a pixel is."""
    return np.repeat((ids * 40).astype(np.uint8)[..., None], 3, axis=-1)


@pytest.fixture
def instance_folder(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for index in range(3):
        ids = instance_map(seed=index)
        Image.fromarray(image_of(ids)).save(images / f"cell{index}.png")
        if index == 2:
            tifffile.imwrite(masks / f"cell{index}.tif", (ids * 1000).astype(np.uint16))  # 16-bit ids
            classes = {str(i * 1000): i % 2 for i in range(1, 6)}
        else:
            Image.fromarray(ids.astype(np.uint8)).save(masks / f"cell{index}.png")
            classes = {str(i): i % 2 for i in range(1, 6)}
        (masks / f"cell{index}.json").write_text(json.dumps(classes))
    return images, masks


def test_load_instance_folder_with_class_maps(instance_folder):
    images, masks = instance_folder
    dataset = load_instance_folder(images, masks, class_map_suffix=".json")
    assert dataset.column_names == ["image", "annotation", "instance_classes"]
    assert json.loads(dataset[2]["instance_classes"]) == {"1000": 1, "2000": 0, "3000": 1, "4000": 0, "5000": 1}
    single = load_instance_folder(images, masks, instance_class=3)
    assert single["instance_classes"] == ["3"] * 3
    assert validate_dataset(dataset, num_labels=2, ignore_index=255) == 3
    with pytest.raises(ValueError, match=r"instances of class\(es\) \[1\], outside \[0, num_labels=1\)"):
        validate_dataset(dataset, num_labels=1, ignore_index=255)
    (masks / "cell1.json").unlink()
    with pytest.raises(ValueError, match=r"1 class map\(s\) .* missing or unreadable: cell1.json \(missing\)"):
        load_instance_folder(images, masks, class_map_suffix=".json")
    (masks / "cell1.json").write_text('{"1": 0.5, "2": 1.0}')  # int() would have made class 0 of 0.5
    with pytest.raises(ValueError, match=r"cell1.json \(class id 0.5 is not a whole number\)"):
        load_instance_folder(images, masks, class_map_suffix=".json")
    with pytest.raises(ValueError, match="instance_class must be a class id"):
        load_instance_folder(images, masks, instance_class=-1)


def test_eval_transform_gives_what_the_processor_gives(instance_folder):
    images, masks = instance_folder
    dataset = load_instance_folder(images, masks, class_map_suffix=".json")
    processor = ViTSegImageProcessor(patch_size=PATCH)
    _, evaluation = prepare_datasets(None, dataset, processor, crop_size=None, return_mask_labels=True)
    for index in (0, 2):
        sample = evaluation[index]
        row = dataset.with_format(None)[index]
        mapping = {int(k): v for k, v in json.loads(row["instance_classes"]).items()}
        expected = processor(row["image"], segmentation_maps=row["annotation"], instance_id_to_semantic_id=mapping,
                             return_mask_labels=True)
        torch.testing.assert_close(sample["pixel_values"], expected["pixel_values"][0])
        torch.testing.assert_close(sample["mask_labels"], expected["mask_labels"][0])
        torch.testing.assert_close(sample["class_labels"], expected["class_labels"][0])
        assert sample["mask_labels"].shape[0] == 5 and "labels" not in sample


def test_training_augmentation_moves_masks_with_the_image(instance_folder):
    images, masks = instance_folder
    dataset = load_instance_folder(images, masks, instance_class=0)
    processor = ViTSegImageProcessor(patch_size=PATCH, do_normalize=False, do_rescale=False)
    transform = SegmentationTransform(processor, train=True, crop_size=(32, 32), scale_range=(1.0, 1.0),
                                      photometric=False, seed=0, return_mask_labels=True)
    flipped = 0
    for epoch in range(4):
        transform.set_epoch(epoch)
        for sample in dataset.with_transform(transform):
            image, masks_out = sample["pixel_values"][0].numpy(), sample["mask_labels"].numpy().astype(bool)
            assert masks_out.shape[1:] == (32, 32) and masks_out.sum(0).max() <= 1  # disjoint
            levels = [set(np.unique(image[mask]).tolist()) for mask in masks_out]
            assert all(len(level) == 1 for level in levels)  # each mask covers one instance of the image
            assert len({level.pop() for level in levels}) == len(masks_out)  # ... a different one each
            np.testing.assert_array_equal(masks_out.any(0), image > 0)  # every instance pixel is in a mask
            flipped += 1
    assert flipped == 12


def test_masks_and_labels_take_the_same_augmentation(instance_folder):
    """The same seeded draws with masks and with labels: the masks' classes painted back give the labels."""
    images, masks = instance_folder
    dataset = load_instance_folder(images, masks, class_map_suffix=".json")
    processor = ViTSegImageProcessor(patch_size=PATCH)
    options = {"train": True, "crop_size": (24, 32), "scale_range": (0.5, 2.0), "seed": 3}
    with_masks = dataset.with_transform(SegmentationTransform(processor, return_mask_labels=True, **options))
    with_labels = dataset.with_transform(SegmentationTransform(processor, return_mask_labels=False, **options))
    for index in range(3):
        target, reference = with_masks[index], with_labels[index]
        torch.testing.assert_close(target["pixel_values"], reference["pixel_values"])
        painted = torch.full(reference["labels"].shape, 255, dtype=torch.int64)
        for mask, class_id in zip(target["mask_labels"], target["class_labels"]):
            painted[mask.bool()] = class_id
        torch.testing.assert_close(painted, reference["labels"])


def test_collator_pads_masks_with_zero_and_keeps_lists():
    collator = SegmentationCollator(pad_multiple=PATCH)
    features = [
        {"pixel_values": torch.ones(3, 16, 24), "mask_labels": torch.ones(2, 16, 24),
         "class_labels": torch.tensor([1, 0])},
        {"pixel_values": torch.ones(3, 8, 8), "mask_labels": torch.zeros(0, 8, 8), "class_labels": torch.tensor([])},
    ]
    batch = collator(features)
    assert batch["pixel_values"].shape == (2, 3, 16, 24)
    assert [tuple(m.shape) for m in batch["mask_labels"]] == [(2, 16, 24), (0, 16, 24)]
    assert batch["class_labels"][0].tolist() == [1, 0] and batch["class_labels"][1].dtype == torch.int64
    features[1]["mask_labels"], features[1]["class_labels"] = torch.ones(1, 8, 8), [2]
    batch = collator(features)
    assert batch["mask_labels"][1][0, :8, :8].all() and batch["mask_labels"][1][0, 8:].sum() == 0
    features[1]["class_labels"] = []
    with pytest.raises(ValueError, match="Sample 1: mask_labels have shape"):
        collator(features)  # one mask, no class
    features[1].pop("mask_labels")
    with pytest.raises(ValueError, match="Sample 1 of the batch lacks 'mask_labels' or 'class_labels'"):
        collator(features)


def test_void_mask_marks_ignored_pixels_and_padding_not_background():
    processor = ViTSegImageProcessor(patch_size=PATCH)
    semantic = np.zeros((10, 13), np.int64)
    semantic[:, 5:] = 1
    semantic[0, 0] = 255
    instances = np.zeros((10, 13), np.int64)
    instances[2:5, 2:5] = 1
    instances[9, 12] = 255
    transform = SegmentationTransform(processor, train=False, return_mask_labels=True)
    image = np.zeros((10, 13, 3), np.uint8)
    semantic_sample = transform({"image": [image], "annotation": [semantic]})
    instance_sample = transform({"image": [image], "annotation": [instances], "instance_classes": ["0"]})
    for sample, ignored in ((semantic_sample, semantic == 255), (instance_sample, instances == 255)):
        void = sample["void_mask"][0].numpy()
        assert void.shape == (16, 16) and void[10:].all() and void[:, 13:].all()  # the padding
        np.testing.assert_array_equal(void[:10, :13], ignored)  # background (instance id 0) is not void
    assert instance_sample["class_labels"][0].tolist() == [0]
    batch = SegmentationCollator(pad_multiple=PATCH)(
        [{key: values[0] for key, values in sample.items()} for sample in (semantic_sample, instance_sample)])
    assert batch["void_mask"].shape == (2, 16, 16) and batch["void_mask"].dtype == torch.bool
    torch.testing.assert_close(batch["void_mask"][1], instance_sample["void_mask"][0])
