"""Frozen-backbone feature cache: run the backbone once, train the head on stored features every epoch after.

With a frozen backbone (in eval mode, so deterministic) and no random augmentation, every epoch feeds the
head the very same backbone features; computing them again is wasted work, usually nearly all of the work
(a ViT-S/14 forward at 518x518 is ~45 G multiply-adds per image, a linear head's ~1 M). `FeatureCache.build` runs the
backbone over a dataset once and keeps what the backbone adapter hands to the neck and head
(`BackboneFeatures`: one map per tap, the prefix tokens, and the image only for heads that read it);
`CachedBackboneModel` runs the rest of the model on those features: `model.decode` (neck, head, auxiliary
head, loss), the same code `model.forward` runs after the backbone.

```python
model = ViTSegForSemanticSegmentation.from_pretrained_backbone(path, head="linear", num_labels=2,
                                                              freeze_backbone=True)
cache = FeatureCache.build(model, train_dataset, batch_size=16, dtype=torch.float16)
# a plain loop
train_head_on_cache(model, cache, epochs=50, optimizer=torch.optim.AdamW(model.head.parameters(), 1e-3))
# or transformers.Trainer
trainer = Trainer(model=CachedBackboneModel(model), args=args, train_dataset=cache,
                  data_collator=FeatureCache.collate)
model.save_pretrained("out")  # the head trained in place: a normal checkpoint
```

Augmentation: the cache holds one fixed view per sample and view function (`views=[None, hflip_view]`
caches each image and its mirror). Random augmentation applied by the dataset is frozen at build time:
the same random crop every epoch. Use the cache where fixed views are acceptable (quick linear probes,
small datasets, head and hyper-parameter searches); the published linear-probe protocols augment at random
and recompute features every step.

Memory: per sample, `sum over taps of C * h * w` values, plus `P * C` per tap for `P` prefix tokens, plus
`3 * H * W` when the head reads the image (`unet`'s stem), at 4 bytes (float32) or 2 (float16/bfloat16),
plus 1 byte per label pixel. DINOv2 ViT-S/14 at 518x518, one tap: 37 * 37 * 384 * 2 B = 1.05 MB per
sample in float16 (4 taps: 4.2 MB; plus 1.6 MB with the image); 10k images, one tap: 10.5 GB. The cache
lives in CPU memory by default (`storage_device`) and batches move to the model's device as they are used.
`FeatureCache.nbytes` and `bytes_per_sample` report the exact figure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..modeling import BackboneFeatures
from ..unwrap import is_peft_model

__all__ = ["CachedBackboneModel", "FeatureCache", "hflip_view", "train_head_on_cache"]

View = Callable[[torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor | None]"]


def hflip_view(pixel_values: torch.Tensor, labels: torch.Tensor | None):
    """The mirrored image and labels: a fixed view for `FeatureCache.build(views=[None, hflip_view])`."""
    return pixel_values.flip(-1), None if labels is None else labels.flip(-1)


def _backbone_signature(model: nn.Module) -> dict:
    """What a cache's features depend on: recorded at build time, compared by `check_compatible`."""
    config = model.config
    return {
        "backbone_model_type": config.backbone_config.model_type,
        "backbone_out_indices": list(config.backbone_out_indices),
        "backbone_apply_layernorm": bool(config.backbone_apply_layernorm),
        "out_channels": list(model.backbone.out_channels),
        "num_prefix_tokens": int(model.backbone.num_prefix_tokens),
    }


def _cacheable_model(model: nn.Module) -> nn.Module:
    """`model` itself, refused when PEFT wraps it: unlike `unwrap_model`, a feature cache must not look inside,
    because adapters train the backbone whose features it would keep."""
    if is_peft_model(model):
        raise ValueError("A feature cache needs a frozen backbone; this model carries PEFT adapters that train it.")
    if not (hasattr(model, "backbone") and hasattr(model, "head") and hasattr(model.backbone, "out_channels")):
        raise TypeError(f"Expected a ViTSegForSemanticSegmentation, got {type(model).__name__}.")
    return model


def _check_frozen(model: nn.Module) -> None:
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"A feature cache needs a frozen backbone, but {len(trainable)} backbone parameters train "
            f"(e.g. {trainable[0]}). Call model.freeze_backbone() or build the model with freeze_backbone=True."
        )


