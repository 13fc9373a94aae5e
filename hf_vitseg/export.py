"""ONNX export with dynamic height and width, checked against PyTorch with onnxruntime.

`export_onnx(model, path)` runs `torch.export.export` with symbolic batch, height and width (height and width
multiples of `model.size_divisor`: the patch size, or the coarsest stride for hierarchical backbones), hands the
exported program to `torch.onnx.export` (the dynamo exporter), and then runs the ONNX file with onnxruntime
at the example size and at a second size, comparing with PyTorch. The second run is not a formality: when
model code turns a symbolic size into a Python int, the exporter can bake the example's size into the graph
without complaint, and the file only fails (or silently misaligns) at other sizes.

Calling `torch.export.export` first, rather than giving the model to `torch.onnx.export`, also keeps the ONNX
exporter from falling back to tracing strategies that specialise shapes silently.

Mask-classification models (`ViTSegForUniversalSegmentation`, heads `eomt` and `pmt`) export the same way, in
inference mode with masked attention off (`attn_mask_probs` 0, as after mask annealing; restored afterwards): the
graph has two outputs, `class_queries_logits` `(batch, queries, num_labels + 1)` and `masks_queries_logits`
`(batch, queries, h, w)`, which `ViTSegImageProcessor.post_process_*_segmentation` turn into maps (wrap them in a
`ViTSegUniversalSegmenterOutput`).

A head class may declare `onnx_exportable = False` (or `onnx_dynamic_size = False`) and
`onnx_export_reason = "..."`; `export_onnx` then raises `OnnxExportError` with that reason before trying. Adaptive
pooling to a grid other than 1x1 (UPerNet's pyramid pooling) is found by looking at the modules, and stops a
dynamic export the same way.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn


class OnnxExportError(RuntimeError):
    """The model cannot be exported to ONNX as asked; the message says why and what to try."""


def is_mask_model(model: nn.Module) -> bool:
    """Whether `model` is a mask-classification model (`config.is_mask_transformer`: heads `eomt`, `pmt`)."""
    return bool(getattr(getattr(model, "config", None), "is_mask_transformer", False))


def output_names(model: nn.Module) -> list[str]:
    """The exported graph's outputs: `logits` for a semantic model, the two query logits for a mask model."""
    return ["class_queries_logits", "masks_queries_logits"] if is_mask_model(model) else ["logits"]


