"""Tests for `ViTSegImageProcessor`: conversion rules, patch alignment, labels, round trips, remote code."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from hf_vitseg.modeling.image_processing_vitseg import (
    ViTSegImageProcessor,
    _resample_box,
    reduce_labels,
)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def raw_processor(**kwargs):
    """A processor that only rescales to [0, 1], so pixel values are easy to predict."""
    return ViTSegImageProcessor(do_normalize=False, **kwargs)


def random_rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Patch alignment and padding
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width, patch_size",
    [(30, 41, 14), (15, 15, 16), (28, 14, 14), (1, 99, 14), (17, 64, 16)],
)
def test_pad_makes_sides_multiples_of_patch_size(height, width, patch_size):
    image = random_rgb(height, width)
    out = ViTSegImageProcessor(patch_size=patch_size)(image)
    pixel_values = out["pixel_values"]
    expected_hw = (-(-height // patch_size) * patch_size, -(-width // patch_size) * patch_size)
    assert pixel_values.shape == (1, 3, *expected_hw)
    assert pixel_values.dtype == torch.float32
    # The image sits top-left, normalised; the padding is 0 after normalisation.
    expected = (image.transpose(2, 0, 1) / 255.0 - MEAN[:, None, None]) / STD[:, None, None]
    torch.testing.assert_close(pixel_values[0, :, :height, :width], torch.from_numpy(expected.astype(np.float32)))
    padding = torch.ones(expected_hw, dtype=torch.bool)
    padding[:height, :width] = False
    assert torch.all(pixel_values[0][:, padding] == 0)


@pytest.mark.parametrize("ignore_index", [255, 200])
def test_label_padding_uses_ignore_index(ignore_index):
    labels = np.random.default_rng(1).integers(0, 5, (30, 41), dtype=np.uint8)
    out = ViTSegImageProcessor(ignore_index=ignore_index)(random_rgb(30, 41), segmentation_maps=labels)
    assert out["labels"].shape == (1, 42, 42)
    assert out["labels"].dtype == torch.int64
    assert torch.equal(out["labels"][0, :30, :41], torch.from_numpy(labels.astype(np.int64)))
    assert torch.all(out["labels"][0, 30:, :] == ignore_index)
    assert torch.all(out["labels"][0, :, 41:] == ignore_index)


def test_crop_mode_center_crops_image_and_labels_together():
    image = random_rgb(30, 41)
    labels = np.arange(30 * 41, dtype=np.int32).reshape(30, 41)
    out = raw_processor(size_divisor_mode="crop")(image, segmentation_maps=labels, return_input_sizes=True)
    assert out["pixel_values"].shape == (1, 3, 28, 28)
    top, left = (30 - 28) // 2, (41 - 28) // 2
    assert torch.equal(out["labels"][0], torch.from_numpy(labels[top : top + 28, left : left + 28].astype(np.int64)))
    expected = image[top : top + 28, left : left + 28].transpose(2, 0, 1) / 255.0
    torch.testing.assert_close(out["pixel_values"][0], torch.from_numpy(expected.astype(np.float32)))
    assert out["input_sizes"].tolist() == [[28, 28]]


def test_pad_to_size_fixed_target_and_errors():
    processor = ViTSegImageProcessor(patch_size=16, pad_to_size={"height": 64, "width": 48})
    out = processor(random_rgb(20, 33), segmentation_maps=np.zeros((20, 33), np.uint8))
    assert out["pixel_values"].shape == (1, 3, 64, 48)
    assert torch.all(out["labels"][0, 20:] == 255)
    with pytest.raises(ValueError, match=r"pad_to_size \(64, 48\) is smaller than image size\(s\) \[\(70, 33\)\]"):
        processor(random_rgb(70, 33))
    with pytest.raises(ValueError, match="must be a multiple of `patch_size`"):
        ViTSegImageProcessor(patch_size=16, pad_to_size={"height": 50, "width": 48})


def test_batch_of_two_differently_sized_images():
    images = [random_rgb(30, 41, seed=2), random_rgb(50, 20, seed=3)]
    maps = [np.full((30, 41), 1, np.uint8), np.full((50, 20), 2, np.uint8)]
    processor = ViTSegImageProcessor()
    out = processor(images, segmentation_maps=maps, return_input_sizes=True)
    assert out["pixel_values"].shape == (2, 3, 56, 42)  # max (50, 41) rounded up to multiples of 14
    assert out["labels"].shape == (2, 56, 42)
    assert out["input_sizes"].tolist() == [[30, 41], [50, 20]]
    for index, (image, seg_map) in enumerate(zip(images, maps)):
        height, width = seg_map.shape
        alone = processor(image)["pixel_values"][0]
        torch.testing.assert_close(out["pixel_values"][index, :, :height, :width], alone[:, :height, :width])
        assert torch.all(out["labels"][index, :height, :width] == seg_map[0, 0])
        assert (out["labels"][index] == 255).sum() == 56 * 42 - height * width
    # A 4-D array is a batch too.
    stacked = ViTSegImageProcessor()(np.stack([random_rgb(28, 28, seed=4), random_rgb(28, 28, seed=5)]))
    assert stacked["pixel_values"].shape == (2, 3, 28, 28)


# --------------------------------------------------------------------------------------------------
# Resizing and labels
# --------------------------------------------------------------------------------------------------


def test_nearest_resize_keeps_label_values_and_matches_pil():
    values = np.array([0, 3, 7, 200], dtype=np.uint8)
    labels = values[np.random.default_rng(6).integers(0, 4, (37, 53))]
    processor = ViTSegImageProcessor(do_resize=True, size={"height": 23, "width": 61})
    out = processor(random_rgb(37, 53), segmentation_maps=Image.fromarray(labels))
    resized = out["labels"][0, :23, :61].numpy()
    assert set(np.unique(resized)) <= set(values.tolist())
    pil_nearest = np.array(Image.fromarray(labels).resize((61, 23), resample=Image.Resampling.NEAREST))
    np.testing.assert_array_equal(resized, pil_nearest)


def test_shortest_edge_resize_keeps_aspect_ratio():
    processor = raw_processor(do_resize=True, size={"shortest_edge": 28}, return_input_sizes=True)
    out = processor(random_rgb(40, 100), segmentation_maps=np.zeros((40, 100), np.uint8))
    assert out["input_sizes"].tolist() == [[28, 70]]
    assert out["pixel_values"].shape == (1, 3, 28, 70)
    # Bilinear on a constant image stays constant (float resampling, no quantisation).
    constant = raw_processor(do_resize=True, size=28)(np.full((40, 100, 3), 77, np.uint8))["pixel_values"]
    torch.testing.assert_close(constant, torch.full_like(constant, 77 / 255))


def test_reduce_labels_mapping():
    seg_map = np.array([[0, 1, 2], [150, 255, 0]], dtype=np.int64)
    expected = np.array([[255, 0, 1], [149, 255, 255]])
    np.testing.assert_array_equal(reduce_labels(seg_map, 255), expected)
    out = ViTSegImageProcessor(do_reduce_labels=True)(random_rgb(2, 3), segmentation_maps=seg_map.astype(np.uint8))
    assert torch.equal(out["labels"][0, :2, :3], torch.from_numpy(expected))


# --------------------------------------------------------------------------------------------------
# The image conversion rule
# --------------------------------------------------------------------------------------------------


def _pil_white(mode):
    """A 5x7 image of `mode` whose every pixel is that mode's full intensity."""
    size = (7, 5)
    if mode == "P":
        image = Image.new("P", size, 3)
        image.putpalette([0, 0, 0] * 3 + [255, 255, 255] + [0, 0, 0] * 252)
        return image
    full = {
        "1": 1,
        "L": 255,
        "RGB": (255, 255, 255),
        "RGBA": (255, 255, 255, 0),  # fully transparent: alpha is dropped, not composited
        "LA": (255, 0),
        "I": 65535,
        "I;16": 65535,
        "F": 1.0,
        "CMYK": (0, 0, 0, 0),
    }[mode]
    return Image.new(mode, size, full)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "I", "I;16", "F", "CMYK"])
