"""`atm` (SegViT's attention-to-mask decoder): its per-pixel combination, taps and widths. Shapes, training and
save/load on every backbone family: the common suite in test_modeling.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from test_head_setr_mla import batch

import hf_vitseg.modeling.head_atm  # noqa: F401  registers atm
from hf_vitseg.modeling.head_atm import ATMHead


def test_logits_are_the_log_of_the_papers_combination_of_the_last_layer():
    model = tiny_model("atm").eval()
    x = batch()[0]
    with torch.no_grad():
        logits = model(x).logits
        layers = model.head.forward_layers(model.backbone(x))
    assert len(layers) == 3
    for class_logits, mask_logits in layers:
        assert class_logits.shape == (2, 3, 4) and mask_logits.shape == (2, 3, 8, 12)
    class_logits, mask_logits = layers[-1]
    seg = torch.einsum("bqk,bqhw->bkhw", class_logits.softmax(-1)[..., :-1], mask_logits.sigmoid())
    torch.testing.assert_close(logits, seg.log())
    # the class prior starts each query on its own class
    prior = model.head.class_prior.softmax(-1)
    torch.testing.assert_close(prior.diagonal(), torch.full((3,), math.e**2 / (math.e**2 + 1)))


def test_combination_keeps_its_gradient_where_every_mask_is_tiny():
    class_logits = torch.randn(2, 3, 4, requires_grad=True)
    mask_logits = (torch.randn(2, 3, 5, 6) - 120).requires_grad_()  # sigmoid underflows to ~1e-52 in float32
    logits = ATMHead.segmentation_logits(class_logits, mask_logits)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 3, (2, 5, 6))).backward()
    assert torch.isfinite(mask_logits.grad).all() and mask_logits.grad.abs().sum() > 0
    assert torch.isfinite(class_logits.grad).all() and class_logits.grad.abs().sum() > 0


def test_taps_and_widths():
    model = tiny_model("atm", head_kwargs={"d_model": 32, "num_heads": 4})
    assert model.config.backbone_out_indices == [1, 3, 4]
    assert model.head.class_queries.shape == (1, 3, 32) and len(model.head.layers) == 3
    assert len(tiny_model("atm", head_kwargs={"in_index": [-1]}).head.layers) == 1
    with pytest.raises(ValueError, match="divisible"):
        tiny_model("atm", head_kwargs={"d_model": 30, "num_heads": 4})
