"""Nothing lost (issue 13, items 6-8): an overwrite deletes only what a run wrote and only after every check,
`save_pretrained` never replaces a user's file and never leaves half a model, and two `predict` runs never
share an output folder."""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers.modeling_utils
from conftest import save_tiny_backbone, tiny_model
from PIL import Image
from test_train import make_image_folder, snapshot
from transformers import AutoModelForSemanticSegmentation

from hf_vitseg import ViTSegImageProcessor
from hf_vitseg.cli import main
from hf_vitseg.modeling.saving_vitseg import SAVED_FILES_MANIFEST
from hf_vitseg.training import train
from hf_vitseg.training.run_dir import RUN_MANIFEST


# -- item 6: train --overwrite-output-dir ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_assets(tmp_path_factory):
    """A tiny backbone, a training dataset, one finished run (2 steps, a checkpoint at each) and the dataset's
    image and mask folders."""
    from hf_vitseg.data.datasets import load_image_folder

    root = tmp_path_factory.mktemp("lost")
    backbone = save_tiny_backbone(root / "backbone")
    folders = make_image_folder(root / "data", 4)
    dataset = load_image_folder(*folders)
    run = root / "run"
    train(tiny_model(backbone=backbone), dataset, output_dir=run, crop_size=32, max_steps=2, batch_size=4, save_steps=1,
          use_cpu=True)
    return backbone, dataset, run, folders


def copy_run(run_assets, tmp_path) -> Path:
    output_dir = tmp_path / "out"
    shutil.copytree(run_assets[2], output_dir)
    return output_dir


def test_a_run_records_what_it_wrote(run_assets):
    recorded = set(json.loads((run_assets[2] / RUN_MANIFEST).read_text())["files"])
    on_disk = {str(p.relative_to(run_assets[2])) for p in run_assets[2].rglob("*") if p.is_file()}
    assert recorded == on_disk - {RUN_MANIFEST}
    assert {"checkpoint-1/model.safetensors", "checkpoint-2/trainer_state.json", "model.safetensors",
            "config.json", "trainer_state.json", "all_results.json"} <= recorded


@pytest.mark.parametrize("bad", [{"lr": math.nan}, {"batch_size": 0}, {"epochs": -1}],
                         ids=["lr-nan", "batch_size-0", "epochs-minus-1"])
def test_bad_argument_with_overwrite_deletes_nothing(run_assets, tmp_path, bad):
    backbone, dataset, *_ = run_assets
    output_dir = copy_run(run_assets, tmp_path)
    before = snapshot(output_dir)
    with pytest.raises(ValueError) as error:
        train(tiny_model(backbone=backbone), dataset, output_dir=output_dir, crop_size=32, overwrite_output_dir=True,
              use_cpu=True, **bad)
    assert snapshot(output_dir) == before
    assert str(error.value).startswith(f"{next(iter(bad))} must be")


@pytest.mark.parametrize("flag", [["--lr", "nan"], ["--batch-size", "0"], ["--epochs", "-1"]], ids=lambda f: f[0])
def test_cli_bad_argument_with_overwrite_deletes_nothing(run_assets, tmp_path, capsys, flag):
    backbone, _, _, (images, masks) = run_assets
    output_dir = copy_run(run_assets, tmp_path)
    before = snapshot(output_dir)
    command = ["train", "--backbone", str(backbone), "--num-labels", "3", "--train-images", str(images),
               "--train-masks", str(masks), "--crop-size", "32", "--max-steps", "1", "--cpu", "--output-dir",
               str(output_dir), "--overwrite-output-dir", *flag]
    try:
        code = main(command)
    except SystemExit as exit:  # argparse rejects the value
        code = exit.code
    assert code != 0
    assert snapshot(output_dir) == before
    assert flag[0] in capsys.readouterr().err


