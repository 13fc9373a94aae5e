"""`post_process_semantic_segmentation` prunes classes that cannot win a pixel and resamples only the others
(`_labels_of_resampled`): its label maps must equal, bit for bit, those of the previous implementation (every class
resampled everywhere, then `argmax`), for both geometries (`F.interpolate` with `target_sizes` alone, `grid_sample`
through `input_boxes`, padding cut and crops included), exact ties, near ties and flat logits; and the pruning
must really run (no silent fallback) on logits a trained model gives."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from hf_vitseg.modeling import ViTSegImageProcessor
from hf_vitseg.modeling import image_processing_vitseg as processing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.postprocess import reference_labels, scene_logits  # noqa: E402

PROCESSOR = ViTSegImageProcessor(patch_size=14)


def independent_reference(logits, target, box=None, padded=None):
    """The old implementation written out: resample all classes, then argmax."""
    if box is None:
        return F.interpolate(logits, size=target, mode="bilinear", align_corners=False)[0].argmax(0)
    return processing._resample_box(logits, box, padded, target)[0].argmax(0)


def logits_of(kind: str, classes: int, grid: tuple[int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "scene":  # a trained model's: a few classes own regions
        return scene_logits(classes, grid, present=min(classes, 6), seed=seed)
    if kind == "normal":  # every class near every other: little to prune
        return torch.randn(1, classes, *grid, generator=generator)
    if kind == "integer_ties":  # exact ties everywhere, resampled values tie too
        return torch.randint(0, 3, (1, classes, *grid), generator=generator).float()
    if kind == "duplicate_classes":  # class 4 is class 1's copy: the first of equals wins
        logits = scene_logits(classes, grid, present=min(classes, 6), seed=seed)
        logits[:, 4] = logits[:, 1]
        logits[:, 1] += 10.0  # make the copied class win somewhere
        logits[:, 4] = logits[:, 1]
        return logits
    if kind == "near_ties":  # two classes one float step apart: within rounding of the resampling
        logits = scene_logits(classes, grid, present=min(classes, 6), seed=seed)
        logits[:, 2] = logits[:, 0] + 20.0
        logits[:, 3] = torch.nextafter(logits[:, 2], torch.full_like(logits[:, 2], float("inf")))
        logits[:, 3, ::2] = torch.nextafter(logits[:, 2, ::2], torch.full_like(logits[:, 2, ::2], -float("inf")))
        return logits
    if kind == "constant":
        return torch.zeros(1, classes, *grid)
    raise ValueError(kind)


KINDS = ["scene", "normal", "integer_ties", "duplicate_classes", "near_ties", "constant"]
PRUNED = ("scene", "duplicate_classes", "near_ties")  # at 150 classes these must take the pruned path


def cases(class_counts):
    # duplicate_classes and near_ties use classes 0 to 4
    return [(kind, n) for kind in KINDS for n in class_counts if n >= 5 or kind not in ("duplicate_classes",
                                                                                       "near_ties")]


@pytest.mark.parametrize(("kind", "classes"), cases([2, 5, 150]))
def test_label_maps_equal_the_full_resampling_with_target_sizes(monkeypatch, kind, classes):
    full = count_full_resamplings(monkeypatch)
    for seed, (grid, target) in enumerate([((13, 17), (181, 240)), ((9, 9), (126, 126)), ((20, 11), (7, 5)),
                                           ((1, 6), (3, 80))]):
        logits = logits_of(kind, classes, grid, seed)
        maps = PROCESSOR.post_process_semantic_segmentation(logits, target_sizes=[target])
        assert maps[0].dtype == torch.int64 and maps[0].shape == target
        assert torch.equal(maps[0], independent_reference(logits, target)), (grid, target)
        assert torch.equal(maps[0], reference_labels(PROCESSOR, logits, target_sizes=[target])[0])
    if kind in PRUNED and classes == 150:
        assert len(full) == 4, "a full resampling ran besides the 4 of reference_labels"


@pytest.mark.parametrize(("kind", "classes"), cases([3, 150]))
def test_label_maps_equal_the_full_resampling_through_input_boxes(monkeypatch, kind, classes):
    """The pipeline's geometry: padding cut (box ending inside the canvas), crops (negative offsets), any target."""
    full = count_full_resamplings(monkeypatch)
    geometries = [((13, 17), (182, 238), (0, 0, 170, 230), (170, 230)),  # padding cut, native size
             ((13, 17), (182, 238), (0, 0, 170, 230), (340, 461)),  # padding cut, 2x
             ((10, 10), (140, 140), (-12, -3, 170, 150), (85, 75)),  # centre crop, downsampled
             ((4, 30), (56, 420), (3, 10, 40, 400), (123, 77))]
    for seed, (grid, padded, box, target) in enumerate(geometries):
        logits = logits_of(kind, classes, grid, seed)
        geometry = {"target_sizes": [target], "input_boxes": [box], "padded_size": padded}
        maps = PROCESSOR.post_process_semantic_segmentation(logits, **geometry)
        assert torch.equal(maps[0], independent_reference(logits, target, box, padded)), (grid, box, target)
        assert torch.equal(maps[0], reference_labels(PROCESSOR, logits, **geometry)[0])
    if kind in PRUNED and classes == 150:
        assert len(full) == 4, "a full resampling ran besides the 4 of reference_labels"


