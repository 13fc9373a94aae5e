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

EoMT:
`convert_eomt(model_or_path)` turns a whole `EomtForUniversalSegmentation` (its own DINOv2-with-registers ViT) into
a `ViTSegForUniversalSegmentation` with a `dinov2_with_registers` backbone and head `eomt`, and an
`EomtDinov3ForUniversalSegmentation` into one with a `dinov3_vit` backbone: same layers, weights copied one to one,
equal outputs (tests/test_convert_eomt.py). EoMT's position embedding covers the patches only; DINOv2's has a CLS
position too, set to zero, so the CLS token enters unchanged as in EoMT.

The backbone is not converted: DPT's taps are raw layer outputs, so a ViTSeg model that should reproduce a
DPT checkpoint taps the same layers (DPT's 0-based `backbone_out_indices` + 1) with
`backbone_apply_layernorm=False` and `head_kwargs` matching the DPT config, see `dpt_head_kwargs`.
"""

from __future__ import annotations

import os
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


# -- EoMT ------------------------------------------------------------------------------------------------------
# (EoMT key prefix, ours) per EoMT model type; layer keys keep their tail, but for the attention output projection.
_EOMT_LAYOUT = {
    "eomt": {"layers": "backbone.model.encoder.layer.", "layernorm": "backbone.model.layernorm.",
             "embeddings": "backbone.model.embeddings.", "family": "dinov2_with_registers"},
    "eomt_dinov3": {"layers": "backbone.model.model.layer.", "layernorm": "backbone.model.norm.",
                    "embeddings": "backbone.model.embeddings.", "family": "dinov3_vit"},
}


def _eomt_backbone_config(eomt_config):
    """The backbone config of our model that has EoMT's ViT layout."""
    from transformers import Dinov2WithRegistersConfig, DINOv3ViTConfig

    common = {k: getattr(eomt_config, k) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act", "initializer_range",
        "layer_norm_eps", "image_size", "patch_size", "num_channels", "layerscale_value", "drop_path_rate",
        "num_register_tokens",
    )}
    if eomt_config.model_type == "eomt":
        return Dinov2WithRegistersConfig(
            **common, mlp_ratio=eomt_config.mlp_ratio, use_swiglu_ffn=eomt_config.use_swiglu_ffn, qkv_bias=True,
            hidden_dropout_prob=eomt_config.hidden_dropout_prob,
            attention_probs_dropout_prob=eomt_config.attention_dropout,
        )
    rope = getattr(eomt_config, "rope_parameters", None) or {}
    return DINOv3ViTConfig(
        **common, intermediate_size=eomt_config.intermediate_size, attention_dropout=eomt_config.attention_dropout,
        rope_theta=rope.get("rope_theta", 100.0), query_bias=eomt_config.query_bias, key_bias=eomt_config.key_bias,
        value_bias=eomt_config.value_bias, proj_bias=eomt_config.proj_bias, mlp_bias=eomt_config.mlp_bias,
        use_gated_mlp=eomt_config.use_gated_mlp, pos_embed_shift=eomt_config.pos_embed_shift,
        pos_embed_jitter=eomt_config.pos_embed_jitter, pos_embed_rescale=eomt_config.pos_embed_rescale,
    )


