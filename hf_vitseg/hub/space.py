"""`push_space`: a Hugging Face Space (Gradio) that serves a pushed model with `hf-vitseg app`'s page.

`hf-vitseg push FOLDER REPO_ID --space SPACE_ID` pushes the model to `REPO_ID`, then writes the Space. What goes up to
the Space, in one commit of `CommitOperationAdd`s (nothing is deleted), is what hf-vitseg writes for it and nothing
else (`space_files` lists it; a dry run only lists it):

- `app.py`: loads the model repo with `trust_remote_code=True` (the model runs the code it was pushed with) and
  serves `hf_vitseg.inference.app.SegmentationApp`'s page, the one `hf-vitseg app` serves;
- `requirements.txt`: hf-vitseg's own runtime requirements (torch, transformers, ...) and tifffile (its `tiff`
  extra, for TIFF uploads); Gradio comes from the Space's SDK (`sdk_version` in `README.md`, the Gradio version that
  wrote the Space);
- `README.md`: the Space's card (YAML: `sdk: gradio`, `app_file: app.py`, `models: [REPO_ID]`);
- `hf_vitseg/**.py`: the source of the hf-vitseg that writes the Space, read from the installed package (Python files
  only, no data, no symbolic links). hf-vitseg is not on the package index, so the Space does not pip-install it: it
  carries the exact version that wrote it (a pin by content), and runs where hf-vitseg was never installed.

Nothing a person wrote is overwritten: if the Space already holds an `app.py`, `requirements.txt` or `README.md`
without hf-vitseg's mark (`SPACE_MARK`), the push stops before anything is sent to the Space. A private model repo
needs the Space secret `HF_TOKEN` (a read token) to load.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError

from .push import HubUnreachableError, _regular_file, _transport_errors, _unreachable, check_repo_id

# In every top-level file hf-vitseg writes to a Space: how it knows the file is its own (and may replace it).
SPACE_MARK = "Written by hf-vitseg push --space"
SPACE_TOP_FILES = ("app.py", "requirements.txt", "README.md")
PACKAGE_FOLDER = "hf_vitseg"
# The Gradio version a Space gets when the one writing it has no Gradio installed (the `app` extra's lower bound).
DEFAULT_GRADIO_VERSION = "6.0.0"

APP_TEMPLATE = '''"""{model_id}: upload an image, see its segmentation. {mark} (hf-vitseg {version}).

The model loads from its Hub repo with the code it was pushed with (trust_remote_code=True); the page is
hf-vitseg's `hf-vitseg app` page, from the hf_vitseg source beside this file (hf-vitseg is not on the package index,
so the Space carries the version that wrote it). HF_VITSEG_MODEL serves another model repo; a private model repo
needs the Space secret HF_TOKEN.
"""

import os

import torch

from hf_vitseg.inference.app import SegmentationApp

MODEL = os.environ.get("HF_VITSEG_MODEL", {model_id!r})
segmenter = SegmentationApp.from_pretrained(
    MODEL, trust_remote_code=True, device="cuda" if torch.cuda.is_available() else None
)
demo = segmenter.build()

if __name__ == "__main__":
    demo.launch()
'''

README_TEMPLATE = """---
title: {title}
emoji: 🔬
colorFrom: indigo
colorTo: green
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
models:
- {model_id}
tags:
- hf-vitseg
- image-segmentation
---

# {title}

