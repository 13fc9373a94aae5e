"""The backbone adapter: one entry point that turns any supported HF backbone into `BackboneFeatures`.

ViT families (vit, deit, dinov2, dinov2_with_registers, dinov3_vit): the adapter drives the HF model's
embeddings and transformer layers itself, so that

- it runs only as deep as the deepest tapped layer (tapping layer 8 of 12 never runs layers 9-12);
- patch tokens become `(B, C, h, w)` maps with the true `(h, w) = (H/p, W/p)` grid, non-square included
  (`Dinov2Backbone` swaps h and w there, which is why it is not used);
- prefix tokens (CLS, distillation, registers) are split off and handed over separately;
- position embeddings are interpolated for any input size that is a multiple of the patch size
  (absolute embeddings bicubically by the HF embeddings module, RoPE by DINOv3's own module).

SAM's ViT image encoder (`SamVisionModel`): tokens are already spatial `(B, h, w, C)`; the absolute
position embedding is interpolated bicubically for sizes other than the native one (windowed layers pad
internally, global layers interpolate their relative positions). SAM's neck is not used (heads get the
transformer taps), so it is not built.

Hierarchical backbones (swin, ...): `AutoBackbone` with `out_indices` set to the taps; they hand over
their own multi-scale maps.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoBackbone, AutoModel

from .configuration_vitseg import ViTSegConfig, backbone_kind
from .head_base import BackboneFeatures


class BackboneAdapter(nn.Module):
    """Wraps the HF backbone (`self.model`) and returns `BackboneFeatures` for the configured taps.

    Attributes known at construction, for necks and heads:
        out_channels: channels of each tapped map.
        out_strides: stride of each tapped map.
        num_prefix_tokens: prefix tokens per tap (0 for SAM and hierarchical backbones).
        size_divisor: input height and width must be multiples of this (the patch size for ViT/SAM,
            the coarsest stride for hierarchical backbones); the image processor pads to it.
    """

    def __init__(self, config: ViTSegConfig):
        super().__init__()
        bc = config.backbone_config
        self.kind = backbone_kind(bc)
        self.out_indices = list(config.backbone_out_indices)
        self.apply_layernorm = config.backbone_apply_layernorm
        self.num_prefix_tokens = config.num_prefix_tokens
        self.num_channels = bc.num_channels
        self.model = build_backbone_model(bc)
        if self.kind == "hierarchical":
            self.out_channels = list(self.model.channels)
            first_stride = getattr(bc, "patch_size", 4)
            first_stride = first_stride[0] if isinstance(first_stride, (list, tuple)) else first_stride
            self.out_strides = [first_stride * 2 ** max(i - 1, 0) for i in self.out_indices]
            self.size_divisor = first_stride * 2 ** (len(bc.stage_names) - 2)
        else:
            patch = bc.patch_size[0] if isinstance(bc.patch_size, (list, tuple)) else bc.patch_size
            self.out_channels = [bc.hidden_size] * len(self.out_indices)
            self.out_strides = [patch] * len(self.out_indices)
            self.size_divisor = patch
        self.mark_unused_parameters()

    def unused_parameters(self) -> list[nn.Parameter]:
        """Backbone parameters the taps never use: layers past the deepest tap, the final norm when taps are
        not normed, the mask token. They get no gradient, which would stall plain DDP and waste optimizer state."""
        if self.kind == "hierarchical":
            # Swin-like: the encoder's final norm is replaced by per-stage norms; stages past the deepest tap
            base = getattr(self.model, getattr(self.model, "base_model_prefix", ""), None)
            unused = list(base.layernorm.parameters()) if hasattr(base, "layernorm") else []
            stages = getattr(getattr(base, "encoder", None), "layers", None)
            if stages is not None:
                unused += [p for stage in stages[max(self.out_indices):] for p in stage.parameters()]
            return unused
        unused = [p for layer in self.layers[max(self.out_indices):] for p in layer.parameters()]
        if self.final_norm is not None and not self.apply_layernorm:
            unused += list(self.final_norm.parameters())
        embeddings = getattr(self.model, "embeddings", None)
        if getattr(embeddings, "mask_token", None) is not None:
            unused.append(embeddings.mask_token)
        return unused

    def mark_unused_parameters(self) -> None:
        for p in self.unused_parameters():
            p.requires_grad_(False)

    # -- the layers the adapter drives (ViT and SAM) --------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        m = self.model
        if self.kind == "sam":
            return m.vision_encoder.layers
        for path in ("layers", "encoder.layer", "model.layer"):
            obj = m
            try:
                for attr in path.split("."):
                    obj = getattr(obj, attr)
            except AttributeError:
                continue
            return obj
        raise AttributeError(f"Cannot find the transformer layers of {type(m).__name__}.")

    @property
    def final_norm(self) -> nn.Module | None:
        if self.kind != "vit":
            return None
        return getattr(self.model, "layernorm", None) or getattr(self.model, "norm", None)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}."
            )
        b, c, h, w = pixel_values.shape
        if c != self.num_channels:
            raise ValueError(
                f"pixel_values has {c} channels but the backbone expects {self.num_channels}. Convert images "
                "with ViTSegImageProcessor (it turns grayscale, RGBA, palette and 16-bit images into RGB)."
            )
        d = self.size_divisor
        if h % d or w % d:
            raise ValueError(
                f"pixel_values height and width must be multiples of {d} (the backbone's patch size/stride), "
                f"got {h}x{w}. Pad with ViTSegImageProcessor (it pads to a multiple of patch_size), e.g. to "
                f"{-(-h // d) * d}x{-(-w // d) * d}."
            )

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> BackboneFeatures:
        self.check_pixel_values(pixel_values)
        pixel_values = pixel_values.to(next(self.model.parameters()).dtype)
        if self.kind == "hierarchical":
            out = self.model(
                pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions
            )
            return BackboneFeatures(
                feature_maps=list(out.feature_maps),
                strides=self.out_strides,
                pixel_values=pixel_values,
                hidden_states=out.hidden_states,
                attentions=out.attentions,
            )

        height, width = pixel_values.shape[-2:]
        grid_hw = (height // self.size_divisor, width // self.size_divisor)
        hidden, layer_kwargs = self._embed(pixel_values, grid_hw)
        deepest = max(self.out_indices)
        taps = {0: hidden} if 0 in self.out_indices else {}
        all_hidden = [hidden] if output_hidden_states else None
        with _AttentionRecorder(self.model, enabled=output_attentions) as recorder:
            for i, layer in enumerate(self.layers[:deepest], start=1):
                hidden = layer(hidden, **layer_kwargs)
                if isinstance(hidden, tuple):
                    hidden = hidden[0]
                if i in self.out_indices:
                    taps[i] = hidden
                if all_hidden is not None:
                    all_hidden.append(hidden)

        feature_maps, prefix_tokens = [], []
        norm = self.final_norm if self.apply_layernorm else None
        for i in self.out_indices:
            tokens = taps[i]
            if self.kind == "sam":  # (B, h, w, C): already spatial, no prefix tokens
                feature_maps.append(tokens.permute(0, 3, 1, 2))
                continue
            if norm is not None:
                tokens = norm(tokens)
            batch, _, channels = tokens.shape
            prefix_tokens.append(tokens[:, : self.num_prefix_tokens])
            patch_tokens = tokens[:, self.num_prefix_tokens :]
            # (B, h*w, C) -> (B, C, h, w), rows first: the order in which the patch conv was flattened
            feature_maps.append(patch_tokens.transpose(1, 2).reshape(batch, channels, *grid_hw))
        return BackboneFeatures(
            feature_maps=feature_maps,
            strides=self.out_strides,
            prefix_tokens=prefix_tokens or None,
            pixel_values=pixel_values,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=recorder.attentions if output_attentions else None,
        )

    def _embed(self, pixel_values: torch.Tensor, grid_hw: tuple[int, int]):
        """Tokens before the first layer, and the extra keyword arguments each layer needs."""
        model, model_type = self.model, self.model.config.model_type
        if self.kind == "sam":
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
        if model_type in ("vit", "deit"):
            return model.embeddings(pixel_values, interpolate_pos_encoding=True), {}
        if model_type == "dinov3_vit":
            return model.embeddings(pixel_values), {"position_embeddings": model.rope_embeddings(pixel_values)}
        return model.embeddings(pixel_values), {}


def build_backbone_model(backbone_config) -> nn.Module:
    """The HF model for a backbone config, without parts the adapter never uses (poolers, SAM's neck)."""
    kind = backbone_kind(backbone_config)
    if kind == "hierarchical":
        return AutoBackbone.from_config(backbone_config)
    if backbone_config.model_type in ("vit", "deit"):
        return AutoModel.from_config(backbone_config, add_pooling_layer=False)
    model = AutoModel.from_config(backbone_config)
    if kind == "sam":
        del model.vision_encoder.neck
    return model


class _AttentionRecorder:
    """Collects attention probabilities from the backbone's attention modules while enabled.

    Uses the class that the HF model itself records attentions from (`_can_record_outputs`), so it works
    for every family. SDPA and flash kernels do not return probabilities: asking for them is an error that
    says to load with `attn_implementation="eager"`.
    """

    def __init__(self, model: nn.Module, enabled: bool):
        self.enabled = enabled
        self.attentions: tuple[torch.Tensor, ...] = ()
        self._model = model
        self._handles = []

    def __enter__(self):
        if not self.enabled:
            return self
        spec = getattr(type(self._model), "_can_record_outputs", None) or {}
        if hasattr(self._model, "vision_encoder"):
            spec = getattr(type(self._model.vision_encoder), "_can_record_outputs", None) or spec
        target = spec.get("attentions")
        target = getattr(target, "target_class", target)
        if not isinstance(target, type):
            raise ValueError(f"{type(self._model).__name__} does not expose attention probabilities.")
        collected = []

        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise ValueError(
                    "output_attentions=True needs attention probabilities, which the backbone's "
                    f"{self._model.config._attn_implementation!r} attention does not return. Load the model "
                    "with attn_implementation='eager'."
                )
            collected.append(weights)

        for module in self._model.modules():
            if isinstance(module, target):
                self._handles.append(module.register_forward_hook(hook))
        self._collected = collected
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        if self.enabled:
            self.attentions = tuple(self._collected)
        return False
