"""Sliding-window inference, test-time augmentation and overlays, on small deterministic dummy models."""

import math
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from hf_vitseg.inference import (
    colorize,
    forward_logits,
    gaussian_importance_map,
    make_palette,
    overlay,
    predict_logits,
    side_by_side,
    sliding_window_inference,
    sliding_window_starts,
)

PATCH = 14
NUM_LABELS = 3


class PatchConvModel(nn.Module):
    """The segmentation-model contract in miniature: a patchify conv (kernel = stride = patch, as a
    ViT's patch embedding) and a 1x1 classifier, logits at H/patch.

    `full_resolution=True` repeats each patch's logits over its pixels, so the logits come out at the
    input size and bilinear upsampling is the identity: every output pixel then depends only on its
    own patch, and the model is exactly equivariant to translations by multiples of the patch size.
    With the coarse output that is not so: the upsampled logits near a window's border interpolate
    towards the border patch instead of the neighbour outside the window.
    """

    def __init__(self, full_resolution=False, mirror_symmetric=False, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.full_resolution = full_resolution
        self.patchify = nn.Conv2d(3, 8, kernel_size=PATCH, stride=PATCH)
        self.classifier = nn.Conv2d(8, NUM_LABELS, kernel_size=1)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
            if mirror_symmetric:  # a kernel equal to its own mirror image makes the model flip-equivariant
                self.patchify.weight.copy_((self.patchify.weight + self.patchify.weight.flip(-1)) / 2)

    def forward(self, pixel_values):
        logits = self.classifier(torch.relu(self.patchify(pixel_values)))  # (B, C, H/p, W/p)
        if self.full_resolution:
            logits = logits.repeat_interleave(PATCH, dim=-2).repeat_interleave(PATCH, dim=-1)  # (B, C, H, W)
        return types.SimpleNamespace(logits=logits)


class ConstantModel(PatchConvModel):
    """Constant logits (the classifier's bias) everywhere: whatever the blending, the result must be that constant."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.classifier.weight.zero_()
            self.classifier.bias.copy_(torch.tensor([1.5, -0.5, 0.25]))


def images(batch, height, width, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def plain_reference(model, pixel_values):
    """Plain inference written out: one forward pass, logits upsampled bilinearly to the input size."""
    logits = model(pixel_values=pixel_values).logits
    return F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- sliding window


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
def test_single_window_equals_plain_inference(blend):
    model = PatchConvModel().eval()
    pixel_values = images(2, 4 * PATCH, 6 * PATCH)
    result = sliding_window_inference(
        model, pixel_values, crop_size=(4 * PATCH, 6 * PATCH), stride=PATCH, blend=blend, patch_size=PATCH
    )
    torch.testing.assert_close(result, plain_reference(model, pixel_values), atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
def test_sliding_window_equals_plain_inference_on_translation_equivariant_model(blend, batch_size):
    # Crop, stride and image size are patch multiples, so every window (the border-aligned last ones
    # too) sits on the patch grid, where the full-resolution model is exactly translation-equivariant.
    model = PatchConvModel(full_resolution=True).eval()
    pixel_values = images(2, 11 * PATCH, 13 * PATCH)
    result = sliding_window_inference(
        model, pixel_values, crop_size=4 * PATCH, stride=(2 * PATCH, 3 * PATCH), blend=blend,
        batch_size=batch_size, patch_size=PATCH,
    )  # fmt: skip
    torch.testing.assert_close(result, plain_reference(model, pixel_values), atol=1e-5, rtol=0)


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
def test_blend_weights_are_normalised(blend):
    # Blending constant logits gives back the constant only if the weights at every pixel sum to one.
    model = ConstantModel().eval()
    pixel_values = images(1, 150, 211)  # not multiples of the crop, the stride or the patch
    result = sliding_window_inference(model, pixel_values, crop_size=56, stride=42, blend=blend, patch_size=PATCH)
    expected = model.classifier.bias.detach()[None, :, None, None].expand_as(result)
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=0)


def test_gaussian_importance_map():
    importance = gaussian_importance_map((56, 70))
    assert importance.shape == (56, 70) and importance.dtype == torch.float32
    assert (importance > 0).all()
    assert importance.max() == pytest.approx(1.0, abs=0.01)  # the peak lies between the middle pixels
    torch.testing.assert_close(importance, importance.flip(0))
    torch.testing.assert_close(importance, importance.flip(1))
    # sigma = 1/8 of the window, so the border is about 4 sigma from the centre: exp(-8) ~ 3e-4.
    sigma_h, sigma_w = 56 / 8, 70 / 8
    expected = math.exp(-0.5 * (27.5 / sigma_h) ** 2 - 0.5 * (0.5 / sigma_w) ** 2)  # pixel centres
    assert importance[0, 35].item() == pytest.approx(expected, rel=1e-4)
    assert importance[0, 35] < importance[14, 35] < importance[28, 35]


@pytest.mark.parametrize("length", [56, 57, 100, 111, 112, 500])
def test_window_starts_cover_the_axis_and_end_on_the_border(length):
    crop, stride = 56, 42
    starts = sliding_window_starts(length, crop, stride)
    assert starts[0] == 0 and starts[-1] == length - crop
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))


def test_crop_size_must_be_a_patch_multiple():
    with pytest.raises(ValueError, match="multiple of the model's size divisor 14"):
        sliding_window_inference(PatchConvModel(), images(1, 56, 56), crop_size=50, stride=25, patch_size=PATCH)


def test_size_divisor_is_read_from_the_model():
    model = PatchConvModel().eval()
    with pytest.raises(TypeError, match="PatchConvModel has no `size_divisor`.*pass patch_size="):
        sliding_window_inference(model, images(1, 56, 56), crop_size=28, stride=14)
    model.size_divisor = PATCH  # ViTSegForSemanticSegmentation's property: the one place that says it
    with pytest.raises(ValueError, match="multiple of the model's size divisor 14"):
        sliding_window_inference(model, images(1, 56, 56), crop_size=50, stride=25)
    assert sliding_window_inference(model, images(1, 56, 56), crop_size=28, stride=14).shape == (1, 3, 56, 56)


def test_stride_larger_than_crop_is_an_error():
    with pytest.raises(ValueError, match="stride"):
        sliding_window_inference(PatchConvModel(), images(1, 56, 56), crop_size=28, stride=42, patch_size=PATCH)


def test_num_labels_mismatch_is_an_error():
    with pytest.raises(ValueError, match="num_labels"):
        sliding_window_inference(PatchConvModel(), images(1, 56, 56), num_labels=5, crop_size=28, stride=14,
                                 patch_size=PATCH)


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
def test_image_smaller_than_crop_is_padded_and_cropped_back(blend):
    model = PatchConvModel().eval()
    pixel_values = images(2, 20, 33)  # smaller than the crop, and not a patch multiple
    result = sliding_window_inference(model, pixel_values, crop_size=42, stride=28, blend=blend, patch_size=PATCH)
    padded = F.pad(pixel_values, (0, 42 - 33, 0, 42 - 20))
    torch.testing.assert_close(result, plain_reference(model, padded)[..., :20, :33], atol=1e-6, rtol=0)


def test_image_smaller_than_crop_along_one_axis():
    model = PatchConvModel(full_resolution=True).eval()
    pixel_values = images(1, 20, 7 * PATCH)
    result = sliding_window_inference(model, pixel_values, crop_size=(28, 56), stride=28, patch_size=PATCH)
    padded = F.pad(pixel_values, (0, 0, 0, 8))
    torch.testing.assert_close(result, plain_reference(model, padded)[..., :20, :], atol=1e-5, rtol=0)


def test_output_size_resizes_the_blended_logits():
    model = PatchConvModel().eval()
    pixel_values = images(1, 70, 84)
    kwargs = dict(crop_size=42, stride=28, blend="gaussian", patch_size=PATCH)
    at_input_size = sliding_window_inference(model, pixel_values, **kwargs)
    resized = sliding_window_inference(model, pixel_values, output_size=(100, 130), **kwargs)
    expected = F.interpolate(at_input_size, size=(100, 130), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized, expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- test-time augmentation


@pytest.mark.parametrize(
    "sliding_window", [None, dict(crop_size=(3 * PATCH, 5 * PATCH), stride=PATCH, blend="gaussian")]
)
def test_tta_without_augmentation_is_plain_inference(sliding_window):
    model = PatchConvModel().eval()
    pixel_values = images(2, 3 * PATCH, 5 * PATCH)
    result = predict_logits(model, pixel_values, sliding_window=sliding_window, patch_size=PATCH)
    expected = plain_reference(model, pixel_values).log_softmax(dim=1)
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(forward_logits(model, pixel_values).log_softmax(dim=1), expected, atol=1e-6, rtol=0)


def test_tta_flip_of_a_flip_equivariant_model_changes_nothing():
    pixel_values = images(2, 3 * PATCH, 5 * PATCH)
    symmetric = PatchConvModel(mirror_symmetric=True).eval()
    flipped = predict_logits(symmetric, pixel_values, flip=True, patch_size=PATCH)
    torch.testing.assert_close(flipped, predict_logits(symmetric, pixel_values, patch_size=PATCH), atol=1e-5, rtol=0)
    # ...while for a model that is not, the mirrored view really is used.
    asymmetric = PatchConvModel().eval()
    difference = predict_logits(asymmetric, pixel_values, flip=True, patch_size=PATCH) - predict_logits(
        asymmetric, pixel_values, patch_size=PATCH
    )
    assert difference.abs().max() > 1e-3


def test_tta_averages_probabilities_over_scales():
    model = PatchConvModel().eval()
    pixel_values = images(1, 45, 61)  # rescaled views are padded to patch multiples
    kwargs = dict(patch_size=PATCH)
    averaged = predict_logits(model, pixel_values, scales=(0.5, 1.5), **kwargs)
    assert averaged.shape == (1, NUM_LABELS, 45, 61)
    per_scale = [predict_logits(model, pixel_values, scales=(scale,), **kwargs).exp() for scale in (0.5, 1.5)]
    torch.testing.assert_close(averaged.exp(), (per_scale[0] + per_scale[1]) / 2, atol=1e-6, rtol=0)
    torch.testing.assert_close(averaged.exp().sum(dim=1), torch.ones(1, 45, 61), atol=1e-5, rtol=0)


def test_tta_with_sliding_window_over_scales_and_flips():
    model = PatchConvModel().eval()
    pixel_values = images(1, 60, 90)
    window = dict(crop_size=42, stride=28, blend="gaussian", batch_size=2)
    result = predict_logits(model, pixel_values, scales=(0.75, 1.25), flip=True, sliding_window=window,
                            patch_size=PATCH)
    assert result.shape == (1, NUM_LABELS, 60, 90) and torch.isfinite(result).all()


# ---------------------------------------------------------------- palettes and overlays


def test_palette_is_deterministic_and_distinct():
    for num_labels in (1, 2, 19, 20, 21, 150, 256):
        palette = make_palette(num_labels)
        assert palette.shape == (num_labels, 3) and palette.dtype == np.uint8
        np.testing.assert_array_equal(palette, make_palette(num_labels))
        assert len({tuple(color) for color in palette}) == num_labels
    np.testing.assert_array_equal(make_palette(5), make_palette(20)[:5])  # small palettes are fixed
    assert not np.array_equal(make_palette(50, seed=0), make_palette(50, seed=1))


@pytest.mark.parametrize("num_labels", [2, 21, 150])
def test_palette_with_black_background(num_labels):
    palette = make_palette(num_labels, black_background=True)
    assert tuple(palette[0]) == (0, 0, 0)
    assert len({tuple(color) for color in palette}) == num_labels


def label_map_with_classes(height, width):
    """Classes 0, 2 and 5 in vertical bands, and an ignored square."""
    labels = np.zeros((height, width), dtype=np.int64)
    labels[:, width // 3 :] = 2
    labels[:, 2 * width // 3 :] = 5
    labels[:4, :4] = 255
    return labels


def test_colorize_uses_the_palette_and_paints_ignored_pixels_black():
    labels = label_map_with_classes(12, 18)
    palette = make_palette(6)
    colors = np.asarray(colorize(labels, palette))
    assert colors.shape == (12, 18, 3)
    np.testing.assert_array_equal(colors[5, 0], palette[0])
    np.testing.assert_array_equal(colors[5, -1], palette[5])
    np.testing.assert_array_equal(colors[0, 0], (0, 0, 0))
    with pytest.raises(ValueError, match="no colour"):
        colorize(labels, make_palette(3))


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (30, 20), (10, 200, 30)),
        np.full((20, 30), 128, dtype=np.uint8),
        np.arange(20 * 30 * 3, dtype=np.uint16).reshape(20, 30, 3) * 50,
        np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30),
        np.random.default_rng(0).normal(size=(20, 30, 3)).astype(np.float32),
        Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100),
    ],
    ids=["pil", "gray-uint8", "rgb-uint16", "float01", "normalised-float", "pil-16bit"],
)
def test_overlay_size_and_legend_lists_exactly_the_present_classes(image):
    labels = label_map_with_classes(20, 30)
    id2label = {str(k): f"class {k}" for k in range(7)}  # str keys, as after a JSON round trip
    without_legend = overlay(image, labels, id2label=id2label, legend=False)
    assert without_legend.size == (30, 20) and without_legend.mode == "RGB"
    with_legend = overlay(image, labels, id2label=id2label)
    assert with_legend.width == 30 and with_legend.height > 20
    assert [(k, name) for k, name, _ in with_legend.info["legend"]] == [(0, "class 0"), (2, "class 2"), (5, "class 5")]
    assert with_legend.info["legend"] == without_legend.info["legend"]
    np.testing.assert_array_equal(np.asarray(with_legend)[:20], np.asarray(without_legend))
    legend_strip = np.asarray(with_legend)[20:]
    assert (legend_strip != 255).any()  # swatches and names were drawn


def test_overlay_blends_with_alpha_and_leaves_ignored_pixels_alone():
    image = np.full((20, 30, 3), 100, dtype=np.uint8)
    labels = label_map_with_classes(20, 30)
    palette = make_palette(6)
    assert np.array_equal(np.asarray(overlay(image, labels, palette, alpha=0.0, legend=False)), image)
    full = np.asarray(overlay(image, labels, palette, alpha=1.0, legend=False))
    np.testing.assert_array_equal(full[10, -1], palette[5])
    np.testing.assert_array_equal(full[0, 0], (100, 100, 100))
    half = np.asarray(overlay(image, labels, palette, alpha=0.5, legend=False))
    np.testing.assert_array_equal(half[10, 0], np.round((100 + palette[0].astype(float)) / 2))


def test_overlay_legend_names_default_to_class_ids_and_size_mismatch_is_an_error():
    labels = label_map_with_classes(20, 30)
    result = overlay(np.zeros((20, 30), dtype=np.uint8), torch.from_numpy(labels))
    assert [name for _, name, _ in result.info["legend"]] == ["0", "2", "5"]
    with pytest.raises(ValueError, match="same"):
        overlay(np.zeros((21, 30), dtype=np.uint8), labels)


def test_side_by_side():
    panels = [Image.new("RGB", (30, 20), "red"), np.zeros((25, 40), dtype=np.uint8), Image.new("L", (10, 10))]
    figure = side_by_side(panels, ["image", "ground truth", "prediction"])
    assert figure.mode == "RGB"
    assert figure.width == 30 + 40 + 10 + 2 * 8 and figure.height > 25
    assert side_by_side(panels).size == (96, 25)
    with pytest.raises(ValueError, match="titles"):
        side_by_side(panels, ["only one"])
