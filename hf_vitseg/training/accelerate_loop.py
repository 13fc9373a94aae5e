"""A plain Accelerate training loop, for users who want their own loop rather than `Trainer`.

The same model, data pipeline, optimizer and metric as `train` (the `Trainer` path), written out in one
readable function to copy and change. It runs unchanged on one CPU or GPU, or on several processes:

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py ...   # 2 GPUs (NCCL), or
                                                                                     # 2 CPU processes (gloo)
                                                                                     # on a machine without GPUs
    torchrun --nproc_per_node 2 examples/accelerate_train.py ...                      # the same, with torchrun

(`accelerate launch --cpu --num_processes 2` starts a single process unless MPI is set up: Accelerate's
multi-CPU launcher is `mpirun`.)

Multi-process semantics: every process loads a different part of each global batch (`batch_size` per
process), DDP averages the gradients, so with `N` processes a step sees `N * batch_size` samples, exactly
as one process with that batch size would, provided the per-process losses have equal weight: the loss
is a mean over each process's labelled pixels, so the match is exact when every process's batch holds
the same number of labelled pixels (fixed crops that need no padding, no `ignore_index` in the masks)
and the model has no BatchNorm in training mode (BatchNorm normalises with per-process statistics).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import set_seed

from ..processing.augment import set_augmentation_epoch
from ..processing.data import prepare_datasets
from .collator import SegmentationCollator
from .metrics import ConfusionMatrix, preprocess_logits_for_metrics
from .optim import param_groups, poly_schedule_with_warmup
from .train import clear_run, resolve_output_dir, resolve_processor, size_divisor, validate


def default_accelerator(**accelerator_kwargs):
    """An `accelerate.Accelerator` whose DDP tolerates parameters that get no gradient, as `Trainer` does by
    default for transformers models: DINOv2's `mask_token` (used only for masked-image pre-training), and
    backbone layers past the deepest tapped one, are never used by a segmentation model, and plain DDP stops
    at the second step over them. `accelerator_kwargs` go to `Accelerator` (`cpu`, `mixed_precision`,
    `gradient_accumulation_steps`, ...)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = [*accelerator_kwargs.pop("kwargs_handlers", []), DistributedDataParallelKwargs(find_unused_parameters=True)]
    return Accelerator(kwargs_handlers=handlers, **accelerator_kwargs)


