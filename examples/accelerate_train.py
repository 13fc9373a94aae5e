"""Fine-tune a ViTSeg model with a plain Accelerate loop (`hf_vitseg.training.accelerate_loop`).

One process:
    python examples/accelerate_train.py --backbone facebook/dinov2-small --head linear --num-labels 3 \\
        --train-images data/train/images --train-masks data/train/masks \\
        --eval-images data/val/images --eval-masks data/val/masks --crop-size 448 --output-dir runs/accelerate

Two processes (two GPUs with NCCL; on a machine without GPUs, two CPU processes with gloo):
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py ...   (same arguments)
    torchrun --nproc_per_node 2 examples/accelerate_train.py ...                        (the same)

`--batch-size` is per process: two processes with --batch-size 4 train like one with --batch-size 8.
"""

from __future__ import annotations

import argparse
import json

from transformers import set_seed

from hf_vitseg import ViTSegForSemanticSegmentation
from hf_vitseg.processing.data import load_image_folder
from hf_vitseg.training.accelerate_loop import default_accelerator, train_with_accelerate


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True, help="Hub id or folder of a pretrained HF backbone")
    parser.add_argument("--head", default="linear")
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
    model = ViTSegForSemanticSegmentation.from_pretrained_backbone(
        args.backbone, head=args.head, num_labels=args.num_labels, head_kwargs=args.head_kwargs,
        freeze_backbone=args.freeze_backbone,
    )
    train_dataset = load_image_folder(args.train_images, args.train_masks)
    eval_dataset = load_image_folder(args.eval_images, args.eval_masks) if args.eval_images else None
    model, metrics = train_with_accelerate(
        model, train_dataset, eval_dataset, output_dir=args.output_dir,
        overwrite_output_dir=args.overwrite_output_dir, crop_size=args.crop_size,
        augment={"scale_range": tuple(args.scale_range)}, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr, logging_steps=args.logging_steps,
        seed=args.seed, accelerator=accelerator,
    )
    accelerator.print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))
    return accelerator, model, metrics


if __name__ == "__main__":
    main()
