"""Which head? `compare_heads` trains every head on one frozen backbone under one budget and compares them.

`hf-vitseg compare` as a Python function. Given a backbone, training and validation data (`datasets.Dataset`s
with `image` and `annotation` columns, as `train` takes them) and a list of heads (default: every registered
semantic head, `hf_vitseg.list_heads()`), it

1. runs the frozen backbone ONCE over the training and the validation images, tapping the union of the layers
   the heads read (and keeping the images when a head reads them, `unet`), into `FeatureCache`s;
2. trains every head on its own selection of that cache (`FeatureCache.for_model`) with the same budget and
   schedule: `max_steps` AdamW steps of `batch_size` (`optim.param_groups`, linear warm-up over `warmup_ratio`
   of the steps then poly decay, as `train` does), the same batches, the same random crops (`crop_size`, on the
   cached maps) and flips for every head, each head initialised from `seed`;
3. evaluates each on the validation images (whole images, one at a time, as the model sees them: mIoU and
   per-class IoU), counts its parameters and GFLOPs (`torch.utils.flop_counter`, one `crop_size` image) and
   times its forward pass as a ratio to the backbone's alone (`hf_vitseg.bench.forward_ratio`, medians of
   interleaved runs);
4. writes to `output_dir`: `report.md` (the table and the recommendation), `results.json`, `accuracy_vs_cost.png`
   (mIoU against forward time), `predictions.png` (validation images, ground truth and every head's prediction)
   and `model/`, the recommended head as a model folder ready for `hf-vitseg push` (model, processor).

The recommendation: the most accurate head (highest mIoU), and the fastest head (lowest forward time) within one
mIoU point (0.01) of it; the latter is the one saved, as the better trade when they differ.

Resuming: each finished head's result, head weights and grid predictions are written at once, atomically, under
`output_dir/heads/<head>/`; run the same comparison again after an interruption and the heads already done are
skipped (a head that failed is tried again). A folder that holds files `compare` did not write, or a
comparison with other settings, is refused; nothing the user saved is deleted or replaced.

Cost: one backbone pass over the data instead of one per step and head; against N separate `train` runs
see `benchmarks/README.md` ("compare vs separate train runs"). Memory: the training cache holds, per image,
`sum over the union of taps of C * h * w` values (4 bytes, or 2 with `cache_dtype=torch.float16`), plus the
image when a head reads it; the validation features are kept per image the same way.

What it does not do: fine-tune the backbone (compare heads on the frozen backbone, then fine-tune the winner with
`hf-vitseg train --model OUTPUT/model`), random resizes or colour jitter (crops and flips only, on cached maps).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["compare_heads", "recommend"]

STATE_FILE = ".hf_vitseg_compare.json"
HEADS_DIR = "heads"
RESULT_FILE, WEIGHTS_FILE, PREDICTIONS_FILE = "result.json", "head.safetensors", "predictions.npz"
MIOU_POINT = 0.01  # "one mIoU point"


def compare_heads(
    backbone: str,
    train_dataset,
    eval_dataset,
    *,
    output_dir,
    heads: Sequence[str] | None = None,
    num_labels: int | None = None,
    id2label: dict | None = None,
    ignore_index: int = 255,
    crop_size: int | Sequence[int] | None = None,
    max_steps: int = 200,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup_ratio: float = 0.1,
    hflip: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    processor=None,
    cache_dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    grid_images: int = 4,
    config_kwargs: dict | None = None,
    progress: bool = True,
) -> dict:
    """Train every head on the frozen `backbone` under one budget, evaluate, report and save the recommended one.

    Args:
        backbone: Hub id or folder of a pretrained HF backbone (what `from_pretrained_backbone` takes; resolve
            the `"dinov2-small"` alias with `hf_vitseg.demo.resolve_backbone` first).
        train_dataset, eval_dataset: `datasets.Dataset`s with `image` and `annotation` columns
            (`hf_vitseg.data.load_image_folder` / `load_hf_dataset`), validated as `train` validates them.
        output_dir: where the report, results, figures, per-head results and the saved model go (new, empty,
            or a previous comparison with the same settings, which is resumed).
        heads: head names (default: every registered semantic head).
        num_labels / id2label: the classes; `ignore_index`: the label value that carries none.
        crop_size: `(height, width)` (or an int) of the random training crops, cut from the cached maps (a
            multiple of the patch size, at most the training images' size); `None`: whole training images.
        max_steps, batch_size, lr, weight_decay, warmup_ratio: the one budget and schedule of every head.
        hflip: random left-right flips of the cached training samples.
        seed: the heads' initialisation, the batch order, the crops and flips (the same for every head).
        device: where the backbone and heads run (default: CUDA when available, else the CPU).
        processor: the `ViTSegImageProcessor` (default: `ViTSegImageProcessor.for_model`).
        cache_dtype: storage dtype of the cached features (`torch.float16` halves the memory).
        repeats: timed forward passes per head (and as many of the backbone alone, interleaved), after one
            warm-up of each; the GFLOPs are counted in one more pass.
        grid_images: validation images shown in `predictions.png`.
        config_kwargs: more `ViTSegConfig` settings for every head (e.g. `{"dice_loss_weight": 0.5}`).
        progress: progress bars (one per head, and for the feature cache).

    Returns:
        The content of `results.json`: `settings`, `heads` (one entry per head: `miou`, `per_class_iou`,
        `head_params_m`, `gflops`, `head_gflops`, `forward_ratio`, `train_seconds`, ... or `error`),
        `recommendation` (`most_accurate`, `fastest_within_one_point`, `saved`, `why`), `cache_seconds`, `files`.
    """
    from transformers import set_seed

    from .. import list_heads
    from .trainer import check_training_arguments

    began = time.perf_counter()
    check_training_arguments(max_steps=max_steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                             warmup_ratio=warmup_ratio)
    heads = _check_heads(heads, list_heads())
    if eval_dataset is None:
        raise ValueError("compare_heads needs validation data (eval_dataset) to compare the heads on.")
    if num_labels is None and not id2label:
        raise ValueError("Give the classes: num_labels (--num-labels) or id2label (--id2label).")
    if num_labels is not None and id2label and len(id2label) != num_labels:
        raise ValueError(f"num_labels {num_labels} disagrees with the {len(id2label)} classes of id2label.")
    if not isinstance(grid_images, int) or grid_images < 0 or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"grid_images must be an int >= 0 and repeats an int >= 1, got {grid_images}, {repeats}.")
    labels = {"id2label": {int(k): str(v) for k, v in id2label.items()}} if id2label else {"num_labels": num_labels}
    crop = None if crop_size is None else (
        (crop_size, crop_size) if isinstance(crop_size, int) else tuple(int(c) for c in crop_size))
    output_dir = Path(output_dir)
    settings = {
        "backbone": str(backbone), "labels": labels, "ignore_index": ignore_index,
        "crop_size": list(crop) if crop else None, "max_steps": max_steps, "batch_size": batch_size, "lr": lr,
        "weight_decay": weight_decay, "warmup_ratio": warmup_ratio, "hflip": hflip, "seed": seed,
        "config_kwargs": config_kwargs or {}, "cache_dtype": str(cache_dtype).replace("torch.", ""),
        "train_images": len(train_dataset), "eval_images": len(eval_dataset),
    }
    done = _open_output_dir(output_dir, settings, heads)  # refuses a foreign folder before anything is loaded
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    common = {**labels, "ignore_index": ignore_index, "freeze_backbone": True, **(config_kwargs or {})}

    from transformers import AutoConfig

    from ..modeling import ViTSegConfig, ViTSegForSemanticSegmentation
    from ..modeling.modeling_vitseg import _load_backbone_state_dict
    from .loading import resolve_processor, validate

    # The checkpoint's weights are read once; every model below (tapper, heads, saved model) is built on them.
    config_common = dict(common)
    probe_config = ViTSegConfig(backbone_config=AutoConfig.from_pretrained(str(backbone)), head="linear",
                                **config_common)
    common["backbone_state_dict"] = _load_backbone_state_dict(backbone, probe_config, {})
    taps = {head: list(ViTSegConfig(backbone_config=probe_config.backbone_config, head=head, **config_common)
                       .backbone_out_indices) for head in heads}
    union = sorted({layer for layers in taps.values() for layer in layers})
    # The backbone once, tapping every layer a head reads: a `linear` head on the union of the taps (built once,
    # it is also the model the data are checked against).
    set_seed(seed)
    tapper = ViTSegForSemanticSegmentation.from_pretrained_backbone(
        backbone, head="linear", **{**common, "backbone_out_indices": union})
    processor = resolve_processor(processor, tapper)
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        validate(dataset, tapper.config, processor, name)
    if crop is not None and (crop[0] % tapper.size_divisor or crop[1] % tapper.size_divisor or min(crop) < 1):
        raise ValueError(f"crop_size ({crop[0]}, {crop[1]}) must be positive multiples of the patch size "
                         f"{tapper.size_divisor}.")

    todo = [head for head in heads if head not in done]
    results = dict(done)
    cache_seconds = None
    if todo:
        from ..modeling import get_head_class

        reads_image = any(get_head_class(head).uses_pixel_values for head in todo)
        tapper = tapper.to(device)
        started = time.perf_counter()
        train_cache = _training_cache(tapper, train_dataset, processor, crop, batch_size, device, cache_dtype,
                                      reads_image, progress)
        eval_caches = _eval_caches(tapper, eval_dataset, processor, device, cache_dtype, reads_image, progress)
        cache_seconds = time.perf_counter() - started
        del tapper
        _log(f"backbone features of {len(train_cache)} training and {len(eval_caches)} validation images, layers "
             f"{union}, cached once in {cache_seconds:.1f}s", progress)
        _write_json(output_dir / STATE_FILE, {"settings": settings})  # every check passed: the folder is ours
        sample_size = crop or train_cache.image_size
        for number, head in enumerate(heads, 1):
            if head not in todo:
                _log(f"[{number}/{len(heads)}] {head}: done in an earlier run, skipped", progress)
                continue
            try:
                results[head] = _run_head(
                    head, number, len(heads), backbone, common, train_cache, eval_caches, settings, crop,
                    sample_size, device, repeats, grid_images, output_dir, progress)
            except (RuntimeError, ValueError) as error:  # one head failing must not lose the others
                _log(f"[{number}/{len(heads)}] {head} FAILED: {type(error).__name__}: {error}", progress)
                results[head] = {"head": head, "error": f"{type(error).__name__}: {error}"}
        del train_cache, eval_caches

    ordered = [results[head] for head in heads]
    recommendation = recommend(ordered)
    summary = {"settings": settings, "heads": ordered, "recommendation": recommendation,
               "cache_seconds": cache_seconds, "cached_layers": union, "taps": taps}
    files = _write_outputs(output_dir, summary, eval_dataset, processor, grid_images)
    if recommendation is not None:
        _save_model(output_dir, recommendation["saved"], backbone, common, processor)
        files.append("model/")
    summary["files"] = files
    summary["seconds"] = round(time.perf_counter() - began, 1)  # this call (heads done earlier not included)
    _write_json(output_dir / "results.json", summary)
    return summary


def recommend(results: Sequence[dict]) -> dict | None:
    """The recommendation from per-head results (`head`, `miou`, `forward_ratio`; entries with `error` skipped):
    the most accurate head, the fastest head within one mIoU point (0.01) of it, which to save (the latter) and
    one sentence why. `None` when no head finished."""
    finished = [r for r in results if "error" not in r and r.get("miou") is not None and math.isfinite(r["miou"])]
    if not finished:
        return None
    best = max(finished, key=lambda r: (r["miou"], -r["forward_ratio"]))
    close = [r for r in finished if r["miou"] >= best["miou"] - MIOU_POINT]
    fastest = min(close, key=lambda r: (r["forward_ratio"], -r["miou"]))
    if fastest["head"] == best["head"]:
        why = (f"{best['head']} is the most accurate head (mIoU {best['miou']:.3f}) and no head within one mIoU "
               f"point of it runs faster ({best['forward_ratio']:.2f}x the backbone's forward time).")
    else:
        why = (f"{fastest['head']} is within {100 * (best['miou'] - fastest['miou']):.1f} mIoU points of the most "
               f"accurate head, {best['head']} ({fastest['miou']:.3f} vs {best['miou']:.3f}), at "
               f"{fastest['forward_ratio']:.2f}x the backbone's forward time against {best['forward_ratio']:.2f}x: "
               f"nearly the same accuracy for less compute.")
    return {"most_accurate": best["head"], "fastest_within_one_point": fastest["head"], "saved": fastest["head"],
            "why": why}


# -- checks and the output folder ------------------------------------------------------------------------------------
def _check_heads(heads, registered: list[str]) -> list[str]:
    heads = list(registered if heads is None else heads)
    if not heads:
        raise ValueError("heads is empty: name at least one head (heads (--heads)).")
    from ..modeling.head_base import MASK_HEAD_NAMES

    for head in heads:
        if head in MASK_HEAD_NAMES:
            raise ValueError(f"heads (--heads): {head!r} is a mask-transformer head; compare trains semantic heads "
                             f"({', '.join(registered)}).")
        if head not in registered:
            raise ValueError(f"heads (--heads): {head!r} is not a registered head; choose from "
                             f"{', '.join(registered)}.")
    repeated = sorted({h for h in heads if heads.count(h) > 1})
    if repeated:
        raise ValueError(f"heads (--heads) names {', '.join(repeated)} more than once.")
    return heads


def _open_output_dir(output_dir: Path, settings: dict, heads: list[str]) -> dict:
    """Check `output_dir` (new, empty, or a comparison with the same settings) and return the results of the heads
    already done. Nothing is written here (the settings are recorded once every check has passed)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir (--output-dir) {output_dir} is a file; give a folder.")
    state = output_dir / STATE_FILE
    if state.is_file():
        saved = json.loads(state.read_text(encoding="utf-8")).get("settings", {})
        changed = sorted(k for k in settings if saved.get(k) != settings[k])
        if changed:
            details = "; ".join(f"{k}: {saved.get(k)!r} there, {settings[k]!r} now" for k in changed)
            raise ValueError(
                f"{output_dir} holds a comparison with other settings ({details}). Run it with the same settings to "
                "resume it, or choose another output_dir (--output-dir)."
            )
    elif output_dir.is_dir() and any(output_dir.iterdir()):
        raise ValueError(
            f"{output_dir} holds files that hf-vitseg compare did not write; choose an empty or new output_dir "
            "(--output-dir). Nothing was changed."
        )
    done = {}
    for head in heads:
        folder = output_dir / HEADS_DIR / head
        if all((folder / name).is_file() for name in (RESULT_FILE, WEIGHTS_FILE, PREDICTIONS_FILE)):
            done[head] = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    return done


def _write_json(path: Path, data) -> None:
    """Write JSON atomically (a temporary file in the same folder, then `os.replace`); NaN becomes null."""
    text = json.dumps(_finite(data), indent=2)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _log(message: str, progress: bool) -> None:
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(f"hf-vitseg compare: {message}")


# -- the caches ------------------------------------------------------------------------------------------------------
class _PadTo:
    """Collate samples of any size into one fixed `(H, W)`: images padded with 0, labels with `ignore_index`
    (bottom and right, as `SegmentationCollator` pads), so that the whole training set fits one cache."""

    def __init__(self, size: tuple[int, int], ignore_index: int):
        self.size, self.ignore_index = size, ignore_index

    def __call__(self, samples: list[dict]) -> dict:
        height, width = self.size
        first = torch.as_tensor(samples[0]["pixel_values"])
        pixels = first.new_zeros((len(samples), first.shape[0], height, width))
        labels = torch.full((len(samples), height, width), self.ignore_index, dtype=torch.int64)
        for i, sample in enumerate(samples):
            image, label = torch.as_tensor(sample["pixel_values"]), torch.as_tensor(sample["labels"])
            pixels[i, :, : image.shape[1], : image.shape[2]] = image
            labels[i, : label.shape[0], : label.shape[1]] = label
        return {"pixel_values": pixels, "labels": labels}


def _training_cache(tapper, dataset, processor, crop, batch_size, device, dtype, reads_image, progress):
    """Every training image once, as the processor makes it (no augmentation), padded to the largest, through the
    backbone: one `FeatureCache` holding the union of the heads' taps."""
    from torch.utils.data import DataLoader

    from ..data.augment import SegmentationTransform
    from .feature_cache import FeatureCache

    prepared = dataset.with_transform(SegmentationTransform(processor, train=False))
    sizes = [tuple(prepared[i]["pixel_values"].shape[-2:]) for i in range(len(prepared))]
    size = (max(s[0] for s in sizes), max(s[1] for s in sizes))
    if crop is not None and (crop[0] > size[0] or crop[1] > size[1]):
        raise ValueError(f"crop_size ({crop[0]}, {crop[1]}) is larger than the largest training image {size}; "
                         "choose a smaller crop_size (--crop-size).")
    loader = DataLoader(prepared, batch_size=batch_size, shuffle=False,
                        collate_fn=_PadTo(size, processor.ignore_index))
    return FeatureCache.build(tapper, loader, device=device, dtype=dtype, keep_pixel_values=reads_image,
                              progress="backbone features (training)" if progress else None)


def _eval_caches(tapper, dataset, processor, device, dtype, reads_image, progress) -> list:
    """One `FeatureCache` per validation image (images may differ in size; each is seen whole, unpadded
    beyond the patch multiple, as the model sees it at inference)."""
    from tqdm.auto import tqdm

    from ..data.augment import SegmentationTransform
    from .feature_cache import FeatureCache

    prepared = dataset.with_transform(SegmentationTransform(processor, train=False))
    caches = []
    for i in tqdm(range(len(prepared)), desc="backbone features (validation)", unit="image", disable=not progress):
        sample = prepared[i]
        caches.append(FeatureCache.build(
            tapper, [{"pixel_values": torch.as_tensor(sample["pixel_values"]),
                      "labels": torch.as_tensor(sample["labels"])}],
            batch_size=1, device=device, dtype=dtype, keep_pixel_values=reads_image))
    return caches


# -- one head ----------------------------------------------------------------------------------------------------------
def _run_head(head, number, count, backbone, common, train_cache, eval_caches, settings, crop, sample_size, device,
              repeats, grid_images, output_dir, progress) -> dict:
    """Train, evaluate and measure one head; persist its result, head weights and grid predictions."""
    from transformers import set_seed

    from ..modeling import ViTSegForSemanticSegmentation

    started = time.perf_counter()
    set_seed(settings["seed"])  # the head's initialisation (and its dropout) as in every other head's run
    model = ViTSegForSemanticSegmentation.from_pretrained_backbone(backbone, head=head, **common).to(device)
    losses, train_seconds = _train(model, train_cache, settings, crop, device,
                                   f"[{number}/{count}] {head}", progress)
    model.eval()
    metrics, predictions = _evaluate(model, eval_caches, grid_images, device)
    result = {
        "head": head, "layers": list(model.config.backbone_out_indices),
        "miou": metrics["mean_iou"], "per_class_iou": metrics["per_class_iou"],
        "pixel_accuracy": metrics["pixel_accuracy"],
        **_measure(model, sample_size, device, repeats),
        # four significant digits, not fixed decimals: a few steps of a linear head take milliseconds
        "train_seconds": float(f"{train_seconds:.4g}"),
        "seconds_per_step": float(f"{train_seconds / settings['max_steps']:.4g}"),
        "loss_first": losses[0], "loss_last": float(np.mean(losses[-max(1, len(losses) // 10):])),
    }
    result["seconds"] = float(f"{time.perf_counter() - started:.4g}")  # the whole head: build, train, evaluate, measure
    _log(f"[{number}/{count}] {head}: mIoU {result['miou']:.3f}, forward {result['forward_ratio']:.2f}x the "
         f"backbone's, trained in {train_seconds:.1f}s", progress)
    folder = output_dir / HEADS_DIR / head
    from safetensors.torch import save_file

    head_state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                  if not k.startswith("backbone.")}
    _atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(head_state, str(tmp)))
    _atomic_write(folder / PREDICTIONS_FILE, lambda tmp: _save_npz(tmp, predictions))
    _write_json(folder / RESULT_FILE, result)  # last: its presence marks the head as done
    return result


def _save_npz(path, arrays: list[np.ndarray]) -> None:
    with open(path, "wb") as handle:
        np.savez_compressed(handle, *arrays)


def _train(model, cache, settings, crop, device, desc, progress) -> tuple[list[float], float]:
    """`max_steps` AdamW steps on the cached features; the batches, crops and flips drawn from a generator seeded
    with `seed`, so that every head sees the same ones. Returns the losses and the seconds of the steps."""
    from tqdm.auto import tqdm

    from .feature_cache import CachedBackboneModel
    from .optim import param_groups, poly_schedule_with_warmup

    view = cache.for_model(model)
    wrapper = CachedBackboneModel(model, view).train()
    steps, batch_size = settings["max_steps"], settings["batch_size"]
    optimizer = torch.optim.AdamW(param_groups(model, lr=settings["lr"], weight_decay=settings["weight_decay"]),
                                  lr=settings["lr"])
    warmup = min(int(settings["warmup_ratio"] * steps), steps - 1)
    scheduler = poly_schedule_with_warmup(optimizer, warmup, steps)
    generator = torch.Generator().manual_seed(settings["seed"])
    order = torch.empty(0, dtype=torch.long)
    losses = []
    started = time.perf_counter()
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress) as bar:
        for _ in range(steps):
            if len(order) < batch_size:  # successive epochs in randperm order
                order = torch.cat([order, torch.randperm(len(view), generator=generator)])
            indices, order = order[:batch_size], order[batch_size:]
            batch = view.batch(indices, device=device, crop_size=crop, hflip=settings["hflip"], generator=generator)
            loss = wrapper(**batch, return_dict=True).loss
            if not torch.isfinite(loss):
                raise ValueError(f"the training loss became {loss.item()} (try a lower lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses, time.perf_counter() - started


@torch.no_grad()
def _evaluate(model, eval_caches, grid_images: int, device) -> tuple[dict, list[np.ndarray]]:
    """mIoU and per-class IoU over the validation images (each whole); the predictions of the first
    `grid_images` images."""
    from .feature_cache import CachedBackboneModel
    from .metrics import ConfusionMatrix, _upsample_argmax

    wrapper = CachedBackboneModel(model)
    matrix = ConfusionMatrix(model.config.num_labels, model.config.ignore_index)
    predictions = []
    for i, cache in enumerate(eval_caches):
        batch = cache.for_model(model).batch([0], device=device)
        labels = batch.pop("labels")
        logits = wrapper(**batch, return_dict=True).logits
        prediction = _upsample_argmax(logits, tuple(labels.shape[-2:]))
        matrix.update(prediction, labels)
        if i < grid_images:
            predictions.append(prediction[0].cpu().numpy().astype(np.int32))
    return matrix.compute(), predictions


def _measure(model, sample_size, device, repeats: int) -> dict:
    """Head parameters, GFLOPs of one `sample_size` image (the model's and the head's share), forward time as a
    ratio to the backbone alone (`hf_vitseg.bench`)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..bench import forward_ratio, head_parameters_m

    channels = getattr(model.config.backbone_config, "num_channels", 3)
    pixel_values = torch.randn(1, channels, *sample_size, device=device)
    # one counted pass gives both the model's GFLOPs and its backbone's share (as `bench.gflops` of the model and
    # of `BackboneOnly(model)` count them, in two passes)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values)
    model_gflops = counter.get_total_flops() / 1e9
    backbone_gflops = sum(counter.get_flop_counts().get(f"{type(model).__name__}.backbone", {}).values()) / 1e9
    return {
        "head_params_m": head_parameters_m(model),
        "gflops": model_gflops,
        "head_gflops": model_gflops - backbone_gflops,
        "backbone_gflops": backbone_gflops,
        "forward_ratio": round(forward_ratio(model, pixel_values, repeats=repeats), 3),
        "measured_at": list(sample_size),
    }


# -- outputs -------------------------------------------------------------------------------------------------------
def _write_outputs(output_dir: Path, summary: dict, eval_dataset, processor, grid_images: int) -> list[str]:
    files = ["report.md", "results.json"]
    finished = [r for r in summary["heads"] if "error" not in r]
    if finished:
        _plot(output_dir / "accuracy_vs_cost.png", finished, summary["recommendation"])
        files.append("accuracy_vs_cost.png")
        if grid_images:
            _prediction_grid(output_dir / "predictions.png", output_dir, finished, eval_dataset, processor,
                             grid_images, summary["settings"])
            files.append("predictions.png")
    report = _report(summary, files)
    _atomic_write(output_dir / "report.md", lambda tmp: Path(tmp).write_text(report, encoding="utf-8"))
    return files


def _class_names(settings: dict) -> list[str]:
    labels = settings["labels"]
    if "id2label" in labels:
        return [labels["id2label"][k] for k in sorted(labels["id2label"], key=int)]
    return [str(i) for i in range(labels["num_labels"])]


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _report(summary: dict, files: list[str]) -> str:
    settings, heads, rec = summary["settings"], summary["heads"], summary["recommendation"]
    names = _class_names(settings)
    crop = settings["crop_size"]
    lines = [
        "# Which head? `hf-vitseg compare`",
        "",
        f"Backbone `{settings['backbone']}`, frozen. Every head: {settings['max_steps']} AdamW steps of "
        f"{settings['batch_size']} (lr {settings['lr']:g}, weight decay {settings['weight_decay']:g}, warm-up "
        f"{settings['warmup_ratio']:g} of the steps then poly decay), the same batches, "
        f"{'random ' + 'x'.join(map(str, crop)) + ' crops' if crop else 'whole images'}"
        f"{' and flips' if settings['hflip'] else ''} of the cached maps, seed {settings['seed']}. "
        f"{settings['train_images']} training and {settings['eval_images']} validation images.",
        "",
    ]
    if summary.get("cache_seconds") is not None:
        lines += [f"Backbone features (layers {summary['cached_layers']}) computed once for all heads in "
                  f"{summary['cache_seconds']:.1f} s.", ""]
    finished = [r for r in heads if "error" not in r]
    if finished:
        size = "x".join(map(str, finished[0]["measured_at"]))
        lines += [
            f"GFLOPs and forward time at one {size} image; forward time is a ratio to the backbone alone (median "
            f"of interleaved runs; the backbone is {_fmt(finished[0]['backbone_gflops'], 1)} GFLOPs). Training "
            "time: the optimizer steps on cached features.",
            "",
            "| head | layers | mIoU | " + " | ".join(f"IoU {n}" for n in names[:6]) +
            " | head params (M) | GFLOPs (head) | forward / backbone | train s |",
            "|---|---|---|" + "---|" * min(len(names), 6) + "---|---|---|---|",
        ]
        best = max(r["miou"] for r in finished)
        for r in finished:
            miou = _fmt(r["miou"])
            miou = f"**{miou}**" if r["miou"] == best else miou
            lines.append(
                f"| {r['head']} | {','.join(map(str, r['layers']))} | {miou}"
                f" | " + " | ".join(_fmt(v) for v in r["per_class_iou"][:6]) +
                f" | {_fmt(r['head_params_m'], 2)} | {_fmt(r['gflops'], 2)} ({_fmt(r['head_gflops'], 2)})"
                f" | {_fmt(r['forward_ratio'], 2)} | {_fmt(r['train_seconds'], 1)} |")
        if len(names) > 6:
            lines += ["", "Per-class IoU (every class):", "",
                      "| class | " + " | ".join(r["head"] for r in finished) + " |",
                      "|---|" + "---|" * len(finished)]
            for c, name in enumerate(names):
                lines.append(f"| {name} | " + " | ".join(_fmt(r["per_class_iou"][c]) for r in finished) + " |")
    failed = [r for r in heads if "error" in r]
    if failed:
        lines += ["", "Failed (tried again on the next run): " +
                  "; ".join(f"{r['head']}: {r['error']}" for r in failed)]
    if rec:
        lines += ["", f"**Recommendation: `{rec['saved']}`** (most accurate: `{rec['most_accurate']}`; fastest "
                      f"within one mIoU point of it: `{rec['fastest_within_one_point']}`). {rec['why']}",
                  "", "Saved to `model/`, ready for `hf-vitseg push model USER/NAME`."]
    if "accuracy_vs_cost.png" in files:
        lines += ["", "![mIoU against forward time](accuracy_vs_cost.png)"]
    if "predictions.png" in files:
        lines += ["", "![validation predictions per head](predictions.png)"]
    return "\n".join(lines) + "\n"


def _plot(path: Path, results: list[dict], recommendation: dict | None) -> None:
    """mIoU against forward time (ratio to the backbone), one labelled point per head, area ~ head parameters."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("The accuracy-vs-cost plot needs matplotlib: pip install 'hf-vitseg[plots]'.") from error
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in results:
        chosen = recommendation is not None and r["head"] == recommendation["saved"]
        axes.scatter(r["forward_ratio"], r["miou"], s=30 + 40 * math.sqrt(max(r["head_params_m"], 0.0)),
                     color="tab:red" if chosen else "tab:blue", alpha=0.7, edgecolors="black", linewidths=0.5)
        axes.annotate(r["head"], (r["forward_ratio"], r["miou"]), textcoords="offset points", xytext=(5, 4),
                      fontsize=8)
    axes.set_xlabel("forward time / backbone's alone")
    axes.set_ylabel("validation mIoU")
    axes.set_title("accuracy vs cost (area ~ head parameters; red: recommended)", fontsize=9)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    _atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def _prediction_grid(path: Path, output_dir: Path, results: list[dict], eval_dataset, processor, count: int,
                     settings: dict) -> None:
    """Rows: the first `count` validation images; columns: the image, the ground truth, each head's prediction
    (read back from the per-head files, so resumed heads are drawn too)."""
    from PIL import Image

    from ..data.augment import SegmentationTransform
    from ..inference import overlay, side_by_side

    names = _class_names(settings)
    id2label = dict(enumerate(names))
    per_head = {}
    for r in results:
        with np.load(output_dir / HEADS_DIR / r["head"] / PREDICTIONS_FILE) as stored:
            per_head[r["head"]] = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    transform = SegmentationTransform(processor, train=False)
    rows = []
    for i in range(min(count, len(eval_dataset))):
        raw = eval_dataset[i]
        image = np.asarray(raw["image"].convert("RGB") if hasattr(raw["image"], "convert") else raw["image"])
        height, width = image.shape[:2]
        truth = np.asarray(transform({"image": [raw["image"]], "annotation": [raw["annotation"]]})["labels"][0])
        panels = [image, overlay(image, truth[:height, :width], id2label=id2label,
                                 ignore_index=settings["ignore_index"], legend=False)]
        titles = ["image", "ground truth"]
        for head, maps in per_head.items():
            if i < len(maps):
                panels.append(overlay(image, maps[i][:height, :width], id2label=id2label, legend=False))
                titles.append(head)
        row = side_by_side(panels, titles)
        scale = min(1.0, 1600 / row.width)
        rows.append(row.resize((max(1, round(row.width * scale)), max(1, round(row.height * scale)))))
    if not rows:
        return
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    top = 0
    for row in rows:
        grid.paste(row, (0, top))
        top += row.height
    _atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def _save_model(output_dir: Path, head: str, backbone: str, common: dict, processor) -> None:
    """The chosen head with its trained weights on the backbone, as a model folder ready for `push`."""
    from safetensors.torch import load_file

    from ..modeling import ViTSegForSemanticSegmentation

    model = ViTSegForSemanticSegmentation.from_pretrained_backbone(backbone, head=head, **common)
    state = load_file(output_dir / HEADS_DIR / head / WEIGHTS_FILE)
    result = model.load_state_dict(state, strict=False)
    wrong = [k for k in result.missing_keys if not k.startswith("backbone.")] + list(result.unexpected_keys)
    if wrong:
        raise ValueError(f"The saved weights of head {head!r} do not fit the model ({wrong[:3]}).")
    model.eval()
    model.save_pretrained(output_dir / "model")
    processor.save_pretrained(output_dir / "model")
