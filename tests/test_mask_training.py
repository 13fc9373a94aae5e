"""Training mask transformers (issue 11 item 6): mask annealing, optimizer groups, LoRA, Trainer / Accelerate runs,
resume and the streaming metrics of `training.universal_metrics`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_backbone_config
from PIL import Image
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

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


# -- streaming metrics -------------------------------------------------------------------------------------------------
def _perfect_outputs(mask_labels, class_labels, num_queries=6, num_labels=2, scale=1):
    """Outputs that predict the targets exactly: one query per target (mask logits +/-20 at 1/`scale` resolution:
    at 1/4, as the models predict, bilinear upsampling rounds the corners off),
    class logits 20 for its class), the other queries 'no object'."""
    from types import SimpleNamespace

    batch, (height, width) = len(mask_labels), mask_labels[0].shape[-2:]
    class_logits = torch.full((batch, num_queries, num_labels + 1), -20.0)
    class_logits[..., -1] = 20.0
    mask_logits = torch.full((batch, num_queries, height // scale, width // scale), -20.0)
    for image, (masks, classes) in enumerate(zip(mask_labels, class_labels)):
        for query, (mask, label) in enumerate(zip(masks, classes)):
            class_logits[image, query, -1], class_logits[image, query, label] = -20.0, 20.0
            mask_logits[image, query] = torch.where(mask[::scale, ::scale] > 0.5, 20.0, -20.0)
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)


def _blob_targets():
    """Two 32x32 images: boxes of classes 0 and 1, the rest of class 2 (background as stuff, as panoptic data has
    it: panoptic post-processing gives every pixel to a segment)."""
    masks_a = torch.zeros(3, 32, 32)
    masks_a[0, 4:12, 4:12] = 1
    masks_a[1, 16:28, 8:20] = 1
    masks_a[2] = 1 - masks_a[0] - masks_a[1]
    masks_b = torch.zeros(2, 32, 32)
    masks_b[0, 8:24, 8:24] = 1
    masks_b[1] = 1 - masks_b[0]
    return [masks_a, masks_b], [torch.tensor([0, 1, 2]), torch.tensor([1, 2])]


@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_universal_metrics_perfect_and_wrong_predictions(task):
    from hf_vitseg import ViTSegImageProcessor
    from hf_vitseg.training.universal_metrics import compute_universal_metrics, encode_mask_targets

    processor = ViTSegImageProcessor(patch_size=8)
    metric = compute_universal_metrics(processor, task, 3, {0: "a", 1: "b", 2: "background"})
    mask_labels, class_labels = _blob_targets()
    targets = encode_mask_targets(mask_labels, class_labels)
    outputs = _perfect_outputs(mask_labels, class_labels, num_labels=3)
    # Trainer's streaming call: one batch per call, the result at the last one
    assert metric(((outputs.class_queries_logits, outputs.masks_queries_logits), targets), compute_result=False) == {}
    results = metric(((outputs.class_queries_logits, outputs.masks_queries_logits), targets), compute_result=True)
    headline = {"semantic": ["mean_iou", "iou_a", "iou_b"],
                "instance": ["map", "map_50", "map_75", "ap_a", "pq", "sq", "rq"],
                "panoptic": ["pq", "sq", "rq", "pq_a", "pq_b", "pq_background"]}[task]
    for name in headline:
        assert results[name] == pytest.approx(1.0), (name, results)
    # the classes shifted: nothing right
    wrong = _perfect_outputs(mask_labels, [(c + 1) % 3 for c in class_labels], num_labels=3)
    results = metric(((wrong.class_queries_logits, wrong.masks_queries_logits), targets))
    assert results[headline[0]] == pytest.approx(0.0)


def test_instance_pq_counts_background_but_not_void():
    """Instance data without a background class (nuclei): a predicted instance on background is a false positive
    (PQ) and lowers AP; one on void pixels (ignore, padding) is not and does not."""
    from hf_vitseg import ViTSegImageProcessor
    from hf_vitseg.training.universal_metrics import compute_universal_metrics, encode_mask_targets

    processor = ViTSegImageProcessor(patch_size=8)
    mask_labels, class_labels = [torch.zeros(1, 32, 32)], [torch.tensor([0])]
    mask_labels[0][0, 0:8, 0:8] = 1
    predicted = torch.zeros(2, 32, 32)
    predicted[0, 0:8, 0:8] = 1
    predicted[1, 16:32, 16:32] = 1  # an extra segment of class 0
    outputs = _perfect_outputs([predicted], [torch.tensor([0, 0])])
    outputs.class_queries_logits[0, 0, -1] = 19.0  # the true instance scores 0.73, below the false one: AP 0.5
    void = torch.zeros(1, 32, 32, dtype=torch.bool)
    for void_there, expected_pq in ((False, 1 / 1.5), (True, 1.0)):  # RQ = tp / (tp + fp/2)
        void[0, 16:32, 16:32] = void_there
        metric = compute_universal_metrics(processor, "instance", 2)
        results = metric(((outputs.class_queries_logits, outputs.masks_queries_logits),
                          encode_mask_targets(mask_labels, class_labels, void)))
        assert results["pq"] == pytest.approx(expected_pq)
        assert results["map"] == pytest.approx(1.0 if void_there else 0.5)



# -- Trainer runs --------------------------------------------------------------------------------------------------
def make_instance_folder(root: Path, num_images: int = 4, size: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """`root/images/NNN.png` and `root/masks/NNN.png`: two bright 24x24 objects per image (instance ids 1, 2 on
    background 0), touching in some images; one class ('nucleus'), as stardist's nuclei."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index in range(num_images):
        image = rng.normal(40, 10, (size, size, 3))
        mask = np.zeros((size, size), np.uint8)
        for instance in (1, 2):
            y, x = rng.integers(0, size - 24, 2)
            mask[y : y + 24, x : x + 24] = instance
            image[y : y + 24, x : x + 24] = 150 + 50 * instance
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{index:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{index:03d}.png")
    return root / "images", root / "masks"


class LossAndProbs(TrainerCallback):
    """Records the logged training losses and the masked-attention probabilities after every step."""

    def __init__(self):
        self.losses, self.probs = [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.probs.append(model.attn_mask_probs.tolist())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


NO_AUGMENT = {"scale_range": (1.0, 1.0), "hflip": False, "photometric": False}


@pytest.fixture(scope="module")
def instance_data(tmp_path_factory):
    from hf_vitseg.data.datasets import load_instance_folder

    root = tmp_path_factory.mktemp("instances")
    images, masks = make_instance_folder(root)
    return {"images": images, "masks": masks, "dataset": load_instance_folder(images, masks, instance_class=0)}


def test_trainer_overfits_anneals_and_saves_plain_attention(instance_data, tmp_path):
    """eomt with Trainer on 4 instance images: the loss falls, the masks anneal to 0 by the last step, the streaming
    instance metrics see the objects, and the saved model reloads with plain attention."""
    from hf_vitseg.training import train

    record = LossAndProbs()
    model, metrics = train(
        tiny_mask_model("eomt", num_labels=1, id2label={0: "nucleus"}), instance_data["dataset"],
        instance_data["dataset"], output_dir=tmp_path / "run", task="instance", max_steps=60, batch_size=2, lr=1e-3,
        logging_steps=1, save_steps=60, augment=NO_AUGMENT, callbacks=[record], use_cpu=True, disable_tqdm=True,
    )
    assert np.mean(record.losses[-10:]) < 0.8 * np.mean(record.losses[:5])
    # EoMT's schedule over 60 steps, 2 blocks: block 0 anneals over steps 15..30, block 1 over 30..45
    assert record.probs[13] == [1.0, 1.0]
    assert record.probs[22 - 1][0] == pytest.approx((1 - 7 / 15) ** 0.9)
    assert record.probs[44 - 1] == [0.0, pytest.approx((1 - 14 / 15) ** 0.9)]
    assert record.probs[-1] == [0.0, 0.0] and model.attn_mask_probs.tolist() == [0.0, 0.0]
    for name in ("eval_map", "eval_map_50", "eval_map_75", "eval_pq", "eval_sq", "eval_rq", "eval_ap_nucleus",
                 "eval_loss"):
        assert math.isfinite(metrics[name]), name
    assert metrics["eval_map_50"] > 0  # the objects are found: targets, post-processing and metric fit together
    from hf_vitseg.training import evaluate_model  # hf-vitseg evaluate: the same numbers, one image at a time

    again = evaluate_model(model, instance_data["dataset"], task="instance", device="cpu")
    for name in ("map", "map_50", "map_75", "pq", "sq", "rq"):
        assert again[name] == pytest.approx(metrics[f"eval_{name}"]), name
    saved = ViTSegForUniversalSegmentation.from_pretrained(tmp_path / "run").eval()
    assert saved.attn_mask_probs.tolist() == [0.0, 0.0]
    with torch.no_grad():
        outputs = saved(torch.randn(1, 3, 64, 64))
    assert outputs.auxiliary_logits is None  # plain attention: no block computed an intermediate mask
    assert json.loads((tmp_path / "run" / "all_results.json").read_text())["eval_map_50"] == metrics["eval_map_50"]


def test_trainer_semantic_task_reports_per_class_iou(tmp_path):
    """pmt (frozen backbone) on semantic maps: one mask per present class; mIoU and per-class IoU stream."""
    from test_train import NUM_LABELS, make_image_folder

    from hf_vitseg.data.datasets import load_image_folder
    from hf_vitseg.training import train

    images, masks = make_image_folder(tmp_path / "data", 2)
    dataset = load_image_folder(images, masks)
    model = tiny_mask_model("pmt", num_labels=NUM_LABELS, id2label={0: "a", 1: "b", 2: "c"})
    backbone_before = {n: p.clone() for n, p in model.backbone.named_parameters()}
    _, metrics = train(model, dataset, dataset, output_dir=tmp_path / "run", max_steps=3, batch_size=2,
                       augment=NO_AUGMENT, use_cpu=True, disable_tqdm=True)
    for name in ("eval_mean_iou", "eval_pixel_accuracy", "eval_iou_a", "eval_iou_b", "eval_iou_c"):
        assert name in metrics
    assert 0 <= metrics["eval_mean_iou"] <= 1
    assert all(torch.equal(p, backbone_before[n]) for n, p in model.backbone.named_parameters())  # pmt: frozen
    # evaluate_model (hf-vitseg evaluate) measures the same as the Trainer's streaming evaluation
    from hf_vitseg.training import evaluate_model

    again = evaluate_model(model, dataset, device="cpu")
    assert again["num_images"] == 2
    for name in ("mean_iou", "pixel_accuracy", "iou_a", "iou_b", "iou_c"):
        assert again[name] == pytest.approx(metrics[f"eval_{name}"], nan_ok=True), name


def test_train_refuses_a_task_for_pixel_heads(tmp_path):
    from conftest import tiny_model

    from hf_vitseg.training import train

    with pytest.raises(ValueError, match="task='instance' needs a mask-transformer model"):
        train(tiny_model("linear"), None, output_dir=tmp_path / "run", task="instance")
    with pytest.raises(ValueError, match="task must be one of semantic, instance, panoptic"):
        train(tiny_mask_model(), None, output_dir=tmp_path / "run", task="detection")
    assert not (tmp_path / "run").exists()


def test_resume_continues_weights_and_annealing(instance_data, tmp_path):
    """A run resumed from its step-3 checkpoint ends with the weights and the masked-attention probabilities of the
    uninterrupted 6-step run (optimizer, scheduler, data order, and the annealing from the checkpoint's step)."""
    import shutil

    from safetensors.torch import load_file

    from hf_vitseg.training import train

    settings = dict(task="instance", max_steps=6, batch_size=2, lr=1e-3, save_steps=3, seed=3, augment=NO_AUGMENT,
                    use_cpu=True, disable_tqdm=True)
    train(tiny_mask_model(seed=1), instance_data["dataset"], output_dir=tmp_path / "full", **settings)
    # the interrupted run: what the full run had on disk after step 3
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "cut" / "checkpoint-3")
    shutil.copy(tmp_path / "full" / ".hf_vitseg_run.json", tmp_path / "cut")
    record = LossAndProbs()
    resumed, _ = train(tiny_mask_model(seed=2), instance_data["dataset"], output_dir=tmp_path / "cut", resume=True,
                       callbacks=[record], **settings)
    # the schedule picks up at step 3 (2 blocks over 6 steps: block 0 anneals over 1..3, block 1 over 3..4)
    assert record.probs == [[0.0, 0.0]] * 3
    full = load_file(tmp_path / "full" / "model.safetensors")
    cut = load_file(tmp_path / "cut" / "model.safetensors")
    assert full.keys() == cut.keys()
    for key in full:
        torch.testing.assert_close(cut[key], full[key], msg=key)


# -- the frozen-backbone feature cache (pmt) -------------------------------------------------------------------------
def test_pack_and_unpack_mask_targets():
    from hf_vitseg.training.universal_metrics import pack_mask_targets, unpack_mask_targets

    mask_labels, class_labels = _blob_targets()
    packed = pack_mask_targets(mask_labels, class_labels, num_labels=3)
    assert packed.shape == (2, 32, 32)
    masks, classes = unpack_mask_targets(packed, num_labels=3)
    for got, expected in zip(masks, mask_labels):
        torch.testing.assert_close(got, expected)
    assert [c.tolist() for c in classes] == [c.tolist() for c in class_labels]
    # a crop that leaves out the first image's class-0 box drops that target; a flip flips the masks
    masks, classes = unpack_mask_targets(packed[:, 16:, :].flip(-1), num_labels=3)
    assert classes[0].tolist() == [1, 2]
    torch.testing.assert_close(masks[0][0], mask_labels[0][1, 16:, :].flip(-1))


def test_pmt_trains_on_the_feature_cache_as_on_images(instance_data):
    """pmt's loss from cached backbone features equals its loss on the images, and train_head_on_cache trains it;
    eomt, whose queries run inside the backbone, is refused with the reason."""
    from hf_vitseg.data import prepare_datasets
    from hf_vitseg.data.collator import SegmentationCollator
    from hf_vitseg.modeling import ViTSegImageProcessor
    from hf_vitseg.training.feature_cache import CachedBackboneModel, FeatureCache, train_head_on_cache

    model = tiny_mask_model("pmt", num_labels=1)
    processor = ViTSegImageProcessor.for_model(model)
    _, dataset = prepare_datasets(None, instance_data["dataset"], processor, None, return_mask_labels=True)
    collator = SegmentationCollator(pad_multiple=model.size_divisor)
    cache = FeatureCache.build(model, dataset, batch_size=2, collate_fn=collator)
    assert len(cache) == 4
    batch = collator([dataset[0], dataset[1]])
    model.eval()  # no dropout; the loss's point sampling drawn alike from one seed
    torch.manual_seed(0)
    on_images = model(**batch).loss
    torch.manual_seed(0)
    on_cache = CachedBackboneModel(model, cache)(**cache.batch([0, 1]), return_dict=True).loss
    torch.testing.assert_close(on_cache, on_images, rtol=1e-4, atol=1e-4)
    model.train()
    history = train_head_on_cache(model, cache, epochs=6, batch_size=2, crop_size=32, hflip=True,
                                  optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                              lr=1e-3))
    assert history[-1] < history[0]
    with pytest.raises(ValueError, match="head 'pmt'"):
        FeatureCache.build(tiny_mask_model("eomt").requires_grad_(False), dataset, collate_fn=collator)


