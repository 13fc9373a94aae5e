"""Post-processing time as a share of the model's forward, before and after exact class pruning.

    python benchmarks/postprocess.py                        # 150 classes, 518x518, 1 thread, median of 5
    python benchmarks/postprocess.py --classes 150 --size 518 --repeats 7 --json post.json

`ViTSegImageProcessor.post_process_semantic_segmentation` returns label maps only; since issue 12 it computes only
the classes that can win each pixel (`_labels_of_resampled`: resampling is separable; after the cheap column pass,
each band of output rows mixes two numbers per class, so a class whose larger number is below another class's smaller
one cannot win there), in the full resampling's own float32 arithmetic, and gives the same maps bit for bit
(tests/test_postprocess_speedup.py). "Before" is the full resampling, which every call with
`return_segmentation_scores=True` still runs (resample all classes everywhere, then argmax): `reference_labels`.

Rows, each timed interleaved with the forward pass of the `linear` model (DINOv2-S/14 sized, random weights, the
`hf-vitseg bench` default) on one 518x518 image, one CPU thread, medians; ratio = post-processing / forward.
Columns: `first` (the first release's code, `first_release_labels`), `full` (today's full resampling), `after`
(the pruned label maps); speed-up = first / after; "same maps": after == full bit for bit (with `target_sizes`
also == first; through `input_boxes` first differs from full by float rounding only, in ties).

- `scene`: logits shaped like a trained model's on a scene (`scene_logits`: `--present` classes own smooth regions
  of the 37x37 patch grid, the other classes score lower, plus noise). What a trained model gives, and what
  pruning is for.
- `untrained`: the random-weight model's own logits: every class near every other everywhere (the `hf-vitseg bench`
  case): about 17 of 150 classes can still win each band of rows and column, so about a ninth of the values are
  computed.

Both geometries: `target_sizes` alone (`F.interpolate`'s arithmetic, recognised once per geometry) and the
processor's `input_boxes` (the pipeline's and `hf-vitseg predict`'s: `_resample_box`'s explicit arithmetic).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from hf_vitseg.bench import build_model, dinov2_small_config, write_json
from hf_vitseg.modeling import ViTSegImageProcessor


def reference_labels(processor: ViTSegImageProcessor, logits, **geometry) -> list[torch.Tensor]:
    """The label maps of the full resampling: every class resampled everywhere, then the argmax (what
    `return_segmentation_scores=True` computes)."""
    return [out["segmentation"] for out in
            processor.post_process_semantic_segmentation(logits, return_segmentation_scores=True, **geometry)]


def first_release_labels(logits, target_sizes, input_boxes=None, padded_size=None) -> list[torch.Tensor]:
    """What post-processing ran before issue 12, written out: `F.interpolate` of every class (`target_sizes` alone)
    or `grid_sample` at each pixel's source position (`input_boxes`), then the argmax. The "before" of the
    issue's ratio; `_resample_box` now does the second with explicit separable arithmetic (same geometry)."""
    from hf_vitseg.modeling.image_processing_vitseg import _box_source_indices

    maps = []
    for index, target in enumerate(target_sizes):
        item = logits[index : index + 1]
        if input_boxes is None:
            maps.append(F.interpolate(item, size=tuple(target), mode="bilinear", align_corners=False)[0].argmax(0))
            continue
        rows, cols = _box_source_indices(item, input_boxes[index], padded_size, tuple(target))
        ys = ((2.0 * rows + 1.0) / item.shape[-2] - 1.0).float()
        xs = ((2.0 * cols + 1.0) / item.shape[-1] - 1.0).float()
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
        resampled = F.grid_sample(item, grid, mode="bilinear", padding_mode="border", align_corners=False)
        maps.append(resampled[0].argmax(0))
    return maps


def scene_logits(num_classes: int = 150, grid: tuple[int, int] = (37, 37), present: int = 12, seed: int = 0,
                 scale: float = 6.0, noise: float = 0.5) -> torch.Tensor:
    """`(1, num_classes, h, w)` logits shaped like a trained model's on a scene: `present` classes (chosen at
    random) have smooth random fields (bicubic from a grid 6x coarser), whose argmax makes regions; the other
    classes have fields lowered by `3 * scale`; then Gaussian noise of `noise` everywhere."""
    generator = torch.Generator().manual_seed(seed)
    h, w = grid
    coarse = torch.randn(1, num_classes, h // 6 + 2, w // 6 + 2, generator=generator)
    fields = F.interpolate(coarse, size=grid, mode="bicubic", align_corners=False)
    fields = fields / fields.std() * scale
    absent = torch.ones(num_classes, dtype=torch.bool)
    absent[torch.randperm(num_classes, generator=generator)[:present]] = False
    fields[:, absent] -= 3 * scale
    return fields + noise * torch.randn(fields.shape, generator=generator)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--present", type=int, default=12, help="classes present in the scene rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = build_model(dinov2_small_config(), "linear", args.classes).eval()
    processor = ViTSegImageProcessor.for_model(model, check_labels=False)
    pixel_values = torch.randn(1, 3, args.size, args.size)
    with torch.no_grad():
        untrained = model(pixel_values).logits
    size = (args.size, args.size)
    geometries = {
        "target_sizes": {"target_sizes": [size]},
        "input_boxes": {"target_sizes": [size], "input_boxes": [(0, 0, *size)], "padded_size": size},
    }
    cases = {"scene": scene_logits(args.classes, tuple(untrained.shape[-2:]), args.present), "untrained": untrained}

    def forward():
        with torch.no_grad():
            model(pixel_values)

    rows = []
    print(f"post-processing / linear model forward, {args.classes} classes, {args.size}x{args.size}, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(f"{'logits':<11}{'geometry':<14}{'first':>8}{'full':>8}{'after':>8}{'speed-up':>10}  same maps")
    for case, logits in cases.items():
        for geometry, kwargs in geometries.items():
            stages = {
                "forward": forward,
                "first": lambda: first_release_labels(logits, **kwargs),
                "before": lambda: reference_labels(processor, logits, **kwargs),
                "after": lambda: processor.post_process_semantic_segmentation(logits, **kwargs),
            }
            times = {name: [] for name in stages}
            for name, run in stages.items():  # warm-up
                run()
            for _ in range(args.repeats):  # interleaved: the machine's load hits all three alike
                for name, run in stages.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
            median = {name: statistics.median(values) for name, values in times.items()}
            same = all(torch.equal(a, b) for a, b in zip(stages["after"](), stages["before"]()))
            row = {
                "logits": case,
                "geometry": geometry,
                "first_release_ratio": round(median["first"] / median["forward"], 3),
                "before_ratio": round(median["before"] / median["forward"], 3),
                "after_ratio": round(median["after"] / median["forward"], 3),
                "speed_up": round(median["first"] / median["after"], 1),
                "same_maps": same,
                "forward_s": round(median["forward"], 3),
            }
            rows.append(row)
            print(f"{case:<11}{geometry:<14}{row['first_release_ratio']:>8}{row['before_ratio']:>8}"
                  f"{row['after_ratio']:>8}{row['speed_up']:>9}x"
                  f"  {same}", flush=True)
    if args.json:
        write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
