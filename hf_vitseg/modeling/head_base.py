"""The head registry and `BaseHead`, the base class every segmentation head derives from.

A head consumes a `BackboneFeatures` (see `backbone_adapter.py`) and returns logits
`(B, num_labels, h', w')` at its natural resolution. `BaseHead` owns what every head shares,
in the manner of mmsegmentation's `BaseDecodeHead`:

- which of the tapped feature maps to take (`in_index`) and how to combine them
  (`input_transform`: `None` = one map, `"resize_concat"` = upsample all to the finest and
  concatenate, `"multiple_select"` = a list);
- dropout before the classifier and the final 1x1 classifier (`classify`).

So a head file holds only what is distinctive about that head.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


HEAD_REGISTRY: dict[str, type["BaseHead"]] = {}


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

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, BaseHead)):
            raise TypeError(f"@register_head({name!r}) decorates a subclass of BaseHead, got {cls!r}.")
        previous = HEAD_REGISTRY.get(name)
        same = previous is not None and (previous.__module__, previous.__qualname__) == (cls.__module__, cls.__qualname__)
        if previous is not None and not same and not override:
            raise ValueError(
                f"A head named {name!r} is already registered ({previous.__module__}.{previous.__qualname__}). "
                "Choose another name, or pass override=True to replace it."
            )
        cls.head_name = name
        HEAD_REGISTRY[name] = cls
        return cls

    return decorator


def list_heads() -> list[str]:
    """The names of all registered heads, sorted."""
    return sorted(HEAD_REGISTRY)


def get_head_class(name: str) -> type["BaseHead"]:
    if name not in HEAD_REGISTRY:
        raise ValueError(
            f"Unknown head {name!r}. Registered heads: {', '.join(list_heads())}. "
            "A head of your own must be registered with @hf_vitseg.register_head(name) before the config is built."
        )
    return HEAD_REGISTRY[name]


@dataclass
class BackboneFeatures:
    """What the backbone adapter hands to a neck or head.

    Attributes:
        feature_maps: one `(B, C_i, h_i, w_i)` map per tapped layer (or per pyramid level after a neck).
        strides: the stride of each map with respect to `pixel_values`.
        prefix_tokens: for ViT families, one `(B, P, C_i)` tensor per tap holding the prefix tokens
            (CLS first, then distillation or register tokens); `None` where the backbone has none
            (SAM, hierarchical backbones).
        pixel_values: the input image `(B, 3, H, W)`, for heads with an image stem (U-Net).
        hidden_states / attentions: what the backbone recorded when asked to (model outputs).
    """

    feature_maps: list[torch.Tensor]
    strides: list[int]
    prefix_tokens: list[torch.Tensor] | None = None
    pixel_values: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    @property
    def grid_hw(self) -> tuple[int, int]:
        """The (h, w) grid of the first feature map."""
        return tuple(self.feature_maps[0].shape[-2:])


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


class BaseHead(nn.Module):
    """Base class of every segmentation head.

    Subclasses set the class attributes below, build their layers in `__init__` (calling
    `super().__init__(...)` first) and implement `forward(features) -> logits`.

    Class attributes:
        head_name: set by `@register_head`.
        num_default_taps: how many evenly spaced backbone layers the head taps when the config gives
            no `backbone_out_indices` (1 = the last layer).
        wants_pyramid: the head expects a multi-scale pyramid (strides 4, 8, 16, 32); on a single-stride
            ViT the model puts a pyramid neck in front of it.
        uses_prefix_tokens: the head reads `features.prefix_tokens` (it then cannot follow backbones
            without prefix tokens unless it handles `None`).

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
    wants_pyramid: bool = False
    uses_prefix_tokens: bool = False

    def __init__(
        self,
        in_channels: list[int],
        in_strides: list[int],
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
        self.selected_strides = [in_strides[i] for i in indices]
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        if channels is not None:
            self.build_classifier(channels)

    def build_classifier(self, channels: int) -> None:
        self.channels = channels
        self.classifier = nn.Conv2d(channels, self.num_labels, kernel_size=1)

    @classmethod
    def init_kwargs(cls) -> set[str]:
        """Every keyword the head's constructor accepts from `head_kwargs` (its own and BaseHead's)."""
        names = set()
        for klass in cls.__mro__:
            if klass is nn.Module or not issubclass(klass, BaseHead):
                continue
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                    names.add(name)
        return names - {"self", "in_channels", "in_strides", "num_labels", "num_prefix_tokens"}

    @classmethod
    def check_backbone(cls, is_hierarchical: bool, num_prefix_tokens: int, head_kwargs: dict | None = None) -> None:
        """Raise a clear error, at config construction, if this head (with these `head_kwargs`) cannot follow
        such a backbone. Heads override it."""
        if cls.uses_prefix_tokens and num_prefix_tokens == 0 and not getattr(cls, "prefix_tokens_optional", False):
            raise ValueError(f"Head {cls.head_name!r} needs prefix (CLS) tokens, which this backbone does not have.")

    def select_inputs(self, feature_maps: list[torch.Tensor]):
        """Take and combine the maps named by `in_index`, per `input_transform`."""
        if self.input_transform is None:
            return feature_maps[self.in_index]
        indices = [self.in_index] if isinstance(self.in_index, int) else self.in_index
        selected = [feature_maps[i] for i in indices]
        if self.input_transform == "resize_concat":
            size = selected[0].shape[-2:]
            return torch.cat([resize(x, size) for x in selected], dim=1)
        return selected

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout, then the 1x1 classifier: (B, channels, h, w) -> (B, num_labels, h, w)."""
        return self.classifier(self.dropout(x))

    def forward(self, features: BackboneFeatures) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