def _smallest_label_dtype(labels: torch.Tensor) -> torch.dtype:
    low, high = int(labels.min()), int(labels.max())
    for dtype in (torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return torch.int64


class FeatureCache(Dataset):
    """Backbone features of a dataset, computed once: a `torch.utils.data.Dataset` of dicts.

    Each item: `feature_maps` (a list, one `(C_i, h_i, w_i)` tensor per tap), `prefix_tokens` (a list of
    `(P, C_i)`, ViT families only), `pixel_values` (`(3, H, W)`, only when the head reads the image) and
    `labels` (`(H, W)` int64, when the dataset has labels). `FeatureCache.collate` batches them and
    `CachedBackboneModel` takes the batches. Build with `FeatureCache.build`.

    Attributes:
        feature_maps / prefix_tokens / pixel_values / labels: the stored tensors, samples first.
        strides: the stride of each tapped map.
        meta: the backbone settings the features came from (checked against a model before use).
    """

    def __init__(
        self,
        feature_maps: list[torch.Tensor],
        strides: list[int],
        prefix_tokens: list[torch.Tensor] | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        meta: dict | None = None,
    ):
        if not feature_maps:
            raise ValueError("A feature cache needs at least one feature map.")
        self.feature_maps = list(feature_maps)
        self.strides = list(strides)
        self.prefix_tokens = list(prefix_tokens) if prefix_tokens else None
        self.pixel_values = pixel_values
        self.labels = labels
        self.meta = dict(meta or {})
        counts = [t.shape[0] for t in self._tensors()]
        if len(set(counts)) > 1:
            raise ValueError(f"Every cached tensor must hold the same number of samples, got {counts}.")

    def _tensors(self) -> list[torch.Tensor]:
        extra = [t for t in (self.pixel_values, self.labels) if t is not None]
        return self.feature_maps + (self.prefix_tokens or []) + extra

    # -- building ---------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        data,
        batch_size: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        keep_pixel_values: bool | str = "auto",
        views: Sequence[View | None] | None = None,
        collate_fn: Callable | None = None,
        num_workers: int = 0,
        storage_device: torch.device | str = "cpu",
    ) -> FeatureCache:
        """Run the frozen backbone of `model` over `data` once and store its features.

        Args:
            model: a `ViTSegForSemanticSegmentation` whose backbone is frozen (no parameter with
                `requires_grad`). The backbone runs in eval mode, as it does during frozen training.
            data: a `DataLoader`, or a dataset (a `datasets.Dataset` with a transform, any map-style torch
                dataset) of dicts with `pixel_values` `(3, H, W)` and optionally `labels` `(H, W)`; every
                sample must have the same size (crop or pad to a fixed size).
            batch_size, collate_fn, num_workers: for the `DataLoader` made around a dataset (the order is
                kept: no shuffling).
            device: where the backbone runs; default the model's device.
            dtype: storage dtype of features and images: `torch.float32` (exact), `torch.float16` or
                `torch.bfloat16` (half the memory).
            keep_pixel_values: store the images too: `True`, `False`, or `"auto"`: exactly when the head
                declares that it reads them (`model.head.uses_pixel_values`: `unet`'s image stem).
            views: fixed views of every batch, each a function `(pixel_values, labels) -> (pixel_values,
                labels)` or `None` for the batch as is (e.g. `[None, hflip_view]`). The cache holds
                `len(views)` entries per sample: per loader batch, its samples in view 0, then in view 1, ...
            storage_device: where the cache lives (CPU memory by default).
        """
        model = _cacheable_model(model)
        _check_frozen(model)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
        if keep_pixel_values not in (True, False, "auto"):
            raise ValueError(f"keep_pixel_values must be True, False or 'auto', got {keep_pixel_values!r}.")
        views = list(views) if views else [None]
        if keep_pixel_values == "auto":
            keep_pixel_values = model.head.uses_pixel_values
        device = torch.device(device) if device is not None else next(model.parameters()).device
        loader = data if isinstance(data, DataLoader) else DataLoader(
            data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=num_workers
        )
        was_training = model.training
        model.eval()  # the backbone as in frozen training; nothing else trains here
        maps, prefixes, images, labels = [], [], [], []
        first_shapes = has_labels = None
        try:
            for batch in loader:
                if not isinstance(batch, Mapping) or "pixel_values" not in batch:
                    got = f"keys {list(batch)}" if isinstance(batch, Mapping) else type(batch).__name__
                    raise ValueError(
                        f"Each batch must be a dict with 'pixel_values' (and optionally 'labels'), got {got}."
                    )
                pixel_values = batch["pixel_values"].to(device)
                batch_labels = batch.get("labels")
                if has_labels is None:
                    has_labels = batch_labels is not None
                elif has_labels != (batch_labels is not None):
                    raise ValueError("Some batches have 'labels' and others do not.")
                label_shape = None if batch_labels is None else tuple(batch_labels.shape[1:])
                shapes = (tuple(pixel_values.shape[1:]), label_shape)
                if first_shapes is None:
                    first_shapes = shapes
                elif shapes != first_shapes:
                    raise ValueError(
                        f"Every sample must have the same size to be cached, got {first_shapes[0]} and then "
                        f"{shapes[0]} (labels {first_shapes[1]} / {shapes[1]}). Crop or pad to a fixed size "
                        "first (e.g. ViTSegImageProcessor with pad_to_size)."
                    )
                for view in views:
                    view_pixels, view_labels = (
                        view(pixel_values, batch_labels) if view else (pixel_values, batch_labels)
                    )
                    features = model.backbone(view_pixels)
                    maps.append([m.to(storage_device, dtype) for m in features.feature_maps])
                    if features.prefix_tokens is not None:
                        prefixes.append([t.to(storage_device, dtype) for t in features.prefix_tokens])
                    if keep_pixel_values:
                        images.append(view_pixels.to(storage_device, dtype))
                    if view_labels is not None:
                        labels.append(view_labels.to(storage_device))
        finally:
            model.train(was_training)
        if not maps:
            raise ValueError("The dataset is empty: nothing to cache.")

        feature_maps = [torch.cat(taps) for taps in zip(*maps)]
        del maps
        prefix_tokens = [torch.cat(taps) for taps in zip(*prefixes)] if prefixes else None
        label_tensor = None
        if labels:
            label_tensor = torch.cat(labels)
            label_tensor = label_tensor.to(_smallest_label_dtype(label_tensor))
        meta = {**_backbone_signature(model), "num_views": len(views)}
        return cls(
            feature_maps, list(model.backbone.out_strides), prefix_tokens,
            torch.cat(images) if images else None, label_tensor, meta,
        )

    # -- using ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.feature_maps[0].shape[0]

    def __getitem__(self, index: int) -> dict:
        item = {"feature_maps": [m[index] for m in self.feature_maps]}
        if self.prefix_tokens is not None:
            item["prefix_tokens"] = [t[index] for t in self.prefix_tokens]
        if self.pixel_values is not None:
            item["pixel_values"] = self.pixel_values[index]
        if self.labels is not None:
            item["labels"] = self.labels[index].long()
        return item

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        """Stack items of a `FeatureCache` into a batch for `CachedBackboneModel` (a `data_collator`)."""
        batch = {}
        for key, value in samples[0].items():
            if isinstance(value, list):
                batch[key] = [torch.stack([s[key][i] for s in samples]) for i in range(len(value))]
            else:
                batch[key] = torch.stack([s[key] for s in samples])
        return batch

    def batch(self, indices: torch.Tensor | Sequence[int], device: torch.device | str | None = None) -> dict:
        """The samples at `indices` as one batch (what `collate` makes of them, without per-item work)."""
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.feature_maps[0].device)
        device = device if device is not None else self.feature_maps[0].device

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, indices).to(device, non_blocking=True)

        batch = {"feature_maps": [take(m) for m in self.feature_maps]}
        if self.prefix_tokens is not None:
            batch["prefix_tokens"] = [take(t) for t in self.prefix_tokens]
        if self.pixel_values is not None:
            batch["pixel_values"] = take(self.pixel_values)
        if self.labels is not None:
            batch["labels"] = take(self.labels).long()
        return batch

    def iter_batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ) -> Iterator[dict]:
        """Batches over the whole cache: in order, or in `torch.randperm(len(self), generator=generator)` order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        stop = len(self) - len(self) % batch_size if drop_last else len(self)
        for start in range(0, stop, batch_size):
            yield self.batch(order[start : start + batch_size], device=device)

    @property
    def bytes_per_sample(self) -> int:
        """Bytes the cache holds per entry (one sample in one view)."""
        return self.nbytes // max(len(self), 1)

    @property
    def nbytes(self) -> int:
        """Total bytes of the stored tensors."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def check_compatible(self, model: nn.Module) -> None:
        """Raise if these features cannot have come from `model`'s backbone configuration."""
        expected = _backbone_signature(_cacheable_model(model))
        wrong = {k: (self.meta.get(k), v) for k, v in expected.items() if k in self.meta and self.meta[k] != v}
        channels = [m.shape[1] for m in self.feature_maps]
        if channels != expected["out_channels"]:
            wrong["feature map channels"] = (channels, expected["out_channels"])
        if wrong:
            details = "; ".join(f"{k}: cache {a}, model {b}" for k, (a, b) in wrong.items())
            raise ValueError(
                f"This feature cache was built with another backbone configuration ({details}). Rebuild it."
            )

    # -- persistence ------------------------------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the cache to one safetensors file (feature tensors, labels, and the metadata as JSON)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        tensors = {f"feature_maps.{i}": m.contiguous() for i, m in enumerate(self.feature_maps)}
        tensors.update({f"prefix_tokens.{i}": t.contiguous() for i, t in enumerate(self.prefix_tokens or [])})
        if self.pixel_values is not None:
            tensors["pixel_values"] = self.pixel_values.contiguous()
        if self.labels is not None:
            tensors["labels"] = self.labels.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"strides": json.dumps(self.strides), "meta": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> FeatureCache:
        """Read a cache written by `save` (safetensors: no code is executed)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  a safe_open handle has keys() but no __iter__
        if "strides" not in metadata:
            raise ValueError(f"{path} is not a feature cache written by FeatureCache.save (no 'strides' metadata).")

        def numbered(prefix: str) -> list[torch.Tensor]:
            return [tensors[f"{prefix}.{i}"] for i in range(sum(k.startswith(prefix + ".") for k in tensors))]

        return cls(
            numbered("feature_maps"), json.loads(metadata["strides"]), numbered("prefix_tokens") or None,
            tensors.get("pixel_values"), tensors.get("labels"), json.loads(metadata.get("meta", "{}")),
        )


class CachedBackboneModel(nn.Module):
    """A ViTSeg model's neck, head and loss run on cached backbone features; usable with `Trainer`.

    It shares every module with `model`, so training it trains `model`'s head in place: save `model`
    afterwards. `forward` takes a `FeatureCache.collate` batch and returns `model`'s `SemanticSegmenterOutput`.
    """

    main_input_name = "feature_maps"

    def __init__(self, model: nn.Module, cache: FeatureCache | None = None):
        super().__init__()
        self.model = _cacheable_model(model)
        _check_frozen(self.model)
        if cache is not None:
            cache.check_compatible(self.model)

    @property
    def config(self):
        return self.model.config

    def forward(
        self,
        feature_maps: list[torch.Tensor],
        prefix_tokens: list[torch.Tensor] | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ):
        dtype = next(self.model.head.parameters()).dtype
        features = BackboneFeatures(
            feature_maps=[m.to(dtype) for m in feature_maps],
            strides=list(self.model.backbone.out_strides),
            prefix_tokens=[t.to(dtype) for t in prefix_tokens] if prefix_tokens is not None else None,
            pixel_values=pixel_values.to(dtype) if pixel_values is not None else None,
        )
        return self.model.decode(features, labels=labels, return_dict=return_dict)


def train_head_on_cache(
    model: nn.Module,
    cache: FeatureCache,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    batch_size: int = 8,
    shuffle: bool = True,
    seed: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    max_grad_norm: float | None = None,
) -> list[float]:
    """A plain training loop over a `FeatureCache`: the head (+ neck, auxiliary head) of `model` learns in place.

    Batches follow `cache.iter_batches(batch_size, shuffle, generator)`, one `torch.randperm` per epoch from
    `generator` (default: a new one seeded with `seed`; pass the same generator to successive calls to go on
    with a run epoch by epoch). So a run is reproducible, and comparable with a loop over images that draws
    its order the same way. `scheduler.step()` runs after every optimizer step.

    Returns:
        The mean training loss of each epoch.
    """
    if cache.labels is None:
        raise ValueError("The cache holds no labels: build it from a dataset with 'labels' to train on it.")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    wrapper = CachedBackboneModel(model, cache)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapper.train()
    history = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in cache.iter_batches(batch_size, shuffle=shuffle, generator=generator, device=device):
            loss = wrapper(**batch, return_dict=True).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            n = batch["labels"].shape[0]
            total, count = total + loss.item() * n, count + n
        history.append(total / count if count else math.nan)
    return history
