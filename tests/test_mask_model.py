"""ViTSegForUniversalSegmentation (heads eomt, pmt): shapes on every family that takes queries, deep supervision,
masked attention and its annealing buffer, the frozen-backbone decoder, save / load / remote code, compile, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_backbone_config
from transformers import AutoModelForUniversalSegmentation

import hf_vitseg
from hf_vitseg import (
    ViTSegConfig,
    ViTSegForSemanticSegmentation,
    ViTSegForUniversalSegmentation,
    ViTSegUniversalSegmenterOutput,
)
from hf_vitseg.modeling.mask_transformer import mask_classification_loss

QUERY_FAMILIES = ["vit", "deit", "dinov2", "dinov2_with_registers", "dinov3_vit", "clip", "siglip"]
HEADS = ["eomt", "pmt"]
SMALL = {"num_queries": 5, "num_blocks": 2, "train_num_points": 64}


def mask_model(head="eomt", family="dinov2_with_registers", seed=0, head_kwargs=None, **config_kwargs):
    torch.manual_seed(seed)
    config = ViTSegConfig(backbone_config=tiny_backbone_config(family), head=head, num_labels=3,
                          head_kwargs={**SMALL, **(head_kwargs or {})}, **config_kwargs)
    return ViTSegForUniversalSegmentation(config)


def mask_batch(height=32, width=48, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(2, 3, height, width)
    mask_labels = [torch.randint(0, 2, (2, height, width)).float(), torch.randint(0, 2, (1, height, width)).float()]
    class_labels = [torch.tensor([0, 2]), torch.tensor([1])]
    return x, mask_labels, class_labels


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", QUERY_FAMILIES)
def test_shapes_loss_and_gradients_on_every_family_that_takes_queries(head, family):
    model = mask_model(head, family).train()
    x, mask_labels, class_labels = mask_batch()  # non-square: grid 4 x 6
    out = model(x, mask_labels=mask_labels, class_labels=class_labels)
    assert isinstance(out, ViTSegUniversalSegmenterOutput)
    assert out.class_queries_logits.shape == (2, 5, 4)  # K + 1 ("no object" last)
    assert out.masks_queries_logits.shape == (2, 5, 16, 24)  # patch grid x 2 ** num_upscale_blocks
    assert len(out.auxiliary_logits) == 2  # one prediction before each masked block
    for aux in out.auxiliary_logits:
        assert aux["class_queries_logits"].shape == (2, 5, 4) and aux["masks_queries_logits"].shape == (2, 5, 16, 24)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(sum(out.loss_dict.values()), out.loss)
    out.loss.backward()
    assert model.head.query.weight.grad.abs().sum() > 0
    backbone_grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    if head == "eomt":  # the whole encoder fine-tunes
        assert any(g is not None and g.abs().sum() > 0 for g in backbone_grads)
    else:  # pmt: frozen backbone, trained decoder
        assert not backbone_grads
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.layers.parameters())


@pytest.mark.parametrize("family", ["sam", "swin", "beit"])
@pytest.mark.parametrize("head", HEADS)
def test_backbones_that_cannot_take_queries_are_refused(family, head):
    with pytest.raises(ValueError, match="cannot take them"):
        ViTSegConfig(backbone_config=tiny_backbone_config(family), head=head, head_kwargs=SMALL)


@pytest.mark.parametrize("head", HEADS)
def test_deep_supervision_predictions_and_loss_summed_over_them(head):
    """The loss is transformers' EoMT loss of every prediction (before each masked block and after the last),
    summed: recomputed from the returned predictions with the same point-sampling draws, it is the same."""
    model = mask_model(head).train()
    x, mask_labels, class_labels = mask_batch()
    torch.manual_seed(5)  # the tiny configs have no dropout: the forward draws nothing at probability 1
    out = model(x, mask_labels=mask_labels, class_labels=class_labels)
    predictions = [(a["masks_queries_logits"], a["class_queries_logits"]) for a in out.auxiliary_logits]
    predictions.append((out.masks_queries_logits, out.class_queries_logits))
    assert len(predictions) == 3
    torch.manual_seed(5)
    manual, loss_dict = mask_classification_loss(predictions, mask_labels, class_labels, model.head.settings, 3)
    torch.testing.assert_close(manual, out.loss, rtol=0, atol=0)
    assert set(loss_dict) == {"loss_cross_entropy", "loss_mask", "loss_dice"}
    torch.manual_seed(5)
    last_only, _ = mask_classification_loss(predictions[-1:], mask_labels, class_labels, model.head.settings, 3)
    assert last_only < manual  # the earlier blocks' losses are in the sum


@pytest.mark.parametrize("head", HEADS)
def test_annealing_buffer_zero_in_eval_is_plain_attention_without_masks(head, monkeypatch):
    model = mask_model(head).eval()
    x, _, _ = mask_batch()
    assert model.attn_mask_probs.tolist() == [1.0, 1.0]
    with torch.no_grad():
        masked = model(x)
    assert len(masked.auxiliary_logits) == 2
    calls = {"predict": 0}
    predict = model.head.predict

    def counting_predict(*args, **kwargs):
        calls["predict"] += 1
        return predict(*args, **kwargs)

    monkeypatch.setattr(model.head, "predict", counting_predict)
    model.attn_mask_probs.zero_()

    def no_masks(*args, **kwargs):
        raise AssertionError("a block computed an attention mask with probability 0 in eval")

    monkeypatch.setattr(model.head, "attention_mask", no_masks)
    with torch.no_grad():
        plain = model(x)
    assert calls["predict"] == 1  # only the final prediction
    assert plain.auxiliary_logits is None
    assert (plain.masks_queries_logits - masked.masks_queries_logits).abs().max() > 1e-5  # the masks mattered
    monkeypatch.undo()
    model.attn_mask_probs.copy_(torch.tensor([0.0, 1.0]))  # annealed first block, masked second
    with torch.no_grad():
        half = model(x)
    assert len(half.auxiliary_logits) == 1
    assert not torch.equal(half.masks_queries_logits, plain.masks_queries_logits)


def test_training_always_predicts_at_every_block_even_at_probability_zero():
    model = mask_model("eomt").train()
    model.attn_mask_probs.zero_()
    x, mask_labels, class_labels = mask_batch()
    out = model(x, mask_labels=mask_labels, class_labels=class_labels)
    assert len(out.auxiliary_logits) == 2  # deep supervision keeps every block's prediction
    # probability 0 drops every query's mask: the same as plain attention in eval
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).masks_queries_logits, out.masks_queries_logits.detach(), rtol=0, atol=1e-5)


def test_eomt_hidden_states_before_the_queries_are_the_backbone_s_and_attentions_are_recorded():
    model = mask_model("eomt", "dinov2_with_registers").eval()
    x, _, _ = mask_batch()
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        backbone = model.backbone(x, output_hidden_states=True)
        attentions = model(x, output_attentions=True).attentions  # eager attention for this call
    assert len(out.hidden_states) == 5  # embeddings + 4 layers
    for i in range(3):  # embeddings and the 2 layers before the queries enter (4 layers, 2 blocks)
        torch.testing.assert_close(out.hidden_states[i], backbone.hidden_states[i], rtol=0, atol=0)
    assert out.hidden_states[3].shape[1] == backbone.hidden_states[3].shape[1] + 5  # queries in front
    assert len(attentions) == 4 and attentions[-1].shape[-1] == 5 + 3 + 24  # queries, CLS + 2 registers, 4 x 6


def test_eomt_on_a_truncated_backbone_and_tuple_outputs():
    """backbone_out_indices=[3] of 4 layers: eomt runs 3 layers (the queries before the last 2 of them); the 4th
    layer gets no gradient (marked unused, as for pixel heads). return_dict=False gives the output's tuple."""
    model = mask_model("eomt", "dinov2", backbone_out_indices=[3]).eval()
    x, _, _ = mask_batch()
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        as_tuple = model(x, return_dict=False)
    assert len(out.hidden_states) == 4  # embeddings + 3 layers
    assert all(not p.requires_grad for p in model.backbone.layers[3].parameters())
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.class_queries_logits, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[1], out.masks_queries_logits, rtol=0, atol=0)


