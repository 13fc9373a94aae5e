"""`post_process_semantic_segmentation` prunes classes that cannot win a pixel and resamples only the others
(`_labels_of_resampled`): its label maps must equal, bit for bit, those of the full resampling (every class
resampled everywhere, then `argmax`), for both geometries (`F.interpolate` with `target_sizes` alone, `_resample_box`
through `input_boxes`, padding cut and crops included), exact ties, near ties, flat and untrained logits; the
pruning must really run (no silent fallback) on a trained model's logits and on an untrained one's; and the
emulation of `F.interpolate`'s arithmetic it relies on (`_fma`, `_interpolate_arithmetic`) must be exact."""

from __future__ import annotations

import sys
from fractions import Fraction
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
    pruned = record_pruning(monkeypatch)
    for seed, (grid, target) in enumerate([((13, 17), (181, 240)), ((9, 9), (126, 126)), ((20, 11), (7, 5)),
                                           ((1, 6), (3, 80))]):
        logits = logits_of(kind, classes, grid, seed)
        maps = PROCESSOR.post_process_semantic_segmentation(logits, target_sizes=[target])
        assert maps[0].dtype == torch.int64 and maps[0].shape == target
        assert torch.equal(maps[0], independent_reference(logits, target)), (grid, target)
        assert torch.equal(maps[0], reference_labels(PROCESSOR, logits, target_sizes=[target])[0])
    if kind in PRUNED and classes == 150:
        # the two large targets are pruned; outputs of at most 128 rows + columns (another ATen kernel) are
        # resampled in full, as are the 4 references
        assert pruned == [True, True] and len(full) == 4 + 2


@pytest.mark.parametrize(("kind", "classes"), cases([3, 150]))
def test_label_maps_equal_the_full_resampling_through_input_boxes(monkeypatch, kind, classes):
    """The pipeline's geometry: padding cut (box ending inside the canvas), crops (negative offsets), any target."""
    full = count_full_resamplings(monkeypatch)
    pruned = record_pruning(monkeypatch)
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
        assert pruned == [True] * 4 and len(full) == 4, "a full resampling ran besides the 4 of reference_labels"


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


def record_pruning(monkeypatch) -> list:
    """Each `_labels_of_rows` call: True when it returned the labels, False when it left them to the full path."""
    outcomes = []
    original = processing._labels_of_rows

    def recording(*args, **kwargs):
        labels = original(*args, **kwargs)
        outcomes.append(labels is not None)
        return labels

    monkeypatch.setattr(processing, "_labels_of_rows", recording)
    return outcomes


@pytest.mark.parametrize("with_boxes", [False, True])
@pytest.mark.parametrize(("kind", "share"), [("scene", 0.05), ("untrained", 0.2)])
def test_pruning_runs_and_computes_a_small_share_of_the_values(monkeypatch, with_boxes, kind, share):
    """At 150 classes and 518x518: a trained model's logits (a few classes own regions) and an untrained head's
    (every class near every other: about 17 candidates per band and column) are pruned, never resampled in full,
    and the candidates' values are under `share` of the 150 x 518 x 518 (the pruned path gives up beyond
    `_PRUNED_FRACTION`, set to `share` here)."""
    if kind == "scene":
        logits = scene_logits(150, (37, 37), present=12, seed=0)
    else:
        logits = torch.randn(1, 150, 37, 37, generator=torch.Generator().manual_seed(0))
    geometry = {"target_sizes": [(518, 518)]}
    if with_boxes:
        geometry.update(input_boxes=[(0, 0, 518, 518)], padded_size=(518, 518))
    monkeypatch.setattr(processing, "_PRUNED_FRACTION", share)
    full = count_full_resamplings(monkeypatch)
    pruned = record_pruning(monkeypatch)
    maps = PROCESSOR.post_process_semantic_segmentation(logits, **geometry)
    assert full == [] and pruned == [True], "the pruned path did not run"
    monkeypatch.undo()
    assert torch.equal(maps[0], reference_labels(PROCESSOR, logits, **geometry)[0])


def test_logits_where_every_class_may_win_everywhere_fall_back_to_the_full_resampling(monkeypatch):
    """Classes all within rounding of each other: pruning would compute every value and more; the full path does."""
    logits = torch.zeros(1, 150, 12, 12) + 1e-9 * torch.randn(1, 1, 12, 12)
    full = count_full_resamplings(monkeypatch)
    pruned = record_pruning(monkeypatch)
    maps = PROCESSOR.post_process_semantic_segmentation(logits, target_sizes=[(168, 168)])
    assert full == [1] and pruned == [False]
    assert torch.equal(maps[0], independent_reference(logits, (168, 168)))


def round_to_float32(value: Fraction) -> float:
    """The float32 nearest to an exact rational, ties to even (normal range)."""
    if value == 0:
        return 0.0
    exponent = abs(value).numerator.bit_length() - abs(value).denominator.bit_length()
    while abs(value) >= Fraction(2) ** (exponent + 1):
        exponent += 1
    while abs(value) < Fraction(2) ** exponent:
        exponent -= 1
    quantum = Fraction(2) ** (exponent - 23)
    return float(round(value / quantum) * quantum)  # round(): ties to even


