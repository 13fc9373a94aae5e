"""Parameter groups (layer-wise lr decay, no-decay set, head lr), the poly schedule, build_optimizer."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from conftest import FAMILIES, tiny_model

from hf_vitseg.training.optim import (
    OptimizerSettings,
    backbone_layer_ids,
    build_optimizer,
    param_groups,
    poly_schedule_with_warmup,
)
from hf_vitseg.training.recipes import full_finetune


def group_of(groups):
    """parameter name -> its group."""
    return {name: g for g in groups for name in g["param_names"]}


def expected_layer_id(family: str, name: str, num_layers: int) -> int:
    """The layer id a parameter name should get, written out per family from the HF module names."""
    if family == "swin":
        depths = [1, 1, 1, 1]
        if m := re.search(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.", name):
            return sum(depths[: int(m[1])]) + int(m[2]) + 1
        if m := re.search(r"encoder\.layers\.(\d+)\.downsample\.", name):
            return sum(depths[: int(m[1]) + 1])
        return num_layers + 1 if "hidden_states_norms" in name else 0
    if m := re.search(r"\.(?:layers|layer)\.(\d+)\.", name):
        return int(m[1]) + 1
    if re.search(r"backbone\.model\.(layernorm|norm|post_layernorm)\.", name):
        return num_layers + 1
    return 0


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_decay_lr_ratios(family):
    model = tiny_model("linear", family)
    lr, decay = 1e-3, 0.8
    groups = param_groups(model, lr, head_lr=5e-3, layer_decay=decay)
    by_name = group_of(groups)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(by_name) == sorted(trainable)  # every trainable parameter exactly once
    assert sum(len(g["params"]) for g in groups) == len(trainable)

    layer_ids, num_layers = backbone_layer_ids(model)
    assert num_layers == 4  # every tiny config has 4 layers (Swin: 4 stages of 1 block)
    for name in trainable:
        group = by_name[name]
        if name.startswith("backbone."):
            k = expected_layer_id(family, name, num_layers)
            assert layer_ids[name] == k, name
            assert group["name"].startswith(f"backbone.layer_{k}.")
            assert group["lr"] == pytest.approx(lr * decay ** (num_layers + 1 - k), rel=1e-12)
        else:
            assert group["name"].startswith("head.") and group["lr"] == 5e-3
    # consecutive layers differ by exactly one factor of `decay`
    lrs = {
        int(g["name"].split("_")[1].split(".")[0]): g["lr"] for g in groups if g["name"].startswith("backbone.layer_")
    }
    for k in lrs:
        if k + 1 in lrs:
            assert lrs[k] / lrs[k + 1] == pytest.approx(decay, rel=1e-12)


def test_no_decay_set_dinov2():
    model = tiny_model("linear", auxiliary_loss_weight=0.4, backbone_out_indices=[2, 4], auxiliary_in_index=0)
    groups = param_groups(model, 1e-3, weight_decay=0.05, layer_decay=0.9)
    by_name = group_of(groups)
    # written out independently of the implementation's rules
    # (the auxiliary head's BatchNorm is `auxiliary_head.0.1`: ConvNormAct = conv, norm, act)
    no_decay_markers = (
        "bias", "norm", "position_embeddings", "cls_token", "mask_token", "lambda1", "auxiliary_head.0.1.",
    )
    for name, param in model.named_parameters():
        if not param.requires_grad:  # the mask token, layers past the deepest tap: never used, not trainable
            assert name not in by_name
            continue
        no_decay = any(m in name for m in no_decay_markers)
        assert by_name[name]["weight_decay"] == (0.0 if no_decay else 0.05), name
        assert no_decay == by_name[name]["name"].endswith(".no_decay")
    decayed = {n for n, g in by_name.items() if g["weight_decay"] > 0}
    # what is decayed: the weights of linear / conv layers, nothing else
    assert decayed and all(dict(model.named_parameters())[n].ndim >= 2 for n in decayed)
    assert any("head.classifier.weight" == n for n in decayed)


def test_no_decay_tokens_and_relative_positions():
    for family, markers in [("dinov2_with_registers", ["register_tokens", "cls_token"]),
                            ("deit", ["distillation_token", "position_embeddings"]),
                            ("sam", ["rel_pos_h", "rel_pos_w", "pos_embed"]),
                            ("swin", ["relative_position_bias_table"])]:
        by_name = group_of(param_groups(tiny_model("linear", family), 1e-3))
        for marker in markers:
            names = [n for n in by_name if marker in n]
            assert names, (family, marker)
            assert all(by_name[n]["weight_decay"] == 0.0 for n in names), (family, marker)


def test_frozen_backbone_excluded_and_head_parts_at_head_lr():
    model = tiny_model("conv", freeze_backbone=True, neck="pyramid", backbone_out_indices=[1, 2, 3, 4],
                       auxiliary_loss_weight=0.4)
    groups = param_groups(model, 1e-4, head_lr=1e-2, layer_decay=0.9)
    names = [n for g in groups for n in g["param_names"]]
    assert names and not any(n.startswith("backbone.") for n in names)
    assert {n.split(".")[0] for n in names} == {"head", "neck", "auxiliary_head"}
    assert all(g["lr"] == 1e-2 for g in groups)
    model.head.requires_grad_(False)
    model.neck.requires_grad_(False)
    model.auxiliary_head.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 1e-4)


def test_without_layer_decay_one_backbone_lr():
    groups = param_groups(tiny_model(), 1e-3, head_lr=1e-2)
    assert {g["name"] for g in groups} == {"backbone.decay", "backbone.no_decay", "head.decay", "head.no_decay"}
    assert all(g["lr"] == (1e-3 if g["name"].startswith("backbone") else 1e-2) for g in groups)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1])
def test_bad_layer_decay(bad):
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(tiny_model(), 1e-3, layer_decay=bad)


def test_poly_schedule_values():
    first, second = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [first], "lr": 1e-3}, {"params": [second], "lr": 1e-4}], lr=1e-3)
    scheduler = poly_schedule_with_warmup(optimizer, warmup_steps=10, total_steps=110, power=2.0, min_lr_ratio=0.1)
    lrs = []
    for _ in range(111):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert lrs[0][0] == 0.0
    assert lrs[5][0] == pytest.approx(0.5e-3)           # linear warm-up
    assert lrs[10][0] == pytest.approx(1e-3)            # peak at the end of warm-up
    remaining = 1 - (60 - 10) / 100
    assert lrs[60][0] == pytest.approx(1e-3 * ((1 - 0.1) * remaining**2 + 0.1))
    assert lrs[110][0] == pytest.approx(1e-4)           # min_lr_ratio x lr at the end
    assert all(a / b == pytest.approx(10.0) for a, b in lrs[1:])  # group ratios (layer decay) kept


def test_poly_schedule_bad_input():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        poly_schedule_with_warmup(optimizer, 10, 10)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        poly_schedule_with_warmup(optimizer, 0, 10, min_lr_ratio=1.0)


def test_build_optimizer_from_recipe_and_args():
    model = tiny_model()
    recipe = full_finetune(layer_decay=0.5, lr=2e-4, head_lr=1e-3, weight_decay=0.01, warmup_steps=0.1)
    optimizer, scheduler = build_optimizer(model, recipe, num_training_steps=100)
    assert isinstance(optimizer, torch.optim.AdamW)
    peak = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
    assert peak["head.decay"] == 1e-3 and peak["backbone.layer_5.no_decay"] == 2e-4
    assert peak["backbone.layer_4.decay"] == pytest.approx(1e-4)
    assert all(g["lr"] == 0.0 for g in optimizer.param_groups)  # warm-up starts at 0
    for _ in range(10):  # 10% of 100 steps of warm-up
        optimizer.step()
        scheduler.step()
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(peak)

    namespace = argparse.Namespace(learning_rate=1e-3, weight_decay=0.0, layer_decay=None, warmup_steps=5, other=1)
    assert OptimizerSettings.from_any(namespace).lr == 1e-3
    settings = OptimizerSettings.from_any({"lr": 1e-3, "adam_beta2": 0.99})
    assert settings.betas == (0.9, 0.99)
    with pytest.raises(ValueError, match="Unknown optimizer settings"):
        OptimizerSettings.from_any({"learning_rat": 1e-3})

    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", learning_rate=3e-4, weight_decay=0.02, warmup_steps=3, report_to=[])
    optimizer, _ = build_optimizer(model, args, num_training_steps=20)
    assert {g["initial_lr"] for g in optimizer.param_groups} == {3e-4}
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.02}


def test_every_recipe_derives_crop_windows_and_trainer_settings_the_same_way():
    from hf_vitseg.training.recipes import linear_probe, lora

    for make in (linear_probe, full_finetune, lora):
        recipe = make(patch_size=16, crop_size=500, batch_size=4, max_steps=10, lr=1e-4)
        assert recipe.patch_size == 16 and recipe.crop_size == 512, recipe.name  # rounded up to a patch multiple
        assert recipe.sliding_window == {"crop_size": (512, 512), "stride": (341, 341)}, recipe.name
        assert recipe.training_args["per_device_train_batch_size"] == 4 and recipe.training_args["max_steps"] == 10
        assert recipe.training_args["learning_rate"] == recipe.optimizer.lr == 1e-4, recipe.name
