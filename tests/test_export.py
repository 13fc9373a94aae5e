"""ONNX export with dynamic height and width (checked with onnxruntime) and torch.compile, for every head."""

from __future__ import annotations

import pytest
import torch
from conftest import builtin_heads, tiny_model
from torch import nn

from hf_vitseg import ViTSegForSemanticSegmentation
from hf_vitseg.export import OnnxExportError, check_exportable, export_onnx

onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX tests need the onnx extra: pip install hf-vitseg[onnx]")

HEADS = builtin_heads()
EXAMPLE = (32, 48)  # 4 x 6 patches of 8 pixels
OTHER = (56, 40)  # 7 x 5 patches: taller and narrower, odd grid


def with_batchnorm_statistics(model: ViTSegForSemanticSegmentation) -> ViTSegForSemanticSegmentation:
    """`model` in eval mode with non-trivial BatchNorm statistics, so eval-mode normalisation is exercised."""
    model.eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def onnx_max_error(model, path, size, batch_size):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixel_values = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
    (actual,) = session.run(None, {"pixel_values": pixel_values.numpy()})
    assert tuple(actual.shape) == tuple(expected.shape)
    return (torch.from_numpy(actual) - expected).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
def test_onnx_export_with_dynamic_size_matches_pytorch(head, tmp_path):
    model = with_batchnorm_statistics(tiny_model(head))
    path = tmp_path / f"{head}.onnx"
    # Every shipped head exports with dynamic height and width (upernet's pyramid pooling is matmul-based for it).
    export_onnx(model, path, example_size=EXAMPLE)  # checks with onnxruntime itself; here, independently:
    assert onnx_max_error(model, path, EXAMPLE, batch_size=2) <= 1e-4
    assert onnx_max_error(model, path, OTHER, batch_size=3) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
def test_torch_compile_matches_eager(head):
    # backend="aot_eager": Dynamo's graph capture and AOTAutograd (functionalisation, decompositions), where model
    # code breaks, without Inductor's C++ code generation, which took 130 s for the linear head alone on the
    # shared 2-core CI machine (aot_eager: 7 s).
    model = with_batchnorm_statistics(tiny_model(head))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    pixel_values = torch.randn(2, 3, *EXAMPLE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values=pixel_values).logits, model(pixel_values=pixel_values).logits,
                                   rtol=1e-5, atol=1e-5)


def test_a_head_that_declares_itself_not_exportable(tmp_path):
    model = with_batchnorm_statistics(tiny_model("linear"))

    class NotExportable(type(model.head)):
        onnx_exportable = False
        onnx_export_reason = "it calls a Python callback per pixel."

    model.head.__class__ = NotExportable
    with pytest.raises(OnnxExportError, match="cannot be exported to ONNX: it calls a Python callback per pixel"):
        export_onnx(model, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()

    NotExportable.onnx_exportable = True
    NotExportable.onnx_dynamic_size = False
    NotExportable.onnx_export_reason = "its pooling grid is fixed."
    with pytest.raises(OnnxExportError, match="dynamic height and width: its pooling grid is fixed"):
        check_exportable(model, dynamic=True)
    check_exportable(model, dynamic=False)


def test_adaptive_pooling_blocks_a_dynamic_export_only():
    model = with_batchnorm_statistics(tiny_model("linear"))
    model.head.global_pool = nn.AdaptiveAvgPool2d(1)  # global pooling exports fine at any size
    check_exportable(model, dynamic=True)
    model.head.grid_pool = nn.AdaptiveAvgPool2d((2, 3))
    with pytest.raises(OnnxExportError, match=r"head.grid_pool \(AdaptiveAvgPool2d\(\(2, 3\)\)\)"):
        check_exportable(model, dynamic=True)
    check_exportable(model, dynamic=False)


def test_example_size_must_be_a_patch_multiple(tmp_path):
    with pytest.raises(ValueError, match=r"multiples of model.size_divisor \(8\)"):
        export_onnx(with_batchnorm_statistics(tiny_model("linear")), tmp_path / "x.onnx", example_size=(30, 48))


@pytest.mark.slow
def test_dinov2_with_registers_exports_with_a_dynamic_size(tmp_path):
    """transformers' registers embeddings turn the grid into Python ints (`torch_int`), which fixed the exported
    graph to the example's size; `backbones.embed_registers` keeps it symbolic under torch.export."""
    model = tiny_model("linear", "dinov2_with_registers").eval()
    divisor = model.size_divisor
    path = tmp_path / "registers.onnx"
    export_onnx(model, path, example_size=(3 * divisor, 5 * divisor))
    assert onnx_max_error(model, path, (3 * divisor, 5 * divisor), batch_size=2) <= 1e-4
    assert onnx_max_error(model, path, (6 * divisor, 4 * divisor), batch_size=1) <= 1e-4
