"""ONNX export (dynamic height and width, masked attention off) of the mask transformers `eomt` and `pmt` (issue 11
item 7): onnxruntime within 1e-4 of PyTorch at two sizes, post-processing of its outputs. (torch.compile of both heads:
tests/test_mask_model.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_backbone_config

from hf_vitseg import ViTSegConfig, ViTSegImageProcessor
from hf_vitseg.export import export_onnx, output_names, plain_attention
from hf_vitseg.modeling import ViTSegForUniversalSegmentation

onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX tests need the onnx extra: pip install hf-vitseg[onnx]")

EXAMPLE = (32, 48)  # 4 x 6 patches of 8 pixels
OTHER = (56, 40)  # 7 x 5 patches: taller and narrower, odd grid
# dinov2_with_registers: the family convert_eomt produces (its embeddings need backbones.embed_registers to export
# with a dynamic size)
CASES = [("eomt", "dinov2_with_registers"), ("eomt", "dinov3_vit"), ("pmt", "dinov2")]


def tiny_mask_model(head: str, family: str, seed: int = 0) -> ViTSegForUniversalSegmentation:
    torch.manual_seed(seed)
    config = ViTSegConfig(backbone_config=tiny_backbone_config(family), head=head, num_labels=3,
                          head_kwargs={"num_queries": 5, "num_blocks": 2})
    model = ViTSegForUniversalSegmentation(config).eval()
    with torch.no_grad():  # a trained-looking model: annealing not finished, so export must switch the masks off
        model.attn_mask_probs.fill_(0.7)
    return model


def run_onnx(path, pixel_values):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["class_queries_logits", "masks_queries_logits"]
    return [torch.from_numpy(a) for a in session.run(None, {"pixel_values": pixel_values.numpy()})]


@pytest.mark.slow
@pytest.mark.parametrize("head,family", CASES)
def test_mask_model_onnx_export_matches_pytorch_at_two_sizes(head, family, tmp_path):
    model = tiny_mask_model(head, family)
    path = export_onnx(model, tmp_path / f"{head}.onnx", example_size=EXAMPLE)  # checks both sizes itself, too
    assert model.attn_mask_probs.tolist() == pytest.approx([0.7, 0.7])  # restored after the export
    generator = torch.Generator().manual_seed(1)
    for batch, size in ((2, EXAMPLE), (3, OTHER)):
        pixel_values = torch.randn(batch, 3, *size, generator=generator)
        class_logits, mask_logits = run_onnx(path, pixel_values)
        with torch.no_grad(), plain_attention(model):
            expected = model(pixel_values=pixel_values)
        assert class_logits.shape == (batch, 5, 4)
        assert mask_logits.shape == expected.masks_queries_logits.shape == (batch, 5, size[0] // 2, size[1] // 2)
        torch.testing.assert_close(class_logits, expected.class_queries_logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(mask_logits, expected.masks_queries_logits, atol=1e-4, rtol=0)

    if head == "eomt":  # the file is the plain-attention model, not the masked one the buffer still asks for
        with torch.no_grad():
            masked = model(pixel_values=pixel_values)
        assert (masked.masks_queries_logits - mask_logits).abs().max() > 1e-3

    # the onnxruntime outputs post-process like the model's own
    from hf_vitseg.modeling.mask_transformer import ViTSegUniversalSegmenterOutput

    processor = ViTSegImageProcessor(patch_size=8)
    onnx_outputs = ViTSegUniversalSegmenterOutput(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
    ours = processor.post_process_panoptic_segmentation(onnx_outputs, threshold=0.0, target_sizes=[OTHER] * 3)
    reference = processor.post_process_panoptic_segmentation(expected, threshold=0.0, target_sizes=[OTHER] * 3)
    for got, want in zip(ours, reference):
        assert torch.equal(got["segmentation"], want["segmentation"])


def test_output_names_and_plain_attention_leave_semantic_models_alone():
    from conftest import tiny_model

    semantic = tiny_model("linear")
    assert output_names(semantic) == ["logits"]
    with plain_attention(semantic) as same:
        assert same is semantic
    model = tiny_mask_model("eomt", "dinov2")
    assert output_names(model) == ["class_queries_logits", "masks_queries_logits"]
    with plain_attention(model):
        assert model.attn_mask_probs.tolist() == [0.0, 0.0]
    assert model.attn_mask_probs.tolist() == pytest.approx([0.7, 0.7])
