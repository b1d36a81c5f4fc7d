"""Electron-microscopy volumes: lazy readers, random 3D crops, augmentation, torch Datasets, a DataModule.

Readers (all lazy: a crop reads only its slab, never the whole volume):

- CREMI-style HDF5 (``volumes/raw``, ``volumes/labels/neuron_ids``; keys configurable, h5py). The file
  handle is opened on first access in each process (so DataLoader workers open their own handles).
- zarr arrays (a ``.zarr`` directory; key = array path inside the group, or empty for a bare array).
- multi-page TIFF stacks (tifffile; one page per z-section, only the pages of the crop are decoded).

Anisotropic voxel size is read from a ``resolution`` attribute (CREMI) and defaults to (40, 4, 4) nm.
Bad input fails early with a message naming the file and key: missing key, empty volume, NaN/Inf in
float volumes, raw/label shape mismatch.

``path:key`` strings are accepted everywhere a (path, key) pair is (``cremi.h5:volumes/raw``).
The default data of :class:`EMDataModule` is the synthetic generator (:mod:`datasets.synth_em`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

try:  # LightningDataModule only for the DataModule; the readers work without Lightning.
    from lightning.pytorch import LightningDataModule
except ImportError:  # pragma: no cover - lightning is a hard dependency of the workbench
    LightningDataModule = object  # type: ignore[misc,assignment]

__all__ = [
    "DEFAULT_RAW_KEY", "DEFAULT_LABEL_KEY", "DEFAULT_RESOLUTION", "VolumeError", "LazyVolume", "open_volume",
    "check_pair", "EMAugment", "EMRawDataset", "EMSegDataset", "EMDataModule", "split_path_key",
]

DEFAULT_RAW_KEY = "volumes/raw"
DEFAULT_LABEL_KEY = "volumes/labels/neuron_ids"
DEFAULT_RESOLUTION = (40.0, 4.0, 4.0)
_TIFF_SUFFIXES = (".tif", ".tiff")


class VolumeError(ValueError):
    """A volume file/key that cannot be used (message names the file and key)."""


def split_path_key(spec: str, default_key: str | None) -> tuple[str, str | None]:
    """``'a.h5:volumes/raw'`` -> (``'a.h5'``, ``'volumes/raw'``); no colon -> (spec, default_key)."""
    spec = str(spec)
    head, sep, tail = spec.rpartition(":")
    if sep and head and not tail.startswith(("/", "\\")) and not (len(head) == 1 and head.isalpha()):
        return head, tail
    return spec, default_key


def _kind(path: str) -> str:
    low = path.lower().rstrip("/")
    if low.endswith(_TIFF_SUFFIXES):
        return "tiff"
    if low.endswith(".zarr") or (os.path.isdir(path) and (
            os.path.exists(os.path.join(path, ".zgroup")) or os.path.exists(os.path.join(path, ".zarray"))
            or os.path.exists(os.path.join(path, "zarr.json")))):
        return "zarr"
    return "hdf5"


class LazyVolume:
    """A 3D array on disk, sliced lazily: ``vol[z0:z1, y0:y1, x0:x1]`` reads only that slab.

    Attributes: ``path``, ``key``, ``shape`` (Z, Y, X), ``dtype``, ``resolution`` (nm, z/y/x),
    ``voxels_read`` (running count of voxels returned, for checking laziness).
    Picklable: the open handle is dropped and reopened in the receiving process.
    """

    def __init__(self, path: str | os.PathLike, key: str | None = None, resolution: Sequence[float] | None = None,
                 check_finite: bool = True):
        self.path = str(path)
        self.kind = _kind(self.path)
        self.key = key if key is not None else (DEFAULT_RAW_KEY if self.kind == "hdf5" else "")
        self._handle: Any = None
        self._array: Any = None
        self._pid: int | None = None
        self.voxels_read = 0
        if not os.path.exists(self.path):
            raise VolumeError(f"{self.path}: file not found (key {self.key!r})")
        arr = self._get()
        shape = tuple(int(s) for s in arr.shape)
        if len(shape) != 3:
            raise VolumeError(f"{self.path}:{self.key}: expected a 3D (z, y, x) volume, got shape {shape}")
        if min(shape) == 0:
            raise VolumeError(f"{self.path}:{self.key}: empty volume (shape {shape})")
        self.shape: tuple[int, int, int] = shape  # (Z, Y, X)
        self.dtype = np.dtype(arr.dtype)
        self.resolution = tuple(float(r) for r in (resolution or self._read_resolution(arr)))
        if len(self.resolution) != 3:
            raise VolumeError(f"{self.path}:{self.key}: resolution must have 3 values, got {self.resolution}")
        self._stats: tuple[float, float] | None = None
        if check_finite and self.dtype.kind == "f":
            self.stats()  # scans once in slabs: raises on NaN/Inf

    # -- opening -------------------------------------------------------------------------------------
    def _open(self) -> Any:
        if self.kind == "hdf5":
            import h5py

            try:
                self._handle = h5py.File(self.path, "r")
            except OSError as err:
                raise VolumeError(f"{self.path}: cannot open as HDF5 ({err}) (key {self.key!r})") from err
            if self.key not in self._handle or not hasattr(self._handle[self.key], "shape"):
                keys: list[str] = []
                self._handle.visititems(lambda n, o: keys.append(n) if hasattr(o, "shape") else None)
                self._handle.close()
                self._handle = None
                raise VolumeError(f"{self.path}: key {self.key!r} not found; datasets in the file: {keys}")
            return self._handle[self.key]
        if self.kind == "zarr":
            import zarr

            try:
                node = zarr.open(self.path, mode="r")
            except Exception as err:  # zarr raises several unrelated types for unreadable stores
                raise VolumeError(f"{self.path}: cannot open as zarr ({err}) (key {self.key!r})") from err
            if self.key:
                try:
                    node = node[self.key]
                except KeyError as err:
                    raise VolumeError(f"{self.path}: key {self.key!r} not found in the zarr group") from err
            if not hasattr(node, "shape"):
                raise VolumeError(f"{self.path}: key {self.key!r} is a group, not an array")
            return node
        import tifffile

        try:
            self._handle = tifffile.TiffFile(self.path)
        except Exception as err:  # tifffile raises TiffFileError/ValueError/OSError
            raise VolumeError(f"{self.path}: cannot open as TIFF ({err})") from err
        return _TiffStack(self._handle, self.path)

    def _get(self) -> Any:
        if self._array is None or self._pid != os.getpid():
            self._array = self._open()
            self._pid = os.getpid()
        return self._array

    def _read_resolution(self, arr: Any) -> tuple[float, ...]:
        attrs = getattr(arr, "attrs", None)
        if attrs is not None and "resolution" in attrs:
            return tuple(float(v) for v in np.asarray(attrs["resolution"]).ravel())
        return DEFAULT_RESOLUTION

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_handle=None, _array=None, _pid=None)
        return state

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = self._array = self._pid = None

    # -- access --------------------------------------------------------------------------------------
    def __getitem__(self, idx: Any) -> np.ndarray:
        out = np.asarray(self._get()[idx])
        self.voxels_read += out.size
        return out

    def read_crop(self, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """(z, y, x) crop at ``start`` of ``size``; reads only that slab."""
        sl = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, size))
        return self[sl]

    def stats(self, slab: int = 16) -> tuple[float, float]:
        """(min, max) over the volume, scanned in z-slabs; raises on NaN/Inf (names file and key)."""
        if self._stats is None:
            lo, hi = np.inf, -np.inf
            for z0 in range(0, self.shape[0], slab):
                block = np.asarray(self._get()[z0:z0 + slab])
                if block.dtype.kind == "f" and not np.isfinite(block).all():
                    bad = int((~np.isfinite(block)).sum())
                    raise VolumeError(f"{self.path}:{self.key}: {bad} NaN/Inf values in z-slab [{z0}, {z0 + slab})")
                lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
            self._stats = (lo, hi)
        return self._stats

    def __repr__(self) -> str:
        return f"LazyVolume({self.path!r}, key={self.key!r}, shape={self.shape}, dtype={self.dtype}, res={self.resolution})"


class _TiffStack:
    """Array-like over the pages of a multi-page TIFF (or one 3D page): decodes only the pages asked."""

    def __init__(self, tif: Any, path: str):
        self.tif, self.path = tif, path
        pages = tif.pages
        first = pages[0]
        if len(pages) == 1 and len(first.shape) == 3:  # one 3D image (e.g. ImageJ hyperstack in one page)
            self._single = True
            self.shape = tuple(first.shape)
        else:
            self._single = False
            if len(first.shape) != 2:
                raise VolumeError(f"{path}: TIFF pages must be 2D grayscale, got page shape {first.shape}")
            self.shape = (len(pages), *first.shape)
        self.dtype = first.dtype

    def __getitem__(self, idx: Any) -> np.ndarray:
        if not isinstance(idx, tuple):
            idx = (idx,)
        idx = idx + (slice(None),) * (3 - len(idx))
        if self._single:
            return self.tif.pages[0].asarray()[idx]
        zs = range(self.shape[0])[idx[0]] if isinstance(idx[0], slice) else [idx[0]]
        planes = np.stack([self.tif.pages[int(z)].asarray()[idx[1], idx[2]] for z in zs])
        return planes if isinstance(idx[0], slice) else planes[0]


def open_volume(spec: str | os.PathLike, key: str | None = None, resolution: Sequence[float] | None = None,
                check_finite: bool = True) -> LazyVolume:
    """Open a volume lazily. ``spec`` may be ``path`` or ``path:key``."""
    path, key = split_path_key(str(spec), key)
    return LazyVolume(path, key, resolution=resolution, check_finite=check_finite)


def check_pair(raw: LazyVolume, labels: LazyVolume) -> None:
    """Raise a VolumeError naming both files/keys when raw and label shapes differ."""
    if raw.shape != labels.shape:
        raise VolumeError(f"shape mismatch: raw {raw.path}:{raw.key} has shape {raw.shape} but labels "
                          f"{labels.path}:{labels.key} have shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise VolumeError(f"{labels.path}:{labels.key}: labels must be integer ids, got dtype {labels.dtype}")


# -- augmentation ----------------------------------------------------------------------------------------
@dataclass
class EMAugment:
    """Random in-plane flips/transposes (applied to raw and labels alike) and intensity jitter (raw only)."""

    flip: bool = True
    transpose: bool = True  # y <-> x, only when the crop is square in-plane
    contrast: float = 0.15  # multiply (x - mean) by U(1-c, 1+c)
    brightness: float = 0.1  # add U(-b, b)
    gamma: float = 0.3  # x ** 2**U(-g, g)

    def geometric(self, rng: np.random.Generator, arrays: list[np.ndarray]) -> list[np.ndarray]:
        if self.flip:
            if rng.random() < 0.5:
                arrays = [a[:, ::-1, :] for a in arrays]
            if rng.random() < 0.5:
                arrays = [a[:, :, ::-1] for a in arrays]
        if self.transpose and arrays[0].shape[1] == arrays[0].shape[2] and rng.random() < 0.5:
            arrays = [a.transpose(0, 2, 1) for a in arrays]
        return [np.ascontiguousarray(a) for a in arrays]

    def intensity(self, rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
        """``x`` in [0, 1] float32 -> jittered, clipped to [0, 1]."""
        if self.contrast:
            m = x.mean()
            x = (x - m) * rng.uniform(1 - self.contrast, 1 + self.contrast) + m
        if self.brightness:
            x = x + rng.uniform(-self.brightness, self.brightness)
        x = np.clip(x, 0.0, 1.0)
        if self.gamma:
            x = x ** (2.0 ** rng.uniform(-self.gamma, self.gamma))
        return x.astype(np.float32)


# -- torch datasets ----------------------------------------------------------------------------------------
class EMRawDataset(Dataset):
    """Random 3D crops of a raw volume: items ``{"raw": (1, cz, cy, cx) float32 in [0, 1]}``.

    ``z_range`` restricts crops to sections [z0, z1) (for z-range splits). ``normalize``: ``"minmax"``
    (per volume, TokenUnify's ``(x-min)/(max-min+1e-8)``) or ``"dtype"`` (uint8 / 255).
    With ``deterministic=True`` (val/test) item i is always the same crop.
    """

    def __init__(self, raw: str | LazyVolume, raw_key: str | None = DEFAULT_RAW_KEY,
                 crop_size: Sequence[int] = (16, 160, 160), samples: int = 256,
                 z_range: Sequence[int] | None = None, augment: EMAugment | None = None,
                 normalize: str = "minmax", deterministic: bool = False, seed: int = 0):
        self.raw = raw if isinstance(raw, LazyVolume) else open_volume(raw, raw_key)
        self.crop_size = tuple(int(c) for c in crop_size)
        z0, z1 = (0, self.raw.shape[0]) if z_range is None else (int(z_range[0]), int(z_range[1]))
        self.z_range = (z0, z1)
        extent = (z1 - z0, self.raw.shape[1], self.raw.shape[2])
        if len(self.crop_size) != 3 or any(c > e or c < 1 for c, e in zip(self.crop_size, extent)):
            raise VolumeError(f"{self.raw.path}:{self.raw.key}: crop {self.crop_size} does not fit the volume "
                              f"extent {extent} (z range {self.z_range})")
        if normalize not in ("minmax", "dtype"):
            raise ValueError(f"normalize must be 'minmax' or 'dtype', got {normalize!r}")
        self.normalize, self.samples, self.augment = normalize, int(samples), augment
        self.deterministic, self.seed = deterministic, int(seed)
        self._epoch_rng: np.random.Generator | None = None
        if normalize == "minmax":
            self._lo, self._hi = self.raw.stats()
        else:
            info = np.iinfo(self.raw.dtype) if self.raw.dtype.kind in "iu" else None
            self._lo, self._hi = (0.0, float(info.max)) if info else (0.0, 1.0)

    def __len__(self) -> int:
        return self.samples

    def _rng(self, index: int) -> np.random.Generator:
        if self.deterministic:
            return np.random.default_rng([self.seed, index])
        if self._epoch_rng is None:  # one stream per worker process, seeded from torch's worker seed
            self._epoch_rng = np.random.default_rng([self.seed, torch.initial_seed() % 2**32])
        return self._epoch_rng

    def _start(self, rng: np.random.Generator) -> tuple[int, int, int]:
        z0, z1 = self.z_range
        cz, cy, cx = self.crop_size
        return (int(rng.integers(z0, z1 - cz + 1)), int(rng.integers(0, self.raw.shape[1] - cy + 1)),
                int(rng.integers(0, self.raw.shape[2] - cx + 1)))

    def _to_float(self, raw: np.ndarray) -> np.ndarray:
        return ((raw.astype(np.float32) - self._lo) / (self._hi - self._lo + 1e-8)).astype(np.float32)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        raw = self.raw.read_crop(self._start(rng), self.crop_size)
        if self.augment is not None:
            (raw,) = self.augment.geometric(rng, [raw])
        x = self._to_float(raw)
        if self.augment is not None:
            x = self.augment.intensity(rng, x)
        return {"raw": torch.from_numpy(x)[None]}


class EMSegDataset(EMRawDataset):
    """Random 3D crops of (raw, labels): items ``{"raw": (1, cz, cy, cx) float32, "labels": (cz, cy, cx) int64}``."""

    def __init__(self, raw: str | LazyVolume, labels: str | LazyVolume, raw_key: str | None = DEFAULT_RAW_KEY,
                 label_key: str | None = DEFAULT_LABEL_KEY, **kwargs: Any):
        super().__init__(raw, raw_key, **kwargs)
        self.labels = labels if isinstance(labels, LazyVolume) else open_volume(labels, label_key)
        check_pair(self.raw, self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        start = self._start(rng)
        raw = self.raw.read_crop(start, self.crop_size)
        lab = self.labels.read_crop(start, self.crop_size)
        if self.augment is not None:
            raw, lab = self.augment.geometric(rng, [raw, lab])
        x = self._to_float(raw)
        if self.augment is not None:
            x = self.augment.intensity(rng, x)
        return {"raw": torch.from_numpy(x)[None], "labels": torch.from_numpy(lab.astype(np.int64))}


# -- DataModule ---------------------------------------------------------------------------------------------
def synthetic_volume_path(cache_dir: str | os.PathLike, shape: Sequence[int], seed: int) -> Path:
    """Generate (once, cached by shape+seed) a synthetic CREMI-layout HDF5 file; returns its path."""
    from datasets.synth_em import synth_em_to_h5

    shape = tuple(int(s) for s in shape)
    path = Path(cache_dir) / f"synth_em_seed{seed}_{'x'.join(map(str, shape))}.h5"
    if not path.exists():
        synth_em_to_h5(path, shape=shape, seed=seed)
    return path


class EMDataModule(LightningDataModule):
    """EM volumes for pretraining (raw only) or segmentation (raw + labels).

    Data sources, in order of precedence:
    - ``train_raw`` (``path`` or ``path:key``) [+ ``train_labels``]; validation/test from ``val_raw`` /
      ``test_raw`` (separate volumes) or, when those are not given, from z-ranges of the training volume
      (``val_fraction`` / ``test_fraction`` of the sections at its end: no overlap with training crops);
    - nothing given: synthetic volumes from :mod:`datasets.synth_em` (train/val/test from different seeds),
      cached under ``cache_dir``.
    ``with_labels=False`` yields only raw crops (pretraining).
    """

    def __init__(self, train_raw: str | None = None, train_labels: str | None = None,
                 val_raw: str | None = None, val_labels: str | None = None,
                 test_raw: str | None = None, test_labels: str | None = None,
                 raw_key: str = DEFAULT_RAW_KEY, label_key: str = DEFAULT_LABEL_KEY,
                 with_labels: bool = False, crop_size: tuple[int, int, int] = (16, 80, 80),
                 batch_size: int = 2, num_workers: int = 0, train_samples: int = 256, val_samples: int = 16,
                 val_fraction: float = 0.15, test_fraction: float = 0.15, augment: bool = True,
                 normalize: str = "minmax", synthetic_shape: tuple[int, int, int] = (32, 128, 128),
                 synthetic_seed: int = 0, cache_dir: str = "runs/data", seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.hp = dict(self.hparams)

    def _sources(self) -> dict[str, tuple[str | None, str | None]]:
        h = self.hp
        if h["train_raw"] is None:
            files = {}
            for i, split in enumerate(("train", "val", "test")):
                p = str(synthetic_volume_path(h["cache_dir"], h["synthetic_shape"], h["synthetic_seed"] + 1000 * i))
                files[split] = (f"{p}:{DEFAULT_RAW_KEY}", f"{p}:{DEFAULT_LABEL_KEY}")
            return files
        return {"train": (h["train_raw"], h["train_labels"]), "val": (h["val_raw"], h["val_labels"]),
                "test": (h["test_raw"], h["test_labels"])}

    def prepare_data(self) -> None:
        self._sources()  # generates the synthetic files once (rank 0)

    def _make(self, raw: str, labels: str | None, samples: int, z_range: tuple[int, int] | None,
              train: bool) -> Dataset:
        h = self.hp
        kw = dict(crop_size=h["crop_size"], samples=samples, z_range=z_range, normalize=h["normalize"],
                  augment=EMAugment() if (train and h["augment"]) else None, deterministic=not train,
                  seed=h["seed"] + (0 if train else 1))
        if h["with_labels"]:
            if labels is None:
                raise VolumeError(f"{raw}: with_labels=True needs a labels volume for this split")
            return EMSegDataset(raw, labels, h["raw_key"], h["label_key"], **kw)
        return EMRawDataset(raw, h["raw_key"], **kw)

    def setup(self, stage: str | None = None) -> None:
        h = self.hp
        src = self._sources()
        train_raw, train_lab = src["train"]
        nz = open_volume(train_raw, h["raw_key"], check_finite=False).shape[0]
        cz = int(h["crop_size"][0])
        ranges: dict[str, tuple[int, int] | None] = {"train": None, "val": None, "test": None}
        if src["val"][0] is None or src["test"][0] is None:
            n_val = max(cz, int(round(nz * h["val_fraction"]))) if src["val"][0] is None else 0
            n_test = max(cz, int(round(nz * h["test_fraction"]))) if src["test"][0] is None else 0
            if nz - n_val - n_test < cz:
                raise VolumeError(f"{train_raw}: {nz} sections are too few to split off val ({n_val}) and test "
                                  f"({n_test}) z-ranges and keep a training crop of depth {cz}")
            ranges["train"] = (0, nz - n_val - n_test)
            if n_val:
                ranges["val"] = (nz - n_val - n_test, nz - n_test)
                src["val"] = src["train"]
            if n_test:
                ranges["test"] = (nz - n_test, nz)
                src["test"] = src["train"]
        self.train_set = self._make(train_raw, train_lab, h["train_samples"], ranges["train"], True)
        self.val_set = self._make(*src["val"], h["val_samples"], ranges["val"], False)
        self.test_set = self._make(*src["test"], h["val_samples"], ranges["test"], False)

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        nw = int(self.hp["num_workers"])
        return DataLoader(ds, batch_size=self.hp["batch_size"], shuffle=shuffle, num_workers=nw,
                          pin_memory=torch.cuda.is_available(), persistent_workers=nw > 0, drop_last=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)
