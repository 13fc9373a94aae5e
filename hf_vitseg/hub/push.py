"""`push_to_hub`: upload a saved hf-vitseg model to the Hugging Face Hub, with a generated model card.

What goes up, in one commit of `CommitOperationAdd`s only (nothing is ever deleted), is what hf-vitseg wrote for
that model and nothing else (`upload_plan` lists it; `dry_run=True` / `hf-vitseg push --dry-run` only lists it):

- `config.json`, with its `auto_map` and with `custom_pipelines` naming `pipeline_vitseg.py`;
- the safetensors weights: `model.safetensors`, or the shards that `model.safetensors.index.json` names and the
  index (never any other `*.safetensors`, such as a backup);
- the remote code: the modules that `config.json`'s and `preprocessor_config.json`'s `auto_map` name and the
  sibling modules they import, recursively, as transformers loads them (a user head's `vitseg_user_*.py`
  included; never any other `*.py`, such as a training script), and `pipeline_vitseg.py`
  (`hf_vitseg/modeling/pipeline_vitseg.py`), so `pipeline("image-segmentation", repo_id,
  trust_remote_code=True)` cuts the processor's padding away exactly where hf-vitseg is not installed;
- `preprocessor_config.json`;
- `training_args.json`, `all_results.json` and `eval_results.json` when the folder has them (what `train()`
  writes);
- `README.md`, rendered from `hub_cards/` (see `hf_vitseg.hub.cards`).

No file is read or uploaded through a symbolic link: a required file that is one stops the push, an optional one
is skipped with the reason. Nothing a person wrote is overwritten: if the repo already has a `README.md` that
hf-vitseg did not write, or that someone edited since, it is kept unless `overwrite_card=True`; if it holds a
`config.json` of another model type, the push stops. Without network (or with `HF_HUB_OFFLINE=1`) the push
raises `HubUnreachableError`, a one-line message saying so and what to do.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.utils import EntryNotFoundError, HFValidationError, RepositoryNotFoundError, validate_repo_id

from .cards import card_is_ours_and_unedited, render_model_card
from .loading import check_safetensors_file, check_vitseg_model_type, lora_folder_message

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload hf-vitseg model"

WEIGHTS_NAME, WEIGHTS_INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
# What train() writes beside the model for its card: the recipe in readable form and the metrics.
RUN_RECORD_FILES = ("training_args.json", "all_results.json", "eval_results.json")
# Where a model trained by SegmentationTrainer keeps the processor it was trained with, for `model.push_to_hub`.
PROCESSOR_ATTRIBUTE = "_hf_vitseg_image_processor"
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HUB_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")


class HubUnreachableError(ConnectionError):
    """The Hub could not be reached (no network, or `HF_HUB_OFFLINE=1`); nothing was committed. The message is one
    line saying so and what to do."""


@dataclass
class PushResult:
    """What `push_to_hub` did.

    Attributes:
        repo_id: the repo pushed to.
        uploaded: the paths in the repo written by the commit (empty for a dry run).
        skipped: `{path: reason}` for files deliberately not written (a README.md kept, a symbolic link).
        commit: what `HfApi.create_commit` returned (`CommitInfo`, with `commit_url` and `oid`); None for a dry run.
        files: `{path in the repo: where it comes from}`, everything the commit holds (or would hold).
        dry_run: True when nothing was sent.
    """

    repo_id: str
    uploaded: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    commit: Any = None
    files: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False


def check_repo_id(repo_id: str) -> str:
    """Raise a `ValueError` naming `repo_id` if it is not a valid Hub model repo id (`namespace/name` or `name`)."""
    if not isinstance(repo_id, str):
        raise ValueError(f"The repo id must be a string like 'username/model-name', got {repo_id!r}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: {error} Use the form 'username/model-name'.") from error
    return repo_id


def _regular_file(path: Path, what: str) -> Path:
    """`path` if it is a regular file; a symbolic link (whose target could be anything on the machine) is refused."""
    if path.is_symlink():
        raise ValueError(
            f"{path} is a symbolic link; hf-vitseg never uploads through one ({what}). Replace it with the file "
            "itself (save the model again), then push."
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing ({what}).")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); save the model again.") from error


def _auto_map_modules(config: dict, config_file: Path) -> list[str]:
    modules = []
    for reference in (config.get("auto_map") or {}).values():
        reference = reference[0] if isinstance(reference, (list, tuple)) else reference
        module = str(reference).split("--")[-1].rsplit(".", 1)[0]
        if not _MODULE_NAME.fullmatch(module):
            raise ValueError(f"{config_file} names {reference!r} in auto_map, which is not a module of this folder.")
        modules.append(module)
    return modules


def _remote_code_files(folder: Path, modules: list[str], what: str) -> dict[str, Path]:
    """The module files `modules` and the sibling modules they import, recursively: the files transformers needs to
    load the folder with `trust_remote_code=True` (its own `get_relative_imports`, so the two cannot disagree)."""
    from transformers.dynamic_module_utils import get_relative_imports

    files: dict[str, Path] = {}
    pending = list(modules)
    while pending:
        module = pending.pop()
        name = f"{module}.py"
        if name in files:
            continue
        if not _MODULE_NAME.fullmatch(module):
            raise ValueError(f"{what} imports {module!r}, which is not a module of {folder}.")
        files[name] = _regular_file(folder / name, f"remote code that {what} needs")
        pending.extend(get_relative_imports(files[name]))
    return dict(sorted(files.items()))


def _weights_files(folder: Path) -> dict[str, Path]:
    """`model.safetensors`, or the index and the shards it names; each checked complete."""
    index_file = folder / WEIGHTS_INDEX_NAME
    if index_file.exists() or index_file.is_symlink():
        files = {WEIGHTS_INDEX_NAME: _regular_file(index_file, "the weights index")}
        shards = sorted(set((_read_json(index_file).get("weight_map") or {}).values()))
        if not shards:
            raise ValueError(f"{index_file} names no weight files; save the model again.")
        for shard in shards:
            if Path(shard).name != shard:
                raise ValueError(f"{index_file} names {shard!r}, which is not a file of {folder}.")
            files[shard] = _regular_file(folder / shard, f"a weights shard that {WEIGHTS_INDEX_NAME} names")
    else:
        if not (folder / WEIGHTS_NAME).exists() and not (folder / WEIGHTS_NAME).is_symlink():
            pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = f" It holds {', '.join(pickled)}: hf-vitseg uploads safetensors only (no pickle)." if pickled else ""
            raise FileNotFoundError(
                f"{folder} has no {WEIGHTS_NAME} (nor {WEIGHTS_INDEX_NAME}).{hint} Save the model with "
                "model.save_pretrained(folder)."
            )
        files = {WEIGHTS_NAME: _regular_file(folder / WEIGHTS_NAME, "the model weights")}
    for name, path in files.items():
        if name.endswith(".safetensors"):
            check_safetensors_file(path)
    return files


def upload_plan(folder: str | os.PathLike) -> tuple[dict[str, Path], dict[str, str]]:
    """The files of a saved model folder that hf-vitseg wrote for the model, to upload, and those skipped.

    `config.json`, the weights it names (see `_weights_files`), the remote code its `auto_map` needs, and what
    `train()` wrote for the card (`RUN_RECORD_FILES`). The processor's files are chosen by `push_to_hub`.

    Args:
        folder: a folder written by `model.save_pretrained` (after `import hf_vitseg`).

    Returns:
        `({name: path}, {name: reason skipped})`.

    Raises:
        ValueError: a required file is a symbolic link or broken, the config is not an hf-vitseg one, or it has
            no `auto_map` (the model would not load where hf-vitseg is not installed).
        FileNotFoundError: a required file is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder. Pass a folder written by model.save_pretrained.")
    config_file = folder / "config.json"
    if not config_file.exists() and not config_file.is_symlink():
        if (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(lora_folder_message(folder))
        raise FileNotFoundError(
            f"{folder} has no config.json: it is not a saved model folder. Save one with model.save_pretrained(folder)."
        )
    config = _read_json(_regular_file(config_file, "the model config"))
    check_vitseg_model_type(config.get("model_type"), folder)
    auto_map = config.get("auto_map") or {}
    from ..modeling.head_base import MASK_HEAD_NAMES

    # a mask transformer (head eomt / pmt) is a ViTSegForUniversalSegmentation
    auto_model = ("AutoModelForUniversalSegmentation" if config.get("head") in MASK_HEAD_NAMES
                  else "AutoModelForSemanticSegmentation")
    if auto_model not in auto_map or "AutoConfig" not in auto_map:
        raise ValueError(
            f"{config_file} has no auto_map for AutoConfig and {auto_model}, so "
            "the pushed model would not load where hf-vitseg is not installed. Save it again after `import "
            "hf_vitseg` (which registers the classes for remote code): hf_vitseg.hub.load_model(folder)"
            ".save_pretrained(new_folder)."
        )
    files = {"config.json": config_file}
    files.update(_weights_files(folder))
    files.update(_remote_code_files(folder, _auto_map_modules(config, config_file), str(config_file)))
    skipped = {}
    for name in RUN_RECORD_FILES:
        path = folder / name
        if path.is_symlink():
            skipped[name] = "a symbolic link; hf-vitseg never uploads through one"
        elif path.is_file() and _HUB_TOKEN.search(path.read_text(encoding="utf-8", errors="replace")):
            # TrainingArguments masks hub_token, but a record written another way may hold one
            skipped[name] = "it holds what looks like a Hub token (hf_...)"
        elif path.is_file():
            files[name] = path
    return files, skipped


def _model_processor(model):
    """The processor a model object was trained with (`SegmentationTrainer` remembers it) or saved beside it (the
    folder it was loaded from holds a `preprocessor_config.json`), or None."""
    from ..modeling import ViTSegImageProcessor

    processor = getattr(model, PROCESSOR_ATTRIBUTE, None)
    if processor is not None:
        return processor
    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if source and (Path(source) / "preprocessor_config.json").is_file():
        return ViTSegImageProcessor.for_model(model, folder=source, check_labels=False)
    return None


def remember_processor(model, processor) -> None:
    """Keep `processor` with `model`, so that `model.push_to_hub` uploads it (called by `SegmentationTrainer`)."""
    if processor is not None:
        setattr(model, PROCESSOR_ATTRIBUTE, processor)


def _processor_files(folder: Path, processor, model_config: dict, staging: Path) -> tuple[dict[str, Path], object]:
    """`preprocessor_config.json` and its remote-code files, and the processor they hold: `processor`'s if given,
    else the folder's (uploaded byte for byte), else `ViTSegImageProcessor.for_model` (and a warning)."""
    from ..modeling import ViTSegImageProcessor

    source = folder
    processor_file = folder / "preprocessor_config.json"
    if processor is None and (processor_file.exists() or processor_file.is_symlink()):
        _regular_file(processor_file, "the image processor config")
        processor_for_card = ViTSegImageProcessor.from_pretrained(folder)
    else:
        if processor is None:  # the one built for the model (its size divisor), with for_model's warning
            from .loading import load_model

            processor = ViTSegImageProcessor.for_model(load_model(folder), folder=folder)
        source = staging / "processor"
        processor.save_pretrained(source)
        processor_for_card = processor
    processor_file = _regular_file(source / "preprocessor_config.json", "the image processor config")
    files = {"preprocessor_config.json": processor_file}
    modules = _auto_map_modules(_read_json(processor_file), processor_file)
    files.update(_remote_code_files(source, modules, str(processor_file)))
    return files, processor_for_card


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when it cannot reach the Hub (its HTTP library changed between versions)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):  # httpx's, requests'
            error = getattr(module, name, None)
            if isinstance(error, type) and issubclass(error, BaseException):  # httpx.Timeout is a setting
                errors.append(error)
    return tuple(errors)