def test_overwrite_deletes_only_what_the_run_wrote(run_assets, tmp_path):
    backbone, dataset, *_ = run_assets
    output_dir = copy_run(run_assets, tmp_path)
    # files of the user's: names the old patterns matched, and one inside a checkpoint folder of the run
    mine = {"experiment_results.json": b'{"mine": 1}', "pretrained_backup.safetensors": b"weights of mine",
            "checkpoint-2/important.csv": b"a,b\n1,2\n"}
    for name, content in mine.items():
        (output_dir / name).write_bytes(content)
    train(tiny_model(backbone=backbone), dataset, output_dir=output_dir, crop_size=32, max_steps=1, batch_size=4,
          save_steps=1, overwrite_output_dir=True, use_cpu=True)
    for name, content in mine.items():
        assert (output_dir / name).read_bytes() == content
    assert not (output_dir / "checkpoint-2" / "model.safetensors").exists(), "the old run's checkpoint files went"
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 1
    recorded = json.loads((output_dir / RUN_MANIFEST).read_text())["files"]
    assert "checkpoint-1/model.safetensors" in recorded and not set(mine) & set(recorded)


def test_overwrite_refuses_a_run_it_cannot_tell_from_user_files(run_assets, tmp_path):
    backbone, dataset, *_ = run_assets
    output_dir = copy_run(run_assets, tmp_path)
    (output_dir / RUN_MANIFEST).unlink(missing_ok=True)  # a run of an earlier hf-vitseg, which kept no manifest
    before = snapshot(output_dir)
    with pytest.raises(FileExistsError, match=RUN_MANIFEST) as error:
        train(tiny_model(backbone=backbone), dataset, output_dir=output_dir, crop_size=32, max_steps=1,
              overwrite_output_dir=True, use_cpu=True)
    assert "Nothing was changed" in str(error.value) and "checkpoint-1" in str(error.value)
    assert snapshot(output_dir) == before


@pytest.mark.parametrize("user_file, text, message", [
    ("heads.py", "# my heads", "would replace heads.py"),  # the final save's remote code
    ("all_results.json", '{"mine": 1}', "all_results.json"),  # a result file no run recorded
])
def test_train_checks_before_training_that_it_replaces_no_file_of_the_user(run_assets, tmp_path, user_file, text,
                                                                           message):
    backbone, dataset, *_ = run_assets
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / user_file).write_text(text)
    with pytest.raises(FileExistsError, match=message):
        train(tiny_model(backbone=backbone), dataset, output_dir=output_dir, crop_size=32, max_steps=1, use_cpu=True)
    assert [p.name for p in output_dir.iterdir()] == [user_file], "refused before the first step"


# -- item 7: save_pretrained ---------------------------------------------------------------------------------------
def no_staging_left(folder: Path) -> bool:
    return not [p for p in [*folder.parent.iterdir(), *folder.iterdir()] if ".saving-" in p.name]


def test_save_refuses_to_replace_files_it_did_not_write(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    mine = {"heads.py": "# my heads\n", "losses.py": "# my losses\n", "config.json": '{"lr": 0.1}\n',
            "notes.txt": "kept\n"}
    for name, text in mine.items():
        (folder / name).write_text(text)
    with pytest.raises(FileExistsError) as error:
        tiny_model().save_pretrained(folder)
    message = str(error.value)
    assert "config.json" in message and "heads.py" in message and "losses.py" in message
    assert "notes.txt" not in message and "Nothing was changed" in message
    assert {p.name: p.read_text() for p in folder.iterdir()} == mine
    assert no_staging_left(folder)


def test_save_over_its_own_save_keeps_the_processor_and_user_files(tmp_path):
    folder = tmp_path / "model"
    tiny_model(seed=0).save_pretrained(folder, max_shard_size="20KB")  # sharded
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    ViTSegImageProcessor(patch_size=8).save_pretrained(folder)
    (folder / "notes.txt").write_text("kept")
    second = tiny_model(seed=1)
    second.save_pretrained(folder)  # one file now: the old shards and index, ours, go
    assert not list(folder.glob("model-*-of-*.safetensors")) and not (folder / "model.safetensors.index.json").exists()
    assert (folder / "notes.txt").read_text() == "kept" and (folder / "preprocessor_config.json").is_file()
    recorded = json.loads((folder / SAVED_FILES_MANIFEST).read_text())["files"]
    assert {"config.json", "model.safetensors", "modeling_vitseg.py", "heads.py"} <= set(recorded)
    assert "preprocessor_config.json" not in recorded and "notes.txt" not in recorded
    loaded = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True)
    for key, value in second.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    assert no_staging_left(folder)


