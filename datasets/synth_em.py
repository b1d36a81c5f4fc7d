"""Synthetic serial-section electron-microscopy volumes with exact ground-truth neuron ids.

The embedded default data for volumes (no download needed). The recipe follows the CPU-only plan of
the TokenUnify fact sheet (``shared/methods/unify_compress.md`` section 1.14): Voronoi-like neurites,
dark membranes at cell boundaries, optional organelles, blur and noise, anisotropic z.

Construction (all vectorised numpy / scipy):

1. Neurites are tubes elongated along z. Each cell c has a centre curve
   ``p_c(z) = p_c + a_c * sin(w_c z + phi_c)`` (a smooth random walk in y, x) and a weight ``w_c``.
   In every section z the label of an in-plane pixel q is the power-diagram cell
   ``argmin_c |q - p_c(z)|^2 - w_c`` (a Voronoi tessellation with curved sizes). Because the
   centres drift slowly, the cells form continuous neurites through z, and the z anisotropy
   (default voxel size 40 x 4 x 4 nm, CREMI) is reflected by the drift per section.
2. Membranes: pixels whose 4-neighbourhood in-plane holds another label (then dilated to
   ``membrane_width`` pixels) get a dark intensity.
3. Organelles (optional): mitochondria (dark ellipsoids with a darker rim) and vesicles (small dark
   dots), clipped to the inside of one cell so the labels stay exact.
4. Per-cell cytoplasm brightness, low-pass texture, Gaussian blur (smaller sigma in z), Gaussian noise,
   then quantisation to uint8.

The labels are the exact cells of step 1 (ids 1..n, uint64, dense like CREMI's ``neuron_ids``).
Everything is deterministic from ``seed``. :func:`write_cremi_h5` writes the CREMI layout
(``volumes/raw`` uint8, ``volumes/labels/neuron_ids`` uint64, ``resolution`` attributes) atomically.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

__all__ = ["SynthEMConfig", "SynthEMVolume", "generate_synthetic_em", "write_cremi_h5", "synth_em_to_h5"]


@dataclass
class SynthEMConfig:
    shape: tuple[int, int, int] = (32, 128, 128)  # (z, y, x) voxels
    voxel_size: tuple[float, float, float] = (40.0, 4.0, 4.0)  # nm, CREMI's anisotropy
    cell_diameter: float = 22.0  # mean in-plane neurite diameter in pixels
    drift: float = 0.6  # in-plane drift of a neurite centre per section, in pixels (z anisotropy)
    membrane_width: int = 2  # pixels
    membrane_intensity: float = 0.15
    cytoplasm_intensity: float = 0.68
    cell_contrast: float = 0.07  # std of the per-cell brightness offset
    texture: float = 0.05  # amplitude of low-pass cytoplasm texture
    mitochondria_per_mvox: float = 60.0  # per million voxels (0 disables)
    vesicles_per_mvox: float = 400.0
    blur_sigma: tuple[float, float, float] = (0.4, 1.0, 1.0)  # (z, y, x) pixels
    noise_std: float = 0.05


@dataclass
class SynthEMVolume:
    raw: np.ndarray  # (Z, Y, X) uint8
    labels: np.ndarray  # (Z, Y, X) uint64, ids 1..n_cells
    membrane: np.ndarray  # (Z, Y, X) bool, where the dark membrane was drawn
    voxel_size: tuple[float, float, float]
    n_cells: int


def _cell_labels(shape: tuple[int, int, int], cfg: SynthEMConfig, rng: np.random.Generator) -> np.ndarray:
    """Power-diagram labels per section with centres on smooth curves: (Z, Y, X) int64 ids >= 1."""
    nz, ny, nx = shape
    area = ny * nx
    n_cells = max(2, int(round(area / (np.pi * (cfg.cell_diameter / 2) ** 2) * 1.15)))
    # Centres over a margin-extended box so border cells are not clipped circles.
    margin = cfg.cell_diameter
    py = rng.uniform(-margin, ny + margin, n_cells)
    px = rng.uniform(-margin, nx + margin, n_cells)
    amp = rng.uniform(0.0, 1.0, (n_cells, 2)) * cfg.drift * 12.0
    freq = rng.uniform(0.5, 1.5, (n_cells, 2)) / 12.0
    phase = rng.uniform(0, 2 * np.pi, (n_cells, 2))
    weight = rng.normal(0.0, 0.25, n_cells) * (cfg.cell_diameter / 2) ** 2  # power-diagram weights
    z = np.arange(nz, dtype=np.float64)[:, None]  # (Z, 1)
    cy = py[None] + amp[None, :, 0] * np.sin(freq[None, :, 0] * z + phase[None, :, 0])  # (Z, n)
    cx = px[None] + amp[None, :, 1] * np.sin(freq[None, :, 1] * z + phase[None, :, 1])  # (Z, n)
    # Power distance |q - c|^2 - w_c equals the Euclidean distance to the lifted centre
    # (c, sqrt(W - w_c)) minus the constant W, so a KD-tree nearest-neighbour query is exact.
    lift = np.sqrt(weight.max() - weight + 1e-9)  # (n,)
    qy, qx = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
    queries = np.stack([qy.ravel(), qx.ravel(), np.zeros(area)], axis=1)  # (Y*X, 3)
    labels = np.empty(shape, dtype=np.int64)
    for k in range(nz):
        tree = cKDTree(np.stack([cy[k], cx[k], lift], axis=1))  # (n, 3)
        labels[k] = tree.query(queries, k=1)[1].reshape(ny, nx) + 1
    # Relabel to consecutive ids 1..n (cells that fall outside the crop disappear).
    present = np.bincount(labels.ravel(), minlength=n_cells + 1) > 0
    mapping = np.cumsum(present).astype(np.int64)  # old id -> new id
    return mapping[labels], int(present.sum())


def _inplane_boundaries(labels: np.ndarray, width: int) -> np.ndarray:
    """(Z, Y, X) bool: pixels with a different 4-neighbour in the same section, dilated in-plane."""
    b = np.zeros(labels.shape, dtype=bool)
    dy = labels[:, 1:, :] != labels[:, :-1, :]
    dx = labels[:, :, 1:] != labels[:, :, :-1]
    b[:, 1:, :] |= dy
    b[:, :, 1:] |= dx
    if width > 1:
        struct = np.zeros((1, 3, 3), dtype=bool)
        struct[0, 1, :] = struct[0, :, 1] = True
        b = ndi.binary_dilation(b, structure=struct, iterations=width - 1)
    return b


def _place_blobs(img: np.ndarray, labels: np.ndarray, inside: np.ndarray, count: int, radius_yx: tuple[float, float],
                 radius_z: tuple[float, float], value: float, rim: float | None, rng: np.random.Generator) -> None:
    """Draw ``count`` ellipsoids (in place), each clipped to the cell at its centre (labels stay exact)."""
    nz, ny, nx = img.shape
    for _ in range(count):
        z0, y0, x0 = rng.integers(0, nz), rng.integers(0, ny), rng.integers(0, nx)
        if not inside[z0, y0, x0]:
            continue
        ryx = rng.uniform(*radius_yx, size=2)
        rz = rng.uniform(*radius_z)
        sz, sy, sx = int(np.ceil(rz)), int(np.ceil(ryx[0])), int(np.ceil(ryx[1]))
        zs = slice(max(0, z0 - sz), min(nz, z0 + sz + 1))
        ys = slice(max(0, y0 - sy), min(ny, y0 + sy + 1))
        xs = slice(max(0, x0 - sx), min(nx, x0 + sx + 1))
        gz, gy, gx = np.ogrid[zs, ys, xs]
        r2 = ((gz - z0) / max(rz, 0.5)) ** 2 + ((gy - y0) / ryx[0]) ** 2 + ((gx - x0) / ryx[1]) ** 2
        same = (labels[zs, ys, xs] == labels[z0, y0, x0]) & inside[zs, ys, xs]
        body = (r2 <= 1.0) & same
        img[zs, ys, xs][body] = value
        if rim is not None:
            ring = (r2 > 0.6) & (r2 <= 1.0) & same
            img[zs, ys, xs][ring] = rim


def generate_synthetic_em(shape: tuple[int, int, int] = (32, 128, 128), seed: int = 0,
                          voxel_size: tuple[float, float, float] = (40.0, 4.0, 4.0),
                          organelles: bool = True, config: SynthEMConfig | None = None) -> SynthEMVolume:
    """Generate one synthetic EM volume; deterministic from ``seed``.

    Returns raw (Z, Y, X) uint8, labels (Z, Y, X) uint64 (exact cell ids, dense), the membrane mask.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"synthetic EM shape must be three positive ints (z, y, x), got {shape}")
    cfg = config or SynthEMConfig()
    cfg = SynthEMConfig(**{**asdict(cfg), "shape": shape, "voxel_size": tuple(float(v) for v in voxel_size)})
    rng = np.random.default_rng(seed)
    labels, n_cells = _cell_labels(shape, cfg, rng)
    membrane = _inplane_boundaries(labels, cfg.membrane_width)

    # Cytoplasm: per-cell brightness + low-pass texture.
    cell_offset = rng.normal(0.0, cfg.cell_contrast, n_cells + 1).astype(np.float32)
    img = cfg.cytoplasm_intensity + cell_offset[labels]  # (Z, Y, X) float32
    tex = rng.standard_normal(shape).astype(np.float32)
    tex = ndi.gaussian_filter(tex, sigma=(0.7, 2.0, 2.0))
    tex *= cfg.texture / (tex.std() + 1e-8)
    img += tex
    inside = ~membrane
    if organelles:
        mvox = np.prod(shape) / 1e6
        _place_blobs(img, labels, inside, int(rng.poisson(cfg.mitochondria_per_mvox * mvox)),
                     (3.0, 7.0), (1.0, 2.5), value=0.42, rim=0.25, rng=rng)
        _place_blobs(img, labels, inside, int(rng.poisson(cfg.vesicles_per_mvox * mvox)),
                     (1.0, 1.8), (0.5, 0.8), value=0.3, rim=None, rng=rng)
    img[membrane] = cfg.membrane_intensity
    img = ndi.gaussian_filter(img, sigma=cfg.blur_sigma)
    img += rng.normal(0.0, cfg.noise_std, shape).astype(np.float32)
    raw = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return SynthEMVolume(raw=raw, labels=labels.astype(np.uint64), membrane=membrane,
                         voxel_size=cfg.voxel_size, n_cells=n_cells)


