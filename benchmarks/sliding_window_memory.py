"""Peak CPU memory of sliding-window inference on a large image against a single window.

Each measurement runs in a fresh subprocess, which builds the model, warms it up on a tiny input,
creates the image, records `ru_maxrss` as its baseline, runs `sliding_window_inference` and records
`ru_maxrss` again: the difference is the peak memory the inference added (torch allocates outside
Python's allocator, so `tracemalloc` would see none of it). The model is a random-weight DINOv2
with ViT-S/14's width (hidden 384, 6 heads, MLP 1536) and a 1x1 convolution head; in inference
mode a layer's activations are freed before the next layer runs, so the peak does not depend on
the depth, which is kept small (`--layers`) to keep the 4096 x 4096 case quick.

The accumulated logits `(num_labels, H, W)` float32 are the function's output and grow with the
image by necessity, so the table also shows the working memory: the peak minus that output. The
goal is a working-memory ratio below 2x between the large image and a single window. Most of
what the large image adds beyond a window is glibc's heap, not live tensors: once a window's
upsampled logits (an mmap-sized block) are freed, glibc raises its mmap threshold and serves later
blocks from a heap that fragments. `MALLOC_MMAP_THRESHOLD_=131072` (inherited by the subprocesses)
pins the threshold and shows the tensors' own footprint.

    python benchmarks/sliding_window_memory.py            # median of 3 runs per case
    python benchmarks/sliding_window_memory.py --runs 1 --size 2048
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/sliding_window_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CROP, STRIDE, PATCH = 518, 345, 14


def build_model(num_labels: int, num_layers: int):
    import torch
    from transformers import Dinov2Config, Dinov2Model
    from transformers.modeling_outputs import SemanticSegmenterOutput

    class Dinov2LinearSegmenter(torch.nn.Module):
        """DINOv2 patch tokens -> (B, D, H/14, W/14) feature map -> 1x1 conv logits at H/14."""

        def __init__(self):
            super().__init__()
            config = Dinov2Config(
                hidden_size=384, num_hidden_layers=num_layers, num_attention_heads=6, intermediate_size=1536,
                patch_size=PATCH, image_size=CROP,
            )  # fmt: skip
            self.backbone = Dinov2Model(config)
            self.classifier = torch.nn.Conv2d(config.hidden_size, num_labels, kernel_size=1)

        def forward(self, pixel_values):
            grid_h, grid_w = pixel_values.shape[-2] // PATCH, pixel_values.shape[-1] // PATCH
            patch_tokens = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 1:]  # (B, N, D)
            feature_map = patch_tokens.transpose(1, 2).reshape(len(pixel_values), -1, grid_h, grid_w)
            return SemanticSegmenterOutput(logits=self.classifier(feature_map))

    torch.manual_seed(0)
    return Dinov2LinearSegmenter().eval()


def measure(size: int, num_labels: int, num_layers: int, blend: str) -> dict:
    """One measurement, in this (fresh) process."""
    import resource
    import time

    import torch

    from hf_vitseg.inference import sliding_window_inference

    def max_rss_bytes() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux

    model = build_model(num_labels, num_layers)
    with torch.inference_mode():  # thread pools and kernels initialised on a 2 x 2-patch input
        model(pixel_values=torch.zeros(1, 3, 2 * PATCH, 2 * PATCH))
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    baseline = max_rss_bytes()
    start = time.perf_counter()
    logits = sliding_window_inference(
        model, pixel_values, crop_size=CROP, stride=STRIDE, blend=blend, patch_size=PATCH
    )
    seconds = time.perf_counter() - start
    return {
        "peak_above_baseline": max_rss_bytes() - baseline,
        "output": logits.numel() * logits.element_size(),
        "input": pixel_values.numel() * pixel_values.element_size(),
        "seconds": seconds,
    }


def run_in_subprocess(size: int, args: argparse.Namespace) -> dict:
    repo_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")]))}
    command = [
        sys.executable, __file__, "--worker", str(size), "--num-labels", str(args.num_labels),
        "--layers", str(args.layers), "--blend", args.blend,
    ]  # fmt: skip
    completed = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="side of the large square image")
    parser.add_argument("--single", type=int, default=CROP,
                        help="side of the single-window image (one 518 window: 512 rounded up to patch 14)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--num-labels", type=int, default=19)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--blend", choices=["uniform", "gaussian"], default="gaussian")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        print(json.dumps(measure(args.worker, args.num_labels, args.layers, args.blend)))
        return

    mib = 1 / 2**20
    print(
        f"sliding_window_inference, window {CROP}, stride {STRIDE}, blend {args.blend}, {args.num_labels} labels, "
        f"DINOv2 hidden 384 / 6 heads / {args.layers} layers + 1x1 conv, CPU; median of {args.runs} fresh processes"
    )
    header = (f"{'image':>11} | {'windows':>7} | {'peak (MiB)':>10} | {'output (MiB)':>12} | {'working (MiB)':>13} "
              f"| {'time (s)':>8}")
    print(header)
    print("-" * len(header))
    working = {}
    peak = {}
    for size in (args.single, args.size):
        runs = [run_in_subprocess(size, args) for _ in range(args.runs)]
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        windows = (max(size - CROP + STRIDE - 1, 0) // STRIDE + 1) ** 2
        peak[size] = median["peak_above_baseline"] * mib
        working[size] = (median["peak_above_baseline"] - median["output"]) * mib
        print(
            f"{f'{size}x{size}':>11} | {windows:>7} | {peak[size]:>10.1f} | {median['output'] * mib:>12.1f} | "
            f"{working[size]:>13.1f} | {median['seconds']:>8.2f}"
        )
    print(f"peak ratio (large / single window):            {peak[args.size] / peak[args.single]:.2f}x")
    ratio = working[args.size] / working[args.single]
    print(f"working-memory ratio (peak minus the output):   {ratio:.2f}x  (goal < 2x)")


if __name__ == "__main__":
    main()
