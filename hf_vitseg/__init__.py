"""hf-vitseg: any Hugging Face ViT backbone, any semantic-segmentation head, by config.

Importing this package registers `ViTSegConfig` with `AutoConfig`, `ViTSegForSemanticSegmentation` with
`AutoModelForSemanticSegmentation` and `ViTSegImageProcessor` with `AutoImageProcessor`, and marks them for
remote code, so `save_pretrained` writes `auto_map` and the source files that let
`from_pretrained(..., trust_remote_code=True)` work where hf-vitseg is not installed.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation

from .modeling import (
    BackboneFeatures,
    BaseHead,
    ViTSegConfig,
    ViTSegForSemanticSegmentation,
    ViTSegPreTrainedModel,
    get_head_class,
    list_heads,
    ViTSegImageProcessor,
    register_head,
)


__version__ = "0.1.0.dev0"

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
    "__version__",
]
