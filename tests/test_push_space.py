"""`hf-vitseg push --space` (issue 12 item 5): a Gradio Space serving the pushed model with `hf-vitseg app`'s page.

The Space holds only what hf-vitseg writes for it (app.py, requirements.txt, its card, hf-vitseg's own source), never
replaces a file a person wrote, has a dry run, and runs where hf-vitseg is not installed, loading the model with the
code it was pushed with (trust_remote_code=True). The Hub client's network calls are replaced by `SpaceRecorder`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model
from huggingface_hub import SpaceCard
from PIL import Image
from test_hub import HubRecorder

import hf_vitseg
from hf_vitseg import ViTSegImageProcessor
from hf_vitseg.cli import main
from hf_vitseg.hub.space import SPACE_MARK, package_files, push_space, requirements, space_files

MODEL_ID, SPACE_ID = "hf-vitseg-tests/tiny-model", "hf-vitseg-tests/tiny-model-demo"
SECRET = "hf_SECRET_TOKEN_do_not_upload"


def SpaceRecorder(tmp_path: Path, remote: dict[str, bytes] | None = None) -> HubRecorder:
    """The shared fake Hub, serving `remote` as the Space's files (the model repo looks empty)."""
    return HubRecorder(tmp_path, remote, remote_repo_type="space")


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    return SpaceRecorder(tmp_path).install(monkeypatch)


@pytest.fixture
def model_folder(tmp_path) -> Path:
    folder = tmp_path / "run"
    tiny_model(num_labels=3, id2label={0: "background", 1: "nucleus", 2: "border"}).save_pretrained(folder)
    ViTSegImageProcessor(patch_size=8).save_pretrained(folder)
    (folder / "secrets.py").write_text(f'HF_TOKEN = "{SECRET}"\n')  # a person's file beside the model
    return folder


def expected_space_names() -> set[str]:
    return {"app.py", "requirements.txt", "README.md"} | set(package_files())


def test_package_files_are_hf_vitsegs_python_source_only():
    files = package_files()
    root = Path(hf_vitseg.__file__).resolve().parent
    assert "hf_vitseg/__init__.py" in files and "hf_vitseg/inference/app.py" in files
    assert "hf_vitseg/modeling/modeling_vitseg.py" in files and "hf_vitseg/hub/space.py" in files
    assert all(name.endswith(".py") and "__pycache__" not in name for name in files)
    assert {name for name in files} == {f"hf_vitseg/{p.relative_to(root).as_posix()}" for p in root.rglob("*.py")
                                       if "__pycache__" not in p.parts}


def test_requirements_are_hf_vitsegs_runtime_requirements():
    listed = requirements()
    names = {line.split(">")[0].split("<")[0].split("=")[0].strip() for line in listed}
    assert {"torch", "transformers", "safetensors", "pillow", "numpy"} <= names
    assert not any("extra" in line for line in listed) and "gradio" not in names  # Gradio: the Space's SDK
    contents, _ = space_files(MODEL_ID, SPACE_ID)
    text = contents["requirements.txt"].decode()
    assert text.startswith(f"# {SPACE_MARK}") and text.splitlines()[1:] == listed


def test_the_space_also_gets_the_tiff_extra_and_no_other(monkeypatch):
    import importlib.metadata

    listed = ["torch>=2.4", 'tifffile>=2023.7; extra == "tiff"', 'tifffile>=2023.7; extra == "dev"',
              'pytest>=8; extra == "dev"', 'gradio>=5.30; extra == "app"']
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: listed)
    assert requirements() == ["torch>=2.4", "tifffile>=2023.7"]


def test_cli_pushes_the_model_then_a_space_with_only_what_hf_vitseg_writes(model_folder, recorder, capsys):
    assert main(["push", str(model_folder), MODEL_ID, "--space", SPACE_ID, "--private"]) == 0
    out = capsys.readouterr().out
    # the model first, then the Space: created as a Gradio Space, listed before its commit
    assert recorder.repo_calls.index(f"create_commit:{MODEL_ID}") < recorder.repo_calls.index(f"create_repo:{SPACE_ID}")
    assert recorder.repos[SPACE_ID]["repo_type"] == "space" and recorder.repos[SPACE_ID]["space_sdk"] == "gradio"
    assert recorder.repos[SPACE_ID]["private"] is True
    assert recorder.commit_kwargs_by_repo[SPACE_ID]["repo_type"] == "space"
    assert out.index(f"files to Space {SPACE_ID}:") < out.index(f"Wrote the Space {SPACE_ID}")

    space = recorder.commits[SPACE_ID]
    assert set(space) == expected_space_names()
    for name, path in package_files().items():  # hf-vitseg's own source, byte for byte
        assert space[name] == path.read_bytes(), name
    for name, content in space.items():
        assert SECRET.encode() not in content, name
    assert "secrets.py" not in recorder.commits[MODEL_ID]

    app = space["app.py"].decode()
    assert SPACE_MARK in app and f"os.environ.get(\"HF_VITSEG_MODEL\", {MODEL_ID!r})" in app
    assert "trust_remote_code=True" in app and "from hf_vitseg.inference.app import SegmentationApp" in app
    card = SpaceCard(space["README.md"].decode())
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and card.data.models == [MODEL_ID]
    assert card.data.sdk_version and SPACE_MARK in card.text


