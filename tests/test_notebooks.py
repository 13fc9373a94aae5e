"""The notebooks in `notebooks/`, executed top to bottom with nbclient on tiny settings.

Each notebook reads its settings from `HF_VITSEG_NB_*` environment variables in its `parameters` cell, so the
tests point it at a tiny random backbone saved to a temporary folder, a few steps and small images, and run
it in a temporary working directory. The kernel is this interpreter (`sys.executable`), declared in a
kernelspec written to a temporary `JUPYTER_PATH`: no kernelspec needs to be installed, and a `python3`
kernelspec elsewhere on the machine (another interpreter) cannot be picked up by mistake. The assertions read
what the notebooks write: result JSON files, saved models, images, recorded Hub uploads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is a dev dependency: pip install -e '.[dev]'")
nbclient = pytest.importorskip("nbclient", reason="nbclient is a dev dependency: pip install -e '.[dev]'")
pytest.importorskip("ipykernel", reason="ipykernel is a dev dependency: pip install -e '.[dev]'")

from conftest import tiny_backbone_config, tiny_model  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402
from PIL import Image  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL_NAME = "hf-vitseg-tests"
CELL_TIMEOUT_S = 300
TINY_PATCH = tiny_backbone_config("dinov2").patch_size


def run_notebook(name: str, tmp_path: Path, monkeypatch, params: dict[str, str]) -> Path:
    """Execute `notebooks/<name>` in `tmp_path / "work"` with `params` as environment variables of the kernel.

    Returns the working directory. A failing cell raises nbclient's `CellExecutionError`, which shows the
    cell's source and traceback.
    """
    workdir = tmp_path / "work"
    workdir.mkdir()
    jupyter_path = tmp_path / "jupyter"
    spec_dir = jupyter_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "hf-vitseg tests",
        "language": "python",
        # the kernel's environment: the test process's (HF_HUB_OFFLINE=1 ...) plus these
        "env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **params},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    return workdir


# -- the notebooks themselves -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["quickstart.ipynb", "finetune_with_trainer.ipynb", "publish_to_hub.ipynb", "panoptic_nuclei.ipynb"]
)
def test_notebook_is_stored_clean(name):
    """No stored outputs or execution counts, a `parameters` cell, and the standard python3 kernel."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "clear the outputs"
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "one cell tagged `parameters`"
    assert "os.environ" in tagged[0].source, "the parameters cell reads its settings from the environment"
    assert notebook.metadata.kernelspec.name == "python3"
    markdown = [cell for cell in notebook.cells if cell.cell_type == "markdown"]
    assert len(markdown) >= len(code) // 2, "each step explained"


# -- execution on tiny settings -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_quickstart(tmp_path, monkeypatch, tiny_backbone_dir):
    workdir = run_notebook(
        "quickstart.ipynb", tmp_path, monkeypatch,
        {
            "HF_VITSEG_NB_BACKBONE": str(tiny_backbone_dir),
            "HF_VITSEG_NB_SAMPLE_SIZE": "128",
            "HF_VITSEG_NB_SCALE": "1",
            "HF_VITSEG_NB_TILE": "32",
            "HF_VITSEG_NB_EPOCHS": "8",
            "HF_VITSEG_NB_LR": "0.01",
            "HF_VITSEG_NB_OUTPUT_DIR": "out",
        },
    )
    results = json.loads((workdir / "out" / "results.json").read_text())
    assert results["backbone"] == str(tiny_backbone_dir)
    # the sample's 128x128 corner, right half, at scale 1
    assert results["test_image_shape"] == [128, 64]
    assert results["prediction_shape"] == [128, 64], "the label map has the image's size, padding cut away"
    assert set(results["predicted_classes"]) <= {0, 1}
    losses = results["loss_per_epoch"]
    assert len(losses) == 8 and losses[-1] < losses[0], f"the head did not learn: {losses}"
    for key in ("test_nucleus_iou", "test_mean_iou", "test_pixel_accuracy"):
        assert 0.0 <= results[key] <= 1.0, (key, results[key])
    with Image.open(workdir / "out" / "prediction.png") as figure:
        # three panels of 64 px side by side (+ gaps), overlays with a legend below the image
        assert figure.width >= 3 * 64 and figure.height > 128


