"""Tests for the data helpers: folder / Hub-style datasets, validation, augmentation, the collator."""

import warnings

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_vitseg.data.augment import AugmentationEpochCallback, SegmentationTransform, set_augmentation_epoch
from hf_vitseg.data.collator import SegmentationCollator
from hf_vitseg.data.datasets import (
    load_hf_dataset,
    load_image_folder,
    prepare_datasets,
    validate_dataset,
)
from hf_vitseg.modeling.image_processing_vitseg import ViTSegImageProcessor

PATCH = 8


def write(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def random_rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def random_mask(height, width, num_labels=3, seed=0):
    return np.random.default_rng(seed).integers(0, num_labels, (height, width), dtype=np.uint8)


def make_folder(tmp_path, names, image_ext=".jpg", mask_ext=".png", mask_suffix="", size=(20, 30)):
    images_dir, masks_dir = tmp_path / "images", tmp_path / "masks"
    images_dir.mkdir(exist_ok=True)
    masks_dir.mkdir(exist_ok=True)
    for index, name in enumerate(names):
        write(images_dir / f"{name}{image_ext}", random_rgb(*size, seed=index))
        write(masks_dir / f"{name}{mask_suffix}{mask_ext}", random_mask(*size, seed=index))
    return images_dir, masks_dir


def in_memory_dataset(images, masks):
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a) for a in images], "annotation": [Image.fromarray(m) for m in masks]},
        features=features,
    )


def processor(**kwargs):
    kwargs.setdefault("patch_size", PATCH)
    return ViTSegImageProcessor(**kwargs)


# --------------------------------------------------------------------------------------------------
# load_image_folder
# --------------------------------------------------------------------------------------------------


def test_folder_pairs_by_name_with_different_extensions(tmp_path):
    images_dir, masks_dir = make_folder(tmp_path, ["b", "a", "c"], image_ext=".jpg", mask_ext=".png")
    (images_dir / "notes.txt").write_text("not an image")  # ignored, not reported
    (masks_dir / ".hidden.png").write_bytes(b"")  # hidden: ignored
    dataset = load_image_folder(images_dir, masks_dir)
    assert dataset.column_names == ["image", "annotation"]
    assert isinstance(dataset.features["image"], datasets.Image)
    assert isinstance(dataset.features["annotation"], datasets.Image)
    raw = dataset.cast_column("image", datasets.Image(decode=False)).cast_column(
        "annotation", datasets.Image(decode=False)
    )
    pairs = [(row["image"]["path"], row["annotation"]["path"]) for row in raw]
    assert [(p.split("/")[-1], q.split("/")[-1]) for p, q in pairs] == [
        ("a.jpg", "a.png"),
        ("b.jpg", "b.png"),
        ("c.jpg", "c.png"),
    ]
    sample = dataset[0]
    assert sample["image"].size == (30, 20) and sample["image"].mode == "RGB"
    np.testing.assert_array_equal(np.array(sample["annotation"]), random_mask(20, 30, seed=1))  # "a" was written 2nd


def test_folder_unmatched_files_are_reported_not_dropped(tmp_path):
    images_dir, masks_dir = make_folder(tmp_path, ["a", "b"])
    write(images_dir / "lonely.jpg", random_rgb(20, 30))
    write(masks_dir / "orphan.png", random_mask(20, 30))
    with pytest.raises(ValueError) as error:
        load_image_folder(images_dir, masks_dir)
    message = str(error.value)
    assert "lonely.jpg" in message and "orphan.png" in message
    assert "1 image(s) without a mask and 1 mask(s) without an image" in message
    assert "on_unmatched='warn'" in message and "mask_suffix" in message

    with pytest.warns(UserWarning, match="lonely.jpg") as record:
        dataset = load_image_folder(images_dir, masks_dir, on_unmatched="warn")
    assert "orphan.png" in str(record[0].message)
    assert len(dataset) == 2


