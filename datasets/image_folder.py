"""Image folders: a class-per-subfolder tree (the ImageNet layout) or a flat folder with captions.

Layouts
    class tree     ``root/<class>/**/*.{jpg,jpeg,png,webp,bmp,gif,tif,tiff}``; labels are the sorted
                   class-folder names' indices, the caption is the class name (``_`` -> space).
    captions file  ``captions.csv`` with a header ``file,caption[,label]``, or ``captions.jsonl`` with one
                   object per line with keys ``file`` and ``caption`` (optional ``label``); ``file`` is
                   relative to ``root`` (default: the captions file's folder). ``label`` may be ints
                   or names (names are mapped to indices in sorted order); without it ``label == -1``.

Every item is the same dict as the procedural shapes: ``{"image": float32 (3, S, S) in [-1, 1],
"label": int, "caption": str, "path": str}``, so models and the default collate work unchanged.

Bad files never crash a DataLoader worker:
  * at indexing time each file is checked (``check="header"``: size on disk, ``PIL.Image.open`` +
    ``verify()``, min side; ``"full"``: decode every pixel; ``"none"``: only the zero-byte test).
    Zero-byte, unidentifiable, corrupt and too-small files are left out and reported in ONE
    :class:`SkippedImagesWarning` naming the files and their count; ``dataset.skipped`` keeps
    ``(path, reason)`` for all of them;
  * a file that still fails when read (e.g. a truncated JPEG, whose header verifies fine) is recorded
    in ``dataset.read_failures`` of the process that read it, warned about once, and the next
    readable sample is returned instead.
Grayscale, palette, RGBA/LA (composited over white), CMYK and 16-bit images are converted to RGB
(:func:`datasets.transforms.to_rgb`); EXIF orientation is applied.
"""

from __future__ import annotations

import csv
import json
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datasets.transforms import ImageTransform

__all__ = [
    "IMG_EXTENSIONS", "CaptionFolderDataset", "ImageFileDataset", "ImageFolderDataModule", "ImageFolderDataset",
    "ImageRecord", "SkippedImagesWarning", "check_image", "read_captions", "scan_class_tree",
]

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CHECK_MODES = ("none", "header", "full")
# What PIL raises on broken files: UnidentifiedImageError/"image file is truncated" are OSErrors;
# some plugins raise SyntaxError/ValueError/EOFError/struct.error, zlib errors come from PNG data.
READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError,
)
_NAMED_IN_WARNING = 12  # files named in the single skip warning; the rest are in dataset.skipped


class SkippedImagesWarning(UserWarning):
    """Some image files were left out (or replaced at read time) because they could not be used."""


@dataclass(frozen=True)
class ImageRecord:
    path: str
    label: int = -1
    caption: str = ""


def check_image(path: str | os.PathLike, min_side: int = 16, check: str = "header") -> str | None:
    """Return why ``path`` cannot be used (``None`` when it looks fine). Never raises for a bad file."""
    try:
        if os.path.getsize(path) == 0:
            return "zero-byte file"
        if check == "none":
            return None
        with Image.open(path) as image:
            width, height = image.size  # from the header; no pixel data decoded yet
            if check == "full":
                image.load()
            else:
                image.verify()  # structural check (PNG chunk CRCs etc.); a no-op for some formats
    except READ_ERRORS as error:
        return f"unreadable ({type(error).__name__}: {error})"
    if min(width, height) < min_side:
        return f"too small ({width}x{height}, min_side={min_side})"
    return None


def _check_all(paths: Sequence[str], min_side: int, check: str, threads: int, desc: str) -> list[str | None]:
    if check not in CHECK_MODES:
        raise ValueError(f"check must be one of {CHECK_MODES}, got {check!r}")
    from tqdm.auto import tqdm

    fn = lambda p: check_image(p, min_side, check)
    show = len(paths) >= 5000
    if threads <= 1 or len(paths) < 64:
        return [fn(p) for p in tqdm(paths, desc=desc, disable=not show, mininterval=2.0)]
    with ThreadPoolExecutor(threads) as pool:  # file I/O and PIL's C decoding release the GIL
        return list(tqdm(pool.map(fn, paths, chunksize=64), total=len(paths), desc=desc, disable=not show,
                         mininterval=2.0))


