"""`unwrap_model`: the hf-vitseg model inside a PEFT wrapper, without importing peft.

The one place that unwraps; training (optimizer groups, LoRA, resume, the trainer), the processor choice and
the CLI all ask it. A PEFT model forwards attribute access to the model it wraps (`peft_model.size_divisor`,
`peft_model.config` work), but its modules and parameter names are its own (`base_model.model.head...`), so
code that walks modules or loads state dicts needs the model itself.
"""

from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a PEFT model (the LoRA recipe's `PeftModel`), or `model` itself when it is not wrapped.

    Args:
        model: a `ViTSegForSemanticSegmentation`, or a PEFT model around one.
    """
    # `get_base_model` is PEFT's own way to reach the wrapped model; duck-typed so peft need not be imported.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` carries PEFT adapters (a `PeftModel`), without importing peft."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


__all__ = ["is_peft_model", "unwrap_model"]
