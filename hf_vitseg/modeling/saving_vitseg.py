"""Writing a model folder without losing anything: never over a file hf-vitseg did not write, never half a model.

`ViTSegForSemanticSegmentation.save_pretrained` writes through `save_folder_safely`: the whole save goes into a
staging folder on the same filesystem (a hidden sibling of the target), is checked against what the target
holds, and only then is moved in file by file with `os.replace` (a rename: it cannot run out of disk). A save
that fails midway (disk full, a bug) leaves the target as it was. `SAVED_FILES_MANIFEST`
(`.hf_vitseg_files.json`) lists what the save wrote: the next save into the folder may replace those files and
removes those it no longer writes (old weight shards); a file it does not list is the user's.

This file travels with every saved checkpoint (remote code): it imports only the standard library and
transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

SAVED_FILES_MANIFEST = ".hf_vitseg_files.json"
MODEL_TYPE = "vitseg"


def save_folder_safely(write: Callable[[str], None], directory) -> list[str]:
    """Run `write(folder)` into a staging folder, then move what it wrote into `directory`.

    Raises `FileExistsError`, changing nothing, when the save would replace a file in `directory` that
    hf-vitseg did not write (see `files_written_by_hf_vitseg`); a file with the same bytes is not a conflict.
    Files a previous save recorded and this one does not write are removed; every other file stays.

    Args:
        write: writes the model into the folder it is given (a `save_pretrained`).
        directory: the target folder, created if needed.

    Returns:
        The files written, relative to `directory`.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"Cannot save a model to {directory}: it is a file. Choose a folder.")
    directory.mkdir(parents=True, exist_ok=True)
    staging = _staging_folder(directory)
    try:
        write(str(staging))
        written = _listing(staging)
        owned = files_written_by_hf_vitseg(directory)
        _refuse_foreign(directory, staging, written, owned)
        (staging / SAVED_FILES_MANIFEST).write_text(json.dumps({"files": written}, indent=1) + "\n")
        # config.json last, the manifest after it: a folder loads from its config, and the manifest claims
        # only what has been moved in
        for name in sorted(written, key=lambda n: n == "config.json") + [SAVED_FILES_MANIFEST]:
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, directory / name)
        for name in sorted(owned - set(written)):  # what the previous save wrote and this one does not (shards)
            (directory / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def check_save_target(model, directory) -> None:
    """Raise `FileExistsError` now if `model.save_pretrained(directory)` would be refused later (it would replace
    a file hf-vitseg did not write): a training run checks its output folder before its first step.

    Args:
        model: the `PreTrainedModel` that will be saved; it is saved without weights to a temporary folder.
        directory: where it will be saved.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    with tempfile.TemporaryDirectory() as planned:
        model.save_pretrained(planned, state_dict={})  # every file a save writes; the weights file empty
        written = [name for name in _listing(Path(planned)) if name != SAVED_FILES_MANIFEST]
        _refuse_foreign(directory, Path(planned), written, files_written_by_hf_vitseg(directory))


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _refuse_foreign(directory: Path, staging: Path, written: list[str], owned: set[str]) -> None:
    foreign = [name for name in written if _is_foreign(directory / name, staging / name, name in owned)]
    if foreign:
        raise FileExistsError(
            f"Saving the model to {directory} would replace {', '.join(foreign)}, which hf-vitseg did not write. "
            "Nothing was changed. Move those files away, or save the model to another folder."
        )


def files_written_by_hf_vitseg(directory) -> set[str]:
    """The files in `directory` that a previous hf-vitseg save wrote (relative paths), as far as can be known.

    Those its `SAVED_FILES_MANIFEST` lists; and in a folder whose `config.json` is a ViTSeg config (saves of
    versions that kept no manifest), that config, the weights it loads (the safetensors index and the shards
    it names) and the remote-code modules its `auto_map` names with their relative imports.
    """
    directory = Path(directory)
    owned = set()
    try:
        owned.update(json.loads((directory / SAVED_FILES_MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict) and config.get("model_type") == MODEL_TYPE:
        owned.update({"config.json", "model.safetensors"})
        try:
            index = json.loads((directory / "model.safetensors.index.json").read_text())
            owned.update({"model.safetensors.index.json", *index["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        for reference in (config.get("auto_map") or {}).values():
            module_file = directory / f"{str(reference).split('.')[0]}.py"
            if module_file.is_file():
                owned.add(module_file.name)
                try:
                    owned.update(Path(f).name for f in get_relative_import_files(module_file))
                except OSError:  # an import whose file is missing: the rest is still known
                    pass
    # only plain relative names: a manifest must never lead outside the folder
    return {name for name in owned if isinstance(name, str) and name and not Path(name).is_absolute()
            and ".." not in Path(name).parts and (directory / name).is_file()}


def _is_foreign(existing: Path, new: Path, owned: bool) -> bool:
    """Whether writing `new` over `existing` would replace a file that is not hf-vitseg's."""
    if owned or not (existing.exists() or existing.is_symlink()):
        return False
    if existing.is_symlink() or not existing.is_file():
        return True
    if existing.name == "config.json":
        try:
            return json.loads(existing.read_text()).get("model_type") != MODEL_TYPE
        except (ValueError, AttributeError, UnicodeDecodeError):
            return True
    return existing.stat().st_size != new.stat().st_size or existing.read_bytes() != new.read_bytes()


def _staging_folder(directory: Path) -> Path:
    """A fresh hidden folder on the same filesystem as `directory` (so that `os.replace` is a rename): its
    sibling, or inside it when the parent is not writable."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{directory.name}.saving-", dir=directory.parent))
    except OSError:
        return Path(tempfile.mkdtemp(prefix=".hf_vitseg-saving-", dir=directory))
