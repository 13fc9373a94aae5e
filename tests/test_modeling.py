"""Every head x every backbone family: shapes, training, freezing, save/load, remote code, pretrained backbones."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import (
    FAMILIES,
    NON_SQUARE,
    builtin_heads,
    save_tiny_backbone,
    save_tiny_backbone_to_hf_cache,
    tiny_backbone_config,
    tiny_model,
)
from transformers import AutoModel, AutoModelForSemanticSegmentation

import hf_vitseg
from hf_vitseg import ViTSegConfig, ViTSegForSemanticSegmentation
from hf_vitseg.modeling.backbones import family_for
from hf_vitseg.modeling.losses import segmentation_loss

HEADS = builtin_heads()
PAIRS = [(h, f) for h in HEADS for f in FAMILIES]


def batch(size=NON_SQUARE, num_labels=3, b=2, seed=0):
    """Random images with blocky labels (32-pixel blocks): learnable at any head's output stride."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, *size, generator=g)
    blocks = torch.randint(0, num_labels, (b, 1, size[0] // 32, size[1] // 32), generator=g)
    y = torch.nn.functional.interpolate(blocks.float(), size=size, mode="nearest")[:, 0].long()
    return x, y


@pytest.mark.parametrize("head,family", PAIRS)
def test_logits_have_exactly_the_size_the_heads_output_stride_says(head, family):
    """Every head at its defaults: logits `(H / s, W / s)` with `s = head.output_stride(strides it receives)`,
    square and non-square (h and w swapped would break this)."""
    model = tiny_model(head, family).eval()
    in_strides = model.neck.out_strides if model.neck is not None else model.backbone.out_strides
    stride = model.head.output_stride(in_strides)
    for size in [(64, 64), NON_SQUARE, (96, 64)]:
        x, _ = batch(size)
        with torch.no_grad():
            logits = model(x).logits
        expected = (size[0] / stride, size[1] / stride)
        assert all(e == int(e) for e in expected), (stride, size)
        assert logits.shape == (2, 3, int(expected[0]), int(expected[1])), (stride, size)


# The stride every head's logits have on the tiny patch-8 ViTs and SAM (neck levels at 2, 4, 8, 16) and on
# Swin (stages at 4, 8, 16, 32), with default arguments: what each module docstring promises.
NATURAL_STRIDES = {
    "linear": (8, 32), "mlp": (8, 32), "conv": (4, 16), "setr_pup": (0.5, 2), "setr_mla": (2, 8),
    "unet": (2, 2), "segformer": (2, 4), "dpt": (1, 2), "upernet": (2, 4), "segmenter": (8, 32), "atm": (8, 32),
}


@pytest.mark.parametrize("head", HEADS)
def test_output_stride_is_what_the_docstrings_promise(head):
    for family, expected in zip(["dinov2", "swin"], NATURAL_STRIDES[head]):
        model = tiny_model(head, family)
        in_strides = model.neck.out_strides if model.neck is not None else model.backbone.out_strides
        assert model.head.output_stride(in_strides) == expected, family


def test_forward_is_the_backbone_then_decode_with_the_auxiliary_loss():
    model = tiny_model("conv", "dinov2", backbone_out_indices=[2, 4], auxiliary_loss_weight=0.4,
                       auxiliary_channels=8, slim=True).eval()
    x, y = batch()
    with torch.no_grad():
        out = model(x, labels=y)
        features = model.backbone(x)
        decoded = model.decode(features, labels=y)
        head_loss = segmentation_loss(decoded.logits, y, model.config)
        as_tuple = model.decode(features, labels=y, return_dict=False)
    assert torch.equal(out.logits, decoded.logits) and torch.equal(out.loss, decoded.loss)
    assert decoded.loss > head_loss  # the auxiliary head's loss is in it
    assert torch.equal(as_tuple[0], decoded.loss) and torch.equal(as_tuple[1], decoded.logits)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", ["dinov2", "swin"])
def test_heads_read_the_image_and_prefix_tokens_only_as_declared(head, family):
    """`uses_pixel_values` / `uses_prefix_tokens` false: the logits do not change without them (the feature
    cache drops the image on that word); `uses_pixel_values` true: the image matters and its absence is an error."""
    model = tiny_model(head, family, slim=True).eval()
    x, _ = batch()
    with torch.no_grad():
        features = model.backbone(x)
        logits = model.decode(features).logits
        if model.head.uses_pixel_values:
            with pytest.raises(ValueError, match="reads the image"):
                model.decode(dataclasses.replace(features, pixel_values=None))
            assert not torch.equal(model.decode(dataclasses.replace(features, pixel_values=-x)).logits, logits)
        else:
            assert torch.equal(model.decode(dataclasses.replace(features, pixel_values=None)).logits, logits)
        if not model.head.uses_prefix_tokens:
            assert torch.equal(model.decode(dataclasses.replace(features, prefix_tokens=None)).logits, logits)
    assert model.head.uses_pixel_values == (head == "unet")


@pytest.mark.parametrize("head", HEADS)
def test_every_head_documents_and_types_its_constructor(head):
    cls = hf_vitseg.get_head_class(head)
    doc = inspect.getdoc(cls)
    assert doc and "Args:" in doc, f"{cls.__name__} has no Args docstring"
    for name, parameter in list(inspect.signature(cls.__init__).parameters.items())[1:]:
        assert parameter.annotation is not inspect.Parameter.empty, f"{cls.__name__}({name}) is untyped"
        assert re.search(rf"\b{name}\b", doc), f"{cls.__name__}'s docstring does not describe {name}"
    # benchmark figures live in benchmarks/README.md and README.md, not in head docstrings
    module_doc = sys.modules[cls.__module__].__doc__ or ""
    assert not re.search(r"\d\.\d+x\b", module_doc + doc), f"{cls.__module__} quotes a measured ratio"


@pytest.mark.parametrize("head,kwargs", [("linear", {}), ("mlp", {"channels": 8}), ("conv", {"channels": 8}),
                                         ("setr_pup", {"stage_channels": [8, 8]})])
def test_heads_reading_one_map_take_several_taps_of_different_sizes_as_resize_concat(head, kwargs):
    # one home (BaseHead.select_single_map): before it, mlp / conv / setr_pup concatenated unequal maps and failed
    cls = hf_vitseg.get_head_class(head)
    maps = [torch.randn(1, 8, 8, 12), torch.randn(1, 4, 4, 6)]
    features = hf_vitseg.BackboneFeatures(feature_maps=maps, strides=[4, 8])
    torch.manual_seed(0)
    several = cls([8, 4], [4, 8], num_labels=2, in_index=[0, 1], input_transform="multiple_select", **kwargs).eval()
    concat = cls([8, 4], [4, 8], num_labels=2, in_index=[0, 1], input_transform="resize_concat", **kwargs).eval()
    concat.load_state_dict(several.state_dict())
    assert several.selected_width == 12
    with torch.no_grad():
        torch.testing.assert_close(several(features), concat(features))


def test_heads_with_one_input_transform_do_not_accept_the_argument():
    fixed = {"setr_mla", "unet", "segformer", "dpt", "upernet", "atm"}
    for head in HEADS:
        assert ("input_transform" in hf_vitseg.get_head_class(head).init_kwargs()) == (head not in fixed), head
    with pytest.raises(ValueError, match=r"head_kwargs \['input_transform'\] are not arguments of head 'upernet'"):
        ViTSegConfig(backbone_config=tiny_backbone_config("swin"), head="upernet",
                     head_kwargs={"input_transform": "resize_concat"})


def test_presets_are_named_the_same_way_in_every_head():
    with_presets = [h for h in HEADS if "preset" in hf_vitseg.get_head_class(h).init_kwargs()]
    assert sorted(with_presets) == ["dpt", "setr_mla", "setr_pup", "upernet"]
    for head in with_presets:
        cls = hf_vitseg.get_head_class(head)
        assert inspect.signature(cls.__init__).parameters["preset"].default == "default"
        paper = cls([32] * 4, [4, 8, 16, 32], num_labels=2, num_prefix_tokens=0, preset="paper")
        assert sum(p.numel() for p in paper.parameters()) > 0
        with pytest.raises(ValueError, match=rf"^{head}: unknown preset 'huge'; choose from \[.*'default'.*'paper'"):
            cls([32] * 4, [4, 8, 16, 32], num_labels=2, preset="huge")


@pytest.mark.parametrize("head,family", PAIRS)
def test_backward_and_a_few_steps_lower_the_loss(head, family):
    model = tiny_model(head, family, slim=True).train()
    x, y = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(x, labels=y).loss
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.02, losses
    # every trainable parameter takes part (plain DDP stalls on parameters that never get a gradient)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", ["dinov2", "swin", "sam"])
def test_frozen_backbone_gets_no_gradient_and_does_not_move(head, family):
    model = tiny_model(head, family, freeze_backbone=True, slim=True).train()
    assert not model.backbone.training, "a frozen backbone stays in eval mode"
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    x, y = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(x, labels=y).loss.backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert any(not torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())


@pytest.mark.parametrize("head,family", PAIRS)
def test_save_and_load_round_trip(head, family, tmp_path):
    model = tiny_model(head, family, slim=True).eval()
    x, _ = batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")), "weights are saved as safetensors only"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSemanticSegmentation"] == "modeling_vitseg.ViTSegForSemanticSegmentation"
    assert config["backbone_config"]["model_type"] == model.config.backbone_config.model_type
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert type(reloaded.config.backbone_config) is type(model.config.backbone_config)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=1e-6)


