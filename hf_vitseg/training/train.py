"""Fine-tune and evaluate a `ViTSegForSemanticSegmentation` with `transformers.Trainer`.

`train(...)` is `hf-vitseg train` as a Python function: datasets with `image` and `annotation` columns in, a
trained model and its metrics out, with progress bars, periodic evaluation with the streaming mIoU metric,
safetensors checkpoints (optimizer, scheduler and RNG state included) and resumption from the last one.

Everything that can be wrong with the inputs is checked before the first step, in this order, and before
anything on disk is touched: the output folder (another run there is an error unless `resume` or
`overwrite_output_dir=True`; a checkpoint to resume must hold the same model), the processor against the
model (patch size, `ignore_index`), the datasets (empty, masks whose size differs from their image's, mask
values outside `[0, num_labels)` that are not `ignore_index`), then the crop size (a multiple of the patch
size). Only then is the model changed (a recipe's freezing or LoRA) and a run to overwrite deleted.

`evaluate_model(...)` is `hf-vitseg evaluate`: the metrics of a saved model on a dataset, with plain or
sliding-window inference.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, Trainer, TrainingArguments, set_seed

from ..modeling import ViTSegForSemanticSegmentation
from ..processing import ViTSegImageProcessor
from ..processing.augment import AugmentationEpochCallback
from ..processing.data import prepare_datasets, validate_dataset
from . import recipes
from .collator import SegmentationCollator
from .lora import HEAD_WEIGHTS_FILE, VITSEG_CONFIG_FILE, load_lora, save_lora
from .metrics import compute_segmentation_metrics
from .optim import param_groups, poly_schedule_with_warmup


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Files a finished run leaves in its output folder (beside its checkpoint-* folders). They mark the folder
# as holding a run, and they are what `overwrite_output_dir=True` removes; anything else stays.
RUN_FILE_PATTERNS = (
    "config.json", "*.safetensors", "model.safetensors.index.json", "adapter_config.json", VITSEG_CONFIG_FILE,
    "preprocessor_config.json", "trainer_state.json", "training_args.bin", "*_results.json",
)
# What Trainer writes last into a checkpoint: a checkpoint folder without it was cut short (killed mid-save).
CHECKPOINT_COMPLETE_MARKER = "trainer_state.json"


# -- model and processor ----------------------------------------------------------------------------------------
def load_model(model_or_path):
    """A `ViTSegForSemanticSegmentation` given as is, or loaded from a saved folder (or Hub id); a folder that
    `save_lora` wrote (the LoRA recipe's output) comes back as a trainable `PeftModel` (`lora.load_lora`)."""
    if isinstance(model_or_path, torch.nn.Module):
        return model_or_path
    if all((Path(model_or_path) / name).is_file() for name in ("adapter_config.json", VITSEG_CONFIG_FILE)):
        return load_lora(model_or_path, is_trainable=True)
    model_type = AutoConfig.from_pretrained(model_or_path).model_type
    if model_type != "vitseg":
        raise ValueError(
            f"{model_or_path} holds a {model_type!r} model, not a ViTSeg segmentation model. Build one on this "
            "backbone with ViTSegForSemanticSegmentation.from_pretrained_backbone(path, head=..., num_labels=...), "
            "or from the command line: hf-vitseg train --backbone PATH --head NAME ..."
        )
    return ViTSegForSemanticSegmentation.from_pretrained(model_or_path)


def size_divisor(model) -> int:
    """What input height and width must be multiples of: the patch size (the total stride for Swin)."""
    return _unwrap(model).backbone.size_divisor


def default_processor(model) -> ViTSegImageProcessor:
    """A `ViTSegImageProcessor` for `model`: its patch size and `ignore_index`, and the mean and std of the
    backbone's own image processor when the backbone's folder (`config.backbone_name_or_path`) has one
    (ImageNet statistics otherwise)."""
    model = _unwrap(model)
    kwargs = {"patch_size": size_divisor(model), "ignore_index": model.config.ignore_index}
    backbone = getattr(model.config, "backbone_name_or_path", None)
    if backbone:
        try:
            backbone_processor, _ = ViTSegImageProcessor.get_image_processor_dict(backbone)
        except OSError:  # no preprocessor_config.json there (or the Hub is out of reach): keep ImageNet's
            backbone_processor = {}
        kwargs.update({k: backbone_processor[k] for k in ("image_mean", "image_std") if k in backbone_processor})
    return ViTSegImageProcessor(**kwargs)


def resolve_processor(processor, model, model_or_path=None) -> ViTSegImageProcessor:
    """`processor`, else the one saved beside `model_or_path`, else `default_processor(model)`; checked
    against the model (patch size, `ignore_index`)."""
    if processor is None and isinstance(model_or_path, (str, os.PathLike)):
        if (Path(model_or_path) / "preprocessor_config.json").is_file():
            processor = ViTSegImageProcessor.from_pretrained(model_or_path)
    if processor is None:
        return default_processor(model)
    divisor, config = size_divisor(model), _unwrap(model).config
    patch_size = getattr(processor, "patch_size", None)
    if patch_size is not None and patch_size % divisor:
        raise ValueError(
            f"The image processor pads to multiples of {patch_size}, but the model needs multiples of {divisor}: "
            f"set processor.patch_size = {divisor} (or a multiple of it)."
        )
    processor_ignore = getattr(processor, "ignore_index", config.ignore_index)
    if processor_ignore != config.ignore_index:
        raise ValueError(
            f"The image processor pads labels with ignore_index={processor_ignore}, but the model ignores "
            f"{config.ignore_index}: make them agree (processor.ignore_index = model.config.ignore_index)."
        )
    return processor


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
    model = _unwrap(model)
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


# -- the Trainer ----------------------------------------------------------------------------------------------------
class SegmentationTrainer(Trainer):
    """`Trainer` with hf-vitseg's optimizer: parameter groups with a head learning rate, layer-wise learning-rate
    decay over the backbone and no weight decay on norms, biases and position embeddings
    (`optim.param_groups`), and a poly schedule with linear warm-up (`optim.poly_schedule_with_warmup`).

    `head_lr` (default: `learning_rate`) and `layer_decay` (default `None`: none) are its extra arguments; the
    rest (learning rate, weight decay, warm-up, Adam settings, `optim`) comes from `TrainingArguments`.
    """

    def __init__(self, *args, head_lr: float | None = None, layer_decay: float | None = None, **kwargs):
        self.head_lr = head_lr
        self.layer_decay = layer_decay
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = param_groups(
                model if model is not None else self.model, lr=self.args.learning_rate,
                head_lr=self.head_lr, weight_decay=self.args.weight_decay, layer_decay=self.layer_decay,
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            # a recipe's warm-up ratio can round up to the whole of a very short run: keep one step of decay
            warmup_steps = min(self.args.get_warmup_steps(num_training_steps), num_training_steps - 1)
            self.lr_scheduler = poly_schedule_with_warmup(optimizer or self.optimizer, warmup_steps, num_training_steps)
        return self.lr_scheduler

    # Checkpoint loading, two fixes:
    # - transformers 5 saves weights under their original (Hub) names, e.g. DINOv2's `attention.attention.query`
    #   for the model's `attention.q_proj`, but Trainer reloads checkpoints with a plain `load_state_dict(strict=False)`
    #   that skips the renamed weights with a mere warning (huggingface/transformers#43701): a resumed run would go
    #   on with the fresh model's attention weights. `from_pretrained` applies the renaming; load through it, strictly.
    # - a LoRA model's head trains in full but is not part of PEFT's adapter, the only thing Trainer saves and
    #   reloads for a PEFT model: save it beside the adapter as `lora.save_lora` does, and load it back.
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model if model is not None else self.model
        if hasattr(model, "peft_config"):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # the adapter
            _load_lora_head(resume_from_checkpoint, model)
        elif not _load_full_checkpoint(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        checkpoint = self.state.best_model_checkpoint
        if hasattr(self.model, "peft_config"):
            super()._load_best_model()
            _load_lora_head(checkpoint, self.model)
        elif not _load_full_checkpoint(checkpoint, self.model):
            super()._load_best_model()

    def _save(self, output_dir=None, state_dict=None):
        if not hasattr(self.model, "peft_config"):
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            output_dir = output_dir or self.args.output_dir
            save_lora(self.model, output_dir, overwrite=True)  # adapter, head weights, ViTSeg config
            self.processing_class.save_pretrained(output_dir)


def _load_full_checkpoint(checkpoint, model) -> bool:
    """Load a `save_pretrained` checkpoint into `model` through `from_pretrained` (key renaming), strictly;
    `False` for what this does not cover (sharded weights), left to Trainer."""
    if not isinstance(model, ViTSegForSemanticSegmentation) or not (Path(checkpoint) / "model.safetensors").is_file():
        return False
    saved = type(model).from_pretrained(checkpoint, dtype=model.dtype)
    model.load_state_dict(saved.state_dict(), strict=True)
    return True


def _load_lora_head(checkpoint, model) -> None:
    """Load the head weights that `save_lora` wrote beside the adapter into the LoRA `model`."""
    from safetensors.torch import load_file

    head_state = load_file(Path(checkpoint) / HEAD_WEIGHTS_FILE)
    unexpected = model.get_base_model().load_state_dict(head_state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{checkpoint} holds head weights of another model: {unexpected[:3]}")


def train(
    model_or_path,
    train_dataset,
    eval_dataset=None,
    *,
    output_dir,
    processor: ViTSegImageProcessor | None = None,
    crop_size: int | Sequence[int] | None = None,
    augment: Mapping[str, Any] | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    batch_size: int = 8,
    eval_batch_size: int | None = None,
    lr: float | None = None,
    head_lr: float | None = None,
    layer_decay: float | None = None,
    weight_decay: float | None = None,
    warmup_ratio: float | None = None,
    eval_steps: int | None = None,
    save_steps: int | None = None,
    logging_steps: int = 10,
    seed: int = 42,
    resume: bool | str | os.PathLike = False,
    overwrite_output_dir: bool = False,
    recipe=None,
    report_to: str | list[str] = "none",
    callbacks: list | None = None,
    **training_args,
) -> tuple[ViTSegForSemanticSegmentation, dict[str, float]]:
    """Fine-tune a segmentation model with `transformers.Trainer`; returns `(model, metrics)`.

    Args:
        model_or_path: a `ViTSegForSemanticSegmentation` or the folder (Hub id) of a saved one. For a fresh
            head on a pretrained backbone, build it with `ViTSegForSemanticSegmentation.from_pretrained_backbone`.
        train_dataset, eval_dataset: `datasets.Dataset`s with an `image` and an `annotation` column
            (`hf_vitseg.processing.data.load_image_folder` / `load_hf_dataset` build them). Both are validated
            before training; the training one gets the augmentation of `prepare_datasets`, lazily
            (`with_transform`; a transform already set on them is replaced, the datasets given are not changed).
        output_dir: where checkpoints (`checkpoint-N/`, safetensors) and, at the end, the final model, its
            image processor (remote code included), `trainer_state.json` and `all_results.json` go.
        processor: the `ViTSegImageProcessor`; default the one saved with `model_or_path`, else one built for
            the model (its patch size and `ignore_index`, the backbone's mean and std).
        crop_size: `(height, width)` (or an int) of the random training crops, a multiple of the patch size;
            `None` trains on whole images (padded per batch).
        augment: keyword arguments of the training augmentation (`scale_range`, `hflip`, `photometric`).
        epochs / max_steps: how long; `max_steps` wins when given. Default: 3 epochs.
        batch_size / eval_batch_size: per device.
        lr, head_lr, layer_decay, weight_decay, warmup_ratio: the optimizer (AdamW on `optim.param_groups`,
            poly schedule with linear warm-up over `warmup_ratio` of the steps). Unset values come from the
            recipe, else lr 1e-4, head_lr = lr, no layer decay, weight_decay 0.01, warmup_ratio 0.0.
        eval_steps / save_steps: evaluate / checkpoint every so many steps; default at the end of each epoch.
        logging_steps: log the training loss every so many steps.
        seed: seeds the head's initialisation (for a model loaded here), the data order and augmentation.
        resume: `True` continues from the last complete `checkpoint-N` in `output_dir` (model, optimizer,
            scheduler, RNG state and position in the epoch), a path from that checkpoint. The checkpoint must
            hold the same model (head, classes, backbone).
        overwrite_output_dir: delete a previous run in `output_dir` (its `checkpoint-*` folders and saved
            model files, nothing else) before training. Without it (or `resume`), a folder that holds a run is
            an error and nothing is changed.
        recipe: a `hf_vitseg.training.recipes.Recipe` or its name (`"linear_probe"`, `"full_finetune"`,
            `"lora"`): it freezes the backbone (linear probe) or wraps it in LoRA adapters (lora), and its
            optimizer settings and crop size fill the arguments left unset (its warm-up as a ratio of the run;
            batch size and length stay yours). A LoRA run saves its checkpoints and final folder with
            `lora.save_lora` (adapter, head weights, config); `load_model` / `evaluate_model` load such a folder.
        report_to: `TrainingArguments.report_to` (`"none"`, `"tensorboard"`, `"wandb"`, ...).
        callbacks: extra `TrainerCallback`s.
        **training_args: any other `TrainingArguments` field (`dataloader_num_workers`, `save_total_limit`,
            `bf16`, `use_cpu`, ...); these win over the values set here.

    Returns:
        The trained model (on the training device) and a flat dict of the training metrics (`train_loss`,
        `train_runtime`, ...) and, with an `eval_dataset`, the final evaluation's (`eval_mean_iou`,
        `eval_pixel_accuracy`, `eval_mean_accuracy`, `eval_iou_<class>`, `eval_loss`).
    """
    output_dir = Path(output_dir)
    set_seed(seed)  # a head initialised while loading the model is seeded too
    model = load_model(model_or_path)
    recipe = resolve_recipe(recipe, model)
    hyper = _hyperparameters(recipe, lr=lr, head_lr=head_lr, layer_decay=layer_decay, weight_decay=weight_decay,
                             warmup_ratio=warmup_ratio, crop_size=crop_size)

    # Every check before anything is written, and before the first step.
    checkpoint = resolve_output_dir(output_dir, resume, overwrite_output_dir)
    if checkpoint is not None:
        check_checkpoint_matches(checkpoint, model)
    processor = resolve_processor(processor, model, model_or_path)
    config = _unwrap(model).config
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        if dataset is not None:
            validate(dataset, config, processor, name)
    # seeded augmentation: a sample's crop and flip depend on (seed, epoch, sample), not on the order of draws,
    # so a run resumed mid-epoch sees what an uninterrupted one does
    train_dataset, eval_dataset = prepare_datasets(
        train_dataset, eval_dataset, processor, hyper["crop_size"], **{"seed": seed, **(augment or {})}
    )
    model = apply_recipe(recipe, model)  # changes the model: only once every check has passed
    if overwrite_output_dir and int(os.environ.get("RANK", "0")) == 0:  # one process deletes (torchrun)
        clear_run(output_dir)

    args = TrainingArguments(**{
        "output_dir": str(output_dir),
        "num_train_epochs": 3 if epochs is None else epochs,
        "max_steps": max_steps or -1,
        "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": eval_batch_size or batch_size,
        "learning_rate": hyper["lr"],
        "weight_decay": hyper["weight_decay"],
        "warmup_steps": hyper["warmup_ratio"],  # a float in [0, 1) is a ratio of the training steps
        "eval_strategy": "no" if eval_dataset is None else ("steps" if eval_steps else "epoch"),
        "eval_steps": eval_steps,
        "save_strategy": "steps" if save_steps else "epoch",
        "save_steps": save_steps or 500,
        "logging_steps": logging_steps,
        "seed": seed,
        "report_to": report_to,
        # the streaming metric: one confusion matrix, never all the logits
        "batch_eval_metrics": True,
        "eval_do_concat_batches": False,
        # set_transform datasets read the raw `image` / `annotation` columns, which the model does not take
        "remove_unused_columns": False,
        "label_names": ["labels"],
        **training_args,
    })
    trainer = SegmentationTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=SegmentationCollator(pad_multiple=size_divisor(model), ignore_index=config.ignore_index),
        processing_class=processor,
        compute_metrics=compute_segmentation_metrics(config.num_labels, config.ignore_index, config.id2label),
        callbacks=[AugmentationEpochCallback(train_dataset), *(callbacks or [])],
        head_lr=hyper["head_lr"],
        layer_decay=hyper["layer_decay"],
    )
    train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics = dict(train_output.metrics)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model(str(output_dir))  # model (+ remote code) and image processor, safetensors
    # the recipe in readable form, for the model card (hf_vitseg.hub.cards reads it; never the pickled .bin)
    (Path(output_dir) / "training_args.json").write_text(trainer.args.to_json_string())
    trainer.save_state()
    trainer.save_metrics("all", metrics)
    return trainer.model, metrics


def resolve_recipe(recipe, model):
    """`recipe` as a `recipes.Recipe` made for the model's patch size (a name: `"linear_probe"`,
    `"full_finetune"`, `"lora"`), or `None`."""
    if recipe is None or isinstance(recipe, recipes.Recipe):
        return recipe
    factories = {"linear_probe": recipes.linear_probe, "full_finetune": recipes.full_finetune, "lora": recipes.lora}
    if recipe not in factories:
        raise ValueError(f"Unknown recipe {recipe!r}; choose one of {sorted(factories)} or pass a recipes.Recipe.")
    return factories[recipe](patch_size=size_divisor(model))


def recipe_defaults(recipe) -> dict:
    """The settings a recipe gives to `train`'s unset arguments. Its warm-up, counted in steps of its own
    schedule, becomes a ratio, so that it scales with the length of the run."""
    if recipe is None:
        return {}
    settings = recipe.optimizer
    warmup = settings.warmup_steps
    if warmup >= 1:
        warmup = warmup / recipe.training_args["max_steps"]
    return {
        "lr": settings.lr, "head_lr": settings.head_lr, "weight_decay": settings.weight_decay,
        "layer_decay": settings.layer_decay, "warmup_ratio": warmup, "crop_size": recipe.crop_size,
    }


def apply_recipe(recipe, model):
    """What a recipe does to the model: freeze the backbone (linear probe), wrap it in LoRA adapters (lora).
    Returns the model to train (a `PeftModel` for LoRA)."""
    if recipe is None:
        return model
    if recipe.model_kwargs.get("freeze_backbone"):
        _unwrap(model).freeze_backbone()
    if recipe.lora is not None and not hasattr(model, "peft_config"):
        from .lora import apply_lora

        model = apply_lora(model, **recipe.lora)
    return model


def _hyperparameters(recipe, **given) -> dict:
    """Explicit arguments, else the recipe's values, else the defaults."""
    defaults = {"lr": 1e-4, "head_lr": None, "layer_decay": None, "weight_decay": 0.01, "warmup_ratio": 0.0,
                "crop_size": None}
    from_recipe = recipe_defaults(recipe)
    resolved = {k: given[k] if given[k] is not None else from_recipe.get(k, defaults[k]) for k in defaults}
    if not 0 <= resolved["warmup_ratio"] < 1:
        raise ValueError(f"warmup_ratio must lie in [0, 1), got {resolved['warmup_ratio']}.")
    return resolved


def validate(dataset, config, processor, name: str) -> None:
    """`validate_dataset` against the model's classes and `ignore_index` and the processor's label reduction,
    its error naming the dataset (`name`: train or eval)."""
    try:
        validate_dataset(dataset, config.num_labels, config.ignore_index, processor.do_reduce_labels)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error


def _unwrap(model):
    """The ViTSeg model inside a PEFT model (LoRA recipe), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# -- evaluation ---------------------------------------------------------------------------------------------------
@torch.inference_mode()
def evaluate_model(
    model_or_path,
    dataset,
    *,
    processor: ViTSegImageProcessor | None = None,
    batch_size: int = 1,
    sliding_window: bool = False,
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    blend: str = "uniform",
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Mean IoU, pixel accuracy, mean accuracy and per-class IoU of a model on a dataset.

    Args:
        model_or_path: a `ViTSegForSemanticSegmentation` or the folder (Hub id) of a saved one.
        dataset: a `datasets.Dataset` with `image` and `annotation` columns; validated first.
        processor: default the one saved with the model, else `default_processor(model)`. Metrics are
            computed on its output grid (labels resized with nearest neighbour when it resizes).
        batch_size: images per forward pass (they are padded to a common size; padding is ignored).
        sliding_window: infer window by window (`hf_vitseg.inference.sliding_window_inference`), as
            DINOv2's linear evaluation does: `crop_size` is then required (the training crop), and
            `stride` defaults to 2/3 of it.
        blend: how overlapping windows are combined, `"uniform"` or `"gaussian"`.
        device: default CUDA when available.

    Returns:
        `mean_iou`, `pixel_accuracy`, `mean_accuracy`, `iou_<class>` (NaN for a class absent from both
        predictions and labels) and `num_images`.
    """
    model = load_model(model_or_path)
    processor = resolve_processor(processor, model, model_or_path)
    config = model.config
    if sliding_window and crop_size is None:
        raise ValueError("sliding_window needs crop_size (the size the model was trained at, e.g. 512).")
    if sliding_window and stride is None:  # 2/3 of the window, a common overlap
        stride = max(1, crop_size * 2 // 3) if isinstance(crop_size, int) else tuple(max(1, c * 2 // 3) for c in crop_size)
    validate(dataset, config, processor, "dataset")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()

    from ..inference import sliding_window_inference

    metric = compute_segmentation_metrics(config.num_labels, config.ignore_index, config.id2label)
    raw = dataset.with_format(None)
    for start in range(0, len(raw), batch_size):
        rows = raw[start : start + batch_size]
        inputs = processor(images=rows["image"], segmentation_maps=rows["annotation"], return_tensors="pt")
        pixel_values, labels = inputs["pixel_values"].to(device), inputs["labels"].to(device)
        if sliding_window:
            logits = sliding_window_inference(model, pixel_values, config.num_labels, crop_size, stride, blend=blend)
        else:
            logits = model(pixel_values=pixel_values).logits  # upsampled inside the metric, one image at a time
        results = metric((logits, labels), compute_result=start + batch_size >= len(raw))
    return {**results, "num_images": len(raw)}