def test_every_pil_mode_gives_three_channels_on_the_unit_scale(mode):
    out = raw_processor(patch_size=1)(_pil_white(mode), return_tensors="np")["pixel_values"]
    assert out.shape == (1, 3, 5, 7)
    np.testing.assert_allclose(out, 1.0, rtol=0, atol=1e-6)


def test_sixteen_bit_full_scale_normalises_like_white():
    out = ViTSegImageProcessor(patch_size=1)(_pil_white("I;16"), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(out[:, 0, 0], (1.0 - MEAN) / STD, rtol=1e-5)


@pytest.mark.parametrize(
    "array",
    [
        np.full((5, 7), 51, np.uint8),  # HW
        np.full((5, 7, 1), 51, np.uint8),  # HW1
        np.full((5, 7, 3), 51, np.uint8),  # HWC
        np.full((3, 5, 7), 51, np.uint8),  # CHW
        np.full((5, 7, 4), 51, np.uint8),  # HWC + alpha
        np.full((5, 7), 13107, np.uint16),  # 16-bit: 13107 / 65535 = 0.2
        np.full((5, 7, 3), 13107, np.int32),  # other ints are 16-bit data
        np.full((5, 7), 0.2, np.float64),  # floats are already in [0, 1]
        torch.full((3, 5, 7), 51, dtype=torch.uint8),  # tensors too
        torch.full((3, 5, 7), 0.2, dtype=torch.bfloat16),  # bfloat16, which numpy lacks
    ],
    ids=["HW", "HW1", "HWC", "CHW", "HWC4", "uint16", "int32", "float", "tensor", "bf16"],
)
def test_array_layouts_and_dtypes(array):
    out = raw_processor(patch_size=1)(array, return_tensors="np")["pixel_values"]
    assert out.shape == (1, 3, 5, 7)
    np.testing.assert_allclose(out, 0.2, atol=2e-3)


def test_channel_layout_tie_break_and_override():
    # (3, 6, 4): both ends look like channels; numpy reads HWC, torch reads CHW, unless told otherwise.
    array = np.arange(3 * 6 * 4, dtype=np.uint8).reshape(3, 6, 4)
    processor = raw_processor(patch_size=1, do_rescale=False)
    assert processor(array)["pixel_values"].shape == (1, 3, 3, 6)
    assert processor(torch.from_numpy(array))["pixel_values"].shape == (1, 3, 6, 4)
    assert processor(array, input_data_format="channels_first")["pixel_values"].shape == (1, 3, 6, 4)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((8, 8, 2), np.uint8), r"Unsupported image shape \(8, 8, 2\).*C in \(1, 3, 4\)"),
        (np.zeros((5, 8, 8), np.uint8), r"Unsupported image shape \(5, 8, 8\).*C in \(1, 3, 4\)"),
        (torch.zeros(8, 8, 5), r"Unsupported image shape \(8, 8, 5\)"),
        (np.zeros((2, 8, 8), np.uint8), r"Unsupported image shape \(2, 8, 8\)"),
        (np.zeros((8,), np.uint8), r"Unsupported image shape \(8,\)"),
        (np.full((8, 8), 200.0, np.float32), r"Floating-point images must lie in \[0, 1\]; got values in \[200, 200\]"),
        (np.full((8, 8), -3, np.int32), r"must lie in \[0, 65535\]"),
    ],
)
def test_bad_images_raise_clear_errors(image, message):
    with pytest.raises(ValueError, match=message):
        ViTSegImageProcessor()(image)