def test_dry_run_lists_the_space_and_sends_nothing(model_folder, recorder, capsys):
    assert main(["push", str(model_folder), MODEL_ID, "--space", SPACE_ID, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert recorder.calls == []
    assert f"Would upload {len(expected_space_names())} files to Space {SPACE_ID}:" in out
    for name in ("app.py", "requirements.txt", "README.md"):
        assert f"  {name} " in out
    assert f"hf_vitseg/ ({len(package_files())} Python files)" in out
    assert out.rstrip().endswith("Dry run: nothing was sent.")

    result = push_space(MODEL_ID, SPACE_ID, dry_run=True)
    assert result.dry_run and result.commit is None and set(result.files) == expected_space_names()


@pytest.mark.parametrize("written_by_hf_vitseg", [False, True])
def test_a_space_file_a_person_wrote_is_never_replaced(tmp_path, monkeypatch, written_by_hf_vitseg):
    app = f"# {SPACE_MARK}\nprint('old')\n" if written_by_hf_vitseg else "import gradio  # my own app\n"
    recorder = SpaceRecorder(tmp_path, {"app.py": app.encode(), ".gitattributes": b"*.bin lfs\n"}).install(monkeypatch)
    if written_by_hf_vitseg:  # an earlier hf-vitseg Space is updated
        push_space(MODEL_ID, SPACE_ID)
        assert set(recorder.commits[SPACE_ID]) == expected_space_names()
        return
    with pytest.raises(ValueError, match=r"already holds app\.py, which hf-vitseg did not write"):
        push_space(MODEL_ID, SPACE_ID)
    assert f"create_commit:{SPACE_ID}" not in recorder.repo_calls


def test_bad_space_ids_stop_the_push_before_anything_is_sent(model_folder, recorder, capsys):
    assert main(["push", str(model_folder), MODEL_ID, "--space", "not a valid id!"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-vitseg push: error: --space: Invalid Hub repo id")
    assert main(["push", str(model_folder), MODEL_ID, "--space", MODEL_ID]) == 1
    assert "give the Space its own id" in capsys.readouterr().err
    assert recorder.calls == []


def test_a_refused_space_is_one_line_and_says_the_model_is_pushed(model_folder, tmp_path, monkeypatch, capsys):
    SpaceRecorder(tmp_path, {"README.md": b"---\nsdk: gradio\n---\nmine\n"}).install(monkeypatch)
    assert main(["push", str(model_folder), MODEL_ID, "--space", SPACE_ID]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "README.md, which hf-vitseg did not write" in err[0]
    assert err[0].endswith(f"The model is on {MODEL_ID}.")


# Runs the Space's app.py in a fresh interpreter where hf-vitseg's installation is switched off: the editable
# install's import hook is removed, so `hf_vitseg` can only come from the Space's own folder.
SPACE_RUNNER = textwrap.dedent("""
    import json, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "").lower()]
    sys.path_importer_cache.clear()
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and not p.rstrip("/").endswith("/work/main")]
    sys.path.insert(0, sys.argv[1])
    import app
    import hf_vitseg
    result = app.segmenter.predict(sys.argv[2])
    print(json.dumps({"hf_vitseg": hf_vitseg.__file__, "model_module": type(app.segmenter.model).__module__,
                      "areas": result.areas, "blocks": type(app.demo).__name__}))
""")


def test_the_space_runs_without_hf_vitseg_installed(model_folder, tmp_path):
    from hf_vitseg.inference.app import SegmentationApp

    space = tmp_path / "space"
    contents, _ = space_files(MODEL_ID, SPACE_ID)
    for name, content in contents.items():
        (space / name).parent.mkdir(parents=True, exist_ok=True)
        (space / name).write_bytes(content if isinstance(content, bytes) else content.read_bytes())
    image = tmp_path / "cells.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3)).astype(np.uint8)).save(image)
    environment = {"HF_VITSEG_MODEL": str(model_folder), "HF_MODULES_CACHE": str(tmp_path / "modules"),
                   "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PATH": "/usr/bin:/bin",
                   "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", SPACE_RUNNER, str(space), str(image)], cwd=space, env=environment,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(report["hf_vitseg"]).resolve().is_relative_to(space.resolve())  # the Space's own copy
    assert report["model_module"].startswith("transformers_modules.")  # the code pushed with the model
    assert report["blocks"] == "Blocks"
    assert report["areas"] == SegmentationApp.from_pretrained(model_folder).predict(image).areas
