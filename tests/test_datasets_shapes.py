"""Procedural shapes: determinism, split disjointness, label/attribute/caption consistency, sizes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from datasets.shapes import (
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataModule,
    ShapesDataset,
    class_names,
    render,
)


def _stack(ds, n=None):
    return torch.stack([ds[i]["image"] for i in range(n or len(ds))])


def test_constants_and_class_names():
    assert len(SHAPES) == 5 and len(COLOURS) == 6
    names = class_names()
    assert len(names) == 30 and len(set(names)) == 30
    assert names[0] == "red circle" and names[len(COLOURS) + 2] == "blue square"
    # the named colours are well separated in RGB
    rgb = np.array([COLOUR_RGB[c] for c in COLOURS])
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(COLOURS)) * 9
    assert dist.min() > 0.6


def test_same_seed_identical_different_seed_different():
    a = _stack(ShapesDataset("train", 16, 32, seed=3))
    b = _stack(ShapesDataset("train", 16, 32, seed=3))
    c = _stack(ShapesDataset("train", 16, 32, seed=4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a - c).abs().mean() > 0.05


def test_items_reproducible_alone_and_cache_identical():
    full = ShapesDataset("val", 40, 24, seed=1, max_count=3, cache=True)
    alone = ShapesDataset("val", 40, 24, seed=1, max_count=3)
    for i in (37, 0, 11, 37):  # any order, any single item
        x, y = full[i], alone[i]
        assert torch.equal(x["image"], y["image"])
        assert {k: v for k, v in x.items() if k != "image"} == {k: v for k, v in y.items() if k != "image"}
    # the num_samples of a split does not change its items (item i depends on (seed, split, i) only)
    short = ShapesDataset("val", 12, 24, seed=1, max_count=3)
    assert torch.equal(short[11]["image"], full[11]["image"])
    array, scene = render(1, "val", 11, 24, 3)
    assert torch.equal(torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1, full[11]["image"])
    assert scene.label == full[11]["label"]


def test_parallel_cache_equals_serial():
    serial = ShapesDataset("test", 700, 16, seed=9, max_count=2, cache=True)
    parallel = ShapesDataset("test", 700, 16, seed=9, max_count=2)
    parallel.build_cache(num_workers=2)  # two 512-item chunks rendered in worker processes
    assert torch.equal(serial._images, parallel._images)
    assert serial._scenes == parallel._scenes
    assert torch.equal(parallel[650]["image"], ShapesDataset("test", 700, 16, seed=9, max_count=2)[650]["image"])


def test_splits_disjoint():
    hashes = {}
    for split in ("train", "val", "test"):
        ds = ShapesDataset(split, 300, 16, seed=0)
        hashes[split] = {hashlib.sha1(ds[i]["image"].numpy().tobytes()).hexdigest() for i in range(len(ds))}
        assert len(hashes[split]) == 300  # no duplicates inside a split either
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]


def test_labels_attributes_captions_consistent():
    ds = ShapesDataset("train", 400, 32, seed=0, max_count=3)
    seen_labels, counts, sizes, positions = set(), set(), set(), set()
    for i in range(len(ds)):
        item = ds[i]
        assert item["label"] == item["shape"] * len(COLOURS) + item["colour"]
        assert class_names()[item["label"]] == f"{COLOURS[item['colour']]} {SHAPES[item['shape']]}"
        caption = item["caption"]
        assert COLOURS[item["colour"]] in caption and SHAPES[item["shape"]] in caption
        assert SIZES[item["size"]] in caption
        assert 1 <= item["count"] <= 3
        if item["count"] == 1:
            assert caption.startswith("a ") and caption.endswith(POSITIONS[item["position"]])
        else:
            assert caption.startswith(("two ", "three ")) and caption.endswith(SHAPES[item["shape"]] + "s")
        assert 0 <= item["position"] < 9
        seen_labels.add(item["label"])
        counts.add(item["count"])
        sizes.add(item["size"])
        positions.add(item["position"])
    assert len(seen_labels) == 30 and counts == {1, 2, 3} and sizes == {0, 1, 2} and len(positions) == 9
    assert {ShapesDataset("train", 50, 16, max_count=1)[i]["count"] for i in range(50)} == {1}


def test_image_shows_the_object_colour_at_its_position():
    """The pixel at a single object's centre has the object's colour; it differs from the corners."""
    for i in range(30):
        array, scene = render(0, "test", i, 64, 1)
        x, y = scene.centres[0]
        px = array[int(y * 64), int(x * 64)].astype(np.float32) / 255
        assert np.linalg.norm(px - np.array(scene.rgb)) < 0.2, (i, px, scene.rgb)
        row, col = divmod(scene.position, 3)
        assert int(x * 3) == col and int(y * 3) == row


def test_value_range_dtype_and_sizes():
    for size in (16, 256):
        item = ShapesDataset("train", 2, size, seed=0, max_count=3)[1]
        image = item["image"]
        assert image.dtype == torch.float32 and image.shape == (3, size, size)
        assert image.min() >= -1 and image.max() <= 1
        assert image.std() > 0.05  # not a blank image
    # same scene at every resolution: attributes do not depend on image_size
    small, large = ShapesDataset("train", 5, 16, seed=2)[4], ShapesDataset("train", 5, 256, seed=2)[4]
    assert small["caption"] == large["caption"] and small["label"] == large["label"]


@pytest.mark.parametrize("bad", [8, 15, 257, 300, 32.0, "32"])
def test_bad_image_size_raises(bad):
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset("train", 4, bad)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("validation", 4)
    with pytest.raises(ValueError, match="num_samples"):
        ShapesDataset("train", 0)
    with pytest.raises(ValueError, match="max_count"):
        ShapesDataset("train", 4, max_count=4)
    with pytest.raises(IndexError):
        ShapesDataset("train", 4)[4]


def test_transform_is_applied():
    ds = ShapesDataset("train", 3, 16, transform=lambda x: x.flip(-1))
    plain = ShapesDataset("train", 3, 16)
    assert torch.equal(ds[2]["image"], plain[2]["image"].flip(-1))


def test_datamodule_loaders():
    dm = ShapesDataModule(image_size=16, batch_size=8, train_samples=24, val_samples=10, test_samples=6, seed=5)
    assert dm.num_classes == 30 and dm.class_names == class_names()  # usable before setup
    assert dm.pin_memory == torch.cuda.is_available()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 16, 16) and batch["label"].dtype == torch.long
    assert len(batch["caption"]) == 8 and isinstance(batch["caption"][0], str)
    val = list(dm.val_dataloader())
    assert sum(len(b["label"]) for b in val) == 10
    # validation order is fixed and equals the dataset
    assert torch.equal(val[0]["image"][0], ShapesDataset("val", 10, 16, seed=5)[0]["image"])
    dm.setup("test")
    assert sum(len(b["label"]) for b in dm.test_dataloader()) == 6
    assert sum(len(b["label"]) for b in dm.predict_dataloader()) == 6


def test_datamodule_workers():
    dm = ShapesDataModule(image_size=16, batch_size=16, num_workers=2, train_samples=64, val_samples=16,
                          test_samples=16, cache=False, pin_memory=False)
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    labels = torch.cat([b["label"] for b in loader])
    assert sorted(labels.tolist()) == sorted(ShapesDataset("train", 64, 16)[i]["label"] for i in range(64))


def test_object_scale_shrinks_objects_and_keeps_defaults_bit_identical():
    from datasets.shapes import _item_rng as item_rng
    from datasets.shapes import object_coverage, sample_scene

    a, sa = render(0, "train", 5, 48, 3)
    b, sb = render(0, "train", 5, 48, 3, object_scale=1.0)
    assert np.array_equal(a, b) and sa == sb
    areas = []
    for i in range(20):
        full = sample_scene(item_rng(0, "val", i), 3)
        half = sample_scene(item_rng(0, "val", i), 3, object_scale=0.5)
        assert (half.shape, half.colour, half.size, half.count) == (full.shape, full.colour, full.size, full.count)
        assert half.radius == pytest.approx(0.5 * full.radius, rel=1e-12)
        areas.append(object_coverage(half, 64).sum() / object_coverage(full, 64).sum())
    assert 0.2 < float(np.mean(areas)) < 0.3  # area ~ radius^2 (anti-aliased edges add a little)
    ds = ShapesDataset("val", 4, 32, max_count=3, object_scale=0.6)
    assert "object_scale=0.6" in repr(ds) and ds.scene(2).radius == pytest.approx(
        0.6 * ShapesDataset("val", 4, 32, max_count=3).scene(2).radius)
    for bad in (0, 1.5, True, "big"):
        with pytest.raises(ValueError, match="object_scale"):
            ShapesDataset("val", 4, 32, object_scale=bad)