def test_bad_channel_count_with_explicit_layout():
    with pytest.raises(ValueError, match=r"Unsupported number of channels 2 in an image of shape \(2, 8, 8\)"):
        ViTSegImageProcessor()(np.zeros((8, 8, 2), np.uint8), input_data_format="channels_last")


def test_unsupported_input_type():
    with pytest.raises(TypeError, match="must be a PIL.Image.Image, numpy.ndarray or torch.Tensor"):
        ViTSegImageProcessor()("image.png")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("kind", ["numpy", "torch", "pil-F"])
def test_non_finite_pixels_are_rejected(bad, kind):
    # One NaN used to make every logit NaN, and it disabled the range check (min() / max() of NaN pass it).
    array = np.full((8, 8), 0.5, np.float32)
    array[3, 4] = bad
    image = {"numpy": array, "torch": torch.from_numpy(array), "pil-F": Image.fromarray(array, mode="F")}[kind]
    with pytest.raises(ValueError, match=r"holds 1 non-finite pixel value\(s\) \(NaN or inf\) of 64 pixels"):
        ViTSegImageProcessor()(image)


@pytest.mark.parametrize("name", ["image_mean", "image_std"])
@pytest.mark.parametrize("value", [[0.5, 0.5, 0.5, 0.5], [0.5, 0.5]], ids=["4", "2"])
def test_wrong_length_mean_or_std_is_a_clear_error(name, value):
    # It used to be numpy's "operands could not be broadcast together", at the first call.
    with pytest.raises(ValueError, match=rf"`{name}` must hold 3 values \(one per RGB channel"):
        ViTSegImageProcessor(**{name: value})
    with pytest.raises(ValueError, match=rf"`{name}` must hold 3 values"):
        ViTSegImageProcessor()(random_rgb(8, 8), **{name: value})
    with pytest.raises(ValueError, match="image_std` must hold finite values above 0"):
        ViTSegImageProcessor(image_std=[0.2, 0.0, 0.2])


