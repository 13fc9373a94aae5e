"""Fine-tune a `ViTSegForSemanticSegmentation` with `transformers.Trainer`.

`train(...)` is `hf-vitseg train` as a Python function: datasets with `image` and `annotation` columns in, a
trained model and its metrics out, with progress bars, periodic evaluation with the streaming mIoU metric,
safetensors checkpoints (optimizer, scheduler and RNG state included) and resumption from the last one.

Everything that can be wrong with the inputs is checked before the first step, in this order, and before
anything on disk is touched: the numeric arguments (finite and in range, before the model is loaded), the
output folder (another run there is an error unless `resume` or
`overwrite_output_dir=True`; a checkpoint to resume must hold the same model; the final save must not
have to replace a file of the user's there), the processor against the
model (patch size, `ignore_index`), the datasets (empty, masks whose size differs from their image's, mask
values outside `[0, num_labels)` that are not `ignore_index`), then the crop size (a multiple of the patch
size), the `TrainingArguments`. Only then is the model changed (a recipe's freezing or LoRA) and a run to
overwrite deleted: only the files its run manifest lists (`run_dir.RUN_MANIFEST`), never a file of the user's.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, set_seed

from ..data.augment import AugmentationEpochCallback
from ..data.collator import SegmentationCollator
from ..data.datasets import prepare_datasets
from ..hub.push import push_checkpoint_to_hub, push_trainer_to_hub, remember_processor
from ..modeling import ViTSegForSemanticSegmentation, ViTSegImageProcessor
from ..modeling.modeling_vitseg import ViTSegPreTrainedModel
from ..modeling.saving_vitseg import check_save_target
from ..unwrap import is_peft_model, unwrap_model
from . import recipes
from .class_weights import median_frequency_weights
from .loading import is_mask_model, load_trainable_model, resolve_processor, validate
from .lora import HEAD_WEIGHTS_FILE, save_lora
from .mask_annealing import MaskAnnealingCallback
from .metrics import compute_segmentation_metrics
from .optim import param_groups, poly_schedule_with_warmup
from .run_dir import (
    RunManifestCallback,
    check_checkpoint_matches,
    check_run_outputs,
    clear_run,
    record_run_files,
    resolve_output_dir,
    snapshot_files,
)
from .universal_metrics import check_task, compute_universal_metrics, encode_mask_targets


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
        # so that `model.push_to_hub` after training uploads the processor the model was trained with
        remember_processor(unwrap_model(self.model), self.processing_class)

    # -- mask transformers (eomt, pmt): per-image target lists ---------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if is_mask_model(model):  # the batch may carry more (`labels`: the void map for the metrics)
            inputs = {key: value for key, value in inputs.items() if key in MASK_MODEL_INPUTS}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """A mask model's evaluation step: loss, `(class_queries_logits, masks_queries_logits)` (the auxiliary
        blocks' predictions dropped) and the targets as two padded tensors
        (`universal_metrics.encode_mask_targets`), which Trainer pads, gathers and hands to the streaming
        metric like any label tensor. Pixel heads: Trainer's own step."""
        if not is_mask_model(model):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        model_inputs = {key: value for key, value in inputs.items() if key in MASK_MODEL_INPUTS}
        has_targets = inputs.get("mask_labels") is not None and inputs.get("class_labels") is not None
        if not has_targets:
            model_inputs = {"pixel_values": inputs["pixel_values"]}
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**model_inputs)
        loss = outputs.loss.detach().mean() if has_targets and outputs.loss is not None else None
        if prediction_loss_only:
            return loss, None, None
        logits = (outputs.class_queries_logits.detach(), outputs.masks_queries_logits.detach())
        if not has_targets:
            return loss, logits, None
        return loss, logits, encode_mask_targets(
            inputs["mask_labels"], inputs["class_labels"], _void_pixels(inputs, unwrap_model(self.model).config),
            size=tuple(inputs["pixel_values"].shape[-2:]),
        )

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
        if is_peft_model(model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # the adapter
            _load_lora_head(resume_from_checkpoint, model)
        elif not _load_full_checkpoint(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        checkpoint = self.state.best_model_checkpoint
        if is_peft_model(self.model):
            super()._load_best_model()
            _load_lora_head(checkpoint, self.model)
        elif not _load_full_checkpoint(checkpoint, self.model):
            super()._load_best_model()

    def _save(self, output_dir=None, state_dict=None):
        if not is_peft_model(self.model):
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            output_dir = output_dir or self.args.output_dir
            save_lora(self.model, output_dir, overwrite=True)  # adapter, head weights, ViTSeg config
            self.processing_class.save_pretrained(output_dir)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token=None,
                    revision=None, private=None, **kwargs):
        """`Trainer.push_to_hub` through hf-vitseg's push (`hf_vitseg.hub.push.push_trainer_to_hub`): the saved
        model's own files only (not the whole output folder), the processor and hf-vitseg's model card. Always
        blocking; `kwargs` are transformers' model-card arguments (`license`, `tags`, `finetuned_from`, ...)."""
        return push_trainer_to_hub(self, commit_message=commit_message or "End of training", token=token,
                                   revision=revision, private=private, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder):
        # transformers uploads the whole output folder at each save (with args.push_to_hub): the model's files only
        push_checkpoint_to_hub(self, checkpoint_folder)


# What a mask model's forward takes from a batch (the rest, e.g. `labels`, serves the metrics).
MASK_MODEL_INPUTS = ("pixel_values", "mask_labels", "class_labels")


def _void_pixels(inputs, config) -> torch.Tensor | None:
    """(B, H, W) bool: the pixels of a mask model's batch that carry no label, or `None` when the batch does not
    say: a `labels` map's `ignore_index`; else `SegmentationCollator`'s `void_mask` (ignored pixels and the batch
    padding) and a `pixel_mask`'s 0 (the batch padding, transformers' name, from a collator of one's own)."""
    if inputs.get("labels") is not None:
        return inputs["labels"] == config.ignore_index
    void = None
    if inputs.get("pixel_mask") is not None:
        void = inputs["pixel_mask"] == 0
    if inputs.get("void_mask") is not None:
        void = inputs["void_mask"].bool() if void is None else void | inputs["void_mask"].bool()
    return void


def _load_full_checkpoint(checkpoint, model) -> bool:
    """Load a `save_pretrained` checkpoint into `model` through `from_pretrained` (key renaming), strictly;
    `False` for what this does not cover (sharded weights), left to Trainer."""
    if not isinstance(model, ViTSegPreTrainedModel) or not (Path(checkpoint) / "model.safetensors").is_file():
        return False
    saved = load_trainable_model(str(checkpoint))  # checked folder: a truncated file is named
    model.load_state_dict(saved.state_dict(), strict=True)
    return True


def _load_lora_head(checkpoint, model) -> None:
    """Load the head weights that `save_lora` wrote beside the adapter into the LoRA `model`."""
    from safetensors.torch import load_file

    head_state = load_file(Path(checkpoint) / HEAD_WEIGHTS_FILE)
    unexpected = unwrap_model(model).load_state_dict(head_state, strict=False).unexpected_keys
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
    task: str | None = None,
    mask_annealing: bool = True,
    **training_args,
) -> tuple[ViTSegForSemanticSegmentation, dict[str, float]]:
    """Fine-tune a segmentation model with `transformers.Trainer`; returns `(model, metrics)`.

    Args:
        model_or_path: a `ViTSegForSemanticSegmentation` or the folder (Hub id) of a saved one. For a fresh
            head on a pretrained backbone, build it with `ViTSegForSemanticSegmentation.from_pretrained_backbone`.
        train_dataset, eval_dataset: `datasets.Dataset`s with an `image` and an `annotation` column
            (`hf_vitseg.data.datasets.load_image_folder` / `load_hf_dataset` build them). Both are validated
            before training; the training one gets the augmentation of `prepare_datasets`, lazily
            (`with_transform`; a transform already set on them is replaced, the datasets given are not changed).
        output_dir: where checkpoints (`checkpoint-N/`, safetensors) and, at the end, the final model, its
            image processor (remote code included), `trainer_state.json` and `all_results.json` go.
        processor: the `ViTSegImageProcessor`; default the one saved with `model_or_path`, else one built for
            the model (its patch size and `ignore_index`, the backbone's mean and std).
        crop_size: `(height, width)` (or an int) of the random training crops, a multiple of the patch size;
            `None` trains on whole images (padded per batch).
        augment: keyword arguments of the training augmentation (`scale_range`, `hflip`, `photometric`; or
            `augmentation`: an albumentations Compose in place of the built-in steps, see `SegmentationTransform`).
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
        overwrite_output_dir: delete a previous run in `output_dir` before training: the files it recorded in
            its run manifest (`.hf_vitseg_run.json`), nothing else; a run without one is refused. Without it (or
            `resume`), a folder that holds a run is an error and nothing is changed.
        recipe: a `hf_vitseg.training.recipes.Recipe` or its name (`"linear_probe"`, `"full_finetune"`,
            `"lora"`): it freezes the backbone (linear probe) or wraps it in LoRA adapters (lora), and its
            optimizer settings and crop size fill the arguments left unset (its warm-up as a ratio of the run;
            batch size and length stay yours). A LoRA run saves its checkpoints and final folder with
            `lora.save_lora` (adapter, head weights, config); `load_model` / `evaluate_model` load such a folder.
        report_to: `TrainingArguments.report_to` (`"none"`, `"tensorboard"`, `"wandb"`, ...).
        callbacks: extra `TrainerCallback`s.
        task: for a mask transformer (head `eomt` / `pmt`, a `ViTSegForUniversalSegmentation`): what the
            evaluation measures, `"semantic"` (mIoU, per-class IoU), `"instance"` (COCO mask AP, AP50, AP75) or
            `"panoptic"` (PQ, SQ, RQ, per-class PQ); default `"semantic"`. Its annotations are semantic maps, or
            instance-id maps with an `instance_classes` column (`hf_vitseg.data.datasets.load_instance_folder`);
            the data pipeline turns them into `mask_labels` / `class_labels`. Pixel heads: `None` or
            `"semantic"`.
        mask_annealing: for a mask transformer, anneal its masked attention to none with EoMT's schedule
            (`MaskAnnealingCallback`), so that the trained model runs plain attention; `False` keeps the masks
            as they are (`model.attn_mask_probs`).
        **training_args: any other `TrainingArguments` field (`dataloader_num_workers`, `save_total_limit`,
            `bf16`, `use_cpu`, ...); these win over the values set here.

    Returns:
        The trained model (on the training device) and a flat dict of the training metrics (`train_loss`,
        `train_runtime`, ...) and, with an `eval_dataset`, the final evaluation's (`eval_mean_iou`,
        `eval_pixel_accuracy`, `eval_mean_accuracy`, `eval_iou_<class>`, `eval_loss`; a mask transformer's
        per `task`, see `training.universal_metrics.compute_universal_metrics`).
    """
    check_training_arguments(
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, eval_batch_size=eval_batch_size, lr=lr,
        head_lr=head_lr, layer_decay=layer_decay, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
        eval_steps=eval_steps, save_steps=save_steps, logging_steps=logging_steps,
    )
    output_dir = Path(output_dir)
    set_seed(seed)  # a head initialised while loading the model is seeded too
    model = load_trainable_model(model_or_path)
    mask_model = is_mask_model(model)
    task = check_task(task, mask_model)
    recipe = resolve_recipe(recipe, model)
    hyper = _hyperparameters(recipe, lr=lr, head_lr=head_lr, layer_decay=layer_decay, weight_decay=weight_decay,
                             warmup_ratio=warmup_ratio, crop_size=crop_size)

    # Every check before anything is written, and before the first step.
    checkpoint = resolve_output_dir(output_dir, resume, overwrite_output_dir)
    if checkpoint is not None:
        check_checkpoint_matches(checkpoint, model)
    if not is_peft_model(model) and (recipe is None or recipe.lora is None):  # LoRA saves with save_lora
        check_save_target(model, output_dir)  # the final save_pretrained must not be refused after training
    check_run_outputs(output_dir)
    processor = resolve_processor(processor, model, model_or_path)
    config = unwrap_model(model).config
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        if dataset is not None:
            validate(dataset, config, processor, name)
    if config.class_weights == "auto" and not mask_model:  # one scan of the labels; the config keeps the numbers
        config.class_weights = median_frequency_weights(train_dataset, config.num_labels, config.ignore_index,
                                                        processor.do_reduce_labels, config.id2label)
    # seeded augmentation: a sample's crop and flip depend on (seed, epoch, sample), not on the order of draws,
    # so a run resumed mid-epoch sees what an uninterrupted one does
    # a mask transformer learns from per-image masks and classes (mask_labels / class_labels)
    targets = {"return_mask_labels": True} if mask_model else {}
    train_dataset, eval_dataset = prepare_datasets(
        train_dataset, eval_dataset, processor, hyper["crop_size"], **{"seed": seed, **(augment or {}), **targets}
    )
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
        # pinned memory only speeds up copies to a GPU; without one torch warns on every data loader
        "dataloader_pin_memory": torch.cuda.is_available() and not training_args.get("use_cpu", False),
        # the streaming metric: one confusion matrix, never all the logits
        "batch_eval_metrics": True,
        "eval_do_concat_batches": False,
        # set_transform datasets read the raw `image` / `annotation` columns, which the model does not take
        "remove_unused_columns": False,
        "label_names": ["mask_labels", "class_labels"] if mask_model else ["labels"],
        **training_args,
    })
    model = apply_recipe(recipe, model)  # changes the model: only once every check has passed
    if overwrite_output_dir and int(os.environ.get("RANK", "0")) == 0:  # one process deletes (torchrun)
        clear_run(output_dir)
    before = snapshot_files(output_dir)  # what the run writes is what is new afterwards: its manifest
    collator = SegmentationCollator(pad_multiple=unwrap_model(model).size_divisor, ignore_index=config.ignore_index)
    trainer = SegmentationTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        compute_metrics=(
            compute_universal_metrics(processor, task, config.num_labels, config.id2label) if mask_model
            else compute_segmentation_metrics(config.num_labels, config.ignore_index, config.id2label)
        ),
        callbacks=[
            AugmentationEpochCallback(train_dataset), RunManifestCallback(output_dir, before),
            *([MaskAnnealingCallback()] if mask_model and mask_annealing else []), *(callbacks or []),
        ],
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
    if trainer.is_world_process_zero():
        record_run_files(output_dir, before)
    return trainer.model, metrics