def test_save_over_a_folder_of_an_earlier_version(tmp_path):
    """A save of an hf-vitseg that kept no manifest: its config, weights and remote code are still known."""
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    (folder / SAVED_FILES_MANIFEST).unlink(missing_ok=True)
    (folder / "heads.py").write_text((folder / "heads.py").read_text() + "\n# as an earlier version wrote it\n")
    (folder / "my_heads.py").write_text("# mine")  # imported by nothing: the user's
    tiny_model().save_pretrained(folder)
    assert "earlier version" not in (folder / "heads.py").read_text()
    assert (folder / "my_heads.py").read_text() == "# mine"


def test_a_save_that_fails_midway_leaves_the_previous_model(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    first = tiny_model(num_labels=3)
    first.save_pretrained(folder)
    ViTSegImageProcessor(patch_size=8).save_pretrained(folder)
    before = snapshot(folder)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        tiny_model(num_labels=5).save_pretrained(folder)  # another config: a mix would not load
    assert snapshot(folder) == before
    assert no_staging_left(folder)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True)
    assert loaded.config.num_labels == 3
    for key, value in first.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_save_pretrained_push_to_hub_uploads_after_the_save(tmp_path, monkeypatch):
    model, pushed = tiny_model(), []
    monkeypatch.setattr(type(model), "push_to_hub", lambda self, repo_id, **kwargs: pushed.append((repo_id, kwargs)))
    model.save_pretrained(tmp_path / "model", push_to_hub=True, repo_id="me/cells", commit_message="first")
    assert pushed == [("me/cells", {"token": None, "commit_message": "first"})]
    assert (tmp_path / "model" / "model.safetensors").is_file() and no_staging_left(tmp_path / "model")


# -- item 8: predict --out -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predict_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("predict_model")
    tiny_model().save_pretrained(folder)
    ViTSegImageProcessor(patch_size=8).save_pretrained(folder)
    return folder


def write_images(folder: Path, names: list[str]) -> list[str]:
    folder.mkdir(exist_ok=True)
    for index, name in enumerate(names):
        pixels = np.random.default_rng(index).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return [str(folder / name) for name in names]


def test_two_predict_runs_into_one_folder(predict_model, tmp_path, monkeypatch, capsys):
    from hf_vitseg.cli import predict as predict_cli

    first, second = write_images(tmp_path / "a", ["one.png"]), write_images(tmp_path / "b", ["two.png"])
    out = tmp_path / "out"
    exit_codes, started = [], []
    predict_label_map = predict_cli.predict_label_map

    def while_the_first_runs(*args, **kwargs):
        if not started:  # the second run starts while the first is predicting
            started.append(True)
            exit_codes.append(main(["predict", *second, "--model", str(predict_model), "--out", str(out)]))
        return predict_label_map(*args, **kwargs)

    monkeypatch.setattr(predict_cli, "predict_label_map", while_the_first_runs)
    assert main(["predict", *first, "--model", str(predict_model), "--out", str(out)]) == 0
    assert exit_codes == [1]
    error = capsys.readouterr().err
    assert f"--out {out} is in use by another hf-vitseg predict run" in error and error.count("error:") == 1
    assert sorted(p.name for p in out.glob("*.png")) == ["one_labels.png", "one_overlay.png"]
    assert not list(out.glob("*.lock")), "the lock goes with the run"


def test_predict_replaces_an_earlier_run_only_with_overwrite(predict_model, tmp_path, capsys):
    earlier, later = write_images(tmp_path / "a", ["one.png", "two.png"]), write_images(tmp_path / "b", ["three.png"])
    out = tmp_path / "out"
    assert main(["predict", *earlier, "--model", str(predict_model), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)

    assert main(["predict", *later, "--model", str(predict_model), "--out", str(out)]) == 1
    assert "from an earlier predict run; pass --overwrite" in capsys.readouterr().err
    assert snapshot(out) == before

    assert main(["predict", *later, "--model", str(predict_model), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "notes.txt", "three_labels.png", "three_overlay.png"]

    # a file predict did not write is not replaced, --overwrite or not
    (out / "four_labels.png").write_bytes(b"my own map")
    fourth = write_images(tmp_path / "c", ["four.png"])
    assert main(["predict", *fourth, "--model", str(predict_model), "--out", str(out), "--overwrite"]) == 1
    assert "four_labels.png already exist" in capsys.readouterr().err
    assert (out / "four_labels.png").read_bytes() == b"my own map" and (out / "three_labels.png").is_file()
