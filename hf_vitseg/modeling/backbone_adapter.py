"""The backbone adapter: one entry point that turns any supported HF backbone into `BackboneFeatures`.

What differs between backbone families (where the layers are, how to embed, prefix tokens, ...) is in their
`BackboneFamily` record (`backbones.py`), resolved once as `self.family`; this module holds only what every
family shares.

ViT families (`kind == "vit"`: ViT, DeiT, DINOv2 (+ registers), DINOv3, CLIP's and SigLIP's vision towers,
BEiT): the adapter drives the HF model's embeddings and transformer layers itself, so that

- it runs only as deep as the deepest tapped layer (tapping layer 8 of 12 never runs layers 9-12);
- patch tokens become `(B, C, h, w)` maps with the true `(h, w) = (H/p, W/p)` grid, non-square included
  (`Dinov2Backbone` swaps h and w there, which is why it is not used);
- prefix tokens (CLS, distillation, registers) are split off and handed over separately;
- position embeddings are interpolated for any input size that is a multiple of the patch size.

SAM's ViT image encoder (`kind == "sam"`): tokens are already spatial `(B, h, w, C)`; SAM's neck is not used
(heads get the transformer taps), so it is not built.

Hierarchical backbones (`kind == "hierarchical"`: Swin, ...): `AutoBackbone` with `out_indices` set to the
taps; they hand over their own multi-scale maps.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from .backbones import BackboneFamily, family_for, get_path
from .configuration_vitseg import ViTSegConfig
from .features import BackboneFeatures

logger = logging.get_logger(__name__)


class BackboneAdapter(nn.Module):
    """Wraps the HF backbone (`self.model`) and returns `BackboneFeatures` for the configured taps.

    Args:
        config: the model's `ViTSegConfig` (its backbone config, taps and `backbone_apply_layernorm`).

    Attributes known at construction, for necks and heads:
        family: the backbone family's record (`backbones.BackboneFamily`).
        out_channels: channels of each tapped map.
        out_strides: stride of each tapped map.
        num_prefix_tokens: prefix tokens per tap (0 for SigLIP, SAM and hierarchical backbones).
        size_divisor: input height and width must be multiples of this (the patch size for ViT/SAM,
            the coarsest stride for hierarchical backbones); the image processor pads to it.
    """

    def __init__(self, config: ViTSegConfig):
        super().__init__()
        bc = config.backbone_config
        self.family: BackboneFamily = family_for(bc)
        self.out_indices = list(config.backbone_out_indices)
        self.apply_layernorm = config.backbone_apply_layernorm
        self.num_prefix_tokens = self.family.num_prefix_tokens(bc)
        self.num_channels = bc.num_channels
        self.model = self.family.build(bc)
        if self.family.kind == "hierarchical":
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

    @property
    def kind(self) -> str:
        """`"vit"`, `"sam"` or `"hierarchical"` (the family record's)."""
        return self.family.kind

    # -- the parts of the HF model, as the family record names them ------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layers the adapter drives (ViT and SAM), or the stages (hierarchical backbones)."""
        layers = get_path(self.model, self.family.layers)
        if layers is None:
            raise AttributeError(
                f"The {self.family.name} family record names no layers of {type(self.model).__name__}."
            )
        return layers

    @property
    def final_norm(self) -> nn.Module | None:
        """The norm after the last layer (per-stage norms for hierarchical backbones), or None."""
        return get_path(self.model, self.family.final_norm)

    def get_input_embeddings(self) -> nn.Module:
        """The backbone's patch embedding module."""
        return self.model.get_input_embeddings()

    def patch_embedding_conv(self) -> nn.Conv2d:
        """The convolution that turns pixels into patch tokens (the only weight that sees the input channels).

        Raises:
            ValueError: for a backbone whose patch embedding is not one `nn.Conv2d` (none of the supported families).
        """
        return patch_embedding_conv(self.model, self.family.name)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Backbone parameters the taps never use: layers (stages) past the deepest tap, the final norm when taps
        are not normed, mask tokens. They get no gradient, which would stall plain DDP and waste optimizer state."""
        unused = []
        for path in self.family.always_unused:
            part = get_path(self.model, path)
            if isinstance(part, nn.Parameter):
                unused.append(part)
            elif isinstance(part, nn.Module):
                unused += list(part.parameters())
        layers = get_path(self.model, self.family.layers)
        if layers is not None:
            unused += [p for layer in layers[max(self.out_indices):] for p in layer.parameters()]
        if self.family.kind != "hierarchical" and self.final_norm is not None and not self.apply_layernorm:
            unused += list(self.final_norm.parameters())
        return unused

    def mark_unused_parameters(self) -> None:
        for p in self.unused_parameters():
            p.requires_grad_(False)

    def attention_projection_names(self) -> list[str]:
        """Names (in `self.named_modules()`) of the attention projections LoRA adapts (the family record's
        `attention_projections`), in the layers the taps use: layers past the deepest tap never run."""
        unused = {id(p) for p in self.unused_parameters()}
        leaves = set(self.family.attention_projections)
        return [
            name for name, module in self.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in leaves and id(module.weight) not in unused
        ]

    def layer_ids(self) -> tuple[dict[int, int], int]:
        """Layer id (for layer-wise LR decay) of every backbone parameter, keyed by `id(parameter)`, and the
        layer count `L`. Parameters it leaves out embed (id 0). See `training/optim.py` for the scheme.

        Raises:
            ValueError: for a family whose record has no `layer_scheme`.
        """
        ids: dict[int, int] = {}

        def assign(module: nn.Module | None, layer_id: int) -> None:
            if module is not None:
                for p in module.parameters():
                    ids[id(p)] = layer_id

        scheme = self.family.layer_scheme
        if scheme == "blocks":
            num_layers = len(self.layers)
            for i, layer in enumerate(self.layers, start=1):
                assign(layer, i)
        elif scheme == "stages":  # SimMIM's get_swin_layer_id: blocks counted across stages
            depths = [len(stage.blocks) for stage in self.layers]
            num_layers = sum(depths)
            for s, stage in enumerate(self.layers):
                for j, block in enumerate(stage.blocks):
                    assign(block, sum(depths[:s]) + j + 1)
                assign(getattr(stage, "downsample", None), sum(depths[: s + 1]))
        else:
            raise ValueError(
                f"Layer-wise learning-rate decay does not know how to count the layers of a {self.family.name} "
                "backbone (its family record has no layer_scheme). Pass layer_decay=None."
            )
        assign(self.final_norm, num_layers + 1)
        return ids, num_layers

    # -- forward ------------------------------------------------------------------------------------------------
    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}."
            )
        _, c, h, w = pixel_values.shape
        if c != self.num_channels:
            raise ValueError(
                f"pixel_values has {c} channels but the backbone expects {self.num_channels}. Convert images "
                "with ViTSegImageProcessor.for_model(model) (for an RGB model it turns grayscale, RGBA, palette and "
                "16-bit images into RGB; for another channel count it takes images with that many channels)."
            )
        d = self.size_divisor
        if h % d or w % d:
            raise ValueError(
                f"pixel_values height and width must be multiples of {d} (the backbone's patch size/stride), "
                f"got {h}x{w}. Pad with ViTSegImageProcessor (it pads to a multiple of patch_size), e.g. to "
                f"{-(-h // d) * d}x{-(-w // d) * d}."
            )
        # one host sync; skipped while torch.compile / torch.export trace (a data-dependent branch)
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(pixel_values).all()):
            count = int((~torch.isfinite(pixel_values)).sum())
            raise ValueError(
                f"pixel_values hold {count} non-finite value(s) (NaN or inf), which would make every output NaN; "
                "pass finite normalised images (ViTSegImageProcessor refuses non-finite images)."
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | int | list[int] | None = False,
        output_attentions: bool | None = False,
    ) -> BackboneFeatures:
        """Run the backbone and tap it.

        Args:
            pixel_values: `(B, C, H, W)`, H and W multiples of `size_divisor`.
            output_hidden_states: `True` for the hidden states as far as the backbone ran (embeddings first), or
                indices into all of them (embeddings = 0, negative from the end, as in transformers 5) for only
                those, running deeper if needed.
            output_attentions: record the attention probabilities. Under an attention implementation that does
                not return them (SDPA, flash) the backbone runs with eager attention for this call (warned once).
        """
        self.check_pixel_values(pixel_values)
        pixel_values = pixel_values.to(next(self.model.parameters()).dtype)
        selected = _selected_hidden_states(output_hidden_states, self.family.num_levels(self.model.config))
        with _EagerAttention(self.model, enabled=bool(output_attentions)):
            if self.family.kind == "hierarchical":
                out = self.model(
                    pixel_values, output_hidden_states=bool(output_hidden_states), output_attentions=output_attentions
                )
                hidden_states = out.hidden_states
                if selected is not None and hidden_states is not None:
                    hidden_states = tuple(hidden_states[i] for i in selected if i < len(hidden_states))
                return BackboneFeatures(
                    feature_maps=list(out.feature_maps),
                    strides=self.out_strides,
                    pixel_values=pixel_values,
                    hidden_states=hidden_states,
                    attentions=out.attentions,
                )
            with _AttentionRecorder(self.model, enabled=bool(output_attentions)) as recorder:
                return self._forward_layers(pixel_values, bool(output_hidden_states), selected, recorder)

    # -- layer by layer, for models that change the token sequence between layers (mask transformers) ---------
    def embed_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, dict, tuple[int, int]]:
        """The tokens before the first layer (embeddings with position embeddings for this size, the pre-norm where
        the family has one), the keyword arguments every layer call takes, and the `(h, w)` patch grid. ViT and SAM
        families; `pixel_values` are checked as `forward` checks them."""
        self.check_pixel_values(pixel_values)
        pixel_values = pixel_values.to(next(self.model.parameters()).dtype)
        height, width = pixel_values.shape[-2:]
        grid_hw = (height // self.size_divisor, width // self.size_divisor)
        hidden, layer_kwargs = self.family.embed(self.model, pixel_values, grid_hw)
        pre_norm = get_path(self.model, self.family.pre_norm)
        if pre_norm is not None:
            hidden = pre_norm(hidden)
        return hidden, {**dict(self.family.layer_kwargs), **layer_kwargs}, grid_hw

    def layer_kwargs_for_grid(self, grid_hw: tuple[int, int], like: torch.Tensor) -> dict:
        """The keyword arguments every layer call takes for a `grid_hw` patch grid, without the image (what
        `embed_tokens` returns with the tokens): for layers run over cached tokens. `like` gives device and dtype."""
        return {**dict(self.family.layer_kwargs), **self.family.grid_kwargs(self.model, grid_hw, like)}

    @staticmethod
    def run_layer(layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One transformer layer of this family (or a copy of one) over `hidden` `(B, N, C)`, with an additive
        `attention_mask` broadcastable to `(B, heads, N, N)` (0 = attend, a large negative value = do not), or
        plain attention for None. Every ViT family's layer takes `attention_mask`; N may exceed prefix + patch
        tokens when the family's `check_extra_tokens` allows it."""
        out = layer(hidden, **{**layer_kwargs, "attention_mask": attention_mask})
        return out[0] if isinstance(out, tuple) else out

    def recording(self, output_attentions: bool):
        """A context manager recording the backbone's attention probabilities while enabled (eager attention for
        the call where the implementation returns none), as `forward` does; `.attentions` holds them."""
        return _Recording(self.model, bool(output_attentions))

    def _forward_layers(self, pixel_values, output_hidden_states: bool, selected: list[int] | None, recorder):
        family = self.family
        hidden, layer_kwargs, grid_hw = self.embed_tokens(pixel_values)
        deepest = max(self.out_indices + (selected or []))
        taps = {0: hidden} if 0 in self.out_indices else {}
        all_hidden = [hidden] if output_hidden_states else None
        for i, layer in enumerate(self.layers[:deepest], start=1):
            hidden = layer(hidden, **layer_kwargs)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            if i in self.out_indices:
                taps[i] = hidden
            if all_hidden is not None:
                all_hidden.append(hidden)
        if all_hidden is not None and selected is not None:
            all_hidden = [all_hidden[i] for i in selected]

        feature_maps, prefix_tokens = [], []
        norm = self.final_norm if self.apply_layernorm else None
        for i in self.out_indices:
            tokens = taps[i]
            if family.kind == "sam":  # (B, h, w, C): already spatial, no prefix tokens
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
            prefix_tokens=prefix_tokens if prefix_tokens and self.num_prefix_tokens else None,
            pixel_values=pixel_values,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=recorder.attentions if recorder.enabled else None,
        )