def resolve_recipe(recipe, model):
    """`recipe` as a `recipes.Recipe` made for the model's patch size (a name: `"linear_probe"`,
    `"full_finetune"`, `"lora"`), or `None`."""
    if recipe is None or isinstance(recipe, recipes.Recipe):
        return recipe
    factories = {"linear_probe": recipes.linear_probe, "full_finetune": recipes.full_finetune, "lora": recipes.lora}
    if recipe not in factories:
        raise ValueError(f"Unknown recipe {recipe!r}; choose one of {sorted(factories)} or pass a recipes.Recipe.")
    return factories[recipe](patch_size=unwrap_model(model).size_divisor)


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
        unwrap_model(model).freeze_backbone()
    if recipe.lora is not None and not is_peft_model(model):
        from .lora import apply_lora

        model = apply_lora(model, **recipe.lora)
    return model


_POSITIVE = ("a number > 0", lambda v: v > 0)
_COUNT = ("an integer >= 1", lambda v: v >= 1 and v == int(v))
# Trainer reads a step interval below 1 as a share of the run's steps
_INTERVAL = ("an integer >= 1 or a share of the run in (0, 1)", lambda v: v > 0 and (v < 1 or v == int(v)))
# The arguments of `train` that are numbers: what each must be, and the test.
_ARGUMENT_RULES = {
    "epochs": _POSITIVE, "max_steps": _COUNT, "batch_size": _COUNT, "eval_batch_size": _COUNT,
    "lr": _POSITIVE, "head_lr": _POSITIVE, "layer_decay": ("a number in (0, 1]", lambda v: 0 < v <= 1),
    "weight_decay": ("a number >= 0", lambda v: v >= 0), "warmup_ratio": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "eval_steps": _INTERVAL, "save_steps": _INTERVAL, "logging_steps": _INTERVAL,
}


def check_training_arguments(**values) -> None:
    """Raise a `ValueError` naming the first of `train`'s numeric arguments (`lr`, `batch_size`, ...) that is not
    a finite number in its range; `None` (unset) passes. `train` calls it before anything is loaded or deleted.

    Args:
        **values: `train`'s numeric arguments by name (the keys of `_ARGUMENT_RULES`).
    """
    for name, value in values.items():
        if value is None:
            continue
        expected, rule = _ARGUMENT_RULES[name]
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not (is_number and math.isfinite(value) and rule(value)):
            raise ValueError(f"{name} must be {expected}, got {value!r}.")


def _hyperparameters(recipe, **given) -> dict:
    """Explicit arguments, else the recipe's values, else the defaults."""
    defaults = {"lr": 1e-4, "head_lr": None, "layer_decay": None, "weight_decay": 0.01, "warmup_ratio": 0.0,
                "crop_size": None}
    from_recipe = recipe_defaults(recipe)
    resolved = {k: given[k] if given[k] is not None else from_recipe.get(k, defaults[k]) for k in defaults}
    if not 0 <= resolved["warmup_ratio"] < 1:
        raise ValueError(f"warmup_ratio must lie in [0, 1), got {resolved['warmup_ratio']}.")
    return resolved
