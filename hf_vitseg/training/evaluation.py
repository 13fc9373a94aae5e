"""`evaluate_model(...)` is `hf-vitseg evaluate`: the metrics of a saved model on a dataset, with plain or
sliding-window inference; a mask transformer's (head `eomt` / `pmt`) per task: mIoU, mask AP and PQ, or PQ."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.channels import decode_image
from ..modeling import ViTSegImageProcessor
from .loading import is_mask_model, load_trainable_model, resolve_processor, validate
from .metrics import compute_segmentation_metrics
from .universal_metrics import check_task, compute_universal_metrics, encode_mask_targets


@torch.inference_mode()
def evaluate_model(
    model_or_path,
    dataset,
    *,
    processor: ViTSegImageProcessor | None = None,
    batch_size: int = 1,
    sliding_window: bool = False,
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    blend: str = "uniform",
    device: str | torch.device | None = None,
    task: str | None = None,
) -> dict[str, float]:
    """Mean IoU, pixel accuracy, mean accuracy and per-class IoU of a model on a dataset.

    Args:
        model_or_path: a `ViTSegForSemanticSegmentation` or the folder (Hub id) of a saved one.
        dataset: a `datasets.Dataset` with `image` and `annotation` columns; validated first.
        processor: default `ViTSegImageProcessor.for_model(model, folder)`: the one saved with the model, else
            one built for it. Metrics are computed on its output grid (labels resized with nearest neighbour
            when it resizes).
        batch_size: images per forward pass (they are padded to a common size; padding is ignored).
        sliding_window: infer window by window (`hf_vitseg.inference.sliding_window_inference`), as
            DINOv2's linear evaluation does: `crop_size` is then required (the training crop), and
            `stride` defaults to 2/3 of it.
        blend: how overlapping windows are combined, `"uniform"` or `"gaussian"`.
        device: default CUDA when available.
        task: a mask transformer's (`ViTSegForUniversalSegmentation`'s) metrics, as `train`'s `task`:
            `"semantic"` (default), `"instance"` (mask AP, AP50, AP75 and PQ of the instances) or `"panoptic"`
            (PQ, SQ, RQ); its annotations are semantic maps, or instance maps with an `instance_classes` column
            (`hf_vitseg.data.datasets.load_instance_folder`). Whole images, except task `"instance"` with
            `sliding_window`: instances found window by window (`hf_vitseg.inference.sliding_window_instances`,
            `crop_size` the training crop, `stride` default half of it).

    Returns:
        `mean_iou`, `pixel_accuracy`, `mean_accuracy`, `iou_<class>` (NaN for a class absent from both
        predictions and labels) and `num_images`.
    """
    model = load_trainable_model(model_or_path)
    processor = resolve_processor(processor, model, model_or_path)
    config = model.config
    task = check_task(task, is_mask_model(model))
    if is_mask_model(model) and sliding_window and task != "instance":
        raise ValueError(f"sliding_window is for pixel heads, and for a mask transformer's instances "
                         f"(task='instance'): task={task!r} predicts whole images. Drop it.")
    if sliding_window and crop_size is None:
        raise ValueError("sliding_window needs crop_size (the size the model was trained at, e.g. 512).")
    if is_mask_model(model):
        validate(dataset, config, processor, "dataset")
        window = {"crop_size": crop_size, "stride": stride} if sliding_window else None
        return _evaluate_mask_model(model, dataset, processor, task, batch_size, device, window)
    if sliding_window and stride is None:  # 2/3 of the window, a common overlap
        if isinstance(crop_size, int):
            stride = max(1, crop_size * 2 // 3)
        else:
            stride = tuple(max(1, c * 2 // 3) for c in crop_size)
    validate(dataset, config, processor, "dataset")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()

    from ..inference import sliding_window_inference

    metric = compute_segmentation_metrics(config.num_labels, config.ignore_index, config.id2label)
    raw = dataset.with_format(None)
    for start in range(0, len(raw), batch_size):
        rows = raw[start : start + batch_size]
        images = [decode_image(value) for value in rows["image"]]  # undecoded TIFFs ({"path", "bytes"}) too
        inputs = processor(images=images, segmentation_maps=rows["annotation"], return_tensors="pt")
        pixel_values, labels = inputs["pixel_values"].to(device), inputs["labels"].to(device)
        if sliding_window:
            logits = sliding_window_inference(model, pixel_values, config.num_labels, crop_size, stride, blend=blend)
        else:
            logits = model(pixel_values=pixel_values).logits  # upsampled inside the metric, one image at a time
        results = metric((logits, labels), compute_result=start + batch_size >= len(raw))
    return {**results, "num_images": len(raw)}


def _evaluate_mask_model(model, dataset, processor, task: str, batch_size: int, device,
                         window: dict | None = None) -> dict[str, float]:
    """`evaluate_model` for a mask transformer: the processor's targets (`mask_labels` / `class_labels`, from
    semantic maps or instance maps with their classes), the padding of each image in the batch void. With `window`
    (`crop_size`, `stride`; task instance), each image's instances come from `sliding_window_instances`."""
    from ..data.augment import INSTANCE_CLASSES_COLUMN, instance_mapping

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    config = model.config
    metric = compute_universal_metrics(processor, task, config.num_labels, config.id2label)
    raw = dataset.with_format(None)
    for start in range(0, len(raw), batch_size):
        rows = raw[start : start + batch_size]
        images = [decode_image(value) for value in rows["image"]]  # undecoded TIFFs ({"path", "bytes"}) too
        mapping = None
        if INSTANCE_CLASSES_COLUMN in rows:
            mapping = [instance_mapping(value) for value in rows[INSTANCE_CLASSES_COLUMN]]
            mapping = None if all(m is None for m in mapping) else mapping
        inputs = processor(images=images, segmentation_maps=rows["annotation"], instance_id_to_semantic_id=mapping,
                           return_mask_labels=True, return_input_sizes=True, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(device)
        size = tuple(pixel_values.shape[-2:])
        targets = encode_mask_targets(inputs["mask_labels"], inputs["class_labels"],
                                      _padding(inputs["input_boxes"], size), size=size)
        if window is None:
            metric.update(model(pixel_values=pixel_values), *targets)
            continue
        from ..inference.sliding_window import sliding_window_instances

        results = sliding_window_instances(model, processor, pixel_values, window["crop_size"], window["stride"],
                                           input_boxes=inputs["input_boxes"], **metric.post_kwargs)
        for result, (top, left, height, width) in zip(results, torch.as_tensor(inputs["input_boxes"]).tolist()):
            canvas = torch.full(size, -1.0)  # the padding around the image's box: no instance (and void)
            canvas[top : top + height, left : left + width] = result["segmentation"]
            result["segmentation"] = canvas
        metric.update_results(results, *targets)
    return {**metric.compute(), "num_images": len(raw)}


def _padding(input_boxes, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool: True outside each image's box `(top, left, height, width)` in the padded batch."""
    void = torch.ones((len(input_boxes), *size), dtype=torch.bool)
    for index, (top, left, height, width) in enumerate(torch.as_tensor(input_boxes).tolist()):
        void[index, max(top, 0) : max(top + height, 0), max(left, 0) : max(left + width, 0)] = False
    return void