def _selected_hidden_states(output_hidden_states, num_layers: int) -> list[int] | None:
    """Sorted non-negative indices into the `num_layers + 1` hidden states that `output_hidden_states` selects,
    or None when it is a flag (transformers 5's convention: an int or a list of ints, negative from the end)."""
    if output_hidden_states is None or isinstance(output_hidden_states, bool):
        return None
    indices = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    total = num_layers + 1
    for i in indices:
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(
                f"output_hidden_states must be a bool, an int or a list of ints, got {output_hidden_states!r}."
            )
        if not -total <= i < total:
            raise ValueError(
                f"output_hidden_states={output_hidden_states!r} selects hidden state {i!r}, but this backbone has "
                f"{total} (0 = embeddings .. {num_layers}, or -{total}..-1 from the end); e.g. [{num_layers}]."
            )
    return sorted({i % total for i in indices})


class _Recording:
    """`_EagerAttention` and `_AttentionRecorder` together (see `BackboneAdapter.recording`)."""

    def __init__(self, model: nn.Module, enabled: bool):
        self.enabled = enabled
        self._eager = _EagerAttention(model, enabled=enabled)
        self._recorder = _AttentionRecorder(model, enabled=enabled)

    @property
    def attentions(self) -> tuple[torch.Tensor, ...] | None:
        return self._recorder.attentions if self.enabled else None

    def __enter__(self):
        self._eager.__enter__()
        try:
            self._recorder.__enter__()
        except BaseException:
            self._eager.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        self._recorder.__exit__(*exc)
        self._eager.__exit__(*exc)
        return False