def test_a_single_mean_and_std_apply_to_every_channel():
    out = ViTSegImageProcessor(image_mean=0.5, image_std=0.5, patch_size=8)(np.full((8, 8, 3), 255, np.uint8))
    assert torch.all(out["pixel_values"] == 1.0)


@pytest.mark.parametrize(
    "image, what",
    [
        (Image.new("L", (8, 8)), "mode 'L'"),
        (Image.new("RGBA", (8, 8)), "mode 'RGBA'"),
        (np.zeros((8, 8), np.uint8), "1 channel"),
        (np.zeros((8, 8, 4), np.uint8), "4 channel"),
    ],
    ids=["pil-L", "pil-RGBA", "grey-array", "rgba-array"],
)
def test_do_convert_rgb_false_is_honoured(image, what):
    # Nothing is converted, so what is not RGB already is an error saying so (it used to be converted silently).
    with pytest.raises(ValueError, match=f"do_convert_rgb=False: the image .*{what}"):
        ViTSegImageProcessor(do_convert_rgb=False)(image)
    with pytest.raises(ValueError, match="do_convert_rgb=False"):
        ViTSegImageProcessor()(image, do_convert_rgb=False)
    assert ViTSegImageProcessor(patch_size=8)(image)["pixel_values"].shape == (1, 3, 8, 8)  # converted by default
    rgb = random_rgb(8, 8)
    for rgb_image in (rgb, Image.fromarray(rgb)):
        converted = ViTSegImageProcessor(patch_size=8)(rgb_image)["pixel_values"]
        unconverted = ViTSegImageProcessor(patch_size=8, do_convert_rgb=False)(rgb_image)["pixel_values"]
        assert torch.equal(unconverted, converted)


# --------------------------------------------------------------------------------------------------
# Segmentation-map errors and accepted forms
# --------------------------------------------------------------------------------------------------


def test_mismatched_image_and_map_sizes():
    message = r"Image 0 has size \(H, W\) = \(30, 41\) but its segmentation map has size \(41, 30\)"
    with pytest.raises(ValueError, match=message):
        ViTSegImageProcessor()(random_rgb(30, 41), segmentation_maps=np.zeros((41, 30), np.uint8))
    with pytest.raises(ValueError, match="Got 2 images but 1 segmentation maps"):
        ViTSegImageProcessor()([random_rgb(8, 8), random_rgb(8, 8)], segmentation_maps=[np.zeros((8, 8), np.uint8)])


@pytest.mark.parametrize(
    "seg_map",
    [Image.new("RGB", (8, 8)), np.zeros((8, 8, 3), np.uint8), torch.zeros(3, 8, 8, dtype=torch.uint8)],
    ids=["pil-rgb", "numpy-hwc", "tensor-chw"],
)
def test_colour_coded_map_is_rejected(seg_map):
    with pytest.raises(ValueError, match="colour-coded mask must be converted to class indices"):
        ViTSegImageProcessor()(random_rgb(8, 8), segmentation_maps=seg_map)


