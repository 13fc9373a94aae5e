"""The output folder of a training run: what it holds, what to resume from, what an overwrite may delete.

A run records every file it writes (checkpoints as they are saved, the final model at the end) in the run
manifest `RUN_MANIFEST` (`.hf_vitseg_run.json`), a JSON list of paths relative to the folder. An overwrite
deletes exactly those files and the folders they leave empty: a file of the user's beside the run, or inside
one of its checkpoint folders, stays whatever its name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..unwrap import unwrap_model
from .lora import VITSEG_CONFIG_FILE

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
RUN_MANIFEST = ".hf_vitseg_run.json"
# Files that mark a folder as holding a saved model or run even without a manifest (a run of an hf-vitseg
# that kept none, or a model saved by hand): refused as an output folder unless resume says to continue it.
RUN_MARKERS = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "adapter_config.json", VITSEG_CONFIG_FILE,
    "trainer_state.json",
)
# What `train` writes into the output folder beside the model (whose own save checks its files): Trainer's state
# and results, the recipe for the model card, the image processor.
RUN_OUTPUT_FILES = (
    "trainer_state.json", "training_args.bin", "training_args.json", "all_results.json", "train_results.json",
    "eval_results.json", "preprocessor_config.json", "image_processing_vitseg.py",
)
# What Trainer writes last into a checkpoint: a checkpoint folder without it was cut short (killed mid-save).
CHECKPOINT_COMPLETE_MARKER = "trainer_state.json"


# -- output folder and checkpoints --------------------------------------------------------------------------
def list_checkpoints(output_dir) -> list[Path]:
    """The `checkpoint-N` folders in `output_dir`, by step, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def is_complete_checkpoint(checkpoint) -> bool:
    """Whether Trainer finished writing `checkpoint` (its trainer state, written last, is there)."""
    return (Path(checkpoint) / CHECKPOINT_COMPLETE_MARKER).is_file()


def find_last_checkpoint(output_dir) -> Path | None:
    """The latest complete `checkpoint-N` in `output_dir`, or `None`. A later folder that a killed run left
    half written is passed over (Trainer's own `get_last_checkpoint` would pick it and fail to load it)."""
    complete = [p for p in list_checkpoints(output_dir) if is_complete_checkpoint(p)]
    return complete[-1] if complete else None


# -- the run manifest -------------------------------------------------------------------------------------
def snapshot_files(output_dir) -> dict[str, tuple[int, int]]:
    """`{relative path: (size, mtime_ns)}` of every file under `output_dir` (symlinks as links, not followed):
    what was there before a run, so that what the run wrote is what is new or changed afterwards."""
    output_dir = Path(output_dir)
    found = {}
    for folder, _, names in os.walk(output_dir):
        for name in names:
            path = Path(folder, name)
            if path.name == RUN_MANIFEST and path.parent == output_dir:
                continue
            stat = path.lstat()
            found[path.relative_to(output_dir).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return found


def read_run_manifest(output_dir) -> list[str] | None:
    """The files a run recorded in `output_dir` (relative paths), or `None` when there is no manifest.

    Raises when the manifest is unreadable or names a path outside the folder: an overwrite must never
    delete by a guess."""
    manifest = Path(output_dir) / RUN_MANIFEST
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest} is not a run manifest hf-vitseg can read ({error}); delete the previous run "
                         "yourself or choose another output_dir.") from None
    for entry in entries:
        if not isinstance(entry, str) or Path(entry).is_absolute() or ".." in Path(entry).parts or not entry:
            raise ValueError(f"{manifest} names {entry!r}, outside the folder; delete the previous run yourself "
                             "or choose another output_dir.")
    return entries


def record_run_files(output_dir, before: dict[str, tuple[int, int]]) -> None:
    """Add the files under `output_dir` that are new or changed since the snapshot `before` to the run manifest
    (what the run wrote); entries whose files are gone (rotated checkpoints) are dropped."""
    output_dir = Path(output_dir)
    now = snapshot_files(output_dir)
    written = {path for path, stat in now.items() if before.get(path) != stat}
    recorded = {path for path in read_run_manifest(output_dir) or [] if path in now}
    manifest = output_dir / RUN_MANIFEST
    temporary = manifest.with_name(manifest.name + ".tmp")
    temporary.write_text(json.dumps({"files": sorted(recorded | written)}, indent=1) + "\n")
    os.replace(temporary, manifest)  # a run killed mid-write leaves the previous manifest, never half of one


class RunManifestCallback(TrainerCallback):
    """Records each checkpoint Trainer saves in the run manifest of `output_dir` (main process only).

    Args:
        output_dir: the run's output folder.
        before: `snapshot_files(output_dir)` taken before the run wrote anything.
    """

    def __init__(self, output_dir, before: dict[str, tuple[int, int]]):
        self.output_dir = Path(output_dir)
        self.before = before

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            record_run_files(self.output_dir, self.before)


def _previous_run(output_dir: Path) -> tuple[list[str], bool]:
    """The top-level names of what a previous run left in `output_dir`, and whether a manifest lists them."""
    if not output_dir.is_dir():
        return [], False
    entries = read_run_manifest(output_dir)
    if entries is not None:
        present = [e for e in entries if (output_dir / e).exists() or (output_dir / e).is_symlink()]
        names = dict.fromkeys(Path(e).parts[0] for e in present)
        return list(names), True
    markers = [name for name in RUN_MARKERS if (output_dir / name).is_file()]
    return [p.name for p in list_checkpoints(output_dir)] + markers, False


