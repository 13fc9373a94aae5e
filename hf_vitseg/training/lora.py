"""LoRA on the backbone's attention projections through PEFT, with the head trained in full.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022. The backbone's weights stay
frozen; each attention projection learns a low-rank update `(alpha / r) * B @ A`. The head, the neck and
the auxiliary head are trained in full (they are new, so there is nothing to adapt).

Which modules are the "attention projections" is a fact of the backbone family, in its record only
(`hf_vitseg/modeling/backbones.py`, `attention_projections`: e.g. `q_proj`, `k_proj`, `v_proj`, `o_proj` for
DINOv2, a fused `qkv` and `proj` for SAM); `attention_projection_names(model)` lists a model's.

Targets are anchored to `backbone.`: some heads (`atm`) have a `q_proj` of their own, which must train in
full rather than get an adapter. The head is not handed to PEFT's `modules_to_save`: PEFT matches those
names by suffix, so `"head"` would also wrap `auxiliary_head` and a head's own `class_head`, and `"neck"`
UperNet's `ppm_bottleneck`. Instead the head stays trainable in place and `save_lora` saves it beside the
adapter.

```python
model = apply_lora(ViTSegForSemanticSegmentation.from_pretrained_backbone("facebook/dinov2-small", num_labels=150))
...  # train
save_lora(model, "out/lora")            # adapter_model.safetensors + head_weights.safetensors + vitseg_config.json
model = load_lora("out/lora")           # re-fetches the backbone, applies adapter and head: identical logits
merged = model.merge_and_unload()       # a plain ViTSegForSemanticSegmentation; save_pretrained as usual
```
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from torch import nn

from ..modeling import ViTSegConfig, ViTSegForSemanticSegmentation
from ..modeling.modeling_vitseg import ViTSegPreTrainedModel
from ..unwrap import unwrap_model

__all__ = ["apply_lora", "attention_projection_names", "load_lora", "save_lora"]

HEAD_PARTS = ("head", "neck", "auxiliary_head")
HEAD_WEIGHTS_FILE = "head_weights.safetensors"
VITSEG_CONFIG_FILE = "vitseg_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
BASE_FOLDER = "base"


def _require_peft():
    try:
        import peft
    except ImportError as error:  # pragma: no cover - peft is a dependency of the training extras
        raise ImportError("LoRA needs PEFT: pip install peft") from error
    return peft


def attention_projection_names(model: nn.Module) -> list[str]:
    """Full names (as in `model.named_modules()`) of the backbone's attention projections (its family record's
    `attention_projections`, see the module docstring), in the layers the taps use: layers past the deepest tap
    never run, so they get no adapter."""
    return [f"backbone.{name}" for name in model.backbone.attention_projection_names()]


def _target_regex(model: nn.Module, target_modules) -> str:
    """A regex (PEFT full-matches it against module names) for the LoRA targets, anchored to the backbone."""
    linear_names = [f"backbone.{n}" for n, m in model.backbone.named_modules() if isinstance(m, nn.Linear)]
    if target_modules is None:
        names = attention_projection_names(model)
        if not names:
            raise ValueError(
                f"Found no attention projections in the {model.config.backbone_config.model_type} backbone; pass "
                f"target_modules (Linear layers there: {sorted({n.rsplit('.', 1)[1] for n in linear_names})})."
            )
        parents = sorted({n.rsplit(".", 2)[1] for n in names})
        leaves = sorted({n.rsplit(".", 1)[1] for n in names})
        pattern = rf"backbone\.(?:.*\.)?(?:{'|'.join(parents)})\.(?:{'|'.join(leaves)})"
        if {n for n in linear_names if re.fullmatch(pattern, n)} != set(names):
            pattern = "|".join(re.escape(n) for n in names)
        return pattern
    if isinstance(target_modules, str):
        pattern = target_modules
    else:
        pattern = rf"backbone\.(?:.*\.)?(?:{'|'.join(re.escape(t) for t in target_modules)})"
    if not any(re.fullmatch(pattern, n) for n, _ in model.named_modules()):
        raise ValueError(
            f"target_modules={target_modules!r} matches no module of the model. Backbone Linear layers: "
            f"{sorted({n.rsplit('.', 1)[1] for n in linear_names})} (a string is a regex over full module names "
            "such as 'backbone.model.encoder.layer.0.attention.q_proj'; a list names leaf modules of the backbone)."
        )
    return pattern


def apply_lora(
    model: ViTSegForSemanticSegmentation,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | list[str] | None = None,
    **lora_kwargs,
):
    """Wrap `model` in a PEFT `PeftModel` with LoRA on the backbone's attention projections.

    Args:
        model: a `ViTSegForSemanticSegmentation`. A frozen backbone (`freeze_backbone=True`) is unfrozen
            first, since the adapters live in it (PEFT then freezes the base weights itself).
        r, alpha, dropout: LoRA rank, scaling numerator (`alpha / r`) and dropout on the adapter input.
        target_modules: `None` (every attention projection, see the module docstring), a list of leaf
            module names inside the backbone (`["q_proj", "v_proj"]`), or a regex over full module names.
        **lora_kwargs: more `peft.LoraConfig` arguments (`use_rslora`, `use_dora`, `init_lora_weights`, ...).

    Returns:
        The `PeftModel`: LoRA weights and the head, neck and auxiliary head trainable; all else frozen.
    """
    peft = _require_peft()
    if isinstance(model, peft.PeftModel):
        raise ValueError("The model already carries PEFT adapters; apply_lora takes the plain ViTSeg model.")
    if not isinstance(model, ViTSegPreTrainedModel):
        raise TypeError(f"apply_lora takes a ViTSegForSemanticSegmentation or ViTSegForUniversalSegmentation, got "
                        f"{type(model).__name__}.")
    for name in ("modules_to_save", "target_modules"):
        if name in lora_kwargs:
            raise ValueError(f"Pass {name} to apply_lora directly (the head is trained in full already).")
    if model.config.freeze_backbone:
        model.freeze_backbone(False)
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=_target_regex(model, target_modules),
        **lora_kwargs,
    )
    peft_model = peft.get_peft_model(model, config)
    _set_head_trainable(model, True)
    return peft_model


def _head_parts(model: nn.Module) -> list[str]:
    """The model's parts outside the backbone: `HEAD_PARTS` of a semantic model, and whatever else a model keeps
    beside its backbone (a mask transformer's query embedding, class and mask modules)."""
    return [name for name, _ in model.named_children() if name != "backbone"]


def _set_head_trainable(model: nn.Module, trainable: bool) -> None:
    for name in _head_parts(model):
        getattr(model, name).requires_grad_(trainable)
    for param in model.parameters(recurse=False):
        param.requires_grad_(trainable)


def _head_state_dict(model: nn.Module) -> dict:
    """Everything outside the backbone, with the model's own parameters and buffers (a mask transformer's
    `attn_mask_probs`: the annealed state, so that a reloaded LoRA model runs the attention it was trained to)."""
    state = {
        f"{name}.{key}": value.detach().contiguous()
        for name in _head_parts(model)
        for key, value in getattr(model, name).state_dict().items()
    }
    own = [*model.named_parameters(recurse=False), *model.named_buffers(recurse=False)]
    state.update({key: value.detach().contiguous() for key, value in own
                  if key not in model._non_persistent_buffers_set})
    return state


def _recorded_base(model: ViTSegForSemanticSegmentation) -> str | None:
    """Where the base weights can be fetched again: the ViTSeg checkpoint it was loaded from, else the
    pretrained backbone it was built on (`from_pretrained_backbone`)."""
    return model.name_or_path or getattr(model.config, "backbone_name_or_path", None) or None


def save_lora(
    model,
    folder: str | Path,
    base_model_name_or_path: str | None = None,
    save_base: bool = False,
    overwrite: bool = False,
) -> Path:
    """Save a LoRA model: the adapter, the head's weights and the ViTSeg config, all safetensors / JSON.

    Writes `adapter_model.safetensors` and `adapter_config.json` (PEFT's), `head_weights.safetensors` (head,
    neck and auxiliary head, BatchNorm statistics included) and `vitseg_config.json`. The backbone's base
    weights are not copied: `adapter_config.json`'s `base_model_name_or_path` says where `load_lora` gets
    them again.

    Args:
        model: the `PeftModel` returned by `apply_lora`.
        folder: the output folder (created).
        base_model_name_or_path: where the base weights come from: a ViTSeg checkpoint, or the plain HF
            backbone checkpoint of `from_pretrained_backbone`. Default: the checkpoint the model was loaded
            from, else `config.backbone_name_or_path`.
        save_base: also save the base model (without adapters) into `folder/base`, for a backbone that
            exists nowhere else (random or modified weights). Costs the full model's size.
        overwrite: replace an adapter already saved in `folder`.
    """
    peft = _require_peft()
    if not isinstance(model, peft.PeftModel):
        raise TypeError(f"save_lora takes the PeftModel from apply_lora, got {type(model).__name__}; "
                        "a plain model saves with save_pretrained.")
    from safetensors.torch import save_file

    folder = Path(folder)
    if (folder / ADAPTER_CONFIG_FILE).exists() and not overwrite:
        raise FileExistsError(f"{folder} already holds an adapter; pass overwrite=True to replace it.")
    vitseg = unwrap_model(model)
    source = base_model_name_or_path or _recorded_base(vitseg)
    if save_base:
        _base_without_adapters(vitseg).save_pretrained(folder / BASE_FOLDER)
        source = BASE_FOLDER
    if source is None:
        raise ValueError(
            "The base weights of this model are not recorded anywhere (it was neither loaded from a checkpoint "
            "nor built with from_pretrained_backbone). Pass base_model_name_or_path=..., or save_base=True."
        )
    for config in model.peft_config.values():
        config.base_model_name_or_path = str(source)
    # A ViT has no token vocabulary to resize; peft's "auto" would look for the base's config.json at the recorded
    # path, relative to the current folder, then on the Hub, and warn when it finds neither.
    model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
    save_file(_head_state_dict(vitseg), str(folder / HEAD_WEIGHTS_FILE), metadata={"format": "pt"})
    vitseg.config.to_json_file(folder / VITSEG_CONFIG_FILE)
    return folder


def _base_without_adapters(vitseg: ViTSegForSemanticSegmentation) -> ViTSegForSemanticSegmentation:
    """A copy of the model with the LoRA layers taken out (not merged): the base weights as they were."""
    state = {k.replace(".base_layer.", "."): v for k, v in vitseg.state_dict().items() if "lora_" not in k}
    base = type(vitseg)(ViTSegConfig.from_dict(vitseg.config.to_dict()))
    base.load_state_dict(state, strict=True)
    return base


def _config_kwargs(config: ViTSegConfig) -> dict:
    """The `ViTSegConfig` arguments that rebuild `config` around another backbone checkpoint."""
    names = inspect.signature(ViTSegConfig.__init__).parameters
    kwargs = {n: getattr(config, n) for n in names if n not in ("self", "backbone_config", "kwargs")}
    kwargs.update(num_labels=config.num_labels, id2label=config.id2label, label2id=config.label2id)
    return kwargs


def _load_base(source: str, config: ViTSegConfig, folder: Path) -> ViTSegForSemanticSegmentation:
    from ..hub.loading import load_config
    from .loading import load_trainable_model, model_class_for  # the one loader of saved ViTSeg models

    if source == BASE_FOLDER and (folder / BASE_FOLDER).is_dir():  # saved with save_base=True
        return load_trainable_model(str(folder / BASE_FOLDER))
    if load_config(source).model_type == ViTSegConfig.model_type:
        return load_trainable_model(source)
    return model_class_for(config).from_pretrained_backbone(source, **_config_kwargs(config))


def load_lora(folder: str | Path, base_model: ViTSegForSemanticSegmentation | None = None, is_trainable: bool = False):
    """Load what `save_lora` saved: base model, head weights, then the adapter. Returns the `PeftModel`.

    Args:
        folder: the folder `save_lora` wrote.
        base_model: the base model to put the adapter on; default fetched from `base_model_name_or_path` in
            `adapter_config.json` (a folder saved with `save_base=True`, a ViTSeg checkpoint, or a plain
            backbone checkpoint rebuilt with the saved `vitseg_config.json`).
        is_trainable: keep LoRA and head weights trainable (to go on training); default inference mode.
    """
    peft = _require_peft()
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [f for f in (ADAPTER_CONFIG_FILE, HEAD_WEIGHTS_FILE, VITSEG_CONFIG_FILE) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: it is not a folder written by save_lora.")
    config = ViTSegConfig.from_json_file(folder / VITSEG_CONFIG_FILE)
    if base_model is None:
        source = json.loads((folder / ADAPTER_CONFIG_FILE).read_text()).get("base_model_name_or_path")
        if not source:
            raise ValueError(f"{folder / ADAPTER_CONFIG_FILE} names no base model; pass base_model=...")
        base_model = _load_base(source, config, folder)

    head_state = load_file(str(folder / HEAD_WEIGHTS_FILE))
    expected = set(_head_state_dict(base_model))
    if set(head_state) != expected:
        raise ValueError(
            f"The saved head weights do not fit the base model's head "
            f"(missing {sorted(expected - set(head_state))[:5]}, "
            f"unexpected {sorted(set(head_state) - expected)[:5]}): the base model has another head configuration."
        )
    base_model.load_state_dict(head_state, strict=False)
    model = peft.PeftModel.from_pretrained(base_model, folder, is_trainable=is_trainable)
    if is_trainable:
        _set_head_trainable(base_model, True)
    return model
