"""An albumentations Compose in place of the built-in augmentation (issue 12 item 6): the convention of transformers'
semantic-segmentation examples (`transform(image=..., mask=...)`, optionally ending in `A.Normalize` and
`ToTensorV2`), with labels reduced as the processor says, normalised as at inference, pixels from outside the image
and padding labelled `ignore_index`, and seeded like the built-in steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hf_vitseg import ViTSegImageProcessor
from hf_vitseg.data import SegmentationTransform, prepare_datasets

A = pytest.importorskip("albumentations", reason="the augment extra (the dev extra installs it)")

IGNORE = 255


@pytest.fixture
def processor():
    return ViTSegImageProcessor(patch_size=8)


def sample(height=40, width=48, labels=3, seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3)).astype(np.uint8))
    mask = rng.integers(0, labels, (height, width)).astype(np.uint8)
    return image, mask


def run(transform, image, mask):
    out = transform({"image": [image], "annotation": [Image.fromarray(mask) if mask.dtype == np.uint8 else mask]})
    return out["pixel_values"][0], out["labels"][0]


def reference(processor, image, mask):
    """What inference's processor gives for `image` (and the map), padded to the patch grid."""
    inputs = processor(images=[image], segmentation_maps=[mask], return_tensors="pt")
    return inputs["pixel_values"][0], inputs["labels"][0]


def test_a_flip_gives_the_processors_pixels_flipped(processor):
    image, mask = sample()
    transform = SegmentationTransform(processor, train=True, augmentation=A.Compose([A.HorizontalFlip(p=1.0)]))
    pixel_values, labels = run(transform, image, mask)
    expected_pixels, expected_labels = reference(processor, image.transpose(Image.FLIP_LEFT_RIGHT), mask[:, ::-1])
    torch.testing.assert_close(pixel_values, expected_pixels)
    torch.testing.assert_close(labels, expected_labels)


