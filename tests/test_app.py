"""`hf-vitseg app`'s functions (issue 12 item 5): the prediction is `predict`'s, the area table, the label map
download, sliding windows for large images, the page's parts, and one-line errors. The page in a real browser:
test_app_browser.py."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from conftest import tiny_backbone_config, tiny_model
from PIL import Image

from hf_vitseg import ViTSegImageProcessor
from hf_vitseg.cli import main
from hf_vitseg.inference.app import AREA_COLUMNS, SegmentationApp, class_areas, import_gradio

gradio = pytest.importorskip("gradio", reason="the web app's optional dependency (the dev extra installs it)")

ID2LABEL = {0: "background", 1: "nucleus", 2: "border"}


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    tiny_model(num_labels=3, id2label=ID2LABEL).save_pretrained(folder)
    ViTSegImageProcessor(patch_size=8).save_pretrained(folder)
    return folder


def save_image(path, height=40, width=56, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)).save(path)
    return path


def test_the_app_predicts_what_hf_vitseg_predict_writes(model_folder, tmp_path):
    image = save_image(tmp_path / "cells.png")
    result = SegmentationApp.from_pretrained(model_folder).predict(image)
    assert main(["predict", str(image), "--model", str(model_folder), "--out", str(tmp_path / "out")]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "cells_labels.png"))
    np.testing.assert_array_equal(result.label_map, written)
    # the download is that same PNG, named as predict names it
    assert result.label_map_file.name == "cells_labels.png"
    assert result.label_map_file.read_bytes() == (tmp_path / "out" / "cells_labels.png").read_bytes()
    # the overlay is predict's overlay picture (legend strip included)
    overlay = Image.open(tmp_path / "out" / "cells_overlay.png")
    np.testing.assert_array_equal(np.asarray(result.overlay), np.asarray(overlay))
    assert result.seconds > 0


def test_area_table_rows_sum_to_the_image_and_use_the_overlay_colours(model_folder, tmp_path):
    result = SegmentationApp.from_pretrained(model_folder).predict(save_image(tmp_path / "a.png"))
    ids, counts = np.unique(result.label_map, return_counts=True)
    assert sorted(row[0] for row in result.areas) == ids.tolist()
    assert sum(row[3] for row in result.areas) == result.label_map.size
    assert [row[3] for row in result.areas] == sorted(counts.tolist(), reverse=True)
    legend = {class_id: "#%02x%02x%02x" % color for class_id, _, color in result.overlay.info["legend"]}
    for class_id, name, color, pixels, percent in result.areas:
        assert name == ID2LABEL[class_id] and color == legend[class_id]
        assert percent == round(100 * pixels / result.label_map.size, 2)


def test_class_areas_by_hand():
    label_map = np.array([[0, 0, 0, 1], [1, 5, 5, 5]])
    rows = class_areas(label_map, {"0": "sky", "1": "tree"}, {0: (255, 0, 16)})
    assert rows == [[0, "sky", "#ff0010", 3, 37.5], [5, "5", "", 3, 37.5], [1, "tree", "", 2, 25.0]]
    assert len(AREA_COLUMNS) == len(rows[0])


def test_more_than_256_labels_download_as_a_16_bit_png(tmp_path):
    folder = tmp_path / "many"
    model = tiny_model(num_labels=300, ignore_index=-100)
    with torch.no_grad():  # make class 299 win everywhere: a value an 8-bit PNG cannot hold
        model.head.classifier.bias[299] = 1e3
    model.save_pretrained(folder)
    ViTSegImageProcessor(patch_size=8).save_pretrained(folder)
    result = SegmentationApp.from_pretrained(folder).predict(save_image(tmp_path / "b.png", 16, 24))
    saved = Image.open(result.label_map_file)
    assert saved.mode.startswith("I") and np.asarray(saved).max() == 299
    np.testing.assert_array_equal(np.asarray(saved), result.label_map)


def test_a_large_image_is_predicted_in_sliding_windows(model_folder, tmp_path, monkeypatch, capsys):
    from hf_vitseg.cli import predict
    from hf_vitseg.cli.predict import predict_label_map, read_image

    image = save_image(tmp_path / "large.png", 96, 128)  # 12 x 16 = 192 patch tokens
    monkeypatch.setattr(predict, "MAX_PLAIN_TOKENS", 100)  # "large" above 100 tokens, to keep the test small
    app = SegmentationApp.from_pretrained(model_folder, crop_size=[32], stride=[16])
    result = app.predict(image)
    assert "predicting it in sliding 32x32 windows" in capsys.readouterr().err
    windows = {"crop_size": (32, 32), "stride": (16, 16), "blend": "gaussian", "batch_size": 1}
    assert app.large_image_window == windows and app.sliding_window is None
    expected = predict_label_map(app.model, app.processor, read_image(image), sliding_window=windows)
    np.testing.assert_array_equal(result.label_map, expected)
    plain = predict_label_map(app.model, app.processor, read_image(image))
    assert (plain != expected).any(), "the windows must change the result of this random model"

    # --sliding-window: every image, however small
    always = SegmentationApp.from_pretrained(model_folder, sliding_window=True, crop_size=[16])
    small = save_image(tmp_path / "small.png", 24, 24)
    assert always.sliding_window["crop_size"] == (16, 16)
    np.testing.assert_array_equal(always.predict(small).label_map, predict_label_map(
        always.model, always.processor, read_image(small), sliding_window=always.sliding_window))


def test_a_mask_transformer_is_served_with_predicts_semantic_map(tmp_path, monkeypatch, capsys):
    """An eomt model folder: the page's prediction is `hf-vitseg predict`'s label map for it (whole images, also
    a large one), and sliding windows are refused in one line naming the flag."""
    from hf_vitseg import ViTSegConfig
    from hf_vitseg.cli import predict
    from hf_vitseg.modeling import ViTSegForUniversalSegmentation

    torch.manual_seed(0)
    folder = tmp_path / "eomt"
    ViTSegForUniversalSegmentation(ViTSegConfig(
        backbone_config=tiny_backbone_config("dinov2"), head="eomt", num_labels=3, id2label=ID2LABEL,
        head_kwargs={"num_queries": 6, "num_blocks": 2})).save_pretrained(folder)
    ViTSegImageProcessor(patch_size=8).save_pretrained(folder)
    monkeypatch.setattr(predict, "MAX_PLAIN_TOKENS", 10)  # 'large' images stay whole for a mask model
    image = save_image(tmp_path / "cells.png")
    result = SegmentationApp.from_pretrained(folder).predict(image)
    assert main(["predict", str(image), "--model", str(folder), "--out", str(tmp_path / "out")]) == 0
    np.testing.assert_array_equal(result.label_map, np.asarray(Image.open(tmp_path / "out" / "cells_labels.png")))
    model = ViTSegForUniversalSegmentation.from_pretrained(folder).eval()
    processor = ViTSegImageProcessor.from_pretrained(folder)
    with torch.no_grad():  # 40 x 56: patch multiples, no padding to cut
        expected = processor.post_process_semantic_segmentation(model(**processor(Image.open(image))),
                                                                target_sizes=[(40, 56)])[0].numpy()
    np.testing.assert_array_equal(result.label_map, expected)
    assert sum(row[3] for row in result.areas) == 40 * 56
    capsys.readouterr()
    assert main(["app", str(folder), "--sliding-window"]) == 1
    assert "--sliding-window is for pixel heads" in one_line_error(capsys)


def test_the_page_has_its_parts_and_no_analytics(model_folder):
    app = SegmentationApp.from_pretrained(model_folder)
    page = app.build()
    assert page.analytics_enabled is False and app.title == "hf-vitseg: model"
    parts = {block.elem_id: block for block in page.blocks.values() if getattr(block, "elem_id", None)}
    assert isinstance(parts["hf-vitseg-input"], gradio.Image) and parts["hf-vitseg-input"].type == "filepath"
    assert isinstance(parts["hf-vitseg-overlay"], gradio.Image)
    assert isinstance(parts["hf-vitseg-areas"], gradio.Dataframe)
    assert isinstance(parts["hf-vitseg-label-map"], gradio.File)


def test_the_upload_handler_reports_a_broken_image_on_the_page(model_folder, tmp_path):
    app = SegmentationApp.from_pretrained(model_folder)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(gradio.Error, match="Cannot decode image .*broken.png"):
        app._on_upload(str(broken))
    assert app._on_upload(None) == (None, [], None, "")
    overlay, areas, label_map_file, status = app._on_upload(str(save_image(tmp_path / "c.png")))
    assert isinstance(overlay, Image.Image) and areas and label_map_file.endswith("c_labels.png")
    assert status.startswith("56 x 40 pixels, ")


def test_trust_remote_code_runs_the_checkpoints_own_code(model_folder, tmp_path, monkeypatch):
    from hf_vitseg.hub.loading import load_model

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    remote = load_model(model_folder, trust_remote_code=True)
    local = load_model(model_folder)
    assert type(remote).__module__.startswith("transformers_modules.")
    assert type(local).__module__ == "hf_vitseg.modeling.modeling_vitseg"
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(remote(pixel_values=x).logits, local(pixel_values=x).logits)


# -- the command's errors: one line naming the argument --------------------------------------------------------


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_missing_model_is_one_line(capsys, tmp_path):
    assert main(["app", str(tmp_path / "nowhere")]) == 1
    assert one_line_error(capsys).startswith(f"hf-vitseg app: error: MODEL_OR_FOLDER {tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    assert main(["app", str(tmp_path / "empty")]) == 1
    assert "has no config.json" in one_line_error(capsys)


def test_a_port_in_use_is_one_line(model_folder, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["app", str(model_folder), "--port", str(port)]) == 1
    assert one_line_error(capsys) == f"hf-vitseg app: error: --port {port}: already in use on 127.0.0.1; choose " \
                                     "another port."


def test_bad_flags_are_argparse_errors(model_folder, capsys):
    for flags, wanted in ((["--port", "70000"], "a port number in 1..65535"), (["--alpha", "2"], "--alpha")):
        with pytest.raises(SystemExit) as exit_info:
            main(["app", str(model_folder), *flags])
        assert exit_info.value.code == 2 and wanted in capsys.readouterr().err
    assert main(["app", str(model_folder), "--crop-size", "12"]) == 1  # not a multiple of the patch size (8)
    assert "--crop-size" in one_line_error(capsys)


def test_without_gradio_the_app_says_how_to_install_it(model_folder, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ImportError, match=r'pip install "hf-vitseg\[app\]"'):
        import_gradio()
    assert main(["app", str(model_folder)]) == 1
    assert 'needs Gradio, an optional dependency: pip install "hf-vitseg[app]"' in one_line_error(capsys)


def test_a_model_of_other_channels_gets_a_file_field(tmp_path):
    config = tiny_backbone_config("dinov2")
    config.num_channels = 4
    try:
        model = tiny_model(backbone_config=config, num_labels=2)
    except (ValueError, TypeError) as error:  # pragma: no cover - the channel support of this checkout
        pytest.fail(f"a 4-channel model cannot be built: {error}")
    app = SegmentationApp(model, ViTSegImageProcessor.for_model(model))
    parts = {block.elem_id: block for block in app.build().blocks.values() if getattr(block, "elem_id", None)}
    assert app.num_channels == 4 and isinstance(parts["hf-vitseg-input"], gradio.File)

    # a 4-channel 16-bit TIFF, read with every channel as predict reads it
    tifffile = pytest.importorskip("tifffile", reason="the tiff extra (the dev extra installs it)")
    from hf_vitseg.cli.predict import predict_label_map, read_image

    stack = np.random.default_rng(0).integers(0, 65536, (40, 48, 4)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    result = app.predict(tmp_path / "stack.tif")
    assert result.label_map_file.name == "stack_labels.png" and result.overlay.width == 48
    np.testing.assert_array_equal(result.label_map, predict_label_map(app.model, app.processor,
                                                                      read_image(tmp_path / "stack.tif")))


def test_the_server_makes_no_connection_beyond_this_machine(model_folder, monkeypatch):
    """Offline: serving the page and answering a prediction opens no connection to anything but localhost (no
    analytics, no version check, no CDN); Gradio's own check that its server is up goes to 127.0.0.1."""
    import urllib.request

    from hf_vitseg.inference.app import launch

    connections = []
    original_connect = socket.socket.connect

    def connect(self, address):
        connections.append(address)
        return original_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    page = SegmentationApp.from_pretrained(model_folder).build()
    try:
        launch(page, port=port, block=False)
        html = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert "hf-vitseg" in html or "gradio" in html.lower()
    finally:
        page.close()
    hosts = {address[0] for address in connections if isinstance(address, tuple)}
    assert hosts and hosts <= {"127.0.0.1", "localhost", "::1"}, f"connections beyond this machine: {hosts}"
