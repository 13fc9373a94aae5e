"""`train` / `evaluate_model` on Trainer, `hf-vitseg train` / `hf-vitseg evaluate`, and every bad input refused
before the first training step without touching what is on disk."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

from hf_vitseg import ViTSegImageProcessor
from hf_vitseg.cli import main as cli_main
from hf_vitseg.data.datasets import load_image_folder
from hf_vitseg.training import evaluate_model, train
from hf_vitseg.training.run_dir import find_last_checkpoint

NUM_LABELS = 3
# One colour per class, so that a class is visible in its patch's pixels and a few steps learn something.
CLASS_COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])


# -- helpers shared with test_resume.py, test_distributed.py and test_reliability_*.py -------------------------------
def make_image_folder(root: Path, num_images: int, seed: int = 0, size: int = 32) -> tuple[Path, Path]:
    """`root/images/NNN.png` (RGB) and `root/masks/NNN.png` (class ids 0..2 in 8x8 blocks, the tiny patch)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index in range(num_images):
        blocks = rng.integers(0, NUM_LABELS, (size // 8, size // 8))
        mask = np.kron(blocks, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
        image = np.clip(CLASS_COLOURS[mask] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{index:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{index:03d}.png")
    return root / "images", root / "masks"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: to show that nothing was changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_backbone_dir):
    root = tmp_path_factory.mktemp("assets")
    return {
        "backbone": tiny_backbone_dir,
        "train": make_image_folder(root / "train", 8, seed=0),
        "eval": make_image_folder(root / "eval", 4, seed=1),
    }


@pytest.fixture(scope="module")
def datasets_(assets):
    return load_image_folder(*assets["train"]), load_image_folder(*assets["eval"])


@pytest.fixture(scope="module")
def trained(assets, datasets_, tmp_path_factory):
    """One real run: 6 steps of 4 images (3 epochs), evaluated and checkpointed every 3 steps."""
    output_dir = tmp_path_factory.mktemp("run") / "out"
    model, metrics = train(
        tiny_model(backbone=assets["backbone"]), *datasets_, output_dir=output_dir, crop_size=32, max_steps=6,
        batch_size=4, lr=1e-3, head_lr=1e-2, eval_steps=3, save_steps=3, logging_steps=1, use_cpu=True,
    )
    return output_dir, model, metrics


def fabricate_run(output_dir: Path, model) -> None:
    """What a run leaves: a complete checkpoint-2, the final model and the run manifest listing them, beside a
    file of the user's own."""
    from hf_vitseg.training.run_dir import record_run_files

    model.save_pretrained(output_dir / "checkpoint-2")
    (output_dir / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    model.save_pretrained(output_dir)
    record_run_files(output_dir, before={})
    (output_dir / "notes.txt").write_text("my notes")


# -- a real run ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_learns_evaluates_checkpoints_and_saves_a_loadable_folder(trained, datasets_):
    output_dir, model, metrics = trained
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 6
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses

    evaluations = [entry for entry in history if "eval_mean_iou" in entry]
    assert [entry["step"] for entry in evaluations] == [3, 6, 6]  # periodic, then the final evaluate()
    for key in ("eval_mean_iou", "eval_pixel_accuracy", "eval_mean_accuracy", "eval_loss", "train_loss"):
        assert np.isfinite(metrics[key]), key
    assert set(metrics) >= {f"eval_iou_LABEL_{i}" for i in range(NUM_LABELS)}
    assert 0.0 <= metrics["eval_mean_iou"] <= 1.0

    for step in (3, 6):
        checkpoint = output_dir / f"checkpoint-{step}"
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                "preprocessor_config.json"} <= {p.name for p in checkpoint.iterdir()}
    assert not list(output_dir.rglob("*.bin")) or all(p.name == "training_args.bin" for p in output_dir.rglob("*.bin"))
    assert find_last_checkpoint(output_dir).name == "checkpoint-6"

    # The final folder: weights equal to the returned model's, loadable through the Auto classes with remote code.
    saved = {p.name for p in output_dir.iterdir()}
    assert {"modeling_vitseg.py", "configuration_vitseg.py", "image_processing_vitseg.py"} <= saved
    loaded = AutoModelForSemanticSegmentation.from_pretrained(output_dir, trust_remote_code=True).state_dict()
    assert loaded.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded[name], value.cpu(), rtol=0, atol=0)
    processor = AutoImageProcessor.from_pretrained(output_dir, trust_remote_code=True)
    assert processor.patch_size == 8 and processor.ignore_index == 255
    # the recipe as JSON, which the model card reads (the pickled training_args.bin never is)
    recorded = json.loads((output_dir / "training_args.json").read_text())
    assert recorded["max_steps"] == 6 and recorded["eval_steps"] == 3

    # evaluate_model on the saved folder reproduces the Trainer's streaming evaluation.
    results = evaluate_model(output_dir, datasets_[1])
    assert results["num_images"] == 4
    assert results["mean_iou"] == pytest.approx(metrics["eval_mean_iou"], abs=1e-6)
    assert results["pixel_accuracy"] == pytest.approx(metrics["eval_pixel_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_overwrite_output_dir_replaces_the_run_and_keeps_other_files(trained, datasets_, assets, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(trained[0], output_dir)
    (output_dir / "notes.txt").write_text("my notes")
    train(tiny_model(backbone=assets["backbone"]), datasets_[0], output_dir=output_dir, crop_size=32, max_steps=1,
          batch_size=4, save_steps=1, overwrite_output_dir=True, use_cpu=True)
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-1"]
    assert (output_dir / "notes.txt").read_text() == "my notes"
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 1


@pytest.mark.slow
def test_cli_train_then_evaluate(assets, tmp_path, capsys):
    (train_images, train_masks), (eval_images, eval_masks) = assets["train"], assets["eval"]
    output_dir = tmp_path / "cli_run"
    command = [
        "train", "--backbone", str(assets["backbone"]), "--head", "linear", "--num-labels", "3",
        "--train-images", str(train_images), "--train-masks", str(train_masks),
        "--eval-images", str(eval_images), "--eval-masks", str(eval_masks),
        "--output-dir", str(output_dir), "--max-steps", "2", "--batch-size", "4", "--crop-size", "32",
        "--save-steps", "2", "--cpu", "--json",
    ]
    assert cli_main(command) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(re.search(r"^\{\n.*^\}", printed, re.MULTILINE | re.DOTALL).group())  # after Trainer's logs
    assert np.isfinite(metrics["train_loss"]) and 0 <= metrics["eval_mean_iou"] <= 1
    assert (output_dir / "checkpoint-2" / "model.safetensors").is_file()
    assert (output_dir / "model.safetensors").is_file()

    # The same command again would overwrite the run: refused, with the ways out.
    before = snapshot(output_dir)
    assert cli_main(command) == 1
    error = capsys.readouterr().err
    assert "already holds a training run" in error and "--resume" in error and "--overwrite-output-dir" in error
    assert snapshot(output_dir) == before

    evaluate = ["evaluate", "--model", str(output_dir), "--images", str(eval_images), "--masks", str(eval_masks)]
    assert cli_main(evaluate + ["--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["num_images"] == 4
    assert results["mean_iou"] == pytest.approx(metrics["eval_mean_iou"], abs=1e-6)

    assert cli_main(evaluate + ["--sliding-window", "--crop-size", "16"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("mean_iou") and "iou_LABEL_2" in table

    assert cli_main(evaluate + ["--sliding-window"]) == 1
    assert "--sliding-window needs --crop-size" in capsys.readouterr().err


@pytest.mark.slow
def test_training_on_cpu_raises_no_pin_memory_warning(assets, datasets_, tmp_path):
    # pinned memory only helps copies to a GPU: train() asks for it only when one is there
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_model(backbone=assets["backbone"]), datasets_[0], output_dir=tmp_path / "out", crop_size=32,
              max_steps=1, batch_size=4)
    assert not [str(w.message) for w in caught if "pin_memory" in str(w.message)]


def test_recipes_linear_probe_freezes_the_backbone_and_lora_checkpoints_its_head(assets, datasets_, tmp_path):
    from safetensors.torch import load_file

    model = tiny_model(backbone=assets["backbone"])
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    model, _ = train(model, datasets_[0], output_dir=tmp_path / "probe", recipe="linear_probe", crop_size=32,
                     max_steps=2, batch_size=4, use_cpu=True)
    assert model.config.freeze_backbone
    assert all(torch.equal(v, backbone_before[k]) for k, v in model.backbone.state_dict().items())
    assert not all(torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())

    # LoRA: checkpoints and the final folder hold the adapter and the fully trained head (save_lora's layout) ...
    lora_dir = tmp_path / "lora"
    model, _ = train(tiny_model(backbone=assets["backbone"]), datasets_[0], output_dir=lora_dir, recipe="lora",
                     crop_size=32, max_steps=2, batch_size=4, save_steps=2, use_cpu=True)
    assert hasattr(model, "peft_config")
    for folder in (lora_dir, lora_dir / "checkpoint-2"):
        saved = {p.name for p in folder.iterdir()}
        assert {"adapter_model.safetensors", "head_weights.safetensors", "vitseg_config.json"} <= saved
    head = load_file(lora_dir / "head_weights.safetensors")
    assert not all(torch.equal(head[f"head.{k}"], v) for k, v in head_before.items())
    # ... resuming a fresh LoRA model from checkpoint-2 restores that head (Trainer alone would only load the adapter)
    train(tiny_model(backbone=assets["backbone"]), datasets_[0], output_dir=lora_dir, recipe="lora", crop_size=32,
          max_steps=2, batch_size=4, save_steps=2, resume=True, use_cpu=True)
    resumed = load_file(lora_dir / "head_weights.safetensors")
    assert all(torch.equal(resumed[k], head[k]) for k in head)
    # ... and the folder evaluates like any saved model
    assert 0 <= evaluate_model(lora_dir, datasets_[1])["mean_iou"] <= 1


# -- bad input: refused before any training step, nothing written ---------------------------------------------
def _write_pair(folder: Path, name: str, image_hw: tuple[int, int], mask: np.ndarray) -> None:
    Image.fromarray(np.zeros((*image_hw, 3), np.uint8)).save(folder / "images" / f"{name}.png")
    Image.fromarray(mask.astype(np.uint8)).save(folder / "masks" / f"{name}.png")


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "empty"),
        ("out_of_range", "outside [0, num_labels=3)"),
        ("size_mismatch", "they must match"),
    ],
)
@pytest.mark.parametrize("which", ["train_dataset", "eval_dataset"])
def test_bad_dataset_is_refused_before_training(case, message, which, assets, datasets_, tmp_path):
    if case == "empty":
        bad = datasets_[0].select([])
    else:
        images, masks = make_image_folder(tmp_path / "data", 2)
        if case == "out_of_range":
            _write_pair(images.parent, "zz_bad", (32, 32), np.full((32, 32), 7))
        else:
            _write_pair(images.parent, "zz_bad", (32, 32), np.zeros((24, 32)))
        bad = load_image_folder(images, masks)
    train_dataset, eval_dataset = (bad, datasets_[1]) if which == "train_dataset" else (datasets_[0], bad)
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match="empty" if case == "empty" else None) as error:
        train(tiny_model(backbone=assets["backbone"]), train_dataset, eval_dataset, output_dir=output_dir, crop_size=32)
    assert str(error.value).startswith(which) and message in str(error.value)
    if case != "empty":
        assert "zz_bad.png" in str(error.value)  # names the sample
    assert not output_dir.exists()


@pytest.mark.parametrize(
    "crop_size, suggestions", [(30, ["(24, 24)", "(32, 32)"]), ((32, 20), ["(32, 16)", "(32, 24)"])]
)
def test_crop_size_not_a_patch_multiple_is_refused(crop_size, suggestions, assets, datasets_, tmp_path):
    with pytest.raises(ValueError, match="not a multiple of .* patch_size 8") as error:
        train(tiny_model(backbone=assets["backbone"]), datasets_[0], output_dir=tmp_path / "out", crop_size=crop_size)
    assert all(suggestion in str(error.value) for suggestion in suggestions)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "processor, message",
    [
        (ViTSegImageProcessor(patch_size=6), "multiples of 6, but the model needs multiples of 8"),
        (ViTSegImageProcessor(patch_size=8, ignore_index=0), "ignore_index=0, but the model ignores 255"),
    ],
)
def test_processor_that_does_not_fit_the_model_is_refused(processor, message, assets, datasets_, tmp_path):
    with pytest.raises(ValueError, match=message):
        train(tiny_model(backbone=assets["backbone"]), datasets_[0], output_dir=tmp_path / "out", processor=processor)
    assert not (tmp_path / "out").exists()


def test_output_dir_holding_a_run_is_refused_and_left_alone(assets, datasets_, tmp_path):
    model, output_dir = tiny_model(backbone=assets["backbone"]), tmp_path / "out"
    fabricate_run(output_dir, model)
    before = snapshot(output_dir)
    with pytest.raises(FileExistsError) as error:
        train(model, datasets_[0], output_dir=output_dir, crop_size=32)
    message = str(error.value)
    assert "already holds a training run" in message and "checkpoint-2" in message
    assert "resume=True" in message and "overwrite_output_dir=True" in message
    assert snapshot(output_dir) == before

    # overwrite_output_dir deletes only once every other check has passed: a bad crop leaves the run intact
    with pytest.raises(ValueError, match="not a multiple"):
        train(model, datasets_[0], output_dir=output_dir, crop_size=30, overwrite_output_dir=True)
    assert snapshot(output_dir) == before


def test_output_dir_with_unrelated_files_is_fine_and_a_file_is_not(assets, datasets_, tmp_path):
    from hf_vitseg.training.run_dir import resolve_output_dir

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("x")
    assert resolve_output_dir(tmp_path / "out") is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        train(tiny_model(backbone=assets["backbone"]), datasets_[0], output_dir=tmp_path / "file")


def test_resume_needs_a_complete_checkpoint_of_the_same_model(assets, datasets_, tmp_path):
    model, output_dir = tiny_model(backbone=assets["backbone"]), tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="Nothing to resume"):
        train(model, datasets_[0], output_dir=output_dir, resume=True)

    (output_dir / "checkpoint-4").mkdir(parents=True)  # a save cut short by a kill: no trainer_state.json
    with pytest.raises(FileNotFoundError, match="only incomplete ones: checkpoint-4"):
        train(model, datasets_[0], output_dir=output_dir, resume=True)
    with pytest.raises(FileNotFoundError, match="not a complete Trainer checkpoint"):
        train(model, datasets_[0], output_dir=output_dir, resume=output_dir / "checkpoint-4")

    fabricate_run(output_dir, model)
    assert find_last_checkpoint(output_dir).name == "checkpoint-2"  # the incomplete checkpoint-4 is passed over
    other = tiny_model("mlp", backbone=assets["backbone"])
    before = snapshot(output_dir)
    with pytest.raises(ValueError, match="holds another model") as error:
        train(other, datasets_[0], output_dir=output_dir, resume=True)
    assert "head='linear'" in str(error.value) and "head='mlp'" in str(error.value)
    with pytest.raises(ValueError, match="exclude each other"):
        train(model, datasets_[0], output_dir=output_dir, resume=True, overwrite_output_dir=True)
    assert snapshot(output_dir) == before


def test_a_backbone_folder_is_not_a_segmentation_model(assets, datasets_, tmp_path):
    with pytest.raises(ValueError, match="from_pretrained_backbone"):
        train(assets["backbone"], datasets_[0], output_dir=tmp_path / "out")
