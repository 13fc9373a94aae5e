"""hf-vitseg: any Hugging Face ViT backbone, any semantic-segmentation head, by config.

Importing this package registers `ViTSegConfig` with `AutoConfig`, `ViTSegForSemanticSegmentation` with
`AutoModelForSemanticSegmentation`, `ViTSegForUniversalSegmentation` (heads `eomt`, `pmt`) with
`AutoModelForUniversalSegmentation` and `ViTSegImageProcessor` with `AutoImageProcessor`, and marks them for
remote code, so `save_pretrained` writes `auto_map` and the source files that let
`from_pretrained(..., trust_remote_code=True)` work where hf-vitseg is not installed.

The public names load on first use (module `__getattr__`), so `hf-vitseg --help` and `hf-vitseg COMMAND --help`
skip the import of the model (and of torch, about 5x the time of `import transformers`) and answer at once.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

__all__ = [
    "BackboneFeatures",
    "BaseHead",
    "ViTSegConfig",
    "ViTSegForSemanticSegmentation",
    "ViTSegForUniversalSegmentation",
    "ViTSegImageProcessor",
    "ViTSegPreTrainedModel",
    "ViTSegUniversalSegmenterOutput",
    "get_head_class",
    "list_heads",
    "register_head",
    "__version__",
]

if TYPE_CHECKING:
    from .modeling import (
        BackboneFeatures,
        BaseHead,
        ViTSegConfig,
        ViTSegForSemanticSegmentation,
        ViTSegForUniversalSegmentation,
        ViTSegImageProcessor,
        ViTSegPreTrainedModel,
        ViTSegUniversalSegmenterOutput,
        get_head_class,
        list_heads,
        register_head,
    )


def __getattr__(name: str):
    if name in __all__:
        value = getattr(importlib.import_module(".modeling", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _cli_help_only() -> bool:
    """Whether this process is `hf-vitseg --help` or `hf-vitseg COMMAND --help` (the console script is named
    `hf-vitseg.exe` on Windows at import time): help text needs no model, and a real command imports as usual."""
    argv = getattr(sys, "argv", None) or [""]
    return Path(argv[0]).stem == "hf-vitseg" and (len(argv) == 1 or "-h" in argv[1:] or "--help" in argv[1:])


if not _cli_help_only():
    importlib.import_module(".modeling", __name__)  # registers with the Auto classes