REMOTE_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_vitseg"] = None  # importing hf_vitseg must fail here
    import torch
    torch.set_num_threads(1)  # as in the test process: same reduction order, same numbers
    from transformers import AutoModelForSemanticSegmentation
    try:
        import hf_vitseg  # noqa
        raise SystemExit("hf_vitseg is importable")
    except ImportError:
        pass
    results = {}
    for folder in json.loads(sys.argv[1]):
        model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        x = torch.load(folder + "/x.pt")
        with torch.no_grad():
            logits = model(x).logits
        results[folder] = (logits - torch.load(folder + "/logits.pt")).abs().max().item()
    print(json.dumps(results))
    """
)


def run_remote_loader(folders, tmp_path):
    script = tmp_path / "remote_loader.py"
    script.write_text(REMOTE_LOADER)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps([str(f) for f in folders])],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_remote_code_round_trip_every_pair_in_a_process_without_hf_vitseg(tmp_path):
    folders = []
    for head, family in PAIRS:
        model = tiny_model(head, family, slim=True).eval()
        folder = tmp_path / f"{head}-{family}"
        model.save_pretrained(folder)
        assert (folder / "modeling_vitseg.py").exists() and (folder / "configuration_vitseg.py").exists()
        x, _ = batch()
        with torch.no_grad():
            torch.save(model(x).logits, folder / "logits.pt")
        torch.save(x, folder / "x.pt")
        folders.append(folder)
    diffs = run_remote_loader(folders, tmp_path)
    assert len(diffs) == len(PAIRS)
    assert max(diffs.values()) <= 1e-6, {k: v for k, v in diffs.items() if v > 1e-6}


CUSTOM_HEAD_MODULE = textwrap.dedent(
    '''
    """A user's own head, in the user's own module."""
    import torch
    from hf_vitseg import BackboneFeatures, BaseHead, register_head


    @register_head("my_center_surround")
    class CenterSurroundHead(BaseHead):
        num_default_taps = 2

        def __init__(self, in_channels, in_strides, num_labels, num_prefix_tokens=0, channels=16, dropout=0.0,
                     in_index=None, input_transform="resize_concat"):
            super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=channels,
                             dropout=dropout, in_index=in_index, input_transform=input_transform)
            self.proj = torch.nn.Conv2d(self.selected_channels, channels, 3, padding=1)

        def forward(self, features: BackboneFeatures):
            x = self.select_inputs(features.feature_maps)
            return self.classify(torch.relu(self.proj(x)))
    '''
)


def test_user_registered_head_trains_saves_and_loads_through_remote_code(tmp_path, monkeypatch):
    (tmp_path / "user_pkg").mkdir()
    (tmp_path / "user_pkg" / "my_heads.py").write_text(CUSTOM_HEAD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "user_pkg"))
    monkeypatch.setitem(sys.modules, "my_heads", None)  # another test's module of that name must not answer
    del sys.modules["my_heads"]
    import my_heads  # noqa: F401  registers the head

    assert "my_center_surround" in hf_vitseg.list_heads()
    model = tiny_model("my_center_surround", "dinov2", head_kwargs={"channels": 8}).eval()
    assert model.config.backbone_out_indices == [2, 4]
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    x, _ = batch()
    with torch.no_grad():
        logits = model(x).logits
    torch.save(logits, folder / "logits.pt")
    torch.save(x, folder / "x.pt")
    saved = (folder / "vitseg_user_my_heads.py").read_text()
    assert "from .head_base import BaseHead, register_head" in saved and "hf_vitseg" not in saved
    assert "from .features import BackboneFeatures" in saved
    # in this process (head registered)...
    reloaded = ViTSegForSemanticSegmentation.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, logits, rtol=0, atol=0)
    # ...and in a fresh one where neither hf_vitseg nor my_heads can be imported
    assert run_remote_loader([folder], tmp_path)[str(folder)] <= 1e-6
    hf_vitseg.modeling.head_base.HEAD_REGISTRY.pop("my_center_surround")


def test_register_head_rejects_a_different_class_under_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        @hf_vitseg.register_head("linear")
        class Impostor(hf_vitseg.BaseHead):
            pass
    with pytest.raises(TypeError, match="subclass of BaseHead"):
        hf_vitseg.register_head("not_a_head")(object)


# -- the backbone adapter ------------------------------------------------------------------------------------

VIT_FAMILIES = [f for f in FAMILIES if family_for(tiny_backbone_config(f)).kind == "vit"]


@pytest.mark.parametrize("family", VIT_FAMILIES)
def test_adapter_taps_equal_the_hf_models_own_hidden_states_on_non_square_input(family):
    """Taps are the HF model's hidden states, final-normed, split into prefix tokens and a true (h, w) grid."""
    model = tiny_model("linear", family, backbone_out_indices=[0, 1, 3, 4]).eval()
    hf = model.backbone.model
    x, _ = batch(NON_SQUARE)
    with torch.no_grad():
        features = model.backbone(x)
        kwargs = {"interpolate_pos_encoding": True} if model.backbone.family.interpolates_with_kwarg else {}
        reference = hf(x, output_hidden_states=True, **kwargs)
    norm = model.backbone.final_norm
    prefix = model.config.num_prefix_tokens
    assert prefix == {"vit": 1, "deit": 2, "dinov2": 1, "dinov2_with_registers": 3, "dinov3_vit": 3, "clip": 1,
                      "siglip": 0, "beit": 1}[family]
    h, w = NON_SQUARE[0] // 8, NON_SQUARE[1] // 8
    for tap, layer in enumerate([0, 1, 3, 4]):
        tokens = norm(reference.hidden_states[layer])
        expected_map = tokens[:, prefix:].reshape(2, h, w, -1).permute(0, 3, 1, 2)
        assert features.feature_maps[tap].shape == (2, 32, h, w)
        torch.testing.assert_close(features.feature_maps[tap], expected_map, rtol=1e-5, atol=1e-5)
        if prefix:
            torch.testing.assert_close(features.prefix_tokens[tap], tokens[:, :prefix], rtol=1e-5, atol=1e-5)
    assert prefix or features.prefix_tokens is None
    # CLIP applies its final norm to the pooled CLS only, not to last_hidden_state
    last = norm(reference.last_hidden_state) if family == "clip" else reference.last_hidden_state
    torch.testing.assert_close(features.feature_maps[-1], last[:, prefix:].reshape(
        2, h, w, -1).permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_sam_taps_equal_sam_vision_model_at_native_size_and_run_at_other_sizes():
    model = tiny_model("linear", "sam", backbone_out_indices=[2, 4]).eval()
    x, _ = batch((64, 64))
    with torch.no_grad():
        features = model.backbone(x)
        full = AutoModel.from_config(model.config.backbone_config)
        full.load_state_dict(model.backbone.model.state_dict(), strict=False)
        reference = full.eval()(x, output_hidden_states=True)
    for tap, layer in enumerate([2, 4]):
        torch.testing.assert_close(features.feature_maps[tap], reference.hidden_states[layer].permute(0, 3, 1, 2))
    assert features.prefix_tokens is None
    with torch.no_grad():
        assert model.backbone(batch(NON_SQUARE)[0]).feature_maps[0].shape == (2, 32, 8, 12)


@pytest.mark.parametrize("family", ["vit", "dinov2", "dinov3_vit", "sam"])
def test_backbone_runs_only_as_deep_as_the_deepest_tap(family):
    model = tiny_model("linear", family, backbone_out_indices=[2]).eval()
    # the layers it skips are not trainable (no optimizer state, no DDP stall), also after unfreezing
    model.freeze_backbone(True)
    model.freeze_backbone(False)
    assert not any(p.requires_grad for p in model.backbone.layers[2:].parameters())
    assert all(p.requires_grad for p in model.backbone.layers[:2].parameters())
    calls = []
    for i, layer in enumerate(model.backbone.layers):
        layer.register_forward_hook(lambda *a, i=i: calls.append(i))
    with torch.no_grad():
        model(batch()[0])
    assert calls == [0, 1]


def test_input_size_not_a_patch_multiple_points_to_the_processor():
    model = tiny_model()
    with pytest.raises(ValueError, match="multiples of 8.*ViTSegImageProcessor.*64x104"):
        model(torch.randn(1, 3, 60, 100))


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match="has 1 channels but the backbone expects 3"):
        tiny_model()(torch.randn(1, 1, 64, 64))


