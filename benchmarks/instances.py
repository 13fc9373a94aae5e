"""Instance segmentation of real nuclei: mask transformers vs. semantic heads + connected components vs. watershed.

    python benchmarks/instances.py --scale 2 --seeds 3 --steps 200 --json benchmarks/results/instances_2x.json
    python benchmarks/instances.py --quick --backbone path/to/tiny --json /tmp/q.json

Data: the stardist nuclei image's `mask2d.tif` instance ids (one id per nucleus, `load_stardist_instances`), split
exactly as the accuracy table splits the image (`benchmarks/data.py`: train on tiles of the LEFT half, test on the
whole RIGHT half, each half normalised with training-half statistics and resampled on its own by `--scale`). A
nucleus cut by the middle line becomes one instance on each side; ids are renumbered per half. Training views: the
accuracy table's (every tile at each brightness factor, as is and flipped), their instance maps flipped with them.

Rows (`--rows`):
- `watershed`: the classical baseline. Gaussian smoothing, Otsu's threshold, holes filled, small objects dropped,
  then the distance transform of the foreground, its local maxima as markers and scikit-image's watershed of
  the negated distance inside the foreground (`pip install scikit-image`, the `benchmarks` extra). Its settings
  (threshold, smoothing, marker distance, least area) are fitted on the TRAINING half (best PQ there).
- `ceiling`: connected components of the TRUE foreground, the best any pixel head + components can do (its
  foreground perfect, so only truly touching nuclei merge); also scored on the training half (`train_half`).
- `semantic`: the best semantic heads of the accuracy table (`--semantic-heads`, frozen backbone, the accuracy
  table's training exactly: `benchmarks/accuracy.py`'s feature cache, views, batch order and schedule), their
  sliding-window foreground followed by connected components (8-connected); each component scored by its mean
  foreground probability. With `--semantic-predictions` (accuracy.py's `.npz` files), the components of the
  table's own saved seed-0 test predictions instead (no retraining; scored by area).
- `pmt`: head `pmt` on the frozen backbone, trained on cached last-layer features through `model.decode`.
- `eomt`: head `eomt`, the whole model fine-tuned with layer-wise learning-rate decay (`param_groups`), masked
  attention annealed away by `hf_vitseg.training.MaskAnnealing` (the plain-loop form of `MaskAnnealingCallback`).
  Both mask models: one class ("nucleus"; background is "no object"), the same views, batch order and AdamW
  schedule as the semantic rows; the test half is segmented in crop-sized windows half a crop apart, each
  detection kept by the window whose centre is nearest its centroid (`segment_instances_in_windows`), and, for
  comparison (`whole_*` in the JSON), in ONE forward pass (padded to the patch size, the padding cut in
  post-processing). Detections from `post_process_instance_segmentation` (scored, for AP), pasted by score without
  overlap into the instance map (for PQ), both with `--score-threshold`. Their foreground (any nucleus segment)
  also gives the semantic accuracy table's fg IoU / mIoU (`fg_iou`, `miou` in the JSON). `--save-models` keeps the
  trained models; `--score-saved` scores saved ones without training.

Metrics (`hf_vitseg.training.mask_metrics`): PQ, SQ, RQ of the nucleus class (panopticapi's definition; background
is a labelled stuff segment, so a false nucleus on background counts) and COCO mask AP50 / AP (pycocotools) of
the nucleus instances on the test half; mean and sample standard deviation over `--seeds`; train seconds of the
optimizer steps (frozen rows: on the feature cache). The machine is shared: times are indicative only.

Also per run, `errors` (`error_breakdown`): where each true nucleus goes (matched, merged with a neighbour, missed,
other) and how many segments match none. `--swap-halves` runs the other fold (train on the right half, test on the
left one, which has more touching nuclei).

Writes a markdown table to stdout, with `--json` the results (rewritten after every row) and the first seed's test
instance maps beside it (`.npz`). `--merge` pools the seeds of several such files into one table, prints where the
nuclei go for each row's first seed, and with `--plot-dir` draws a PQ bar chart and each row's instances.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks.*` when run as a script

from benchmarks import accuracy  # noqa: E402
from benchmarks.data import NucleiSplit, foreground_iou, nuclei_split, otsu_threshold, tile_starts  # noqa: E402
from hf_vitseg import ViTSegImageProcessor  # noqa: E402
from hf_vitseg.training.mask_metrics import MaskAP, PanopticQuality  # noqa: E402

ROW_KINDS = ("watershed", "ceiling", "semantic", "pmt", "eomt")
NUCLEUS_ID2LABEL = {0: "nucleus"}
BACKGROUND, NUCLEUS = 0, 1  # the classes PQ is counted over: background (stuff) and nucleus (things)


# ----------------------------------------------------------------------------------------------------------------
# data: the accuracy table's split, with instance ids
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class InstanceSplit:
    """`split` (the accuracy table's NucleiSplit) plus int32 instance maps of both halves (0 = background)."""

    split: NucleiSplit
    train_instances: np.ndarray
    test_instances: np.ndarray

    def train_tiles(self, tile: int, stride: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """`(image, instance map)` tiles of the training half, at the same places as `split.train_tiles`."""
        stride = stride or tile // 2
        height, width = self.split.train_image.shape
        return [
            (self.split.train_image[y : y + tile, x : x + tile], self.train_instances[y : y + tile, x : x + tile])
            for y in tile_starts(height, tile, stride)
            for x in tile_starts(width, tile, stride)
        ]


def relabel(labels: np.ndarray) -> np.ndarray:
    """Instance ids renumbered 1..N in order of first appearance (0 stays background)."""
    ids, inverse = np.unique(labels, return_inverse=True)
    offset = 0 if ids[0] == 0 else 1
    return (inverse.reshape(labels.shape) + offset).astype(np.int32)


def resample_labels(labels: np.ndarray, scale: float) -> np.ndarray:
    """Nearest-neighbour resampling of an instance map with PIL (the same geometry `nuclei_split` uses for masks)."""
    from PIL import Image

    if scale == 1:
        return labels.astype(np.int32)
    height, width = labels.shape
    size = (round(width * scale), round(height * scale))
    return np.asarray(Image.fromarray(labels.astype(np.int32), mode="I").resize(size, Image.NEAREST)).astype(np.int32)


def instance_split(scale: float, region: int | None = None, image=None, instances=None,
                   swap_halves: bool = False) -> InstanceSplit:
    """The accuracy table's split of the nuclei image, with `mask2d.tif`'s instance ids (or given arrays). With
    `swap_halves`, the other fold: the image mirrored left-right first, so the models train on the (mirrored) right
    half and are tested on the left one."""
    if image is None or instances is None:
        from hf_vitseg.demo.assets import load_stardist_instances

        image, instances = load_stardist_instances()
    image, instances = np.asarray(image), np.asarray(instances)
    if region is not None:
        top, left = (image.shape[0] - region) // 2, (image.shape[1] - region) // 2
        image = image[top : top + region, left : left + region]
        instances = instances[top : top + region, left : left + region]
    if swap_halves:
        if image.shape[1] % 2:
            raise ValueError(f"--swap-halves needs an even image width to swap the halves exactly; got {image.shape}.")
        image, instances = image[:, ::-1], instances[:, ::-1]
    split = nuclei_split(scale, image=image, mask=instances > 0, region=None)
    half = image.shape[1] // 2
    train, test = (resample_labels(relabel(part), scale) for part in (instances[:, :half], instances[:, half:]))
    if not (np.array_equal(train > 0, split.train_mask > 0) and np.array_equal(test > 0, split.test_mask > 0)):
        raise AssertionError("instance maps and the split's masks disagree; the resampling geometry changed")
    return InstanceSplit(split, train, test)


def mask_targets(instance_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(H, W)` instance ids -> `mask_labels` `(N, H, W)` float in {0, 1} and `class_labels` `(N,)` (all nucleus)."""
    ids = torch.unique(instance_map)
    ids = ids[ids > 0]
    masks = (instance_map[None] == ids[:, None, None]).float()
    return masks, torch.zeros(len(ids), dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------------------


def evaluate(instances: np.ndarray, scores: dict[int, float], truth: np.ndarray) -> dict:
    """PQ / SQ / RQ of the nucleus class and mask AP50 / AP of `instances` (ids > 0, each scored) against `truth`."""
    pq = PanopticQuality(num_labels=2, thing_ids=[NUCLEUS])
    pq.update(*_panoptic(instances), *_panoptic(truth))
    pq_result = pq.compute()
    ap = MaskAP(num_labels=1, max_detections=max(100, len(scores)))
    pred_ids = sorted(scores)
    pred_masks = np.stack([instances == i for i in pred_ids]) if pred_ids else np.zeros((0, *truth.shape), bool)
    truth_ids = [i for i in np.unique(truth) if i > 0]
    ap.update(pred_masks, [scores[i] for i in pred_ids], [0] * len(pred_ids),
              np.stack([truth == i for i in truth_ids]), [0] * len(truth_ids))
    ap_result = ap.compute()
    return {"pq": pq_result["per_class_pq"][NUCLEUS], "sq": pq_result["per_class_sq"][NUCLEUS],
            "rq": pq_result["per_class_rq"][NUCLEUS], "ap50": ap_result["map_50"], "ap": ap_result["map"],
            "num_instances": len(pred_ids), "num_true_instances": len(truth_ids),
            "errors": error_breakdown(instances, truth)}


def error_breakdown(instances: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """Where the nuclei are lost: each true nucleus is `matched` (a segment with IoU > 0.5, PQ's match), `merged`
    (most of it lies in one segment that also holds most of another true nucleus: touching nuclei not split),
    `missed` (less than half of it covered by any segment) or `other` (split in pieces or badly outlined); `false`
    counts the segments matching no nucleus, `false_on_background` those lying mostly on background."""
    instances, truth = np.asarray(instances, np.int64), np.asarray(truth, np.int64)
    columns = int(instances.max(initial=0)) + 1
    overlap = np.bincount((truth * columns + instances).ravel(),
                          minlength=(int(truth.max(initial=0)) + 1) * columns).reshape(-1, columns)
    truth_area, segment_area = overlap.sum(1), overlap.sum(0)
    iou = overlap / np.maximum(truth_area[:, None] + segment_area[None, :] - overlap, 1)
    truth_ids, segment_ids = np.flatnonzero(truth_area[1:]) + 1, np.flatnonzero(segment_area[1:]) + 1
    mostly_in = overlap[:, 1:] > 0.5 * truth_area[:, None]  # (true nucleus, segment): most of the nucleus in it
    counts = {"matched": 0, "merged": 0, "missed": 0, "other": 0}
    for t in truth_ids:
        holder = np.flatnonzero(mostly_in[t])
        if (iou[t, 1:] > 0.5).any():
            counts["matched"] += 1
        elif len(holder) and mostly_in[1:, holder[0]].sum() >= 2:
            counts["merged"] += 1
        elif overlap[t, 1:].sum() < 0.5 * truth_area[t]:
            counts["missed"] += 1
        else:
            counts["other"] += 1
    false = [s for s in segment_ids if not (iou[1:, s] > 0.5).any()]
    counts["false"] = len(false)
    counts["false_on_background"] = sum(int(overlap[0, s] > 0.5 * segment_area[s]) for s in false)
    return counts


def _panoptic(instances: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """An instance map as a panoptic image: background (id 0) a stuff segment, each nucleus a thing."""
    ids = [int(i) for i in np.unique(instances)]
    return instances, [{"id": i, "label_id": BACKGROUND if i == 0 else NUCLEUS} for i in ids]


def connected_components(foreground_probability: np.ndarray, threshold: float = 0.5):
    """8-connected components of `probability > threshold`: `(instance map, {id: mean probability})`."""
    from scipy import ndimage

    labels, count = ndimage.label(foreground_probability > threshold, structure=np.ones((3, 3)))
    means = ndimage.mean(foreground_probability, labels, index=np.arange(1, count + 1)) if count else []
    return labels.astype(np.int32), {i + 1: float(m) for i, m in enumerate(means)}


def watershed_instances(image: np.ndarray, threshold: float, min_distance: int, sigma: float = 0.0,
                        min_area: int = 0):
    """Otsu foreground split by a distance-transform watershed: `(instance map, {id: mean intensity})`.

    The image is smoothed with a Gaussian of `sigma` px first (0: not at all), holes are filled, objects under
    `min_area` px dropped; markers are the distance transform's local maxima at least `min_distance` px apart."""
    try:
        from skimage.feature import peak_local_max
        from skimage.segmentation import watershed
    except ImportError as error:
        raise SystemExit("the watershed row needs scikit-image: pip install scikit-image "
                         "(or pip install 'hf-vitseg[benchmarks]')") from error
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(image, sigma) if sigma > 0 else image
    foreground = ndimage.binary_fill_holes(smooth > threshold)
    components, count = ndimage.label(foreground)
    if min_area > 0 and count:
        areas = np.bincount(components.ravel())
        foreground &= areas[components] >= min_area
        components, count = ndimage.label(foreground)
    distance = ndimage.distance_transform_edt(foreground)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(image.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-distance, markers, mask=foreground).astype(np.int32)
    missed = foreground & (labels == 0)  # components without a marker stay instances of their own
    extra, _ = ndimage.label(missed)
    labels[missed] = extra[missed] + labels.max()
    labels = relabel(labels)
    count = int(labels.max())
    # score: mean intensity (brighter blobs are likelier nuclei), the only confidence a threshold gives
    means = ndimage.mean(image, labels, index=np.arange(1, count + 1)) if count else []
    return labels, {i + 1: float(m) for i, m in enumerate(means)}


def fit_watershed(data: InstanceSplit, scale: float) -> dict:
    """The watershed's settings chosen on the TRAINING half (best PQ there): Otsu threshold of the smoothed
    training half, smoothing `sigma`, `min_distance`; `min_area` a quarter of the smallest training nucleus's
    5th-percentile area. Nothing is read from the test half."""
    from scipy import ndimage

    image, truth = data.split.train_image, data.train_instances
    areas = np.bincount(truth.ravel())[1:]
    min_area = int(np.percentile(areas[areas > 0], 5) / 4)
    best = None
    for sigma in (0.0, 0.5 * scale, 1.0 * scale):
        smooth = ndimage.gaussian_filter(image, sigma) if sigma > 0 else image
        threshold = otsu_threshold(smooth)
        for min_distance in sorted({max(1, round(f * scale)) for f in (2, 3, 4, 5, 6, 8)}):
            instances, scores = watershed_instances(image, threshold, min_distance, sigma, min_area)
            pq = evaluate(instances, scores, truth)["pq"]
            if best is None or pq > best["train_pq"]:
                best = {"threshold": threshold, "sigma": sigma, "min_distance": min_distance, "min_area": min_area,
                        "train_pq": pq}
    return best


# ----------------------------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------------------------


def make_row(name: str, kind: str, runs: list[dict], **extra) -> dict:
    row = {"name": name, "kind": kind, **extra, "runs": runs}
    for key in ("pq", "sq", "rq", "ap50", "ap", "fg_iou", "miou", "whole_pq", "whole_ap50", "train_seconds"):
        values = [r[key] for r in runs if r.get(key) is not None and not np.isnan(r[key])]
        if values:
            row[f"{key}_mean"] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return row


def semantic_rows(args, data: InstanceSplit, backbone, num_layers, patch_size, processor, rows, predictions, log):
    """The semantic heads of the accuracy table, trained exactly as there, then connected components."""
    from hf_vitseg.inference import sliding_window_inference

    split = data.split
    views = accuracy.training_views(split, args.crop, args.tile_stride, args.intensity_views, processor)
    test_pixels = accuracy.encode(split.test_image, processor)
    layers_of = {head: accuracy.head_layers(head, num_layers, "last4") for head in args.semantic_heads}
    union = sorted({layer for layers in layers_of.values() for layer in layers})
    started = time.perf_counter()
    taps = accuracy.backbone_taps(backbone, union, views["pixel_values"])
    windows = accuracy.TestWindows(backbone, union, test_pixels, args.crop)
    log(f"semantic feature cache ({len(views['labels'])} views, layers {union}): {time.perf_counter() - started:.0f}s")
    for head in args.semantic_heads:
        layers, runs = layers_of[head], []
        cache = accuracy.head_cache(taps, layers, views, patch_size)
        for seed in range(args.seeds):
            model, seconds, curve = accuracy.train_frozen(backbone, head, layers, seed, cache, args)
            model.eval()
            with torch.no_grad():
                logits = sliding_window_inference(
                    windows.model_for(model, layers), test_pixels[None], num_labels=2, crop_size=args.crop,
                    stride=accuracy.window_stride(args.crop), batch_size=4, patch_size=patch_size)
            probability = logits.softmax(1)[0, 1].numpy()
            instances, scores = connected_components(probability)
            runs.append({"seed": seed, **evaluate(instances, scores, data.test_instances), "train_seconds": seconds,
                         "loss_curve": curve})
            if seed == 0:
                predictions[f"{split.scale:g}|{head} + components"] = instances
            log(f"{head} + components seed {seed}: PQ {runs[-1]['pq']:.3f} AP50 {runs[-1]['ap50']:.3f} "
                f"({runs[-1]['num_instances']} instances) {seconds:.0f}s")
        rows.append(make_row(f"{head} + connected components", "semantic", runs, layers=layers, steps=args.steps))


def saved_semantic_rows(args, data: InstanceSplit, rows, predictions, log):
    """Connected components of the accuracy table's own saved seed-0 test predictions (`accuracy.py --json`'s
    `.npz`): the very models of that table, no retraining. Only class maps are saved, so each component is scored by
    its area (larger blobs are likelier nuclei) for AP."""
    from scipy import ndimage

    scale = f"{data.split.scale:g}"
    for path in args.semantic_predictions:
        with np.load(path) as saved:
            if f"{scale}|truth" not in saved:
                continue
            if not np.array_equal(saved[f"{scale}|truth"] > 0, data.test_instances > 0):
                raise SystemExit(f"{path}: its {scale}x ground truth is not this split's; was the split changed?")
            for key in saved.files:
                name = key.split("|", 1)[1]
                head = name.split(" ")[0]
                if not key.startswith(f"{scale}|") or head not in args.semantic_heads:
                    continue
                instances, count = ndimage.label(saved[key] == 1, structure=np.ones((3, 3)))
                areas = np.bincount(instances.ravel())[1:]
                scores = {i + 1: float(a) for i, a in enumerate(areas)}
                run = {"seed": 0, **evaluate(instances.astype(np.int32), scores, data.test_instances),
                       "source": f"{path}:{key}"}
                rows.append(make_row(f"{name} + connected components", "semantic", [run], source=str(path)))
                predictions[f"{scale}|{name} + components"] = instances.astype(np.int32)
                log(f"{name} + components (saved prediction): PQ {run['pq']:.3f} AP50 {run['ap50']:.3f} "
                    f"({run['num_instances']} instances)")


def instance_views(data: InstanceSplit, args, processor) -> dict:
    """The accuracy table's training views with instance maps as labels: pixels `(N, 3, c, c)`, ids `(N, c, c)`."""
    from hf_vitseg.demo.run import training_views as demo_views

    tiles = data.train_tiles(args.crop, args.tile_stride)
    pixels, labels = demo_views(tiles, args.intensity_views, lambda image: accuracy.encode(image, processor)[None])
    return {"pixel_values": torch.cat(pixels), "instances": torch.cat(labels)}


def build_mask_model(backbone: str, head: str, seed: int, args):
    from hf_vitseg import ViTSegForUniversalSegmentation

    torch.manual_seed(seed)
    head_kwargs = {"num_queries": args.num_queries, "num_blocks": args.num_blocks,
                   "train_num_points": args.train_num_points}
    return ViTSegForUniversalSegmentation.from_pretrained_backbone(
        backbone, head=head, id2label=NUCLEUS_ID2LABEL, head_kwargs=head_kwargs, freeze_backbone=head == "pmt"
    )


def last_layer_features(backbone: str, num_layers: int, pixel_values: torch.Tensor, patch_size: int):
    """`BackboneFeatures` of the last layer (patch map and prefix tokens) for every view, computed once."""
    from hf_vitseg.modeling.features import BackboneFeatures

    (maps, prefix), = accuracy.backbone_taps(backbone, [num_layers], pixel_values).values()
    return maps, prefix, lambda rows: BackboneFeatures(feature_maps=[maps[rows]], strides=[patch_size],
                                                       prefix_tokens=[prefix[rows]])


def train_mask_model(head: str, backbone: str, seed: int, views: dict, args, features=None):
    """One `eomt` (end to end, LLRD) or `pmt` (frozen, on cached features) run: `(model, seconds, loss curve)`."""
    from hf_vitseg.training import MaskAnnealing

    model = build_mask_model(backbone, head, seed, args)
    if head == "eomt":
        optimizer, scheduler = accuracy.optimizer_for(model, args.lr, args.weight_decay, args.mask_steps,
                                                      backbone_lr=args.backbone_lr, layer_decay=args.layer_decay)
    else:
        optimizer, scheduler = accuracy.optimizer_for(model, args.lr, args.weight_decay, args.mask_steps)
    annealing = MaskAnnealing(model, total_steps=args.mask_steps)
    batches = accuracy.batch_order(len(views["instances"]), args.batch_size, args.mask_steps, seed)
    model.train()
    step = 0

    def step_loss(rows):
        nonlocal step
        annealing.step(step)
        step += 1
        targets = [mask_targets(instance_map) for instance_map in views["instances"][rows]]
        mask_labels, class_labels = [t[0] for t in targets], [t[1] for t in targets]
        if head == "pmt":
            return model.decode(features(rows), mask_labels=mask_labels, class_labels=class_labels).loss
        return model(pixel_values=views["pixel_values"][rows], mask_labels=mask_labels,
                     class_labels=class_labels).loss

    seconds, curve = accuracy.run_steps(step_loss, optimizer, scheduler, batches)
    annealing.finish()
    return model.eval(), seconds, curve


def paste_by_score(masks: np.ndarray, scores: list[float], overlap: float = 0.8):
    """Non-overlapping instances from scored, possibly overlapping `(N, H, W)` masks (the library's
    `hf_vitseg.inference.paste_by_score`, Mask2Former's `overlap_mask_area_threshold` rule). Returns
    `(instance map, {id: score})`, ids from 1."""
    from hf_vitseg.inference import paste_by_score as paste

    segmentation, kept = paste([(0, 0, torch.from_numpy(np.asarray(mask, bool))) for mask in masks], scores,
                               tuple(masks.shape[-2:]), overlap)
    instances = (segmentation + 1).numpy().astype(np.int32)
    return instances, {number: float(scores[index]) for number, index in enumerate(kept, start=1)}


@torch.no_grad()
def detect_instances(model, processor, pixels: torch.Tensor, threshold: float) -> tuple[np.ndarray, list[float]]:
    """One forward pass: `post_process_instance_segmentation`'s scored binary masks `(N, H, W)` and scores."""
    height, width = pixels.shape[-2:]
    divisor = model.size_divisor
    padded = (-(-height // divisor) * divisor, -(-width // divisor) * divisor)
    canvas = torch.zeros(1, 3, *padded)
    canvas[0, :, :height, :width] = pixels
    outputs = model(pixel_values=canvas)
    geometry = {"target_sizes": [(height, width)], "input_sizes": [(height, width)], "padded_size": padded}
    detections = processor.post_process_instance_segmentation(outputs, threshold=threshold, return_binary_maps=True,
                                                              **geometry)[0]
    if not detections["segments_info"]:
        return np.zeros((0, height, width), bool), []
    return detections["segmentation"].bool().numpy(), [float(s["score"]) for s in detections["segments_info"]]


def segment_instances(model, processor, test_pixels: torch.Tensor, threshold: float):
    """The test image in one pass: the scored detections (for AP) and, pasted by score without overlap, the
    instance map (for PQ). (`post_process_panoptic_segmentation` is not used for the map: with one thing class and
    no stuff class, its per-pixel argmax over the kept queries hands every background pixel to some nucleus.)

    Returns `(instance map, {id: score}, instance masks (N, H, W), scores (N,))`."""
    masks, detection_scores = detect_instances(model, processor, test_pixels, threshold)
    instances, scores = paste_by_score(masks, detection_scores)
    return instances, scores, masks, detection_scores


def segment_instances_in_windows(model, processor, test_pixels: torch.Tensor, threshold: float, crop: int):
    """The test half in crop-sized windows, half a crop apart: the size the model was trained at (one pass over
    the whole half asks crop-trained queries for 10x more objects on 10x more tokens). The library's
    `hf_vitseg.inference.sliding_window_instances`: each detection is kept by the one window whose centre is nearest
    its centroid, so every nucleus comes from a window that sees it whole (stardist's tiling rule); then pasted by
    score as in `segment_instances`. Same outputs."""
    from hf_vitseg.inference import sliding_window_instances

    found = sliding_window_instances(model, processor, test_pixels.reshape(1, -1, *test_pixels.shape[-2:]),
                                     crop_size=crop, threshold=threshold, return_binary_maps=True)[0]
    masks = found["segmentation"].numpy()
    detection_scores = [float(info["score"]) for info in found["segments_info"]]
    instances, scores = paste_by_score(masks, detection_scores)
    return instances, scores, masks, detection_scores


def score_instances(instances, scores, masks, detection_scores, data, half: str = "test") -> dict:
    """PQ / SQ / RQ of the panoptic map, mask AP / AP50 of the scored detections, fg IoU and mIoU of the
    foreground, on the test half (or, with `half="train"`, on the training half: how well the model fits the data
    it was trained on)."""
    truth = data.test_instances if half == "test" else data.train_instances
    result = evaluate(instances, scores, truth)
    ap = MaskAP(num_labels=1, max_detections=max(100, len(masks)))
    truth_ids = [i for i in np.unique(truth) if i > 0]
    ap.update(masks, detection_scores, [0] * len(masks), np.stack([truth == i for i in truth_ids]),
              [0] * len(truth_ids))
    ap_result = ap.compute()
    result.update(ap50=ap_result["map_50"], ap=ap_result["map"], num_detections=len(masks))
    # the semantic accuracy table's numbers: foreground = any nucleus segment of the instance map
    fg_iou, miou = foreground_iou((instances > 0).astype(np.uint8), (truth > 0).astype(np.uint8))
    result.update(fg_iou=fg_iou, miou=miou)
    return result


def mask_rows(head, args, data, backbone, num_layers, patch_size, processor, rows, predictions, log):
    views = instance_views(data, args, processor)
    test_pixels = accuracy.encode(data.split.test_image, processor)
    features = None
    if head == "pmt":
        started = time.perf_counter()
        *_, features = last_layer_features(backbone, num_layers, views["pixel_values"], patch_size)
        log(f"pmt feature cache (last layer, {len(views['instances'])} views): {time.perf_counter() - started:.0f}s")
    runs = []
    count = args.seeds if head == "pmt" else args.eomt_seeds
    for seed in range(args.first_seed, args.first_seed + count):
        model, seconds, curve = train_mask_model(head, backbone, seed, views, args, features)
        if args.save_models:
            model.save_pretrained(Path(args.save_models) / f"{head}_{data.split.scale:g}x_seed{seed}")
        # the main numbers: crop-sized windows (the training size); "whole_*": the whole half in one pass
        windowed = segment_instances_in_windows(model, processor, test_pixels, args.score_threshold, args.crop)
        whole = segment_instances(model, processor, test_pixels, args.score_threshold)
        result = score_instances(*windowed, data)
        result.update({f"whole_{key}": value for key, value in score_instances(*whole, data).items()})
        instances = windowed[0]
        runs.append({"seed": seed, **result, "train_seconds": seconds, "loss_curve": curve})
        if seed == args.first_seed:
            predictions[f"{data.split.scale:g}|{head}"] = instances
        log(f"{head} seed {seed}: windows PQ {result['pq']:.3f} AP50 {result['ap50']:.3f} fg IoU "
            f"{result['fg_iou']:.3f} ({result['num_instances']} segments, {result['num_detections']} detections); "
            f"whole half PQ {result['whole_pq']:.3f} AP50 {result['whole_ap50']:.3f}; {seconds:.0f}s loss "
            f"{curve[0]:.3f} -> {curve[-1]:.3f}")
        del model
    label = "eomt (fine-tuned, layer decay)" if head == "eomt" else "pmt (frozen backbone)"
    rows.append(make_row(label, head, runs, steps=args.mask_steps, num_queries=args.num_queries,
                         num_blocks=args.num_blocks, train_num_points=args.train_num_points, lr=args.lr))


# ----------------------------------------------------------------------------------------------------------------
# table, arguments, main
# ----------------------------------------------------------------------------------------------------------------


def format_table(rows: list[dict], scale: float, swap_halves: bool = False) -> str:
    test_half = "left half (--swap-halves)" if swap_halves else "right half"
    lines = [f"**{scale:g}x** (test: {test_half}; mean ± std over seeds)", "",
             "| method | kind | PQ | SQ | RQ | AP50 | AP | train s | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | {row['kind']} | failed: {row['error'][:80]} | | | | | | |")
            continue

        def cell(key, digits=3):
            if f"{key}_mean" not in row:
                return ""
            mean, std = row[f"{key}_mean"], row[f"{key}_std"]
            return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(row["runs"]) > 1 else f"{mean:.{digits}f}"

        lines.append(f"| {row['name']} | {row['kind']} | {cell('pq')} | {cell('sq')} | {cell('rq')} | "
                     f"{cell('ap50')} | {cell('ap')} | {cell('train_seconds', 0)} | {len(row['runs'])} |")
    return "\n".join(lines)


def format_errors_table(rows: list[dict], scale: float, truth: np.ndarray) -> str:
    """Markdown: each row's `error_breakdown` (its first seed's saved test instances, `first_seed_errors`)."""
    lines = [f"**{scale:g}x, where the {len(np.unique(truth)) - 1} true nuclei go** (first seed of each row; merged: "
             "most of the nucleus in a segment holding another; missed: under half covered)", "",
             "| method | matched | merged | missed | other | false segments (on background) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if "first_seed_errors" in row:
            e = row["first_seed_errors"]
            lines.append(f"| {row['name']} | {e['matched']} | {e['merged']} | {e['missed']} | {e['other']} | "
                         f"{e['false']} ({e['false_on_background']}) |")
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets: a mask transformer beats the best semantic head + components on PQ; both beat watershed.
    Each kind is represented by its best row (mean PQ over seeds), e.g. eomt's best training budget."""
    best: dict[str, dict] = {}
    for row in rows:
        if "pq_mean" not in row or row["kind"] not in ("eomt", "pmt", "watershed", "semantic"):
            continue
        if row["kind"] not in best or row["pq_mean"] > best[row["kind"]]["pq_mean"]:
            best[row["kind"]] = row

    def named(kind):
        return f"{best[kind]['name']} {best[kind]['pq_mean']:.3f}"

    out = []
    masks = [kind for kind in ("eomt", "pmt") if kind in best]
    if masks and "semantic" in best:
        top = max(masks, key=lambda kind: best[kind]["pq_mean"])
        out.append({"target": "pmt or eomt beats the best semantic head + components on PQ",
                    "met": best[top]["pq_mean"] > best["semantic"]["pq_mean"],
                    "evidence": f"{named(top)} vs {named('semantic')}"})
    if "watershed" in best:
        for kind in masks:
            out.append({"target": f"{kind} beats the classical baseline on PQ",
                        "met": best[kind]["pq_mean"] > best["watershed"]["pq_mean"],
                        "evidence": f"{named(kind)} vs watershed {best['watershed']['pq_mean']:.3f}"})
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="auto", help="as benchmarks/accuracy.py's --backbone")
    parser.add_argument("--rows", nargs="+", choices=ROW_KINDS, default=list(ROW_KINDS))
    parser.add_argument("--semantic-heads", nargs="+", default=["segformer", "unet"],
                        help="semantic heads followed by connected components (the accuracy table's best)")
    parser.add_argument("--semantic-predictions", nargs="+", default=None,
                        help="accuracy.py .npz files: components of their saved seed-0 test predictions of "
                             "--semantic-heads instead of training those heads again")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eomt-seeds", type=int, default=None, help="seeds of the (costly) eomt row; default --seeds")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="eomt / pmt: the first seed (seeds run in separate processes, then --merge)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="merge the rows of earlier --json results (same method, scale and steps: their seeds "
                             "pooled) into one table with its targets, without training")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of the semantic heads")
    parser.add_argument("--mask-steps", type=int, default=None, help="optimizer steps of eomt / pmt; default --steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr of heads (and of eomt's queries / mask module)")
    parser.add_argument("--backbone-lr", type=float, default=1e-4, help="eomt: lr of the top backbone layer")
    parser.add_argument("--layer-decay", type=float, default=0.75)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--num-queries", type=int, default=100)
    parser.add_argument("--num-blocks", type=int, default=4, help="eomt: last blocks with queries; pmt: new layers")
    parser.add_argument("--train-num-points", type=int, default=12544,
                        help="points sampled per mask by the loss (EoMT's 12544 exceeds a 224 crop's 56x56 mask "
                             "logits; fewer makes each step cheaper)")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="least instance score kept")
    parser.add_argument("--scale", type=float, nargs="+", default=[2.0])
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--tile-stride", type=int, default=None)
    parser.add_argument("--intensity-views", type=float, nargs="+", default=[1.0, 0.6])
    parser.add_argument("--swap-halves", action="store_true",
                        help="the other fold: train on the right half, test on the left (the image mirrored)")
    parser.add_argument("--region", type=int, default=None, help="only the central NxN pixels of the image")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--save-models", default=None, help="folder to save the trained eomt / pmt models in")
    parser.add_argument("--score-saved", nargs="+", default=None, metavar="FOLDER",
                        help="score models saved by --save-models (no training): windows and whole half, --scale")
    parser.add_argument("--threshold-sweep", type=float, nargs="+", default=None, metavar="T",
                        help="with --score-saved: also score the test half's windows at each of these thresholds")
    parser.add_argument("--plot-dir", default=None,
                        help="with --merge: write per scale a PQ bar chart (instances_pq_<scale>x.png) and a grid of "
                             "each row's test instances (instances_<scale>x.png) into this folder")
    parser.add_argument("--plot-window", type=int, default=160,
                        help="with --plot-dir: side of the test window shown, in pixels at 1x (x scale)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 steps, 1 seed, a 96 px region")
    return parser


def score_saved(folders: list[str], scale: float, threshold: float, crop: int,
                sweep: list[float] | None = None, swap_halves: bool = False) -> dict:
    """Score saved eomt / pmt models without training: `{folder: {"windows": ..., "whole": ..., "train_windows":
    ...}}`, the test half in windows and in one pass, and the training half in windows; with `sweep`, also
    `"threshold_sweep": {threshold: ...}`, the test half's windows at each score threshold."""
    from hf_vitseg import ViTSegForUniversalSegmentation

    data = instance_split(scale, swap_halves=swap_halves)
    results = {}
    for folder in folders:
        model = ViTSegForUniversalSegmentation.from_pretrained(folder).eval()
        processor = ViTSegImageProcessor.for_model(model, check_labels=False)
        test_pixels = accuracy.encode(data.split.test_image, processor)
        train_pixels = accuracy.encode(data.split.train_image, processor)
        results[folder] = {
            "windows": score_instances(*segment_instances_in_windows(model, processor, test_pixels, threshold, crop),
                                       data),
            "whole": score_instances(*segment_instances(model, processor, test_pixels, threshold), data),
            # the training half in the same windows: the fit, against which the test half shows the generalisation
            "train_windows": score_instances(
                *segment_instances_in_windows(model, processor, train_pixels, threshold, crop), data, half="train"),
        }
        if sweep:  # the test half's windows at each score threshold, from one pass at the lowest
            _, _, masks, scores = segment_instances_in_windows(model, processor, test_pixels, min(sweep), crop)
            scores = np.asarray(scores, dtype=float)
            results[folder]["threshold_sweep"] = {}
            for value in sweep:
                keep = scores >= value
                kept_scores = scores[keep].tolist()
                results[folder]["threshold_sweep"][f"{value:g}"] = score_instances(
                    *paste_by_score(masks[keep], kept_scores), masks[keep], kept_scores, data)
        for mode, result in results[folder].items():
            if mode == "threshold_sweep":
                print(f"{folder} test windows by score threshold: " + ", ".join(
                    f"{value}: PQ {r['pq']:.3f} AP50 {r['ap50']:.3f}" for value, r in result.items()), flush=True)
                continue
            print(f"{folder} {mode}: PQ {result['pq']:.3f} SQ {result['sq']:.3f} RQ {result['rq']:.3f} AP50 "
                  f"{result['ap50']:.3f} AP {result['ap']:.3f} fg IoU {result['fg_iou']:.3f} mIoU {result['miou']:.3f}",
                  flush=True)
    return results


def prediction_key(row: dict) -> str:
    """The name under which `main` saves a row's (first seed's) test instance map in the `.npz` beside its JSON,
    after `<scale>|`: the kind for watershed / ceiling / eomt / pmt rows, `<head ...> + components` for semantic
    rows."""
    if row["kind"] in ("watershed", "ceiling", "eomt", "pmt"):
        return row["kind"]
    return row["name"].removesuffix(" + connected components") + " + components"


def merged_maps(merged: dict) -> dict[str, dict[str, np.ndarray]]:
    """`{scale: {"truth": map, row name: its first seed's test instance map}}` of `merge_results`' rows, read from
    the `.npz` files beside the merged JSONs (rows whose file or key is missing are left out)."""
    maps: dict[str, dict[str, np.ndarray]] = {}
    for scale, section in merged["scales"].items():
        found = maps.setdefault(scale, {})
        for row in section["rows"]:
            npz = Path(row["prediction"]["npz"])
            if not npz.is_file():
                continue
            with np.load(npz) as saved:
                if row["prediction"]["key"] in saved:
                    found[row["name"]] = saved[row["prediction"]["key"]]
                    truth = saved[f"{scale}|truth"]
                    if "truth" in found and not np.array_equal(found["truth"], truth):
                        raise SystemExit(f"{npz}: its {scale}x ground truth differs from the other files'; were they "
                                         "made from other data (e.g. --region)?")
                    found["truth"] = truth
    return maps


def merge_results(paths: list[str]) -> dict:
    """Rows of several result files as one: runs of the same method (name), scale and steps pooled, one run per
    seed (a seed found twice is an error: the files overlap; a seedless, deterministic row counts once). Returns
    `{"sources", "scales": {scale: {"rows", "targets"}}}`."""
    grouped: dict[tuple, dict] = {}
    halves = set()  # which test half: (--region, --swap-halves) of each file
    for path in paths:
        results = json.loads(Path(path).read_text())
        settings = results.get("settings", {})
        halves.add((settings.get("region"), bool(settings.get("swap_halves"))))
        if len(halves) > 1:
            raise SystemExit(f"{path}: its --region / --swap-halves differ from the other files' "
                             f"({sorted(halves, key=str)}); merge results of the same test half.")
        for scale, section in results["scales"].items():
            for row in section["rows"]:
                if "error" in row:
                    continue
                key = (scale, row["name"], row.get("steps"))
                entry = grouped.setdefault(key, {"row": row, "runs": {}, "sources": {}})
                for run in row["runs"]:
                    seed = run.get("seed")
                    if seed is None and seed in entry["runs"] and entry["runs"][seed].get("pq") == run.get("pq"):
                        continue  # a deterministic row (the watershed) found in several files: one run
                    if seed in entry["runs"]:
                        raise SystemExit(f"{path}: {row['name']} at {scale}x, {row.get('steps')} steps, seed {seed} "
                                         "is in two of the files; merge results of different seeds.")
                    entry["runs"][seed] = run
                    entry["sources"][seed] = path
    scales: dict[str, dict] = {}
    names = [(scale, name) for scale, name, _ in grouped]
    for (scale, name, steps), entry in grouped.items():
        if names.count((scale, name)) > 1 and steps is not None:  # one method at two budgets: two rows
            name = f"{name}, {steps} steps"
        extra = {k: v for k, v in entry["row"].items()
                 if k not in ("name", "kind", "runs") and not k.endswith(("_mean", "_std"))}
        seeds = sorted(entry["runs"], key=lambda s: (s is None, s))
        # the first seed's test instances: in the `.npz` beside the file that ran it (each file saves its first seed's)
        extra["prediction"] = {"npz": str(Path(entry["sources"][seeds[0]]).with_suffix(".npz")),
                               "key": f"{scale}|{prediction_key(entry['row'])}"}
        runs = [entry["runs"][seed] for seed in seeds]
        scales.setdefault(scale, {"rows": []})["rows"].append(make_row(name, entry["row"]["kind"], runs, **extra))
    for section in scales.values():
        section["targets"] = check_targets(section["rows"])
    region, swap_halves = halves.pop() if halves else (None, False)
    return {"sources": list(paths), "region": region, "swap_halves": swap_halves, "scales": scales}


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot_dir and not args.merge:
        parser.error("--plot-dir plots merged results: give the result files with --merge.")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        if args.json and Path(args.json).exists() and not args.overwrite:
            raise SystemExit(f"{args.json} exists; pass --overwrite to replace it or choose another --json.")
        merged = merge_results(args.merge)
        maps = merged_maps(merged)
        for scale, section in merged["scales"].items():
            for row in section["rows"]:
                if row["name"] in maps[scale]:
                    row["first_seed_errors"] = error_breakdown(maps[scale][row["name"]], maps[scale]["truth"])
            print("\n" + format_table(section["rows"], float(scale), merged["swap_halves"]) + "\n")
            for target in section["targets"]:
                print(f"- {'met' if target['met'] else 'MISSED'}: {target['target']} ({target['evidence']})")
            if "truth" in maps[scale]:
                print("\n" + format_errors_table(section["rows"], float(scale), maps[scale]["truth"]))
        if args.json:
            merged["command"] = "python benchmarks/instances.py " + " ".join(argv if argv is not None else sys.argv[1:])
            Path(args.json).write_text(json.dumps(merged, indent=1))
        if args.plot_dir:
            from benchmarks.plots import plot_instance_maps, plot_instance_pq

            out_dir = Path(args.plot_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            for scale, section in merged["scales"].items():
                test_image = instance_split(float(scale), merged["region"],
                                            swap_halves=merged["swap_halves"]).split.test_image
                window = round(args.plot_window * float(scale))
                written = [plot_instance_pq(section["rows"], scale, out_dir / f"instances_pq_{scale}x.png"),
                           plot_instance_maps(section["rows"], scale, maps[scale], test_image,
                                              out_dir / f"instances_{scale}x.png", window)]
                for path in filter(None, written):
                    print(f"wrote {path}")
        return merged
    if args.score_saved:
        if args.json and Path(args.json).exists() and not args.overwrite:
            raise SystemExit(f"{args.json} exists; pass --overwrite to replace it or choose another --json.")
        results = score_saved(args.score_saved, args.scale[0], args.score_threshold, args.crop, args.threshold_sweep,
                              args.swap_halves)
        if args.json:
            Path(args.json).write_text(json.dumps({"command": "python benchmarks/instances.py " + " ".join(
                argv if argv is not None else sys.argv[1:]), "models": results}, indent=1, default=float))
        return results
    if args.json and Path(args.json).exists() and not args.overwrite:
        raise SystemExit(f"{args.json} exists; pass --overwrite to replace it or choose another --json.")
    from transformers import AutoConfig
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    backbone, description = accuracy.resolve_backbone(args.backbone)
    backbone_config = AutoConfig.from_pretrained(backbone)
    patch_size, num_layers = backbone_config.patch_size, backbone_config.num_hidden_layers
    if args.quick:
        accuracy.apply_quick(args, patch_size)
        args.num_queries = min(args.num_queries, 10)
    args.mask_steps = args.mask_steps or args.steps
    args.eomt_seeds = args.eomt_seeds or args.seeds
    for head in args.semantic_heads:
        accuracy.ensure_heads([head])
    print(f"backbone: {description}\nrows: {', '.join(args.rows)}", flush=True)

    predictions: dict[str, np.ndarray] = {}
    results = {"command": "python benchmarks/instances.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "backbone": description, "patch_size": patch_size, "torch_threads": torch.get_num_threads(),
               "settings": {k: v for k, v in vars(args).items() if k not in ("json", "overwrite")}, "scales": {}}

    def save():
        if args.json:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1))
            np.savez_compressed(path.with_suffix(".npz"), **predictions)

    processor = ViTSegImageProcessor(patch_size=patch_size)
    for scale in args.scale:
        log = lambda *a, s=scale: print(f"[{s:g}x {time.strftime('%H:%M:%S')}]", *a, flush=True)  # noqa: E731
        data = instance_split(scale, region=args.region, swap_halves=args.swap_halves)
        predictions[f"{scale:g}|truth"] = data.test_instances
        rows = []
        results["scales"][f"{scale:g}"] = {"split": {**data.split.describe(), "swap_halves": args.swap_halves},
                                           "rows": rows,
                                           "test_instances": int(data.test_instances.max())}
        row_makers = {
            "watershed": lambda: watershed_row(args, data, scale, rows, predictions, log),
            "ceiling": lambda: ceiling_row(data, scale, rows, predictions, log),
            "semantic": lambda: (
                saved_semantic_rows(args, data, rows, predictions, log) if args.semantic_predictions
                else semantic_rows(args, data, backbone, num_layers, patch_size, processor, rows, predictions, log)
            ),
            "pmt": lambda: mask_rows("pmt", args, data, backbone, num_layers, patch_size, processor, rows,
                                     predictions, log),
            "eomt": lambda: mask_rows("eomt", args, data, backbone, num_layers, patch_size, processor, rows,
                                      predictions, log),
        }
        for kind in args.rows:
            try:
                row_makers[kind]()
            except SystemExit:
                raise
            except Exception as error:  # one broken row must not lose the others' results
                log(f"{kind} FAILED: {type(error).__name__}: {error}")
                rows.append({"name": kind, "kind": kind, "runs": [], "error": f"{type(error).__name__}: {error}"})
            save()
        results["scales"][f"{scale:g}"]["targets"] = check_targets(rows)
        print("\n" + format_table(rows, scale, args.swap_halves) + "\n", flush=True)
        for target in results["scales"][f"{scale:g}"]["targets"]:
            print(f"- {'met' if target['met'] else 'MISSED'}: {target['target']} ({target['evidence']})")
        save()
    return results


def ceiling_row(data: InstanceSplit, scale: float, rows: list, predictions: dict, log) -> None:
    """Connected components of the true foreground: a pixel head + components at best (perfect foreground, so only
    nuclei that truly touch merge); with the same on the training half, which shows how many touch there."""
    instances, scores = connected_components((data.test_instances > 0).astype(float))
    train = evaluate(*connected_components((data.train_instances > 0).astype(float)), data.train_instances)
    rows.append(make_row("connected components of the true foreground (pixel heads' ceiling)", "ceiling",
                         [evaluate(instances, scores, data.test_instances)], train_half=train))
    predictions[f"{scale:g}|ceiling"] = instances
    log(f"ceiling: PQ {rows[-1]['pq_mean']:.3f} on the test half ({rows[-1]['runs'][0]['errors']}), {train['pq']:.3f} "
        f"on the training half ({train['errors']})")


def watershed_row(args, data: InstanceSplit, scale: float, rows: list, predictions: dict, log) -> None:
    settings = fit_watershed(data, scale)
    fitted = {k: v for k, v in settings.items() if k != "train_pq"}
    started = time.perf_counter()
    instances, scores = watershed_instances(data.split.test_image, **fitted)
    seconds = time.perf_counter() - started
    rows.append(make_row("Otsu + distance-transform watershed", "watershed",
                         [evaluate(instances, scores, data.test_instances)], fitted_on_train_half=settings,
                         seconds=seconds))
    predictions[f"{scale:g}|watershed"] = instances
    log(f"watershed ({settings}): PQ {rows[-1]['pq_mean']:.3f} AP50 {rows[-1]['ap50_mean']:.3f}")


if __name__ == "__main__":
    main()
