"""Speed, FLOPs and memory of segmentation heads as ratios to the backbone alone, and the cost of one prediction.

The one implementation behind `hf-vitseg bench` and `benchmarks/heads.py` (and the forward-time column of
`hf-vitseg compare`). The machine these run on is usually shared and noisy, so every time is measured
interleaved with the same measurement of a reference taken in the same process, and the result is a ratio of
medians, never an absolute time:

- `BackboneOnly(model)`: the reference, the same backbone adapter tapping the same layers, without neck or head;
- `forward_ratio(model, pixel_values)`: one head's median forward time over the backbone's alone;
- `measure_head(model, reference, pixel_values)`: a table row (head parameters, GFLOPs, forward and
  training-step ratios);
- `peak_training_memory_mb(builder, spec, input_shape)`: peak resident-memory growth of one training step, in a
  fresh process;
- `prediction_cost(model, processor, image)`: processor, model and post-processing of one image, each a median,
  and the post-processing as a ratio to the model's forward.

Example:

```python
>>> from hf_vitseg.bench import forward_ratio
>>> forward_ratio(model, torch.randn(1, 3, 518, 518), repeats=5)  # e.g. 1.07: the head adds 7% to the backbone
```
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

__all__ = [
    "BackboneOnly",
    "build_model",
    "dinov2_small_config",
    "forward_ratio",
    "gflops",
    "head_parameters_m",
    "measure_head",
    "peak_training_memory_mb",
    "model_from_spec",
    "prediction_cost",
    "random_image",
    "time_forward",
    "time_train_step",
    "write_json",
]


def dinov2_small_config():
    """The config of DINOv2 ViT-S/14 (`facebook/dinov2-small`), built here: no download, random weights."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518)


def build_model(backbone_config, head: str, num_labels: int = 150, seed: int = 0, **config_kwargs):
    """A `ViTSegForSemanticSegmentation` with random weights (speed does not depend on them) on `backbone_config`."""
    from .modeling import ViTSegConfig, ViTSegForSemanticSegmentation

    torch.manual_seed(seed)
    config = ViTSegConfig(backbone_config=backbone_config, head=head, num_labels=num_labels, **config_kwargs)
    return ViTSegForSemanticSegmentation(config)


def model_from_spec(spec: str) -> torch.nn.Module:
    """The model a JSON spec names, for `peak_training_memory_mb`'s subprocess: `{"config": backbone config dict,
    "head": name or null (the backbone alone), "num_labels": n}`."""
    from transformers import AutoConfig

    fields = json.loads(spec)
    config_dict = dict(fields["config"])
    backbone_config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = build_model(backbone_config, fields["head"] or "linear", fields["num_labels"])
    return BackboneOnly(model) if fields["head"] is None else model


