"""Import the weights of transformers' segmentation models into hf-vitseg heads: one entry point,
`load_peer_head_weights(vitseg_model, peer_model)`, for every peer:

- `UperNetForSemanticSegmentation.decode_head` (`UperNetHead`) -> `upernet` (`convert_upernet_decode_head`);
- `SegformerForSemanticSegmentation.decode_head` (`SegformerDecodeHead`) -> `segformer`
  (`convert_segformer_decode_head`);
- `DPTForSemanticSegmentation`'s neck and head -> `dpt` (`convert_dpt_neck_and_head`; build the head with
  `dpt_head_kwargs(dpt_config)`).

The state-dict converters take a state dict of the decode head itself or of the whole task model (keys under
`decode_head.`; the backbone and UperNet's auxiliary FCN head are left out) and return a state dict of our head
module. Only the head travels: the peer's backbone is a different model (transformers' UperNet on a ViT keeps
every level at one stride; our heads follow the pyramid neck).

DPT:
transformers' `DPTNeck` (reassemble stage, 3x3 convs, fusion stage) and `DPTSemanticSegmentationHead` map
one to one onto hf-vitseg's `DPTHead` (`hf_vitseg/modeling/head_dpt.py`), except for three things that are
dropped or need no weights: the first residual unit of the coarsest fusion layer (transformers never uses
it), the final x2 upsampling of the head (hf-vitseg leaves it to the loss and post-processing) and the
auxiliary head (hf-vitseg's own auxiliary head reads a backbone tap, not the fused maps).

The backbone is not converted: DPT's taps are raw layer outputs, so a ViTSeg model that should reproduce a
DPT checkpoint taps the same layers (DPT's 0-based `backbone_out_indices` + 1) with
`backbone_apply_layernorm=False` and `head_kwargs` matching the DPT config, see `dpt_head_kwargs`.
"""

from __future__ import annotations

import re

import torch
from torch import nn


