"""Everything that travels to the Hub with a checkpoint: config, model, backbone adapter, heads, losses.

A flat folder with sibling imports only, importing only torch and transformers: transformers' remote-code
saver copies a model's module and its relative imports into one flat folder.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForSemanticSegmentation,
    AutoModelForUniversalSegmentation,
)

# The public names, re-exported (`X as X`); `hf_vitseg.__all__` lists them for the package.
from .configuration_vitseg import ViTSegConfig as ViTSegConfig
from .head_base import BackboneFeatures as BackboneFeatures
from .head_base import BaseHead as BaseHead
from .head_base import get_head_class as get_head_class
from .head_base import list_heads as list_heads
from .head_base import register_head as register_head
from .image_processing_vitseg import ViTSegImageProcessor as ViTSegImageProcessor
from .mask_transformer import ViTSegUniversalSegmenterOutput as ViTSegUniversalSegmenterOutput
from .modeling_vitseg import ViTSegForSemanticSegmentation as ViTSegForSemanticSegmentation
from .modeling_vitseg import ViTSegForUniversalSegmentation as ViTSegForUniversalSegmentation
from .modeling_vitseg import ViTSegPreTrainedModel as ViTSegPreTrainedModel

# The one place hf-vitseg registers with the Auto classes: `import hf_vitseg` imports this package (except for
# `hf-vitseg --help`), and so does every module that uses the model.
AutoConfig.register("vitseg", ViTSegConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(ViTSegConfig, ViTSegForSemanticSegmentation, exist_ok=True)
ViTSegConfig.register_for_auto_class()
ViTSegForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
AutoModelForUniversalSegmentation.register(ViTSegConfig, ViTSegForUniversalSegmentation, exist_ok=True)
ViTSegForUniversalSegmentation.register_for_auto_class("AutoModelForUniversalSegmentation")
AutoImageProcessor.register(ViTSegConfig, image_processor_classes={"pil": ViTSegImageProcessor}, exist_ok=True)
ViTSegImageProcessor.register_for_auto_class()

