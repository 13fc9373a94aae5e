"""The head registry and `BaseHead`, the base class every segmentation head derives from.

A head consumes a `BackboneFeatures` (see `features.py`; re-exported here, where user heads import it) and
returns logits `(B, num_labels, h', w')` at its natural stride (`BaseHead.output_stride`). `BaseHead` owns what
every head shares, in the manner of mmsegmentation's `BaseDecodeHead`:

- which of the tapped feature maps to take (`in_index`) and how to combine them
  (`input_transform`: `None` = one map, `"resize_concat"` = upsample all to the finest and
  concatenate, `"multiple_select"` = a list);
- dropout before the classifier and the final 1x1 classifier (`classify`).

So a head file holds only what is distinctive about that head.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .features import BackboneFeatures

__all__ = [
    "HEAD_REGISTRY", "MASK_HEAD_NAMES", "BackboneFeatures", "BaseHead", "ConvNormAct", "get_head_class", "list_heads",
    "register_head", "resize", "resolve_preset",
]


HEAD_REGISTRY: dict[str, type[BaseHead]] = {}

# The mask-transformer heads (`mask_transformer.py`): not `BaseHead`s (they classify masks, not pixels, and `eomt`
# runs inside the backbone), so not in HEAD_REGISTRY; a config with one of them builds
# `ViTSegForUniversalSegmentation` (`config.is_mask_transformer`).
MASK_HEAD_NAMES: tuple[str, ...] = ("eomt", "pmt")


def register_head(name: str, override: bool = False):
    """Class decorator that registers a `BaseHead` subclass under `name`.

    ```python
    @register_head("my_head")
    class MyHead(BaseHead):
        ...
    ```
    Registering a *different* class under a taken name raises, unless `override=True`; re-registering
    the same class (same module and qualified name, e.g. after a module reload) replaces it silently.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"A head name must be a Python identifier, got {name!r}.")
    if name in MASK_HEAD_NAMES:
        raise ValueError(f"{name!r} is the name of a built-in mask-transformer head; choose another name.")

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, BaseHead)):
            raise TypeError(f"@register_head({name!r}) decorates a subclass of BaseHead, got {cls!r}.")
        previous = HEAD_REGISTRY.get(name)
        same = previous is not None and (
            (previous.__module__, previous.__qualname__) == (cls.__module__, cls.__qualname__)
        )
        if previous is not None and not same and not override:
            raise ValueError(
                f"A head named {name!r} is already registered ({previous.__module__}.{previous.__qualname__}). "
                "Choose another name, or pass override=True to replace it."
            )
        cls.head_name = name
        HEAD_REGISTRY[name] = cls
        return cls

    return decorator


def list_heads(kind: str = "semantic") -> list[str]:
    """The names of the heads, sorted: `"semantic"` (default) the registered pixel heads of
    `ViTSegForSemanticSegmentation`, `"mask"` the mask-transformer heads of `ViTSegForUniversalSegmentation`
    (`eomt`, `pmt`), `"all"` both."""
    if kind not in ("semantic", "mask", "all"):
        raise ValueError(f"list_heads(kind=...) takes 'semantic', 'mask' or 'all', got {kind!r}.")
    names = set(HEAD_REGISTRY) if kind != "mask" else set()
    if kind != "semantic":
        names |= set(MASK_HEAD_NAMES)
    return sorted(names)


def get_head_class(name: str) -> type[BaseHead]:
    """The head class registered under `name`; a clear error listing the registered names otherwise."""
    if name in MASK_HEAD_NAMES and name not in HEAD_REGISTRY:
        raise ValueError(
            f"Head {name!r} is a mask-transformer head (it predicts masks and classes, not pixel logits): build "
            "hf_vitseg.ViTSegForUniversalSegmentation, not ViTSegForSemanticSegmentation, with it."
        )
    if name not in HEAD_REGISTRY:
        raise ValueError(
            f"Unknown head {name!r}. Registered heads: {', '.join(list_heads())}. "
            "A head of your own must be registered with @hf_vitseg.register_head(name) before the config is built."
        )
    return HEAD_REGISTRY[name]


