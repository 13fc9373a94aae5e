"""A plain Accelerate training loop, to copy and change, for users who want their own loop rather than `Trainer`.

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

Run it:

One process:
    python examples/accelerate_train.py --backbone facebook/dinov2-small --head linear --num-labels 3 \\
        --train-images data/train/images --train-masks data/train/masks \\
        --eval-images data/val/images --eval-masks data/val/masks --crop-size 448 --output-dir runs/accelerate

Two processes (two GPUs with NCCL; on a machine without GPUs, two CPU processes with gloo):
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py ...   (same arguments)
    torchrun --nproc_per_node 2 examples/accelerate_train.py ...                        (the same)

`--batch-size` is per process: two processes with --batch-size 4 train like one with --batch-size 8.

Mask transformers (`--head eomt` or `--head pmt`, a `ViTSegForUniversalSegmentation`) train through the same loop:
the data pipeline gives per-image `mask_labels` / `class_labels`, `MaskAnnealing` lowers the masked attention to
none over the run (EoMT's schedule; `annealer.step(step)` after each optimizer step), and the evaluation measures
`--task semantic` (mIoU), `instance` (mask AP) or `panoptic` (PQ):

    python examples/accelerate_train.py --backbone facebook/dinov2-small --head eomt --task panoptic ...
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import set_seed

from hf_vitseg import ViTSegForSemanticSegmentation, ViTSegForUniversalSegmentation
from hf_vitseg.data import load_image_folder, prepare_datasets, set_augmentation_epoch
from hf_vitseg.data.collator import SegmentationCollator
from hf_vitseg.modeling.head_base import MASK_HEAD_NAMES
from hf_vitseg.training.loading import is_mask_model, resolve_processor, unwrap_model, validate
from hf_vitseg.training.mask_annealing import MaskAnnealing
from hf_vitseg.training.metrics import ConfusionMatrix, preprocess_logits_for_metrics
from hf_vitseg.training.optim import param_groups, poly_schedule_with_warmup
from hf_vitseg.training.run_dir import (
    clear_run,
    record_run_files,
    resolve_output_dir,
    snapshot_files,
)
from hf_vitseg.training.trainer import MASK_MODEL_INPUTS, _void_pixels
from hf_vitseg.training.universal_metrics import check_task, compute_universal_metrics, encode_mask_targets


def default_accelerator(**accelerator_kwargs):
    """An `accelerate.Accelerator` whose DDP tolerates parameters that get no gradient, as `Trainer` does by
    default for transformers models: DINOv2's `mask_token` (used only for masked-image pre-training), and
    backbone layers past the deepest tapped one, are never used by a segmentation model, and plain DDP stops
    at the second step over them. `accelerator_kwargs` go to `Accelerator` (`cpu`, `mixed_precision`,
    `gradient_accumulation_steps`, ...)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = [
        *accelerator_kwargs.pop("kwargs_handlers", []), DistributedDataParallelKwargs(find_unused_parameters=True),
    ]
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
    task: str | None = None,
):
    """Fine-tune `model` with a hand-written loop on `accelerate`; returns `(model, metrics)`.

    Args:
        model: a `ViTSegForSemanticSegmentation` or `ViTSegForUniversalSegmentation` (build it before, under the
            same seed on every process).
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
        task: a mask transformer's evaluation, as for `train`: `"semantic"` (default), `"instance"`,
            `"panoptic"`.

    Returns:
        The trained model (unwrapped from DDP) and `{"train_loss": mean loss of the last logging window,
        "eval_mean_iou", "eval_pixel_accuracy", "eval_mean_accuracy", "eval_per_class_iou"}` (the `eval_*`
        only with an `eval_dataset`; a mask transformer's per `task`, e.g. `eval_pq`, `eval_map`), the same on
        every process.
    """
    accelerator = accelerator or default_accelerator(gradient_accumulation_steps=gradient_accumulation_steps)
    set_seed(seed)
    config = model.config
    mask_model = is_mask_model(model)
    task = check_task(task, mask_model)
    processor = resolve_processor(processor, model)
    if output_dir is not None:
        resolve_output_dir(output_dir, overwrite_output_dir=overwrite_output_dir)
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        if dataset is not None:
            validate(dataset, config, processor, name)
    targets = {"return_mask_labels": True} if mask_model else {}  # mask_labels / class_labels per image
    train_dataset, eval_dataset = prepare_datasets(
        train_dataset, eval_dataset, processor, crop_size, **{"seed": seed, **(augment or {}), **targets}
    )
    # for a mask model its batches carry void_mask (ignored pixels and padding): the metrics keep them out of PQ / AP
    collator = SegmentationCollator(pad_multiple=unwrap_model(model).size_divisor, ignore_index=config.ignore_index)
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
    # a mask transformer: masked attention annealed to none by the end (EoMT), set after every optimizer step
    annealer = MaskAnnealing(model, total_steps) if mask_model else None
    if annealer is not None:
        annealer.step(0)

    metrics, step, epoch, window_losses = {}, 0, 0, []
    progress = tqdm(total=total_steps, desc="training", disable=not accelerator.is_local_main_process)
    model.train()
    while step < total_steps:
        set_augmentation_epoch(train_dataset, epoch)
        for batch in train_loader:
            with accelerator.accumulate(model):
                if mask_model:  # the batch may carry more than the model takes (e.g. the padding mask)
                    batch = {key: value for key, value in batch.items() if key in MASK_MODEL_INPUTS}
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
            if annealer is not None and step < total_steps:
                annealer.step(step)
            elif annealer is not None:
                annealer.finish()  # plain attention from here on: the final evaluation and the saved model
            if step % logging_steps == 0 or step == total_steps:
                metrics["train_loss"] = accelerator.reduce(torch.stack(window_losses).mean(), "mean").item()
                window_losses.clear()
                progress.set_postfix(loss=f"{metrics['train_loss']:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if eval_dataset is not None and (step == total_steps or (eval_steps and step % eval_steps == 0)):
                metrics.update(evaluate_with_accelerate(
                    model, eval_dataset, accelerator, collator, eval_batch_size or batch_size,
                    processor=processor, task=task,
                ))
                headline = next(k for k in ("eval_mean_iou", "eval_pq", "eval_map") if k in metrics)
                accelerator.print(f"step {step}: {headline} {metrics[headline]:.4f}")
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
            before = snapshot_files(output_dir)
            model.save_pretrained(output_dir)
            processor.save_pretrained(output_dir)
            record_run_files(output_dir, before)  # the run manifest: what a later overwrite may delete
        accelerator.wait_for_everyone()
    return model, metrics


@torch.no_grad()
def evaluate_with_accelerate(model, eval_dataset, accelerator, collator, batch_size: int, processor=None,
                             task: str = "semantic") -> dict:
    """Streaming metrics of `model` on a prepared `eval_dataset`, every process taking every `N`-th sample.

    Each process evaluates its own shard (no sample twice, unlike a `prepare`d loader that pads the last
    batch) and the confusion matrices are summed across processes. A mask transformer is measured per `task`
    with `compute_universal_metrics` (its post-processing needs the `processor`).
    """
    model = accelerator.unwrap_model(model)  # no DDP hooks: the shards may have different lengths
    was_training = model.training
    model.eval()
    shard = Subset(eval_dataset, range(accelerator.process_index, len(eval_dataset), accelerator.num_processes))
    if is_mask_model(model):
        metric = compute_universal_metrics(processor, task, model.config.num_labels, model.config.id2label)
        for batch in DataLoader(shard, batch_size=batch_size, collate_fn=collator):
            outputs = model(pixel_values=batch["pixel_values"].to(accelerator.device))
            metric.update(outputs, *encode_mask_targets(
                batch["mask_labels"], batch["class_labels"], _void_pixels(batch, model.config),
                size=tuple(batch["pixel_values"].shape[-2:]),
            ))
        results = metric.sync(accelerator).compute()
        model.train(was_training)
        return {f"eval_{name}": value for name, value in results.items()}
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True, help="Hub id or folder of a pretrained HF backbone")
    parser.add_argument("--head", default="linear", help="a pixel head, or eomt / pmt (mask transformers)")
    parser.add_argument("--task", choices=["semantic", "instance", "panoptic"], default=None,
                        help="a mask transformer's evaluation (default semantic)")
    parser.add_argument("--head-kwargs", type=json.loads, default=None, metavar="JSON")
    parser.add_argument("--num-labels", type=int, required=True)
    parser.add_argument("--freeze-backbone", action="store_true")
    parser.add_argument("--train-images", required=True)
    parser.add_argument("--train-masks", required=True)
    parser.add_argument("--eval-images")
    parser.add_argument("--eval-masks")
    parser.add_argument("--crop-size", type=int, default=None, help="square training crop, a patch multiple")
    parser.add_argument("--scale-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("LOW", "HIGH"))
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--overwrite-output-dir", action="store_true")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--head-lr", type=float, default=None)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with GPUs")
    return parser.parse_args(argv)


