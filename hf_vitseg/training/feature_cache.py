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
trainer = Trainer(model=CachedBackboneModel(model, cache), args=args, train_dataset=cache,
                  data_collator=FeatureCache.collate)
model.save_pretrained("out")  # the head trained in place: a normal checkpoint
```

Several heads, one cache: `FeatureCache.build([model_a, model_b, ...], data)` runs the backbone once with the
union of the models' taps (and keeps the images when any of their heads reads them, `unet`'s stem); each model
then reads its own taps with `cache.for_model(model)` (`cache.select(layers)` for any subset), a view that shares
the stored tensors (no copy). `train_head_on_cache` and `CachedBackboneModel` do that selection themselves.
`hf-vitseg compare` trains every head this way.

```python
models = [ViTSegForSemanticSegmentation.from_pretrained_backbone(path, head=h, num_labels=2, freeze_backbone=True)
          for h in ("linear", "upernet", "unet")]
cache = FeatureCache.build(models, train_dataset)      # one backbone pass; layers = union of the three
for model in models:
    train_head_on_cache(model, cache, epochs=20, optimizer=..., crop_size=224, hflip=True)
```

Augmentation: random crops and flips on the cached maps (`crop_size=`, `hflip=` of `batch`, `iter_batches` and
`train_head_on_cache`): each sample of a batch is cut to a `crop_size` window whose offsets are multiples of the
coarsest stride (`FeatureCache.crop_alignment`, the patch size for ViT families), so every map, the image and
the labels are cut at the same place, and mirrored left-right with probability 1/2. What this is and is not:
the labels and the image are cut and mirrored exactly as `crop`/`flip` on the images would; the maps are the
crop and mirror of the *whole image's* features, whose tokens attended to the whole image, where the backbone
run on the cropped (or mirrored) image would give somewhat different tokens (less context; position embeddings
are not mirror-symmetric). That is the usual price of a feature cache, and cheap crops of a few large images
still give a head many different training windows. Prefix tokens (CLS, registers) are kept as they are.
Fixed views are the other way: `views=[None, hflip_view]` caches each image and its mirror through the
backbone. Random augmentation done by the dataset itself is frozen at build time (the same random crop every
epoch). Use the cache where this is acceptable (quick linear probes, small datasets, head and
hyper-parameter searches); the published linear-probe protocols augment at random and recompute features
every step.

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
from .universal_metrics import pack_mask_targets, unpack_mask_targets

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
    if getattr(model.config, "is_mask_transformer", False) and model.config.head != "pmt":
        raise ValueError(f"Head {model.config.head!r} puts its queries inside the backbone, so there are no backbone "
                         "features to cache; the mask transformer for a frozen, cached backbone is head 'pmt'.")
    return model


def _check_frozen(model: nn.Module) -> None:
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"A feature cache needs a frozen backbone, but {len(trainable)} backbone parameters train "
            f"(e.g. {trainable[0]}). Call model.freeze_backbone() or build the model with freeze_backbone=True."
        )


def _architecture(model: nn.Module) -> dict:
    """The backbone config without the taps (which hierarchical configs record as `out_indices`)."""
    settings = model.config.backbone_config.to_dict()
    return {k: v for k, v in settings.items() if k not in ("out_indices", "out_features")}


def _union_tap_model(models: list[nn.Module]) -> nn.Module:
    """One model whose backbone taps the union of `models`' layers, with their (shared, identical) backbone
    weights: what `FeatureCache.build` runs for several models. A model that already taps the union is used
    as is; otherwise a copy of the backbone with the union of taps is built (a `linear` head, never run)."""
    first = models[0]
    shared = ("backbone_model_type", "backbone_apply_layernorm", "num_prefix_tokens")
    reference = _backbone_signature(first)
    for model in models[1:]:
        signature = _backbone_signature(model)
        wrong = [k for k in shared if signature[k] != reference[k]]
        if wrong or _architecture(model) != _architecture(first):
            raise ValueError(
                f"One feature cache serves models with the same backbone only; {type(model).__name__} differs in "
                f"{', '.join(wrong) or 'backbone_config'}. Build one cache per backbone."
            )
    union = sorted({i for model in models for i in model.config.backbone_out_indices})
    weights: dict[str, torch.Tensor] = {}
    for model in models:
        for name, tensor in model.backbone.state_dict().items():
            if name in weights and not torch.equal(weights[name], tensor):
                raise ValueError(
                    f"The models' backbones hold different weights ({name}); a shared feature cache needs one "
                    "frozen backbone. Build them from the same pretrained backbone."
                )
            weights.setdefault(name, tensor)
    for model in models:
        if list(model.config.backbone_out_indices) == union:
            return model
    from ..modeling import ViTSegConfig, ViTSegForSemanticSegmentation

    settings = {**first.config.to_dict(), "backbone_out_indices": union, "head": "linear", "head_kwargs": {},
                "neck": None, "auxiliary_loss_weight": 0.0, "freeze_backbone": True}
    tapper = ViTSegForSemanticSegmentation(ViTSegConfig.from_dict(settings))
    expected = tapper.backbone.state_dict()
    missing = [k for k in expected if k not in weights]
    if missing:
        raise ValueError(f"The models' backbones lack weights the union of their taps needs ({missing[0]}).")
    tapper.backbone.load_state_dict({k: weights[k] for k in expected}, strict=True)
    return tapper.to(next(first.parameters()).device).requires_grad_(False)


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
        progress: str | None = None,
    ) -> FeatureCache:
        """Run the frozen backbone of `model` (or of several models) over `data` once and store its features.

        Args:
            model: a `ViTSegForSemanticSegmentation` whose backbone is frozen (no parameter with
                `requires_grad`), or a list of such models with the same backbone (weights included) and any
                heads and taps: the cache then holds the union of their taps, and each reads its own with
                `cache.for_model(model)`. The backbone runs in eval mode, as it does during frozen training.
            data: a `DataLoader`, or a dataset (a `datasets.Dataset` with a transform, any map-style torch
                dataset) of dicts with `pixel_values` `(3, H, W)` and optionally `labels` `(H, W)`; every
                sample must have the same size (crop or pad to a fixed size). For a `pmt` mask transformer
                (`ViTSegForUniversalSegmentation`), batches with `mask_labels` / `class_labels` (the collator's
                lists) instead: they are kept as one map per image (`universal_metrics.pack_mask_targets`),
                cropped and flipped with the features, and `CachedBackboneModel` hands them back as lists.
            batch_size, collate_fn, num_workers: for the `DataLoader` made around a dataset (the order is
                kept: no shuffling).
            device: where the backbone runs; default the model's device.
            dtype: storage dtype of features and images: `torch.float32` (exact), `torch.float16` or
                `torch.bfloat16` (half the memory).
            keep_pixel_values: store the images too: `True`, `False`, or `"auto"`: exactly when a head
                declares that it reads them (`model.head.uses_pixel_values`: `unet`'s image stem), for a list
                of models when any of them does. A cache without images refuses such a head (`for_model`), so
                build a cache meant for other heads later with `True` (or with those heads' models in the list).
            views: fixed views of every batch, each a function `(pixel_values, labels) -> (pixel_values,
                labels)` or `None` for the batch as is (e.g. `[None, hflip_view]`). The cache holds
                `len(views)` entries per sample: per loader batch, its samples in view 0, then in view 1, ...
            storage_device: where the cache lives (CPU memory by default).
            progress: show a progress bar (tqdm) over the samples, with this description.
        """
        models = [_cacheable_model(m) for m in (model if isinstance(model, (list, tuple)) else [model])]
        if not models:
            raise ValueError("Give at least one model to build a feature cache with.")
        for m in models:
            _check_frozen(m)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
        if keep_pixel_values not in (True, False, "auto"):
            raise ValueError(f"keep_pixel_values must be True, False or 'auto', got {keep_pixel_values!r}.")
        views = list(views) if views else [None]
        if keep_pixel_values == "auto":
            keep_pixel_values = any(m.head.uses_pixel_values for m in models)
        model = models[0] if len(models) == 1 else _union_tap_model(models)
        device = torch.device(device) if device is not None else next(model.parameters()).device
        loader = data if isinstance(data, DataLoader) else DataLoader(
            data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=num_workers
        )
        was_training = model.training
        model.eval()  # the backbone as in frozen training; nothing else trains here
        maps, prefixes, images, labels = [], [], [], []
        first_shapes = has_labels = None
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader.dataset) if hasattr(loader.dataset, "__len__") else None, desc=progress,
                   unit="image", disable=progress is None)
        try:
            for batch in loader:
                if not isinstance(batch, Mapping) or "pixel_values" not in batch:
                    got = f"keys {list(batch)}" if isinstance(batch, Mapping) else type(batch).__name__
                    raise ValueError(
                        f"Each batch must be a dict with 'pixel_values' (and optionally 'labels'), got {got}."
                    )
                pixel_values = batch["pixel_values"].to(device)
                batch_labels = batch.get("labels")
                if batch.get("mask_labels") is not None:  # pmt: the per-image target lists, as one map per image
                    batch_labels = pack_mask_targets(batch["mask_labels"], batch["class_labels"],
                                                     model.config.num_labels, size=tuple(pixel_values.shape[-2:]))
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
                bar.update(len(pixel_values))
        finally:
            bar.close()
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

    def batch(
        self,
        indices: torch.Tensor | Sequence[int],
        device: torch.device | str | None = None,
        crop_size: int | Sequence[int] | None = None,
        hflip: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict:
        """The samples at `indices` as one batch (what `collate` makes of them, without per-item work).

        Args:
            indices: which samples.
            device: where the batch goes (default: where the cache lives).
            crop_size: `(height, width)` (or an int) of a random window cut from each sample's maps, image and
                labels, its offsets drawn from `generator` in multiples of `crop_alignment` (both sides must be
                such multiples); `None`: whole samples. See the module docstring for what a crop of cached
                maps is.
            hflip: mirror each sample left-right with probability 1/2 (maps, image and labels together).
            generator: draws the crops and flips (default: torch's global generator).
        """
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.feature_maps[0].device)
        device = device if device is not None else self.feature_maps[0].device
        crop = self._check_crop(crop_size)

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, indices)

        batch = {"feature_maps": [take(m) for m in self.feature_maps]}
        if self.prefix_tokens is not None:
            batch["prefix_tokens"] = [take(t) for t in self.prefix_tokens]
        if self.pixel_values is not None:
            batch["pixel_values"] = take(self.pixel_values)
        if self.labels is not None:
            batch["labels"] = take(self.labels).long()
        if crop is not None or hflip:
            batch = self._crop_and_flip(batch, crop, hflip, generator)
        return {
            key: [t.to(device, non_blocking=True) for t in value] if isinstance(value, list)
            else value.to(device, non_blocking=True)
            for key, value in batch.items()
        }

    def iter_batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        crop_size: int | Sequence[int] | None = None,
        hflip: bool = False,
    ) -> Iterator[dict]:
        """Batches over the whole cache: in order, or in `torch.randperm(len(self), generator=generator)` order;
        `crop_size` / `hflip` as in `batch` (drawn from the same `generator`)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        stop = len(self) - len(self) % batch_size if drop_last else len(self)
        for start in range(0, stop, batch_size):
            yield self.batch(order[start : start + batch_size], device=device, crop_size=crop_size, hflip=hflip,
                             generator=generator)

    # -- random crops and flips on the cached maps --------------------------------------------------------------
    @property
    def image_size(self) -> tuple[int, int]:
        """`(H, W)` of the images the features came from (the labels' size when stored)."""
        for t in (self.labels, self.pixel_values):
            if t is not None:
                return tuple(t.shape[-2:])
        height, width = self.feature_maps[0].shape[-2:]
        return height * int(self.strides[0]), width * int(self.strides[0])

    @property
    def crop_alignment(self) -> int:
        """What crop offsets and sizes must be multiples of: the least common multiple of the maps' strides (the
        patch size for ViT families), so that one window falls on whole cells of every map."""
        strides = [float(s) for s in self.strides]
        if any(s != int(s) for s in strides):
            raise ValueError(f"Cannot crop cached maps with fractional strides {self.strides}.")
        return math.lcm(*(int(s) for s in strides))

    def _check_crop(self, crop_size) -> tuple[int, int] | None:
        if crop_size is None:
            return None
        crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        align, size = self.crop_alignment, self.image_size
        if len(crop) != 2 or any(not isinstance(c, int) or c < 1 or c % align for c in crop):
            raise ValueError(
                f"crop_size must be one or two positive multiples of {align} (the cached maps' stride), got "
                f"{crop_size!r}."
            )
        if crop[0] > size[0] or crop[1] > size[1]:
            raise ValueError(f"crop_size {crop} is larger than the cached images {size}.")
        return crop

    def _crop_and_flip(self, batch: dict, crop, hflip: bool, generator) -> dict:
        """Each sample of `batch` cut to a random `crop` window (offsets in multiples of `crop_alignment`) and
        mirrored with probability 1/2; the maps at their own strides, the image and labels at full size."""
        count = batch["feature_maps"][0].shape[0]
        height, width = self.image_size
        align = self.crop_alignment
        windows = []
        for _ in range(count):
            top = left = 0
            if crop is not None:
                top = int(torch.randint((height - crop[0]) // align + 1, (1,), generator=generator)) * align
                left = int(torch.randint((width - crop[1]) // align + 1, (1,), generator=generator)) * align
            flip = bool(hflip and torch.rand((), generator=generator) < 0.5)
            windows.append((top, left, flip))
        crop_h, crop_w = crop if crop is not None else (height, width)

        def cut(t: torch.Tensor, stride: int) -> torch.Tensor:
            parts = []
            for i, (top, left, flip) in enumerate(windows):
                part = t[i, ..., top // stride : (top + crop_h) // stride, left // stride : (left + crop_w) // stride]
                parts.append(part.flip(-1) if flip else part)
            return torch.stack(parts)

        out = dict(batch)
        out["feature_maps"] = [cut(m, int(s)) for m, s in zip(batch["feature_maps"], self.strides)]
        for key in ("pixel_values", "labels"):
            if key in batch:
                out[key] = cut(batch[key], 1)
        return out

    # -- one cache, several heads -------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int] | None:
        """The backbone layers (stages) the maps were tapped at, in order; `None` when the cache does not say."""
        layers = self.meta.get("backbone_out_indices")
        return None if layers is None else list(layers)

    def select(self, layers: Sequence[int]) -> FeatureCache:
        """A cache of these backbone `layers` only (each must be in `self.layers`), sharing this one's tensors
        (no copy); the image and labels come along."""
        cached = self.layers
        if cached is None:
            raise ValueError("This cache does not record its layers (meta['backbone_out_indices']); cannot select.")
        layers = list(layers)
        missing = [layer for layer in layers if layer not in cached]
        if missing or not layers:
            raise ValueError(
                f"Layers {missing or layers} are not in this feature cache (it holds layers {cached}). Build the "
                "cache with every model that will use it: FeatureCache.build([model_a, model_b, ...], data)."
            )
        positions = [cached.index(layer) for layer in layers]
        meta = {**self.meta, "backbone_out_indices": layers}
        if "out_channels" in meta:
            meta["out_channels"] = [meta["out_channels"][i] for i in positions]
        return FeatureCache(
            [self.feature_maps[i] for i in positions], [self.strides[i] for i in positions],
            None if self.prefix_tokens is None else [self.prefix_tokens[i] for i in positions],
            self.pixel_values, self.labels, meta,
        )

    def for_model(self, model: nn.Module) -> FeatureCache:
        """The part of this cache `model` reads: its taps (`select`), checked against its backbone; refused when
        its head reads the image and the cache holds none."""
        model = _cacheable_model(model)
        layers = list(model.config.backbone_out_indices)
        view = self if self.layers in (None, layers) else self.select(layers)
        view.check_compatible(model)
        if model.head.uses_pixel_values and view.pixel_values is None:
            raise ValueError(
                f"Head {model.config.head!r} reads the image, but this feature cache holds none. Build it with "
                "keep_pixel_values=True, or with this model among those given to FeatureCache.build."
            )
        return view

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
        layers = self.layers
        if "backbone_out_indices" in wrong and layers and set(expected["backbone_out_indices"]) <= set(layers):
            raise ValueError(
                f"This feature cache holds layers {layers}, the model taps {expected['backbone_out_indices']}: "
                "pass cache.for_model(model), the model's own selection."
            )
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
    afterwards. `forward` takes a `FeatureCache.collate` (or `FeatureCache.batch`) batch and returns `model`'s
    `SemanticSegmenterOutput`. Given the `cache` it will read (checked against the model), batches of a cache
    shared by several models (more taps than this model's) work too: the model's own taps are picked out.
    """

    main_input_name = "feature_maps"

    def __init__(self, model: nn.Module, cache: FeatureCache | None = None):
        super().__init__()
        self.model = _cacheable_model(model)
        _check_frozen(self.model)
        self.tap_positions = None  # which maps of a shared cache's batches are this model's taps
        if cache is not None:
            cache.for_model(self.model)
            layers, own = cache.layers, list(self.model.config.backbone_out_indices)
            if layers is not None and layers != own:
                self.tap_positions = [layers.index(layer) for layer in own]

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
        if self.tap_positions is not None and len(feature_maps) != len(self.tap_positions):
            feature_maps = [feature_maps[i] for i in self.tap_positions]
            if prefix_tokens is not None:
                prefix_tokens = [prefix_tokens[i] for i in self.tap_positions]
        features = BackboneFeatures(
            feature_maps=[m.to(dtype) for m in feature_maps],
            strides=list(self.model.backbone.out_strides),
            prefix_tokens=[t.to(dtype) for t in prefix_tokens] if prefix_tokens is not None else None,
            pixel_values=pixel_values.to(dtype) if pixel_values is not None else None,
        )
        if getattr(self.model.config, "is_mask_transformer", False):  # pmt: targets cached as one packed map
            mask_labels = class_labels = None
            if labels is not None:
                mask_labels, class_labels = unpack_mask_targets(labels, self.model.config.num_labels)
            return self.model.decode(features, mask_labels, class_labels, return_dict=return_dict)
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
    crop_size: int | Sequence[int] | None = None,
    hflip: bool = False,
) -> list[float]:
    """A plain training loop over a `FeatureCache`: the head (+ neck, auxiliary head) of `model` learns in place.

    Batches follow `cache.iter_batches(batch_size, shuffle, generator, crop_size=..., hflip=...)`, one
    `torch.randperm` per epoch from `generator` (default: a new one seeded with `seed`; pass the same generator
    to successive calls to go on with a run epoch by epoch). So a run is reproducible, and comparable with a
    loop over images that draws its order the same way. `scheduler.step()` runs after every optimizer step.
    The cache may be shared by several models (`FeatureCache.build([...])`): the model's taps are selected.
    `crop_size` / `hflip`: random crops and flips of the cached maps (see `FeatureCache.batch`).

    Returns:
        The mean training loss of each epoch.
    """
    if cache.labels is None:
        raise ValueError("The cache holds no labels: build it from a dataset with 'labels' to train on it.")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    cache = cache.for_model(model)
    wrapper = CachedBackboneModel(model, cache)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapper.train()
    history = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in cache.iter_batches(batch_size, shuffle=shuffle, generator=generator, device=device,
                                        crop_size=crop_size, hflip=hflip):
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
