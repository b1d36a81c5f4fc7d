"""Procedural shapes: the workbench's embedded default image data.

Every image shows 1..``max_count`` identical objects (same shape and colour) on a varied
background. Classes are ``shape x colour`` (5 x 6 = 30), ``label = shape * len(COLOURS) + colour``.
Each item also carries the attributes behind it (size, position, count) and a caption such as
``"a small red triangle in the top left"`` or ``"two large blue circles"``, so class-conditional
generation, image-text contrastive training and simple question answering all get real supervision.

Determinism: item ``i`` of split ``s`` is drawn from its own generator
``numpy.random.default_rng([seed, SPLITS[s], i])`` (a ``SeedSequence`` over the three integers),
so any item can be generated alone, every DataLoader worker agrees, and the three splits use
disjoint random streams. All scene parameters are drawn before anything that depends on the
resolution, so the same ``(seed, split, i)`` gives the same scene at every ``image_size``.

Rendering: the object mask is drawn with PIL at ``ss`` x the resolution (``ss`` = 4 up to 128 px,
2 above) and area-downsampled (``Image.reduce``) to an anti-aliased alpha; the background
(plain, linear/radial gradient, or low-contrast texture, always low-saturation and kept at
least ``MIN_CONTRAST`` RGB distance from the object colour) is computed at full resolution, the
two are alpha-composited, light pixel noise is added and the result is quantised to uint8
(so cached and on-the-fly items are bit-identical). About 0.1 ms per 32x32 image.
"""

from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from datasets.transforms import uint8_to_tensor

__all__ = [
    "COLOURS", "COLOUR_RGB", "POSITIONS", "SHAPES", "SIZES", "SPLITS", "ShapeScene", "ShapesDataModule",
    "ShapesDataset", "caption_for", "class_names", "draw_scene", "label_of", "object_coverage", "render", "sample_scene",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
# Saturated primaries/secondaries: pairwise RGB distance >= 0.8, far from any low-saturation background.
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.78, 0.15),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "magenta": (0.90, 0.12, 0.85),
    "cyan": (0.10, 0.85, 0.92),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
# position = row * 3 + col of the 3x3 cell holding the object's (or the group's mean) centre
POSITIONS: tuple[str, ...] = (
    "in the top left", "at the top", "in the top right",
    "on the left", "in the center", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
)
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 256

# Object radius as a fraction of the image side, per size; multiplied by _COUNT_SCALE[count - 1] so
# that three large objects still fit without overlapping. A polygon's circumradius is <= 1.1 radius.
_SIZE_RADIUS = (0.12, 0.175, 0.24)
_COUNT_SCALE = (1.0, 0.78, 0.66)
_EXTENT = 1.1  # circumradius / radius bound over all shapes (star tips, triangle corners)
_MARGIN = 0.02  # keep objects this far (image fraction) from the border
MIN_CONTRAST = 0.45  # min RGB distance (0..1 units) between object colour and either background colour
_COUNT_WORDS = ("a", "two", "three")


def class_names() -> tuple[str, ...]:
    """Names in label order: ``"red circle", "green circle", ..., "cyan diamond"``."""
    return tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOURS)


def label_of(shape: int, colour: int) -> int:
    return shape * len(COLOURS) + colour


def caption_for(shape: int, colour: int, size: int, position: int, count: int) -> str:
    """``"a small red triangle in the top left"`` for one object, ``"two large blue circles"`` else."""
    noun = SHAPES[shape] + ("s" if count > 1 else "")
    text = f"{_COUNT_WORDS[count - 1]} {SIZES[size]} {COLOURS[colour]} {noun}"
    return f"{text} {POSITIONS[position]}" if count == 1 else text