def random_image(size: tuple[int, int], channels: int = 3, seed: int = 0):
    """A random uint8 image `(H, W, C)` (`(H, W)` for one channel) for the prediction cost."""
    import numpy as np

    shape = (size[0], size[1]) if channels == 1 else (size[0], size[1], channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_json(path: str | os.PathLike, rows) -> None:
    """Write `rows` as JSON atomically (a temporary file beside it, then a rename)."""
    temporary = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(rows, f, indent=2)
    os.replace(temporary, path)


class BackboneOnly(torch.nn.Module):
    """The reference of every ratio: `model`'s backbone adapter, tapping the same layers, and no neck or head.

    Its output is reduced to one number so that a training step can call `backward` on it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.backbone = model.backbone

    def forward(self, pixel_values, labels=None):
        maps = self.backbone(pixel_values).feature_maps
        return sum(m.float().mean() for m in maps)


def _output_of(model, pixel_values):
    out = model(pixel_values)
    return out.logits if hasattr(out, "logits") else out


def _synchronize(pixel_values: torch.Tensor) -> None:
    if pixel_values.device.type == "cuda":
        torch.cuda.synchronize(pixel_values.device)


def time_forward(model: torch.nn.Module, pixel_values: torch.Tensor) -> float:
    """Seconds of one forward pass in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        _synchronize(pixel_values)
        start = time.perf_counter()
        _output_of(model, pixel_values)
        _synchronize(pixel_values)
        return time.perf_counter() - start


def time_train_step(model: torch.nn.Module, pixel_values: torch.Tensor, optimizer) -> float:
    """Seconds of one training step: forward in train mode, backward of the output's mean, optimizer step."""
    model.train()
    _synchronize(pixel_values)
    start = time.perf_counter()
    out = _output_of(model, pixel_values)
    out.float().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _synchronize(pixel_values)
    return time.perf_counter() - start


def gflops(model: torch.nn.Module, pixel_values: torch.Tensor) -> float:
    """GFLOPs of one forward pass, counted by `torch.utils.flop_counter` (multiply-adds count as two)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _output_of(model, pixel_values)
    return counter.get_total_flops() / 1e9


def head_parameters_m(model: torch.nn.Module) -> float:
    """Millions of parameters outside the backbone (neck, head, auxiliary head): those whose name has no
    `backbone` component."""
    return sum(p.numel() for name, p in model.named_parameters() if "backbone" not in name.split(".")) / 1e6


def _optimizer(model: torch.nn.Module):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def _interleaved_medians(measure_model: Callable[[], float], measure_reference: Callable[[], float],
                         repeats: int) -> tuple[float, float]:
    """One warm-up of each, then `repeats` alternating measurements: drift in the machine's load hits both."""
    measure_model(), measure_reference()
    model_times, reference_times = [], []
    for _ in range(repeats):
        model_times.append(measure_model())
        reference_times.append(measure_reference())
    return statistics.median(model_times), statistics.median(reference_times)


def _check_repeats(repeats: int) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}.")


def forward_ratio(model: torch.nn.Module, pixel_values: torch.Tensor, repeats: int = 5,
                  reference: torch.nn.Module | None = None) -> float:
    """Median forward time of `model` over that of `reference` (default: `BackboneOnly(model)`), interleaved.

    Args:
        model: a `ViTSegForSemanticSegmentation` (or any module whose output has `logits` or is a tensor).
        pixel_values: the input batch, on the model's device.
        repeats: measurements of each after one warm-up; the median is taken.
        reference: what the ratio is to; the model's own backbone alone by default.
    """
    _check_repeats(repeats)
    reference = BackboneOnly(model) if reference is None else reference
    model_s, reference_s = _interleaved_medians(lambda: time_forward(model, pixel_values),
                                                lambda: time_forward(reference, pixel_values), repeats)
    return model_s / reference_s


def measure_head(model: torch.nn.Module, reference: torch.nn.Module, pixel_values: torch.Tensor, repeats: int = 5,
                 reference_optimizer=None, reference_gflops: float | None = None) -> dict:
    """One row of the heads table: head parameters (millions), GFLOPs of model and reference, and the median
    forward and training-step times of `model` as ratios to `reference` (each interleaved with it).

    `model` is trained by the training-step measurements (random inputs: its weights change); pass the same
    `reference_optimizer` for every row so the reference keeps one optimizer state, and its `reference_gflops`
    (`gflops(reference, pixel_values)`) to count them once."""
    _check_repeats(repeats)
    reference_optimizer = reference_optimizer or _optimizer(reference)
    model_flops = gflops(model, pixel_values)
    reference_flops = gflops(reference, pixel_values) if reference_gflops is None else reference_gflops
    forward_s, reference_forward_s = _interleaved_medians(lambda: time_forward(model, pixel_values),
                                                          lambda: time_forward(reference, pixel_values), repeats)
    optimizer = _optimizer(model)
    step_s, reference_step_s = _interleaved_medians(
        lambda: time_train_step(model, pixel_values, optimizer),
        lambda: time_train_step(reference, pixel_values, reference_optimizer), repeats)
    return {
        "head_params_m": round(head_parameters_m(model), 2),
        "gflops": round(model_flops, 1),
        "backbone_gflops": round(reference_flops, 1),
        "forward_ratio": round(forward_s / reference_forward_s, 3),
        "train_step_ratio": round(step_s / reference_step_s, 3),
        "backbone_forward_s": round(reference_forward_s, 3),
    }