def _unreachable(error: BaseException) -> HubUnreachableError:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        reason = "HF_HUB_OFFLINE is set"
        fix = "unset HF_HUB_OFFLINE and push again from a machine that reaches huggingface.co"
    else:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fix = "check the network (or HF_ENDPOINT, or a proxy) and push again"
    return HubUnreachableError(
        f"Cannot reach the Hugging Face Hub ({reason}); nothing was uploaded. To push, {fix}. A dry run "
        "(hf-vitseg push --dry-run) lists the files without network."
    )


def push_to_hub(
    model_folder_or_model,
    repo_id: str,
    *,
    processor=None,
    card_data: Mapping[str, Any] | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    overwrite_card: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = None,
    dry_run: bool = False,
    on_plan: Callable[[dict[str, str]], None] | None = None,
    api: HfApi | None = None,
) -> PushResult:
    """Upload an hf-vitseg model to `repo_id` on the Hub in one commit, with a generated model card.

    Only what hf-vitseg wrote for the model goes up (see the module docstring); the files are listed (`on_plan`)
    before anything is sent.

    Args:
        model_folder_or_model: a folder written by `model.save_pretrained` (after `import hf_vitseg`), or a
            `ViTSegForSemanticSegmentation` (saved to a temporary folder first).
        repo_id: `username/model-name` (or `org/model-name`); created if it does not exist. Checked before any
            network call.
        processor: the image processor to upload; default the folder's `preprocessor_config.json` (for a model
            object: the processor it was trained with, or the one saved where it was loaded from), else a
            `ViTSegImageProcessor` with the backbone's patch size, with a warning.
        card_data: the card's metadata and content (license, datasets, evaluation, training recipe), see
            `hf_vitseg.hub.cards.render_model_card`. The last evaluation is otherwise read from the folder's
            `eval_results.json` / `all_results.json` / `trainer_state.json`.
        commit_message: the commit's message.
        commit_description: the commit's description.
        private: create the repo private (an existing repo keeps its visibility).
        token: a Hub token; default the logged-in one.
        overwrite_card: replace a `README.md` on the Hub that hf-vitseg did not write (or that was edited since).
        revision: the branch to commit to (default `main`).
        create_pr: open a pull request with the commit instead of committing to the branch.
        max_shard_size: for a model object, the largest weights shard (`save_pretrained`'s).
        dry_run: list the files (`on_plan`, and the returned `PushResult.files`) and send nothing: no network.
        on_plan: called with `{path in the repo: where it comes from}` before anything is sent (the CLI prints it).
        api: the `HfApi` to use (tests pass one whose network calls are recorded); default `HfApi(token=token)`.

    Returns:
        a `PushResult` listing what was (or, for a dry run, would be) uploaded and what was kept.

    Raises:
        ValueError: an invalid repo id, a folder without remote code, a broken weights file, a required file that
            is a symbolic link, or a repo holding a model of another type.
        HubUnreachableError: no network, or `HF_HUB_OFFLINE=1` (nothing was uploaded).
    """
    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="hf_vitseg_push_") as staging:
        staging = Path(staging)
        if isinstance(model_folder_or_model, (str, os.PathLike)):
            folder = Path(model_folder_or_model)
        else:
            if processor is None:
                processor = _model_processor(model_folder_or_model)
            folder = staging / "model"
            kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            model_folder_or_model.save_pretrained(folder, **kwargs)
        files, skipped = upload_plan(folder)
        operations, sources, processor = _collect_operations(folder, files, processor, staging)
        card = render_model_card(_config_of(files["config.json"]), repo_id, folder=folder, card_data=card_data,
                                 processor=processor)
        sources["README.md"] = "hub_cards/model_card.md (the model card, rendered)"
        if dry_run:
            if on_plan is not None:
                on_plan(dict(sources))
            return PushResult(repo_id=repo_id, uploaded=[], skipped=skipped, files=sources, dry_run=True)

        api = api if api is not None else HfApi(token=token)
        try:
            repo_id, commit = _send(api, repo_id, operations, sources, skipped, card, on_plan,
                                    overwrite_card=overwrite_card, private=private, revision=revision,
                                    commit_message=commit_message, commit_description=commit_description,
                                    create_pr=create_pr)
        except _transport_errors() as error:
            raise _unreachable(error) from error
    uploaded = [name for name in sources if name not in skipped]
    return PushResult(repo_id=repo_id, uploaded=uploaded, skipped=skipped, commit=commit, files=sources)