@pytest.mark.slow
def test_finetune_with_trainer(tmp_path, monkeypatch, tiny_backbone_dir):
    workdir = run_notebook(
        "finetune_with_trainer.ipynb", tmp_path, monkeypatch,
        {
            "HF_VITSEG_NB_BACKBONE": str(tiny_backbone_dir),
            "HF_VITSEG_NB_SAMPLE_SIZE": "128",
            "HF_VITSEG_NB_SCALE": "1",
            "HF_VITSEG_NB_TILE": "32",
            "HF_VITSEG_NB_MAX_STEPS": "4",
            "HF_VITSEG_NB_EVAL_STEPS": "2",
            "HF_VITSEG_NB_BATCH_SIZE": "4",
            "HF_VITSEG_NB_OUTPUT_DIR": "out",
        },
    )
    out = workdir / "out"
    # the dataset: PNG pairs written to disk and read back by load_image_folder
    train_images = sorted((out / "data" / "train" / "images").glob("*.png"))
    train_masks = sorted((out / "data" / "train" / "masks").glob("*.png"))
    assert train_images and [p.name for p in train_images] == [p.name for p in train_masks]

    results = json.loads((out / "results.json").read_text())
    assert results["train_tiles"] == len(train_images)
    assert results["global_step"] == 4
    assert results["evaluations_during_training"] == 2, "eval every 2 of 4 steps"
    for key in ("eval_mean_iou", "eval_pixel_accuracy", "eval_mean_accuracy"):
        assert 0.0 <= results[key] <= 1.0, (key, results[key])
    assert results["reloaded_max_abs_diff"] == 0.0, "the reloaded model gives the trained model's logits"

    model_dir = out / "model"
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "modeling_vitseg.py",
                 "image_processing_vitseg.py", "eval_results.json", "trainer_state.json", "training_args.json"):
        assert (model_dir / name).is_file(), name
    assert not list(model_dir.glob("*.bin")), "safetensors only, no pickles beside the model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "background", "1": "nucleus"}
    assert "AutoModelForSemanticSegmentation" in config["auto_map"]
    saved_eval = json.loads((model_dir / "eval_results.json").read_text())
    assert saved_eval["eval_mean_iou"] == pytest.approx(results["eval_mean_iou"])
    assert json.loads((model_dir / "preprocessor_config.json").read_text())["patch_size"] == TINY_PATCH
    assert (out / "prediction.png").is_file()


@pytest.fixture
def saved_model(tmp_path, tiny_backbone_dir) -> Path:
    """A model folder as the fine-tuning notebook leaves it (model, processor, eval results), tiny."""
    from hf_vitseg import ViTSegImageProcessor

    model = tiny_model(backbone=tiny_backbone_dir, num_labels=2, id2label={0: "background", 1: "nucleus"})
    folder = tmp_path / "saved_model"
    model.save_pretrained(folder)
    ViTSegImageProcessor(patch_size=TINY_PATCH).save_pretrained(folder)
    (folder / "eval_results.json").write_text(json.dumps({"eval_mean_iou": 0.5, "eval_pixel_accuracy": 0.7}))
    return folder