def test_labels_outside_num_labels_are_a_clear_error_and_ignore_index_is_fine():
    model = tiny_model()
    x, y = batch()
    y[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"values \[7\] outside \[0, 3\).*ignore_index=255"):
        model(x, labels=y)
    y[0, 0, 0] = 255
    assert torch.isfinite(model(x, labels=y).loss)
    y[:] = 255  # everything ignored: a zero loss, not NaN
    assert model(x, labels=y).loss.item() == 0.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(head="nope"), "Unknown head 'nope'. Registered heads: .*linear"),
        (dict(backbone_out_indices=[2, 9]), "out of range: this backbone has 4 layers.*0..4"),
        (dict(backbone_out_indices=[3, 2]), "sorted and unique"),
        (dict(backbone_out_indices=[-1, 4]), "sorted and unique"),
        (dict(num_labels=3, id2label={0: "a", 1: "b"}), "num_labels=3 disagrees with id2label"),
        (dict(head_kwargs={"bogus": 1}), r"head_kwargs \['bogus'\] are not arguments of head 'linear'"),
        (dict(num_labels=3, ignore_index=1), "ignore_index=1 is a valid class id"),
        (dict(neck="fpn"), "neck must be"),
        (dict(auxiliary_loss_weight=0.4, backbone_out_indices=[4]), "auxiliary_in_index=-2 is out of range"),
    ],
)
def test_config_validation(kwargs, match):
    kwargs.setdefault("num_labels", 3)
    with pytest.raises(ValueError, match=match):
        ViTSegConfig(backbone_config=tiny_backbone_config("dinov2"), **kwargs)


