"""Training mask transformers (issue 11 item 6): mask annealing, optimizer groups, LoRA, Trainer / Accelerate runs,
resume and the streaming metrics of `training.universal_metrics`."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_backbone_config
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_vitseg import ViTSegConfig
from hf_vitseg.modeling import ViTSegForUniversalSegmentation
from hf_vitseg.training.mask_annealing import (
    MaskAnnealing,
    MaskAnnealingCallback,
    annealing_probability,
    annealing_steps,
    set_attn_mask_probs,
)

MASK_HEAD_KWARGS = {"num_queries": 6, "num_blocks": 2, "train_num_points": 64}


def tiny_mask_model(head: str = "eomt", num_labels: int = 2, seed: int = 0, **config_kwargs):
    """A tiny random `ViTSegForUniversalSegmentation` (dinov2 family, patch 8, 2 masked blocks, 6 queries)."""
    torch.manual_seed(seed)
    config = ViTSegConfig(backbone_config=tiny_backbone_config("dinov2"), head=head, num_labels=num_labels,
                          head_kwargs=dict(MASK_HEAD_KWARGS), **config_kwargs)
    return ViTSegForUniversalSegmentation(config)


# -- the schedule ----------------------------------------------------------------------------------------------------
def test_default_steps_are_eomts():
    # EoMT's ADE20K configurations: 4 blocks, 39120 steps -> starts [6520, 13040, 19560, 26080], ends one part later
    starts, ends = annealing_steps(4, 39120)
    assert starts == [6520, 13040, 19560, 26080]
    assert ends == [13040, 19560, 26080, 32600]
    # every block's mask is off before the run ends, also for runs shorter than the parts
    for blocks, steps in ((2, 3), (4, 5), (3, 1000)):
        starts, ends = annealing_steps(blocks, steps)
        assert all(s < e <= steps for s, e in zip(starts, ends))


def test_probability_follows_the_poly_schedule():
    assert annealing_probability(0, 10, 20) == 1.0
    assert annealing_probability(9, 10, 20) == 1.0
    assert annealing_probability(10, 10, 20) == 1.0
    assert annealing_probability(15, 10, 20) == pytest.approx(0.5**0.9)
    assert annealing_probability(18, 10, 20) == pytest.approx(0.2**0.9)
    assert annealing_probability(20, 10, 20) == 0.0
    assert annealing_probability(25, 10, 20, power=2.0) == 0.0
    assert annealing_probability(12, 10, 20, power=2.0) == pytest.approx(0.8**2)


def test_mask_annealing_sets_the_model_buffer():
    model = tiny_mask_model()
    annealer = MaskAnnealing(model, total_steps=40)  # 2 blocks: parts of 10 steps; block 0 10..20, block 1 20..30
    assert annealer.start_steps == [10, 20] and annealer.end_steps == [20, 30]
    assert annealer.step(15) == pytest.approx([0.5**0.9, 1.0])
    assert model.attn_mask_probs.tolist() == pytest.approx([0.5**0.9, 1.0])
    annealer.step(25)
    assert model.attn_mask_probs.tolist() == pytest.approx([0.0, 0.5**0.9])
    annealer.step(30)
    assert model.attn_mask_probs.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="one step per masked block"):
        MaskAnnealing(model, total_steps=40, start_steps=[1], end_steps=[2])
    with pytest.raises(ValueError, match="start_steps < end_steps"):
        MaskAnnealing(model, total_steps=40, start_steps=[5, 9], end_steps=[5, 12])


def test_annealing_refuses_a_pixel_head_model():
    from conftest import tiny_model

    with pytest.raises(TypeError, match="mask-transformer model"):
        MaskAnnealing(tiny_model("linear"), total_steps=10)


def _run_callback(callback, model, max_steps, global_step=0):
    args = TrainingArguments(output_dir="unused", report_to="none")
    state, control = TrainerState(), TrainerControl()
    state.max_steps, state.global_step = max_steps, global_step
    callback.on_train_begin(args, state, control, model=model)
    return args, state, control


def test_callback_through_peft_and_at_the_end():
    from hf_vitseg.training.lora import apply_lora

    model = apply_lora(tiny_mask_model(), r=2)
    callback = MaskAnnealingCallback()
    args, state, control = _run_callback(callback, model, max_steps=8)  # parts of 2 steps: block 0 2..4, 1 4..6
    inner = model.get_base_model()
    seen = [inner.attn_mask_probs.tolist()]
    for step in range(1, 9):
        state.global_step = step
        callback.on_step_end(args, state, control, model=model)
        seen.append(inner.attn_mask_probs.tolist())
    assert seen[0] == [1.0, 1.0] and seen[2] == [1.0, 1.0]
    assert seen[3] == pytest.approx([0.5**0.9, 1.0])
    assert seen[5] == pytest.approx([0.0, 0.5**0.9])
    assert seen[6] == seen[8] == [0.0, 0.0]
    set_attn_mask_probs(inner, 0.7)  # whatever they are: the end of training switches the masks off
    callback.on_train_end(args, state, control, model=model)
    assert inner.attn_mask_probs.tolist() == [0.0, 0.0]


def test_callback_resumes_at_the_checkpoints_step():
    model = tiny_mask_model()
    _run_callback(MaskAnnealingCallback(), model, max_steps=40, global_step=15)
    assert model.attn_mask_probs.tolist() == pytest.approx([0.5**0.9, 1.0])
    _run_callback(MaskAnnealingCallback(total_steps=80), model, max_steps=40, global_step=15)  # own horizon
    assert model.attn_mask_probs.tolist() == [1.0, 1.0]


def test_eval_with_probs_zero_runs_plain_attention():
    """After annealing no block computes an intermediate mask in eval mode: no auxiliary predictions, and the
    outputs do not depend on what the masks would have been."""
    model = tiny_mask_model().eval()
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        masked = model(pixel_values)
        set_attn_mask_probs(model, 0.0)
        plain = model(pixel_values)
    assert masked.auxiliary_logits is not None and plain.auxiliary_logits is None
    assert not torch.allclose(masked.masks_queries_logits, plain.masks_queries_logits)


# -- optimizer groups and LoRA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["eomt", "pmt"])
def test_layer_decay_groups_of_mask_models(head):
    from hf_vitseg.training.optim import backbone_layer_ids, param_groups

    model = tiny_mask_model(head)
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, head_lr=5e-3, weight_decay=0.05, layer_decay=0.5)}
    # the head's parts apart, all at head_lr; the queries (an nn.Embedding) without weight decay
    assert groups["head.query.no_decay"]["param_names"] == ["head.query.weight"]
    assert "head.query.decay" not in groups
    for part in ("class_predictor", "mask_head", "upscale_block"):
        assert groups[f"head.{part}.decay"]["lr"] == 5e-3
    assert all(g["lr"] == 5e-3 for name, g in groups.items() if name.startswith("head."))
    if head == "pmt":  # frozen backbone: no backbone group; the decoder layers copied from it learn at head_lr
        assert not any(name.startswith("backbone") for name in groups)
        assert groups["head.layers.decay"]["weight_decay"] == 0.05
    else:  # eomt: the query blocks are backbone layers and decay with them (EoMT's llrd_l2_enabled)
        _, num_layers = backbone_layer_ids(model)
        last = groups[f"backbone.layer_{num_layers}.decay"]
        assert last["lr"] == pytest.approx(1e-3 * 0.5)
        assert groups["backbone.layer_1.decay"]["lr"] == pytest.approx(1e-3 * 0.5**num_layers)
    grouped = {n for g in groups.values() for n in g["param_names"]}
    assert grouped == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("head", ["eomt", "pmt"])
def test_lora_trains_adapters_and_head_only(head, tmp_path):
    from hf_vitseg.training.lora import apply_lora, load_lora, save_lora

    model = tiny_mask_model(head)
    if head == "pmt":
        model.freeze_backbone(False)  # LoRA adapters go into the backbone
    lora = apply_lora(model, r=2)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".head." in n for n in trainable)
    assert any("lora_" in n for n in trainable)
    assert not any(".head." in n and "lora_" in n for n in trainable)  # pmt's copied layers train in full
    assert {n for n in trainable if ".head." in n} == {
        f"base_model.model.head.{n}" for n, _ in model.head.named_parameters()}
    # one step changes adapters and head, not the base weights
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    out = lora(torch.randn(2, 3, 32, 32), mask_labels=[torch.ones(1, 32, 32), torch.zeros(1, 32, 32)],
               class_labels=[torch.tensor([1]), torch.tensor([0])])
    out.loss.backward()
    torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=1.0).step()
    changed = {n for n, p in lora.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    # the annealed state travels with the LoRA folder
    set_attn_mask_probs(lora, 0.0)
    save_lora(lora, tmp_path / "lora", base_model_name_or_path="same-seed-base")
    reloaded = load_lora(tmp_path / "lora", base_model=tiny_mask_model(head))  # the same base weights (seed)
    assert reloaded.get_base_model().attn_mask_probs.tolist() == [0.0, 0.0]
    pixel_values = torch.randn(1, 3, 32, 32)
    lora.eval()
    with torch.no_grad():
        expected, got = lora(pixel_values), reloaded(pixel_values)
    torch.testing.assert_close(got.masks_queries_logits, expected.masks_queries_logits)
    assert math.isfinite(out.loss.item())