class _ExportedOutputs(nn.Module):
    """`pixel_values -> output tensors` (`output_names(model)`): one tensor in, plain tensors out, the graph's
    signature."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.names = output_names(model)

    def forward(self, pixel_values: torch.Tensor):
        outputs = self.model(pixel_values=pixel_values, return_dict=True)
        values = tuple(getattr(outputs, name) for name in self.names)
        return values[0] if len(values) == 1 else values


@contextlib.contextmanager
def plain_attention(model: nn.Module):
    """A mask model's `attn_mask_probs` set to 0 (inference without masked attention, what annealing ends at) for
    the duration, then restored; nothing for other models."""
    probs = getattr(model, "attn_mask_probs", None) if is_mask_model(model) else None
    if probs is None:
        yield model
        return
    saved = probs.detach().clone()
    with torch.no_grad():
        probs.zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            probs.copy_(saved)


def check_exportable(model: nn.Module, dynamic: bool = True) -> None:
    """Raise `OnnxExportError`, with the reason, if the model cannot be exported as asked.

    - the head class declares `onnx_exportable = False` (with `onnx_export_reason`);
    - `dynamic=True` and the head declares `onnx_dynamic_size = False`, or the model holds adaptive pooling to a
      grid other than 1x1: ONNX has no adaptive pooling, and torch.onnx turns it into an `AveragePool` whose
      kernel fits the example size only, so the file would be wrong at every other size.
    """
    head = getattr(model, "head", None)
    head_cls = type(head) if head is not None else type(model)
    name = getattr(head_cls, "head_name", "") or head_cls.__name__
    if not getattr(head_cls, "onnx_exportable", True):
        reason = getattr(head_cls, "onnx_export_reason", "no reason given")
        raise OnnxExportError(f"Head {name!r} cannot be exported to ONNX: {reason}")
    if not dynamic:
        return
    if not getattr(head_cls, "onnx_dynamic_size", True):
        reason = getattr(head_cls, "onnx_export_reason", "no reason given")
        raise OnnxExportError(
            f"Head {name!r} cannot be exported with a dynamic height and width: {reason} Export with dynamic=False "
            "and example_size=(height, width) set to the size you will run."
        )
    adaptive = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            output_size = module.output_size
            sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
            if any(size not in (1, None) for size in sizes):
                adaptive.append(f"{module_name} ({type(module).__name__}({output_size}))")
    if adaptive:
        raise OnnxExportError(
            f"Head {name!r} cannot be exported with a dynamic height and width: {', '.join(adaptive)} pool to a "
            "fixed grid. ONNX has no adaptive pooling; torch.onnx turns it into an AveragePool whose kernel fits "
            "the example size only, so the file would be wrong at every other size. Export with dynamic=False and "
            "example_size=(height, width) set to the size you will run."
        )


def _example_input(model: nn.Module, example_size, batch_size: int) -> torch.Tensor:
    divisor = model.size_divisor
    if example_size is None:
        example_size = (4 * divisor, 6 * divisor)  # non-square, so height and width stay distinct symbols
    height, width = (int(s) for s in example_size)
    if height % divisor or width % divisor:
        raise ValueError(f"example_size {example_size} must be multiples of model.size_divisor ({divisor}).")
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    channels = int(getattr(model.config, "num_channels", 3))  # the model's input channels (1, 4, 13, ...)
    return torch.randn(batch_size, channels, height, width, generator=generator).to(parameter.device, parameter.dtype)


def export_program(model: nn.Module, example_size: tuple[int, int] | None = None, dynamic: bool = True):
    """`torch.export.export` of `pixel_values -> logits` (a mask model: `-> class_queries_logits,
    masks_queries_logits`, masked attention off), with symbolic batch, height and width when `dynamic`.

    Height and width are declared as `model.size_divisor * k` (k >= 1), so the program accepts every multiple of
    it. Raises `OnnxExportError` naming the head and torch.export's reason when it fails.
    """
    check_exportable(model, dynamic)
    model = model.eval()
    # Batch 2 in the example: torch.export specialises dimensions of size 1.
    example = _example_input(model, example_size, batch_size=2 if dynamic else 1)
    dynamic_shapes = None
    if dynamic:
        divisor = model.size_divisor
        max_side = 16384 // divisor
        height = torch.export.Dim("height_patches", min=1, max=max_side)
        width = torch.export.Dim("width_patches", min=1, max=max_side)
        dynamic_shapes = ({0: torch.export.Dim("batch", max=4096), 2: divisor * height, 3: divisor * width},)
    head_name = getattr(getattr(model, "config", None), "head", type(model).__name__)
    try:
        # The settings of torch.onnx's own first capture strategy, without its fallback that quietly specialises
        # the dimensions torch.export could not keep symbolic. backed_size_oblivious: size checks (e.g. "is this
        # dimension 1?") do not pin a symbolic size to the example's value.
        with torch.no_grad(), plain_attention(model), torch.fx.experimental._config.patch(backed_size_oblivious=True):
            return torch.export.export(
                _ExportedOutputs(model), (example,), dynamic_shapes=dynamic_shapes, strict=False,
                prefer_deferred_runtime_asserts_over_guards=True,
            )
    except Exception as error:  # torch.export raises many types; all mean "this model did not export"
        raise OnnxExportError(
            f"torch.export failed for head {head_name!r} ({type(error).__name__}): {str(error)[:2000]}\n"
            "Try dynamic=False (a fixed input size), or see docs/export.md."
        ) from error


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_size: tuple[int, int] | None = None,
    dynamic: bool = True,
    opset_version: int | None = None,
    check: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Export `pixel_values -> logits` of a segmentation model to an ONNX file.

    The graph has one input `pixel_values` `(batch, 3, height, width)` and one output `logits`
    `(batch, num_labels, h', w')` at the head's natural resolution (upsample and argmax them as
    `ViTSegImageProcessor.post_process_semantic_segmentation` does). A mask model's graph has two outputs,
    `class_queries_logits` `(batch, queries, num_labels + 1)` and `masks_queries_logits` `(batch, queries, h, w)`,
    computed with masked attention off (`attn_mask_probs` 0 during the export and the check, restored after).

    Args:
        model: a `ViTSegForSemanticSegmentation` or `ViTSegForUniversalSegmentation` (put in eval mode here).
        path: the `.onnx` file to write.
        example_size: `(height, width)` of the example input, multiples of `model.size_divisor`; default 4 x 6 of
            them.
        dynamic: symbolic batch, height and width (every multiple of `model.size_divisor`); `False` fixes the input to
            batch 1 at `example_size`.
        opset_version: ONNX opset; default the exporter's.
        check: run the file with onnxruntime at the example size and, when `dynamic`, at a second size (one
            patch taller and one narrower), and raise `OnnxExportError` if the logits differ from PyTorch's by
            more than `atol`. Skipped, with a warning, when onnxruntime is not installed.
        atol: tolerance of that check.

    Returns:
        the path written.

    Raises:
        OnnxExportError: the head declares itself not exportable, `torch.export` fails, or the check fails.
    """
    path = Path(path)
    program = export_program(model, example_size, dynamic)
    example = _example_input(model, example_size, batch_size=2 if dynamic else 1)
    kwargs = {} if opset_version is None else {"opset_version": opset_version}
    try:
        onnx_program = torch.onnx.export(
            program, (example,), dynamo=True, input_names=["pixel_values"], output_names=output_names(model),
            verbose=False,
            **kwargs,
        )
    except Exception as error:
        raise OnnxExportError(
            f"torch.onnx.export could not translate head {getattr(model.config, 'head', '?')!r} to ONNX "
            f"({type(error).__name__}): {str(error)[:2000]}"
        ) from error
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path))
    if check:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            import warnings

            warnings.warn("onnxruntime is not installed: the exported file was not checked (pip install onnxruntime).")
            return path
        height, width = example.shape[-2:]
        divisor = model.size_divisor
        sizes = [(height, width)]
        if dynamic:
            sizes.append((height + divisor, max(divisor, width - divisor)))
        errors = compare_with_onnxruntime(model, path, sizes)
        bad = {size: error for size, error in errors.items() if not error <= atol}
        if bad:
            raise OnnxExportError(
                f"The ONNX export of head {getattr(model.config, 'head', '?')!r} does not match PyTorch: max |diff| "
                f"{bad} at input sizes {list(bad)} (tolerance {atol}). The model code probably turns a symbolic size "
                "into a Python int (e.g. int(x.shape[-1])), which bakes the example's size into the graph. Export "
                f"with dynamic=False at the size you need, or see docs/export.md. The file is at {path}."
            )
    return path