def test_fma_rounds_once_even_where_float64_would_round_twice():
    # a * b = 2**-24 + 2**-70 (2**46 + 1 = 8384513 * 8392705): 1 + a * b lies just above the float32 midpoint
    # 1 + 2**-24; float64 drops the 2**-70 and a second rounding to float32 ties to even, down to 1.0
    a = torch.tensor([8384513 * 2.0**-23])
    b = torch.tensor([8392705 * 2.0**-47])
    c = torch.tensor([1.0])
    naive = (a.double() * b.double() + c.double()).float()
    assert naive.item() == 1.0
    assert processing._fma(a, b, c).item() == 1.0 + 2.0**-23
    generator = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2000, generator=generator) * 4 for _ in range(3))
    fused = processing._fma(a, b, c)
    for x, y, z, result in zip(a.tolist(), b.tolist(), c.tolist(), fused.tolist()):
        assert result == round_to_float32(Fraction(x) * Fraction(y) + Fraction(z))


@pytest.mark.parametrize(("in_hw", "out_hw"), [((37, 37), (518, 518)), ((13, 17), (181, 240)), ((40, 30), (100, 77)),
                                               ((9, 9), (9, 300))])
def test_the_emulated_arithmetic_is_f_interpolates_bit_for_bit(in_hw, out_hw):
    arithmetic = processing._interpolate_arithmetic(in_hw, out_hw)
    assert arithmetic is not None, "this machine's bilinear kernel was not recognised"
    fused_index, fused = arithmetic
    logits = torch.randn(1, 6, *in_hw, generator=torch.Generator().manual_seed(1)) * 10
    rows = processing._BilinearAxis.like_interpolate(in_hw[0], out_hw[0], fused_index)
    cols = processing._BilinearAxis.like_interpolate(in_hw[1], out_hw[1], fused_index)
    emulated = rows.apply(cols.apply(logits, dim=-1, fused=fused), dim=-2, fused=fused)
    assert torch.equal(emulated, F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False))


def test_near_ties_are_settled_in_the_kernels_exact_arithmetic(monkeypatch):
    """Two classes one float step apart: their plain float32 values are within rounding, so the pruned path
    recomputes those pixels with the kernel's fused arithmetic, and agrees with F.interpolate."""
    logits = logits_of("near_ties", 150, (37, 37), 0)
    calls = []
    original = processing._fma
    monkeypatch.setattr(processing, "_fma", lambda *args: calls.append(1) or original(*args))
    pruned = record_pruning(monkeypatch)
    maps = PROCESSOR.post_process_semantic_segmentation(logits, target_sizes=[(518, 518)])
    assert pruned == [True] and calls
    assert torch.equal(maps[0], independent_reference(logits, (518, 518)))


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


@pytest.mark.parametrize("spread", [1.0, 1e-3])
def test_row_candidates_keep_every_class_that_wins_somewhere_on_the_band(spread):
    """Soundness of the bound on its own: for random lines (a class's value across a band is `t0 + l (t1 - t0)`,
    l in [0, 1]), every class that is the argmax at some l on a fine grid is among the kept candidates; and the
    bound prunes (far fewer candidates than classes)."""
    generator = torch.Generator().manual_seed(3)
    t0 = torch.randn(400, 150, generator=generator) * spread
    t1 = torch.randn(400, 150, generator=generator) * spread
    unit_of, class_of, p0, p1 = processing._row_candidates(t0, t1, float(torch.maximum(t0.abs(), t1.abs()).max()))
    kept = torch.zeros(400, 150, dtype=torch.bool)
    kept[unit_of, class_of] = True
    weights = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64)[:, None, None]
    winners = (t0.double() + weights * (t1.double() - t0.double())).argmax(dim=-1)  # (grid, units)
    units = torch.arange(400).expand_as(winners)
    assert kept[units, winners].all()
    assert torch.equal(p0, t0[unit_of, class_of]) and torch.equal(p1, t1[unit_of, class_of])
    assert kept.sum(dim=1).float().mean() < 10


@pytest.mark.parametrize("with_boxes", [False, True])
def test_logits_that_require_grad(with_boxes):
    """A model's outputs outside `torch.no_grad()`: label maps as without grad, and the scores stay differentiable
    (the input_boxes resampling is autograd-friendly, as grid_sample was)."""
    logits = scene_logits(150, (12, 12), seed=4).requires_grad_()
    geometry = {"target_sizes": [(168, 150)]}
    if with_boxes:
        geometry.update(input_boxes=[(0, 0, 160, 150)], padded_size=(168, 168))
    maps = PROCESSOR.post_process_semantic_segmentation(logits, **geometry)
    assert torch.equal(maps[0], reference_labels(PROCESSOR, logits.detach(), **geometry)[0])
    scores = PROCESSOR.post_process_semantic_segmentation(logits, return_segmentation_scores=True, **geometry)
    scores[0]["segmentation_scores"].sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
