"""`hf_vitseg.convert.convert_eomt`: transformers' EoMT (and EoMT-DINOv3) -> ViTSegForUniversalSegmentation, equal
outputs and loss on tiny random checkpoints saved to local folders."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    EomtConfig,
    EomtDinov3Config,
    EomtDinov3ForUniversalSegmentation,
    EomtForUniversalSegmentation,
)

from hf_vitseg import ViTSegForUniversalSegmentation
from hf_vitseg.convert import convert_eomt

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=8, num_queries=6,
            num_blocks=2, num_labels=3, num_register_tokens=2, train_num_points=256)


def save_tiny_eomt(folder, kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "eomt":
        model = EomtForUniversalSegmentation(EomtConfig(**TINY))
    else:
        model = EomtDinov3ForUniversalSegmentation(EomtDinov3Config(intermediate_size=64, **TINY))
    model.save_pretrained(folder)
    return type(model).from_pretrained(folder).eval()


def targets():
    torch.manual_seed(7)
    x = torch.randn(2, 3, 32, 32)
    mask_labels = [torch.randint(0, 2, (2, 32, 32)).float(), torch.randint(0, 2, (3, 32, 32)).float()]
    class_labels = [torch.tensor([0, 2]), torch.tensor([1, 1, 0])]
    return x, mask_labels, class_labels


def run_both(reference, ours, x, mask_labels, class_labels, seed=1):
    torch.manual_seed(seed)
    expected = reference(x, mask_labels=mask_labels, class_labels=class_labels)
    torch.manual_seed(seed)  # the same point sampling (and mask dropping) in both losses
    actual = ours(x, mask_labels=mask_labels, class_labels=class_labels)
    return expected, actual


@pytest.mark.parametrize("kind", ["eomt", "eomt_dinov3"])
def test_converted_eomt_equals_transformers_eval_masked_and_plain(kind, tmp_path):
    reference = save_tiny_eomt(tmp_path / kind, kind)
    ours = convert_eomt(tmp_path / kind)
    assert isinstance(ours, ViTSegForUniversalSegmentation) and not ours.training
    expected_family = "dinov2_with_registers" if kind == "eomt" else "dinov3_vit"
    assert ours.config.backbone_config.model_type == expected_family and ours.config.head == "eomt"
    x, mask_labels, class_labels = targets()
    outputs = {}
    for prob in (1.0, 0.0):  # masked attention in every block / plain attention
        reference.attn_mask_probs.fill_(prob)
        ours.attn_mask_probs.fill_(prob)
        with torch.no_grad():
            expected, actual = run_both(reference, ours, x, mask_labels, class_labels)
        torch.testing.assert_close(actual.class_queries_logits, expected.class_queries_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(actual.masks_queries_logits, expected.masks_queries_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(actual.loss, expected.loss, rtol=0, atol=1e-5)
        outputs[prob] = actual.masks_queries_logits
    # the masks change the outputs: the masked comparison is not the plain one twice
    assert (outputs[1.0] - outputs[0.0]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["eomt", "eomt_dinov3"])
def test_converted_eomt_equals_transformers_in_training_with_partial_masks(kind, tmp_path):
    """Training mode with attn_mask_probs 0.5: the same queries' masks are dropped (same random draws), the same
    RoPE augmentation (DINOv3), the same loss and the same gradients."""
    reference = save_tiny_eomt(tmp_path / kind, kind).train()
    ours = convert_eomt(reference)
    assert ours.training
    reference.attn_mask_probs.fill_(0.5)
    ours.attn_mask_probs.fill_(0.5)
    x, mask_labels, class_labels = targets()
    expected, actual = run_both(reference, ours, x, mask_labels, class_labels, seed=3)
    torch.testing.assert_close(actual.masks_queries_logits, expected.masks_queries_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=0, atol=1e-5)
    expected.loss.backward()
    actual.loss.backward()
    torch.testing.assert_close(ours.head.query.weight.grad, reference.query.weight.grad, rtol=1e-4, atol=1e-6)


def test_converted_eomt_runs_at_other_sizes_and_saves(tmp_path):
    """transformers' EoMT fixes its grid from config.image_size; the converted model takes any multiple of the patch
    size (interpolated position embeddings), and saves and reloads bit-exact."""
    ours = convert_eomt(save_tiny_eomt(tmp_path / "eomt", "eomt"))
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        out = ours(x)
    assert out.masks_queries_logits.shape == (1, 6, 24, 32)
    ours.save_pretrained(tmp_path / "converted")
    reloaded = ViTSegForUniversalSegmentation.from_pretrained(tmp_path / "converted").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).masks_queries_logits, out.masks_queries_logits, rtol=0, atol=0)


def test_convert_eomt_refuses_other_models(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="convert_eomt converts EoMT checkpoints"):
        convert_eomt(tmp_path)
    with pytest.raises(ValueError, match="EomtForUniversalSegmentation"):
        convert_eomt(torch.nn.Linear(2, 2))
