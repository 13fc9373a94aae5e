"""Everything that travels to the Hub with a checkpoint: config, model, backbone adapter, heads, losses.

A flat folder with sibling imports only, importing only torch and transformers: transformers' remote-code
saver copies a model's module and its relative imports into one flat folder.
"""

from .configuration_vitseg import ViTSegConfig
from .head_base import BackboneFeatures, BaseHead, get_head_class, list_heads, register_head
from .image_processing_vitseg import ViTSegImageProcessor
from .modeling_vitseg import ViTSegForSemanticSegmentation, ViTSegPreTrainedModel