def test_folder_mask_suffix_and_a_hint_when_it_is_missing(tmp_path):
    images_dir, masks_dir = make_folder(tmp_path, ["a", "b"], mask_suffix="_mask", mask_ext=".tif")
    with pytest.raises(ValueError, match="mask_suffix='_mask'"):
        load_image_folder(images_dir, masks_dir)
    dataset = load_image_folder(images_dir, masks_dir, mask_suffix="_mask")
    assert len(dataset) == 2
    np.testing.assert_array_equal(np.array(dataset[1]["annotation"]), random_mask(20, 30, seed=1))


def test_folder_shared_between_images_and_masks(tmp_path):
    folder = tmp_path / "data"
    for index, name in enumerate(["x", "y"]):
        write(folder / f"{name}.png", random_rgb(16, 16, seed=index))
        write(folder / f"{name}_label.png", random_mask(16, 16, seed=index))
    with pytest.raises(ValueError, match="pass mask_suffix"):
        load_image_folder(folder, folder)
    dataset = load_image_folder(folder, folder, mask_suffix="_label")
    assert len(dataset) == 2
    assert dataset[0]["image"].mode == "RGB" and dataset[0]["annotation"].mode == "L"


def test_folder_glob_selects_and_recursive_names_include_subfolders(tmp_path):
    images_dir, masks_dir = tmp_path / "images", tmp_path / "masks"
    for split in ("train", "val"):
        for name in ("a", "b"):
            write(images_dir / split / f"{name}.png", random_rgb(8, 8))
            write(masks_dir / split / f"{name}.png", random_mask(8, 8))
    # Masks of images that the glob leaves out are not reported.
    train = load_image_folder(images_dir, masks_dir, image_glob="train/*.png")
    assert len(train) == 2
    everything = load_image_folder(images_dir, masks_dir, image_glob="**/*.png")
    assert len(everything) == 4


def test_folder_duplicate_names_and_empty_results_are_errors(tmp_path):
    images_dir, masks_dir = make_folder(tmp_path, ["a"])
    write(images_dir / "a.png", random_rgb(20, 30))
    with pytest.raises(ValueError, match="a.jpg and a.png"):
        load_image_folder(images_dir, masks_dir)
    empty_images, empty_masks = tmp_path / "e1", tmp_path / "e2"
    empty_images.mkdir()
    empty_masks.mkdir()
    with pytest.raises(ValueError, match="No image/mask pairs"):
        load_image_folder(empty_images, empty_masks)
    with pytest.raises(FileNotFoundError, match="not an existing folder"):
        load_image_folder(tmp_path / "missing", empty_masks)
    with pytest.raises(ValueError, match="on_unmatched"):
        load_image_folder(empty_images, empty_masks, on_unmatched="ignore")


# --------------------------------------------------------------------------------------------------
# load_hf_dataset
# --------------------------------------------------------------------------------------------------


def test_hf_dataset_renames_columns_and_picks_splits(tmp_path):
    base = in_memory_dataset([random_rgb(8, 8)], [random_mask(8, 8)])
    renamed = base.rename_columns({"image": "pixel_values", "annotation": "label"}).add_column("scene", ["x"])
    dataset = load_hf_dataset(renamed, image_column="pixel_values", annotation_column="label")
    assert set(dataset.column_names) == {"image", "annotation", "scene"}
    np.testing.assert_array_equal(np.array(dataset[0]["annotation"]), random_mask(8, 8))

    with pytest.raises(ValueError, match=r"annotation_column='annotation'.*\['pixel_values', 'label', 'scene'\]"):
        load_hf_dataset(renamed, image_column="pixel_values")

    splits = datasets.DatasetDict({"train": base, "validation": base.select([])})
    assert len(load_hf_dataset(splits, split="train")) == 1
    with pytest.raises(ValueError, match=r"splits \['train', 'validation'\]"):
        load_hf_dataset(splits)
    with pytest.raises(ValueError, match="No split 'test'"):
        load_hf_dataset(splits, split="test")
    with pytest.raises(ValueError, match="empty"):
        load_hf_dataset(splits, split="validation")

    # A save_to_disk folder, with file paths as strings: cast to datasets.Image on the way.
    image_path = write(tmp_path / "i.png", random_rgb(8, 8))
    mask_path = write(tmp_path / "m.png", random_mask(8, 8))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"img": [str(image_path)], "seg": [str(mask_path)]})}
    ).save_to_disk(tmp_path / "saved")
    loaded = load_hf_dataset(tmp_path / "saved", image_column="img", annotation_column="seg")
    assert isinstance(loaded.features["annotation"], datasets.Image)
    assert loaded[0]["image"].size == (8, 8)