def test_config_indices_negative_and_hierarchical_stages():
    config = ViTSegConfig(backbone_config=tiny_backbone_config("dinov2"), backbone_out_indices=[-3, -1])
    assert config.backbone_out_indices == [2, 4]
    swin = ViTSegConfig(backbone_config=tiny_backbone_config("swin"), backbone_out_indices=[1, 2, 3, 4])
    assert swin.backbone_config.out_features == ["stage1", "stage2", "stage3", "stage4"]
    with pytest.raises(ValueError, match="4 stages"):
        ViTSegConfig(backbone_config=tiny_backbone_config("swin"), backbone_out_indices=[5])


def test_backbone_config_survives_save_as_the_right_class(tmp_path):
    for family in FAMILIES:
        config = ViTSegConfig(backbone_config=tiny_backbone_config(family), num_labels=4)
        config.save_pretrained(tmp_path / family)
        again = ViTSegConfig.from_pretrained(tmp_path / family)
        assert type(again.backbone_config) is type(config.backbone_config)
        assert again.backbone_config.to_dict() == config.backbone_config.to_dict()
        assert again.num_labels == 4 and again.backbone_out_indices == config.backbone_out_indices


# -- attention implementations, checkpointing ------------------------------------------------------------------

@pytest.mark.parametrize("family", ["vit", "dinov2", "dinov3_vit"])
def test_sdpa_by_default_and_attentions_with_eager(family, tmp_path):
    model = tiny_model("linear", family)
    assert model.backbone.model.config._attn_implementation == "sdpa"
    # under SDPA, attentions are recorded with eager for that call (tests/test_backbones.py checks the warning)
    assert len(model(batch()[0], output_attentions=True).attentions) == 4
    assert model.backbone.model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    eager = ViTSegForSemanticSegmentation.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.backbone.model.config._attn_implementation == "eager"
    out = eager(batch()[0], output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 4 and len(out.hidden_states) == 5
    with torch.no_grad():
        torch.testing.assert_close(eager(batch()[0]).logits, model.eval()(batch()[0]).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["dinov2", "dinov3_vit", "swin"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    x, y = batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("conv", family, head_kwargs={"dropout": 0.0}).train()
        if checkpointing:
            model.activation_checkpointing_enable()  # gradient_checkpointing_enable: deprecated in transformers 5
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.backbone.modules())
        model(x, labels=y).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.backbone.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# -- pretrained backbones -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_backbone_is_bit_identical(family, tmp_path):
    # seed 1: unlike the fresh model below; the reference is what transformers itself loads from the checkpoint
    reference = AutoModel.from_pretrained(save_tiny_backbone(tmp_path / "backbone", family, seed=1)).state_dict()
    model = ViTSegForSemanticSegmentation.from_pretrained_backbone(
        tmp_path / "backbone", head="conv", id2label={0: "bg", 1: "fg"}
    )
    assert model.config.num_labels == 2 and model.config.id2label == {0: "bg", 1: "fg"}
    target = model.backbone.model.state_dict()
    compared = 0
    for key, value in target.items():
        source_key = key if key in reference else key.split(".", 1)[1] if family == "swin" else None
        if family == "swin" and key.startswith("hidden_states_norms."):
            continue  # AutoBackbone's per-stage output norms: not in a SwinModel checkpoint, initialised fresh
        assert source_key in reference, key
        assert torch.equal(value, reference[source_key]), key
        compared += 1
    assert compared > 10
    # a fresh random model differs: the equality above is not vacuous
    fresh = tiny_model("conv", family, num_labels=2, slim=True).backbone.model.state_dict()
    assert any(not torch.equal(fresh[k], target[k]) for k in target if target[k].is_floating_point())
    # saving and loading the whole model keeps them too
    model.save_pretrained(tmp_path / "vitseg")
    again = ViTSegForSemanticSegmentation.from_pretrained(tmp_path / "vitseg")
    assert all(torch.equal(v, again.backbone.model.state_dict()[k]) for k, v in target.items())


def test_from_pretrained_backbone_drops_a_task_head(tmp_path):
    from transformers import SamConfig, SamModel, ViTForImageClassification

    torch.manual_seed(2)
    classifier = ViTForImageClassification(tiny_backbone_config("vit"))
    classifier.save_pretrained(tmp_path / "cls")
    model = ViTSegForSemanticSegmentation.from_pretrained_backbone(tmp_path / "cls", head="linear", num_labels=4)
    for key, value in model.backbone.model.state_dict().items():
        assert torch.equal(value, classifier.vit.state_dict()[key]), key
    assert not any("classifier" in k for k in model.backbone.state_dict())

    sam = SamModel(SamConfig(vision_config=tiny_backbone_config("sam").to_dict()))
    sam.save_pretrained(tmp_path / "sam")
    model = ViTSegForSemanticSegmentation.from_pretrained_backbone(tmp_path / "sam", head="linear", num_labels=2)
    assert model.config.backbone_config.model_type == "sam_vision_model"
    sam_state = sam.state_dict()
    for key, value in model.backbone.model.state_dict().items():
        assert torch.equal(value, sam_state[key]), key


def test_from_pretrained_backbone_by_repo_id_from_the_offline_hf_cache(tmp_path, monkeypatch):
    """A Hub id resolves through the HF cache layout with HF_HUB_OFFLINE=1 (no network here)."""
    cache = tmp_path / "hub"
    reference = AutoModel.from_pretrained(save_tiny_backbone_to_hf_cache(cache, "someone/tiny-dinov2")).state_dict()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = ViTSegForSemanticSegmentation.from_pretrained_backbone(
        "someone/tiny-dinov2", head="linear", num_labels=2, backbone_kwargs={"cache_dir": str(cache)}
    )
    for key, value in model.backbone.model.state_dict().items():
        assert torch.equal(value, reference[key])
    assert model.config.backbone_name_or_path == "someone/tiny-dinov2"


def test_other_num_labels_needs_ignore_mismatched_sizes(tmp_path):
    model = tiny_model("conv", "dinov2", num_labels=3, slim=True)
    model.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="(?i)size mismatch|ignore_mismatched_sizes"):
        ViTSegForSemanticSegmentation.from_pretrained(tmp_path, num_labels=5)
    five = ViTSegForSemanticSegmentation.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert five.head.classifier.out_channels == 5
    # everything but the classifier is kept
    assert torch.equal(five.head.convs[0][0].weight, model.head.convs[0][0].weight)
    assert torch.equal(five.backbone.model.embeddings.cls_token, model.backbone.model.embeddings.cls_token)


def test_loading_does_not_reinitialise_loaded_backbone_weights(tmp_path):
    """transformers 5 initialises after construction; loaded weights must survive that."""
    model = tiny_model("linear", "dinov2")
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.fill_(0.123)
    model.save_pretrained(tmp_path)
    again = ViTSegForSemanticSegmentation.from_pretrained(tmp_path)
    assert all(torch.all(p == 0.123) for p in again.backbone.parameters())
