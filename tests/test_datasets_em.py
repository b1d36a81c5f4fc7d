"""EM volume readers, the synthetic EM generator, crops/augmentation, the EM DataModule, `vtw synth-em`."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from datasets.em import (
    EMAugment,
    EMDataModule,
    EMRawDataset,
    EMSegDataset,
    VolumeError,
    check_pair,
    open_volume,
)
from datasets.synth_em import generate_synthetic_em, synth_em_to_h5, write_cremi_h5


@pytest.fixture(scope="module")
def synth_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("em") / "synth.h5"
    synth_em_to_h5(path, shape=(16, 64, 64), seed=5)
    return path


def test_generator_deterministic_and_seed_dependent():
    a = generate_synthetic_em((8, 48, 48), seed=1)
    b = generate_synthetic_em((8, 48, 48), seed=1)
    c = generate_synthetic_em((8, 48, 48), seed=2)
    assert np.array_equal(a.raw, b.raw) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.raw, c.raw)
    assert a.raw.dtype == np.uint8 and a.labels.dtype == np.uint64


def test_generator_exact_ids_and_dark_membranes():
    vol = generate_synthetic_em((12, 64, 64), seed=3)
    ids = np.unique(vol.labels)
    assert ids[0] == 1 and np.array_equal(ids, np.arange(1, vol.n_cells + 1))  # consecutive, no background
    # every in-plane label change lies on a drawn membrane pixel
    change = vol.labels[:, 1:, :] != vol.labels[:, :-1, :]
    assert vol.membrane[:, 1:, :][change].all()
    # membranes are dark, cytoplasm bright: clearly separated intensity distributions
    mem = vol.raw[vol.membrane].astype(float)
    cyt = vol.raw[~vol.membrane].astype(float)
    assert mem.mean() + 40 < cyt.mean()
    # neurites are continuous along z: most voxels keep their id from one section to the next
    assert (vol.labels[1:] == vol.labels[:-1]).mean() > 0.8
    # each cell is one connected region per section (Voronoi cells are convex-ish): few fragments
    assert vol.n_cells >= 5


def test_cremi_h5_layout_and_reader(synth_file):
    with h5py.File(synth_file, "r") as f:
        assert f["volumes/raw"].dtype == np.uint8
        assert f["volumes/labels/neuron_ids"].dtype == np.uint64
        assert tuple(f["volumes/raw"].attrs["resolution"]) == (40.0, 4.0, 4.0)
    raw = open_volume(synth_file)
    lab = open_volume(f"{synth_file}:volumes/labels/neuron_ids")
    check_pair(raw, lab)
    assert raw.shape == (16, 64, 64) and raw.resolution == (40.0, 4.0, 4.0)
    vol = generate_synthetic_em((16, 64, 64), seed=5)
    assert np.array_equal(raw[:], vol.raw) and np.array_equal(lab[:], vol.labels)


def test_write_is_atomic_on_error(tmp_path):
    out = tmp_path / "bad.h5"
    with pytest.raises(ValueError, match="bad.h5"):
        write_cremi_h5(out, np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 5), np.uint64))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_inputs_name_file_and_key(tmp_path, synth_file):
    with pytest.raises(VolumeError, match=r"synth\.h5.*volumes/nope"):
        open_volume(synth_file, "volumes/nope")
    p = tmp_path / "nan.h5"
    data = np.ones((4, 8, 8), np.float32)
    data[2, 3, 3] = np.nan
    with h5py.File(p, "w") as f:
        f["vol"] = data
        f["inf"] = np.full((2, 4, 4), np.inf, np.float32)
        f["empty"] = np.zeros((0, 4, 4), np.uint8)
        f["lab"] = np.zeros((4, 8, 9), np.uint64)
        f["raw"] = np.zeros((4, 8, 8), np.uint8)
    with pytest.raises(VolumeError, match=r"nan\.h5:vol.*NaN/Inf"):
        open_volume(p, "vol")
    with pytest.raises(VolumeError, match=r"nan\.h5:inf.*NaN/Inf"):
        open_volume(p, "inf")
    with pytest.raises(VolumeError, match=r"nan\.h5:empty.*empty"):
        open_volume(p, "empty")
    with pytest.raises(VolumeError, match=r"nan\.h5:raw.*nan\.h5:lab"):
        check_pair(open_volume(p, "raw"), open_volume(p, "lab"))
    with pytest.raises(VolumeError, match=r"missing\.h5"):
        open_volume(tmp_path / "missing.h5")
    with pytest.raises(VolumeError, match=r"synth\.h5.*crop"):
        EMRawDataset(str(synth_file), crop_size=(32, 32, 32))


class _Recorder:
    """Wraps an h5py dataset and records every selection shape requested from it."""

    def __init__(self, arr):
        self.arr, self.requests = arr, []
        self.shape, self.dtype, self.attrs = arr.shape, arr.dtype, arr.attrs

    def __getitem__(self, idx):
        out = self.arr[idx]
        self.requests.append(out.shape)
        return out


def test_random_crops_read_only_their_slab(synth_file):
    ds = EMSegDataset(str(synth_file), str(synth_file), crop_size=(4, 16, 24), samples=5, normalize="dtype")
    rec_raw, rec_lab = _Recorder(ds.raw._get()), _Recorder(ds.labels._get())
    ds.raw._array, ds.labels._array = rec_raw, rec_lab
    for i in range(5):
        item = ds[i]
        assert item["raw"].shape == (1, 4, 16, 24) and item["labels"].shape == (4, 16, 24)
    assert rec_raw.requests == [(4, 16, 24)] * 5 and rec_lab.requests == [(4, 16, 24)] * 5
    assert ds.raw.voxels_read == 5 * 4 * 16 * 24


def test_crops_match_source_and_augment_consistently(synth_file):
    vol = generate_synthetic_em((16, 64, 64), seed=5)
    ds = EMSegDataset(str(synth_file), str(synth_file), crop_size=(4, 32, 32), samples=8, normalize="dtype",
                      deterministic=True)
    item = ds[3]
    raw = (item["raw"][0].numpy() * 255).round().astype(np.uint8)
    lab = item["labels"].numpy()
    # find the crop in the source volume through the labels+raw (unique match)
    found = False
    for z in range(16 - 4 + 1):
        for y in range(64 - 32 + 1):
            for x in range(64 - 32 + 1):
                if np.array_equal(vol.raw[z:z + 4, y:y + 32, x:x + 32], raw):
                    assert np.array_equal(vol.labels[z:z + 4, y:y + 32, x:x + 32], lab)
                    found = True
    assert found
    assert torch.equal(ds[3]["raw"], item["raw"])  # deterministic per index
    # geometric augmentation moves raw and labels together: membranes stay at label boundaries
    aug = EMSegDataset(str(synth_file), str(synth_file), crop_size=(4, 32, 32), samples=8,
                       augment=EMAugment(contrast=0, brightness=0, gamma=0), normalize="dtype")
    for i in range(4):
        it = aug[i]
        r, lab = it["raw"][0].numpy(), it["labels"].numpy()
        edge = lab[:, 1:, :] != lab[:, :-1, :]
        assert r[:, 1:, :][edge].mean() + 0.1 < r[:, 1:, :][~edge].mean()


def test_intensity_augment_in_range():
    rng = np.random.default_rng(0)
    x = rng.random((2, 8, 8)).astype(np.float32)
    y = EMAugment().intensity(rng, x)
    assert y.dtype == np.float32 and y.min() >= 0 and y.max() <= 1 and not np.allclose(x, y)


def test_zarr_and_tiff_round_trip(tmp_path):
    import tifffile
    import zarr

    vol = generate_synthetic_em((6, 32, 40), seed=7)
    zpath = tmp_path / "v.zarr"
    root = zarr.open_group(str(zpath), mode="w")
    arr = root.create_array("raw", shape=vol.raw.shape, dtype="uint8", chunks=(2, 16, 16))
    arr[:] = vol.raw
    arr.attrs["resolution"] = [30.0, 6.0, 6.0]
    zv = open_volume(f"{zpath}:raw")
    assert zv.shape == (6, 32, 40) and zv.resolution == (30.0, 6.0, 6.0)
    assert np.array_equal(zv[1:3, 4:20, 5:9], vol.raw[1:3, 4:20, 5:9])
    with pytest.raises(VolumeError, match=r"v\.zarr.*nope"):
        open_volume(f"{zpath}:nope")

    tpath = tmp_path / "v.tif"
    tifffile.imwrite(tpath, vol.raw)  # multi-page: one page per section
    tv = open_volume(tpath)
    assert tv.shape == (6, 32, 40) and tv.resolution == (40.0, 4.0, 4.0)
    assert np.array_equal(tv[2:5, 3:30, 1:7], vol.raw[2:5, 3:30, 1:7])
    assert np.array_equal(tv[:], vol.raw)


def test_datamodule_workers_and_splits(tmp_path):
    dm = EMDataModule(with_labels=True, crop_size=(4, 32, 32), batch_size=2, num_workers=2, train_samples=4,
                      val_samples=2, synthetic_shape=(12, 48, 48), cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["raw"].shape == (2, 1, 4, 32, 32) and batch["labels"].shape == (2, 4, 32, 32)
    assert 0.0 <= float(batch["raw"].min()) and float(batch["raw"].max()) <= 1.0
    val = next(iter(dm.val_dataloader()))
    assert torch.equal(val["raw"], next(iter(dm.val_dataloader()))["raw"])  # fixed val crops
    # synthetic default: train/val/test come from different seeds (different files)
    assert dm.train_set.raw.path != dm.val_set.raw.path != dm.test_set.raw.path


def test_datamodule_z_range_splits_disjoint(synth_file):
    dm = EMDataModule(train_raw=str(synth_file), crop_size=(2, 16, 16), val_fraction=0.25, test_fraction=0.25)
    dm.setup("fit")
    tr, va, te = dm.train_set.z_range, dm.val_set.z_range, dm.test_set.z_range
    assert tr == (0, 8) and va == (8, 12) and te == (12, 16)


def test_cli_synth_em(tmp_path):
    from workbench.cli import main

    out = tmp_path / "o.h5"
    assert main(["synth-em", str(out), "--shape", "4", "32", "32", "--seed", "2", "--voxel-size", "30", "5", "5"]) == 0
    v = open_volume(out)
    assert v.shape == (4, 32, 32) and v.resolution == (30.0, 5.0, 5.0)
    assert np.array_equal(v[:], generate_synthetic_em((4, 32, 32), seed=2).raw)
