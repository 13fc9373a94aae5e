"""`ViTSegConfig`: a pretrained HF vision backbone, which of its layers to tap, and a segmentation head."""

from __future__ import annotations

import copy
import math

from transformers import AutoConfig, PreTrainedConfig

from .backbones import BackboneFamily, family_for, vision_config_of
from .head_base import MASK_HEAD_NAMES
from .heads import get_head_class
from .mask_transformer import mask_head_settings


def check_channel_statistic(name: str, values, num_channels: int) -> None:
    """Refuse a per-channel `image_mean` / `image_std` (or None) whose length is not `num_channels`, or that holds
    a non-finite value (or, for the std, one at or below 0), with a `ValueError` naming the setting."""
    if values is None:
        return
    values = list(values)
    if len(values) != num_channels:
        raise ValueError(
            f"{name} has {len(values)} value(s) but the model takes {num_channels} input channel(s) (the backbone "
            f"config's num_channels); give one value per channel."
        )
    if not all(math.isfinite(v) and (name != "image_std" or v > 0) for v in values):
        above = " above 0" if name == "image_std" else ""
        raise ValueError(f"{name} must hold finite values{above}, got {values}.")


def evenly_spaced_indices(num_levels: int, num_taps: int) -> list[int]:
    """`num_taps` evenly spaced layers ending at the last one: (12, 4) -> [3, 6, 9, 12]."""
    num_taps = min(num_taps, num_levels)
    return sorted({round(num_levels * (i + 1) / num_taps) for i in range(num_taps)})