def test_pmt_backbone_frozen_decoder_copied_and_decode_from_features_equals_forward():
    model = mask_model("pmt", "dinov3_vit")
    assert model.config.freeze_backbone  # pmt's default
    assert all(not p.requires_grad for p in model.backbone.parameters())
    model.train()
    assert not model.backbone.training and model.head.training
    for copy, layer in zip(model.head.layers, model.backbone.layers[2:4]):  # the backbone's last 2 blocks
        for (name, a), (_, b) in zip(copy.state_dict().items(), layer.state_dict().items()):
            assert torch.equal(a, b), name
        assert copy is not layer
    x, mask_labels, class_labels = mask_batch()
    model.eval()
    with torch.no_grad():
        forward = model(x)
        features = model.backbone(x)  # what the frozen-backbone feature cache keeps
        decoded = model.decode(features)
    torch.testing.assert_close(decoded.masks_queries_logits, forward.masks_queries_logits, rtol=0, atol=0)
    torch.testing.assert_close(decoded.class_queries_logits, forward.class_queries_logits, rtol=0, atol=0)
    # one training step moves the decoder, not the backbone
    model.train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    layer_before = model.head.layers[0].state_dict()["mlp.up_proj.weight"].clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.decode(model.backbone(x), mask_labels=mask_labels, class_labels=class_labels).loss.backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert not torch.equal(model.head.layers[0].state_dict()["mlp.up_proj.weight"], layer_before)