@pytest.mark.parametrize(
    "seg_map",
    [
        Image.fromarray(np.full((8, 8), 3, np.uint8)),  # L
        Image.fromarray(np.full((8, 8), 3, np.uint8)).convert("P"),  # P keeps the indices
        Image.new("I", (8, 8), 3),
        Image.fromarray(np.full((8, 8), 3, np.uint16)),  # I;16
        np.full((1, 8, 8), 3, np.int64),  # singleton channel
        torch.full((8, 8), 3.0),  # whole-number floats
    ],
    ids=["L", "P", "I", "I;16", "1HW", "float"],
)
def test_accepted_segmentation_maps(seg_map):
    out = ViTSegImageProcessor(patch_size=8)(random_rgb(8, 8), segmentation_maps=seg_map)
    assert torch.all(out["labels"] == 3)


def test_fractional_float_map_is_rejected():
    with pytest.raises(ValueError, match="must hold whole numbers"):
        ViTSegImageProcessor()(random_rgb(8, 8), segmentation_maps=np.full((8, 8), 0.5))


def test_stacked_maps_for_a_batch():
    images = np.stack([random_rgb(14, 14, seed=7), random_rgb(14, 14, seed=8)])
    maps = np.stack([np.full((14, 14), 1), np.full((14, 14), 2)])
    out = ViTSegImageProcessor()(images, segmentation_maps=maps)
    assert out["labels"][:, 0, 0].tolist() == [1, 2]


# --------------------------------------------------------------------------------------------------
# Settings: validation, overrides, save / load
# --------------------------------------------------------------------------------------------------


def test_invalid_settings_fail_at_construction():
    with pytest.raises(ValueError, match="size_divisor_mode"):
        ViTSegImageProcessor(size_divisor_mode="stretch")
    with pytest.raises(ValueError, match="`size` must be"):
        ViTSegImageProcessor(size={"longest_edge": 10})
    with pytest.raises(ValueError, match="does not use `do_center_crop`"):
        ViTSegImageProcessor(do_center_crop=True)


NON_DEFAULT_SETTINGS = {
    "do_resize": True,
    "size": {"height": 40, "width": 56},
    "resample": Image.Resampling.BICUBIC,
    "do_rescale": True,
    "rescale_factor": 1 / 510,
    "do_normalize": True,
    "image_mean": [0.5, 0.4, 0.3],
    "image_std": [0.2, 0.3, 0.4],
    "patch_size": 8,
    "size_divisor_mode": "crop",
    "ignore_index": 99,
    "do_reduce_labels": True,
    "pad_to_size": {"height": 64, "width": 64},
    "return_input_sizes": True,
}


def test_save_pretrained_round_trip_keeps_every_setting(tmp_path):
    processor = ViTSegImageProcessor(**NON_DEFAULT_SETTINGS)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    for key, value in NON_DEFAULT_SETTINGS.items():
        assert saved[key] == pytest.approx(value), key
    loaded = ViTSegImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()

    image, seg_map = random_rgb(45, 50), np.random.default_rng(9).integers(0, 5, (45, 50), dtype=np.uint8)
    expected, actual = processor(image, segmentation_maps=seg_map), loaded(image, segmentation_maps=seg_map)
    assert expected.keys() == actual.keys() == {"pixel_values", "labels", "input_sizes", "input_boxes"}
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])
    assert expected["pixel_values"].shape == (1, 3, 64, 64)


def test_call_time_override_and_numpy_output():
    processor = ViTSegImageProcessor()
    out = processor(random_rgb(20, 20), patch_size=16, return_tensors="np")
    assert isinstance(out["pixel_values"], np.ndarray)
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert processor.patch_size == 14


# --------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------


class _Outputs:
    def __init__(self, logits):
        self.logits = logits


