"""Import the decode-head weights of transformers' segmentation models into hf-vitseg heads.

- `convert_upernet_decode_head`: `UperNetForSemanticSegmentation.decode_head` (`UperNetHead`) -> `upernet`.
- `convert_segformer_decode_head`: `SegformerForSemanticSegmentation.decode_head` (`SegformerDecodeHead`) ->
  `segformer`.
- `load_peer_head_weights(vitseg_model, peer_model)`: either of the above, straight into a
  `ViTSegForSemanticSegmentation` whose head has the same layer shapes.

The converters take a state dict of the decode head itself or of the whole task model (keys under `decode_head.`;
the backbone and UperNet's auxiliary FCN head are left out) and return a state dict of our head module, to load
with `model.head.load_state_dict(...)`. Only the head travels: the peer's backbone is a different model
(transformers' UperNet on a ViT keeps every level at one stride; our heads follow the pyramid neck).
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
    """Copy the decode head of a transformers `UperNetForSemanticSegmentation` or `SegformerForSemanticSegmentation`
    into `vitseg_model.head` (an `upernet` or `segformer` head of matching widths, levels and labels).

    Raises `ValueError` naming every mismatch (head type, pool scales, missing keys, shapes). Returns `vitseg_model`.
    """
    from transformers import SegformerForSemanticSegmentation, UperNetForSemanticSegmentation

    from .modeling.head_segformer import SegFormerHead
    from .modeling.head_upernet import UperNetHead

    head = vitseg_model.head
    if isinstance(peer_model, UperNetForSemanticSegmentation):
        expected_head, converter = UperNetHead, convert_upernet_decode_head
    elif isinstance(peer_model, SegformerForSemanticSegmentation):
        expected_head, converter = SegFormerHead, convert_segformer_decode_head
    else:
        raise ValueError(
            f"load_peer_head_weights takes an UperNetForSemanticSegmentation or a SegformerForSemanticSegmentation, "
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