def train_with_accelerate(
    model,
    train_dataset,
    eval_dataset=None,
    *,
    output_dir=None,
    overwrite_output_dir: bool = False,
    processor=None,
    crop_size=None,
    augment: dict | None = None,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 8,
    eval_batch_size: int | None = None,
    lr: float = 1e-4,
    head_lr: float | None = None,
    layer_decay: float | None = None,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.0,
    max_grad_norm: float = 1.0,
    gradient_accumulation_steps: int = 1,
    eval_steps: int | None = None,
    logging_steps: int = 10,
    seed: int = 42,
    num_workers: int = 0,
    accelerator=None,
):
    """Fine-tune `model` with a hand-written loop on `accelerate`; returns `(model, metrics)`.

    Args:
        model: a `ViTSegForSemanticSegmentation` (build it before, under the same seed on every process).
        train_dataset, eval_dataset: `datasets.Dataset`s with `image` and `annotation` columns; validated,
            then given the augmentation of `prepare_datasets` (seeded: a sample's augmentation depends on
            `(seed, epoch, sample)`, not on which process loads it).
        output_dir: where the final model and image processor go (main process); `None` saves nothing. A
            folder that holds another run is an error unless `overwrite_output_dir=True`.
        processor, crop_size, augment: as for `train`.
        epochs / max_steps: how long; `max_steps` (optimizer steps) wins when given.
        batch_size: per process; the global batch is `batch_size * num_processes * gradient_accumulation_steps`.
        lr, head_lr, layer_decay, weight_decay, warmup_ratio: AdamW over `optim.param_groups` with the poly
            schedule (`optim.poly_schedule_with_warmup`).
        max_grad_norm: gradient clipping (global norm, after the gradients are averaged over processes).
        eval_steps: evaluate every so many steps (and always at the end, when there is an eval_dataset).
        logging_steps: print the loss (averaged over processes) every so many steps.
        seed: seeds the data order and the augmentation, the same on every process.
        accelerator: an `accelerate.Accelerator`; default `default_accelerator(gradient_accumulation_steps=...)`.
            One of your own needs `DistributedDataParallelKwargs(find_unused_parameters=True)` for backbones
            with unused parameters (DINOv2), see `default_accelerator`.

    Returns:
        The trained model (unwrapped from DDP) and `{"train_loss": mean loss of the last logging window,
        "eval_mean_iou", "eval_pixel_accuracy", "eval_mean_accuracy", "eval_per_class_iou"}` (the `eval_*`
        only with an `eval_dataset`), the same on every process.
    """
    accelerator = accelerator or default_accelerator(gradient_accumulation_steps=gradient_accumulation_steps)
    set_seed(seed)
    config = model.config
    processor = resolve_processor(processor, model)
    if output_dir is not None:
        resolve_output_dir(output_dir, overwrite_output_dir=overwrite_output_dir)
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        if dataset is not None:
            validate(dataset, config, processor, name)
    train_dataset, eval_dataset = prepare_datasets(
        train_dataset, eval_dataset, processor, crop_size, **{"seed": seed, **(augment or {})}
    )
    collator = SegmentationCollator(pad_multiple=size_divisor(model), ignore_index=config.ignore_index)
    train_loader = DataLoader(
        train_dataset, batch_size=batch_size, shuffle=True, collate_fn=collator, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),  # one data order, the same on every process
    )
    optimizer = torch.optim.AdamW(
        param_groups(model, lr, head_lr=head_lr, weight_decay=weight_decay, layer_decay=layer_decay), lr=lr
    )
    # After `prepare`, the loader yields this process's share of the batches, so its length counts steps.
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.gradient_accumulation_steps)
    total_steps = max_steps or epochs * steps_per_epoch
    # Not `prepare`d: an Accelerate scheduler steps once per process per step; this one counts optimizer steps.
    scheduler = poly_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total_steps), total_steps)

    metrics, step, epoch, window_losses = {}, 0, 0, []
    progress = tqdm(total=total_steps, desc="training", disable=not accelerator.is_local_main_process)
    model.train()
    while step < total_steps:
        set_augmentation_epoch(train_dataset, epoch)
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()  # a no-op while gradients accumulate
                optimizer.zero_grad()
            window_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            progress.update(1)
            if step % logging_steps == 0 or step == total_steps:
                metrics["train_loss"] = accelerator.reduce(torch.stack(window_losses).mean(), "mean").item()
                window_losses.clear()
                progress.set_postfix(loss=f"{metrics['train_loss']:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if eval_dataset is not None and (step == total_steps or (eval_steps and step % eval_steps == 0)):
                metrics.update(evaluate_with_accelerate(model, eval_dataset, accelerator, collator, eval_batch_size or batch_size))
                accelerator.print(f"step {step}: eval mean IoU {metrics['eval_mean_iou']:.4f}")
            if step == total_steps:
                break
        epoch += 1
    progress.close()

    model = accelerator.unwrap_model(model)
    if output_dir is not None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if overwrite_output_dir:
                clear_run(output_dir)
            model.save_pretrained(output_dir)
            processor.save_pretrained(output_dir)
        accelerator.wait_for_everyone()
    return model, metrics


@torch.no_grad()
def evaluate_with_accelerate(model, eval_dataset, accelerator, collator, batch_size: int) -> dict:
    """Streaming metrics of `model` on a prepared `eval_dataset`, every process taking every `N`-th sample.

    Each process evaluates its own shard (no sample twice, unlike a `prepare`d loader that pads the last
    batch) and the confusion matrices are summed across processes.
    """
    model = accelerator.unwrap_model(model)  # no DDP hooks: the shards may have different lengths
    was_training = model.training
    model.eval()
    shard = Subset(eval_dataset, range(accelerator.process_index, len(eval_dataset), accelerator.num_processes))
    confusion = ConfusionMatrix(model.config.num_labels, model.config.ignore_index)
    for batch in DataLoader(shard, batch_size=batch_size, collate_fn=collator):
        labels = batch["labels"].to(accelerator.device)
        logits = model(pixel_values=batch["pixel_values"].to(accelerator.device)).logits
        confusion.update(preprocess_logits_for_metrics(logits, labels), labels)
    results = confusion.sync(accelerator).compute()
    model.train(was_training)
    return {
        "eval_mean_iou": results["mean_iou"],
        "eval_pixel_accuracy": results["pixel_accuracy"],
        "eval_mean_accuracy": results["mean_accuracy"],
        "eval_per_class_iou": results["per_class_iou"],
    }