def _padded_logits(image_hw, padded_hw, stride):
    """One-hot logits at `stride`: class 1 over the image, class 2 over the padding."""
    h, w = padded_hw[0] // stride, padded_hw[1] // stride
    logits = torch.zeros(1, 3, h, w)
    logits[0, 2] = 1.0
    logits[0, 2, : image_hw[0] // stride, : image_hw[1] // stride] = 0.0
    logits[0, 1, : image_hw[0] // stride, : image_hw[1] // stride] = 1.0
    return logits


def test_post_process_target_sizes_and_plain_argmax():
    processor = ViTSegImageProcessor()
    logits = torch.randn(2, 4, 3, 5)
    maps = processor.post_process_semantic_segmentation(_Outputs(logits), target_sizes=[(30, 41), (7, 9)])
    assert [tuple(m.shape) for m in maps] == [(30, 41), (7, 9)]
    assert all(m.dtype == torch.int64 for m in maps)
    plain = processor.post_process_semantic_segmentation(_Outputs(logits))
    assert torch.equal(plain[1], logits[1].argmax(0))


def test_post_process_cuts_the_padding_away():
    processor = ViTSegImageProcessor(do_resize=True, size={"shortest_edge": 30}, return_input_sizes=True)
    original = Image.fromarray(random_rgb(60, 80))  # resized to 30 x 40, padded to 42 x 42
    inputs = processor(original)
    input_sizes, input_boxes = inputs.pop("input_sizes"), inputs.pop("input_boxes")
    padded_size = inputs["pixel_values"].shape[-2:]
    assert input_sizes.tolist() == [[30, 40]] and tuple(padded_size) == (42, 42)
    assert input_boxes.tolist() == [[0, 0, 30, 40]]
    outputs = _Outputs(_padded_logits((30, 40), (42, 42), stride=2))

    target = [original.size[::-1]]
    naive = processor.post_process_semantic_segmentation(outputs, target_sizes=target)[0]
    assert (naive == 2).any()  # stretched over the target, the padding class leaks into the image
    for geometry in ({"input_sizes": input_sizes}, {"input_boxes": input_boxes}):
        cut = processor.post_process_semantic_segmentation(
            outputs, target_sizes=target, padded_size=padded_size, **geometry
        )[0]
        assert cut.shape == (60, 80) and torch.all(cut == 1)
    at_logits = processor.post_process_semantic_segmentation(outputs, input_sizes=input_sizes, padded_size=padded_size)
    assert at_logits[0].shape == (15, 20) and torch.all(at_logits[0] == 1)
    with pytest.raises(ValueError, match="need `padded_size`"):
        processor.post_process_semantic_segmentation(outputs, input_sizes=input_sizes)
    with pytest.raises(ValueError, match="not both"):
        processor.post_process_semantic_segmentation(
            outputs, input_sizes=input_sizes, input_boxes=input_boxes, padded_size=padded_size
        )


def test_post_process_without_geometry_is_a_plain_resize():
    # Issue 13 item 16: target_sizes alone never make the processor assume it padded the input. A 49 x 49 image
    # the user resized to 98 x 98 (no padding needed at patch 14) used to be taken for a padded 49 x 49 one
    # (padded to 56): the map was cut to 49/56 of the logits and stretched, shifted by up to 7 pixels.
    processor = ViTSegImageProcessor()
    logits = torch.randn(1, 4, 98, 98)
    maps = processor.post_process_semantic_segmentation(_Outputs(logits), target_sizes=[(49, 49)])[0]
    expected = F.interpolate(logits, size=(49, 49), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(maps, expected)


def test_post_process_return_segmentation_scores():
    # transformers 5's convention (e.g. SegformerImageProcessor): per image, `segmentation` and the resized scores.
    processor = ViTSegImageProcessor()
    logits = torch.randn(2, 4, 3, 5)
    results = processor.post_process_semantic_segmentation(
        _Outputs(logits), target_sizes=[(30, 41), (7, 9)], return_segmentation_scores=True
    )
    plain = processor.post_process_semantic_segmentation(_Outputs(logits), target_sizes=[(30, 41), (7, 9)])
    for result, label_map, size in zip(results, plain, [(30, 41), (7, 9)]):
        assert set(result.keys()) == {"segmentation", "segmentation_scores"}
        assert torch.equal(result.segmentation, label_map)
        assert result.segmentation_scores.shape == (4, *size)
        assert torch.equal(result.segmentation_scores.argmax(0), label_map)
    at_logits = processor.post_process_semantic_segmentation(_Outputs(logits), return_segmentation_scores=True)
    assert torch.equal(at_logits[1]["segmentation_scores"], logits[1])


def test_post_process_crop_keeps_geometry():
    # A vertical class boundary at image column 20 of 40 must land at column 40 of an 80-wide target.
    logits = torch.zeros(1, 3, 42, 42)
    logits[0, 2] = 1.0
    logits[0, 2, :30, :40] = 0.0
    logits[0, 1, :30, :20] = 1.0
    logits[0, 0, :30, 20:40] = 1.0
    maps = ViTSegImageProcessor().post_process_semantic_segmentation(
        _Outputs(logits), target_sizes=[(60, 80)], input_sizes=[(30, 40)], padded_size=(42, 42)
    )
    assert torch.all(maps[0][:, :40] == 1) and torch.all(maps[0][:, 40:] == 0)


@pytest.mark.parametrize("out_hw", [(37, 53), (8, 6), (15, 20)], ids=["up", "down", "same"])
def test_box_resampling_matches_interpolate(out_hw):
    logits = torch.randn(1, 5, 21, 21)  # covering a 42 x 42 canvas at stride 2
    # A box ending on a logits row equals interpolating the exact crop; the whole canvas equals plain interpolate.
    cropped = F.interpolate(logits[..., :15, :20], size=out_hw, mode="bilinear", align_corners=False)
    torch.testing.assert_close(_resample_box(logits, (0, 0, 30, 40), (42, 42), out_hw), cropped, atol=1e-5, rtol=1e-5)
    whole = F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)
    torch.testing.assert_close(_resample_box(logits, (0, 0, 42, 42), (42, 42), out_hw), whole, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Exact post-processing (issue 13 item 16): the ground truth, as one-hot logits, comes back unchanged
# --------------------------------------------------------------------------------------------------


NUM_CLASSES = 4


def _one_hot_logits(labels: torch.Tensor) -> torch.Tensor:
    """`(B, H, W)` labels (padding = 255) -> `(B, NUM_CLASSES + 1, H, W)` one-hot logits, padding its own class."""
    classes = labels.masked_fill(labels == 255, NUM_CLASSES)
    return F.one_hot(classes, NUM_CLASSES + 1).permute(0, 3, 1, 2).float()


def _block_labels(height, width, block, seed):
    """Random classes in `block x block` squares: what a 1/2 nearest-neighbour downsizing keeps exactly."""
    coarse = np.random.default_rng(seed).integers(0, NUM_CLASSES, (-(-height // block), -(-width // block)))
    return np.kron(coarse, np.ones((block, block), dtype=np.int64))[:height, :width]


def _edge_extended(core, top, bottom, left, right):
    """`core` with its border rows / columns repeated outward: what a centre crop loses and the nearest restores."""
    return np.pad(core, ((top, bottom), (left, right)), mode="edge")


@pytest.mark.parametrize(
    "settings, ground_truth",
    [
        ({}, np.random.default_rng(0).integers(0, NUM_CLASSES, (50, 70))),  # padded to 56 x 70
        ({"do_resize": True, "size": {"shortest_edge": 50}},  # 2x up, padded to 56 x 70
         np.random.default_rng(1).integers(0, NUM_CLASSES, (25, 35))),
        ({"do_resize": True, "size": {"shortest_edge": 30}}, _block_labels(60, 80, 4, seed=2)),  # 1/2, padded to 42
        ({"size_divisor_mode": "crop"},  # 50 x 75 centre-cropped to 42 x 70
         _edge_extended(np.random.default_rng(3).integers(0, NUM_CLASSES, (42, 70)), 4, 4, 2, 3)),
    ],
    ids=["padded", "resized-up", "resized-down", "cropped"],
)
def test_post_processing_gives_the_ground_truth_back_exactly(settings, ground_truth):
    processor = ViTSegImageProcessor(patch_size=14, **settings)
    height, width = ground_truth.shape
    # A smaller image in the same batch, of patch multiples (a crop keeps it whole), padded to the first one's size.
    second = np.random.default_rng(4).integers(0, NUM_CLASSES, (28, 42))
    inputs = processor(
        [random_rgb(height, width), random_rgb(28, 42)], segmentation_maps=[ground_truth, second],
        return_input_sizes=True,
    )
    logits = _one_hot_logits(inputs["labels"])  # what a perfect model at stride 1 would say, padding included
    maps = processor.post_process_semantic_segmentation(
        _Outputs(logits), target_sizes=[(height, width), (28, 42)], input_boxes=inputs["input_boxes"],
        padded_size=inputs["pixel_values"].shape[-2:],
    )
    assert torch.equal(maps[0], torch.from_numpy(ground_truth))
    if "do_resize" not in settings:
        assert torch.equal(maps[1], torch.from_numpy(second))


def test_post_processing_after_the_users_own_resizing_is_exact():
    # The user resized a 49 x 49 image to 98 x 98 (a multiple of 14: no padding) and passes the original size.
    ground_truth = np.random.default_rng(5).integers(0, NUM_CLASSES, (49, 49))
    resized = torch.from_numpy(np.kron(ground_truth, np.ones((2, 2), dtype=np.int64)))[None]
    maps = ViTSegImageProcessor(patch_size=14).post_process_semantic_segmentation(
        _Outputs(_one_hot_logits(resized)), target_sizes=[(49, 49)]
    )
    assert torch.equal(maps[0], torch.from_numpy(ground_truth))


# --------------------------------------------------------------------------------------------------
# Remote code: loadable where hf_vitseg is not installed
# --------------------------------------------------------------------------------------------------


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["hf_vitseg"] = None  # any import of hf_vitseg now fails
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    folder, inputs_path, outputs_path = sys.argv[1:4]
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__name__ == "ViTSegImageProcessor", type(processor)
    assert not type(processor).__module__.startswith("hf_vitseg"), type(processor).__module__
    data = np.load(inputs_path)
    images = [data["image_a"], Image.fromarray(data["image_b"])]
    maps = [data["map_a"], data["map_b"]]
    out = processor(images, segmentation_maps=maps, return_tensors="np")
    np.savez(outputs_path, **dict(out))
    assert "torchvision" not in sys.modules, "loading the processor imported torchvision"
    """
)


def test_remote_code_loading_without_hf_vitseg(tmp_path, monkeypatch):
    # register_for_auto_class sets a class attribute; restore it after the test.
    monkeypatch.setattr(ViTSegImageProcessor, "_auto_class", ViTSegImageProcessor._auto_class)
    ViTSegImageProcessor.register_for_auto_class("AutoImageProcessor")
    processor = ViTSegImageProcessor(do_resize=True, size={"shortest_edge": 20}, patch_size=16, ignore_index=99)
    folder = tmp_path / "checkpoint"
    processor.save_pretrained(folder)
    assert (folder / "image_processing_vitseg.py").is_file()
    config = json.loads((folder / "preprocessor_config.json").read_text())
    assert config["auto_map"] == {"AutoImageProcessor": "image_processing_vitseg.ViTSegImageProcessor"}

    rng = np.random.default_rng(10)
    arrays = {
        "image_a": random_rgb(31, 45, seed=11),
        "image_b": rng.integers(0, 65536, (50, 22), dtype=np.uint16),
        "map_a": rng.integers(0, 4, (31, 45), dtype=np.uint8),
        "map_b": rng.integers(0, 4, (50, 22), dtype=np.uint8),
    }
    np.savez(tmp_path / "inputs.npz", **arrays)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", _REMOTE_SCRIPT, str(folder), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr

    remote = np.load(tmp_path / "out.npz")
    local = processor(
        [arrays["image_a"], Image.fromarray(arrays["image_b"])],
        segmentation_maps=[arrays["map_a"], arrays["map_b"]],
        return_tensors="np",
    )
    assert set(remote.files) == set(local.keys()) == {"pixel_values", "labels"}
    for key in remote.files:
        np.testing.assert_array_equal(remote[key], local[key])