def _send(api, repo_id, operations, sources, skipped, card, on_plan, *, overwrite_card, private, revision,
          commit_message, commit_description, create_pr):
    """The network part of `push_to_hub`: create the repo, check what it holds, list the files, commit. Returns the
    full repo id (a bare name gets the user's namespace) and the commit."""
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    remote = _remote_files(api, repo_id, revision)
    if "config.json" in remote:
        remote_type = json.loads(_remote_text(api, repo_id, "config.json", revision)).get("model_type")
        if remote_type != "vitseg":
            raise ValueError(
                f"{repo_id} already holds a {remote_type!r} model (its config.json); hf-vitseg will not overwrite "
                "another model's files. Push to a new repo id, or delete that model's files on the Hub first."
            )
    readme = "README.md" in remote and not overwrite_card
    if readme and not card_is_ours_and_unedited(_remote_text(api, repo_id, "README.md", revision)):
        skipped["README.md"] = (
            "the repo's README.md was not written by hf-vitseg, or was edited since; kept (pass "
            "overwrite_card=True / --overwrite-card to replace it)"
        )
        logger.warning("%s: %s", repo_id, skipped["README.md"])
    if "README.md" not in skipped:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    if on_plan is not None:
        on_plan({name: source for name, source in sources.items() if name not in skipped})
    return repo_id, api.create_commit(
        repo_id, operations=operations, commit_message=commit_message, commit_description=commit_description,
        repo_type="model", revision=revision, create_pr=create_pr,
    )