def write_cremi_h5(path: str | os.PathLike, raw: np.ndarray, labels: np.ndarray | None = None,
                   resolution: tuple[float, float, float] = (40.0, 4.0, 4.0),
                   raw_key: str = "volumes/raw", label_key: str = "volumes/labels/neuron_ids",
                   chunks: tuple[int, int, int] | None = None) -> Path:
    """Write CREMI-layout HDF5 atomically (temporary name in the same folder, then rename)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if labels is not None and labels.shape != raw.shape:
        raise ValueError(f"{path}: raw shape {raw.shape} != labels shape {labels.shape}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        chunk = chunks or tuple(min(s, c) for s, c in zip(raw.shape, (8, 64, 64)))
        with h5py.File(tmp, "w") as f:
            d = f.create_dataset(raw_key, data=raw, chunks=chunk, compression="gzip", compression_opts=1)
            d.attrs["resolution"] = np.asarray(resolution, dtype=np.float64)
            if labels is not None:
                d = f.create_dataset(label_key, data=labels.astype(np.uint64), chunks=chunk, compression="gzip",
                                     compression_opts=1)
                d.attrs["resolution"] = np.asarray(resolution, dtype=np.float64)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def synth_em_to_h5(path: str | os.PathLike, shape: tuple[int, int, int] = (32, 128, 128), seed: int = 0,
                   voxel_size: tuple[float, float, float] = (40.0, 4.0, 4.0), organelles: bool = True) -> Path:
    """Generate a synthetic volume and write it as CREMI-layout HDF5; returns the path."""
    vol = generate_synthetic_em(shape, seed=seed, voxel_size=voxel_size, organelles=organelles)
    return write_cremi_h5(path, vol.raw, vol.labels, resolution=vol.voxel_size)