def compare_with_onnxruntime(
    model: nn.Module, path: str | os.PathLike, sizes: list[tuple[int, int]], batch_size: int = 2, seed: int = 0
) -> dict[tuple[int, int], float]:
    """Max absolute difference between onnxruntime's and PyTorch's outputs (every output of `output_names`), per
    input size `(height, width)`; a mask model runs PyTorch with masked attention off, as it was exported.

    A size at which onnxruntime fails, or returns another shape, counts as an infinite difference.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    static_batch = session.get_inputs()[0].shape[0]
    if isinstance(static_batch, int):
        batch_size = static_batch
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    errors = {}
    for height, width in sizes:
        pixel_values = torch.randn(batch_size, int(getattr(model.config, "num_channels", 3)), int(height), int(width),
                                   generator=generator)
        with torch.no_grad(), plain_attention(model):
            inputs = pixel_values.to(parameter.device, parameter.dtype)
            outputs = model(pixel_values=inputs, return_dict=True)
            expected = [getattr(outputs, name).float().cpu() for name in output_names(model)]
        try:
            actual = session.run(None, {"pixel_values": inputs.float().cpu().numpy()})
        except Exception:  # onnxruntime's errors: a shape baked into the graph no longer fits
            errors[(int(height), int(width))] = float("inf")
            continue
        error = 0.0
        for got, want in zip(actual, expected):
            got = torch.from_numpy(got)
            error = max(error, (got - want).abs().max().item() if got.shape == want.shape else float("inf"))
        errors[(int(height), int(width))] = error if len(actual) == len(expected) else float("inf")
    return errors