def _config_of(config_file: Path):
    from ..modeling import ViTSegConfig

    return ViTSegConfig.from_json_file(str(config_file))


def _remote_files(api: HfApi, repo_id: str, revision: str | None) -> set[str]:
    try:
        return set(api.list_repo_files(repo_id, revision=revision))
    except (RepositoryNotFoundError, EntryNotFoundError):
        return set()


def _remote_text(api: HfApi, repo_id: str, filename: str, revision: str | None) -> str:
    path = api.hf_hub_download(repo_id, filename, revision=revision)
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _collect_operations(folder: Path, files: dict[str, Path], processor, staging: Path):
    """The `CommitOperationAdd`s of everything but the card, `{path in repo: source}`, and the image processor."""
    from ..modeling import pipeline_vitseg as pipeline_module

    config = _read_json(files["config.json"])
    contents: dict[str, Path | bytes] = dict(files)
    sources = {name: str(path) for name, path in files.items()}
    processor_files, processor = _processor_files(folder, processor, config, staging)
    contents.update(processor_files)
    sources.update({name: str(path) for name, path in processor_files.items()})
    config = dict(config, custom_pipelines=pipeline_module.custom_pipelines(config))
    contents["config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
    sources["config.json"] = f"{files['config.json']} (+ custom_pipelines)"
    contents[pipeline_module.PIPELINE_FILENAME] = Path(pipeline_module.__file__).read_bytes()
    sources[pipeline_module.PIPELINE_FILENAME] = "hf_vitseg/modeling/pipeline_vitseg.py"

    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes) else str(content))
        for name, content in contents.items()
    ]
    return operations, sources, processor


