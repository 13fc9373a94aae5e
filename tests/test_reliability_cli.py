"""Issue 13, items 9-15 from the command line: nothing silently wrong (NaN pixels, 0/255 masks, zero class
weights, a model that is not ViTSeg, huge images), every user error one line on stderr naming the flag, and
less noise (progress over images, transformers' bars only with -v, no pin_memory warning)."""

from __future__ import annotations

import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_backbone, tiny_model
from PIL import Image
from test_train import make_image_folder

from hf_vitseg import ViTSegForSemanticSegmentation, ViTSegImageProcessor
from hf_vitseg.cli import main
from hf_vitseg.cli import predict as predict_cli
from hf_vitseg.cli.evaluate import json_metrics
from hf_vitseg.data.datasets import binary_masks, load_image_folder, validate_dataset


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `hf-vitseg ARGV` in-process: (exit status, stdout, stderr); argparse's exits count as statuses."""
    capsys.readouterr()  # what fixtures printed is not the command's
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, *expected: str) -> None:
    """A user error: non-zero status, one line on stderr, no traceback, the expected words (flags) in it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert status not in (0, None), err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("hf-vitseg "), err
    for word in expected:
        assert word in lines[0], (word, err)
    for python_spelling in ("on_unmatched=", "mask_suffix=", "crop_size", "images_dir", "overwrite_output_dir=",
                            "train_dataset"):
        assert python_spelling not in lines[0], (python_spelling, err)


def write_pair(root: Path, name: str, image, mask: np.ndarray, image_ext: str = ".png") -> Path:
    path = root / "images" / f"{name}{image_ext}"
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)
    Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{name}.png")
    return path


def nan_image(height: int = 32, width: int = 32) -> Image.Image:
    """A float (mode F) image with one NaN pixel, as a TIFF from a microscope or a float pipeline can be."""
    array = np.full((height, width), 100.0, np.float32)
    array[3, 5] = np.nan
    return Image.fromarray(array, mode="F")


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    backbone = save_tiny_backbone(root / "backbone")
    model = tiny_model(backbone=backbone)
    model.save_pretrained(root / "model")
    ViTSegImageProcessor(patch_size=8).save_pretrained(root / "model")
    images, masks = make_image_folder(root / "data", 4)
    return {"root": root, "backbone": backbone, "model": root / "model", "images": images, "masks": masks}


def train_command(env, output_dir, *extra) -> list:
    return ["train", "--backbone", env["backbone"], "--num-labels", "3", "--train-images", env["images"],
            "--train-masks", env["masks"], "--output-dir", output_dir, "--max-steps", "1", "--batch-size", "2",
            "--crop-size", "32", "--logging-steps", "1", "--cpu", *extra]


def evaluate_command(env, *extra) -> list:
    return ["evaluate", "--model", env["model"], "--images", env["images"], "--masks", env["masks"], *extra]


@pytest.fixture(scope="module")
def resumable_run(env, tmp_path_factory):
    """A finished one-step CLI run with its checkpoint-1, to resume with changed settings."""
    output_dir = tmp_path_factory.mktemp("resume") / "run"
    assert main([str(a) for a in train_command(env, output_dir, "--save-steps", "1")]) == 0
    return output_dir


# -- item 14: user errors ----------------------------------------------------------------------------------------
def _bin_only_folder(env) -> Path:
    folder = env["root"] / "pickled_model"
    if not folder.exists():
        shutil.copytree(env["model"], folder)
        (folder / "model.safetensors").unlink()
        torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    return folder


def _truncated_weights_folder(env) -> Path:
    folder = env["root"] / "truncated_model"
    if not folder.exists():
        shutil.copytree(env["model"], folder)
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def _empty_saved_dataset(env) -> Path:
    import datasets

    folder = env["root"] / "empty_dataset"
    if not folder.exists():
        features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
        datasets.Dataset.from_dict({"image": [], "annotation": []}, features=features).save_to_disk(str(folder))
    return folder


def _truncated_image_folder(env) -> Path:
    root = env["root"] / "truncated_image_data"
    if not root.exists():
        make_image_folder(root, 2)
        path = root / "images" / "001.png"
        path.write_bytes(path.read_bytes()[:200])
    return root


def _unmatched_folder(env) -> Path:
    root = env["root"] / "unmatched_data"
    if not root.exists():
        make_image_folder(root, 2)
        Image.new("RGB", (32, 32)).save(root / "images" / "orphan.png")
    return root


USER_ERRORS = {
    # case: (command built from env and tmp_path, words the one-line message must hold)
    "head_kwargs_wrong_type": (
        lambda env, tmp: train_command(env, tmp / "o", "--head", "mlp", "--head-kwargs", '{"channels": "abc"}'),
        ['--head-kwargs {"channels": "abc"}', "'mlp'"]),
    "head_kwargs_not_an_object": (
        lambda env, tmp: train_command(env, tmp / "o", "--head-kwargs", "[1, 2]"), ["--head-kwargs"]),
    "device_cuda_without_cuda": (lambda env, tmp: evaluate_command(env, "--device", "cuda"), ["--device cuda"]),
    "predict_device_cuda_without_cuda": (
        lambda env, tmp: ["predict", env["images"] / "000.png", "--model", env["model"], "--out", tmp / "p",
                          "--device", "cuda"], ["--device cuda"]),
    "pickled_bin_only_evaluate": (lambda env, tmp: ["evaluate", "--model", _bin_only_folder(env), "--images",
                                                    env["images"], "--masks", env["masks"]],
                                  ["--model", "pytorch_model.bin", "safetensors"]),
    "pickled_bin_only_train": (lambda env, tmp: ["train", "--model", _bin_only_folder(env), "--train-images",
                                                 env["images"], "--train-masks", env["masks"], "--output-dir",
                                                 tmp / "o"], ["--model", "pytorch_model.bin"]),
    "empty_saved_dataset": (lambda env, tmp: ["train", "--backbone", env["backbone"], "--num-labels", "3",
                                              "--dataset", _empty_saved_dataset(env), "--output-dir", tmp / "o"],
                            ["--dataset", "empty"]),
    "truncated_weights_evaluate": (
        lambda env, tmp: ["evaluate", "--model", _truncated_weights_folder(env), "--images", env["images"],
                          "--masks", env["masks"]], ["--model", "model.safetensors", "truncated"]),
    "truncated_weights_train": (
        lambda env, tmp: ["train", "--model", _truncated_weights_folder(env), "--train-images", env["images"],
                          "--train-masks", env["masks"], "--output-dir", tmp / "o"],
        ["--model", "model.safetensors", "truncated"]),
    "missing_model_path": (lambda env, tmp: evaluate_command(env)[:1] + ["--model", tmp / "no" / "such" / "run",
                                                                          "--images", env["images"], "--masks",
                                                                          env["masks"]],
                           ["--model", "no such folder"]),
    "missing_relative_model_path": (lambda env, tmp: ["predict", env["images"] / "000.png", "--model",
                                                      "./runs/nope", "--out", tmp / "p"],
                                    ["--model ./runs/nope", "no such folder"]),
    "missing_backbone_path": (lambda env, tmp: ["train", "--backbone", tmp / "no" / "backbone", "--num-labels", "2",
                                                "--train-images", env["images"], "--train-masks", env["masks"],
                                                "--output-dir", tmp / "o"], ["--backbone", "no such folder"]),
    "backbone_folder_without_config": (
        lambda env, tmp: train_command(env, tmp / "o")[:1] + ["--backbone", env["images"]] + train_command(
            env, tmp / "o")[3:], ["--backbone", "config.json"]),
    "truncated_training_image": (
        lambda env, tmp: train_command(env, tmp / "o")[:5] + [
            "--train-images", _truncated_image_folder(env) / "images", "--train-masks",
            _truncated_image_folder(env) / "masks", "--output-dir", tmp / "o", "--cpu"],
        ["training data", "001.png", "truncated"]),
    "negative_epochs": (lambda env, tmp: train_command(env, tmp / "o", "--epochs", "-1"), ["--epochs"]),
    "nan_lr": (lambda env, tmp: train_command(env, tmp / "o", "--lr", "nan"), ["--lr"]),
    "zero_batch_size_train": (lambda env, tmp: train_command(env, tmp / "o", "--batch-size", "0"), ["--batch-size"]),
    "zero_batch_size_evaluate": (lambda env, tmp: evaluate_command(env, "--batch-size", "0"), ["--batch-size"]),
    "nan_scales": (lambda env, tmp: ["predict", env["images"] / "000.png", "--model", env["model"], "--out",
                                     tmp / "p", "--scales", "nan"], ["--scales"]),
    "folder_instead_of_image": (lambda env, tmp: ["predict", env["images"], "--model", env["model"], "--out",
                                                  tmp / "p"], ["is a folder"]),
    "unmatched_files_names_the_flag": (
        lambda env, tmp: train_command(env, tmp / "o")[:5] + [
            "--train-images", _unmatched_folder(env) / "images", "--train-masks", _unmatched_folder(env) / "masks",
            "--output-dir", tmp / "o"], ["orphan.png", "--skip-unmatched"]),
    "sliding_window_without_crop": (lambda env, tmp: evaluate_command(env, "--sliding-window"),
                                    ["--sliding-window", "--crop-size"]),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_error_is_one_line_naming_the_flag(case, env, tmp_path, capsys, monkeypatch):
    build, expected = USER_ERRORS[case]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch, also on a GPU machine
    status, _, err = cli(build(env, tmp_path), capsys)
    assert_one_line_error(status, err, *expected)
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()  # nothing written


@pytest.mark.parametrize(
    "change, flag",
    [
        (["--freeze-backbone"], "--freeze-backbone"),
        (["--config", '{"backbone_out_indices": [2]}'], "backbone_out_indices"),
        (["--ignore-index", "254"], "--ignore-index"),
    ],
)
def test_resume_with_changed_settings_is_refused_naming_the_flag(change, flag, env, resumable_run, capsys):
    config_before = (resumable_run / "config.json").read_bytes()
    command = train_command(env, resumable_run, "--resume", *change)
    command[command.index("--max-steps") + 1] = "2"
    status, _, err = cli(command, capsys)
    assert_one_line_error(status, err, "--resume", flag)
    assert (resumable_run / "config.json").read_bytes() == config_before  # the saved run is left as it was
    assert not (resumable_run / "checkpoint-2").exists()


def test_model_flags_of_a_fresh_head_are_refused_with_model(env, tmp_path, capsys):
    command = ["train", "--model", env["model"], "--head", "mlp", "--train-images", env["images"], "--train-masks",
               env["masks"], "--output-dir", tmp_path / "o"]
    status, _, err = cli(command, capsys)
    assert_one_line_error(status, err, "--head", "--backbone")


def test_argument_errors_come_before_the_model_loads(env, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("hf_vitseg.training.loading.load_trainable_model", refuse)
    monkeypatch.setattr("hf_vitseg.hub.loading.load_model", refuse)
    monkeypatch.setattr(ViTSegForSemanticSegmentation, "from_pretrained_backbone", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing = tmp_path / "missing"
    for command in (evaluate_command(env, "--crop-size", "16"), evaluate_command(env, "--device", "cuda"),
                    evaluate_command(env)[:4] + [missing, "--masks", env["masks"]],
                    train_command(env, tmp_path / "o")[:5] + ["--train-images", missing, "--train-masks", env["masks"],
                                                              "--output-dir", tmp_path / "o"],
                    ["predict", env["images"] / "000.png", "--model", env["model"], "--out", tmp_path / "p",
                     "--stride", "8"]):
        status, _, err = cli(command, capsys)
        assert_one_line_error(status, err)


def test_train_json_is_pure_json_on_stdout(env, tmp_path, capsys):
    command = train_command(env, tmp_path / "run", "--eval-images", env["images"], "--eval-masks", env["masks"],
                            "--json")
    status, out, err = cli(command, capsys)
    assert status == 0, err
    metrics = json.loads(out)  # the whole of stdout: no Trainer log line before it
    assert math.isfinite(metrics["train_loss"]) and "eval_mean_iou" in metrics
    assert "train_runtime" in err or "loss" in err  # Trainer's log lines went to stderr


def test_json_metrics_writes_nan_as_null():
    text = json_metrics({"mean_iou": 0.5, "iou_absent": float("nan"), "num_images": 2})
    assert json.loads(text) == {"mean_iou": 0.5, "iou_absent": None, "num_images": 2}
    assert "NaN" not in text


# -- item 9: non-finite pixels -------------------------------------------------------------------------------------
def test_predict_refuses_a_nan_pixel_naming_the_file(env, tmp_path, capsys):
    path = tmp_path / "float_image.tif"
    nan_image().save(path)
    status, _, err = cli(["predict", path, "--model", env["model"], "--out", tmp_path / "p"], capsys)
    assert_one_line_error(status, err, "float_image.tif", "NaN")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_train_and_evaluate_refuse_a_nan_pixel_naming_the_file(command, env, tmp_path, capsys):
    root = tmp_path / "data"
    images, masks = make_image_folder(root, 2)
    write_pair(root, "zz_nan", nan_image(), np.zeros((32, 32)), image_ext=".tif")
    if command == "train":
        argv = train_command(env, tmp_path / "o")[:5] + ["--train-images", images, "--train-masks", masks,
                                                          "--output-dir", tmp_path / "o"]
    else:
        argv = ["evaluate", "--model", env["model"], "--images", images, "--masks", masks]
    status, _, err = cli(argv, capsys)
    assert_one_line_error(status, err, "zz_nan.tif", "non-finite")


# -- item 10: 0/255 binary masks -----------------------------------------------------------------------------------
@pytest.fixture
def binary_data(tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "binary"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        mask = np.kron(rng.integers(0, 2, (4, 4)), np.ones((8, 8), np.int64)) * 255
        write_pair(root, f"{index:03d}", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), mask)
    return root / "images", root / "masks"


def test_binary_255_masks_are_refused_with_the_fix(binary_data):
    dataset = load_image_folder(*binary_data)
    with pytest.raises(ValueError, match="binary_masks") as error:
        validate_dataset(dataset, num_labels=2, ignore_index=255)
    assert "--binary-masks" in str(error.value)
    mapped = binary_masks(dataset)
    assert validate_dataset(mapped, num_labels=2, ignore_index=255) == 2
    original = np.array(Image.open(dataset.with_format(None).cast_column(
        "annotation", __import__("datasets").Image(decode=False))[0]["annotation"]["path"]))
    np.testing.assert_array_equal(np.array(mapped[0]["annotation"]), original // 255)


def test_binary_masks_flag_on_the_command_line(binary_data, env, tmp_path, capsys):
    images, masks = binary_data
    command = ["train", "--backbone", env["backbone"], "--num-labels", "2", "--train-images", images,
               "--train-masks", masks, "--output-dir", tmp_path / "o", "--max-steps", "1", "--batch-size", "2",
               "--crop-size", "32", "--cpu"]
    status, _, err = cli(command, capsys)
    assert_one_line_error(status, err, "--binary-masks")
    status, _, err = cli(command + ["--eval-images", images, "--eval-masks", masks, "--binary-masks", "--json"],
                         capsys)
    assert status == 0, err


# -- item 11: zero total class weight ------------------------------------------------------------------------------
def test_zero_total_class_weight_gives_zero_loss_and_finite_parameters():
    model = tiny_model(class_weights=[0.0, 1.0, 1.0])
    pixel_values = torch.randn(2, 3, 32, 32)
    only_class_0 = torch.zeros(2, 32, 32, dtype=torch.long)
    loss = model(pixel_values, labels=only_class_0).loss
    assert loss.item() == 0.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss.backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # with a weighted class present, the loss is a real, positive cross-entropy
    assert model(pixel_values, labels=only_class_0 + 1).loss.item() > 0


# -- item 12: a folder of another model type -----------------------------------------------------------------------
def test_predict_refuses_a_model_that_is_not_vitseg(env, tmp_path, capsys):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    folder = tmp_path / "segformer"
    config = SegformerConfig(num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], num_attention_heads=[1],
                             decoder_hidden_size=8, num_labels=2, patch_sizes=[3], strides=[2])
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    status, _, err = cli(["predict", env["images"] / "000.png", "--model", folder, "--out", tmp_path / "p"], capsys)
    assert_one_line_error(status, err, "--model", "segformer", "not a ViTSeg")
    assert not (tmp_path / "p").exists()


# -- item 13: images too large for one attention pass --------------------------------------------------------------
def test_predict_switches_large_images_to_sliding_windows(env, tmp_path, capsys, monkeypatch):
    image = tmp_path / "large.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(image)
    # the tiny model's backbone image size is 32: the default window is 32 x 32
    status, _, err = cli(["predict", image, "--model", env["model"], "--out", tmp_path / "windows",
                          "--sliding-window"], capsys)
    assert status == 0, err
    windowed = np.array(Image.open(tmp_path / "windows" / "large_labels.png"))

    monkeypatch.setattr(predict_cli, "MAX_PLAIN_TOKENS", 50)  # 64 x 96 at patch 8 = 96 tokens: too many
    status, _, err = cli(["predict", image, "--model", env["model"], "--out", tmp_path / "auto"], capsys)
    assert status == 0, err
    notices = [line for line in err.splitlines() if "sliding" in line]
    assert len(notices) == 1 and "96 patch tokens" in notices[0] and "32x32" in notices[0], err
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "auto" / "large_labels.png")), windowed)

    monkeypatch.setattr(predict_cli, "MAX_PLAIN_TOKENS", 96)  # at the limit: one plain pass, no notice
    status, _, err = cli(["predict", image, "--model", env["model"], "--out", tmp_path / "plain"], capsys)
    assert status == 0 and "sliding" not in err, err


# -- item 15: noise and waiting ------------------------------------------------------------------------------------
def test_predict_shows_progress_and_hides_transformers_bars_unless_verbose(env, tmp_path, capsys):
    images = [env["images"] / "000.png", env["images"] / "001.png"]
    status, out, err = cli(["predict", *images, "--model", env["model"], "--out", tmp_path / "quiet"], capsys)
    assert status == 0, err
    assert "2/2" in err and "image" in err  # the progress bar over images
    assert "Loading weights" not in err
    assert len(out.splitlines()) == 2  # one line per image written
    status, _, err = cli(["predict", *images, "--model", env["model"], "--out", tmp_path / "verbose", "-v"], capsys)
    assert status == 0 and "Loading weights" in err, err


def test_train_on_cpu_warns_nothing_about_pin_memory(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, also on a GPU one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # without --cpu: the run finds no GPU by itself (--cpu already switches pinning off in transformers)
        status, _, err = cli([a for a in train_command(env, tmp_path / "o") if a != "--cpu"], capsys)
    assert status == 0, err
    assert not [w for w in caught if "pin_memory" in str(w.message)]
    assert "pin_memory" not in err


def test_readme_names_the_file_a_custom_head_save_writes(tmp_path, monkeypatch):
    import importlib
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Your own head"):].split("\n## ", 1)[0]
    (tmp_path / "my_heads.py").write_text(re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    # a module of that name from another test must not answer the import, nor ours stay for later tests
    monkeypatch.setitem(sys.modules, "my_heads", None)
    del sys.modules["my_heads"]
    importlib.import_module("my_heads")  # the README's own head, registered as "my_head"
    tiny_model("my_head", num_labels=2).save_pretrained(tmp_path / "saved")
    written = sorted(p.name for p in (tmp_path / "saved").glob("*my_heads*.py"))
    assert written == ["vitseg_user_my_heads.py"]
    assert f"`{written[0]}`" in section  # the README names the file the save wrote


def test_notebook_output_folders_are_git_ignored():
    import re
    import subprocess

    repo = Path(__file__).parents[1]
    for notebook in sorted((repo / "notebooks").glob("*.ipynb")):
        default = re.search(r'HF_VITSEG_NB_OUTPUT_DIR\\", \\"([^\\"]+)\\"', notebook.read_text())
        assert default, notebook
        for where in (f"notebooks/{default.group(1)}/model.safetensors", f"{default.group(1)}/model.safetensors"):
            ignored = subprocess.run(["git", "check-ignore", "-q", where], check=False, cwd=repo)
            assert ignored.returncode == 0, f"{where} ({notebook.name}'s output) is not git-ignored"


def test_predict_on_a_lora_run_folder_says_it_holds_an_adapter(tmp_path, capsys):
    """A LoRA run folder (adapter, no config.json) given to predict: one line saying it is an adapter and how to
    merge it, not 'has no config.json ... save_pretrained' (evaluate reads such folders as they are)."""
    from hf_vitseg.training.lora import apply_lora, save_lora

    folder = tmp_path / "run_lora"
    save_lora(apply_lora(tiny_model()), folder, save_base=True)
    assert (folder / "adapter_config.json").is_file() and not (folder / "config.json").exists()
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(image)
    status, _, err = cli(["predict", image, "--model", folder, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(status, err, "--model", "LoRA adapter", "merge_and_unload")