_MEMORY_SCRIPT = """
import importlib, os, sys, threading, torch
sys.argv = ['x']
sys.path[:0] = {paths!r}
from hf_vitseg.bench import time_train_step, _optimizer
torch.set_num_threads({threads})
module, _, function = {builder!r}.partition(':')
model = getattr(importlib.import_module(module), function)({spec!r})
x = torch.randn(*{shape!r})
opt = _optimizer(model)
time_train_step(model, x, opt)  # optimizer state and allocator caches exist from here on
page = os.sysconf('SC_PAGE_SIZE')
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * page
peak, running = [rss()], [True]
base = peak[0]
def sample():
    while running[0]:
        peak[0] = max(peak[0], rss())
        threading.Event().wait(0.001)
thread = threading.Thread(target=sample)
thread.start()
time_train_step(model, x, opt)
running[0] = False
thread.join()
print((max(peak[0], rss()) - base) / 2**20)
"""


def peak_training_memory_mb(builder: str, spec: str, input_shape: tuple[int, ...],
                            paths: list[str] | None = None) -> float:
    """Peak resident-memory growth (MiB) during one CPU training step, in a fresh process.

    CPU tensors have no allocator peak counter, and `ru_maxrss` also counts the peak of building the model, so a
    thread samples the process's current RSS (`/proc/self/statm`, Linux) every millisecond while the step runs;
    the result is that peak minus the RSS just before the step (model, optimizer state and one warm-up step
    included).

    Args:
        builder: `"module:function"`, importable in the subprocess, that returns the model for `spec`.
        spec: a string naming the model to `builder` (e.g. a head name, or JSON).
        input_shape: shape of the random `pixel_values`.
        paths: folders put first on the subprocess's `sys.path` (e.g. where `builder`'s module lives).
    """
    if not os.path.exists("/proc/self/statm"):
        raise RuntimeError("peak memory is sampled from /proc/self/statm, which only Linux has.")
    code = _MEMORY_SCRIPT.format(paths=list(paths or []), threads=torch.get_num_threads(), builder=builder,
                                 spec=spec, shape=tuple(input_shape))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the memory subprocess for {spec!r} failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(out.stdout.strip().splitlines()[-1])


def prediction_cost(model: torch.nn.Module, processor, image, repeats: int = 5) -> dict:
    """Median seconds of the three stages of one prediction, as `hf-vitseg predict` and the pipeline run them:
    the processor (image to padded, normalised `pixel_values`), the model's forward, and
    `post_process_semantic_segmentation` back onto the image's own size (`input_boxes` geometry); plus
    post-processing and processor as ratios to the forward, stages interleaved.

    Args:
        model: the model, in eval mode on its device.
        processor: its `ViTSegImageProcessor` (`ViTSegImageProcessor.for_model(model)`).
        image: one image (PIL, NumPy `(H, W[, C])` or what the processor takes).
        repeats: measurements of each stage after one warm-up.
    """
    _check_repeats(repeats)
    device = next(model.parameters()).device
    model.eval()
    height, width = _image_hw(image)

    def stages() -> tuple[float, float, float]:
        start = time.perf_counter()
        inputs = processor(images=image, return_tensors="pt", return_input_sizes=True)
        boxes = inputs.pop("input_boxes")
        inputs.pop("input_sizes", None)
        pixel_values = inputs["pixel_values"].to(device)
        _synchronize(pixel_values)
        processed = time.perf_counter()
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values)
        _synchronize(pixel_values)
        forwarded = time.perf_counter()
        processor.post_process_semantic_segmentation(
            outputs, target_sizes=[(height, width)], input_boxes=boxes, padded_size=pixel_values.shape[-2:])
        _synchronize(pixel_values)
        done = time.perf_counter()
        return processed - start, forwarded - processed, done - forwarded

    stages()  # warm-up
    times = [stages() for _ in range(repeats)]
    processor_s, model_s, post_s = (statistics.median(column) for column in zip(*times))
    return {
        "processor_s": processor_s,
        "model_s": model_s,
        "post_process_s": post_s,
        "processor_ratio": processor_s / model_s,
        "post_process_ratio": post_s / model_s,
    }


def _image_hw(image) -> tuple[int, int]:
    if hasattr(image, "size") and not hasattr(image, "shape"):  # PIL: (width, height)
        return image.size[1], image.size[0]
    return tuple(image.shape[:2])