def _warn_skipped(skipped: Sequence[tuple[str, str]], total: int, where: str, stacklevel: int = 3) -> None:
    if not skipped:
        return
    named = "; ".join(f"{path} ({reason})" for path, reason in skipped[:_NAMED_IN_WARNING])
    more = f"; ... and {len(skipped) - _NAMED_IN_WARNING} more" if len(skipped) > _NAMED_IN_WARNING else ""
    warnings.warn(
        f"skipped {len(skipped)} of {total} image files in {where}: {named}{more} "
        f"(all listed in dataset.skipped)", SkippedImagesWarning, stacklevel=stacklevel,
    )


def _is_image_file(name: str, extensions: Sequence[str]) -> bool:
    return not name.startswith(".") and name.lower().endswith(tuple(extensions))


def scan_class_tree(root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS,
                    classes: Sequence[str] | None = None) -> tuple[list[ImageRecord], tuple[str, ...]]:
    """List ``root/<class>/**/<image>`` (no file is opened). ``classes`` fixes the class list
    (e.g. the train split's for a ``val/`` tree); a class folder outside it is an error."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {str(root)!r} does not exist or is not a directory")
    found = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise ValueError(f"image folder {str(root)!r} has no class subfolders (expected root/<class>/<image>)")
    if classes is None:
        classes = tuple(found)
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"class folders {unknown} in {str(root)!r} are not among the {len(classes)} "
                             f"training classes")
        classes = tuple(classes)
    index = {name: i for i, name in enumerate(classes)}
    records = []
    for name in found:
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            for filename in sorted(filenames):
                if _is_image_file(filename, extensions):
                    records.append(ImageRecord(os.path.join(dirpath, filename), index[name],
                                               name.replace("_", " ")))
    if not records:
        raise ValueError(f"no image files ({', '.join(extensions)}) under {str(root)!r}")
    return records, classes


def read_captions(captions_file: str | os.PathLike, root: str | os.PathLike | None = None
                  ) -> tuple[list[ImageRecord], tuple[str, ...]]:
    """Parse a CSV (``file,caption[,label]``) or JSONL (``{"file", "caption"[, "label"]}``) captions file.

    Every named image must exist (checked here, before anything else): a missing one is a
    ``FileNotFoundError`` naming the captions file, the line and the path.
    """
    captions_file = Path(captions_file)
    if not captions_file.is_file():
        raise FileNotFoundError(f"captions file {str(captions_file)!r} does not exist")
    root = Path(root) if root is not None else captions_file.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root {str(root)!r} for {str(captions_file)!r} does not exist")
    rows: list[tuple[int, dict]] = []  # (line number, row)
    suffix = captions_file.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(captions_file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            columns = [c.strip() for c in (reader.fieldnames or [])]
            if "file" not in columns or "caption" not in columns:
                raise ValueError(f"{str(captions_file)!r}: the header must name columns 'file' and 'caption' "
                                 f"(optional 'label'), found {columns}")
            reader.fieldnames = columns
            rows = [(reader.line_num, row) for row in reader]
    elif suffix in (".jsonl", ".ndjson"):
        with open(captions_file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{str(captions_file)!r} line {line_no}: not valid JSON ({error})") from error
                if not isinstance(row, dict) or "file" not in row or "caption" not in row:
                    raise ValueError(f"{str(captions_file)!r} line {line_no}: expected an object with keys "
                                     f"'file' and 'caption', got {line.strip()[:120]!r}")
                rows.append((line_no, row))
    else:
        raise ValueError(f"captions file {str(captions_file)!r}: unsupported extension {suffix!r} "
                         f"(use .csv with columns file,caption[,label] or .jsonl)")
    if not rows:
        raise ValueError(f"captions file {str(captions_file)!r} has no entries")
    missing = []
    for line_no, row in rows:
        if not str(row["file"] or "").strip():
            raise ValueError(f"{str(captions_file)!r} line {line_no}: empty 'file'")
        path = root / str(row["file"]).strip()
        if not path.is_file():
            missing.append(f"line {line_no}: {str(path)!r}")
    if missing:
        listed = "; ".join(missing[:10]) + (f"; ... and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise FileNotFoundError(f"captions file {str(captions_file)!r} names {len(missing)} missing image(s): {listed}")
    labels = [row.get("label") for _, row in rows]
    has = [lab not in (None, "") for lab in labels]
    classes: tuple[str, ...] = ()
    if any(has):
        if not all(has):
            line_no = rows[has.index(False)][0]
            raise ValueError(f"{str(captions_file)!r} line {line_no}: 'label' is missing while other rows have one")
        text = [str(lab).strip() for lab in labels]
        if all(t.lstrip("-").isdigit() for t in text):
            ints = [int(t) for t in text]
            if min(ints) < 0:
                raise ValueError(f"{str(captions_file)!r}: integer labels must be >= 0, found {min(ints)}")
            classes = tuple(str(i) for i in range(max(ints) + 1))
        else:
            classes = tuple(sorted(set(text)))
            lookup = {name: i for i, name in enumerate(classes)}
            ints = [lookup[t] for t in text]
    else:
        ints = [-1] * len(rows)
    records = [ImageRecord(str(root / str(row["file"]).strip()), label, str(row["caption"]))
               for (_, row), label in zip(rows, ints)]
    return records, classes


class ImageFileDataset(Dataset):
    """Images from a list of already-checked :class:`ImageRecord` s (the scanners below build one).

    ``transform`` maps a PIL image to the ``(3, S, S)`` tensor in [-1, 1]; an object with a
    ``prepare(image)`` method (like :class:`ImageTransform`) is called before decoding so JPEGs can
    be decoded at reduced scale.
    """

    def __init__(self, records: Sequence[ImageRecord], transform: Callable, classes: Sequence[str] = (),
                 min_side: int = 16, skipped: Sequence[tuple[str, str]] = ()) -> None:
        if not records:
            raise ValueError("no usable images (every file was skipped or the list is empty)")
        self.records = list(records)
        self.transform = transform
        self.classes = tuple(classes)
        self.min_side = min_side
        self.skipped: list[tuple[str, str]] = list(skipped)  # (path, reason), left out at indexing time
        self.read_failures: list[tuple[str, str]] = []  # (path, reason), found at read time (this process)
        self._bad: set[int] = set()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, indices: Sequence[int], transform: Callable | None = None) -> ImageFileDataset:
        """A view on some records (e.g. a validation split) with its own transform."""
        return ImageFileDataset([self.records[i] for i in indices], transform or self.transform, self.classes,
                                self.min_side)

    def _load(self, path: str) -> torch.Tensor:
        with Image.open(path) as image:
            if min(image.size) < self.min_side:
                raise ValueError(f"too small ({image.size[0]}x{image.size[1]}, min_side={self.min_side})")
            prepare = getattr(self.transform, "prepare", None)
            if prepare is not None:
                prepare(image)
            image.load()  # decode now so truncation raises here, inside the try of __getitem__
            return self.transform(image)

    def __getitem__(self, index: int) -> dict:
        n = len(self.records)
        index = int(index) % n if -n <= int(index) < n else None
        if index is None:
            raise IndexError(f"index out of range for {n} images")
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            record = self.records[j]
            try:
                image = self._load(record.path)
            except READ_ERRORS as error:
                self._bad.add(j)
                reason = f"unreadable at load time ({type(error).__name__}: {error})"
                self.read_failures.append((record.path, reason))
                warnings.warn(f"{record.path}: {reason}; using the next readable image instead",
                              SkippedImagesWarning, stacklevel=2)
                continue
            return {"image": image, "label": record.label, "caption": record.caption, "path": record.path}
        raise RuntimeError(f"none of the {n} images could be read; see dataset.read_failures")


def _default_transform(image_size: int, train: bool, crop_pct: float, random_crop: bool, hflip: float):
    if train:
        return ImageTransform(image_size, crop_pct=crop_pct, random_crop=random_crop, hflip=hflip)
    return ImageTransform(image_size, crop_pct=crop_pct)


class ImageFolderDataset(ImageFileDataset):
    """Class-per-subfolder tree. Indexing checks every file (see module docstring) and warns ONCE.

    Args:
        root: folder with one subfolder per class.
        image_size: output side ``S``.
        train: use the training transform (``random_crop`` and ``hflip``) instead of resize + center crop.
        transform: overrides the default transform (PIL image -> (3, S, S) tensor in [-1, 1]).
        min_side: files whose shorter side is below this are skipped.
        check: ``"header"`` (default), ``"full"`` (decode everything: slow, catches truncation) or ``"none"``.
        classes: fix the class list (for a validation tree that must use the training classes).
        threads: threads for the indexing check.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 64, train: bool = False,
                 transform: Callable | None = None, min_side: int = 16, check: str = "header",
                 crop_pct: float = 1.0, random_crop: bool = False, hflip: float = 0.5,
                 extensions: Sequence[str] = IMG_EXTENSIONS, classes: Sequence[str] | None = None,
                 threads: int = 8) -> None:
        records, classes = scan_class_tree(root, extensions, classes)
        reasons = _check_all([r.path for r in records], min_side, check, threads, f"checking {root}")
        skipped = [(r.path, why) for r, why in zip(records, reasons) if why is not None]
        _warn_skipped(skipped, len(records), str(root))
        kept = [r for r, why in zip(records, reasons) if why is None]
        if not kept:
            raise ValueError(f"no usable images under {str(root)!r}: all {len(records)} files were skipped "
                             f"(first: {skipped[0][0]}: {skipped[0][1]})")
        tf = transform or _default_transform(image_size, train, crop_pct, random_crop, hflip)
        super().__init__(kept, tf, classes, min_side, skipped)
        self.root = str(root)


