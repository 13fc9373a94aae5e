"""Instances of a large image window by window (`hf_vitseg.inference.sliding_window_instances`), `paste_by_score`,
and `hf-vitseg predict --task instance --sliding-window`.

The window rule is tested with an oracle mask model: query `q` predicts the pixels whose value is `q + 1` (so each
window sees exactly the parts of the objects inside it), which makes the expected result exact: every object once,
whole, also when window borders cut it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_mask_cli import _error, instances, trained  # noqa: F401  (module-scoped fixtures)

from hf_vitseg import ViTSegImageProcessor
from hf_vitseg.cli import main
from hf_vitseg.inference import paste_by_score, sliding_window_instances, sliding_window_starts


class OracleMaskModel(torch.nn.Module):
    """Query `q` masks the pixels of value `q + 1` (channel 0) and is an object when the window holds any; the mask
    logits come at a quarter of the input resolution when `stride` is 4 (a real model's), else at full resolution."""

    size_divisor = 8

    def __init__(self, num_queries: int, stride: int = 1):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.num_queries, self.stride = num_queries, stride
        self.batch_sizes = []

    def forward(self, pixel_values):
        self.batch_sizes.append(len(pixel_values))
        ids = torch.arange(1, self.num_queries + 1, dtype=pixel_values.dtype)[None, :, None, None]
        hits = (pixel_values[:, :1] == ids).float()  # (B, Q, H, W)
        if self.stride > 1:
            hits = torch.nn.functional.avg_pool2d(hits, self.stride)
        present = hits.flatten(2).amax(2) > 0
        class_logits = torch.stack([torch.where(present, 12.0, -12.0), torch.where(present, -12.0, 12.0)], -1)
        return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=(hits * 2 - 1) * 30)


def scene(height=80, width=112, seed=0, size=(5, 11)):
    """An id map of non-touching rectangles (ids 1..N) at random places, many of them cut by window borders."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((height, width), np.int64)
    for _ in range(400):
        h, w = rng.integers(*size, size=2)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        if not ids[max(0, y - 1) : y + h + 1, max(0, x - 1) : x + w + 1].any():
            ids[y : y + h, x : x + w] = ids.max() + 1
    return ids


def as_pixels(ids: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(ids).float()[None, None].repeat(1, 3, 1, 1)


def objects(segmentation: torch.Tensor) -> set[bytes]:
    """The segments of an id map (-1 none) as a set of their masks' bytes: order-free comparison."""
    return {(segmentation == value).numpy().tobytes() for value in segmentation.unique().tolist() if value >= 0}


def truth_objects(ids: np.ndarray) -> set[bytes]:
    return {(ids == value).tobytes() for value in np.unique(ids) if value > 0}


