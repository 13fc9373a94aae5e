"""`push_to_hub`: upload a saved hf-vitseg model to the Hugging Face Hub, with a generated model card.

What goes up, in one commit of `CommitOperationAdd`s only (nothing is ever deleted):

- the safetensors weights (`model.safetensors`, or the shards and their index);
- `config.json`, with its `auto_map` and with `custom_pipelines` naming `pipeline_vitseg.py`;
- the modeling source files that `save_pretrained` wrote beside it (remote code), and `pipeline_vitseg.py`
  (`hf_vitseg/inference/pipeline.py`), so `pipeline("image-segmentation", repo_id, trust_remote_code=True)`
  cuts the processor's padding away exactly where hf-vitseg is not installed;
- `preprocessor_config.json` and `image_processing_vitseg.py`;
- `README.md`, rendered from `hub_cards/` (see `hf_vitseg.hub.cards`).

Nothing a person wrote is overwritten: if the repo already has a `README.md` that hf-vitseg did not write, or
that someone edited since, it is kept unless `overwrite_card=True`; if it holds a `config.json` of another model
type, the push stops. Other files of the folder (checkpoints, optimizer states, the pickled
`training_args.bin`) are not uploaded.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.utils import EntryNotFoundError, HFValidationError, RepositoryNotFoundError, validate_repo_id

from .cards import card_is_ours_and_unedited, render_model_card
from .loading import check_model_folder, load_config


logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload hf-vitseg model"


@dataclass
class PushResult:
    """What `push_to_hub` did.

    Attributes:
        repo_id: the repo pushed to.
        uploaded: the paths in the repo written by the commit.
        skipped: `{path: reason}` for files deliberately not written (a README.md kept).
        commit: what `HfApi.create_commit` returned (`CommitInfo`, with `commit_url` and `oid`).
    """

    repo_id: str
    uploaded: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    commit: Any = None


def check_repo_id(repo_id: str) -> str:
    """Raise a `ValueError` naming `repo_id` if it is not a valid Hub model repo id (`namespace/name` or `name`)."""
    if not isinstance(repo_id, str):
        raise ValueError(f"The repo id must be a string like 'username/model-name', got {repo_id!r}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: {error} Use the form 'username/model-name'.") from error
    return repo_id


def _check_remote_code(folder: Path, config: dict) -> None:
    """The folder must carry the source files its `auto_map` names, or the Hub copy loads only with hf-vitseg."""
    auto_map = config.get("auto_map") or {}
    if "AutoModelForSemanticSegmentation" not in auto_map or "AutoConfig" not in auto_map:
        raise ValueError(
            f"{folder / 'config.json'} has no auto_map for AutoConfig and AutoModelForSemanticSegmentation, so "
            "the pushed model would not load where hf-vitseg is not installed. Save it again after `import "
            "hf_vitseg` (which registers the classes for remote code): hf_vitseg.hub.load_model(folder)"
            ".save_pretrained(new_folder)."
        )
    for reference in auto_map.values():
        reference = reference[0] if isinstance(reference, (list, tuple)) else reference
        module = reference.split("--")[-1].split(".")[0]
        if not (folder / f"{module}.py").is_file():
            raise ValueError(f"{folder / 'config.json'} names {reference} in auto_map, but {module}.py is missing.")


def _stage_model(model, directory: Path) -> None:
    """Save a model object for the push (hf-vitseg's import registered it for remote code: auto_map + sources)."""
    model.save_pretrained(directory)


def _processor_files(folder: Path, processor, model_config: dict, staging: Path) -> tuple[dict[str, Path], object]:
    """`preprocessor_config.json` and its remote-code file, and the processor they hold: `processor`'s if given,
    else the folder's (uploaded byte for byte), else a default `ViTSegImageProcessor` with the backbone's patch
    size (and a warning)."""
    from ..modeling import ViTSegImageProcessor

    source = folder
    if processor is None and (folder / "preprocessor_config.json").is_file():
        processor_for_card = ViTSegImageProcessor.from_pretrained(folder)
    else:
        if processor is None:
            import warnings

            patch = (model_config.get("backbone_config") or {}).get("patch_size", 14)
            patch = patch[0] if isinstance(patch, (list, tuple)) else patch
            warnings.warn(
                f"{folder} has no preprocessor_config.json; pushing ViTSegImageProcessor(patch_size={patch}) with "
                "ImageNet mean and std. Pass processor= (the one you trained with) to make it exact."
            )
            processor = ViTSegImageProcessor(patch_size=int(patch))
        source = staging / "processor"
        processor.save_pretrained(source)
        processor_for_card = processor
    files = {"preprocessor_config.json": source / "preprocessor_config.json"}
    auto_map = json.loads(files["preprocessor_config.json"].read_text(encoding="utf-8")).get("auto_map") or {}
    for reference in auto_map.values():
        module = reference.split("--")[-1].split(".")[0]
        files[f"{module}.py"] = source / f"{module}.py"
    for name, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing ({name} is needed for loading without hf-vitseg).")
    return files, processor_for_card


def _remote_files(api: HfApi, repo_id: str, revision: str | None) -> set[str]:
    try:
        return set(api.list_repo_files(repo_id, revision=revision))
    except (RepositoryNotFoundError, EntryNotFoundError):
        return set()


def _remote_text(api: HfApi, repo_id: str, filename: str, revision: str | None) -> str:
    path = api.hf_hub_download(repo_id, filename, revision=revision)
    return Path(path).read_text(encoding="utf-8", errors="replace")


def push_to_hub(
    model_folder_or_model,
    repo_id: str,
    *,
    processor=None,
    card_data: Mapping[str, Any] | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    private: bool | None = None,
    token: str | bool | None = None,
    overwrite_card: bool = False,
    revision: str | None = None,
    api: HfApi | None = None,
) -> PushResult:
    """Upload an hf-vitseg model to `repo_id` on the Hub in one commit, with a generated model card.

    Args:
        model_folder_or_model: a folder written by `model.save_pretrained` (after `import hf_vitseg`), or a
            `ViTSegForSemanticSegmentation` (saved to a temporary folder first).
        repo_id: `username/model-name` (or `org/model-name`); created if it does not exist. Checked before any
            network call.
        processor: the image processor to upload; default the folder's `preprocessor_config.json` (or, if there
            is none, a `ViTSegImageProcessor` with the backbone's patch size, with a warning).
        card_data: the card's metadata and content (license, datasets, evaluation, training recipe), see
            `hf_vitseg.hub.cards.render_model_card`. The last evaluation is otherwise read from the folder's
            `eval_results.json` / `all_results.json` / `trainer_state.json`.
        commit_message: the commit's message.
        private: create the repo private (an existing repo keeps its visibility).
        token: a Hub token; default the logged-in one.
        overwrite_card: replace a `README.md` on the Hub that hf-vitseg did not write (or that was edited since).
        revision: the branch to commit to (default `main`).
        api: the `HfApi` to use (tests pass one whose network calls are recorded); default `HfApi(token=token)`.

    Returns:
        a `PushResult` listing what was uploaded and what was kept.

    Raises:
        ValueError: an invalid repo id, a folder without remote code, a broken weights file, or a repo holding a
            model of another type.
    """
    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="hf_vitseg_push_") as staging:
        staging = Path(staging)
        if isinstance(model_folder_or_model, (str, os.PathLike)):
            folder = Path(model_folder_or_model)
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} is not a folder. Pass a folder written by model.save_pretrained.")
        else:
            folder = staging / "model"
            _stage_model(model_folder_or_model, folder)
        check_model_folder(folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if config.get("model_type") != "vitseg":
            raise ValueError(f"{folder / 'config.json'} is a {config.get('model_type')!r} model, not an hf-vitseg one.")
        _check_remote_code(folder, config)
        operations, uploaded, processor = _collect_operations(folder, config, processor, staging)
        card = render_model_card(load_config(folder), repo_id, folder=folder, card_data=card_data, processor=processor)

        api = api if api is not None else HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        remote = _remote_files(api, repo_id, revision)
        if "config.json" in remote:
            remote_type = json.loads(_remote_text(api, repo_id, "config.json", revision)).get("model_type")
            if remote_type != "vitseg":
                raise ValueError(
                    f"{repo_id} already holds a {remote_type!r} model (its config.json); hf-vitseg will not overwrite "
                    "another model's files. Push to a new repo id, or delete that model's files on the Hub first."
                )
        skipped = {}
        if "README.md" in remote and not overwrite_card:
            if not card_is_ours_and_unedited(_remote_text(api, repo_id, "README.md", revision)):
                skipped["README.md"] = (
                    "the repo's README.md was not written by hf-vitseg, or was edited since; kept (pass "
                    "overwrite_card=True / --overwrite-card to replace it)"
                )
                logger.warning("%s: %s", repo_id, skipped["README.md"])
        if "README.md" not in skipped:
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
            uploaded.append("README.md")
        commit = api.create_commit(
            repo_id, operations=operations, commit_message=commit_message, repo_type="model", revision=revision
        )
    return PushResult(repo_id=repo_id, uploaded=uploaded, skipped=skipped, commit=commit)


def _collect_operations(folder: Path, config: dict, processor, staging: Path) -> tuple[list, list[str], object]:
    """The `CommitOperationAdd`s of everything but the card, their paths in the repo, and the image processor."""
    from ..modeling import pipeline_vitseg as pipeline_module

    files: dict[str, Path | bytes] = {}
    for path in sorted(folder.glob("*.safetensors")):
        files[path.name] = path
    if (folder / "model.safetensors.index.json").is_file():
        files["model.safetensors.index.json"] = folder / "model.safetensors.index.json"
    for path in sorted(folder.glob("*.py")):
        if path.name != pipeline_module.PIPELINE_FILENAME:
            files[path.name] = path
    processor_files, processor = _processor_files(folder, processor, config, staging)
    files.update(processor_files)
    config = dict(config, custom_pipelines=pipeline_module.CUSTOM_PIPELINES)
    files["config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
    files[pipeline_module.PIPELINE_FILENAME] = Path(pipeline_module.__file__).read_bytes()

    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes) else str(content))
        for name, content in files.items()
    ]
    return operations, list(files), processor
