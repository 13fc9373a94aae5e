"""Mask-transformer heads on plain ViTs: `eomt` (queries inside the backbone's last blocks) and `pmt` (a decoder
over a frozen backbone's tokens), their mask module, masked attention and loss.

- `eomt` (Kerssies et al., "Your ViT is Secretly an Image Segmentation Model", CVPR 2025): `num_queries` learnable
  queries are put in front of the tokens before the last `num_blocks` backbone blocks; before each of those blocks
  and after the last one the mask module predicts one class and one mask per query from the normed tokens (deep
  supervision), and the block's attention is masked: a query attends only to the patches its previous mask covers.
  Exactly transformers' `EomtForUniversalSegmentation`, on any plain ViT family, for any input size.
- `pmt` (Cavagnero et al., "PMT: Plain Mask Transformer", 2026): the backbone stays frozen; `num_blocks` new layers,
  deep copies of the backbone's last blocks (so initialised from them), run over [queries; prefix + patch tokens of
  the tap], with the same mask module, masked attention and deep supervision. It decodes cached `BackboneFeatures`.

Masked attention per block is applied with probability `attn_mask_probs[block]` per query (EoMT's mask annealing
lowers them to 0 during training: the trained model runs plain attention). In eval mode a block whose probability is
0 computes no mask and no prediction. Under `torch.export` (ONNX export) every block runs plain attention.

The loss is transformers' `EomtLoss` (Hungarian matching on class, mask BCE and Dice costs over sampled points;
class cross-entropy with a no-object weight, mask BCE + Dice on importance-sampled points), summed over every
prediction as transformers' EoMT sums it. It needs scipy.

This module travels with every checkpoint (remote code): it imports only torch and transformers.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .features import BackboneFeatures
from .head_base import MASK_HEAD_NAMES

__all__ = [
    "MASK_HEAD_DEFAULTS", "EomtHead", "MaskTransformerHead", "PmtHead", "ViTSegUniversalSegmenterOutput",
    "build_mask_head", "mask_classification_loss", "mask_head_settings",
]

# head_kwargs of `eomt` / `pmt` and their defaults (transformers' EomtConfig's).
MASK_HEAD_DEFAULTS: dict[str, object] = {
    "num_queries": 100,
    "num_blocks": 4,
    "num_upscale_blocks": 2,
    "hidden_act": "gelu",
    "class_weight": 2.0,
    "mask_weight": 5.0,
    "dice_weight": 5.0,
    "no_object_weight": 0.1,
    "train_num_points": 12544,
    "oversample_ratio": 3.0,
    "importance_sample_ratio": 0.75,
}
_INT_SETTINGS = {"num_queries": 1, "num_blocks": 1, "num_upscale_blocks": 0, "train_num_points": 1}


def mask_head_settings(head: str, head_kwargs: dict | None, depth: int | None = None) -> dict:
    """`head_kwargs` of a mask-transformer head merged into `MASK_HEAD_DEFAULTS`, checked.

    Args:
        head: `"eomt"` or `"pmt"`.
        head_kwargs: the config's `head_kwargs`.
        depth: the backbone layers the model runs (the tapped layer); `num_blocks` may not exceed it.

    Raises:
        ValueError: an unknown key or a value out of range, naming the key and a valid value.
    """
    if head not in MASK_HEAD_NAMES:
        raise ValueError(f"{head!r} is not a mask-transformer head ({', '.join(MASK_HEAD_NAMES)}).")
    head_kwargs = dict(head_kwargs or {})
    unknown = set(head_kwargs) - set(MASK_HEAD_DEFAULTS)
    if unknown:
        raise ValueError(
            f"head_kwargs {sorted(unknown)} are not settings of head {head!r}. Valid: {sorted(MASK_HEAD_DEFAULTS)}."
        )
    settings = {**MASK_HEAD_DEFAULTS, **head_kwargs}
    for key, lowest in _INT_SETTINGS.items():
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(
                f"head_kwargs {key}={value!r} must be an int >= {lowest} (default {MASK_HEAD_DEFAULTS[key]})."
            )
    for key in ("class_weight", "mask_weight", "dice_weight", "no_object_weight", "oversample_ratio",
                "importance_sample_ratio"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"head_kwargs {key}={value!r} must be a finite number >= 0 (default {MASK_HEAD_DEFAULTS[key]})."
            )
        settings[key] = float(value)
    if settings["importance_sample_ratio"] > 1:
        raise ValueError(
            f"head_kwargs importance_sample_ratio={settings['importance_sample_ratio']} must lie in [0, 1] (the share "
            "of the sampled points chosen by uncertainty; default 0.75)."
        )
    if settings["oversample_ratio"] < 1:
        raise ValueError(
            f"head_kwargs oversample_ratio={settings['oversample_ratio']} must be >= 1 (candidate points per sampled "
            "point; default 3.0)."
        )
    if settings["class_weight"] == settings["mask_weight"] == settings["dice_weight"] == 0:
        raise ValueError("head_kwargs class_weight, mask_weight and dice_weight are all 0: the matcher needs one > 0.")
    if settings["hidden_act"] not in ACT2FN:
        raise ValueError(f"head_kwargs hidden_act={settings['hidden_act']!r} is not an activation of transformers "
                         "(e.g. 'gelu', 'relu', 'silu').")
    if depth is not None and settings["num_blocks"] > depth:
        what = "backbone blocks that take the queries" if head == "eomt" else "decoder layers copied from the backbone"
        raise ValueError(
            f"head_kwargs num_blocks={settings['num_blocks']} ({what}) exceeds the {depth} backbone layers the model "
            f"runs; choose num_blocks <= {depth}."
        )
    return settings


@dataclass
class ViTSegUniversalSegmenterOutput(ModelOutput):
    r"""
    Output of `ViTSegForUniversalSegmentation`, named as transformers' EoMT / Mask2Former outputs.

    Args:
        loss (`torch.FloatTensor`, *optional*):
            The loss summed over every prediction (deep supervision), with `mask_labels` and `class_labels`.
        class_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_labels + 1)`):
            Class logits per query after the last block; the last column is "no object".
        masks_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, height, width)`):
            Mask logits per query at `2 ** num_upscale_blocks` times the patch grid (H/4 for patch 16 and 2 upscale
            blocks); the image processor's post-processing upsamples them.
        auxiliary_logits (`list[dict[str, torch.FloatTensor]]`, *optional*):
            The predictions before each masked block (`class_queries_logits`, `masks_queries_logits`), earliest
            first; None when no block computed one (eval with every `attn_mask_probs` at 0).
        loss_dict (`dict[str, torch.FloatTensor]`, *optional*):
            The weighted `loss_cross_entropy`, `loss_mask` and `loss_dice`, each summed over the predictions; they
            add up to `loss`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            The backbone's hidden states (with the queries in front from the first block that takes them), or for
            `pmt` the frozen backbone's.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            The backbone's attention probabilities.
    """

    loss: torch.FloatTensor | None = None
    class_queries_logits: torch.FloatTensor | None = None
    masks_queries_logits: torch.FloatTensor | None = None
    auxiliary_logits: list[dict[str, torch.FloatTensor]] | None = None
    loss_dict: dict[str, torch.FloatTensor] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# -- the mask module: transformers' own EomtScaleLayer / EomtMaskHead (same parameter names, so EoMT checkpoints
# convert key for key) ---------------------------------------------------------------------------------------------
def _eomt_mask_module(hidden_size: int, hidden_act: str, num_upscale_blocks: int) -> tuple[nn.Module, nn.ModuleList]:
    """The MLP on the query tokens (the mask embeddings) and the 2x upscaling layers of the patch map (transposed
    conv, activation, depthwise 3x3 conv, LayerNorm2d), built from transformers' EoMT classes."""
    from transformers.models.eomt.modeling_eomt import EomtMaskHead, EomtScaleLayer

    settings = SimpleNamespace(hidden_size=hidden_size, hidden_act=hidden_act)
    return EomtMaskHead(settings), nn.ModuleList(EomtScaleLayer(settings) for _ in range(num_upscale_blocks))