# --------------------------------------------------------------------------------------------------
# validate_dataset: bad input caught before training
# --------------------------------------------------------------------------------------------------


def test_validate_accepts_good_data_and_ignore_index(tmp_path):
    mask = random_mask(12, 10, num_labels=3)
    mask[0, :] = 255
    dataset = in_memory_dataset([random_rgb(12, 10)] * 2, [mask] * 2)
    assert validate_dataset(dataset, num_labels=3, ignore_index=255) == 2
    assert validate_dataset(dataset, num_labels=3, ignore_index=255, max_samples=1) == 1


def test_validate_names_the_first_out_of_range_sample():
    good, bad = random_mask(8, 8, num_labels=3), random_mask(8, 8, num_labels=3)
    bad[2, 3], bad[4, 4] = 7, 9
    dataset = in_memory_dataset([random_rgb(8, 8)] * 3, [good, bad, bad])
    with pytest.raises(ValueError, match=r"Sample 1: the mask holds value\(s\) 7, 9, outside \[0, num_labels=3\)"):
        validate_dataset(dataset, num_labels=3, ignore_index=255)
    # ADE20K-style masks (0 = unlabelled, classes 1..N) pass once reduced, and the error says so otherwise.
    ade = random_mask(8, 8, num_labels=4)  # 0..3 -> 3 classes after reduction
    dataset = in_memory_dataset([random_rgb(8, 8)], [ade])
    with pytest.raises(ValueError, match="do_reduce_labels=True"):
        validate_dataset(dataset, num_labels=3, ignore_index=255)
    assert validate_dataset(dataset, num_labels=3, ignore_index=255, reduce_labels=True) == 1


def test_validate_rejects_colour_coded_masks_and_bypasses_transforms():
    masks = [random_mask(8, 8), np.dstack([random_mask(8, 8)] * 3)]
    dataset = in_memory_dataset([random_rgb(8, 8)] * 2, masks)
    with pytest.raises(ValueError, match=r"Sample 1: Segmentation maps must have one channel.*mode 'RGB'"):
        validate_dataset(dataset, num_labels=3, ignore_index=255)
    prepared, _ = prepare_datasets(dataset.select([0]), None, processor(), crop_size=16)
    assert validate_dataset(prepared, num_labels=3, ignore_index=255) == 1


def test_validate_mismatched_sizes_names_index_and_both_sizes(tmp_path):
    images_dir, masks_dir = make_folder(tmp_path, ["a", "b"])
    write(masks_dir / "b.png", random_mask(21, 30))
    dataset = load_image_folder(images_dir, masks_dir)
    with pytest.raises(
        ValueError,
        match=r"Sample 1 \(b.jpg / b.png\): the image has size \(H, W\) = \(20, 30\) but its annotation has size "
        r"\(21, 30\)",
    ):
        validate_dataset(dataset, num_labels=3, ignore_index=255)


def test_empty_dataset_is_an_error():
    empty = in_memory_dataset([random_rgb(8, 8)], [random_mask(8, 8)]).select([])
    with pytest.raises(ValueError, match="dataset is empty"):
        validate_dataset(empty, num_labels=3, ignore_index=255)
    with pytest.raises(ValueError, match="train dataset is empty"):
        prepare_datasets(empty, None, processor(), crop_size=16)
    with pytest.raises(ValueError, match="no \\['annotation'\\] column"):
        validate_dataset(empty.remove_columns("annotation"), num_labels=3, ignore_index=255)


