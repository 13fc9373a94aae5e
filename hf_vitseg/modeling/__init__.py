"""Everything that travels to the Hub with a checkpoint: config, model, backbone adapter, heads, losses.

A flat folder with sibling imports only, importing only torch and transformers: transformers' remote-code
saver copies a model's module and its relative imports into one flat folder.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation

from .configuration_vitseg import ViTSegConfig
from .head_base import BackboneFeatures, BaseHead, get_head_class, list_heads, register_head
from .image_processing_vitseg import ViTSegImageProcessor
from .modeling_vitseg import ViTSegForSemanticSegmentation, ViTSegPreTrainedModel

# The one place hf-vitseg registers with the Auto classes: `import hf_vitseg` imports this package (except for
# `hf-vitseg --help`), and so does every module that uses the model.
AutoConfig.register("vitseg", ViTSegConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(ViTSegConfig, ViTSegForSemanticSegmentation, exist_ok=True)
ViTSegConfig.register_for_auto_class()
ViTSegForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
AutoImageProcessor.register(ViTSegConfig, image_processor_classes={"pil": ViTSegImageProcessor}, exist_ok=True)
ViTSegImageProcessor.register_for_auto_class()

__all__ = [
    "BackboneFeatures",
    "BaseHead",
    "ViTSegConfig",
    "ViTSegForSemanticSegmentation",
    "ViTSegImageProcessor",
    "ViTSegPreTrainedModel",
    "get_head_class",
    "list_heads",
    "register_head",
]