def test_eomt_decode_is_refused():
    model = mask_model("eomt")
    features = model.backbone(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="decode\\(features\\) is for head 'pmt'"):
        model.decode(features)


@pytest.mark.parametrize("head", HEADS)
def test_from_pretrained_backbone_loads_the_backbone_and_pmt_copies_its_blocks(head, tiny_backbone_dir):
    from transformers import AutoModel

    model = ViTSegForUniversalSegmentation.from_pretrained_backbone(
        tiny_backbone_dir, head=head, num_labels=2, head_kwargs=SMALL
    )
    source = AutoModel.from_pretrained(tiny_backbone_dir).state_dict()
    for key, value in model.backbone.model.state_dict().items():
        assert torch.equal(value, source[key]), key
    if head == "pmt":
        assert model.config.freeze_backbone
        for i, copy in enumerate(model.head.layers):
            for key, value in copy.state_dict().items():
                assert torch.equal(value, source[f"encoder.layer.{2 + i}.{key}"]), key


@pytest.mark.parametrize("head", HEADS)
def test_save_and_load_round_trip_is_bit_exact(head, tmp_path):
    model = mask_model(head).eval()
    model.attn_mask_probs.fill_(0.25)  # annealing state travels with the weights
    with torch.no_grad():  # trained weights everywhere (pmt's decoder no longer equal to the backbone's blocks)
        for parameter in model.head.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    x, _, _ = mask_batch()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForUniversalSegmentation"] == (
        "modeling_vitseg.ViTSegForUniversalSegmentation"
    )
    assert (tmp_path / "mask_transformer.py").exists()
    assert not list(tmp_path.glob("*.bin"))
    reloaded = AutoModelForUniversalSegmentation.from_pretrained(tmp_path).eval()
    assert type(reloaded) is ViTSegForUniversalSegmentation
    assert reloaded.attn_mask_probs.tolist() == [0.25, 0.25]
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    with torch.no_grad():
        torch.manual_seed(0)
        expected = model(x)
        torch.manual_seed(0)
        actual = reloaded(x)
    torch.testing.assert_close(actual.masks_queries_logits, expected.masks_queries_logits, rtol=0, atol=0)


