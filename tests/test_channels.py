"""Any number of input channels (issue 12 item 3).

The pretrained patch embedding adapted by timm's `adapt_input_conv` rule with every other weight bit for bit, for
every backbone family; per-channel statistics in the config and the processor; multi-channel, 16-bit and float
images read without conversion (NumPy arrays, TIFF files through tifffile, 16-bit PNG); `hf-vitseg train /
evaluate / predict / push` and reloading for 1, 2, 4 and 13 channels; the errors.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, save_tiny_backbone, tiny_model
from PIL import Image
from test_hub import HubRecorder

from hf_vitseg import ViTSegConfig, ViTSegForSemanticSegmentation, ViTSegImageProcessor
from hf_vitseg.cli import main
from hf_vitseg.data.channels import channel_statistics, decode_image, read_image_file
from hf_vitseg.data.datasets import load_image_folder, validate_dataset
from hf_vitseg.inference.overlays import overlay
from hf_vitseg.modeling.backbone_adapter import adapt_input_conv, patch_embedding_conv

tifffile = pytest.importorskip("tifffile", reason="tifffile is the optional extra hf-vitseg[tiff] (in dev)")

REPO_ID = "hf-vitseg-tests/channels"
HEIGHT, WIDTH = 24, 32  # multiples of the tiny backbones' patch size 8


# -- the patch embedding ---------------------------------------------------------------------------------------


def test_adapt_input_conv_is_timms_rule():
    torch.manual_seed(0)
    weight = torch.randn(5, 3, 2, 2)
    red, green, blue = weight[:, 0:1], weight[:, 1:2], weight[:, 2:3]
    torch.testing.assert_close(adapt_input_conv(weight, 1), weight.sum(dim=1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(adapt_input_conv(weight, 2), torch.cat([red, green], 1) * 1.5, rtol=0, atol=0)
    torch.testing.assert_close(adapt_input_conv(weight, 4), torch.cat([red, green, blue, red], 1) * 0.75,
                               rtol=0, atol=0)
    thirteen = adapt_input_conv(weight, 13)
    assert thirteen.shape == (5, 13, 2, 2)
    for channel in range(13):  # R, G, B, R, ... scaled by 3 / 13
        torch.testing.assert_close(thirteen[:, channel], weight[:, channel % 3] * (3 / 13), rtol=0, atol=0)
    assert adapt_input_conv(weight, 3) is weight
    # a constant image gives the RGB response for 1 channel and multiples of 3 (the reason for the 3 / k scale)
    for k in (1, 6):
        ones = torch.nn.functional.conv2d(torch.ones(1, k, 2, 2), adapt_input_conv(weight, k))
        torch.testing.assert_close(ones, torch.nn.functional.conv2d(torch.ones(1, 3, 2, 2), weight))
    # computed in float32, returned in the weight's dtype (as timm does)
    half = adapt_input_conv(weight.bfloat16(), 4)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, (torch.cat([red, green, blue, red], 1).bfloat16().float() * 0.75).bfloat16())
    with pytest.raises(ValueError, match="defined for RGB"):
        adapt_input_conv(torch.randn(5, 4, 2, 2), 2)
    with pytest.raises(ValueError, match="4-D"):
        adapt_input_conv(torch.randn(5, 3), 1)


# one channel count per family, so that every family and every count is covered once
CHANNELS_BY_FAMILY = dict(zip(FAMILIES, [1, 2, 4, 13, 1, 2, 4, 13, 2, 4]))


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_backbone_adapts_only_the_patch_embedding(family, tmp_path):
    k = CHANNELS_BY_FAMILY[family]
    folder = save_tiny_backbone(tmp_path / "backbone", family)
    plain = ViTSegForSemanticSegmentation.from_pretrained_backbone(folder, num_labels=2)
    adapted = ViTSegForSemanticSegmentation.from_pretrained_backbone(
        folder, num_labels=2, num_channels=k, image_mean=[0.5] * k, image_std=[0.25] * k
    )
    conv_key = next(name for name, p in adapted.backbone.named_parameters()
                    if p is adapted.backbone.patch_embedding_conv().weight)
    plain_state, adapted_state = plain.backbone.state_dict(), adapted.backbone.state_dict()
    assert plain_state.keys() == adapted_state.keys()
    for name, value in plain_state.items():
        if name == conv_key:
            assert adapted_state[name].shape[1] == k
            assert torch.equal(adapted_state[name], adapt_input_conv(value, k))
        else:
            assert torch.equal(adapted_state[name], value), name
    assert adapted.config.num_channels == k == adapted.config.backbone_config.num_channels
    assert plain.config.num_channels == 3
    logits = adapted.eval()(torch.randn(1, k, 32, 32)).logits  # eval: BatchNorm on swin's 1x1 last stage
    assert logits.shape[:2] == (1, 2) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match=f"has 3 channels but the backbone expects {k}"):
        adapted(torch.randn(1, 3, 32, 32))


def test_saved_model_reloads_with_its_channels(tmp_path, tiny_backbone_dir):
    model = ViTSegForSemanticSegmentation.from_pretrained_backbone(
        tiny_backbone_dir, num_labels=2, num_channels=4, image_mean=[0.1, 0.2, 0.3, 0.4], image_std=[0.5] * 4
    ).eval()
    model.save_pretrained(tmp_path / "model")
    reloaded = ViTSegForSemanticSegmentation.from_pretrained(tmp_path / "model").eval()
    assert reloaded.config.num_channels == 4 and reloaded.config.image_mean == [0.1, 0.2, 0.3, 0.4]
    x = torch.randn(1, 4, 16, 24)
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)
    processor = ViTSegImageProcessor.for_model(reloaded)  # from the config: channels and statistics
    assert processor.num_channels == 4 and list(processor.image_mean) == [0.1, 0.2, 0.3, 0.4]


def test_a_patch_embedding_that_is_not_a_conv_is_refused():
    class LinearEmbedded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Linear(3 * 16 * 16, 8)

        def get_input_embeddings(self):
            return self.embed

    with pytest.raises(ValueError, match="MyFamily backbone's patch embedding .* is not one Conv2d"):
        patch_embedding_conv(LinearEmbedded(), "MyFamily")


def test_config_statistics_must_have_one_value_per_channel():
    config = tiny_model(num_labels=2).config.backbone_config
    config.num_channels = 4
    with pytest.raises(ValueError, match=r"image_mean has 3 value\(s\) but the model takes 4 input channel"):
        ViTSegConfig(backbone_config=config, num_labels=2, image_mean=[0.5] * 3, image_std=[0.2] * 4)
    with pytest.raises(ValueError, match="image_std must hold finite values above 0"):
        ViTSegConfig(backbone_config=config, num_labels=2, image_mean=[0.5] * 4, image_std=[0.2, 0.2, 0.0, 0.2])
    config = ViTSegConfig(backbone_config=config, num_labels=2, image_mean=[0.5] * 4, image_std=[0.2] * 4)
    assert config.num_channels == 4


# -- the processor -----------------------------------------------------------------------------------------------


def test_processor_reads_k_channel_arrays_as_they_are():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 65536, (HEIGHT, WIDTH, 5), dtype=np.uint16)
    processor = ViTSegImageProcessor(num_channels=5, patch_size=8, image_mean=[0.5] * 5, image_std=[0.25] * 5)
    expected = (image.astype(np.float32) * np.float32(255 / 65535) / np.float32(255) - 0.5) / 0.25
    expected = np.moveaxis(expected, -1, 0)
    last = processor(image, return_tensors="np")["pixel_values"][0]
    first = processor(np.moveaxis(image, -1, 0), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(last, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(first, last)
    # both ends hold 5 channels: numpy arrays are channels-last, torch tensors channels-first, unless told
    square = rng.random((5, 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(processor.image_channels_first(square), np.moveaxis(square, -1, 0))
    np.testing.assert_array_equal(processor.image_channels_first(torch.from_numpy(square)), square)
    np.testing.assert_array_equal(processor.image_channels_first(square, input_data_format="channels_first"), square)
    # float images in [0, 1] keep their values (x 255 onto the 0..255 scale); uint8 as it is
    floats = rng.random((HEIGHT, WIDTH, 5)).astype(np.float32)
    np.testing.assert_allclose(processor.process_image(floats), np.moveaxis(floats, -1, 0) * 255, rtol=1e-6)
    one = ViTSegImageProcessor(num_channels=1, patch_size=8)
    assert one(rng.integers(0, 65536, (HEIGHT, WIDTH), dtype=np.uint16))["pixel_values"].shape == (1, 1, HEIGHT, WIDTH)
    assert one(Image.fromarray(np.zeros((HEIGHT, WIDTH), np.uint16)))["pixel_values"].shape == (1, 1, HEIGHT, WIDTH)
    # the default statistics of a non-RGB processor: ImageNet's RGB average for every channel
    assert list(ViTSegImageProcessor(num_channels=2).image_mean) == [0.449, 0.449]


def test_processor_refuses_other_channel_counts_bad_statistics_and_non_finite_pixels():
    processor = ViTSegImageProcessor(num_channels=4, patch_size=8)
    with pytest.raises(ValueError, match=r"shape \(24, 32, 3\): a model with num_channels=4 takes images with "
                                         r"exactly 4 channel\(s\)"):
        processor(np.zeros((HEIGHT, WIDTH, 3), np.uint8))
    with pytest.raises(ValueError, match=r"exactly 4 channel"):
        processor(Image.new("RGB", (WIDTH, HEIGHT)))
    with pytest.raises(ValueError, match=r"`image_mean` must hold 4 values \(one per channel; num_channels=4\)"):
        ViTSegImageProcessor(num_channels=4, image_mean=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="`num_channels` must be a positive int"):
        ViTSegImageProcessor(num_channels=0)
    bad = np.zeros((4, HEIGHT, WIDTH), np.float32)
    bad[2, 3, 4] = np.nan
    with pytest.raises(ValueError, match=r"1 non-finite pixel value\(s\)"):
        processor(bad)
    model = tiny_model(num_labels=2)
    with pytest.raises(ValueError, match="makes 4-channel images, but the model takes 3 channel"):
        processor.check_model(model)


def test_16_bit_png_and_tiff_files_keep_every_channel(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 65536, (HEIGHT, WIDTH), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey.png")  # a 16-bit PNG (mode I;16)
    stack = rng.random((13, HEIGHT, WIDTH)).astype(np.float32)
    tifffile.imwrite(tmp_path / "stack.tif", stack)  # planar: (C, H, W)
    pair = rng.integers(0, 4096, (HEIGHT, WIDTH, 2), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "pair.tiff", pair)  # interleaved: (H, W, C)

    np.testing.assert_array_equal(np.asarray(read_image_file(tmp_path / "grey.png")), grey)
    np.testing.assert_array_equal(read_image_file(tmp_path / "stack.tif"), stack)
    np.testing.assert_array_equal(read_image_file(tmp_path / "pair.tiff"), pair)
    as_bytes = {"path": None, "bytes": (tmp_path / "stack.tif").read_bytes()}
    np.testing.assert_array_equal(decode_image(as_bytes), stack)
    thirteen = ViTSegImageProcessor(num_channels=13)
    np.testing.assert_allclose(thirteen.process_image(read_image_file(tmp_path / "stack.tif")), stack * 255,
                               rtol=1e-6)
    np.testing.assert_allclose(ViTSegImageProcessor(num_channels=1).process_image(
        read_image_file(tmp_path / "grey.png"))[0], grey * np.float32(255 / 65535), rtol=1e-6)

    stack[0, 0, 0] = np.inf
    tifffile.imwrite(tmp_path / "inf.tif", stack)
    with pytest.raises(ValueError, match=r"inf.tif holds 1 non-finite pixel value\(s\) \(NaN or infinite\)"):
        read_image_file(tmp_path / "inf.tif")


def test_tiff_without_tifffile_asks_for_the_extra(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "pair.tif", np.zeros((HEIGHT, WIDTH, 2), np.uint16))
    Image.fromarray(np.full((HEIGHT, WIDTH), 7, np.uint16)).save(tmp_path / "grey.tif")
    tifffile.imwrite(tmp_path / "rgba16.tif", np.zeros((HEIGHT, WIDTH, 4), np.uint16), photometric="rgb")
    monkeypatch.setitem(sys.modules, "tifffile", None)  # "not installed"
    assert np.asarray(read_image_file(tmp_path / "grey.tif")).max() == 7  # PIL reads a grey TIFF
    with pytest.raises(ImportError, match=r"needs tifffile, which is not installed .*24 pages .*hf-vitseg\[tiff\]"):
        read_image_file(tmp_path / "pair.tif")  # PIL would read 24 pages of 32 x 2 pixels
    with pytest.raises(ImportError, match="4 channels of 16 bits"):
        read_image_file(tmp_path / "rgba16.tif")  # PIL would read it as 8-bit RGBA


# -- data helpers --------------------------------------------------------------------------------------------------


def write_dataset(folder: Path, k: int, count: int = 3, seed: int = 0) -> tuple[Path, Path, list[np.ndarray]]:
    """`count` k-channel images with a bright rectangle of class 1: 16-bit PNG for k=1, TIFF (uint16) otherwise."""
    rng = np.random.default_rng(seed)
    images_dir, masks_dir = folder / "images", folder / "masks"
    images_dir.mkdir(parents=True)
    masks_dir.mkdir(parents=True)
    images = []
    for index in range(count):
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        top, left = rng.integers(0, 8), rng.integers(0, 12)
        mask[top : top + 12, left : left + 16] = 1
        image = rng.integers(0, 3000, (k, HEIGHT, WIDTH)).astype(np.uint16)
        image[:, mask == 1] += 30000
        if k == 1:
            Image.fromarray(image[0]).save(images_dir / f"s{index}.png")
        else:
            tifffile.imwrite(images_dir / f"s{index}.tif", image, photometric="minisblack")
        Image.fromarray(mask).save(masks_dir / f"s{index}.png")
        images.append(image)
    return images_dir, masks_dir, images


def test_channel_statistics_pool_every_pixel(tmp_path):
    images_dir, masks_dir, images = write_dataset(tmp_path, 4)
    dataset = load_image_folder(images_dir, masks_dir)
    mean, std = channel_statistics(dataset, ViTSegImageProcessor(num_channels=4))
    pixels = np.stack(images).astype(np.float64) / 65535  # the processor's [0, 1] scale for uint16
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 2, 3)), atol=2e-6)
    np.testing.assert_allclose(std, pixels.std(axis=(0, 2, 3)), atol=2e-6)
    with pytest.raises(ValueError, match=r"Image 0 of the training set: .*num_channels=2 takes images with exactly 2"):
        channel_statistics(dataset, ViTSegImageProcessor(num_channels=2))


def test_dataset_check_names_an_image_with_the_wrong_channel_count(tmp_path):
    images_dir, masks_dir, _ = write_dataset(tmp_path, 4)
    tifffile.imwrite(images_dir / "s1.tif", np.zeros((3, HEIGHT, WIDTH), np.uint16), photometric="minisblack")
    dataset = load_image_folder(images_dir, masks_dir)
    with pytest.raises(ValueError, match=r"Sample 1 \(s1.tif / s1.png\): .*num_channels=4 takes images with exactly 4"):
        validate_dataset(dataset, 2, 255, num_channels=4)


def test_overlay_shows_the_channels_asked_for():
    image = np.zeros((HEIGHT, WIDTH, 5), np.uint8)
    image[..., 3] = 200
    labels = np.full((HEIGHT, WIDTH), 255)
    shown = np.asarray(overlay(image, labels, display_channels=[3, 0, 3], legend=False))
    assert (shown[..., 0] == 200).all() and (shown[..., 1] == 0).all() and (shown[..., 2] == 200).all()
    grey = np.asarray(overlay(image, labels, display_channels=[3], legend=False))
    assert (grey == 200).all()
    assert (np.asarray(overlay(image, labels, legend=False)) == 0).all()  # default: the first three
    with pytest.raises(ValueError, match="three channels .* or one"):
        overlay(image, labels, display_channels=[0, 1])
    with pytest.raises(ValueError, match=r"channels \[5\] do not all exist in an image of 5 channel"):
        overlay(image, labels, display_channels=[5])


# -- the command line, 1, 2, 4 and 13 channels ---------------------------------------------------------------------


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    return HubRecorder(tmp_path, {}).install(monkeypatch)


@pytest.mark.parametrize("k", [1, 2, 4, 13])
def test_train_evaluate_predict_push_and_reload(k, tmp_path, tiny_backbone_dir, recorder, capsys):
    images_dir, masks_dir, images = write_dataset(tmp_path / "data", k)
    run = tmp_path / "run"
    # statistics computed from the training images for 1 and 4 channels, given for 2 and 13 (one value for all)
    stats = ["--image-stats", "auto"] if k in (1, 4) else ["--image-mean", "0.2", "--image-std", "0.3"]
    assert main(["train", "--backbone", str(tiny_backbone_dir), "--num-labels", "2", "--num-channels", str(k),
                 *stats, "--train-images", str(images_dir), "--train-masks", str(masks_dir),
                 "--eval-images", str(images_dir), "--eval-masks", str(masks_dir), "--crop-size", "16",
                 "--max-steps", "2", "--batch-size", "2", "--output-dir", str(run), "--cpu", "--json"]) == 0
    captured = capsys.readouterr()
    assert "eval_mean_iou" in json.loads(captured.out)
    config = json.loads((run / "config.json").read_text())
    saved_processor = json.loads((run / "preprocessor_config.json").read_text())
    assert config["backbone_config"]["num_channels"] == k == saved_processor["num_channels"]
    assert len(config["image_mean"]) == k and saved_processor["image_mean"] == config["image_mean"]
    if k in (1, 4):  # computed, logged, saved
        expected = (np.stack(images).astype(np.float64) / 65535).mean(axis=(0, 2, 3))
        np.testing.assert_allclose(config["image_mean"], expected, atol=2e-6)
        assert f"--image-stats auto: 3 training images, {k} channel(s): image_mean" in captured.err
    else:
        assert config["image_mean"] == [0.2] * k and config["image_std"] == [0.3] * k

    assert main(["evaluate", "--model", str(run), "--images", str(images_dir), "--masks", str(masks_dir),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 3

    image_file = next(images_dir.iterdir())
    display = ["--display-channels", "0"] if k < 3 else ["--display-channels", str(k - 1), "1", "0"]
    assert main(["predict", str(image_file), "--model", str(run), "--out", str(tmp_path / "pred"), *display]) == 0
    labels = np.asarray(Image.open(tmp_path / "pred" / f"{image_file.stem}_labels.png"))
    assert labels.shape == (HEIGHT, WIDTH) and set(np.unique(labels)) <= {0, 1}
    assert Image.open(tmp_path / "pred" / f"{image_file.stem}_overlay.png").size[0] == WIDTH

    assert main(["push", str(run), REPO_ID]) == 0
    capsys.readouterr()
    card = recorder.uploaded["README.md"].decode()
    assert f"**Input**: images with {k} channel{'s' if k > 1 else ''} (NumPy arrays `(H, W, {k})`" in card
    hub = tmp_path / "hub"
    hub.mkdir()
    for name, content in recorder.uploaded.items():
        (hub / name).parent.mkdir(parents=True, exist_ok=True)
        (hub / name).write_bytes(content)
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    remote = AutoModelForSemanticSegmentation.from_pretrained(hub, trust_remote_code=True).eval()
    remote_processor = AutoImageProcessor.from_pretrained(hub, trust_remote_code=True)
    local = ViTSegForSemanticSegmentation.from_pretrained(run).eval()
    assert remote.config.num_channels == k and remote_processor.num_channels == k
    pixel_values = remote_processor(read_image_file(image_file), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape[1] == k
    with torch.no_grad():
        torch.testing.assert_close(remote(pixel_values).logits, local(pixel_values).logits, rtol=0, atol=0)
    if k in (1, 13):  # the pipeline, as remote code: a 16-bit PNG's path (1 channel, unconverted), an array (13)
        from transformers import pipeline

        segmenter = pipeline("image-segmentation", model=str(hub), trust_remote_code=True)
        segments = segmenter(str(image_file) if k == 1 else read_image_file(image_file))
        assert type(segmenter).__name__ == "ViTSegSegmentationPipeline"
        assert segments and all(segment["mask"].size == (WIDTH, HEIGHT) for segment in segments)


def test_cli_channel_errors_name_the_flag(tmp_path, tiny_backbone_dir, capsys):
    images_dir, masks_dir, _ = write_dataset(tmp_path / "data", 4, count=1)
    base = ["train", "--backbone", str(tiny_backbone_dir), "--num-labels", "2", "--train-images", str(images_dir),
            "--train-masks", str(masks_dir), "--max-steps", "1", "--cpu"]
    cases = [
        (["--num-channels", "4", "--image-mean", "0.1", "0.2", "--image-std", "0.3"],
         "--image-mean has 2 values for 4 input channel(s) (--num-channels 4); give 4 (one per channel) or 1"),
        (["--num-channels", "4", "--image-mean", "0.1"], "--image-mean needs --image-std too"),
        (["--num-channels", "4", "--image-stats", "auto", "--image-mean", "0.1", "--image-std", "0.2"],
         "give either --image-stats auto or both values, not both"),
        (["--num-channels", "2", "--image-stats", "auto"], "--image-stats auto: Image 0 of the training set"),
        (["--image-std", "0"], "argument --image-std: expected a finite number > 0"),
    ]
    for index, (extra, message) in enumerate(cases):
        with pytest.raises(SystemExit) if "argument" in message else contextlib.nullcontext():
            code = main([*base, *extra, "--output-dir", str(tmp_path / f"run{index}")])
            assert code == 1
        err = capsys.readouterr().err
        assert message in err, err
        assert "Traceback" not in err
        assert not (tmp_path / f"run{index}" / "config.json").exists()

    model = tiny_model(num_labels=2, backbone=tiny_backbone_dir)
    model.save_pretrained(tmp_path / "model")
    ViTSegImageProcessor.for_model(model).save_pretrained(tmp_path / "model")
    assert main(["train", "--model", str(tmp_path / "model"), "--num-channels", "4", "--train-images",
                 str(images_dir), "--train-masks", str(masks_dir), "--output-dir", str(tmp_path / "again")]) == 1
    assert "--num-channels set up a fresh head and apply with --backbone only" in capsys.readouterr().err

    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (WIDTH, HEIGHT)).save(rgb)
    assert main(["predict", str(rgb), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "pred"),
                 "--display-channels", "0", "3", "1"]) == 1
    err = capsys.readouterr().err
    assert "--display-channels: channels [0, 3, 1] do not all exist in an image of 3 channel(s)" in err
    assert not (tmp_path / "pred").exists()


# -- heads that read the image, export ----------------------------------------------------------------------------


def test_unet_stem_reads_every_channel(tmp_path):
    from conftest import tiny_backbone_config

    backbone_config = tiny_backbone_config("dinov2")
    backbone_config.num_channels = 4
    model = tiny_model("unet", backbone_config=backbone_config, slim=True, num_labels=2)
    stem_conv = model.head.stem[0][0][0]
    assert stem_conv.in_channels == 4
    assert "image_channels" not in model.head.init_kwargs()  # the model sets it, not head_kwargs
    x, y = torch.randn(2, 4, 32, 48), torch.randint(0, 2, (2, 32, 48))
    model(x, labels=y).loss.backward()
    assert stem_conv.weight.grad is not None and stem_conv.weight.grad.abs().sum() > 0
    model.eval()
    model.save_pretrained(tmp_path / "unet4")
    reloaded = ViTSegForSemanticSegmentation.from_pretrained(tmp_path / "unet4").eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)


@pytest.mark.slow
def test_a_k_channel_model_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra: pip install hf-vitseg[onnx]")
    from conftest import tiny_backbone_config

    from hf_vitseg.export import export_onnx

    backbone_config = tiny_backbone_config("dinov2")
    backbone_config.num_channels = 2
    model = tiny_model("linear", backbone_config=backbone_config, num_labels=2).eval()
    export_onnx(model, tmp_path / "two.onnx", example_size=(32, 48))  # checked against onnxruntime inside
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "two.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1] == 2


def test_accuracy_benchmark_feeds_the_image_as_one_channel(tiny_backbone_dir):
    from benchmarks import accuracy

    results = accuracy.main(["--quick", "--backbone", str(tiny_backbone_dir), "--heads", "unet", "--num-channels",
                             "1", "--no-probe", "--finetune-top", "0"])
    row = next(r for r in results["scales"]["2"]["rows"] if r["name"] == "unet")
    assert "error" not in row and 0.0 <= row["fg_iou_mean"] <= 1.0
    assert results["settings"]["num_channels"] == 1
    assert accuracy.INPUT_CHANNELS == 3  # restored for whoever calls build_model next
    model = accuracy.build_model(str(tiny_backbone_dir), "linear", [4], seed=0)
    assert model.config.num_channels == 3