def main(argv=None):
    """Train as the arguments say; returns `(accelerator, model, metrics)`."""
    args = parse_args(argv)
    accelerator = default_accelerator(cpu=args.cpu, gradient_accumulation_steps=args.gradient_accumulation_steps)
    set_seed(args.seed)  # the same fresh head on every process
    # eomt / pmt: a ViTSegForUniversalSegmentation (pmt freezes its backbone by default)
    model_class = ViTSegForUniversalSegmentation if args.head in MASK_HEAD_NAMES else ViTSegForSemanticSegmentation
    model = model_class.from_pretrained_backbone(
        args.backbone, head=args.head, num_labels=args.num_labels, head_kwargs=args.head_kwargs,
        **({"freeze_backbone": True} if args.freeze_backbone else {}),
    )
    train_dataset = load_image_folder(args.train_images, args.train_masks)
    eval_dataset = load_image_folder(args.eval_images, args.eval_masks) if args.eval_images else None
    model, metrics = train_with_accelerate(
        model, train_dataset, eval_dataset, output_dir=args.output_dir,
        overwrite_output_dir=args.overwrite_output_dir, crop_size=args.crop_size,
        augment={"scale_range": tuple(args.scale_range)}, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr, logging_steps=args.logging_steps,
        seed=args.seed, accelerator=accelerator, task=args.task,
    )
    accelerator.print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))
    return accelerator, model, metrics


if __name__ == "__main__":
    main()