def push_model_to_hub(model, repo_id: str, *, commit_message: str | None = None, tags=None,
                      card_data: Mapping[str, Any] | None = None, **kwargs):
    """`model.push_to_hub(repo_id, ...)` of a `ViTSegForSemanticSegmentation`: `push_to_hub(model, repo_id, ...)`
    with transformers' arguments.

    Args:
        model: the model.
        repo_id: `username/model-name`.
        commit_message: the commit's message (default `DEFAULT_COMMIT_MESSAGE`).
        tags: tags added to the card's (a string or a list).
        card_data: as for `push_to_hub`.
        **kwargs: `push_to_hub`'s other keyword arguments (`private`, `token`, `revision`, `create_pr`,
            `commit_description`, `max_shard_size`, `processor`, `overwrite_card`, `dry_run`, ...).

    Returns:
        the commit (`huggingface_hub.CommitInfo`), as transformers' `push_to_hub` returns; for a dry run, the
        `PushResult` listing the files.
    """
    card_data = dict(card_data or {})
    if tags:
        card_data["tags"] = list(card_data.get("tags") or []) + ([tags] if isinstance(tags, str) else list(tags))
    result = push_to_hub(model, repo_id, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                         card_data=card_data, **kwargs)
    return result if result.dry_run else result.commit