@dataclass(frozen=True)
class ShapeScene:
    """Resolution-independent description of one image (coordinates are fractions of the side)."""

    shape: int
    colour: int
    size: int
    position: int
    count: int
    centres: tuple[tuple[float, float], ...]  # (x, y) per object, y downwards
    radius: float
    rotation: float  # radians, shared by all objects
    rgb: tuple[float, float, float]  # object colour after brightness jitter
    background: int  # 0 plain, 1 linear gradient, 2 radial gradient, 3 texture (stripes)
    bg_colours: tuple[tuple[float, float, float], tuple[float, float, float]]
    bg_params: tuple[float, float, float, float]  # kind-specific: angle/centre/frequency/phase
    noise_std: float

    @property
    def label(self) -> int:
        return label_of(self.shape, self.colour)

    @property
    def caption(self) -> str:
        return caption_for(self.shape, self.colour, self.size, self.position, self.count)


def _hsv_background(u: np.ndarray) -> tuple[float, float, float]:
    # low saturation, any hue, mid-range value: never confusable with a saturated object colour
    return colorsys.hsv_to_rgb(float(u[0]), 0.35 * float(u[1]), 0.12 + 0.83 * float(u[2]))


def _cell(x: float, y: float) -> int:
    col = min(int(x * 3), 2)
    row = min(int(y * 3), 2)
    return row * 3 + col


def _pick(u: float, n: int) -> int:
    return min(int(u * n), n - 1)


def sample_scene(rng: np.random.Generator, max_count: int = 1, object_scale: float = 1.0) -> ShapeScene:
    """Draw every scene parameter from ``rng`` (nothing here depends on the resolution).

    ``object_scale`` multiplies every object radius (1.0: the default sizes, bit-identical scenes;
    smaller values give sparser scenes with more background, e.g. for token-dropping benchmarks).
    One vector of uniforms is drawn up front (a few microseconds instead of ~20 separate calls);
    rejection loops draw more only when needed.
    """
    u = rng.random(20)
    shape, colour, size = _pick(u[0], len(SHAPES)), _pick(u[1], len(COLOURS)), _pick(u[2], len(SIZES))
    count = 1 + _pick(u[3], max_count)
    radius = _SIZE_RADIUS[size] * _COUNT_SCALE[count - 1] * (0.92 + 0.16 * u[4]) * object_scale  # x 1.0 is exact
    extent = radius * _EXTENT
    lo, hi = extent + _MARGIN, 1.0 - extent - _MARGIN
    if count == 1:
        position = _pick(u[5], 9)
        row, col = divmod(position, 3)
        # centre inside its third (with a small gap to the cell border) and inside the image
        x0, x1 = max(lo, col / 3 + 0.02), min(hi, (col + 1) / 3 - 0.02)
        y0, y1 = max(lo, row / 3 + 0.02), min(hi, (row + 1) / 3 - 0.02)
        centres: tuple[tuple[float, float], ...] = ((x0 + (x1 - x0) * u[6], y0 + (y1 - y0) * u[7]),)
    else:
        min_dist = 2 * extent + 0.03
        centres = ()
        for _ in range(200):  # rejection sampling; count <= 3 and the scale table make this succeed fast
            pts = lo + (hi - lo) * rng.random((count, 2))
            d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(count) * 9
            if d.min() >= min_dist:
                centres = tuple((float(px), float(py)) for px, py in pts)
                break
        if not centres:  # deterministic fallback: evenly spaced row through the middle
            centres = tuple((float(px), 0.5) for px in np.linspace(lo, hi, count))
        position = _cell(sum(c[0] for c in centres) / count, sum(c[1] for c in centres) / count)
    rotation = 0.4 * (u[8] - 0.5)  # +-11 degrees: a square never becomes a diamond
    base = COLOUR_RGB[COLOURS[colour]]
    gain = 0.85 + 0.2 * u[9]
    rgb = tuple(min(max(b * gain + 0.08 * (j - 0.5), 0.0), 1.0) for b, j in zip(base, u[10:13]))
    background = _pick(u[13], 4)
    bg_u = u[14:20]
    for _ in range(20):
        c1, c2 = _hsv_background(bg_u[:3]), _hsv_background(bg_u[3:])
        if min(math.dist(c, rgb) for c in (c1, c2)) >= MIN_CONTRAST:
            break
        bg_u = rng.random(6)
    else:  # mid grey is >= 0.6 away from every named colour
        c1 = c2 = (0.5, 0.5, 0.5)
    bg_params = tuple(float(v) for v in rng.random(4))
    noise_std = 0.03 * float(rng.random())
    return ShapeScene(shape, colour, size, position, count, tuple((float(x), float(y)) for x, y in centres),
                      float(radius), float(rotation), tuple(float(v) for v in rgb), background,
                      (tuple(c1), tuple(c2)), bg_params, noise_std)


