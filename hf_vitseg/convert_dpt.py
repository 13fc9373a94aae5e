"""Import the neck and segmentation head of transformers' `DPTForSemanticSegmentation` into a `dpt` head.

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


def load_dpt_peer_weights(vitseg_model, dpt_model) -> None:
    """Copy the neck and head weights of a `DPTForSemanticSegmentation` into `vitseg_model.head` (a `dpt`
    head built with `dpt_head_kwargs(dpt_model.config)`, or a bare `DPTHead`); strict: any architecture
    mismatch is an error."""
    head = getattr(vitseg_model, "head", vitseg_model)
    if getattr(head, "head_name", None) != "dpt":
        raise ValueError(f"load_dpt_peer_weights needs a model with a 'dpt' head, got {type(head).__name__}.")
    if dpt_model.config.head_in_index != -1:
        raise ValueError("DPT's segmentation head must read the finest fused map (head_in_index=-1).")
    expected = dpt_head_kwargs(dpt_model.config)
    if head.readout != expected["readout"]:
        raise ValueError(f"Readout differs: the head has {head.readout!r}, the DPT model {expected['readout']!r}.")
    head.load_state_dict(convert_dpt_neck_and_head(dpt_model.state_dict()), strict=True)
