"""The wheel ships every package and the data files the code reads at run time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_package_list_is_every_folder_holding_python_code():
    on_disk = {
        ".".join(folder.relative_to(ROOT).parts)
        for folder in (ROOT / "hf_vitseg").rglob("*")
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py"))
    } | {"hf_vitseg"}
    mapped = set(SETUPTOOLS.get("package-dir", {}))
    assert set(SETUPTOOLS["packages"]) == on_disk | mapped
    assert SETUPTOOLS["package-dir"] == {"hf_vitseg.hub_cards": "hub_cards"}
    for package, folder in SETUPTOOLS["package-dir"].items():
        assert (ROOT / folder / "__init__.py").is_file(), package



def test_the_readmes_box_table_names_every_part_of_the_layout():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## What is in the box", 1)[1].split("\n## ", 1)[0]
    places = [f"`hf_vitseg/{folder.name}/`" for folder in sorted((ROOT / "hf_vitseg").iterdir())
              if (folder / "__init__.py").is_file()]
    places += ["`hf_vitseg/convert.py`", "`hf_vitseg/export.py`", "`hub_cards/`", "`examples/`"]
    where = " ".join(row.split("|")[1] for row in table.splitlines() if row.startswith("| "))  # the first column
    assert [place for place in places if place not in where] == []

def test_the_wheel_holds_the_model_card_template_the_typing_marker_and_the_demo_sample(tmp_path):
    # Built from a copy, so setuptools' build/ and egg-info never land in (or race over) the working tree.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("hf_vitseg", "hub_cards"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("hf_vitseg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for wanted in ("hf_vitseg/hub_cards/model_card.md", "hf_vitseg/py.typed", "hf_vitseg/demo/nuclei_sample.npz",
                   "hf_vitseg/modeling/modeling_vitseg.py", "hf_vitseg/cli/__init__.py"):
        assert wanted in names, wanted
    # the card renders from the wheel alone (its template read as package data), not from the checkout
    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    render = (
        "import hf_vitseg, transformers; from hf_vitseg.hub import render_model_card; "
        "config = hf_vitseg.ViTSegConfig(backbone_config=transformers.Dinov2Config(hidden_size=32, "
        "num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32), head='linear', num_labels=2); "
        "print(hf_vitseg.__file__); print(render_model_card(config, 'me/tiny'))"
    )
    env = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", render], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(installed)), result.stdout.splitlines()[0]
    assert "library_name: transformers" in result.stdout and "# tiny" in result.stdout