# --------------------------------------------------------------------------------------------------
# SegmentationTransform
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16", "P", "RGB"])
def test_eval_transform_converts_any_mode_like_the_processor(tmp_path, mode):
    height, width = 13, 19
    rgb = random_rgb(height, width)
    if mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)  # 16-bit grey, mode "I;16"
    elif mode == "RGBA":
        image = Image.fromarray(np.dstack([rgb, np.full((height, width), 7, np.uint8)]))  # mode "RGBA"
    else:
        image = Image.fromarray(rgb).convert(mode)
    image.save(tmp_path / "i.png")
    write(tmp_path / "m.png", random_mask(height, width))
    reopened, mask = Image.open(tmp_path / "i.png"), Image.open(tmp_path / "m.png")
    assert reopened.mode == {"I;16": "I;16", "RGBA": "RGBA"}.get(mode, image.mode)
    proc = processor(do_resize=True, size={"shortest_edge": 24})
    out = SegmentationTransform(proc, train=False)({"image": [reopened], "annotation": [mask]})
    expected = proc(images=[reopened], segmentation_maps=[mask])
    assert out["pixel_values"][0].shape == (3, 24, 40)  # 24 x 35 resized, padded to multiples of 8
    torch.testing.assert_close(out["pixel_values"][0], expected["pixel_values"][0])
    torch.testing.assert_close(out["labels"][0], expected["labels"][0])
    if mode in ("L", "I;16"):  # grey replicated to three equal channels (inside the image, not the padding)
        grey = raw_values(out["pixel_values"][0][:, :24, :35])
        torch.testing.assert_close(grey[0], grey[1])
        torch.testing.assert_close(grey[0], grey[2])


def test_eval_transform_reduces_labels_and_works_without_annotations():
    mask = np.array([[0, 1, 2, 255]], dtype=np.uint8).repeat(4, axis=0)
    proc = processor(do_reduce_labels=True)
    out = SegmentationTransform(proc, train=False)({"image": [random_rgb(4, 4)], "annotation": [mask]})
    assert out["labels"][0][0, :4].tolist() == [255, 0, 1, 255]
    assert out["labels"][0].shape == (8, 8) and torch.all(out["labels"][0][4:] == 255)
    unlabeled = SegmentationTransform(proc, train=False)({"image": [random_rgb(4, 4)]})
    assert set(unlabeled) == {"pixel_values"}