REMOTE_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_vitseg"] = None  # importing hf_vitseg must fail here
    import torch
    torch.set_num_threads(1)
    from transformers import AutoModelForUniversalSegmentation
    results = {}
    for folder in json.loads(sys.argv[1]):
        model = AutoModelForUniversalSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        x = torch.load(folder + "/x.pt")
        with torch.no_grad():
            out = model(x)
        results[folder] = (out.masks_queries_logits - torch.load(folder + "/masks.pt")).abs().max().item()
    print(json.dumps(results))
    """
)


def test_remote_code_round_trip_in_a_process_without_hf_vitseg(tmp_path):
    folders = []
    for head, family in (("eomt", "dinov3_vit"), ("pmt", "dinov2_with_registers")):
        model = mask_model(head, family).eval()
        folder = tmp_path / head
        model.save_pretrained(folder)
        x, _, _ = mask_batch()
        with torch.no_grad():
            torch.save(model(x).masks_queries_logits, folder / "masks.pt")
        torch.save(x, folder / "x.pt")
        folders.append(str(folder))
    script = tmp_path / "remote_loader.py"
    script.write_text(REMOTE_LOADER)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(script), json.dumps(folders)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(diffs) == 2 and max(diffs.values()) <= 1e-6, diffs


def test_push_dry_run_uploads_the_mask_module_with_the_model(tmp_path):
    from hf_vitseg.hub.push import push_to_hub, upload_plan

    model = mask_model("pmt")
    model.save_pretrained(tmp_path / "model")
    files, _ = upload_plan(tmp_path / "model")
    assert {"mask_transformer.py", "modeling_vitseg.py", "model.safetensors", "config.json"} <= set(files)
    with pytest.warns(UserWarning, match="preprocessor_config.json"):
        result = push_to_hub(tmp_path / "model", "user/pmt", dry_run=True)
    assert result.dry_run and result.uploaded == [] and "mask_transformer.py" in result.files


def test_torch_compile_equals_eager_for_both_heads():
    """torch.compile traces both heads (dynamo + AOT autograd; `aot_eager` keeps the test fast on CPU, inductor is
    checked by hand, see docs/mask_transformers.md), with masks on and off (a recompile on the buffer's values)."""
    torch._dynamo.reset()
    for head in HEADS:
        model = mask_model(head, "dinov3_vit").eval()
        compiled = torch.compile(model, backend="aot_eager")
        x = torch.randn(1, 3, 32, 32)
        for prob in (1.0, 0.0) if head == "eomt" else (1.0,):
            model.attn_mask_probs.fill_(prob)
            with torch.no_grad():
                eager, traced = model(x), compiled(x)
            torch.testing.assert_close(traced.masks_queries_logits, eager.masks_queries_logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(traced.class_queries_logits, eager.class_queries_logits, rtol=1e-5, atol=1e-5)
            assert (traced.auxiliary_logits is None) == (prob == 0.0)


def test_class_labels_of_any_integer_dtype_give_the_same_loss():
    """int32 / uint8 class ids (numpy's default int on some platforms, a user's own collator) are class ids like int64
    ones (transformers' EoMT loss indexes with them and needs int64)."""
    model = mask_model("eomt").train()
    x, mask_labels, class_labels = mask_batch()
    losses = []
    for dtype in (torch.long, torch.int32, torch.uint8):
        torch.manual_seed(2)
        losses.append(model(x, mask_labels=mask_labels, class_labels=[c.to(dtype) for c in class_labels]).loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    torch.testing.assert_close(losses[2], losses[0], rtol=0, atol=0)


def test_empty_targets_give_a_finite_loss():
    model = mask_model("eomt").train()
    x, mask_labels, class_labels = mask_batch()
    mask_labels[1] = torch.zeros(0, 32, 48)
    class_labels[1] = torch.zeros(0, dtype=torch.long)
    out = model(x, mask_labels=mask_labels, class_labels=class_labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()


# -- errors -----------------------------------------------------------------------------------------------------
def test_heads_by_name_and_model_class_errors():
    assert "eomt" not in hf_vitseg.list_heads() and "linear" in hf_vitseg.list_heads()
    assert hf_vitseg.list_heads("mask") == ["eomt", "pmt"]
    assert {"eomt", "pmt", "linear"} <= set(hf_vitseg.list_heads("all"))
    with pytest.raises(ValueError, match="kind"):
        hf_vitseg.list_heads("pixel")
    config = ViTSegConfig(backbone_config=tiny_backbone_config("dinov2"), head="eomt", head_kwargs=SMALL)
    assert config.is_mask_transformer
    assert not ViTSegConfig(backbone_config=tiny_backbone_config("dinov2")).is_mask_transformer
    with pytest.raises(ValueError, match="build ViTSegForUniversalSegmentation"):
        ViTSegForSemanticSegmentation(config)
    with pytest.raises(ValueError, match="pixel heads build ViTSegForSemanticSegmentation"):
        ViTSegForUniversalSegmentation(ViTSegConfig(backbone_config=tiny_backbone_config("dinov2")))
    with pytest.raises(ValueError, match="ViTSegForUniversalSegmentation"):
        hf_vitseg.get_head_class("pmt")
    with pytest.raises(ValueError, match="built-in mask-transformer head"):
        hf_vitseg.register_head("eomt")


@pytest.mark.parametrize(
    "head_kwargs, config_kwargs, message",
    [
        ({"num_quries": 5}, {}, r"\['num_quries'\] are not settings of head 'eomt'"),
        ({"num_blocks": 5}, {}, "num_blocks=5 .* exceeds the 4 backbone layers"),
        ({"num_queries": 0}, {}, "num_queries=0 must be an int >= 1"),
        ({"no_object_weight": float("nan")}, {}, "no_object_weight=nan must be a finite number"),
        ({"importance_sample_ratio": 1.5}, {}, "importance_sample_ratio=1.5 must lie in"),
        ({"oversample_ratio": 0.5}, {}, "oversample_ratio=0.5 must be >= 1"),
        ({"class_weight": 0, "mask_weight": 0, "dice_weight": 0}, {}, "all 0"),
        ({"hidden_act": "swishy"}, {}, "hidden_act='swishy'"),
        ({}, {"backbone_out_indices": [2, 4]}, "reads one backbone layer"),
        ({}, {"auxiliary_loss_weight": 0.4}, "auxiliary_loss_weight belong to the pixel loss"),
        ({}, {"backbone_apply_layernorm": False}, "backbone_apply_layernorm must be True"),
        ({}, {"neck": "pyramid"}, "takes no neck"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_error(head_kwargs, config_kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViTSegConfig(backbone_config=tiny_backbone_config("dinov2"), head="eomt", head_kwargs=head_kwargs,
                     **config_kwargs)


def test_bad_targets_are_refused():
    model = mask_model("eomt")
    x, mask_labels, class_labels = mask_batch()
    with pytest.raises(ValueError, match="together"):
        model(x, mask_labels=mask_labels)
    with pytest.raises(TypeError, match="lists"):
        model(x, mask_labels=torch.stack([mask_labels[0], mask_labels[0]]), class_labels=class_labels)
    with pytest.raises(ValueError, match="one entry per image"):
        model(x, mask_labels=mask_labels[:1], class_labels=class_labels[:1])
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        model(x, mask_labels=mask_labels, class_labels=[torch.tensor([0, 3]), torch.tensor([1])])
    with pytest.raises(ValueError, match="same N"):
        model(x, mask_labels=mask_labels, class_labels=[torch.tensor([0]), torch.tensor([1])])
    bad = [mask_labels[0].clone(), mask_labels[1]]
    bad[0][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"mask_labels must hold values in \[0, 1\]"):
        model(x, mask_labels=bad, class_labels=class_labels)
    with pytest.raises(ValueError, match="not on a labels map"):
        model(x, labels=torch.zeros(2, 32, 48, dtype=torch.long))
    # masks of another size than the (padded) input would be sampled at shifted, stretched positions
    small = [masks[:, :16, :24] for masks in mask_labels]
    with pytest.raises(ValueError, match="mask_labels are 16x24 but the input is 32x48"):
        model(x, mask_labels=small, class_labels=class_labels)
    pmt = mask_model("pmt")
    with pytest.raises(ValueError, match="mask_labels are 16x24 but the input is 32x48"):
        pmt.decode(pmt.backbone(x), mask_labels=small, class_labels=class_labels)


@pytest.mark.parametrize("head", [*HEADS, "linear"])
def test_non_finite_pixel_values_are_refused_in_one_line(head):
    """NaN / inf pixels would make every output (and the loss) NaN: the backbone check refuses them, for both mask
    heads and the semantic model alike; a size off the patch grid is refused as well."""
    if head == "linear":
        torch.manual_seed(0)
        config = ViTSegConfig(backbone_config=tiny_backbone_config("dinov2"), num_labels=3)
        model = ViTSegForSemanticSegmentation(config)
    else:
        model = mask_model(head)
    x, _, _ = mask_batch()
    for value in (float("nan"), float("inf")):
        bad = x.clone()
        bad[1, 0, 3, 4] = value
        with pytest.raises(ValueError, match=r"pixel_values hold 1 non-finite value\(s\)") as error:
            model(bad)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="must be multiples of 8"):
        model(torch.randn(1, 3, 30, 48))


def test_loss_without_scipy_says_what_to_install(monkeypatch):
    model = mask_model("eomt")
    x, mask_labels, class_labels = mask_batch()
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ImportError, match="needs scipy: pip install scipy"):
        model(x, mask_labels=mask_labels, class_labels=class_labels)
    with torch.no_grad():
        assert model(x).class_queries_logits.shape == (2, 5, 4)  # inference needs no scipy