def _polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]  # area close to the circle's
    elif shape == "triangle":  # equilateral, apex up, circumradius 1.1
        pts = [(1.1 * math.cos(a), 1.1 * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":  # 5 points, inner radius 0.45 of the outer
        pts = [((1.1 if k % 2 == 0 else 0.5) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (1.1 if k % 2 == 0 else 0.5) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    elif shape == "diamond":  # rhombus taller than wide
        pts = [(0.0, -1.1), (0.72, 0.0), (0.0, 1.1), (-0.72, 0.0)]
    else:
        raise ValueError(f"not a polygon shape: {shape!r}")
    c, s = math.cos(rotation), math.sin(rotation)
    return [(cx + r * (c * px - s * py), cy + r * (s * px + c * py)) for px, py in pts]


def _supersample(image_size: int) -> int:
    return 4 if image_size <= 128 else 2


def object_coverage(scene: ShapeScene, image_size: int) -> np.ndarray:
    """Anti-aliased object coverage of a scene at ``image_size``, ``(H, W)`` float32 in [0, 1] (the alpha
    used when the scene is drawn; e.g. to find which patches show an object)."""
    _check_image_size(image_size)
    return _alpha(scene, image_size)


def _alpha(scene: ShapeScene, image_size: int) -> np.ndarray:
    """Anti-aliased object coverage, ``(H, W)`` float32 in [0, 1]."""
    ss = _supersample(image_size)
    side = image_size * ss
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    r = scene.radius * side
    for x, y in scene.centres:
        cx, cy = x * side, y * side
        if SHAPES[scene.shape] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        else:
            draw.polygon(_polygon(SHAPES[scene.shape], cx, cy, r, scene.rotation), fill=255)
    small = canvas.reduce(ss)  # box filter = exact area average of the supersampled coverage
    return np.frombuffer(small.tobytes(), dtype=np.uint8).reshape(image_size, image_size) * np.float32(1 / 255)


@functools.lru_cache(maxsize=8)
def _grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size  # pixel centres in (0, 1)
    return coords[None, :], coords[:, None]  # x (1, W), y (H, 1)


def _background(scene: ShapeScene, image_size: int) -> np.ndarray:
    """``(H, W, 3)`` float32 background in [0, 1]."""
    c1, c2 = (np.asarray(c, dtype=np.float32) for c in scene.bg_colours)
    p0, p1, p2, _ = scene.bg_params
    if scene.background == 0:  # plain
        out = np.empty((image_size, image_size, 3), dtype=np.float32)
        out[:] = c1
        return out
    xx, yy = _grid(image_size)
    if scene.background == 1:  # linear gradient along a random direction
        angle = 2 * math.pi * p0
        t = ((xx - 0.5) * (math.cos(angle) / 0.71) + (yy - 0.5) * (math.sin(angle) / 0.71)) + 0.5
        t = np.clip(t, 0, 1)
    elif scene.background == 2:  # radial gradient around a random centre
        t = np.sqrt((xx - p0) ** 2 + (yy - p1) ** 2) * (1.0 / (0.6 + 0.6 * p2))
        t = np.minimum(t, 1)
    else:  # low-contrast stripes (a simple texture): 3..9 periods across the image
        angle = math.pi * p0
        freq = 3 + 6 * p1
        phase = 2 * math.pi * (xx * (math.cos(angle) * freq) + yy * (math.sin(angle) * freq) + p2)
        t = np.sin(phase) * 0.175 + 0.175  # amplitude 0.35 of c2 - c1: texture, not a second object
    return c1 + t[..., None] * (c2 - c1)


def draw_scene(scene: ShapeScene, image_size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render ``scene`` to an ``(H, W, 3)`` uint8 array. ``rng`` supplies the pixel noise (none if None)."""
    _check_image_size(image_size)
    alpha = _alpha(scene, image_size)[..., None]  # (H, W, 1)
    image = _background(scene, image_size)  # (H, W, 3)
    image += alpha * (np.asarray(scene.rgb, dtype=np.float32) - image)  # alpha compositing
    if rng is not None and scene.noise_std > 0:
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(scene.noise_std)
    image *= 255.0
    image += 0.5
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8)


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not (
        MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE
    ):
        raise ValueError(
            f"image_size must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size!r}"
        )


def _item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def render(seed: int, split: str, index: int, image_size: int = 32, max_count: int = 1,
           object_scale: float = 1.0) -> tuple[np.ndarray, ShapeScene]:
    """Item ``index`` of ``split`` as ``(uint8 (H, W, 3) array, scene)``: a pure function of its arguments."""
    rng = _item_rng(seed, split, index)
    scene = sample_scene(rng, max_count, object_scale)  # resolution-independent draws first ...
    return draw_scene(scene, image_size, rng), scene  # ... then the per-pixel noise


class ShapesDataset(Dataset):
    """``num_samples`` procedural images of one split.

    Each item is a dict ``{"image": float32 (3, H, W) in [-1, 1], "label", "caption", "shape",
    "colour", "size", "position", "count"}`` (ints and a str, so the default collate works).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint random streams).
        num_samples: length of the split.
        image_size: side in pixels, 16..256.
        seed: dataset seed (>= 0); different seeds give different datasets.
        max_count: objects per image are drawn uniformly from ``1..max_count`` (<= 3).
        object_scale: factor on every object's radius, in (0, 1]; 1 keeps the default sizes
            (about 23% of 4x4-pixel patches of a 36-pixel image touch an object with max_count 3).
        cache: render the whole split once into a uint8 tensor (``N*3*H*W`` bytes, 61 MB for
            20k 32x32 images) instead of on every access; identical values either way.
        transform: optional callable applied to the ``(3, H, W)`` float tensor.
    """

    def __init__(self, split: str = "train", num_samples: int = 10000, image_size: int = 32, seed: int = 0,
                 max_count: int = 1, cache: bool = False, transform=None, object_scale: float = 1.0) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        _check_image_size(image_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if max_count not in (1, 2, 3):
            raise ValueError(f"max_count must be 1, 2 or 3, got {max_count!r}")
        if isinstance(object_scale, bool) or not isinstance(object_scale, (int, float)) or not 0 < object_scale <= 1:
            raise ValueError(f"object_scale must be a number in (0, 1], got {object_scale!r}")
        self.split, self.num_samples, self.image_size = split, num_samples, image_size
        self.seed, self.max_count, self.transform = seed, max_count, transform
        self.object_scale = float(object_scale)
        self._images: torch.Tensor | None = None  # (N, 3, H, W) uint8 when cached
        self._scenes: list[ShapeScene] | None = None
        if cache:
            self.build_cache()

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"ShapesDataset(split={self.split!r}, num_samples={self.num_samples}, "
                f"image_size={self.image_size}, seed={self.seed}, max_count={self.max_count}, "
                f"object_scale={self.object_scale}, "
                f"cached={self._images is not None})")

    @property
    def num_classes(self) -> int:
        return len(SHAPES) * len(COLOURS)

    @property
    def class_names(self) -> tuple[str, ...]:
        return class_names()

    def build_cache(self, num_workers: int = 0) -> None:
        """Render every item once into memory (progress bar for large splits).

        ``num_workers > 0`` renders chunks in DataLoader worker processes (items are pure functions
        of ``(seed, split, index)``, so the result is identical to the serial one).
        """
        if self._images is not None:
            return
        from tqdm.auto import tqdm

        s, n = self.image_size, self.num_samples
        images = torch.empty(n, 3, s, s, dtype=torch.uint8)
        scenes: list[ShapeScene] = []
        chunk = 512
        starts = range(0, n, chunk)
        job = _RenderChunks(self.seed, self.split, n, s, self.max_count, chunk, self.object_scale)
        chunks = (DataLoader(job, batch_size=None, num_workers=num_workers) if num_workers > 0 and n > chunk
                  else (job[k] for k in range(len(starts))))
        with tqdm(total=n, desc=f"rendering shapes/{self.split}", leave=False, mininterval=2.0,
                  disable=n < 5000) as bar:
            for start, (block, block_scenes) in zip(starts, chunks):
                images[start:start + len(block_scenes)] = block
                scenes.extend(block_scenes)
                bar.update(len(block_scenes))
        self._images, self._scenes = images, scenes

    def scene(self, index: int) -> ShapeScene:
        index = self._check_index(index)
        if self._scenes is not None:
            return self._scenes[index]
        return sample_scene(_item_rng(self.seed, self.split, index), self.max_count, self.object_scale)

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return index

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        if self._images is not None:
            scene = self._scenes[index]
            image = self._images[index].float().div_(127.5).sub_(1.0)
        else:
            array, scene = render(self.seed, self.split, index, self.image_size, self.max_count, self.object_scale)
            image = uint8_to_tensor(array)
        if self.transform is not None:
            image = self.transform(image)
        return {
            "image": image, "label": scene.label, "caption": scene.caption, "shape": scene.shape,
            "colour": scene.colour, "size": scene.size, "position": scene.position, "count": scene.count,
        }


class _RenderChunks(Dataset):
    """Chunk ``k`` = items ``[k * chunk, (k + 1) * chunk)`` as ``((B, 3, H, W) uint8, [scene, ...])``."""

    def __init__(self, seed: int, split: str, n: int, image_size: int, max_count: int, chunk: int,
                 object_scale: float = 1.0) -> None:
        self.seed, self.split, self.n, self.image_size, self.max_count, self.chunk = (
            seed, split, n, image_size, max_count, chunk)
        self.object_scale = object_scale

    def __len__(self) -> int:
        return (self.n + self.chunk - 1) // self.chunk

    def __getitem__(self, k: int) -> tuple[torch.Tensor, list[ShapeScene]]:
        items = [render(self.seed, self.split, i, self.image_size, self.max_count, self.object_scale)
                 for i in range(k * self.chunk, min((k + 1) * self.chunk, self.n))]
        block = torch.from_numpy(np.stack([a for a, _ in items])).permute(0, 3, 1, 2)  # (B, 3, H, W)
        return block, [scene for _, scene in items]


class ShapesDataModule(LightningDataModule):
    """Train/val/test splits of :class:`ShapesDataset` (predict uses the test split).

    ``pin_memory=None`` pins only when CUDA is available; ``persistent_workers`` is on whenever
    ``num_workers > 0``. With ``cache=True`` each split is rendered once in ``setup`` (main process,
    before workers fork, so workers share the tensor instead of re-rendering).
    """

    def __init__(self, image_size: int = 32, batch_size: int = 64, num_workers: int = 0, train_samples: int = 20000,
                 val_samples: int = 2000, test_samples: int = 2000, seed: int = 0, max_count: int = 1,
                 pin_memory: bool | None = None, cache: bool = True, drop_last: bool = False) -> None:
        super().__init__()
        _check_image_size(image_size)
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.save_hyperparameters()
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.samples = {"train": train_samples, "val": val_samples, "test": test_samples}
        self.seed, self.max_count, self.cache, self.drop_last = seed, max_count, cache, drop_last
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.datasets: dict[str, ShapesDataset] = {}

    @property
    def num_classes(self) -> int:
        return len(SHAPES) * len(COLOURS)

    @property
    def class_names(self) -> tuple[str, ...]:
        return class_names()

    def _dataset(self, split: str) -> ShapesDataset:
        if split not in self.datasets:
            dataset = ShapesDataset(split, self.samples[split], self.image_size, self.seed, self.max_count)
            if self.cache:  # rendered in the main process's setup, so loader workers share the tensor
                dataset.build_cache(num_workers=self.num_workers)
            self.datasets[split] = dataset
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage, ("train", "val", "test")):
            self._dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self._dataset(split), batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
            drop_last=self.drop_last and shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