def test_transformers_convention_with_normalize_and_to_tensor_gives_the_same(processor):
    image, mask = sample()
    plain = A.Compose([A.HorizontalFlip(p=1.0)])
    convention = A.Compose([A.HorizontalFlip(p=1.0), A.Normalize(mean=processor.image_mean, std=processor.image_std,
                                                                 max_pixel_value=255.0), A.ToTensorV2()])
    ours = run(SegmentationTransform(processor, train=True, augmentation=plain), image, mask)
    theirs = run(SegmentationTransform(processor, train=True, augmentation=convention), image, mask)
    torch.testing.assert_close(theirs[0], ours[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs[1], ours[1])


def test_pixels_from_outside_the_image_are_ignored_whatever_fill_mask_says(processor):
    image, mask = sample(40, 48)
    pad = A.Compose([A.PadIfNeeded(64, 64, position="center", fill_mask=0)])  # fill_mask 0 would be class 0
    pixel_values, labels = run(SegmentationTransform(processor, train=True, crop_size=64, augmentation=pad),
                               image, mask)
    assert pixel_values.shape == (3, 64, 64) and labels.shape == (64, 64)
    inside = np.zeros((64, 64), dtype=bool)
    inside[12:52, 8:56] = True
    np.testing.assert_array_equal(labels.numpy()[inside].reshape(40, 48), mask)
    assert (labels.numpy()[~inside] == IGNORE).all()

    rotate = A.Compose([A.Rotate(limit=(45, 45), p=1.0, fill_mask=7)])
    _, labels = run(SegmentationTransform(processor, train=True, augmentation=rotate), image, mask)
    values = set(np.unique(labels.numpy()).tolist())
    assert IGNORE in values and 7 not in values and values <= {0, 1, 2, IGNORE}
    corners = labels.numpy()[[0, 0, 39, 39], [0, 47, 0, 47]]
    assert (corners == IGNORE).all()


def test_padding_to_the_crop_and_reduced_labels(tmp_path):
    processor = ViTSegImageProcessor(patch_size=8, do_reduce_labels=True)
    image, mask = sample(30, 20, labels=4)
    crop = A.Compose([A.RandomCrop(24, 16)])
    pixel_values, labels = run(SegmentationTransform(processor, train=True, crop_size=(32, 32), seed=0,
                                                     augmentation=crop), image, mask)
    assert pixel_values.shape == (3, 32, 32)
    assert (labels[24:, :] == IGNORE).all() and (labels[:, 16:] == IGNORE).all()
    assert (pixel_values[:, 24:, :] == 0).all()  # the processor's padding: the mean colour
    reduced = set(np.unique(labels[:24, :16].numpy()).tolist())
    assert reduced <= {0, 1, 2, IGNORE} and 3 not in reduced  # 0 -> 255, k -> k - 1, before the Compose


def test_many_labels_and_a_negative_ignore_index_travel_exactly(processor):
    image, _ = sample(32, 32)
    mask = np.random.default_rng(3).integers(0, 300, (32, 32)).astype(np.int64)
    for ignore_index in (1000, -100):  # uint16 and float32 masks inside the Compose
        transform = SegmentationTransform(processor, train=True, ignore_index=ignore_index,
                                          augmentation=A.Compose([A.Rotate(limit=(90, 90), p=1.0)]))
        _, labels = run(transform, image, mask)
        np.testing.assert_array_equal(labels.numpy(), np.rot90(mask))  # a quarter turn moves every label exactly


def test_a_16_bit_image_reaches_the_compose_as_float(processor):
    array = np.random.default_rng(0).integers(0, 65536, (24, 32)).astype(np.uint16)
    image = Image.fromarray(array)
    mask = np.zeros((24, 32), dtype=np.uint8)
    flip = SegmentationTransform(processor, train=True, augmentation=A.Compose([A.HorizontalFlip(p=1.0)]))
    pixel_values, _ = run(flip, image, mask)
    expected, _ = reference(processor, Image.fromarray(np.ascontiguousarray(array[:, ::-1])), mask)
    torch.testing.assert_close(pixel_values, expected, rtol=1e-4, atol=1e-4)
    normalizing = A.Compose([A.Normalize(mean=processor.image_mean, std=processor.image_std)])
    with pytest.raises(ValueError, match="not 8-bit.*remove A.Normalize"):
        run(SegmentationTransform(processor, train=True, augmentation=normalizing), image, mask)


def test_seeded_like_the_built_in_steps_and_the_callers_compose_untouched(processor):
    image, mask = sample()
    compose = A.Compose([A.RandomCrop(24, 24), A.HorizontalFlip(), A.Rotate(limit=40)], seed=123)
    first = SegmentationTransform(processor, train=True, seed=7, augmentation=compose)
    second = SegmentationTransform(processor, train=True, seed=7, augmentation=compose)
    a, b = run(first, image, mask), run(second, image, mask)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    outcomes = set()
    for epoch in range(4):
        first.set_epoch(epoch)
        outcomes.add(run(first, image, mask)[1].numpy().tobytes())
    assert len(outcomes) > 1, "every epoch the same augmentation"
    assert compose.seed == 123 and first.augmentation is not compose


def test_eval_mode_ignores_the_compose_and_prepare_datasets_passes_it(processor):
    datasets = pytest.importorskip("datasets")
    image, mask = sample()
    data = datasets.Dataset.from_dict({"image": [image], "annotation": [Image.fromarray(mask)]})
    data = data.cast_column("image", datasets.Image()).cast_column("annotation", datasets.Image())
    flip = A.Compose([A.HorizontalFlip(p=1.0)])
    train, evaluation = prepare_datasets(data, data, processor, None, augmentation=flip)
    expected_flipped = reference(processor, image.transpose(Image.FLIP_LEFT_RIGHT), mask[:, ::-1])
    expected_plain = reference(processor, image, mask)
    torch.testing.assert_close(train[0]["labels"], expected_flipped[1])
    torch.testing.assert_close(evaluation[0]["labels"], expected_plain[1])
    torch.testing.assert_close(evaluation[0]["pixel_values"], expected_plain[0])


def test_mistakes_are_named(processor):
    image, mask = sample()
    with pytest.raises(TypeError, match="must be an albumentations transform"):
        SegmentationTransform(processor, train=True, augmentation=lambda image, mask: {"image": image, "mask": mask})
    with pytest.raises(ValueError, match="replaces the built-in steps, so hflip, photometric would be ignored"):
        SegmentationTransform(processor, train=True, hflip=False, photometric=False,
                              augmentation=A.Compose([A.HorizontalFlip()]))
    with pytest.raises(ValueError, match=r"A.Normalize\(mean=\[0.5\], std=\[0.5\].*image_mean=\[0.485"):
        SegmentationTransform(processor, train=True, augmentation=A.Compose([A.Normalize(mean=0.5, std=0.5)]))
    too_large = SegmentationTransform(processor, train=True, crop_size=16, augmentation=A.Compose([A.NoOp()]))
    with pytest.raises(ValueError, match=r"larger than crop_size \(16, 16\): end it with a crop"):
        run(too_large, image, mask)
    poisoned = SegmentationTransform(processor, train=True, augmentation=A.Compose(
        [A.Lambda(image=lambda pixels, **kwargs: np.where(pixels > 128, np.inf, pixels / 255.0))]))
    with pytest.raises(ValueError, match=r"Compose returned an image with \d+ NaN or infinite value"):
        run(poisoned, image, mask)


def test_train_takes_a_compose_through_augment(tmp_path, tiny_backbone_dir):
    """`train(augment={"augmentation": Compose})`: the run trains on it and its records stay JSON."""
    import json

    from conftest import tiny_model
    from test_train import make_image_folder

    from hf_vitseg.data import load_image_folder
    from hf_vitseg.training import train

    data = load_image_folder(*make_image_folder(tmp_path / "data", 4))
    calls = []

    class Counting(A.HorizontalFlip):  # an albumentations transform that counts the samples it sees
        def apply(self, img, **params):
            calls.append(img.shape)
            return super().apply(img, **params)

    compose = A.Compose([Counting(p=1.0), A.Rotate(limit=20, p=1.0)])
    model, _ = train(tiny_model(backbone=tiny_backbone_dir), data, output_dir=tmp_path / "out", crop_size=32,
                     max_steps=2, batch_size=2, augment={"augmentation": compose}, seed=0)
    images = [shape for shape in calls if len(shape) == 3]  # apply() also moves the masks, (H, W)
    assert len(images) >= 4 and set(images) == {(32, 32, 3)}  # 2 steps x 2 samples of 32 x 32
    for record in (tmp_path / "out").glob("*.json"):
        json.loads(record.read_text())
