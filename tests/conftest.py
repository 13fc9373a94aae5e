"""Tiny random backbone configs, one per supported family: the "model tester" every test parametrises over."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    BeitConfig,
    CLIPVisionConfig,
    DeiTConfig,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    DINOv3ViTConfig,
    SamVisionConfig,
    SiglipVisionConfig,
    SwinConfig,
    ViTConfig,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
torch.set_num_threads(1)  # pytest -n 2 on 2 cores: one thread per worker

_VIT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=8)


def tiny_backbone_config(family: str):
    """A random backbone config of `family` small enough for a forward+backward in milliseconds."""
    if family == "vit":
        return ViTConfig(intermediate_size=64, **_VIT)
    if family == "deit":
        return DeiTConfig(intermediate_size=64, **_VIT)
    if family == "dinov2":
        return Dinov2Config(mlp_ratio=2, **_VIT)
    if family == "dinov2_with_registers":
        return Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **_VIT)
    if family == "dinov3_vit":
        return DINOv3ViTConfig(intermediate_size=64, num_register_tokens=2, **_VIT)
    if family == "sam":
        return SamVisionConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_dim=64, image_size=64, patch_size=8,
            window_size=4, global_attn_indexes=[1, 3], output_channels=16,
        )
    if family == "clip":
        return CLIPVisionConfig(intermediate_size=64, **_VIT)
    if family == "siglip":
        return SiglipVisionConfig(intermediate_size=64, **_VIT)
    if family == "beit":  # relative position bias in every layer, absolute embeddings too
        return BeitConfig(intermediate_size=64, use_relative_position_bias=True, use_absolute_position_embeddings=True,
                          use_mean_pooling=False, **_VIT)
    if family == "swin":
        return SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], image_size=64, patch_size=4,
                          window_size=2)
    raise KeyError(family)


FAMILIES = ["vit", "deit", "dinov2", "dinov2_with_registers", "dinov3_vit", "sam", "swin", "clip", "siglip", "beit"]
# Non-square input that every tiny family accepts (multiples of 8 and of Swin's total stride 32).
NON_SQUARE = (64, 96)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


# Narrow widths for the heads whose defaults are sized for a ViT-S at 518 px (`tiny_model(..., slim=True)`): the
# common suite checks behaviour, not capacity, and runs hundreds of cases.
SLIM_HEAD_KWARGS = {
    "conv": {"channels": 32},
    "mlp": {"channels": 32},
    "setr_pup": {"stage_channels": [32, 16, 16, 8]},
    "upernet": {"channels": 32},
    "segformer": {"channels": 32},
    "dpt": {"reassemble_channels": [8, 8, 16, 16], "fusion_channels": 16},
    "unet": {"decoder_channels": [32, 16, 16, 8], "stem_channels": [8, 8]},
    "setr_mla": {"mla_channels": 16, "stream_channels": 8},
}


def tiny_model(head: str = "linear", family: str = "dinov2", *, backbone: str | Path | None = None,
               backbone_config=None, num_labels: int = 3, seed: int = 0, slim: bool = False, **config_kwargs):
    """A `ViTSegForSemanticSegmentation` with `head` on the tiny `family` backbone (or on `backbone_config`), random
    (seeded) weights; or, with `backbone` (a saved backbone folder, e.g. `tiny_backbone_dir`), loaded by
    `from_pretrained_backbone`. `config_kwargs` go to `ViTSegConfig` (`head_kwargs=...`, `backbone_out_indices=...`);
    `slim=True` gives the head `SLIM_HEAD_KWARGS` when `head_kwargs` is not given."""
    from hf_vitseg import ViTSegConfig, ViTSegForSemanticSegmentation

    if slim and "head_kwargs" not in config_kwargs:
        config_kwargs["head_kwargs"] = SLIM_HEAD_KWARGS.get(head, {})
    torch.manual_seed(seed)
    if backbone is not None:
        return ViTSegForSemanticSegmentation.from_pretrained_backbone(
            backbone, head=head, num_labels=num_labels, **config_kwargs
        )
    config = ViTSegConfig(backbone_config=backbone_config or tiny_backbone_config(family), head=head,
                          num_labels=num_labels, **config_kwargs)
    return ViTSegForSemanticSegmentation(config)


def save_tiny_backbone(folder: str | Path, family: str = "dinov2", *, seed: int = 0) -> Path:
    """A tiny random `family` backbone (seeded) saved as a plain Hugging Face model folder, like a Hub checkpoint."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    AutoModel.from_config(tiny_backbone_config(family)).save_pretrained(folder)
    return Path(folder)


def save_tiny_backbone_to_hf_cache(cache_dir: str | Path, repo_id: str, family: str = "dinov2", *, seed: int = 0,
                                   commit: str = "0" * 40) -> Path:
    """`save_tiny_backbone` laid out as huggingface_hub's cache holds a downloaded `repo_id` (`refs/main` naming
    `snapshots/<commit>`), for loading by Hub id with `HF_HUB_OFFLINE=1`; returns the snapshot folder."""
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return save_tiny_backbone(repo / "snapshots" / commit, family, seed=seed)


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """One tiny random DINOv2 backbone folder (patch 8, 4 layers, width 32) for the session: read it, never write."""
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny_dinov2"))


def builtin_heads() -> list[str]:
    """The heads hf-vitseg ships; test modules may register their own heads at import time."""
    from hf_vitseg.modeling.head_base import HEAD_REGISTRY

    return sorted(n for n, cls in HEAD_REGISTRY.items() if cls.__module__.startswith("hf_vitseg."))


def train_steps(model, x, y, steps: int = 10, lr: float = 3e-3, optimizer_cls=torch.optim.Adam):
    """`steps` optimizer steps of `model` on the one batch `(x, y)`: `(losses, the last output)`."""
    optimizer = optimizer_cls(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model(x, labels=y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return losses, out
