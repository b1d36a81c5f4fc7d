"""Image folders and captions files: conversion, bad-file skipping, worker safety, errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.image_folder import (
    CaptionFolderDataset,
    ImageFolderDataModule,
    ImageFolderDataset,
    SkippedImagesWarning,
    read_captions,
)
from datasets.transforms import ImageTransform, tensor_to_uint8, to_rgb

RED = (200, 40, 30)
BAD = {"zero.jpg", "trunc.png", "garbage.jpg", "tiny.png"}  # caught when the folder is indexed
TRUNCATED_JPEG = "trunc.jpg"  # header verifies; only decoding finds the truncation


def _noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _truncate(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


def _make_tree(root: Path) -> Path:
    cat, dog = root / "cat", root / "dog"
    cat.mkdir(parents=True)
    dog.mkdir()
    Image.fromarray(_noise(48, 64)).save(cat / "rgb.jpg", quality=90)
    Image.fromarray(_noise(40, 50, 1)).save(cat / "photo.webp")
    Image.fromarray(_noise(40, 40, 2)[..., 0], mode="L").save(cat / "gray.png")
    Image.fromarray(_noise(64, 64, 3)).save(root / "big.jpg", quality=90)
    _truncate(root / "big.jpg", cat / TRUNCATED_JPEG)
    (root / "big.jpg").unlink()
    (cat / "notes.txt").write_text("not an image")
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[:, 20:] = (*RED, 255)  # right half opaque red, left half fully transparent black
    Image.fromarray(rgba, mode="RGBA").save(dog / "rgba.png")
    Image.new("RGB", (40, 40), RED).convert("CMYK").save(dog / "cmyk.jpg", quality=95)
    Image.new("RGB", (40, 40), RED).convert("P", palette=Image.Palette.ADAPTIVE).save(dog / "palette.png")
    (dog / "zero.jpg").write_bytes(b"")
    Image.fromarray(_noise(64, 64, 4)).save(root / "big.png")
    _truncate(root / "big.png", dog / "trunc.png")
    (root / "big.png").unlink()
    (dog / "garbage.jpg").write_bytes(np.random.default_rng(5).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    Image.fromarray(_noise(4, 4, 6)).save(dog / "tiny.png")
    return root


@pytest.fixture
def tree(tmp_path):
    return _make_tree(tmp_path / "images")


def _index(ds, name):
    return next(i for i, r in enumerate(ds.records) if Path(r.path).name == name)


def test_index_skips_bad_files_with_one_warning(tree):
    with pytest.warns(SkippedImagesWarning) as record:
        ds = ImageFolderDataset(tree, image_size=16)
    ours = [w for w in record if issubclass(w.category, SkippedImagesWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "skipped 4 of 11" in message
    for name in BAD:
        assert name in message
    assert {Path(p).name for p, _ in ds.skipped} == BAD
    reasons = {Path(p).name: why for p, why in ds.skipped}
    assert reasons["zero.jpg"] == "zero-byte file" and reasons["tiny.png"].startswith("too small")
    assert len(ds) == 7 and ds.classes == ("cat", "dog") and ds.num_classes == 2
    assert {Path(r.path).name for r in ds.records if r.label == 1} == {"rgba.png", "cmyk.jpg", "palette.png"}


def test_full_check_catches_truncated_jpeg_at_index_time(tree):
    with pytest.warns(SkippedImagesWarning, match=TRUNCATED_JPEG):
        ds = ImageFolderDataset(tree, image_size=16, check="full")
    assert len(ds) == 6 and len(ds.skipped) == 5


def test_min_side_is_configurable(tree):
    with pytest.warns(SkippedImagesWarning):
        ds = ImageFolderDataset(tree, image_size=16, min_side=45, check="full")
    # 40-pixel images are now too small too; only rgb.jpg (48x64) is left
    assert [Path(r.path).name for r in ds.records] == ["rgb.jpg"]


def test_modes_are_converted_to_rgb(tree):
    with pytest.warns(SkippedImagesWarning):
        ds = ImageFolderDataset(tree, image_size=40, check="full")
    items = {Path(ds[i]["path"]).name: ds[i] for i in range(len(ds))}
    assert set(items) == {"rgb.jpg", "photo.webp", "gray.png", "rgba.png", "cmyk.jpg", "palette.png"}
    for item in items.values():
        assert item["image"].shape == (3, 40, 40) and item["image"].dtype == torch.float32
        assert -1 <= item["image"].min() and item["image"].max() <= 1
    gray = items["gray.png"]["image"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    rgba = tensor_to_uint8(items["rgba.png"]["image"])
    assert (rgba[:, :18] == 255).all()  # transparent -> composited over white, not black
    assert np.abs(rgba[:, 22:].astype(int) - RED).max() <= 1
    for name in ("cmyk.jpg", "palette.png"):
        pixels = tensor_to_uint8(items[name]["image"]).reshape(-1, 3).astype(int)
        assert np.abs(pixels.mean(0) - RED).max() < 8, (name, pixels.mean(0))
    assert items["rgb.jpg"]["caption"] == "cat" and items["cmyk.jpg"]["label"] == 1


def test_truncated_file_at_read_time_falls_back_to_next(tree):
    with pytest.warns(SkippedImagesWarning):
        ds = ImageFolderDataset(tree, image_size=16)
    i = _index(ds, TRUNCATED_JPEG)
    with pytest.warns(SkippedImagesWarning, match=TRUNCATED_JPEG):
        item = ds[i]
    assert item["path"] == ds.records[(i + 1) % len(ds)].path
    assert [Path(p).name for p, _ in ds.read_failures] == [TRUNCATED_JPEG]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bad file is remembered: no second warning, no retry
        assert ds[i]["path"] == item["path"]


def test_dataloader_with_workers_runs_through(tree):
    with pytest.warns(SkippedImagesWarning):
        dm = ImageFolderDataModule(str(tree), image_size=16, batch_size=3, num_workers=2, val_fraction=0.3,
                                   pin_memory=False)
        dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert len(train) + len(val) == 7 and len(val) == 2
    assert not {r.path for r in train.records} & {r.path for r in val.records}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImagesWarning)
        batches = list(dm.train_dataloader()) + list(dm.val_dataloader())
    images = torch.cat([b["image"] for b in batches])
    assert images.shape == (7, 3, 16, 16)
    assert all(not p.endswith(TRUNCATED_JPEG) for b in batches for p in b["path"])
    assert dm.num_classes == 2 and dm.class_names == ("cat", "dog")
    # the split is a pure function of the seed
    with pytest.warns(SkippedImagesWarning):
        again = ImageFolderDataModule(str(tree), image_size=16, val_fraction=0.3)
        again.setup()
    assert [r.path for r in again.datasets["val"].records] == [r.path for r in val.records]


def test_train_val_subfolders_layout(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for k, cls in enumerate(("ant", "bee")):
            (tmp_path / split / cls).mkdir(parents=True)
            for j in range(n):
                Image.fromarray(_noise(20, 24, 10 * k + j)).save(tmp_path / split / cls / f"{j}.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=4)
    assert dm.split_layout and dm.class_names == ("ant", "bee")
    dm.setup()
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["val"]) == 2
    assert dm.datasets["test"] is dm.datasets["val"]
    batch = next(iter(dm.val_dataloader()))
    assert batch["label"].tolist() == [0, 1]
    (tmp_path / "val" / "wasp").mkdir()
    Image.fromarray(_noise(20, 20)).save(tmp_path / "val" / "wasp" / "0.png")
    with pytest.raises(ValueError, match="wasp"):
        ImageFolderDataModule(str(tmp_path), image_size=16).setup()


def test_missing_and_empty_inputs_raise_naming_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataModule(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*no class subfolders"):
        ImageFolderDataset(empty)
    (empty / "cls").mkdir()
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(empty)
    (empty / "cls" / "zero.png").write_bytes(b"")
    with pytest.warns(SkippedImagesWarning), pytest.raises(ValueError, match="all 1 files were skipped"):
        ImageFolderDataset(empty)


def _flat_folder(root: Path) -> Path:
    root.mkdir()
    Image.fromarray(_noise(32, 32, 1)).save(root / "a.png")
    Image.fromarray(_noise(32, 40, 2)).save(root / "b.jpg")
    Image.fromarray(_noise(30, 30, 3)).save(root / "c.webp")
    (root / "bad.png").write_bytes(b"\x89PNG garbage")
    return root


def test_captions_csv(tmp_path):
    root = _flat_folder(tmp_path / "flat")
    (root / "captions.csv").write_text(
        'file,caption,label\na.png,"a red, round thing",zebra\nb.jpg,two blue squares,ant\n'
        "c.webp,a cat,zebra\nbad.png,broken,ant\n"
    )
    with pytest.warns(SkippedImagesWarning, match="bad.png"):
        ds = CaptionFolderDataset(root / "captions.csv", image_size=16)
    assert ds.classes == ("ant", "zebra") and len(ds) == 3
    assert [(Path(r.path).name, r.caption, r.label) for r in ds.records] == [
        ("a.png", "a red, round thing", 1), ("b.jpg", "two blue squares", 0), ("c.webp", "a cat", 1)]
    item = ds[1]
    assert item["caption"] == "two blue squares" and item["label"] == 0 and item["image"].shape == (3, 16, 16)


def test_captions_jsonl_without_labels_and_module(tmp_path):
    root = _flat_folder(tmp_path / "flat")
    lines = [{"file": "a.png", "caption": "first"}, {"file": "b.jpg", "caption": "second"},
             {"file": "c.webp", "caption": "third"}]
    (root / "caps.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    records, classes = read_captions(root / "caps.jsonl")
    assert classes == () and [r.label for r in records] == [-1, -1, -1]
    assert [r.caption for r in records] == ["first", "second", "third"]
    dm = ImageFolderDataModule(str(root), captions_file="caps.jsonl", image_size=16, batch_size=8,
                               val_fraction=0.34)
    dm.setup()
    assert len(dm.datasets["train"]) == 2 and len(dm.datasets["val"]) == 1
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["caption"]) <= {"first", "second", "third"} and batch["label"].tolist() == [-1, -1]


def test_captions_errors_name_file_and_line(tmp_path):
    root = _flat_folder(tmp_path / "flat")
    (root / "caps.csv").write_text("file,caption\na.png,ok\nmissing.png,gone\n")
    with pytest.raises(FileNotFoundError, match=r"line 3: .*missing\.png"):
        read_captions(root / "caps.csv")
    (root / "wrong.csv").write_text("path,text\na.png,ok\n")
    with pytest.raises(ValueError, match="'file' and 'caption'"):
        read_captions(root / "wrong.csv")
    (root / "bad.jsonl").write_text('{"file": "a.png", "caption": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_captions(root / "bad.jsonl")
    (root / "mixed.csv").write_text("file,caption,label\na.png,x,1\nb.jpg,y,\n")
    with pytest.raises(ValueError, match="line 3.*label"):
        read_captions(root / "mixed.csv")
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        ImageFolderDataModule(str(root), captions_file="nothere.csv")
    with pytest.raises(ValueError, match="unsupported extension"):
        (root / "caps.txt").write_text("a.png ok\n")
        read_captions(root / "caps.txt")


def test_image_transform_resize_crop_flip():
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[:, :32] = 255  # left half white, right half black
    image = Image.fromarray(array)
    centre = ImageTransform(16)(image)
    assert centre.shape == (3, 16, 16)  # shorter side 32 -> 16, then a 16x16 centre crop of 32x16
    u8 = tensor_to_uint8(centre)
    assert (u8[:, :6] == 255).all() and (u8[:, 10:] == 0).all()
    flipped = ImageTransform(16, hflip=1.0)(image)
    assert torch.equal(flipped, centre.flip(-1))
    cropped = ImageTransform(16, crop_pct=0.5)(image)  # resize shorter side to 32 (no-op), centre crop
    assert torch.equal(cropped, torch.from_numpy(array[8:24, 24:40]).permute(2, 0, 1).float() / 127.5 - 1)
    with pytest.raises(ValueError, match="crop_pct"):
        ImageTransform(16, crop_pct=0.0)
    assert to_rgb(Image.new("I;16", (4, 4), 65535)).getpixel((0, 0)) == (255, 255, 255)