def resolve_output_dir(output_dir, resume=False, overwrite_output_dir: bool = False) -> Path | None:
    """Decide what to do with what `output_dir` holds: the checkpoint to resume from, or `None` for a new run.

    Raises, touching nothing, when the folder holds another run (`checkpoint-*` folders or a saved model) and
    neither `resume` (`True`: its last complete checkpoint; a path: that checkpoint) nor `overwrite_output_dir`
    says what to do with it, or when there is nothing to resume.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"{output_dir} is a file; choose a folder for output_dir (--output-dir).")
    if resume and overwrite_output_dir:
        raise ValueError(
            "resume and overwrite_output_dir exclude each other: resume keeps the run, overwrite deletes it."
        )
    if resume:
        if resume is True:
            checkpoint = find_last_checkpoint(output_dir)
            if checkpoint is None:
                partial = [p.name for p in list_checkpoints(output_dir)]
                raise FileNotFoundError(
                    f"Nothing to resume in {output_dir}: no complete checkpoint-N folder"
                    + (f" (only incomplete ones: {', '.join(partial)})" if partial else "")
                    + ". Drop resume (--resume) to start a new run."
                )
            return checkpoint
        checkpoint = Path(resume)
        if not checkpoint.is_dir() or not is_complete_checkpoint(checkpoint):
            raise FileNotFoundError(
                f"Cannot resume from {checkpoint}: not a complete Trainer checkpoint folder "
                f"(it needs {CHECKPOINT_COMPLETE_MARKER}). Pass resume=True to take the last complete one."
            )
        return checkpoint
    existing, has_manifest = _previous_run(output_dir)
    if existing and not overwrite_output_dir:
        names = ", ".join(existing[:6]) + (", ..." if len(existing) > 6 else "")
        last = find_last_checkpoint(output_dir)
        raise FileExistsError(
            f"{output_dir} already holds a training run ({names}). Nothing was changed. Pass resume=True "
            f"(--resume) to continue it{f' from {last.name}' if last else ''}, overwrite_output_dir=True "
            "(--overwrite-output-dir) to delete it and start again, or choose another output_dir."
        )
    if existing and not has_manifest:
        raise FileExistsError(_unrecorded_run_message(output_dir, existing))
    return None


def _unrecorded_run_message(output_dir: Path, existing: list[str]) -> str:
    names = ", ".join(existing[:6]) + (", ..." if len(existing) > 6 else "")
    return (
        f"{output_dir} holds a saved model or run ({names}) but no {RUN_MANIFEST}, the list of files a run of "
        "hf-vitseg wrote (runs of earlier versions kept none), so overwrite_output_dir (--overwrite-output-dir) "
        "cannot tell its files from yours. Nothing was changed. Delete the previous run yourself, or choose "
        "another output_dir."
    )


def check_run_outputs(output_dir) -> None:
    """Raise `FileExistsError`, before training, when a file `train` writes at the end (`RUN_OUTPUT_FILES`) is
    in `output_dir` and no run recorded writing it: it is the user's, and the run would replace it."""
    output_dir = Path(output_dir)
    recorded = set(read_run_manifest(output_dir) or [])
    foreign = [name for name in RUN_OUTPUT_FILES if (output_dir / name).exists() and name not in recorded]
    if foreign:
        raise FileExistsError(
            f"{output_dir} holds {', '.join(foreign)}, which a training run writes at its end and which no run "
            "recorded writing. Nothing was changed. Move them away, or choose another output_dir."
        )


def check_checkpoint_matches(checkpoint, model) -> None:
    """Raise when `checkpoint` holds another model (other head, classes or backbone) than `model`: resuming it
    would be a partial load, not a resumption. Compares parameter names and shapes, built on the meta device
    from the checkpoint's config (no weights read)."""
    model = unwrap_model(model)
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        return  # adapter-only (PEFT) checkpoints: Trainer's PEFT loading checks them
    saved_config = type(model.config).from_pretrained(checkpoint)
    with torch.device("meta"):
        saved = {k: tuple(v.shape) for k, v in type(model)(saved_config).state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    differing = sorted(k for k in saved.keys() | expected.keys() if saved.get(k) != expected.get(k))
    if differing:
        config = model.config
        raise ValueError(
            f"{checkpoint} holds another model (head={saved_config.head!r}, num_labels={saved_config.num_labels}, "
            f"backbone {saved_config.backbone_config.model_type}) than the one being trained (head={config.head!r}, "
            f"num_labels={config.num_labels}, backbone {config.backbone_config.model_type}): {len(differing)} "
            f"weights differ, e.g. {differing[:3]}. Resume with the same model settings, or use another output_dir."
        )


def clear_run(output_dir) -> None:
    """Delete what a previous run in `output_dir` wrote, as its run manifest lists it, and the folders
    (checkpoints) that leaves empty; nothing else. A folder holding a run without a manifest is an error."""
    output_dir = Path(output_dir)
    entries = read_run_manifest(output_dir)
    if entries is None:
        existing, _ = _previous_run(output_dir)
        if existing:
            raise FileExistsError(_unrecorded_run_message(output_dir, existing))
        return
    root = output_dir.resolve()
    folders = set()
    for entry in entries:
        path = output_dir / entry
        if not path.parent.resolve().is_relative_to(root):  # a symlinked folder must not lead elsewhere
            continue
        if path.is_symlink() or path.is_file():
            path.unlink()
        folders.update(p for p in Path(entry).parents if p != Path("."))
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            (output_dir / folder).rmdir()  # only when empty: a file of the user's keeps its folder
        except OSError:
            pass
    (output_dir / RUN_MANIFEST).unlink()