class _EagerAttention:
    """Runs the HF model with eager attention while enabled, if its attention implementation does not return
    attention probabilities (SDPA, flash, flex); restores the implementation after. transformers' models record
    attentions with eager too, rather than fail."""

    _warned = False

    def __init__(self, model: nn.Module, enabled: bool):
        self.model = model
        self.previous = getattr(model.config, "_attn_implementation", None)
        self.switch = enabled and self.previous not in (None, "eager")

    def __enter__(self):
        if self.switch:
            if not _EagerAttention._warned:
                logger.warning(
                    f"output_attentions=True: the backbone's {self.previous!r} attention does not return attention "
                    "probabilities, so this call runs with eager attention (slower, slightly different numbers). "
                    "Load the model with attn_implementation='eager' to avoid switching."
                )
                _EagerAttention._warned = True
            self.model.set_attn_implementation("eager")
        return self

    def __exit__(self, *exc):
        if self.switch:
            self.model.set_attn_implementation(self.previous)
        return False


class _AttentionRecorder:
    """Collects attention probabilities from the backbone's attention modules while enabled.

    Uses the class that the HF model itself records attentions from (`_can_record_outputs` of the model or, for
    SAM, of its vision encoder), so it works for every family. Modules of a subclass of it (SAM's SDPA attention)
    run as that class while recording.
    """

    def __init__(self, model: nn.Module, enabled: bool):
        self.enabled = enabled
        self._model = model
        self._handles = []
        self._collected: list[torch.Tensor] = []
        self._swapped: list[tuple[nn.Module, type]] = []

    @property
    def attentions(self) -> tuple[torch.Tensor, ...]:
        """What was recorded so far, one tensor per attention module call."""
        return tuple(self._collected)

    def __enter__(self):
        if not self.enabled:
            return self
        target = None
        for module in self._model.modules():
            spec = getattr(type(module), "_can_record_outputs", None) or {}
            target = getattr(spec.get("attentions"), "target_class", spec.get("attentions"))
            if isinstance(target, type):
                break
        if not isinstance(target, type):
            raise ValueError(f"{type(self._model).__name__} does not expose attention probabilities.")

        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is not None:
                self._collected.append(weights)

        for module in self._model.modules():
            if isinstance(module, target):
                if type(module) is not target:
                    # SAM picks its attention class at construction (an SDPA subclass returns no probabilities):
                    # the eager base class, same parameters, runs this call
                    self._swapped.append((module, type(module)))
                    module.__class__ = target
                self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        for module, cls in self._swapped:
            module.__class__ = cls
        return False