def test_a_batch_with_one_geometry_per_image():
    logits = torch.cat([scene_logits(150, (12, 12), seed=1), torch.randn(1, 150, 12, 12)])
    geometry = {"target_sizes": [(168, 100), (90, 168)], "input_boxes": [(0, 0, 168, 100), (0, 0, 90, 168)],
                "padded_size": (168, 168)}
    maps = PROCESSOR.post_process_semantic_segmentation(logits, **geometry)
    assert all(torch.equal(a, b) for a, b in zip(maps, reference_labels(PROCESSOR, logits, **geometry)))


def count_full_resamplings(monkeypatch) -> list:
    calls = []
    original = processing._to_output_geometry

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(processing, "_to_output_geometry", counting)
    return calls


@pytest.mark.parametrize("with_boxes", [False, True])
def test_pruning_runs_on_a_trained_models_logits(monkeypatch, with_boxes):
    """Scene-like logits (a few classes own regions) at 150 classes: no full resampling, only the classes on
    region boundaries are resampled, and far fewer values than 150 planes are computed."""
    logits = scene_logits(150, (37, 37), present=12, seed=0)
    geometry = {"target_sizes": [(518, 518)]}
    if with_boxes:
        geometry.update(input_boxes=[(0, 0, 518, 518)], padded_size=(518, 518))
    full = count_full_resamplings(monkeypatch)
    resampled = []
    original_interpolate, original_grid_sample = F.interpolate, F.grid_sample

    def interpolate(logits, *args, **kwargs):
        resampled.append(logits.shape[1] * 518 * 518)
        return original_interpolate(logits, *args, **kwargs)

    def grid_sample(logits, grid, *args, **kwargs):
        resampled.append(logits.shape[1] * grid.shape[1] * grid.shape[2])
        return original_grid_sample(logits, grid, *args, **kwargs)

    monkeypatch.setattr(processing.F, "interpolate", interpolate)
    monkeypatch.setattr(processing.F, "grid_sample", grid_sample)
    maps = PROCESSOR.post_process_semantic_segmentation(logits, **geometry)
    assert full == [] and resampled, "the pruned path did not run"
    assert sum(resampled) < 0.2 * 150 * 518 * 518
    monkeypatch.undo()
    assert torch.equal(maps[0], reference_labels(PROCESSOR, logits, **geometry)[0])


def test_flat_logits_fall_back_to_the_full_resampling(monkeypatch):
    """An untrained head: every class may win everywhere; pruning would cost more than it saves."""
    logits = 1e-3 * torch.randn(1, 150, 12, 12)
    full = count_full_resamplings(monkeypatch)
    maps = PROCESSOR.post_process_semantic_segmentation(logits, target_sizes=[(168, 168)])
    assert full == [1]
    assert torch.equal(maps[0], independent_reference(logits, (168, 168)))


@pytest.mark.parametrize("bad", ["nan", "inf", "channels_last"])
def test_logits_the_bounds_do_not_cover_take_the_full_resampling(monkeypatch, bad):
    """NaN / infinite logits (argmax's NaN rule, inf * 0 in the weights) and non-contiguous logits (another
    kernel) are not pruned: the full resampling gives the old answer whatever it is."""
    logits = scene_logits(150, (12, 12), seed=3)
    if bad == "nan":
        logits[0, 5, 3, 3] = float("nan")
    elif bad == "inf":
        logits[0, 7, 2, 2] = float("inf")
    else:
        logits = logits.contiguous(memory_format=torch.channels_last)
    full = count_full_resamplings(monkeypatch)
    maps = PROCESSOR.post_process_semantic_segmentation(logits, target_sizes=[(168, 168)])
    assert full == [1]
    monkeypatch.undo()
    assert torch.equal(maps[0], reference_labels(PROCESSOR, logits, target_sizes=[(168, 168)])[0])


def test_scores_requested_are_the_full_resampling():
    logits = scene_logits(20, (9, 9), seed=2)
    out = PROCESSOR.post_process_semantic_segmentation(logits, target_sizes=[(126, 126)],
                                                       return_segmentation_scores=True)[0]
    expected = F.interpolate(logits, size=(126, 126), mode="bilinear", align_corners=False)[0]
    assert torch.equal(out["segmentation_scores"], expected)
    assert torch.equal(out["segmentation"], expected.argmax(0))
