"""The output folder of a training run: what it holds, what to resume from, what an overwrite may delete."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from .lora import VITSEG_CONFIG_FILE
from .loading import unwrap_model


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Files a finished run leaves in its output folder (beside its checkpoint-* folders). They mark the folder
# as holding a run, and they are what `overwrite_output_dir=True` removes; anything else stays.
RUN_FILE_PATTERNS = (
    "config.json", "*.safetensors", "model.safetensors.index.json", "adapter_config.json", VITSEG_CONFIG_FILE,
    "preprocessor_config.json", "trainer_state.json", "training_args.bin", "*_results.json",
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


def _run_files(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    files = {p for pattern in RUN_FILE_PATTERNS for p in output_dir.glob(pattern) if p.is_file()}
    return sorted(files) + list_checkpoints(output_dir)


def resolve_output_dir(output_dir, resume=False, overwrite_output_dir: bool = False) -> Path | None:
    """Decide what to do with what `output_dir` holds: the checkpoint to resume from, or `None` for a new run.

    Raises, touching nothing, when the folder holds another run (`checkpoint-*` folders or a saved model) and
    neither `resume` (`True`: its last complete checkpoint; a path: that checkpoint) nor `overwrite_output_dir`
    says what to do with it, or when there is nothing to resume.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"output_dir {output_dir} is a file; choose a folder.")
    if resume and overwrite_output_dir:
        raise ValueError("resume and overwrite_output_dir exclude each other: resume keeps the run, overwrite deletes it.")
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
    existing = _run_files(output_dir)
    if existing and not overwrite_output_dir:
        names = ", ".join(p.name for p in existing[:6]) + (", ..." if len(existing) > 6 else "")
        last = find_last_checkpoint(output_dir)
        raise FileExistsError(
            f"{output_dir} already holds a training run ({names}). Nothing was changed. Pass resume=True "
            f"(--resume) to continue it{f' from {last.name}' if last else ''}, overwrite_output_dir=True "
            "(--overwrite-output-dir) to delete it and start again, or choose another output_dir."
        )
    return None


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
    """Delete a previous run's `checkpoint-*` folders and saved model files (`RUN_FILE_PATTERNS`), nothing else."""
    for path in _run_files(Path(output_dir)):
        shutil.rmtree(path) if path.is_dir() else path.unlink()