def _decode_head_part(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys relative to the decode head, whether `state_dict` is the head's own or the whole model's."""
    if any(k.startswith("decode_head.") for k in state_dict):
        return {k[len("decode_head."):]: v for k, v in state_dict.items() if k.startswith("decode_head.")}
    return dict(state_dict)


# transformers' UperNetHead modules -> ours; in each, UperNetConvModule's (conv, batch_norm) -> ConvNormAct's (0, 1).
_UPERNET_MODULES = {
    r"psp_modules\.(\d+)\.1": "ppm.{}.1",
    r"bottleneck": "ppm_bottleneck",
    r"lateral_convs\.(\d+)": "lateral_convs.{}",
    r"fpn_convs\.(\d+)": "fpn_convs.{}",
    r"fpn_bottleneck": "fuse",
}
_UPERNET_LAYERS = {"conv": "0", "batch_norm": "1"}


def convert_upernet_decode_head(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `UperNetHead` weights -> weights of our `upernet` head (`UperNetHead` in `head_upernet.py`)."""
    converted = {}
    for key, value in _decode_head_part(state_dict).items():
        if key.startswith("classifier."):
            converted[key] = value
            continue
        parts = re.fullmatch(r"(.+)\.(conv|batch_norm)\.(\w+)", key)  # module, layer, parameter
        module = None
        for theirs, ours in _UPERNET_MODULES.items() if parts else ():
            if match := re.fullmatch(theirs, parts.group(1)):
                module = ours.format(*match.groups())
        if module is None:
            raise ValueError(f"Unexpected UperNet decode-head key {key!r}.")
        converted[f"{module}.{_UPERNET_LAYERS[parts.group(2)]}.{parts.group(3)}"] = value
    return converted


def convert_segformer_decode_head(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `SegformerDecodeHead` weights -> weights of our `segformer` head (`head_segformer.py`).

    The per-level `nn.Linear` projections become 1x1 convs; the fuse conv keeps transformers' input order
    (coarsest level first), which ours uses too.
    """
    converted = {}
    for key, value in _decode_head_part(state_dict).items():
        match = re.match(r"^linear_projections\.(\d+)\.proj\.(weight|bias)$", key)
        if match:
            level, name = match.groups()
            converted[f"projections.{level}.{name}"] = value[:, :, None, None] if name == "weight" else value
        elif key.startswith("linear_fuse."):
            converted["fuse.0." + key[len("linear_fuse."):]] = value
        elif key.startswith("batch_norm."):
            converted["fuse.1." + key[len("batch_norm."):]] = value
        elif key.startswith("classifier."):
            converted[key] = value
        else:
            raise ValueError(f"Unexpected Segformer decode-head key {key!r}.")
    return converted


def load_peer_head_weights(vitseg_model: nn.Module, peer_model: nn.Module) -> nn.Module:
    """Copy the head of a transformers `UperNetForSemanticSegmentation`, `SegformerForSemanticSegmentation` or
    `DPTForSemanticSegmentation` (neck and head) into `vitseg_model.head` (an `upernet`, `segformer` or `dpt` head
    of matching widths, levels and labels; `vitseg_model` may also be the bare head).

    Raises `ValueError` naming every mismatch (head type, pool scales, missing keys, shapes). Returns `vitseg_model`.
    """
    from transformers import (
        DPTForSemanticSegmentation,
        SegformerForSemanticSegmentation,
        UperNetForSemanticSegmentation,
    )

    if isinstance(peer_model, DPTForSemanticSegmentation):
        _load_dpt_peer_weights(vitseg_model, peer_model)
        return vitseg_model

    from .modeling.head_segformer import SegFormerHead
    from .modeling.head_upernet import UperNetHead

    head = getattr(vitseg_model, "head", vitseg_model)
    if isinstance(peer_model, UperNetForSemanticSegmentation):
        expected_head, converter = UperNetHead, convert_upernet_decode_head
    elif isinstance(peer_model, SegformerForSemanticSegmentation):
        expected_head, converter = SegFormerHead, convert_segformer_decode_head
    else:
        raise ValueError(
            "load_peer_head_weights takes an UperNetForSemanticSegmentation, a SegformerForSemanticSegmentation or a "
            f"DPTForSemanticSegmentation, "
            f"got {type(peer_model).__name__}."
        )
    if not isinstance(head, expected_head):
        raise ValueError(
            f"{type(peer_model).__name__}'s decode head goes into a {expected_head.head_name!r} head; this model's "
            f"head is {getattr(head, 'head_name', type(head).__name__)!r}. Build it with head="
            f"{expected_head.head_name!r}."
        )
    if expected_head is UperNetHead and tuple(peer_model.config.pool_scales) != head.pool_scales:
        raise ValueError(
            f"Pool scales differ: the peer uses {tuple(peer_model.config.pool_scales)}, this head {head.pool_scales}; "
            f"pass head_kwargs={{'pool_scales': {list(peer_model.config.pool_scales)}}}."
        )
    source = converter(peer_model.decode_head.state_dict())
    target = head.state_dict()
    problems = [f"{k}: missing in the peer" for k in target if k not in source]
    problems += [f"{k}: not in this head" for k in source if k not in target]
    problems += [
        f"{k}: peer {tuple(v.shape)} vs this head {tuple(target[k].shape)}"
        for k, v in source.items() if k in target and v.shape != target[k].shape
    ]
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise ValueError(
            f"{type(peer_model).__name__}'s decode head does not fit this {expected_head.head_name!r} head "
            f"(compare widths `channels`, backbone level channels and num_labels):\n  " + "\n  ".join(shown)
        )
    head.load_state_dict(source)
    return vitseg_model


# -- DPT ----------------------------------------------------------------------------------------------------
_RENAMES = [
    (r"^neck\.reassemble_stage\.readout_projects\.(\d+)\.0\.", r"readout_projects.\1.0."),
    (r"^neck\.reassemble_stage\.layers\.(\d+)\.projection\.", r"reassemble.\1.projection."),
    (r"^neck\.reassemble_stage\.layers\.(\d+)\.resize\.", r"reassemble.\1.resample."),
    (r"^neck\.convs\.(\d+)\.", r"convs.\1."),
    (r"^neck\.fusion_stage\.layers\.(\d+)\.projection\.", r"fusion.\1.projection."),
    (r"^neck\.fusion_stage\.layers\.(\d+)\.residual_layer1\.", r"fusion.\1.skip_unit."),
    (r"^neck\.fusion_stage\.layers\.(\d+)\.residual_layer2\.", r"fusion.\1.residual_unit."),
    (r"^head\.head\.0\.", "head_conv.0."),
    (r"^head\.head\.1\.", "head_conv.1."),
    (r"^head\.head\.4\.", "classifier."),
]
_UNIT_RENAMES = {"convolution1": "conv1", "convolution2": "conv2", "batch_norm1": "norm1", "batch_norm2": "norm2"}


def convert_dpt_neck_and_head(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `DPTForSemanticSegmentation` state dict -> the state dict of hf-vitseg's `DPTHead` (keys relative to
    the head). Backbone (`dpt.*`) and auxiliary head weights are left out, and so is the unused first residual
    unit of the coarsest fusion layer."""
    converted = {}
    for key, value in state_dict.items():
        for pattern, replacement in _RENAMES:
            new_key, found = re.subn(pattern, replacement, key)
            if found:
                break
        else:
            continue  # backbone, auxiliary head
        if new_key.startswith("fusion.0.skip_unit."):
            continue
        if "_unit." in new_key:
            prefix, name, rest = new_key.rsplit(".", 2)
            new_key = f"{prefix}.{_UNIT_RENAMES[name]}.{rest}"
        converted[new_key] = value
    return converted


def dpt_head_kwargs(dpt_config) -> dict:
    """The `head_kwargs` of a `dpt` head with the architecture of a (non-hybrid) `DPTConfig`."""
    if dpt_config.is_hybrid:
        raise ValueError("DPT-Hybrid (a BiT backbone for the first two levels) has no hf-vitseg equivalent.")
    bias = dpt_config.use_bias_in_fusion_residual
    if bias is not None and bias == dpt_config.use_batch_norm_in_fusion_residual:
        raise ValueError(
            "hf-vitseg's residual conv units have a bias exactly when they have no BatchNorm; this DPT config "
            f"has use_bias_in_fusion_residual={bias}, use_batch_norm_in_fusion_residual={bias}."
        )
    return {
        "reassemble_channels": list(dpt_config.neck_hidden_sizes),
        "fusion_channels": dpt_config.fusion_hidden_size,
        "readout": dpt_config.readout_type,
        "reassemble_factors": list(dpt_config.reassemble_factors),
        "fusion_batch_norm": bool(dpt_config.use_batch_norm_in_fusion_residual),
        "dropout": dpt_config.semantic_classifier_dropout,
    }


def _load_dpt_peer_weights(vitseg_model, dpt_model) -> None:
    """Copy the neck and head weights of a `DPTForSemanticSegmentation` into `vitseg_model.head` (a `dpt`
    head built with `dpt_head_kwargs(dpt_model.config)`, or a bare `DPTHead`); strict: any architecture
    mismatch is an error."""
    head = getattr(vitseg_model, "head", vitseg_model)
    if getattr(head, "head_name", None) != "dpt":
        raise ValueError(f"load_peer_head_weights(DPT) needs a model with a 'dpt' head, got {type(head).__name__}.")
    if dpt_model.config.head_in_index != -1:
        raise ValueError("DPT's segmentation head must read the finest fused map (head_in_index=-1).")
    expected = dpt_head_kwargs(dpt_model.config)
    if head.readout != expected["readout"]:
        raise ValueError(f"Readout differs: the head has {head.readout!r}, the DPT model {expected['readout']!r}.")
    head.load_state_dict(convert_dpt_neck_and_head(dpt_model.state_dict()), strict=True)