# -- the plain Accelerate loop (examples/accelerate_train.py) ---------------------------------------------------------
def test_accelerate_example_trains_a_mask_model(instance_data):
    """The example loop's mask path: the loss falls, MaskAnnealing turns the masks off by the end, and the
    evaluation reports the instance metrics."""
    import importlib.util

    example = Path(__file__).resolve().parents[1] / "examples" / "accelerate_train.py"
    spec = importlib.util.spec_from_file_location("accelerate_train_mask", example)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = tiny_mask_model("eomt", num_labels=1)
    trained, metrics = module.train_with_accelerate(
        model, instance_data["dataset"], instance_data["dataset"], task="instance", max_steps=8, batch_size=2,
        lr=1e-3, logging_steps=1, augment=NO_AUGMENT, accelerator=module.default_accelerator(cpu=True),
    )
    assert trained.attn_mask_probs.tolist() == [0.0, 0.0]
    for name in ("eval_map", "eval_map_50", "eval_pq", "train_loss"):
        assert math.isfinite(metrics[name]), name


def test_batch_padding_is_void_for_the_metrics():
    """Two images of different sizes in one batch (samples without a void_mask of their own, e.g. a user's
    dataset): the collator marks the padding void (`void_mask`), and a segment predicted there is no false
    positive; a collator of one's own that gives transformers' `pixel_mask` instead is read the same way."""
    from hf_vitseg import ViTSegImageProcessor
    from hf_vitseg.data.collator import SegmentationCollator
    from hf_vitseg.training.trainer import _void_pixels
    from hf_vitseg.training.universal_metrics import compute_universal_metrics, encode_mask_targets

    small, large = torch.zeros(1, 16, 32), torch.zeros(1, 32, 32)
    small[0, :8, :8] = 1
    large[0, 16:, 16:] = 1
    features = [{"pixel_values": torch.zeros(3, 16, 32), "mask_labels": small, "class_labels": torch.tensor([0])},
                {"pixel_values": torch.zeros(3, 32, 32), "mask_labels": large, "class_labels": torch.tensor([0])}]
    batch = SegmentationCollator(pad_multiple=8)(features)
    assert (~batch["void_mask"][0]).sum() == 16 * 32 and not batch["void_mask"][1].any()
    void = _void_pixels(batch, tiny_mask_model().config)
    pixel_mask = (~batch["void_mask"]).long()  # transformers' name, 1 on image pixels
    assert torch.equal(_void_pixels({"pixel_mask": pixel_mask}, tiny_mask_model().config), void)
    predicted = [torch.stack([batch["mask_labels"][0][0], torch.zeros(32, 32)]), batch["mask_labels"][1]]
    predicted[0][1, 16:, :] = 1  # a segment in the first image's padding
    outputs = _perfect_outputs(predicted, [torch.tensor([0, 0]), torch.tensor([0])], num_labels=1)
    targets = encode_mask_targets(batch["mask_labels"], batch["class_labels"], void)
    results = compute_universal_metrics(ViTSegImageProcessor(patch_size=8), "instance", 1)(
        ((outputs.class_queries_logits, outputs.masks_queries_logits), targets))
    assert results["pq"] == pytest.approx(1.0) and results["map"] == pytest.approx(1.0)
