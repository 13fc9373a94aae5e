"""Frozen-backbone feature cache: contents, training on it equals training on recomputed features, Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from hf_vitseg import (
    BaseHead,
    register_head,
)
from hf_vitseg.modeling.head_base import HEAD_REGISTRY
from hf_vitseg.training.feature_cache import (
    CachedBackboneModel,
    FeatureCache,
    hflip_view,
    train_head_on_cache,
)


class ImageHead(BaseHead):
    """Adds a learnt projection of the image to a 1x1 classifier: a head that reads `pixel_values`."""

    uses_pixel_values = True

    def __init__(self, in_channels, in_strides, num_labels, num_prefix_tokens=0, dropout=0.0, in_index=None):
        super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=in_channels[-1],
                         dropout=dropout, in_index=-1 if in_index is None else in_index, input_transform=None)
        self.image_proj = torch.nn.Conv2d(3, num_labels, 1)

    def forward(self, features):
        x = self.classify(self.select_inputs(features.feature_maps))
        image = torch.nn.functional.adaptive_avg_pool2d(features.pixel_values, x.shape[-2:])
        return x + self.image_proj(image)


@pytest.fixture
def image_head():
    """Registered for one test only: other test modules parametrise over every registered head."""
    register_head("test_cache_image_head")(ImageHead)
    yield "test_cache_image_head"
    HEAD_REGISTRY.pop("test_cache_image_head")


def make_data(n=10, size=32, with_labels=True):
    generator = torch.Generator().manual_seed(1)
    return [
        {"pixel_values": torch.randn(3, size, size, generator=generator)}
        | ({"labels": torch.randint(0, 3, (size, size), generator=generator)} if with_labels else {})
        for _ in range(n)
    ]


def stacked(data, key):
    return torch.stack([d[key] for d in data])


@pytest.mark.parametrize("family", ["dinov2_with_registers", "sam"])
def test_cache_contents_equal_backbone_output(family):
    size = 64 if family == "sam" else 32
    model = tiny_model(family=family, backbone_out_indices=[2, 4], freeze_backbone=True)
    data = make_data(n=5, size=size)
    cache = FeatureCache.build(model, data, batch_size=2)
    with torch.no_grad():
        reference = model.backbone(stacked(data, "pixel_values"))
    assert len(cache) == 5 and len(cache.feature_maps) == 2
    for cached, expected in zip(cache.feature_maps, reference.feature_maps):
        torch.testing.assert_close(cached, expected, rtol=1e-6, atol=1e-6)
    if family == "sam":
        assert cache.prefix_tokens is None
    else:
        assert cache.prefix_tokens[0].shape == (5, 3, 32)  # CLS + 2 registers
        for cached, expected in zip(cache.prefix_tokens, reference.prefix_tokens):
            torch.testing.assert_close(cached, expected, rtol=1e-6, atol=1e-6)
    assert cache.pixel_values is None  # the linear head never reads the image
    assert cache.labels.dtype == torch.uint8 and torch.equal(cache.labels.long(), stacked(data, "labels"))
    assert cache.strides == model.backbone.out_strides
    item = cache[3]
    assert torch.equal(item["feature_maps"][1], cache.feature_maps[1][3]) and item["labels"].dtype == torch.int64
    stored = cache.feature_maps + (cache.prefix_tokens or [])
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in stored) + 5 * size * size  # + uint8 labels

    half = FeatureCache.build(model, data, batch_size=5, dtype=torch.float16)
    assert half.feature_maps[0].dtype == torch.float16 and half.nbytes < cache.nbytes
    torch.testing.assert_close(half.feature_maps[0].float(), reference.feature_maps[0], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("config", [
    {"head": "linear"},
    {"head": "conv", "head_kwargs": {"channels": 16}, "neck": "pyramid", "neck_channels": 16,
     "backbone_out_indices": [1, 2, 3, 4], "auxiliary_loss_weight": 0.4, "auxiliary_channels": 16},
], ids=["linear", "conv+pyramid_neck+aux"])
def test_training_on_cache_equals_training_on_recomputed_features(config):
    """Same seed, same batch order, BatchNorm in train mode and dropout in both: the same weights.

    SGD with momentum rather than Adam: Adam's first steps move every weight by about lr x sign(gradient),
    so a weight whose gradient is ~0 flips with rounding noise (the cached maps are contiguous, the
    adapter's are strided views, and convolutions sum in another order); that would test rounding, not
    the cache."""
    model = tiny_model(freeze_backbone=True, **config)
    reference = copy.deepcopy(model)
    data = make_data(n=10)
    cache = FeatureCache.build(model, data, batch_size=4)
    epochs, batch_size, seed = 2, 4, 7

    torch.manual_seed(123)  # dropout in the heads draws from the global generator in both runs
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    losses = train_head_on_cache(model, cache, epochs, optimizer, batch_size=batch_size, seed=seed)

    torch.manual_seed(123)
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    images, labels = stacked(data, "pixel_values"), stacked(data, "labels")
    generator = torch.Generator().manual_seed(seed)
    reference.train()  # the head's BatchNorm in train mode, as in train_head_on_cache
    reference_losses = []
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        total = 0.0
        for start in range(0, len(data), batch_size):
            index = order[start : start + batch_size]
            loss = reference(pixel_values=images[index], labels=labels[index]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        reference_losses.append(total / len(data))

    assert losses == pytest.approx(reference_losses, rel=1e-5)
    trained, recomputed = model.state_dict(), reference.state_dict()
    head_keys = [k for k in trained if not k.startswith("backbone.")]
    initial = tiny_model(freeze_backbone=True, **config).state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in head_keys)
    for key in trained:
        torch.testing.assert_close(trained[key], recomputed[key], rtol=0, atol=1e-5, msg=key)


def test_pixel_values_kept_exactly_when_the_head_declares_it(image_head):
    model = tiny_model(freeze_backbone=True, head=image_head)
    data = make_data(n=3)
    cache = FeatureCache.build(model, data, batch_size=2)
    assert cache.pixel_values is not None and torch.equal(cache.pixel_values, stacked(data, "pixel_values"))
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=stacked(data, "pixel_values")).logits
        got = CachedBackboneModel(model, cache)(**cache.batch([0, 1, 2])).logits
    torch.testing.assert_close(got, expected)
    without = FeatureCache.build(model, data, keep_pixel_values=False)
    assert without.pixel_values is None
    with pytest.raises(ValueError, match="reads the image, but this feature cache holds none"):
        CachedBackboneModel(model, without)
    with pytest.raises(ValueError, match="reads the image .*carry no pixel_values"):
        CachedBackboneModel(model)(**without.batch([0, 1]))
    # unet reads the image through its stem, and only then
    pyramid = {"head": "unet", "backbone_out_indices": [1, 2, 3, 4], "freeze_backbone": True}
    unet = tiny_model(**pyramid, head_kwargs={"decoder_channels": [8, 8, 8, 8], "stem_channels": [4]})
    assert FeatureCache.build(unet, data).pixel_values is not None
    stemless = tiny_model(**pyramid, head_kwargs={"decoder_channels": [8, 8, 8], "stem_channels": []})
    assert not stemless.head.uses_pixel_values and FeatureCache.build(stemless, data).pixel_values is None


def test_building_runs_the_backbone_only():
    """No probe: the head never runs while the cache is built, and the backbone is not patched."""
    model = tiny_model(freeze_backbone=True, head="conv", head_kwargs={"channels": 8})
    calls = []
    model.head.register_forward_hook(lambda *args: calls.append(1))
    FeatureCache.build(model, make_data(n=2))
    assert calls == [] and "forward" not in vars(model.backbone)


def test_fixed_views():
    model = tiny_model(freeze_backbone=True)
    data = make_data(n=4)
    cache = FeatureCache.build(model, data, batch_size=4, views=[None, hflip_view])
    assert len(cache) == 8 and cache.meta["num_views"] == 2
    images, labels = stacked(data, "pixel_values"), stacked(data, "labels")
    with torch.no_grad():
        flipped = model.backbone(images.flip(-1)).feature_maps[0]
    torch.testing.assert_close(cache.feature_maps[0][4:], flipped, rtol=1e-6, atol=1e-6)
    assert torch.equal(cache.labels[4:].long(), labels.flip(-1))


def test_trainer_on_cache(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model(freeze_backbone=True)
    cache = FeatureCache.build(model, make_data(n=6), batch_size=3)
    before = copy.deepcopy(model.head.state_dict())
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=CachedBackboneModel(model, cache), args=args, train_dataset=cache,
                      eval_dataset=cache, data_collator=FeatureCache.collate)
    trainer.train()
    assert not torch.equal(model.head.classifier.weight, before["classifier.weight"])  # trained in place
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0


def test_save_load_and_compatibility(tmp_path):
    model = tiny_model(freeze_backbone=True)
    cache = FeatureCache.build(model, make_data(n=3), dtype=torch.float16)
    path = cache.save(tmp_path / "cache.safetensors")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        cache.save(path)
    loaded = FeatureCache.load(path)
    assert torch.equal(loaded.feature_maps[0], cache.feature_maps[0]) and torch.equal(loaded.labels, cache.labels)
    assert loaded.strides == cache.strides and loaded.meta == cache.meta
    assert cache.layers == [1, 2, 3, 4]  # linear's default: the last four layers
    other = tiny_model(freeze_backbone=True, backbone_out_indices=[0])
    with pytest.raises(ValueError, match=r"Layers \[0\] are not in this feature cache \(it holds layers \[1, 2, 3, 4"):
        CachedBackboneModel(other, loaded)
    unnormed = tiny_model(freeze_backbone=True, backbone_apply_layernorm=False)
    with pytest.raises(ValueError, match="another backbone configuration"):
        CachedBackboneModel(unnormed, loaded)


def test_bad_input():
    with pytest.raises(ValueError, match="frozen backbone"):
        FeatureCache.build(tiny_model(freeze_backbone=False), make_data(n=2))
    model = tiny_model(freeze_backbone=True)
    with pytest.raises(ValueError, match="empty"):
        FeatureCache.build(model, [])
    mixed = make_data(n=2) + make_data(n=2, size=40)
    with pytest.raises(ValueError, match="same size"):
        FeatureCache.build(model, mixed, batch_size=2)
    with pytest.raises(ValueError, match="pixel_values"):
        FeatureCache.build(model, [{"image": torch.zeros(3, 32, 32)}])
    unlabelled = FeatureCache.build(model, make_data(n=2, with_labels=False))
    with pytest.raises(ValueError, match="no labels"):
        train_head_on_cache(model, unlabelled, 1, torch.optim.SGD(model.head.parameters(), lr=0.1))