class CaptionFolderDataset(ImageFileDataset):
    """Flat folder of images plus a captions file (CSV ``file,caption[,label]`` or JSONL).

    Missing images named by the captions file raise before any image is opened; unusable files are
    skipped with one warning like :class:`ImageFolderDataset`. Same arguments as that class, plus
    ``captions_file`` and ``root`` (default: the captions file's folder).
    """

    def __init__(self, captions_file: str | os.PathLike, root: str | os.PathLike | None = None,
                 image_size: int = 64, train: bool = False, transform: Callable | None = None,
                 min_side: int = 16, check: str = "header", crop_pct: float = 1.0, random_crop: bool = False,
                 hflip: float = 0.5, threads: int = 8) -> None:
        records, classes = read_captions(captions_file, root)
        reasons = _check_all([r.path for r in records], min_side, check, threads, f"checking {captions_file}")
        skipped = [(r.path, why) for r, why in zip(records, reasons) if why is not None]
        _warn_skipped(skipped, len(records), str(captions_file))
        kept = [r for r, why in zip(records, reasons) if why is None]
        if not kept:
            raise ValueError(f"no usable images listed in {str(captions_file)!r}: all {len(records)} were skipped "
                             f"(first: {skipped[0][0]}: {skipped[0][1]})")
        tf = transform or _default_transform(image_size, train, crop_pct, random_crop, hflip)
        super().__init__(kept, tf, classes, min_side, skipped)
        self.captions_file = str(captions_file)


