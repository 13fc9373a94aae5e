"""All built-in heads, imported so that they register themselves; plus the registry's public functions.

A new built-in head: add its file and one import line here.
"""

from .head_atm import ATMHead
from .head_base import (
    HEAD_REGISTRY,
    BackboneFeatures,
    BaseHead,
    get_head_class,
    list_heads,
    register_head,
)
from .head_conv import ConvHead
from .head_dpt import DPTHead
from .head_linear import LinearHead
from .head_mlp import MLPHead
from .head_segformer import SegFormerHead
from .head_segmenter import SegmenterHead
from .head_setr_mla import SETRMLAHead
from .head_setr_pup import SETRPUPHead
from .head_unet import UNetHead
from .head_upernet import UperNetHead

__all__ = [
    "HEAD_REGISTRY",
    "ATMHead",
    "BackboneFeatures",
    "BaseHead",
    "ConvHead",
    "DPTHead",
    "LinearHead",
    "MLPHead",
    "SETRMLAHead",
    "SETRPUPHead",
    "SegFormerHead",
    "SegmenterHead",
    "UNetHead",
    "UperNetHead",
    "get_head_class",
    "list_heads",
    "register_head",
]