def patch_embedding_conv(model: nn.Module, family_name: str = "") -> nn.Conv2d:
    """The one `nn.Conv2d` of `model.get_input_embeddings()` (the module itself or inside it): every supported
    family (ViT, DeiT, DINOv2 (+ registers), DINOv3, CLIP, SigLIP, BEiT, SAM, Swin) embeds patches with one.

    Raises:
        ValueError: when the input embedding holds no conv or more than one, naming the family.
    """
    embeddings = model.get_input_embeddings()
    convs = list({id(m): m for m in embeddings.modules() if isinstance(m, nn.Conv2d)}.values())
    if len(convs) != 1:
        raise ValueError(
            f"The {family_name or type(model).__name__} backbone's patch embedding ({type(embeddings).__name__}) is "
            f"not one Conv2d ({len(convs)} found), so its input channels cannot be adapted; num_channels other than "
            "the checkpoint's works for backbones with a convolutional patch embedding only."
        )
    return convs[0]


def adapt_input_conv(weight: torch.Tensor, num_channels: int) -> torch.Tensor:
    """A pretrained patch-embedding weight `(out, 3, kh, kw)` adapted to `num_channels` input channels, by the rule
    of timm's `adapt_input_conv`: 1 channel gets the sum of the RGB filters; any other count the RGB filters
    repeated cyclically (R, G, B, R, ...; 2 channels: R, G) and scaled by `3 / num_channels`, which keeps the
    response on the RGB scale (a constant image gives the RGB response exactly for 1 channel and multiples of 3).
    Computed in float32, returned in the weight's dtype.

    Raises:
        ValueError: a weight that is not 4-D, or whose input channels are not 3 (when `num_channels` differs).
    """
    if weight.ndim != 4:
        raise ValueError(f"A patch-embedding conv weight is 4-D (out, in, kh, kw); got shape {tuple(weight.shape)}.")
    in_channels = weight.shape[1]
    if num_channels == in_channels:
        return weight
    if in_channels != 3:
        raise ValueError(
            f"The pretrained patch embedding takes {in_channels} channels; adapting it to {num_channels} is defined "
            "for RGB (3-channel) checkpoints only. Use the checkpoint's own channel count."
        )
    dtype = weight.dtype
    weight = weight.float()
    if num_channels == 1:
        adapted = weight.sum(dim=1, keepdim=True)
    else:
        repeats = -(-num_channels // 3)
        adapted = weight.repeat(1, repeats, 1, 1)[:, :num_channels] * (3 / float(num_channels))
    return adapted.to(dtype)