@pytest.mark.slow
def test_publish_to_hub(tmp_path, monkeypatch, saved_model):
    before = {p.name: p.read_bytes() for p in saved_model.iterdir()}
    workdir = run_notebook(
        "publish_to_hub.ipynb", tmp_path, monkeypatch,
        {
            "HF_VITSEG_NB_MODEL_DIR": str(saved_model),
            "HF_VITSEG_NB_REPO_ID": "hf-vitseg-tests/tiny-nuclei",
            "HF_VITSEG_NB_SAMPLE_SIZE": "128",
            "HF_VITSEG_NB_SCALE": "1",
            "HF_VITSEG_NB_EVAL_WINDOW": "32",
            "HF_VITSEG_NB_OUTPUT_DIR": "out",
            "HF_VITSEG_NOTEBOOK_RECORD": "1",
        },
    )
    out = workdir / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["recorded"] is True
    assert 0.0 <= results["mean_iou"] <= 1.0

    # what the push would have uploaded, recorded file by file
    uploaded = out / "recorded_push"
    names = {p.name for p in uploaded.iterdir()}
    assert sorted(results["uploaded"]) == sorted(names)
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "modeling_vitseg.py",
            "configuration_vitseg.py", "image_processing_vitseg.py"} <= names
    assert "training_args.bin" not in names, "pickles stay local"
    assert "eval_results.json" in names, "the run's evaluation record goes up with the model (issue 13 item 4)"
    assert (uploaded / "model.safetensors").read_bytes() == (saved_model / "model.safetensors").read_bytes()

    # the card: metadata parses with huggingface_hub, and its model-index holds this evaluation's mIoU,
    # not the one stored in the folder
    card = ModelCard((uploaded / "README.md").read_text())
    assert card.data.pipeline_tag == "image-segmentation"
    assert "linear" in card.data.tags
    miou = {result.metric_type: result.metric_value for result in card.data.eval_results}["mean_iou"]
    assert miou == pytest.approx(results["mean_iou"], abs=1e-4) and miou == pytest.approx(results["card_mean_iou"])
    assert (out / "README.md").read_text() == (uploaded / "README.md").read_text()

    # in a process where hf_vitseg cannot be imported, the uploaded files load through remote code and give the
    # saved model's logits; the pipeline names the classes present
    assert results["remote_model_class"].startswith("transformers_modules."), results["remote_model_class"]
    assert results["remote_code_max_abs_diff"] == 0.0
    assert set(results["pipeline_labels"]) <= {"background", "nucleus"} and results["pipeline_labels"]
    # the user's folder is left as it was
    assert {p.name: p.read_bytes() for p in saved_model.iterdir()} == before


@pytest.mark.slow
def test_panoptic_nuclei(tmp_path, monkeypatch, tiny_backbone_dir):
    """The mask-transformer notebook: instance files -> pmt trained with train() -> panoptic output, picture, PQ."""
    workdir = run_notebook(
        "panoptic_nuclei.ipynb", tmp_path, monkeypatch,
        {
            "HF_VITSEG_NB_BACKBONE": str(tiny_backbone_dir),
            "HF_VITSEG_NB_SAMPLE_SIZE": "96",
            "HF_VITSEG_NB_SCALE": "1",
            "HF_VITSEG_NB_TILE": "32",
            "HF_VITSEG_NB_NUM_QUERIES": "8",
            "HF_VITSEG_NB_MAX_STEPS": "3",
            "HF_VITSEG_NB_BATCH_SIZE": "2",
            "HF_VITSEG_NB_THRESHOLD": "0.0",
            "HF_VITSEG_NB_OUTPUT_DIR": "out",
        },
    )
    out = workdir / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["head"] == "pmt" and results["test_image_shape"] == [96, 48]
    assert results["segmentation_shape"] == [96, 48], "the panoptic map has the image's size, padding cut away"
    assert results["attn_mask_probs"] == [0.0] * len(results["attn_mask_probs"]), "annealed to plain attention"
    if results["num_segments"]:
        assert results["segment_keys"] == ["id", "label_id", "score", "was_fused"]
    assert 0.0 <= results["nucleus_pq"] <= 1.0
    assert sorted(p.name for p in (out / "data").iterdir()) == ["images", "masks"]
    with Image.open(out / "panoptic.png") as figure:
        assert figure.width >= 3 * 48 and figure.height >= 96
