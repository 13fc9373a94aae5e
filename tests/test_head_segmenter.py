"""`segmenter` (Segmenter's mask transformer): its cosine-similarity masks and the two-class temperature. Shapes,
training and save/load on every backbone family: the common suite in test_modeling.py."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, train_steps
from test_head_setr_mla import batch

import hf_vitseg.modeling.head_segmenter  # noqa: F401  registers segmenter


def test_masks_are_cosine_similarities_normed_over_classes():
    model = tiny_model("segmenter").eval()
    head = model.head
    assert head.input_projection.out_features == 32 and head.layers[0].self_attn.num_heads == 1  # d_model = width
    assert len(head.layers) == 2 and head.layers[0].cross_attn is None
    assert 0 < head.class_embeddings.std() < 0.05  # initialised by the model (initializer_range)
    captured = {}
    head.mask_norm.register_forward_hook(lambda m, i, o: captured.update(scores=i[0], out=o))
    with torch.no_grad():
        logits = model(batch()[0]).logits
    scores = captured["scores"]  # (B, h*w, K): scalar products of unit vectors
    assert scores.shape == (2, 8 * 12, 3) and scores.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(logits, captured["out"].transpose(1, 2).reshape(2, 3, 8, 12))


def test_wider_decoder_and_bad_heads():
    head = tiny_model("segmenter", head_kwargs={"d_model": 64, "num_heads": 4, "num_layers": 1}).head
    assert head.class_embeddings.shape == (1, 3, 64) and len(head.layers) == 1
    with pytest.raises(ValueError, match="divisible"):
        tiny_model("segmenter", head_kwargs={"d_model": 30, "num_heads": 4})


def test_two_classes_use_a_learned_temperature_and_learn():
    model = tiny_model("segmenter", num_labels=2)
    head = model.head
    assert head.mask_norm is None and head.logit_scale.item() == pytest.approx(2.302585, abs=1e-5)  # log(10)
    captured = {}
    head.class_projection.register_forward_hook(lambda m, i, o: captured.update(classes=o))
    head.patch_projection.register_forward_hook(lambda m, i, o: captured.update(patches=o))
    x, y = batch()
    y = (y > 0).long()  # two classes
    with torch.no_grad():
        logits = model.eval()(x).logits
    cosine = torch.nn.functional.normalize(captured["patches"], dim=-1) @ torch.nn.functional.normalize(
        captured["classes"], dim=-1).transpose(1, 2)
    torch.testing.assert_close(logits, (10 * cosine).transpose(1, 2).reshape(logits.shape), atol=1e-5, rtol=1e-5)

    losses, _ = train_steps(model.train(), x, y, steps=15, lr=3e-3, optimizer_cls=torch.optim.AdamW)
    assert losses[-1] < 0.5 * losses[0], losses
    assert head.logit_scale.grad is not None and head.mask_bias.grad is not None

    # The paper's LayerNorm over the two classes' scores, same data and steps: ±(1, -1) * weight once the two
    # scores differ by more than sqrt(eps), so almost no gradient reaches them and the loss barely moves.
    layernorm = tiny_model("segmenter", num_labels=2, head_kwargs={"mask_norm": True}).train()
    layernorm_losses, _ = train_steps(layernorm, x, y, steps=15, lr=3e-3, optimizer_cls=torch.optim.AdamW)
    assert layernorm_losses[-1] > 2 * losses[-1], (layernorm_losses, losses)