Semantic segmentation with [{model_id}](https://huggingface.co/{model_id}): upload an image to see the overlay with
its legend, the area of every class and a download of the label map (a PNG of class ids). Large images are
predicted in sliding windows.

<!-- {mark} (hf-vitseg {version}). app.py loads the model with trust_remote_code=True; hf_vitseg/ holds the
source of the hf-vitseg version that wrote this Space. -->
"""


@dataclass
class SpacePushResult:
    """What `push_space` did.

    Attributes:
        space_id: the Space pushed to.
        files: `{path in the Space: where it comes from}`, everything the commit holds (or would hold).
        commit: what `HfApi.create_commit` returned; None for a dry run.
        dry_run: True when nothing was sent.
    """

    space_id: str
    files: dict[str, str] = field(default_factory=dict)
    commit: Any = None
    dry_run: bool = False


def _version() -> str:
    try:
        return importlib.metadata.version("hf-vitseg")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def gradio_version() -> str:
    """The Gradio version the Space runs: the one installed here (what `hf-vitseg app` was run with), else
    `DEFAULT_GRADIO_VERSION`."""
    try:
        return importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        return DEFAULT_GRADIO_VERSION


# Extras the Space installs too: TIFF uploads (multi-channel and 16-bit images) need tifffile.
SPACE_EXTRAS = ("tiff",)


def requirements() -> list[str]:
    """hf-vitseg's runtime requirements and those of `SPACE_EXTRAS`, as its installed metadata lists them."""
    try:
        listed = importlib.metadata.requires("hf-vitseg") or []
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("hf-vitseg's metadata is missing: install it (pip install -e .) before writing a Space.")
    wanted = []
    for requirement in listed:
        name, _, marker = requirement.partition(";")
        extras = {extra for extra in SPACE_EXTRAS if f'extra == "{extra}"' in marker.replace("'", '"')}
        if (not marker.strip() or extras) and name.strip() not in wanted:
            wanted.append(name.strip())
    return wanted


def package_files() -> dict[str, Path]:
    """`{"hf_vitseg/...py": path}`: every Python file of the installed hf_vitseg package (no caches, no data)."""
    import hf_vitseg

    root = Path(hf_vitseg.__file__).resolve().parent
    files = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if "__pycache__" in relative.parts:
            continue
        files[f"{PACKAGE_FOLDER}/{relative.as_posix()}"] = _regular_file(path, "hf-vitseg's own source")
    return files


def space_files(model_id: str, space_id: str) -> tuple[dict[str, bytes | Path], dict[str, str]]:
    """The files of a Space serving `model_id`, and where each comes from.

    Args:
        model_id: the model's Hub repo id (`username/model-name`).
        space_id: the Space's repo id (its name is the card's title).

    Returns:
        `({path in the Space: contents (bytes) or file}, {path in the Space: where it comes from})`.
    """
    check_repo_id(model_id)
    check_repo_id(space_id)
    version = _version()
    contents: dict[str, bytes | Path] = {
        "app.py": APP_TEMPLATE.format(model_id=model_id, mark=SPACE_MARK, version=version).encode(),
        "requirements.txt": (f"# {SPACE_MARK} (hf-vitseg {version}): hf-vitseg's runtime requirements; Gradio comes "
                             "from the Space's sdk_version.\n" + "\n".join(requirements()) + "\n").encode(),
        "README.md": README_TEMPLATE.format(title=space_id.split("/")[-1], model_id=model_id, mark=SPACE_MARK,
                                            version=version, gradio_version=gradio_version()).encode(),
    }
    sources = {"app.py": f"hf_vitseg/hub/space.py's template (loads {model_id} with trust_remote_code=True)",
               "requirements.txt": "hf-vitseg's installed metadata (its runtime requirements)",
               "README.md": "hf_vitseg/hub/space.py's template (the Space card, sdk: gradio)"}
    for name, path in package_files().items():
        contents[name] = path
        sources[name] = str(path)
    return contents, sources


def push_space(model_id: str, space_id: str, *, private: bool | None = None, token: str | bool | None = None,
               commit_message: str = "Upload hf-vitseg Space", dry_run: bool = False,
               on_plan: Callable[[dict[str, str]], None] | None = None, api: HfApi | None = None) -> SpacePushResult:
    """Create or update the Gradio Space `space_id` that serves the model `model_id` (see the module docstring).

    Args:
        model_id: the model's Hub repo id, pushed already (`push_to_hub`).
        space_id: the Space's repo id, created (SDK gradio) if it does not exist.
        private: create the Space private (an existing one keeps its visibility).
        token: a Hub token; default the logged-in one.
        commit_message: the commit's message.
        dry_run: list the files (`on_plan` and the result) and send nothing.
        on_plan: called with `{path in the Space: where it comes from}` before anything is sent.
        api: the `HfApi` to use (tests pass a fake one); default `HfApi(token=token)`.

    Raises:
        ValueError: an invalid repo id, or a Space holding an `app.py` / `requirements.txt` / `README.md` that
            hf-vitseg did not write.
        HubUnreachableError: no network, or `HF_HUB_OFFLINE=1`.
    """
    contents, sources = space_files(model_id, space_id)
    if dry_run:
        if on_plan is not None:
            on_plan(dict(sources))
        return SpacePushResult(space_id=space_id, files=sources, dry_run=True)
    api = api if api is not None else HfApi(token=token)
    try:
        url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        space_id = getattr(url, "repo_id", None) or space_id
        _check_space_is_ours(api, space_id)
        if on_plan is not None:
            on_plan(dict(sources))
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes)
                                         else str(content)) for name, content in contents.items()]
        commit = api.create_commit(space_id, operations=operations, commit_message=commit_message,
                                   repo_type="space")
    except _transport_errors() as error:
        raise _unreachable(error) from error
    return SpacePushResult(space_id=space_id, files=sources, commit=commit)


def _check_space_is_ours(api: HfApi, space_id: str) -> None:
    """Stop before a commit that would replace a file of the Space that a person wrote."""
    try:
        remote = set(api.list_repo_files(space_id, repo_type="space"))
    except (RepositoryNotFoundError, EntryNotFoundError):
        return
    foreign = []
    for name in SPACE_TOP_FILES:
        if name in remote:
            text = Path(api.hf_hub_download(space_id, name, repo_type="space")).read_text(encoding="utf-8",
                                                                                          errors="replace")
            if SPACE_MARK not in text:
                foreign.append(name)
    if foreign:
        raise ValueError(
            f"The Space {space_id} already holds {', '.join(foreign)}, which hf-vitseg did not write; it will not "
            "overwrite them. Give another --space id, or delete those files from the Space first."
        )


__all__ = ["SPACE_MARK", "HubUnreachableError", "SpacePushResult", "package_files", "push_space", "requirements",
           "space_files"]