class MaskTransformerHead(nn.Module):
    """What `eomt` and `pmt` share: the learnable queries, the mask module and masked attention.

    Args:
        hidden_size: the backbone's width.
        num_labels: K real classes (the class predictor has K + 1 outputs, the last "no object").
        num_prefix_tokens: CLS / distillation / register tokens between the queries and the patch tokens.
        settings: `mask_head_settings(...)`.
    """

    head_name = ""
    # the parts of the pixel-head contract (`BaseHead`'s class attributes) that the feature cache and the ONNX export
    # read from any model's head
    uses_pixel_values = False
    onnx_exportable = True
    onnx_dynamic_size = True
    onnx_export_reason = ""

    def __init__(self, hidden_size: int, num_labels: int, num_prefix_tokens: int, settings: dict):
        super().__init__()
        self.settings = dict(settings)
        self.num_queries = int(settings["num_queries"])
        self.num_blocks = int(settings["num_blocks"])
        self.num_prefix_tokens = num_prefix_tokens
        self.query = nn.Embedding(self.num_queries, hidden_size)
        self.class_predictor = nn.Linear(hidden_size, num_labels + 1)
        self.mask_head, self.upscale_block = _eomt_mask_module(
            hidden_size, settings["hidden_act"], int(settings["num_upscale_blocks"])
        )

    def reset_mask_module(self) -> None:
        """EoMT's initialisation of the queries (N(0, 1)) and of the mask module's linears and convs (PyTorch's
        default, kaiming-uniform), through transformers' guarded init functions (weights loaded from a checkpoint
        are left alone)."""
        init.normal_(self.query.weight, mean=0.0, std=1.0)
        for module in [self.class_predictor, *self.mask_head.modules(), *self.upscale_block.modules()]:
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                if module.bias is not None:
                    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                    init.uniform_(module.bias, -bound, bound)
            elif isinstance(module, nn.LayerNorm):
                init.ones_(module.weight)
                init.zeros_(module.bias)

    def queries(self, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        return self.query.weight[None].expand(batch_size, -1, -1).to(like.dtype)

    def predict(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks `(B, Q, h', w')` and classes `(B, Q, K + 1)` from normed tokens `[queries; prefix; patches]`."""
        queries = tokens[:, : self.num_queries]
        class_logits = self.class_predictor(queries)
        patches = tokens[:, self.num_queries + self.num_prefix_tokens :]
        patch_map = patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid_hw)
        for layer in self.upscale_block:
            patch_map = layer(patch_map)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_head(queries), patch_map)
        return mask_logits, class_logits

    def attention_mask(self, mask_logits: torch.Tensor, grid_hw: tuple[int, int], prob: float, seq_len: int,
                       dtype: torch.dtype) -> torch.Tensor:
        """EoMT's masked attention as an additive mask `(B, 1, N, N)`: query `q` may attend to patch `p` only where
        its mask logit (resized to the patch grid) is positive; every other pair attends. Each query's mask is
        dropped (plain attention) with probability `1 - prob`, drawn as transformers draws it."""
        batch, num_queries = mask_logits.shape[:2]
        start = num_queries + self.num_prefix_tokens
        allowed = F.interpolate(mask_logits, size=grid_hw, mode="bilinear").flatten(2) > 0  # (B, Q, h*w)
        if prob < 1:
            dropped = torch.rand(batch, num_queries, device=mask_logits.device) > prob
            allowed = allowed | dropped[..., None]
        additive = torch.zeros(batch, 1, seq_len, seq_len, dtype=dtype, device=mask_logits.device)
        additive[:, 0, :num_queries, start:] = (~allowed).to(dtype) * torch.finfo(dtype).min
        return additive

    def run_blocks(self, hidden: torch.Tensor, layers, norm: nn.Module, run_layer, layer_kwargs: dict,
                   grid_hw: tuple[int, int], probs: list[float], all_hidden: list | None):
        """Run the masked `layers` over `hidden` (the queries in front): before layer `i`, when training or when
        `probs[i]` is above 0, a prediction from the normed tokens and the masked attention it gives; otherwise
        plain attention. Returns the final normed tokens and the predictions made before the layers."""
        predictions = []
        for layer, prob in zip(layers, probs):
            attention_mask = None
            if self.training or prob > 0:
                masks, classes = self.predict(norm(hidden), grid_hw)
                predictions.append((masks, classes))
                attention_mask = self.attention_mask(masks, grid_hw, prob, hidden.shape[1], hidden.dtype)
            hidden = run_layer(layer, hidden, layer_kwargs, attention_mask)
            if all_hidden is not None:
                all_hidden.append(hidden)
        return norm(hidden), predictions


class EomtHead(MaskTransformerHead):
    """`eomt`: the queries enter the backbone before its last `num_blocks` layers (of the layers up to the tap)."""

    head_name = "eomt"

    def forward(self, adapter, pixel_values: torch.Tensor, probs: list[float], output_hidden_states: bool = False):
        """Returns `(predictions, hidden_states)`: `predictions` a list of `(masks, classes)`, the last after the
        last block; `hidden_states` the per-layer tokens (embeddings first) when asked for."""
        hidden, layer_kwargs, grid_hw = adapter.embed_tokens(pixel_values)
        depth = max(adapter.out_indices)
        layers = adapter.layers[:depth]
        start = depth - self.num_blocks
        all_hidden = [hidden] if output_hidden_states else None
        norm = adapter.final_norm
        for layer in layers[:start]:
            hidden = adapter.run_layer(layer, hidden, layer_kwargs)
            if all_hidden is not None:
                all_hidden.append(hidden)
        hidden = torch.cat([self.queries(hidden.shape[0], hidden), hidden], dim=1)
        hidden, predictions = self.run_blocks(
            hidden, layers[start:], norm, adapter.run_layer, layer_kwargs, grid_hw, probs, all_hidden
        )
        predictions.append(self.predict(hidden, grid_hw))
        return predictions, tuple(all_hidden) if all_hidden is not None else None


class PmtHead(MaskTransformerHead):
    """`pmt`: `num_blocks` decoder layers, deep copies of the backbone's last blocks up to the tap, over
    [queries; prefix + patch tokens of the tap], and a copy of the backbone's final norm."""

    head_name = "pmt"

    def __init__(self, hidden_size: int, num_labels: int, num_prefix_tokens: int, settings: dict, adapter):
        super().__init__(hidden_size, num_labels, num_prefix_tokens, settings)
        self.layers = nn.ModuleList(self._copies(adapter))
        self.norm = copy.deepcopy(adapter.final_norm) if adapter.final_norm is not None else nn.Identity()

    def _copies(self, adapter) -> list[nn.Module]:
        depth = max(adapter.out_indices)
        config = adapter.model.config
        # the copies share the backbone's config object: the attention implementation switches with the backbone's
        last_blocks = adapter.layers[depth - self.num_blocks : depth]
        return [copy.deepcopy(layer, memo={id(config): config}) for layer in last_blocks]

    @torch.no_grad()
    def copy_from_backbone(self, adapter) -> None:
        """Set the decoder layers (and norm) to the backbone's last blocks up to the tap (and its final norm): the
        PMT initialisation. Called after the model is built and after pretrained backbone weights are loaded."""
        depth = max(adapter.out_indices)
        for copy_layer, layer in zip(self.layers, adapter.layers[depth - self.num_blocks:depth]):
            copy_layer.load_state_dict(layer.state_dict())
        if adapter.final_norm is not None:
            self.norm.load_state_dict(adapter.final_norm.state_dict())

    def forward(self, adapter, features: BackboneFeatures, probs: list[float]):
        """`predictions` (a list of `(masks, classes)`, the last after the last decoder layer) from the backbone
        features of the tap: `features.feature_maps[-1]` and `features.prefix_tokens[-1]`."""
        patch_map = features.feature_maps[-1]
        batch, _, height, width = patch_map.shape
        tokens = patch_map.flatten(2).transpose(1, 2)
        if self.num_prefix_tokens:
            if features.prefix_tokens is None:
                raise ValueError(
                    f"pmt decodes [queries; {self.num_prefix_tokens} prefix tokens; patches], but these features carry "
                    "no prefix_tokens; compute them with the model's backbone (model.backbone(pixel_values))."
                )
            tokens = torch.cat([features.prefix_tokens[-1], tokens], dim=1)
        layer_kwargs = adapter.layer_kwargs_for_grid((height, width), patch_map)
        hidden = torch.cat([self.queries(batch, tokens), tokens], dim=1)
        hidden, predictions = self.run_blocks(
            hidden, self.layers, self.norm, adapter.run_layer, layer_kwargs, (height, width), probs, None
        )
        predictions.append(self.predict(hidden, (height, width)))
        return predictions


def build_mask_head(config, adapter) -> MaskTransformerHead:
    """The `eomt` or `pmt` head of `config` over the backbone `adapter`."""
    settings = mask_head_settings(config.head, config.head_kwargs, max(adapter.out_indices))
    hidden_size = adapter.out_channels[-1]
    if config.head == "eomt":
        return EomtHead(hidden_size, config.num_labels, adapter.num_prefix_tokens, settings)
    return PmtHead(hidden_size, config.num_labels, adapter.num_prefix_tokens, settings, adapter)


# -- loss ------------------------------------------------------------------------------------------------------
def check_mask_targets(mask_labels, class_labels, batch_size: int, num_labels: int, validate: bool = True,
                       image_size: tuple[int, int] | None = None) -> None:
    """Refuse targets that do not fit the contract, with one line naming the problem. `image_size`: the (padded)
    input's height and width, which every mask must cover pixel for pixel (the loss samples masks at normalised
    positions, so a mask of another size would silently train on shifted or stretched targets)."""
    if (mask_labels is None) != (class_labels is None):
        raise ValueError("Pass mask_labels and class_labels together (one mask per target and its class), or neither.")
    if isinstance(mask_labels, torch.Tensor) or isinstance(class_labels, torch.Tensor):
        raise TypeError(
            "mask_labels and class_labels are lists (one entry per image) of (N_i, H, W) masks and (N_i,) class ids; "
            "got a tensor. Build them with ViTSegImageProcessor(..., return_mask_labels=True)."
        )
    if len(mask_labels) != batch_size or len(class_labels) != batch_size:
        raise ValueError(f"mask_labels and class_labels need one entry per image: batch {batch_size}, got "
                         f"{len(mask_labels)} and {len(class_labels)}.")
    for i, (masks, classes) in enumerate(zip(mask_labels, class_labels)):
        if masks.ndim != 3 or classes.ndim != 1 or masks.shape[0] != classes.shape[0]:
            raise ValueError(
                f"Image {i}: mask_labels must be (N, H, W) and class_labels (N,) with the same N, got "
                f"{tuple(masks.shape)} and {tuple(classes.shape)}."
            )
        if classes.is_floating_point():
            raise TypeError(f"Image {i}: class_labels must be integer class ids, got {classes.dtype}.")
        if image_size is not None and tuple(masks.shape[-2:]) != tuple(image_size):
            raise ValueError(
                f"Image {i}: mask_labels are {masks.shape[-2]}x{masks.shape[-1]} but the input is "
                f"{image_size[0]}x{image_size[1]}: masks must be padded and resized with the image "
                "(ViTSegImageProcessor(..., return_mask_labels=True) does both)."
            )
        if validate and masks.numel() and not (torch.isfinite(masks).all() and masks.min() >= 0 and masks.max() <= 1):
            raise ValueError(
                f"Image {i}: mask_labels must hold values in [0, 1] (1 = the target's pixels), got "
                f"{float(masks.min())}..{float(masks.max())}; non-finite or out-of-range masks poison the loss."
            )
        if validate and classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_labels):
            raise ValueError(
                f"Image {i}: class_labels hold {int(classes.min())}..{int(classes.max())}, outside [0, {num_labels}) "
                f"(num_labels={num_labels}; the no-object class is implicit, never a label)."
            )


def mask_classification_loss(predictions, mask_labels, class_labels, settings: dict, num_labels: int):
    """transformers' EoMT loss of every prediction, summed as `EomtForUniversalSegmentation` sums it.

    Args:
        predictions: `(masks_queries_logits, class_queries_logits)` pairs, in the order the blocks made them.
        mask_labels / class_labels: per image, `(N_i, H, W)` float masks and `(N_i,)` class ids.
        settings: the head's settings (loss weights, point sampling).

    Returns:
        `(loss, loss_dict)`: the total and the weighted `loss_cross_entropy` / `loss_mask` / `loss_dice` summed over
        the predictions.

    Raises:
        ImportError: without scipy (the Hungarian matcher's `linear_sum_assignment`).
    """
    try:
        import scipy.optimize  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "The mask-transformer loss (Hungarian matching) needs scipy: pip install scipy (or hf-vitseg[mask])."
        ) from error
    from transformers.models.eomt.modeling_eomt import EomtLoss

    weight_dict = {
        "loss_cross_entropy": settings["class_weight"],
        "loss_mask": settings["mask_weight"],
        "loss_dice": settings["dice_weight"],
    }
    loss_config = SimpleNamespace(
        num_labels=num_labels, no_object_weight=settings["no_object_weight"],
        train_num_points=settings["train_num_points"], oversample_ratio=settings["oversample_ratio"],
        importance_sample_ratio=settings["importance_sample_ratio"], class_weight=settings["class_weight"],
        dice_weight=settings["dice_weight"], mask_weight=settings["mask_weight"],
    )
    criterion = EomtLoss(config=loss_config, weight_dict=weight_dict).to(predictions[-1][1].device)
    mask_labels = [m.to(predictions[-1][0].dtype) for m in mask_labels]
    loss = 0.0
    loss_dict: dict[str, torch.Tensor] = {}
    for masks, classes in predictions:
        terms = criterion(masks_queries_logits=masks, class_queries_logits=classes, mask_labels=mask_labels,
                          class_labels=class_labels, auxiliary_predictions=None)
        for key, weight in weight_dict.items():  # as EomtForUniversalSegmentation.get_loss_dict weighs them
            for term_key in terms:
                if key in term_key:
                    terms[term_key] = terms[term_key] * weight
        loss = loss + sum(terms.values())
        for key, value in terms.items():
            loss_dict[key] = loss_dict[key] + value if key in loss_dict else value
    return loss, loss_dict