def coded_sample(height=40, width=56, num_labels=4, seed=0):
    """Vertical and horizontal bands of labels; the image's red channel encodes the label, green the column."""
    rng = np.random.default_rng(seed)
    column_class = np.repeat(rng.integers(0, num_labels, width // 8), 8)[:width]
    row_offset = np.repeat(rng.integers(0, num_labels, height // 8), 8)[:height]
    labels = ((column_class[None, :] + row_offset[:, None]) % num_labels).astype(np.uint8)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = labels * 60 + 20
    image[..., 1] = np.linspace(0, 255, width).round().astype(np.uint8)[None, :]
    image[..., 2] = 128
    return image, labels


def raw_values(pixel_values):
    """Undo the processor's normalisation: (3, H, W) -> 0..255."""
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (pixel_values * std + mean) * 255


def test_train_augmentation_invariants_and_alignment():
    image, labels = coded_sample()
    crop = (32, 48)
    directions = set()
    transform = SegmentationTransform(
        processor(), train=True, crop_size=crop, scale_range=(0.5, 2.0), photometric=False
    )
    for trial in range(24):
        torch.manual_seed(trial)
        out = transform({"image": [Image.fromarray(image)], "annotation": [Image.fromarray(labels)]})
        pixels, target = raw_values(out["pixel_values"][0]), out["labels"][0]
        assert pixels.shape == (3, *crop) and target.shape == crop and target.dtype == torch.int64
        assert set(target.unique().tolist()) <= {0, 1, 2, 3, 255}
        valid = target != 255
        # Padding: ignore_index in labels, 0 (the mean colour) in the normalised image.
        assert torch.all(out["pixel_values"][0][:, ~valid] == 0)
        # Alignment: away from label edges (bilinear blends across them), red decodes to the label.
        padded = torch.nn.functional.pad(target[None, None].float(), (1, 1, 1, 1), value=-1)[0, 0]
        uniform = torch.ones_like(valid)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                uniform &= padded[1 + dy : 1 + dy + crop[0], 1 + dx : 1 + dx + crop[1]] == target.float()
        decoded = ((pixels[0] - 20) / 60).round().long()
        interior = uniform & valid
        assert interior.sum() > 50
        assert torch.equal(decoded[interior], target[interior])
        # Green increases left to right unless the sample was flipped (image and labels flipped together).
        row = pixels[1][0][valid[0]]  # the first row always holds image pixels: padding goes bottom / right
        directions.add(bool(row[-1] > row[0]))
    assert directions == {True, False}  # both flipped and unflipped samples were seen and stayed aligned


def test_photometric_jitter_changes_the_image_only():
    image, labels = coded_sample()
    sample = {"image": [Image.fromarray(image)], "annotation": [Image.fromarray(labels)]}
    common = dict(train=True, crop_size=(32, 48), seed=3)
    plain = SegmentationTransform(processor(), photometric=False, **common)(sample)
    jittered = SegmentationTransform(processor(), photometric=True, **common)(sample)
    assert torch.equal(plain["labels"][0], jittered["labels"][0])
    assert not torch.allclose(plain["pixel_values"][0], jittered["pixel_values"][0])
    valid = plain["labels"][0] != 255
    values = raw_values(jittered["pixel_values"][0])[:, valid]
    assert values.min() >= -1e-3 and values.max() <= 255 + 1e-3


def test_crop_smaller_image_is_padded_with_ignore_index():
    out = SegmentationTransform(processor(), train=True, crop_size=64, scale_range=(1.0, 1.0), seed=0)(
        {"image": [random_rgb(20, 30)], "annotation": [random_mask(20, 30)]}
    )
    labels = out["labels"][0]
    assert labels.shape == (64, 64)
    assert torch.all(labels[20:] == 255) and torch.all(labels[:, 30:] == 255)
    assert torch.all(labels[:20, :30] != 255)


def test_seeded_augmentation_is_a_function_of_seed_epoch_and_sample():
    samples = [coded_sample(seed=seed) for seed in range(3)]
    batch = {"image": [Image.fromarray(i) for i, _ in samples], "annotation": [Image.fromarray(m) for _, m in samples]}
    reversed_batch = {key: values[::-1] for key, values in batch.items()}

    def run(the_batch, seed=7, epoch=0):
        transform = SegmentationTransform(processor(), train=True, crop_size=(24, 32), seed=seed)
        transform.set_epoch(epoch)
        torch.manual_seed(epoch * 100 + seed)  # the global generator must not matter
        return transform(the_batch)

    first, again = run(batch), run(batch)
    for key in ("pixel_values", "labels"):
        assert all(torch.equal(a, b) for a, b in zip(first[key], again[key]))
        # Order and batch composition (worker, process) do not matter: the sample's pixels key its draws.
        assert all(torch.equal(a, b) for a, b in zip(first[key], run(reversed_batch)[key][::-1]))
    assert not all(torch.equal(a, b) for a, b in zip(first["pixel_values"], run(batch, epoch=1)["pixel_values"]))
    assert not all(torch.equal(a, b) for a, b in zip(first["pixel_values"], run(batch, seed=8)["pixel_values"]))


def test_unseeded_augmentation_follows_torch_global_seed():
    image, labels = coded_sample()
    sample = {"image": [image], "annotation": [labels]}
    transform = SegmentationTransform(processor(), train=True, crop_size=(24, 32))
    torch.manual_seed(0)
    first = transform(sample)["pixel_values"][0]
    torch.manual_seed(0)
    assert torch.equal(first, transform(sample)["pixel_values"][0])


def test_seeded_without_epoch_warns_on_repeat():
    image, labels = coded_sample()
    transform = SegmentationTransform(processor(), train=True, crop_size=(24, 32), seed=0)
    transform({"image": [image], "annotation": [labels]})
    with pytest.warns(UserWarning, match="set_epoch"):
        transform({"image": [image], "annotation": [labels]})
    transform.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transform({"image": [image], "annotation": [labels]})


def test_epoch_reaches_persistent_dataloader_workers_and_callback_sets_it():
    images, masks = zip(*(coded_sample(seed=seed) for seed in range(2)))
    train, _ = prepare_datasets(in_memory_dataset(images, masks), None, processor(), crop_size=(24, 32), seed=5)
    loader = torch.utils.data.DataLoader(
        train, batch_size=2, num_workers=1, persistent_workers=True, collate_fn=SegmentationCollator(PATCH)
    )
    callback = AugmentationEpochCallback(train)
    per_epoch = []
    for epoch in range(2):
        state = type("State", (), {"epoch": None if epoch == 0 else float(epoch)})()
        callback.on_epoch_begin(None, state, None)
        per_epoch.append(next(iter(loader))["pixel_values"])
    reference = SegmentationTransform(processor(), train=True, crop_size=(24, 32), seed=5)
    for epoch in range(2):
        set_augmentation_epoch(reference, epoch)
        expected = reference(
            {"image": [Image.fromarray(i) for i in images], "annotation": [Image.fromarray(m) for m in masks]}
        )
        assert torch.equal(per_epoch[epoch], torch.stack(expected["pixel_values"]))
    assert not torch.equal(per_epoch[0], per_epoch[1])
    # A resumed run: state.epoch restored mid-epoch (2.5) selects epoch 2.
    callback.on_epoch_begin(None, type("State", (), {"epoch": 2.5})(), None)
    assert callback.transforms[0].epoch == 2


def test_transform_bad_input_errors():
    with pytest.raises(
        ValueError, match=r"crop_size \(30, 32\) is not a multiple of the processor's patch_size 8.*\(32, 32\)"
    ):
        SegmentationTransform(processor(), train=True, crop_size=(30, 32))
    with pytest.raises(ValueError, match="patch_size 8"):
        prepare_datasets(in_memory_dataset([random_rgb(8, 8)], [random_mask(8, 8)]), None, processor(), crop_size=12)
    with pytest.raises(ValueError, match="scale_range"):
        SegmentationTransform(processor(), train=True, scale_range=(2.0, 1.0))
    transform = SegmentationTransform(processor(), train=True, crop_size=16)
    with pytest.raises(
        ValueError, match=r"position 1 of this batch.*\(H, W\) = \(10, 12\) but its annotation has size \(10, 11\)"
    ):
        transform({"image": [random_rgb(10, 12)] * 2, "annotation": [random_mask(10, 12), random_mask(10, 11)]})
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        transform({"pixel_values": [random_rgb(10, 12)]})
    with pytest.raises(TypeError, match="ViTSegImageProcessor"):
        SegmentationTransform(object(), train=True)


def test_prepare_datasets_sets_lazy_transforms_on_copies():
    dataset = in_memory_dataset([random_rgb(20, 30), random_rgb(17, 9)], [random_mask(20, 30), random_mask(17, 9)])
    train, evaluation = prepare_datasets(dataset, dataset, processor(), crop_size=16, seed=0)
    assert dataset.format["type"] is None  # the input is left alone
    assert train[0]["pixel_values"].shape == (3, 16, 16)
    assert [tuple(evaluation[i]["labels"].shape) for i in range(2)] == [(24, 32), (24, 16)]
    batch = SegmentationCollator(pad_multiple=PATCH, ignore_index=255)([evaluation[0], evaluation[1]])
    assert batch["pixel_values"].shape == (2, 3, 24, 32) and batch["labels"].shape == (2, 24, 32)


# --------------------------------------------------------------------------------------------------
# SegmentationCollator
# --------------------------------------------------------------------------------------------------


def test_collator_pads_to_batch_max_rounded_up():
    features = [
        {"pixel_values": torch.ones(3, 10, 20), "labels": torch.zeros(10, 20, dtype=torch.int64)},
        {"pixel_values": np.full((3, 15, 7), 2.0, np.float32), "labels": np.ones((15, 7), np.int64)},
    ]
    batch = SegmentationCollator(pad_multiple=14, ignore_index=99)(features)
    assert batch["pixel_values"].shape == (2, 3, 28, 28) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (2, 28, 28) and batch["labels"].dtype == torch.int64
    assert torch.all(batch["pixel_values"][0, :, :10, :20] == 1) and batch["pixel_values"][0].sum() == 3 * 10 * 20
    assert torch.all(batch["pixel_values"][1, :, :15, :7] == 2) and batch["pixel_values"][1].sum() == 2 * 3 * 15 * 7
    assert torch.all(batch["labels"][0, :10, :20] == 0) and (batch["labels"][0] == 99).sum() == 28 * 28 - 200
    assert torch.all(batch["labels"][1, :15, :7] == 1) and (batch["labels"][1] == 99).sum() == 28 * 28 - 105

    unlabeled = SegmentationCollator(pad_multiple=16)([{"pixel_values": torch.ones(3, 16, 17)}])
    assert set(unlabeled) == {"pixel_values"} and unlabeled["pixel_values"].shape == (1, 3, 16, 32)

    with pytest.raises(ValueError, match=r"Sample 0: labels have shape \(9, 20\)"):
        SegmentationCollator()([{"pixel_values": torch.ones(3, 10, 20), "labels": torch.zeros(9, 20)}])
    with pytest.raises(ValueError, match=r"Samples \[1\]"):
        SegmentationCollator()([features[0], {"pixel_values": torch.ones(3, 4, 4)}])


# --------------------------------------------------------------------------------------------------
# With transformers.Trainer: a resumed run equals an uninterrupted one
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_resumed_mid_epoch_matches_uninterrupted_run(tmp_path):
    from conftest import tiny_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    rng = np.random.default_rng(0)
    dataset = in_memory_dataset(
        [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(4)],
        [rng.integers(0, 3, (40, 48), dtype=np.uint8) for _ in range(4)],
    )

    class StopAt(TrainerCallback):  # stands in for a kill after the step-3 checkpoint, in the middle of epoch 1
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 4

    def train(output_dir, resume_from=None, interrupt=False):
        # SAM's ViT: its checkpoint keys round-trip through Trainer's resume as they are.
        model = tiny_model("linear", "sam")
        train_dataset, _ = prepare_datasets(dataset, None, processor(), crop_size=(32, 32), seed=0)
        args = TrainingArguments(
            str(output_dir),
            per_device_train_batch_size=2,
            num_train_epochs=3,
            save_strategy="steps",
            save_steps=3,
            learning_rate=1e-2,
            remove_unused_columns=False,
            report_to=[],
            seed=1,
            use_cpu=True,
            disable_tqdm=True,
        )
        callbacks = [AugmentationEpochCallback(train_dataset)] + ([StopAt()] if interrupt else [])
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=SegmentationCollator(PATCH, 255),
            callbacks=callbacks,
        )
        trainer.train(resume_from_checkpoint=resume_from)
        return model.state_dict()

    uninterrupted = train(tmp_path / "full")
    train(tmp_path / "cut", interrupt=True)
    resumed = train(tmp_path / "cut", resume_from=str(tmp_path / "cut" / "checkpoint-3"))
    for name, value in uninterrupted.items():
        assert torch.equal(value, resumed[name]), name
