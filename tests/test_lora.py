"""LoRA through PEFT: targets per family, what trains, save -> load -> identical logits, merge."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import FAMILIES, tiny_model
from torch import nn

from hf_vitseg import BaseHead, ViTSegForSemanticSegmentation, register_head
from hf_vitseg.modeling.head_base import HEAD_REGISTRY
from hf_vitseg.training.lora import apply_lora, attention_projection_names, load_lora, save_lora
from hf_vitseg.training.optim import param_groups

peft = pytest.importorskip("peft", reason="LoRA needs the optional dependency peft")

CLIP_LIKE = {"q_proj", "k_proj", "v_proj", "out_proj"}
EXPECTED_PROJECTIONS = {"sam": {"qkv", "proj"}, "clip": CLIP_LIKE, "siglip": CLIP_LIKE}  # else q/k/v/o_proj


class AttentionHead(BaseHead):
    """A head with a `q_proj` of its own, which LoRA must leave alone (it trains in full)."""

    def __init__(self, in_channels, in_strides, num_labels, num_prefix_tokens=0, dropout=0.0, in_index=None,
                 input_transform=None):
        super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=in_channels[-1],
                         dropout=dropout, in_index=-1 if in_index is None else in_index, input_transform=None)
        self.q_proj = nn.Linear(in_channels[-1], in_channels[-1])

    def forward(self, features):
        x = self.select_inputs(features.feature_maps)
        return self.classify(self.q_proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


@pytest.fixture
def attention_head():
    """Registered for one test only: other test modules parametrise over every registered head."""
    register_head("test_lora_attention_head")(AttentionHead)
    yield "test_lora_attention_head"
    HEAD_REGISTRY.pop("test_lora_attention_head")


def randomize_lora(model):
    """LoRA's B starts at zero (the adapter is a no-op); make it matter for the comparisons."""
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)


def batch(family="dinov2", n=2):
    torch.manual_seed(2)
    size = 64 if family in ("sam", "swin") else 32
    return torch.randn(n, 3, size, size), torch.randint(0, 3, (n, size, size))


@pytest.mark.parametrize("family", FAMILIES)
def test_targets_are_the_backbone_attention_projections(family):
    model = tiny_model("linear", family)
    names = attention_projection_names(model)
    expected = EXPECTED_PROJECTIONS.get(family, {"q_proj", "k_proj", "v_proj", "o_proj"})
    assert {n.rsplit(".", 1)[1] for n in names} == expected
    assert len(names) == 4 * len(expected)  # 4 layers (Swin: 4 blocks)
    if family != "swin":  # tapping layer 2 of 4: layers 3 and 4 never run and get no adapters
        shallow = attention_projection_names(tiny_model("linear", family, backbone_out_indices=[2]))
        assert len(shallow) == 2 * len(expected) and set(shallow) < set(names)
    lora_model = apply_lora(model, r=2)
    wrapped = {n.removeprefix("base_model.model.") for n, m in lora_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(names)


def test_head_modules_with_projection_names_are_not_targeted(attention_head):
    model = tiny_model(attention_head)
    lora_model = apply_lora(model, r=2, target_modules=["q_proj"])
    wrapped = [n for n, m in lora_model.named_modules() if hasattr(m, "lora_A")]
    assert wrapped and all(".backbone." in n for n in wrapped)
    assert model.head.q_proj.weight.requires_grad  # the head's own q_proj trains in full
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(tiny_model(), target_modules=["query"])


def test_only_lora_and_head_train_and_loss_goes_down():
    model = tiny_model(auxiliary_loss_weight=0.4, backbone_out_indices=[2, 4], freeze_backbone=True)
    base_weights = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    head_before = model.head.classifier.weight.detach().clone()
    lora_model = apply_lora(model, r=4, alpha=8)
    trainable = {n.removeprefix("base_model.model.") for n, p in lora_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("head.", "auxiliary_head.")) for n in trainable)
    assert any(n.startswith("auxiliary_head.") for n in trainable) and any(n.startswith("head.") for n in trainable)
    assert not model.config.freeze_backbone  # the adapters live in the backbone

    optimizer = torch.optim.AdamW([g for g in param_groups(lora_model, 1e-2, weight_decay=0.0)], lr=1e-2)
    x, y = batch()
    lora_model.train()
    losses = []
    for _ in range(8):
        loss = lora_model(pixel_values=x, labels=y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.backbone.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_weights[name.replace(".base_layer.", ".")]), name
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)
    assert not torch.equal(model.head.classifier.weight, head_before)


def test_save_load_identical_logits_with_saved_base(tmp_path):
    model = tiny_model(backbone_out_indices=[2, 4], auxiliary_loss_weight=0.4, auxiliary_in_index=0)
    lora_model = apply_lora(model, r=4)
    randomize_lora(lora_model)
    with torch.no_grad():
        model.head.batch_norm.running_mean.normal_()  # trained BN statistics must come back too
    x, _ = batch()
    lora_model.eval()
    expected = lora_model(pixel_values=x).logits
    with pytest.raises(ValueError, match="not recorded"):
        save_lora(lora_model, tmp_path / "no_base")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft's probe for a base config.json warned here (the path is relative)
        save_lora(lora_model, tmp_path / "lora", save_base=True)
    files = {p.name for p in (tmp_path / "lora").iterdir()}
    assert {"adapter_model.safetensors", "head_weights.safetensors", "vitseg_config.json", "base"} <= files
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in (tmp_path / "lora").rglob("*"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_lora(lora_model, tmp_path / "lora", save_base=True)

    loaded = load_lora(tmp_path / "lora")
    loaded.eval()
    torch.testing.assert_close(loaded(pixel_values=x).logits, expected, rtol=0, atol=1e-6)

    merged = lora_model.merge_and_unload()
    assert isinstance(merged, ViTSegForSemanticSegmentation)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(pixel_values=x).logits, expected, rtol=1e-5, atol=1e-5)


def test_save_load_from_pretrained_backbone_folder(tiny_backbone_dir, tmp_path):
    model = tiny_model(backbone=tiny_backbone_dir)
    lora_model = apply_lora(model, r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    randomize_lora(lora_model)
    x, y = batch()
    optimizer = torch.optim.SGD([p for p in lora_model.parameters() if p.requires_grad], lr=0.1)
    lora_model.train()
    lora_model(pixel_values=x, labels=y).loss.backward()
    optimizer.step()
    lora_model.eval()
    expected = lora_model(pixel_values=x).logits

    save_lora(lora_model, tmp_path / "lora")  # the backbone folder is recorded, nothing else copied
    assert not (tmp_path / "lora" / "base").exists()
    loaded = load_lora(tmp_path / "lora")
    loaded.eval()
    torch.testing.assert_close(loaded(pixel_values=x).logits, expected, rtol=0, atol=1e-6)

    # trainable again on request, head included
    loaded = load_lora(tmp_path / "lora", is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any(".head." in n for n in trainable)


def test_bad_input(tmp_path):
    model = tiny_model()
    with pytest.raises(FileNotFoundError, match="not a folder written by save_lora"):
        load_lora(tmp_path)
    lora_model = apply_lora(model)
    with pytest.raises(ValueError, match="already carries PEFT adapters"):
        apply_lora(lora_model)
    with pytest.raises(TypeError, match="PeftModel"):
        save_lora(tiny_model(), tmp_path / "x")