class ViTSegConfig(PreTrainedConfig):
    r"""
    Configuration of a [`ViTSegForSemanticSegmentation`]: a backbone, the layers tapped from it and a head.

    Args:
        backbone_config (`PreTrainedConfig` or `dict`, *optional*):
            The backbone's config, any family of the table in `backbones.py`: `ViTConfig`, `DeiTConfig`,
            `Dinov2Config`, `Dinov2WithRegistersConfig`, `DINOv3ViTConfig`, `CLIPVisionConfig`,
            `SiglipVisionConfig`, `BeitConfig`, `SamVisionConfig` (a `SamConfig`, `CLIPConfig` or
            `SiglipConfig` is reduced to its vision config), or a hierarchical backbone config that
            `AutoBackbone` builds (`SwinConfig`). Copied: the object passed in is never changed. Saved nested
            with its `model_type` and reloaded as the same class. Defaults to a DINOv2 ViT-S/14 config (random
            weights; use `from_pretrained_backbone` for pretrained ones).
        backbone_out_indices (`list[int]`, *optional*):
            Which backbone layers to tap, sorted and unique. For ViT families and SAM these are transformer
            layers `0..num_hidden_layers` (0 is the embedding output, negative values count from the end);
            for hierarchical backbones they are stages `1..num_stages` (0 is the stem). Defaults to the
            head's choice: the last four layers for `linear` (DINOv2's multi-layer linear head), the last layer
            for the other single-map heads, four evenly spaced layers for multi-level heads (the last layer
            alone on a backbone with fewer layers than that). The backbone runs only as
            deep as the deepest tap.
        backbone_apply_layernorm (`bool`, *optional*, defaults to `True`):
            Apply the backbone's final layer norm to every tapped layer, as DINOv2's linear evaluation does.
            (ViT families only; SAM has no final norm and hierarchical backbones norm their own maps.)
        head (`str`, *optional*, defaults to `"linear"`):
            A registered head name, see `hf_vitseg.list_heads()`, or a mask-transformer head, `"eomt"` or
            `"pmt"` (`list_heads("mask")`), which builds `ViTSegForUniversalSegmentation` (`is_mask_transformer`).
        head_kwargs (`dict`, *optional*):
            Keyword arguments of the head's constructor (its own and `BaseHead`'s: `channels`, `dropout`,
            `in_index`, `input_transform`). Unknown keys are an error. For `eomt` / `pmt`: the settings of
            `mask_transformer.MASK_HEAD_DEFAULTS` (`num_queries`, `num_blocks`, loss weights, point sampling).
        num_labels / id2label / label2id:
            The classes. `num_labels` and `id2label` must agree.
        ignore_index (`int`, *optional*, defaults to 255):
            Label value ignored by the loss and the metrics.
        class_weights (`list[float]` or `"auto"`, *optional*):
            Per-class weights of the cross-entropy (or focal) loss, one finite value >= 0 per class, not all 0.
            `"auto"`: median-frequency weights (Eigen & Fergus, 2015) that `hf_vitseg.training.train` computes from
            one scan of the training labels before the first step (logged) and stores here as a list, so a saved
            model records the weights it was trained with (`hf_vitseg.training.class_weights`).
        label_smoothing (`float`, *optional*, defaults to 0.0):
            Label smoothing of the cross-entropy loss.
        loss_type (`str`, *optional*, defaults to `"cross_entropy"`):
            The pixel loss: `"cross_entropy"`, or `"focal"` (Lin et al., "Focal Loss for Dense Object Detection",
            2017): cross-entropy scaled by `(1 - p_true) ** focal_gamma`, which down-weights pixels already
            classified well, so rare and hard classes count more. `class_weights` weight either; Dice adds to
            either; label smoothing is for cross-entropy only.
        focal_gamma (`float`, *optional*, defaults to 2.0):
            The focusing exponent of the focal loss (0 gives cross-entropy back).
        validate_labels (`bool`, *optional*, defaults to `True`):
            Check that labels lie in `[0, num_labels)` or equal `ignore_index` before the loss, raising a clear
            error instead of a device-side assert or NaN. Costs one host-device sync per step.
        neck (`str`, *optional*, defaults to `"auto"`):
            `"pyramid"`: a `PyramidNeck` turns single-stride ViT taps into four levels at strides p/4, p/2, p, 2p;
            `None`: no neck; `"auto"`: the pyramid neck for heads that want a pyramid (`unet`, `segformer`,
            `upernet`) on ViT/SAM backbones, none otherwise. Hierarchical backbones never get one.
        neck_channels (`int`, *optional*):
            Project every pyramid level to this width (default: keep the backbone's width).
        dice_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of a soft Dice loss added to the cross-entropy (0 = off).
        auxiliary_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the loss of an auxiliary FCN head on an earlier tap (0 = no auxiliary head). Works with
            any head; the auxiliary head only trains, it never changes `logits`.
        auxiliary_in_index (`int`, *optional*, defaults to -2):
            Which tapped map (an index into `backbone_out_indices`) the auxiliary head reads.
        auxiliary_channels (`int`, *optional*, defaults to 256):
            Width of the auxiliary head's conv.
        freeze_backbone (`bool`, *optional*):
            Defaults to `True` for head `pmt` (a decoder over a frozen backbone), `False` otherwise.
            No gradients into the backbone, which stays in eval mode (dropout, drop-path off) while the head trains.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the normal initialisation of the head's linear and conv layers.
        image_mean (`list[float]`, *optional*):
            Per-channel mean the model's inputs are normalised with, one value per input channel
            (`num_channels`, the backbone config's `num_channels`), on the [0, 1] scale the image processor
            rescales to. `None`: the backbone's own processor's (or ImageNet's) for 3 channels.
            `ViTSegImageProcessor.for_model` builds the processor with it; `hf-vitseg train --image-mean /
            --image-stats auto` sets it.
        image_std (`list[float]`, *optional*):
            Per-channel standard deviation, as `image_mean` (every value above 0).
    """

    model_type = "vitseg"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: PreTrainedConfig | dict | None = None,
        backbone_out_indices: list[int] | None = None,
        backbone_apply_layernorm: bool = True,
        head: str = "linear",
        head_kwargs: dict | None = None,
        ignore_index: int = 255,
        class_weights: list[float] | str | None = None,
        label_smoothing: float = 0.0,
        validate_labels: bool = True,
        loss_type: str = "cross_entropy",
        focal_gamma: float = 2.0,
        neck: str | None = "auto",
        neck_channels: int | None = None,
        dice_loss_weight: float = 0.0,
        auxiliary_loss_weight: float = 0.0,
        auxiliary_in_index: int = -2,
        auxiliary_channels: int = 256,
        freeze_backbone: bool | None = None,
        initializer_range: float = 0.02,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **kwargs,
    ):
        if backbone_config is None:
            from transformers import Dinov2Config

            backbone_config = Dinov2Config(
                hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518
            )
        elif isinstance(backbone_config, dict):
            if "model_type" not in backbone_config:
                raise ValueError("backbone_config given as a dict needs a 'model_type' key (e.g. 'dinov2').")
            backbone_config = dict(backbone_config)
            backbone_config = AutoConfig.for_model(backbone_config.pop("model_type"), **backbone_config)
        else:
            # the config is ours from here on: the caller's object is never changed (hierarchical backbones get
            # their out_indices set below), so one backbone config can seed several models
            backbone_config = copy.deepcopy(backbone_config)
        backbone_config = vision_config_of(backbone_config)
        family = family_for(backbone_config)
        if backbone_out_indices is None:
            num_levels = family.num_levels(backbone_config)
            if head in MASK_HEAD_NAMES:  # eomt runs the backbone to its last layer, pmt decodes the last layer
                backbone_out_indices = [num_levels]
            else:
                backbone_out_indices = self.default_out_indices(num_levels, get_head_class(head), family.kind)

        id2label = kwargs.get("id2label")
        if id2label is not None and kwargs.get("num_labels") is not None and len(id2label) != kwargs["num_labels"]:
            if "transformers_version" in kwargs:
                # a saved config reloaded with another num_labels (`from_pretrained(..., num_labels=N)`, to
                # fine-tune on other classes): the new count wins, with default label names
                kwargs.pop("id2label")
                kwargs.pop("label2id", None)
            else:
                raise ValueError(
                    f"num_labels={kwargs['num_labels']} disagrees with id2label, which has {len(id2label)} entries. "
                    "Pass one of them, or make them agree."
                )

        self.backbone_config = backbone_config
        self.backbone_out_indices = backbone_out_indices
        self.backbone_apply_layernorm = backbone_apply_layernorm
        self.head = head
        self.head_kwargs = dict(head_kwargs or {})
        self.ignore_index = ignore_index
        self.class_weights = (class_weights if class_weights is None or isinstance(class_weights, str)
                              else [float(w) for w in class_weights])
        self.label_smoothing = label_smoothing
        self.loss_type = loss_type
        self.focal_gamma = focal_gamma
        self.validate_labels = validate_labels
        self.neck = neck
        self.neck_channels = neck_channels
        self.dice_loss_weight = dice_loss_weight
        self.auxiliary_loss_weight = auxiliary_loss_weight
        self.auxiliary_in_index = auxiliary_in_index
        self.auxiliary_channels = auxiliary_channels
        self.freeze_backbone = (head == "pmt") if freeze_backbone is None else freeze_backbone
        self.initializer_range = initializer_range
        self.image_mean = [float(v) for v in image_mean] if image_mean is not None else None
        self.image_std = [float(v) for v in image_std] if image_std is not None else None
        super().__init__(**kwargs)
        self.backbone_out_indices = self._normalize_indices(
            backbone_out_indices, family.num_levels(backbone_config), family.kind,
            (1, 4) if self.uses_pyramid_neck else None,
        )
        if family.kind == "hierarchical":
            backbone_config.out_indices = self.backbone_out_indices
            backbone_config.out_features = [backbone_config.stage_names[i] for i in self.backbone_out_indices]
        self.validate()

    def validate(self) -> None:
        """Check the fields against each other; raise a `ValueError` naming the problem and a valid value.

        Called at construction and by `save_pretrained`; call it again after changing fields by hand.
        """
        family = self.backbone_family
        num_levels = family.num_levels(self.backbone_config)
        if self.is_mask_transformer:
            self._validate_mask_transformer(family, num_levels)
        else:
            self._validate_pixel_head(family, num_levels)
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {self.num_labels}.")
        self._validate_loss()
        for name in ("image_mean", "image_std"):
            check_channel_statistic(name, getattr(self, name), self.num_channels)
        if 0 <= self.ignore_index < self.num_labels:
            raise ValueError(
                f"ignore_index={self.ignore_index} is a valid class id for num_labels={self.num_labels}; "
                "choose an ignore_index outside [0, num_labels) (255 or -100 are usual)."
            )

    def _validate_loss(self) -> None:
        """`validate` for the pixel loss settings: class weights, loss type, focal gamma."""
        weights = self.class_weights
        if isinstance(weights, str):
            if weights != "auto":
                raise ValueError(f"class_weights must be a list of {self.num_labels} numbers or 'auto', got "
                                 f"{weights!r}.")
        elif weights is not None:
            if len(weights) != self.num_labels:
                raise ValueError(f"class_weights has {len(weights)} entries for {self.num_labels} labels.")
            if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
                raise ValueError(f"class_weights must be finite and >= 0, and not all 0; got {weights}.")
        if self.loss_type not in ("cross_entropy", "focal"):
            raise ValueError(f"loss_type must be 'cross_entropy' or 'focal', got {self.loss_type!r}.")
        if isinstance(self.focal_gamma, bool) or not isinstance(self.focal_gamma, (int, float)) or not (
                math.isfinite(self.focal_gamma) and self.focal_gamma >= 0):
            raise ValueError(f"focal_gamma must be a finite number >= 0 (2 is usual), got {self.focal_gamma!r}.")
        if self.loss_type == "focal" and self.label_smoothing:
            raise ValueError("label_smoothing applies to the cross-entropy loss; with loss_type='focal' set it to 0.")

    def _validate_pixel_head(self, family: BackboneFamily, num_levels: int) -> None:
        """`validate` for the pixel heads (`ViTSegForSemanticSegmentation`): head_kwargs, neck and taps."""
        head_cls = get_head_class(self.head)
        unknown = set(self.head_kwargs) - head_cls.init_kwargs()
        if unknown:
            raise ValueError(
                f"head_kwargs {sorted(unknown)} are not arguments of head {self.head!r}. "
                f"Valid: {sorted(head_cls.init_kwargs())}."
            )
        head_cls.check_backbone(family.kind == "hierarchical", self.num_prefix_tokens, self.head_kwargs)

        if self.neck not in ("auto", "pyramid", None):
            raise ValueError(f"neck must be 'auto', 'pyramid' or None, got {self.neck!r}.")
        if self.neck == "pyramid" and family.kind == "hierarchical":
            raise ValueError(
                "neck='pyramid' is for single-stride backbones; a hierarchical backbone has its own pyramid "
                "(use neck='auto' or None)."
            )
        tap_counts = (1, 4) if self.uses_pyramid_neck else None
        indices = self._normalize_indices(self.backbone_out_indices, num_levels, family.kind, tap_counts)
        if tap_counts and len(indices) not in tap_counts:
            example = evenly_spaced_indices(num_levels, 4) if num_levels >= 4 else [num_levels]
            raise ValueError(
                f"Head {self.head!r} gets a pyramid neck, which builds 4 levels from 1 or 4 backbone taps; "
                f"backbone_out_indices={indices} has {len(indices)}. Tap {'4 layers or ' if num_levels >= 4 else ''}"
                f"1 (e.g. {example})."
            )
        if self.auxiliary_loss_weight:
            n_taps = len(indices)
            if not -n_taps <= self.auxiliary_in_index < n_taps:
                raise ValueError(
                    f"auxiliary_in_index={self.auxiliary_in_index} is out of range for {n_taps} tapped layers "
                    f"(backbone_out_indices={indices}); tap more layers or pick an index in "
                    f"{-n_taps}..{n_taps - 1}."
                )

    def _validate_mask_transformer(self, family: BackboneFamily, num_levels: int) -> None:
        """`validate` for the mask-transformer heads `eomt` / `pmt` (`ViTSegForUniversalSegmentation`)."""
        family.check_extra_tokens(f"Head {self.head!r}")
        indices = self._normalize_indices(self.backbone_out_indices, num_levels, family.kind)
        if len(indices) != 1 or indices[0] < 1:
            raise ValueError(
                f"Head {self.head!r} reads one backbone layer (eomt: the backbone runs up to it; pmt: its decoder "
                f"reads it); backbone_out_indices={indices}. Give one layer >= 1, e.g. [{num_levels}]."
            )
        mask_head_settings(self.head, self.head_kwargs, indices[0])
        if not self.backbone_apply_layernorm:
            raise ValueError(
                f"Head {self.head!r} predicts from tokens normed by the backbone's final norm (as EoMT); "
                "backbone_apply_layernorm must be True."
            )
        if self.neck == "pyramid":
            raise ValueError(f"Head {self.head!r} takes no neck; use neck='auto' or None.")
        unused = [name for name, value in (("auxiliary_loss_weight", self.auxiliary_loss_weight),
                                           ("dice_loss_weight", self.dice_loss_weight),
                                           ("label_smoothing", self.label_smoothing),
                                           ("class_weights", self.class_weights),
                                           ("loss_type", self.loss_type != "cross_entropy")) if value]
        if unused:
            raise ValueError(
                f"{', '.join(unused)} belong to the pixel loss; head {self.head!r} uses the mask-classification loss, "
                "whose weights are head_kwargs (class_weight, mask_weight, dice_weight, no_object_weight)."
            )

    @property
    def is_mask_transformer(self) -> bool:
        """True for the mask-transformer heads (`eomt`, `pmt`): the config builds `ViTSegForUniversalSegmentation`
        (class and mask per query), not `ViTSegForSemanticSegmentation` (logits per pixel)."""
        return self.head in MASK_HEAD_NAMES

    @staticmethod
    def default_out_indices(num_levels: int, head_cls, kind: str = "vit") -> list[int]:
        """The head's `num_default_taps` evenly spaced layers (its last ones with `head_cls.default_taps_last`,
        e.g. `linear`: 9, 10, 11, 12 of 12); on a backbone shallower than that, the last layer alone (a pyramid
        neck and multi-level heads take 1 tap, not 2 or 3). `default_taps_last` is about a ViT's last blocks: on
        a hierarchical backbone (`kind="hierarchical"`, stages at strides 4-32) such a head taps the last stage."""
        num_taps = head_cls.num_default_taps if num_levels >= head_cls.num_default_taps else 1
        if getattr(head_cls, "default_taps_last", False):
            num_taps = 1 if kind == "hierarchical" else num_taps
            return list(range(num_levels - num_taps + 1, num_levels + 1))
        return evenly_spaced_indices(num_levels, num_taps)

    @staticmethod
    def _normalize_indices(indices, num_levels: int, kind: str, tap_counts: tuple[int, ...] | None = None) -> list[int]:
        """Indices with negative ones resolved, checked against the backbone's depth (and the tap counts a
        pyramid neck takes, for the example an error suggests)."""
        if isinstance(indices, int):
            indices = [indices]
        lowest = 0
        what = "stages (0 = stem)" if kind == "hierarchical" else "layers (0 = embeddings)"
        normalized = []
        for i in indices:
            if not isinstance(i, int) or isinstance(i, bool):
                raise ValueError(f"backbone_out_indices must be ints, got {indices!r} (e.g. [{num_levels}]).")
            j = i + num_levels + 1 if i < 0 else i
            if not lowest <= j <= num_levels:
                raise ValueError(
                    f"backbone_out_indices {list(indices)} has {i}, out of range: this backbone has {num_levels} "
                    f"{what}; valid indices are {lowest}..{num_levels} (or -{num_levels + 1}..-1 from the end)."
                )
            normalized.append(j)
        if not normalized:
            raise ValueError(f"backbone_out_indices must name at least one layer (e.g. [{num_levels}]).")
        if normalized != sorted(set(normalized)):
            example = sorted(set(normalized))
            if tap_counts and len(example) not in tap_counts:
                example = [num_levels]
            raise ValueError(
                f"backbone_out_indices {list(indices)} must be sorted and unique (after resolving negative "
                f"indices: {normalized}); e.g. {example}."
            )
        return normalized

    @property
    def backbone_family(self) -> BackboneFamily:
        """The backbone family's record (see `backbones.py`)."""
        return family_for(self.backbone_config)

    @property
    def uses_pyramid_neck(self) -> bool:
        if self.is_mask_transformer:
            return False
        if self.neck == "auto":
            return get_head_class(self.head).wants_pyramid and self.backbone_kind != "hierarchical"
        return self.neck == "pyramid"

    @property
    def num_channels(self) -> int:
        """Input channels of the model: the backbone config's `num_channels` (3 for RGB backbones)."""
        return int(getattr(self.backbone_config, "num_channels", 3))

    @property
    def backbone_kind(self) -> str:
        return self.backbone_family.kind

    @property
    def num_prefix_tokens(self) -> int:
        return self.backbone_family.num_prefix_tokens(self.backbone_config)