def convert_eomt_state_dict(state_dict: dict[str, torch.Tensor], model_type: str = "eomt") -> dict[str, torch.Tensor]:
    """transformers' EoMT (`model_type` `"eomt"` or `"eomt_dinov3"`) weights -> `ViTSegForUniversalSegmentation`
    weights (head `eomt`, backbone `dinov2_with_registers` or `dinov3_vit`). The loss's `empty_weight` buffer is
    dropped (ours rebuilds it from `no_object_weight`)."""
    if model_type not in _EOMT_LAYOUT:
        raise ValueError(f"convert_eomt_state_dict converts model types {sorted(_EOMT_LAYOUT)}, got {model_type!r}.")
    layout = _EOMT_LAYOUT[model_type]
    converted = {}
    for key, value in state_dict.items():
        if key.startswith("criterion."):
            continue
        if key == "embeddings.position_embeddings.weight":  # (N, C) patches only -> (1, 1 + N, C), CLS position 0
            value = torch.cat([value.new_zeros(1, value.shape[-1]), value], dim=0)[None]
            converted[layout["embeddings"] + "position_embeddings"] = value
        elif key.startswith("embeddings."):
            converted[layout["embeddings"] + key[len("embeddings."):]] = value
        elif key.startswith("layers."):
            tail = key[len("layers."):].replace(".attention.out_proj.", ".attention.o_proj.")
            converted[layout["layers"] + tail] = value
        elif key.startswith("layernorm."):
            converted[layout["layernorm"] + key[len("layernorm."):]] = value
        elif key.startswith("upscale_block.block."):
            converted["head.upscale_block." + key[len("upscale_block.block."):]] = value
        elif key.startswith(("query.", "mask_head.", "class_predictor.")):
            converted["head." + key] = value
        elif key == "attn_mask_probs":
            converted[key] = value
        else:
            raise ValueError(f"convert_eomt_state_dict: unexpected EoMT weight {key!r}.")
    return converted


def convert_eomt(model_or_path, **config_kwargs):
    """A transformers EoMT model as a `ViTSegForUniversalSegmentation` with head `eomt`, equal outputs.

    Args:
        model_or_path: an `EomtForUniversalSegmentation` (-> a `dinov2_with_registers` backbone) or
            `EomtDinov3ForUniversalSegmentation` (-> a `dinov3_vit` backbone) instance, or a local folder or Hub id
            of one.
        **config_kwargs: other `ViTSegConfig` fields (e.g. `ignore_index`).

    Returns:
        the converted model, in the mode (train / eval) and dtype of the given one (eval when loaded from a path),
        with its `attn_mask_probs`, labels (`id2label`) and loss settings. Unlike transformers' EoMT, it runs at any
        input size that is a multiple of the patch size (position embeddings interpolated, DINOv3: RoPE per grid).

    Raises:
        ValueError: a model or folder that is not EoMT.
    """
    from transformers import AutoConfig, EomtDinov3ForUniversalSegmentation, EomtForUniversalSegmentation

    from .modeling import ViTSegConfig, ViTSegForUniversalSegmentation

    classes = {"eomt": EomtForUniversalSegmentation, "eomt_dinov3": EomtDinov3ForUniversalSegmentation}
    if isinstance(model_or_path, (str, os.PathLike)):
        model_type = getattr(AutoConfig.from_pretrained(str(model_or_path)), "model_type", None)
        if model_type not in classes:
            raise ValueError(
                f"{model_or_path} holds a {model_type!r} model; convert_eomt converts EoMT checkpoints "
                "(model_type 'eomt' or 'eomt_dinov3')."
            )
        eomt = classes[model_type].from_pretrained(str(model_or_path)).eval()
    else:
        eomt = model_or_path
        model_type = getattr(getattr(eomt, "config", None), "model_type", None)
        if not isinstance(eomt, nn.Module) or model_type not in classes:
            raise ValueError(
                f"convert_eomt takes an EomtForUniversalSegmentation or EomtDinov3ForUniversalSegmentation (or a "
                f"folder of one), got {type(model_or_path).__name__}."
            )
    eomt_config = eomt.config
    head_kwargs = {k: getattr(eomt_config, k) for k in (
        "num_queries", "num_blocks", "num_upscale_blocks", "hidden_act", "class_weight", "mask_weight",
        "dice_weight", "no_object_weight", "train_num_points", "oversample_ratio", "importance_sample_ratio",
    )}
    config = ViTSegConfig(
        backbone_config=_eomt_backbone_config(eomt_config), head="eomt", head_kwargs=head_kwargs,
        num_labels=eomt_config.num_labels, id2label=dict(eomt_config.id2label), **config_kwargs,
    )
    model = ViTSegForUniversalSegmentation(config)
    state = convert_eomt_state_dict(eomt.state_dict(), model_type)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("embeddings.mask_token")]  # never used (no masked modelling)
    if missing or unexpected:
        raise ValueError(f"convert_eomt: weights that do not map: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    dtype = next(eomt.parameters()).dtype
    return model.to(dtype).train(eomt.training)