# Trainer.push_to_hub's model-card arguments (transformers' `create_model_card`) -> card_data keys.
_TRAINER_CARD_KEYS = {"finetuned_from": "base_model", "dataset_tags": "datasets", "dataset": "dataset_name",
                      "language": "language", "license": "license", "tags": "tags", "model_name": "model_name"}


def push_trainer_to_hub(trainer, *, commit_message: str = "End of training", token=None, revision=None,
                        private=None, **card_kwargs):
    """`Trainer.push_to_hub` for `SegmentationTrainer`: save the model to `args.output_dir`, then push that folder
    with `push_to_hub` (only the model's files, the trainer's processor, hf-vitseg's card) to `args.hub_model_id`
    (default: the output folder's name), synchronously.

    Args:
        trainer: the trainer.
        commit_message: the commit's message.
        token, revision, private: default `args.hub_token`, `args.hub_revision`, `args.hub_private_repo`.
        **card_kwargs: transformers' model-card arguments (`license`, `tags`, `language`, `model_name`,
            `finetuned_from`, `dataset_tags`, `dataset`); others are an error.

    Returns:
        the commit (`huggingface_hub.CommitInfo`), or None on processes other than the main one.
    """
    unknown = sorted(set(card_kwargs) - set(_TRAINER_CARD_KEYS))
    if unknown:
        raise ValueError(f"push_to_hub got {unknown}, which hf-vitseg's model card does not take; valid: "
                         f"{sorted(_TRAINER_CARD_KEYS)}.")
    card_data = {_TRAINER_CARD_KEYS[key]: value for key, value in card_kwargs.items() if value is not None}
    if isinstance(card_data.get("tags"), str):
        card_data["tags"] = [card_data["tags"]]
    args = trainer.args
    trainer.save_model(_internal_call=True)  # every process (as transformers does); one writes
    if not trainer.is_world_process_zero():
        return None
    repo_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id or Path(args.output_dir).absolute().name
    result = push_to_hub(
        args.output_dir, repo_id, processor=trainer.processing_class, card_data=card_data,
        commit_message=commit_message, token=token if token is not None else args.hub_token,
        revision=revision if revision is not None else args.hub_revision,
        private=private if private is not None else args.hub_private_repo,
    )
    return result.commit


def push_checkpoint_to_hub(trainer, checkpoint_folder) -> None:
    """What `Trainer` does at each save with `args.push_to_hub` (`hub_strategy` `every_save`, `checkpoint`,
    `all_checkpoints`), through `push_to_hub`: the checkpoint's model files, the processor and the card, to
    `args.hub_model_id`, synchronously. transformers' own upload sends the whole output folder, whatever else it
    holds. Resumable checkpoints on the Hub (optimizer and scheduler states, `last-checkpoint/`) are not pushed.

    Args:
        trainer: the `SegmentationTrainer`.
        checkpoint_folder: the `checkpoint-N` folder just saved.
    """
    args = trainer.args
    if not trainer.is_world_process_zero() or args.hub_strategy == "end":
        return
    if args.hub_strategy in ("checkpoint", "all_checkpoints") and not getattr(trainer, "_hf_vitseg_warned", False):
        trainer._hf_vitseg_warned = True
        logger.warning("hub_strategy=%r: hf-vitseg pushes the model at each save, not resumable checkpoints "
                       "(optimizer states stay local).", str(args.hub_strategy))
    state = trainer.state
    when = f"step {state.global_step}" if args.save_strategy == "steps" else f"epoch {int(state.epoch or 0)}"
    repo_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id or Path(args.output_dir).absolute().name
    push_to_hub(checkpoint_folder, repo_id, processor=trainer.processing_class,
                commit_message=f"Training in progress, {when}", token=args.hub_token, revision=args.hub_revision)