def _split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Deterministic random split of ``range(n)``: one index array per fraction, the rest first."""
    order = np.random.default_rng(seed).permutation(n)
    sizes = [int(round(f * n)) if f > 0 else 0 for f in fractions]
    sizes = [max(1, s) if f > 0 else 0 for s, f in zip(sizes, fractions)]
    if sum(sizes) >= n:
        raise ValueError(f"split fractions {list(fractions)} leave no training images out of {n}")
    parts, start = [], n - sum(sizes)
    for s in sizes:
        parts.append(order[start:start + s])
        start += s
    return [order[: n - sum(sizes)], *parts]


class ImageFolderDataModule(LightningDataModule):
    """Train/val/test loaders for a class tree or a captions folder.

    Layouts (chosen automatically):
      * ``captions_file`` given: a flat folder + captions; val/test are random fractions (seeded),
        or ``val_captions_file`` for a fixed validation list.
      * ``root/train/<class>/`` and ``root/val/<class>/`` (ImageNet layout): those two; ``root/test/``
        if present, else the test loader reuses val.
      * ``root/<class>/``: one tree split randomly by ``val_fraction`` / ``test_fraction`` (seeded).
    Training uses ``random_crop`` + ``hflip``; val/test use resize + center crop (``crop_pct``).
    """

    def __init__(self, root: str, captions_file: str | None = None, val_captions_file: str | None = None,
                 image_size: int = 64, batch_size: int = 64, num_workers: int = 0, val_fraction: float = 0.05,
                 test_fraction: float = 0.0, seed: int = 0, crop_pct: float = 1.0, random_crop: bool = True,
                 hflip: float = 0.5, min_side: int = 16, check: str = "header", pin_memory: bool | None = None,
                 drop_last: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not Path(root).is_dir():
            raise FileNotFoundError(f"image root {root!r} does not exist or is not a directory")
        self.captions_file = self._resolve(captions_file)
        self.val_captions_file = self._resolve(val_captions_file)
        if check not in CHECK_MODES:
            raise ValueError(f"check must be one of {CHECK_MODES}, got {check!r}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"need 0 <= val_fraction, test_fraction and their sum < 1, got {val_fraction}, "
                             f"{test_fraction}")
        self.root, self.image_size, self.batch_size, self.num_workers = root, image_size, batch_size, num_workers
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.crop_pct, self.random_crop, self.hflip = crop_pct, random_crop, hflip
        self.min_side, self.check, self.drop_last = min_side, check, drop_last
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.datasets: dict[str, ImageFileDataset] = {}
        self._classes: tuple[str, ...] | None = None

    def _resolve(self, path: str | None) -> str | None:
        if path is None:
            return None
        for candidate in (Path(path), Path(self.hparams.root) / path):
            if candidate.is_file():
                return str(candidate)
        raise FileNotFoundError(f"captions file {path!r} not found (also looked in {self.hparams.root!r})")

    @property
    def split_layout(self) -> bool:
        root = Path(self.root)
        return self.captions_file is None and (root / "train").is_dir() and (root / "val").is_dir()

    @property
    def class_names(self) -> tuple[str, ...]:
        if self._classes is None:
            if "train" in self.datasets:
                self._classes = self.datasets["train"].classes
            elif self.captions_file is not None:
                self._classes = read_captions(self.captions_file, self.root)[1]
            else:
                tree = Path(self.root) / "train" if self.split_layout else Path(self.root)
                self._classes = scan_class_tree(tree)[1]
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _kwargs(self, train: bool) -> dict:
        return dict(image_size=self.image_size, train=train, min_side=self.min_side, check=self.check,
                    crop_pct=self.crop_pct, random_crop=self.random_crop, hflip=self.hflip)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        eval_tf = _default_transform(self.image_size, False, self.crop_pct, self.random_crop, self.hflip)
        if self.split_layout:
            root = Path(self.root)
            train = ImageFolderDataset(root / "train", **self._kwargs(True))
            val = ImageFolderDataset(root / "val", classes=train.classes, **self._kwargs(False))
            test = (ImageFolderDataset(root / "test", classes=train.classes, **self._kwargs(False))
                    if (root / "test").is_dir() else val)
            self.datasets = {"train": train, "val": val, "test": test}
            return
        if self.captions_file is not None:
            full: ImageFileDataset = CaptionFolderDataset(self.captions_file, self.root, **self._kwargs(True))
        else:
            full = ImageFolderDataset(self.root, **self._kwargs(True))
        fixed_val = (CaptionFolderDataset(self.val_captions_file, self.root, **self._kwargs(False))
                     if self.val_captions_file else None)
        val_fraction = 0.0 if fixed_val is not None else self.val_fraction
        train_idx, val_idx, test_idx = _split_indices(len(full), (val_fraction, self.test_fraction), self.seed)
        train = full.subset(train_idx)
        train.skipped = full.skipped
        val = fixed_val if fixed_val is not None else full.subset(val_idx, eval_tf)
        test = full.subset(test_idx, eval_tf) if len(test_idx) else val
        if len(val) == 0:
            raise ValueError(f"validation split is empty: set val_fraction > 0 or val_captions_file ({self.root!r})")
        self.datasets = {"train": train, "val": val, "test": test}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        return DataLoader(
            self.datasets[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0, drop_last=self.drop_last and shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