PROCESSOR = ViTSegImageProcessor(patch_size=8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_object_comes_once_and_whole_though_window_borders_cut_it(seed):
    ids = scene(seed=seed)
    model = OracleMaskModel(int(ids.max()))
    result = sliding_window_instances(model, PROCESSOR, as_pixels(ids), crop_size=32)[0]
    assert objects(result["segmentation"]) == truth_objects(ids)
    assert len(result["segments_info"]) == ids.max()
    assert [info["id"] for info in result["segments_info"]] == list(range(int(ids.max())))
    # the scene exercises the rule: windows see parts of objects, each of which the oracle detects
    parts = sum(1 for top in sliding_window_starts(80, 32, 16) for left in sliding_window_starts(112, 32, 16)
                for value in np.unique(ids[top : top + 32, left : left + 32])
                if value and (ids[top : top + 32, left : left + 32] == value).sum() < (ids == value).sum())
    assert parts > ids.max()
    binary = sliding_window_instances(model, PROCESSOR, as_pixels(ids), crop_size=32, return_binary_maps=True)[0]
    assert binary["segmentation"].dtype == torch.bool and len(binary["segmentation"]) == ids.max()
    assert {m.numpy().tobytes() for m in binary["segmentation"]} == truth_objects(ids)


def test_a_window_larger_than_the_image_is_one_pass_with_the_padding_cut():
    ids = scene(40, 56, seed=3)
    model = OracleMaskModel(int(ids.max()))
    windowed = sliding_window_instances(model, PROCESSOR, as_pixels(ids), crop_size=64)[0]
    assert windowed["segmentation"].shape == (40, 56)
    plain = PROCESSOR.post_process_instance_segmentation(model(as_pixels(ids)))[0]
    assert objects(windowed["segmentation"]) == objects(plain["segmentation"]) == truth_objects(ids)


def test_mask_logits_coarser_than_the_window_are_resampled_to_it():
    ids = np.zeros((64, 96), np.int64)
    ids[8:24, 8:24], ids[36:52, 60:76] = 1, 2  # on the 4-pixel logits grid, in windows at multiples of 4
    model = OracleMaskModel(2, stride=4)
    result = sliding_window_instances(model, PROCESSOR, as_pixels(ids), crop_size=32)[0]
    # bilinear resampling rounds the squares' corners off, in the windows as in one pass over the whole image
    plain = PROCESSOR.post_process_instance_segmentation(model(as_pixels(ids)), target_sizes=[(64, 96)])[0]
    assert objects(result["segmentation"]) == objects(plain["segmentation"])
    assert [int((result["segmentation"] == k).sum()) for k in (0, 1)] == [16 * 16 - 4] * 2


def test_input_boxes_cut_the_padding_and_offsets():
    ids = scene(48, 64, seed=4)
    canvas = np.zeros((64, 96), np.int64)
    canvas[8:56, 16:80] = ids
    canvas[0:4, 0:4] = 99  # an "object" in the padding: never seen
    model = OracleMaskModel(99)
    result = sliding_window_instances(model, PROCESSOR, as_pixels(canvas), crop_size=32,
                                      input_boxes=[(8, 16, 48, 64)])[0]
    assert result["segmentation"].shape == (48, 64)
    assert objects(result["segmentation"]) == truth_objects(ids)


def test_windows_run_in_batches_with_the_same_result():
    ids = scene(seed=5)
    model = OracleMaskModel(int(ids.max()))
    one = sliding_window_instances(model, PROCESSOR, as_pixels(ids), crop_size=32)[0]
    sizes_one, model.batch_sizes = model.batch_sizes, []
    three = sliding_window_instances(model, PROCESSOR, as_pixels(ids), crop_size=32, batch_size=3)[0]
    assert set(sizes_one) == {1} and max(model.batch_sizes) == 3
    assert len(sizes_one) == sum(model.batch_sizes)
    assert torch.equal(one["segmentation"], three["segmentation"])


def test_overlapping_detections_are_pasted_by_score():
    masks = [(0, 0, torch.ones(4, 2, dtype=torch.bool)), (0, 0, torch.ones(4, 3, dtype=torch.bool)),
             (0, 0, torch.ones(4, 5, dtype=torch.bool))]
    # placed: 0 -> columns 4-5 (score 0.9); 1 -> columns 3-5, 1/3 free < 0.8: dropped; 2 -> columns 0-4, 4/5 free
    masks[0] = (0, 4, masks[0][2])
    masks[1] = (0, 3, masks[1][2])
    segmentation, kept = paste_by_score(masks, [0.9, 0.7, 0.6], (4, 6))
    assert kept == [0, 2]
    assert (segmentation[:, 4:] == 0).all() and (segmentation[:, :4] == 1).all()
    segmentation, kept = paste_by_score(masks, [0.9, 0.7, 0.6], (4, 6), overlap_mask_area_threshold=0.3)
    assert kept == [0, 1, 2] and (segmentation[:, 3] == 1).all()
    with pytest.raises(ValueError, match="one score per mask"):
        paste_by_score(masks, [0.9], (4, 6))


@pytest.mark.parametrize("kwargs, message", [
    ({"crop_size": 30}, "multiple of the model's size divisor 8"),
    ({"crop_size": 32, "stride": 40}, "leaves pixels unseen"),
    ({"crop_size": 32, "batch_size": 0}, "batch_size must be >= 1"),
    ({"crop_size": 32, "overlap_mask_area_threshold": 1.5}, "overlap_mask_area_threshold must lie in"),
    ({"crop_size": 32, "input_boxes": [(0, 0, 90, 10)]}, "does not lie in the 80x112 pixel_values"),
    ({"crop_size": 32, "input_boxes": [(0, 0, 8, 8), (0, 0, 8, 8)]}, "one per image"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sliding_window_instances(OracleMaskModel(3), PROCESSOR, as_pixels(scene()), **kwargs)


# -- the CLI ----------------------------------------------------------------------------------------------------------
def test_predict_finds_instances_in_windows(trained, instances, tmp_path):  # noqa: F811
    out, _ = trained
    images, _ = instances
    image = images / "000.png"
    argv = ["predict", str(image), "--model", str(out), "--task", "instance", "--threshold", "0"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    assert main([*argv, "--sliding-window", "--crop-size", "32", "--out", str(tmp_path / "windows")]) == 0
    segment_map = np.array(Image.open(tmp_path / "windows" / "000_segments.png"))
    segments = json.loads((tmp_path / "windows" / "000_segments.json").read_text())["segments"]
    assert segment_map.shape == (48, 48)
    assert [s["id"] for s in segments] == list(range(1, len(segments) + 1))
    assert set(np.unique(segment_map)) <= set(range(len(segments) + 1))
    assert all(s["label"] == "nucleus" for s in segments)
    # one window as large as the image: the plain detections, pasted by score (the best kept, overlapped ones
    # dropped) instead of painted in query order
    assert main([*argv, "--sliding-window", "--crop-size", "48", "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "000_segments.json").read_text())["segments"]
    whole = json.loads((tmp_path / "whole" / "000_segments.json").read_text())["segments"]
    assert 1 <= len(one) <= len(whole)
    assert max(s["score"] for s in one) == max(s["score"] for s in whole)


def test_predict_in_windows_maps_a_resized_image_back_to_its_size(trained, instances, tmp_path,  # noqa: F811
                                                                    monkeypatch):
    import shutil

    from hf_vitseg.inference import sliding_window

    seen = []
    original = sliding_window.sliding_window_instances

    def recording(model, processor, pixel_values, *args, **kwargs):
        seen.append(tuple(pixel_values.shape[-2:]))
        return original(model, processor, pixel_values, *args, **kwargs)

    monkeypatch.setattr(sliding_window, "sliding_window_instances", recording)

    out, _ = trained
    images, _ = instances
    folder = tmp_path / "resizing"
    shutil.copytree(out, folder)
    processor = ViTSegImageProcessor.from_pretrained(folder)
    processor.do_resize, processor.size = True, {"height": 96, "width": 96}  # 48 px images processed at 96
    processor.save_pretrained(folder)
    assert main(["predict", str(images / "000.png"), "--model", str(folder), "--task", "instance", "--threshold", "0",
                 "--sliding-window", "--crop-size", "48", "--out", str(tmp_path / "p")]) == 0
    segment_map = np.array(Image.open(tmp_path / "p" / "000_segments.png"))
    segments = json.loads((tmp_path / "p" / "000_segments.json").read_text())["segments"]
    assert seen == [(96, 96)]  # the windows ran on the resized image
    assert segment_map.shape == (48, 48) and segments
    assert set(np.unique(segment_map)) <= set(range(len(segments) + 1)) and segment_map.max() > 0


def test_one_window_detects_what_one_pass_does_with_a_real_model(trained, instances):  # noqa: F811
    from hf_vitseg import ViTSegForUniversalSegmentation

    out, _ = trained
    images, _ = instances
    model = ViTSegForUniversalSegmentation.from_pretrained(out).eval()
    processor = ViTSegImageProcessor.from_pretrained(out)
    pixel_values = processor(Image.open(images / "000.png"), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape[-2:] == (48, 48)
    with torch.no_grad():
        plain = processor.post_process_instance_segmentation(model(pixel_values=pixel_values), threshold=0,
                                                             target_sizes=[(48, 48)], return_binary_maps=True)[0]
    windowed = sliding_window_instances(model, processor, pixel_values, crop_size=48, threshold=0,
                                        return_binary_maps=True)[0]
    expected = sorted(zip([s["score"] for s in plain["segments_info"]], plain["segmentation"].bool()),
                      key=lambda pair: -pair[0])
    assert [s["score"] for s in windowed["segments_info"]] == [score for score, _ in expected]
    assert all(torch.equal(mask, other) for mask, (_, other) in zip(windowed["segmentation"], expected))


def test_predict_refuses_windows_for_panoptic_and_semantic(trained, instances, tmp_path, capsys):  # noqa: F811
    out, _ = trained
    images, _ = instances
    image = str(images / "000.png")
    for task in ("panoptic", "semantic"):
        err = _error(["predict", image, "--model", str(out), "--task", task, "--sliding-window", "--out",
                      str(tmp_path / task)], capsys)
        assert err.startswith("hf-vitseg predict: error: --sliding-window with a mask transformer")
        assert "--task instance" in err
    err = _error(["predict", image, "--model", str(out), "--task", "instance", "--sliding-window", "--crop-size", "30",
                  "--out", str(tmp_path / "c")], capsys)
    assert "--crop-size" in err and "multiple" in err
    assert not any((tmp_path / name).exists() for name in ("panoptic", "semantic", "c"))


# -- evaluation ------------------------------------------------------------------------------------------------------
def test_update_results_scores_given_segments():
    from hf_vitseg.training.universal_metrics import compute_universal_metrics, encode_mask_targets

    ids = scene(40, 56, seed=6)
    truth = [torch.from_numpy(ids == value) for value in range(1, int(ids.max()) + 1)]
    targets = encode_mask_targets([torch.stack(truth).float()], [torch.zeros(len(truth), dtype=torch.long)],
                                  torch.zeros(1, 40, 56, dtype=torch.bool), size=(40, 56))
    metric = compute_universal_metrics(PROCESSOR, "instance", 1, {0: "nucleus"})
    perfect = {"segmentation": torch.from_numpy(ids - 1).float(),
               "segments_info": [{"id": k, "label_id": 0, "score": 0.9} for k in range(int(ids.max()))]}
    metric.update_results([perfect], *targets)
    scores = metric.compute()
    assert scores["pq"] == pytest.approx(1.0) and scores["map_50"] == pytest.approx(1.0)
    metric.reset()
    metric.update_results([{"segmentation": torch.full((40, 56), -1.0), "segments_info": []}], *targets)
    assert metric.compute()["pq"] == 0.0
    with pytest.raises(ValueError, match="post-process to the targets' size"):
        metric.update_results([{"segmentation": torch.full((8, 8), -1.0), "segments_info": []}], *targets)
    semantic = compute_universal_metrics(PROCESSOR, "semantic", 1)
    with pytest.raises(ValueError, match="update_results counts instance or panoptic"):
        semantic.update_results([perfect], *targets)


def test_evaluate_finds_instances_in_windows(trained, tmp_path, capsys):  # noqa: F811
    from test_mask_training import make_instance_folder

    out, _ = trained
    images, masks = make_instance_folder(tmp_path / "big", num_images=2, size=96, seed=3)
    argv = ["evaluate", "--model", str(out), "--task", "instance", "--instance-masks", "--images", str(images),
            "--masks", str(masks), "--json"]
    assert main(argv) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main([*argv, "--sliding-window", "--crop-size", "48"]) == 0
    windows = json.loads(capsys.readouterr().out)
    assert windows.keys() == whole.keys() and windows["num_images"] == 2
    assert all(0 <= windows[key] <= 1 for key in ("pq", "sq", "rq", "map", "map_50"))
    # the windows run: 3 x 3 windows of 48 px half a window apart, against one pass
    from hf_vitseg.training import evaluation

    calls = []
    original = evaluation.torch.nn.Module.__call__

    def counting(module, *args, **kwargs):
        if type(module).__name__ == "ViTSegForUniversalSegmentation":
            calls.append(tuple(kwargs["pixel_values"].shape[-2:]))
        return original(module, *args, **kwargs)

    try:
        evaluation.torch.nn.Module.__call__ = counting
        assert main([*argv, "--sliding-window", "--crop-size", "48"]) == 0
    finally:
        evaluation.torch.nn.Module.__call__ = original
    capsys.readouterr()
    assert calls == [(48, 48)] * 18


def test_evaluate_refuses_windows_for_other_tasks(trained, instances, capsys):  # noqa: F811
    out, _ = trained
    images, masks = instances
    err = _error(["evaluate", "--model", str(out), "--task", "panoptic", "--instance-masks", "--images", str(images),
                  "--masks", str(masks), "--sliding-window", "--crop-size", "32"], capsys)
    assert "--sliding-window is for pixel heads" in err and "--task instance" in err and "--task panoptic" in err


def test_non_finite_pixels_are_refused(trained, instances):  # noqa: F811
    from hf_vitseg import ViTSegForUniversalSegmentation

    out, _ = trained
    model = ViTSegForUniversalSegmentation.from_pretrained(out).eval()
    processor = ViTSegImageProcessor.from_pretrained(out)
    pixel_values = torch.zeros(1, 3, 96, 96)
    pixel_values[0, 0, 70, 70] = float("nan")  # in one window only
    with pytest.raises(ValueError, match="pixel_values hold 1 non-finite value"):  # the model's own check
        sliding_window_instances(model, processor, pixel_values, crop_size=48)


def test_evaluate_model_needs_the_window_size(trained):  # noqa: F811
    from hf_vitseg.training import evaluate_model

    out, _ = trained
    with pytest.raises(ValueError, match="sliding_window needs crop_size"):  # before the data is read
        evaluate_model(str(out), None, task="instance", sliding_window=True)
    with pytest.raises(ValueError, match="task='panoptic' predicts whole images"):
        evaluate_model(str(out), None, task="panoptic", sliding_window=True, crop_size=32)
