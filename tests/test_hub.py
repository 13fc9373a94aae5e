"""push_to_hub / `hf-vitseg push` with the Hub client's network calls replaced by a recorder; the recorded repo
laid out in the HF cache and loaded by repo id, offline, where hf-vitseg cannot be imported; model cards;
loading errors that name the broken file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import builtin_heads, tiny_model
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from PIL import Image

from hf_vitseg import ViTSegImageProcessor
from hf_vitseg.hub import check_model_folder, load_model, push_to_hub, render_model_card
from hf_vitseg.hub.cards import HEAD_REFERENCES, card_is_ours_and_unedited
from hf_vitseg.modeling.pipeline_vitseg import CUSTOM_PIPELINES, PIPELINE_FILENAME

REPO_ID = "hf-vitseg-tests/tiny-dinov2-linear"
ID2LABEL = {0: "background", 1: "nucleus", 2: "border"}
EVAL = {"eval_mean_iou": 0.61237, "eval_pixel_accuracy": 0.9012, "eval_mean_accuracy": 0.7345,
        "eval_iou_background": 0.9, "eval_iou_nucleus": 0.55, "eval_iou_border": 0.387, "epoch": 5.0}
TRAINING_ARGS = {"learning_rate": 0.0003, "num_train_epochs": 5, "per_device_train_batch_size": 4,
                 "lr_scheduler_type": "cosine", "seed": 42, "weight_decay": 0.01}


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory) -> Path:
    """A folder as `Trainer` + `save_pretrained` leave it, plus files that must not be uploaded."""
    folder = tmp_path_factory.mktemp("saved_model")
    model = tiny_model(id2label=ID2LABEL)
    model.config.backbone_name_or_path = "facebook/dinov2-small"
    model.save_pretrained(folder)
    ViTSegImageProcessor(patch_size=8).save_pretrained(folder)
    (folder / "eval_results.json").write_text(json.dumps(EVAL))
    (folder / "training_args.json").write_text(json.dumps(TRAINING_ARGS))
    (folder / "trainer_state.json").write_text(json.dumps(
        {"global_step": 120, "epoch": 5.0, "train_batch_size": 4,
         "log_history": [{"eval_mean_iou": 0.4, "step": 60}, {"loss": 0.3, "step": 120}]}))
    (folder / "training_args.bin").write_bytes(b"a pickle that must never be read or uploaded")
    (folder / "optimizer.pt").write_bytes(b"optimizer state")
    return folder


class HubRecorder:
    """Stands in for the Hub (the one fake of `HfApi` the tests share): records create_repo / create_commit, serves
    `remote` files to list / download (only to repos of `remote_repo_type` when given, e.g. "space").

    What it keeps: `calls` (method names, in order) and `repo_calls` (`"method:repo_id"`, or `":filename"` for
    downloads); the last commit's `operations`, `uploaded` files and `commit_kwargs`, and `create_repo_kwargs`;
    per repo, `repos[repo_id]` (create_repo's kwargs), `commits[repo_id]` (path -> bytes) and
    `commit_kwargs_by_repo[repo_id]`."""

    def __init__(self, tmp_path: Path, remote: dict[str, bytes] | None = None, remote_repo_type: str | None = None):
        self.tmp_path = tmp_path
        self.remote = dict(remote or {})
        self.remote_repo_type = remote_repo_type
        self.calls: list[str] = []
        self.repo_calls: list[str] = []
        self.operations: list = []
        self.uploaded: dict[str, bytes] = {}
        self.repos: dict[str, dict] = {}
        self.commits: dict[str, dict[str, bytes]] = {}
        self.commit_kwargs_by_repo: dict[str, dict] = {}

    def _record(self, name: str, subject: str) -> None:
        self.calls.append(name)
        self.repo_calls.append(f"{name}:{subject}")

    def install(self, monkeypatch):
        recorder = self

        def create_repo(api, repo_id, **kwargs):
            recorder._record("create_repo", repo_id)
            recorder.create_repo_kwargs = recorder.repos[repo_id] = kwargs
            return f"https://huggingface.co/{repo_id}"

        def list_repo_files(api, repo_id, **kwargs):
            recorder._record("list_repo_files", repo_id)
            if recorder.remote_repo_type is not None and kwargs.get("repo_type") != recorder.remote_repo_type:
                return []
            return sorted(recorder.remote)

        def hf_hub_download(api, repo_id, filename, **kwargs):
            recorder.calls.append(f"hf_hub_download:{filename}")
            recorder.repo_calls.append(f"hf_hub_download:{filename}")
            path = recorder.tmp_path / "remote" / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(recorder.remote[filename])
            return str(path)

        def create_commit(api, repo_id, operations, **kwargs):
            recorder._record("create_commit", repo_id)
            assert all(isinstance(op, CommitOperationAdd) for op in operations), "hf-vitseg only adds files"
            recorder.commit_kwargs = recorder.commit_kwargs_by_repo[repo_id] = kwargs
            recorder.operations = list(operations)
            recorder.uploaded = {}
            for op in recorder.operations:
                content = op.path_or_fileobj
                if not isinstance(content, bytes):
                    content = Path(content).read_bytes()
                recorder.uploaded[op.path_in_repo] = content
            recorder.commits[repo_id] = dict(recorder.uploaded)
            return "recorded-commit"

        for name, function in [("create_repo", create_repo), ("list_repo_files", list_repo_files),
                               ("hf_hub_download", hf_hub_download), ("create_commit", create_commit)]:
            monkeypatch.setattr(HfApi, name, function)
        return self


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    return HubRecorder(tmp_path).install(monkeypatch)


def test_push_uploads_exactly_the_model_files(saved_folder, recorder):
    result = push_to_hub(saved_folder, REPO_ID, private=True, commit_message="first push")
    assert recorder.calls[0] == "create_repo" and recorder.calls[-1] == "create_commit"
    assert recorder.create_repo_kwargs["private"] is True and recorder.create_repo_kwargs["exist_ok"] is True
    assert recorder.commit_kwargs["commit_message"] == "first push"
    # additions only: nothing on the Hub is ever deleted
    assert recorder.operations and all(isinstance(op, CommitOperationAdd) for op in recorder.operations)

    python_files = {p.name for p in saved_folder.glob("*.py")}
    assert {"modeling_vitseg.py", "configuration_vitseg.py", "image_processing_vitseg.py"} <= python_files
    # the run records train() writes for the card go up too (issue 13 item 4); trainer_state.json does not
    expected = python_files | {"model.safetensors", "config.json", "preprocessor_config.json", "README.md",
                               PIPELINE_FILENAME, "eval_results.json", "training_args.json"}
    assert set(recorder.uploaded) == expected, "no checkpoints, optimizer states or pickles"
    assert sorted(result.uploaded) == sorted(expected) and result.skipped == {}

    # every file but config.json and the generated ones is the saved file, byte for byte
    for name in expected - {"config.json", "README.md", PIPELINE_FILENAME}:
        assert recorder.uploaded[name] == (saved_folder / name).read_bytes(), name
    config = json.loads(recorder.uploaded["config.json"])
    saved_config = json.loads((saved_folder / "config.json").read_text())
    assert config["custom_pipelines"] == CUSTOM_PIPELINES
    assert config == dict(saved_config, custom_pipelines=CUSTOM_PIPELINES)
    assert config["auto_map"]["AutoModelForSemanticSegmentation"] == "modeling_vitseg.ViTSegForSemanticSegmentation"
    assert config["auto_map"]["AutoConfig"] == "configuration_vitseg.ViTSegConfig"
    preprocessor = json.loads(recorder.uploaded["preprocessor_config.json"])
    assert preprocessor["auto_map"]["AutoImageProcessor"] == "image_processing_vitseg.ViTSegImageProcessor"
    pipeline_source = recorder.uploaded[PIPELINE_FILENAME].decode()
    assert "class ViTSegSegmentationPipeline" in pipeline_source
    for forbidden in ("import hf_vitseg", "from hf_vitseg", "from ."):
        assert forbidden not in pipeline_source, "the pipeline file travels alone: no hf_vitseg, no relative imports"


def test_card_metadata_and_model_index(saved_folder, recorder):
    push_to_hub(saved_folder, REPO_ID, card_data={"datasets": ["hf-vitseg-tests/nuclei"], "dataset_split": "test"})
    card = ModelCard(recorder.uploaded["README.md"].decode())
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-segmentation"
    assert data.license == "apache-2.0"
    assert data.base_model == "facebook/dinov2-small"
    assert data.datasets == ["hf-vitseg-tests/nuclei"]
    assert {"hf-vitseg", "linear", "dinov2"} <= set(data.tags)
    miou = next(r for r in data.eval_results if r.metric_type == "mean_iou")
    assert miou.metric_value == pytest.approx(EVAL["eval_mean_iou"], abs=1e-4)
    assert miou.dataset_type == "hf-vitseg-tests/nuclei" and miou.dataset_split == "test"
    assert miou.task_type == "image-segmentation"
    text = card.text
    assert HEAD_REFERENCES["linear"]["citation"] in text
    assert f'pipeline("image-segmentation", model="{REPO_ID}", trust_remote_code=True)' in text
    assert f"hf-vitseg predict image.png --model {REPO_ID}" in text
    for name, value in [("learning_rate", "0.0003"), ("lr_scheduler_type", "cosine"), ("optimizer steps", "120")]:
        assert f"| {name} | {value} |" in text
    assert "| nucleus | 0.55 |" in text
    assert card_is_ours_and_unedited(str(card))


@pytest.mark.parametrize("head", builtin_heads())
def test_card_cites_every_head(head):
    model = tiny_model(head, id2label=ID2LABEL)
    card = render_model_card(model.config, REPO_ID, card_data={"eval_results": {"mean_iou": 0.5}})
    assert head in card.data.tags
    assert HEAD_REFERENCES[head]["citation"] in card.text, f"add {head!r} to hf_vitseg.hub.cards.HEAD_REFERENCES"
    assert card.data.eval_results[0].metric_value == 0.5


def test_card_reads_the_last_evaluation_from_trainer_state(tmp_path):
    model = tiny_model(id2label=ID2LABEL)
    model.save_pretrained(tmp_path)
    history = [{"eval_mean_iou": 0.2, "step": 10}, {"loss": 1.0, "step": 15}, {"eval_mean_iou": 0.3456, "step": 20}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    card = render_model_card(model.config, REPO_ID, folder=tmp_path)
    assert card.data.eval_results[0].metric_value == 0.3456
    assert card.data.base_model is None, "no backbone_name_or_path: no base_model"


def test_card_base_model_only_for_hub_ids(tmp_path):
    model = tiny_model(id2label=ID2LABEL)
    model.config.backbone_name_or_path = str(tmp_path)  # a local folder, not a Hub id
    assert render_model_card(model.config, REPO_ID).data.base_model is None
    with pytest.raises(ValueError, match="Unknown card_data keys"):
        render_model_card(model.config, REPO_ID, card_data={"licence": "mit"})


def test_push_keeps_a_readme_it_did_not_write(saved_folder, tmp_path, monkeypatch):
    remote = {"README.md": b"# My model\nHand-written notes.\n", "config.json": b'{"model_type": "vitseg"}'}
    recorder = HubRecorder(tmp_path, remote).install(monkeypatch)
    result = push_to_hub(saved_folder, REPO_ID)
    assert "README.md" not in recorder.uploaded and "README.md" in result.skipped
    assert "model.safetensors" in recorder.uploaded

    push_to_hub(saved_folder, REPO_ID, overwrite_card=True)
    assert "README.md" in recorder.uploaded


def test_push_replaces_its_own_card_but_not_an_edited_one(saved_folder, tmp_path, monkeypatch):
    recorder = HubRecorder(tmp_path).install(monkeypatch)
    push_to_hub(saved_folder, REPO_ID)
    ours = recorder.uploaded["README.md"]

    recorder = HubRecorder(tmp_path, {"README.md": ours}).install(monkeypatch)
    push_to_hub(saved_folder, REPO_ID, card_data={"license": "mit"})
    assert ModelCard(recorder.uploaded["README.md"].decode()).data.license == "mit"

    edited = ours.replace(b"## Training", b"## Training\n\nTrained by hand on Tuesday.")
    recorder = HubRecorder(tmp_path, {"README.md": edited}).install(monkeypatch)
    result = push_to_hub(saved_folder, REPO_ID)
    assert "README.md" not in recorder.uploaded and "README.md" in result.skipped


def test_push_refuses_a_repo_holding_another_model(saved_folder, tmp_path, monkeypatch):
    recorder = HubRecorder(tmp_path, {"config.json": b'{"model_type": "bert"}'}).install(monkeypatch)
    with pytest.raises(ValueError, match="already holds a 'bert' model"):
        push_to_hub(saved_folder, REPO_ID)
    assert "create_commit" not in recorder.calls


@pytest.mark.parametrize("repo_id", ["not a repo", "a/b/c", "org/name--x", "-org/name", "org/" + "x" * 100])
def test_invalid_repo_id_fails_before_any_network_call(saved_folder, recorder, repo_id):
    with pytest.raises(ValueError, match="Invalid Hub repo id") as info:
        push_to_hub(saved_folder, repo_id)
    assert repr(repo_id) in str(info.value)
    assert recorder.calls == []


def test_push_a_model_object_with_its_processor(recorder):
    model = tiny_model(id2label=ID2LABEL)
    push_to_hub(model, REPO_ID, processor=ViTSegImageProcessor(patch_size=8, image_mean=[0.5] * 3))
    assert json.loads(recorder.uploaded["preprocessor_config.json"])["image_mean"] == [0.5] * 3
    assert "model.safetensors" in recorder.uploaded and "modeling_vitseg.py" in recorder.uploaded
    assert "No evaluation was recorded" in recorder.uploaded["README.md"].decode()


def test_push_without_a_saved_processor_uploads_a_default_one(tmp_path, recorder):
    tiny_model(id2label=ID2LABEL).save_pretrained(tmp_path / "model")
    with pytest.warns(UserWarning, match="no preprocessor_config.json"):
        push_to_hub(tmp_path / "model", REPO_ID)
    assert json.loads(recorder.uploaded["preprocessor_config.json"])["patch_size"] == 8
    assert "image_processing_vitseg.py" in recorder.uploaded


def test_push_refuses_a_folder_without_remote_code(saved_folder, tmp_path, recorder):
    folder = _copy_folder(saved_folder, tmp_path / "no_auto_map")
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no auto_map") as info:
        push_to_hub(folder, REPO_ID)
    assert str(folder / "config.json") in str(info.value) and recorder.calls == []


def test_cli_push(saved_folder, recorder, tmp_path, capsys):
    from hf_vitseg.cli import main

    eval_file = tmp_path / "metrics.json"
    eval_file.write_text(json.dumps({"mean_iou": 0.777}))
    code = main(["push", str(saved_folder), REPO_ID, "--license", "mit", "--dataset", "org/data",
                 "--tag", "microscopy", "--eval-results", str(eval_file)])
    assert code == 0
    card = ModelCard(recorder.uploaded["README.md"].decode())
    assert card.data.license == "mit" and "microscopy" in card.data.tags
    assert card.data.eval_results[0].metric_value == 0.777
    assert REPO_ID in capsys.readouterr().out

    assert main(["push", str(saved_folder), "bad repo id"]) == 1
    assert "Invalid Hub repo id 'bad repo id'" in capsys.readouterr().err


# -- bad input: broken folders ---------------------------------------------------------------------------------


def _copy_folder(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_truncated_weights_file_is_named(saved_folder, tmp_path, recorder):
    folder = _copy_folder(saved_folder, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # transformers' own message does not say which file is broken ...
    from safetensors import SafetensorError
    from transformers import AutoModelForSemanticSegmentation

    with pytest.raises(SafetensorError) as raw:
        AutoModelForSemanticSegmentation.from_pretrained(folder)
    assert str(weights) not in str(raw.value)
    # ... load_model's does, and says what to do
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        load_model(folder)
    assert str(weights) in str(info.value)
    with pytest.raises(ValueError, match="model.safetensors"):
        push_to_hub(folder, REPO_ID)
    assert "create_commit" not in recorder.calls


def test_garbage_weights_file_is_named(saved_folder, tmp_path):
    folder = _copy_folder(saved_folder, tmp_path / "garbage")
    (folder / "model.safetensors").write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(ValueError, match="is not a valid safetensors file") as info:
        check_model_folder(folder)
    assert str(folder / "model.safetensors") in str(info.value)


def test_unknown_head_names_the_config_and_the_value(saved_folder, tmp_path):
    folder = _copy_folder(saved_folder, tmp_path / "unknown_head")
    config = json.loads((folder / "config.json").read_text())
    config["head"] = "mask2former"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        load_model(folder)
    message = str(info.value)
    assert "'mask2former'" in message and str(folder / "config.json") in message and "linear" in message


def test_folder_without_safetensors_weights(saved_folder, tmp_path):
    folder = _copy_folder(saved_folder, tmp_path / "pickled")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        load_model(folder)


# -- the recorded repo, loaded by repo id from the HF cache, where hf-vitseg cannot be imported -------------------


def write_hf_cache(files: dict[str, bytes], cache_dir: Path, repo_id: str, commit: str = "a" * 40) -> Path:
    """Lay `files` out as huggingface_hub's cache holds a downloaded repo: snapshots/<commit>/... + refs/main."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_vitseg"] = None  # hf-vitseg is "not installed"
    try:
        import hf_vitseg
        raise SystemExit("hf_vitseg imported")
    except ImportError:
        pass
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForSemanticSegmentation, pipeline

    repo_id, work = sys.argv[1], sys.argv[2]
    model = AutoModelForSemanticSegmentation.from_pretrained(repo_id, trust_remote_code=True).eval()
    pixel_values = torch.from_numpy(np.load(work + "/pixel_values.npy"))
    with torch.no_grad():
        np.save(work + "/logits_remote.npy", model(pixel_values=pixel_values).logits.numpy())
    segmenter = pipeline("image-segmentation", model=repo_id, trust_remote_code=True)
    segments = segmenter(Image.open(work + "/image.png"))
    for i, segment in enumerate(segments):
        segment["mask"].save(f"{work}/mask_{i}.png")
    json.dump({"module": type(model).__module__, "pipeline": type(segmenter).__name__,
               "labels": [s["label"] for s in segments]}, open(work + "/result.json", "w"))
    """
)


@pytest.mark.slow
def test_pushed_repo_loads_by_repo_id_offline_without_hf_vitseg(saved_folder, recorder, tmp_path):
    push_to_hub(saved_folder, REPO_ID)
    write_hf_cache(recorder.uploaded, tmp_path / "hf_home" / "hub", REPO_ID)

    model = load_model(saved_folder)
    processor = ViTSegImageProcessor.from_pretrained(saved_folder)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 40, 56, generator=generator)
    np.save(tmp_path / "pixel_values.npy", pixel_values.numpy())
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits.numpy()
    # 50 x 70 pixels: the processor pads to 56 x 72, and the masks must still line up with the image
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    inputs = processor(image, return_input_sizes=True)
    input_sizes = inputs.pop("input_sizes")
    with torch.no_grad():
        expected_map = processor.post_process_semantic_segmentation(
            model(**inputs), target_sizes=[(50, 70)], input_sizes=input_sizes,
            padded_size=inputs["pixel_values"].shape[-2:])[0].numpy()

    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    process = subprocess.run([sys.executable, "-c", FRESH_PROCESS, REPO_ID, str(tmp_path)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["module"].startswith("transformers_modules."), "loaded from the repo's code, not hf_vitseg"
    assert result["pipeline"] == "ViTSegSegmentationPipeline"
    # the same weights and code: equal up to float summation order (thread counts differ between processes)
    np.testing.assert_allclose(np.load(tmp_path / "logits_remote.npy"), logits, rtol=0, atol=1e-6)

    present = np.unique(expected_map)
    assert result["labels"] == [ID2LABEL[int(c)] for c in present]
    for i, class_id in enumerate(present):
        mask = np.array(Image.open(tmp_path / f"mask_{i}.png"))
        np.testing.assert_array_equal(mask > 0, expected_map == class_id)