def resize(x: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """Bilinear resize with `align_corners=False`, a no-op when the size already matches."""
    # Keep symbolic sizes symbolic (torch.export / ONNX with dynamic height and width); plain numbers become ints.
    size = tuple(s if isinstance(s, torch.SymInt) else int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False if mode in ("bilinear", "bicubic") else None)


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU, the building block of most decoders."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def resolve_preset(head_name: str, presets: dict, preset: str):
    """`presets[preset]`, or a clear error naming the choices. Every head with presets offers `"default"` (what
    it builds when nothing is said) and `"paper"` (the widths of the paper or of the reference code)."""
    if preset not in presets:
        raise ValueError(f"{head_name}: unknown preset {preset!r}; choose from {sorted(presets)}.")
    return presets[preset]


class BaseHead(nn.Module):
    """Base class of every segmentation head, and the contract between a head and the rest of hf-vitseg.

    Subclasses set the class attributes below (each has a default here), build their layers in `__init__`
    (calling `super().__init__(...)` first, or once their widths are known) and implement
    `forward(features) -> logits`. A head whose input mode is fixed passes it to `super().__init__`
    (`input_transform="multiple_select"`) rather than accepting an argument it would reject.

    Class attributes (the head contract; the model, config, feature cache and ONNX export read them):
        head_name: the registry name, set by `@register_head`.
        num_default_taps: how many backbone layers the head taps when the config gives no
            `backbone_out_indices` (1 = the last layer): evenly spaced ones ending at the last layer, or the
            last ones with `default_taps_last`.
        default_taps_last: the default taps are the last `num_default_taps` layers (`linear`: DINOv2's last
            four) rather than evenly spaced ones (multi-level heads: 3, 6, 9, 12 of 12).
        wants_pyramid: the head expects a multi-scale pyramid (strides 4, 8, 16, 32); on a single-stride
            ViT the model puts a pyramid neck in front of it.
        uses_prefix_tokens: the head reads `features.prefix_tokens` (CLS, distillation, register tokens).
        prefix_tokens_optional: with `uses_prefix_tokens`, the head also works without them (SAM, hierarchical
            backbones); otherwise `check_backbone` refuses such backbones at config construction.
        uses_pixel_values: the head reads `features.pixel_values`, the image (`unet`'s stem). The feature cache
            stores the images exactly when this is true. A head may set it per instance in `__init__` when it
            depends on its arguments (`unet` without a stem reads no image). A head whose constructor takes
            `image_channels` is given the model's input channels (`ViTSegConfig.num_channels`: 1, 3, 13, ...).
        onnx_exportable: `hf_vitseg.export.export_onnx` can export a model with this head; when false, export
            stops before trying and shows `onnx_export_reason`.
        onnx_dynamic_size: the export can keep height and width symbolic; when false only a fixed-size export
            (`dynamic=False`) is allowed.
        onnx_export_reason: the sentence shown when `onnx_exportable` or `onnx_dynamic_size` is false.

    Methods a head may override: `output_stride` (when its output is not at the first selected map's
    stride), `reset_extra_parameters` (when it owns parameters directly), `check_backbone` (when it cannot
    follow some backbones).

    Args:
        in_channels: channels of each incoming feature map.
        in_strides: stride of each incoming feature map.
        num_labels: number of classes.
        num_prefix_tokens: prefix tokens per tap (0 for SAM and hierarchical backbones).
        channels: width of the head's hidden layers (what `classify` receives); `None` lets the subclass
            build the classifier itself with `build_classifier`.
        dropout: dropout probability before the classifier.
        in_index: which incoming maps the head takes (int or list of ints, indexes into the maps; default all).
        input_transform: how `select_inputs` combines the selected maps: `None` (a single map),
            `"resize_concat"` (upsample to the first selected map's size and concatenate on channels)
            or `"multiple_select"` (a list).
    """

    head_name: str = ""
    num_default_taps: int = 1
    default_taps_last: bool = False
    wants_pyramid: bool = False
    uses_prefix_tokens: bool = False
    prefix_tokens_optional: bool = False
    uses_pixel_values: bool = False
    onnx_exportable: bool = True
    onnx_dynamic_size: bool = True
    onnx_export_reason: str = ""

    def __init__(
        self,
        in_channels: list[int],
        in_strides: list[float],
        num_labels: int,
        num_prefix_tokens: int = 0,
        channels: int | None = 256,
        dropout: float = 0.1,
        in_index: int | list[int] | None = None,
        input_transform: str | None = "multiple_select",
    ):
        super().__init__()
        if input_transform not in (None, "resize_concat", "multiple_select"):
            raise ValueError(
                f"input_transform must be None, 'resize_concat' or 'multiple_select', got {input_transform!r}."
            )
        if in_index is None:
            in_index = list(range(len(in_channels))) if input_transform else len(in_channels) - 1
        indices = [in_index] if isinstance(in_index, int) else list(in_index)
        for i in indices:
            if not -len(in_channels) <= i < len(in_channels):
                raise ValueError(
                    f"{type(self).__name__}: in_index {in_index} is out of range for {len(in_channels)} incoming "
                    "feature maps (one per entry of backbone_out_indices)."
                )
        if input_transform is None and not isinstance(in_index, int):
            raise ValueError(f"{type(self).__name__}: input_transform=None takes a single int in_index.")
        self.in_index = in_index
        self.input_transform = input_transform
        self.num_labels = num_labels
        self.num_prefix_tokens = num_prefix_tokens
        self.channels = channels
        if input_transform == "resize_concat":
            self.selected_channels = sum(in_channels[i] for i in indices)
        elif input_transform is None:
            self.selected_channels = in_channels[in_index]
        else:
            self.selected_channels = [in_channels[i] for i in indices]
        self.selected_strides = self.select_strides(in_strides)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        if channels is not None:
            self.build_classifier(channels)

    def build_classifier(self, channels: int) -> None:
        """The final 1x1 classifier `channels -> num_labels` that `classify` applies."""
        self.channels = channels
        self.classifier = nn.Conv2d(channels, self.num_labels, kernel_size=1)

    @classmethod
    def init_kwargs(cls) -> set[str]:
        """Every keyword the head's constructor accepts from `head_kwargs`.

        The most derived `__init__`'s own arguments; a base class's only where a constructor passes `**kwargs`
        on (a head that fixes `input_transform` does not accept it)."""
        names = set()
        for klass in cls.__mro__:
            if klass is nn.Module or not issubclass(klass, BaseHead) or "__init__" not in vars(klass):
                continue
            parameters = inspect.signature(klass.__init__).parameters.values()
            names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            if not any(p.kind is p.VAR_KEYWORD for p in parameters):
                break
        # `image_channels`: the model's input channels, which the model passes to heads that read the image
        return names - {"self", "in_channels", "in_strides", "num_labels", "num_prefix_tokens", "image_channels"}

    @classmethod
    def check_backbone(cls, is_hierarchical: bool, num_prefix_tokens: int, head_kwargs: dict | None = None) -> None:
        """Raise a clear error, at config construction, if this head (with these `head_kwargs`) cannot follow
        such a backbone. The default refuses backbones without prefix tokens to heads that need them."""
        if cls.uses_prefix_tokens and num_prefix_tokens == 0 and not cls.prefix_tokens_optional:
            raise ValueError(f"Head {cls.head_name!r} needs prefix (CLS) tokens, which this backbone does not have.")

    def _indices(self) -> list[int]:
        return [self.in_index] if isinstance(self.in_index, int) else list(self.in_index)

    def select_strides(self, in_strides: Sequence[float]) -> list[float]:
        """The strides of the maps named by `in_index`, out of the strides of every incoming map."""
        return [in_strides[i] for i in self._indices()]

    def select_inputs(self, feature_maps: list[torch.Tensor]):
        """Take and combine the maps named by `in_index`, per `input_transform`."""
        if self.input_transform is None:
            return feature_maps[self.in_index]
        selected = [feature_maps[i] for i in self._indices()]
        if self.input_transform == "resize_concat":
            size = selected[0].shape[-2:]
            return torch.cat([resize(x, size) for x in selected], dim=1)
        return selected

    @property
    def selected_width(self) -> int:
        """The channels of `select_single_map`'s map: the selected map's, or the sum over the selected maps."""
        return self.selected_channels if isinstance(self.selected_channels, int) else sum(self.selected_channels)

    def select_single_map(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """`select_inputs` as one map: several selected maps are resized to the first one's size and concatenated
        along channels (`"multiple_select"` then gives what `"resize_concat"` gives), for heads that read one map."""
        x = self.select_inputs(feature_maps)
        if isinstance(x, list):
            x = torch.cat([resize(m, x[0].shape[-2:]) for m in x], dim=1)
        return x

    def output_stride(self, in_strides: Sequence[float]) -> float:
        """The stride of this head's logits with respect to `pixel_values`, given the strides of the maps it
        receives (`in_strides`, one per incoming map, before `in_index`): an input of height H gives logits of
        height `H / output_stride` (for H a multiple of the model's `size_divisor`).

        A float: DINOv2's patch 14 puts pyramid levels at stride 3.5, and a head may upsample past the input
        (`setr_pup` on a patch-8 backbone: 0.5). The default: the first selected map's stride (heads that
        classify at the finest selected map's resolution)."""
        return self.select_strides(in_strides)[0]

    def reset_extra_parameters(self, std: float) -> None:
        """Initialise the parameters the head owns directly (`nn.Parameter` attributes such as class
        embeddings), which the model's `_init_weights` does not reach; convolutions, linears and norms are
        initialised there. Called with `config.initializer_range`; the default does nothing."""

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout, then the 1x1 classifier: (B, channels, h, w) -> (B, num_labels, h, w)."""
        return self.classifier(self.dropout(x))

    def forward(self, features: BackboneFeatures) -> torch.Tensor:  # pragma: no cover - abstract
        """`features` (after the neck, if any) -> logits `(B, num_labels, h', w')` at the head's natural stride."""
        raise NotImplementedError
