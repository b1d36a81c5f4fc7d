"""Neuron segmentation from affinities: targets, loss, fine-tuning, sliding-window inference, agglomeration, metrics.

Follows TokenUnify's downstream pipeline (arXiv 2405.16847; ``shared/methods/unify_compress.md`` 1.8):

- targets: labels border-widened (a voxel whose in-plane 3x3 window holds more than one non-zero id is set to
  0), then nearest-neighbour affinities for offsets (-1,0,0), (0,-1,0), (0,0,-1) (channels z, y, x; optionally
  long-range): aff_c(v) = 1 iff labels(v) == labels(v + o_c) != 0;
- loss: weighted MSE, sum w (p - a)^2 / numel, with the minority class up-weighted (``weight_binary_ratio``);
- inference: MONAI ``sliding_window_inference`` (overlap 0.25, gaussian blending);
- post-processing: per-section watershed fragments on b = 1 - (aff_y + aff_x) / 2 seeded at the maxima of the
  distance transform of (b < 0.5), then waterz agglomeration (median affinity, TokenUnify's scoring) at a
  list of thresholds; a scikit-image/scipy fallback merges fragments by mean boundary affinity;
- metrics: VOI split = H(seg | gt), VOI merge = H(gt | seg) (in bits, log2, as scikit-image), adapted Rand error
  = 1 - F-score of pair precision/recall; voxels with gt label 0 ignored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

NN_OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
WATERZ_SCORING = "OneMinus<HistogramQuantileAffinity<RegionGraphType, 50, ScoreValue, 256, false>>"  # median

try:
    import waterz as _waterz
except ImportError:  # optional at runtime; the fallback below is used
    _waterz = None


# ------------------------------------------------------------------------------------------------------------
# Targets and loss
# ------------------------------------------------------------------------------------------------------------
def widen_border(labels: np.ndarray) -> np.ndarray:
    """Set to 0 every voxel whose in-plane 3x3 window contains more than one non-zero id. (..., Z, Y, X) -> same."""
    from scipy import ndimage as ndi

    lab = np.asarray(labels)
    big = np.iinfo(np.int64).max
    lab64 = lab.astype(np.int64)
    size = (1,) * (lab.ndim - 2) + (3, 3)  # in-plane window only
    mx = ndi.maximum_filter(lab64, size=size, mode="nearest")
    mn = ndi.minimum_filter(np.where(lab64 == 0, big, lab64), size=size, mode="nearest")
    out = lab.copy()
    out[(mn != big) & (mx != mn)] = 0
    return out


def seg_to_affinity(labels: torch.Tensor | np.ndarray, offsets: Sequence[Sequence[int]] = NN_OFFSETS) -> torch.Tensor:
    """Affinities from labels. labels (..., Z, Y, X) int -> (..., C, Z, Y, X) float32 in {0, 1}.

    aff_c(v) = 1 iff labels(v) == labels(v + offset_c) and labels(v) != 0; 0 where v + offset is outside."""
    lab = torch.as_tensor(np.asarray(labels).astype(np.int64) if isinstance(labels, np.ndarray) else labels)
    affs = []
    for off in offsets:
        shifted = torch.zeros_like(lab)
        src, dst = [], []
        for o, n in zip(off, lab.shape[-3:]):
            o = int(o)
            if abs(o) >= n:
                src.append(slice(0, 0))
                dst.append(slice(0, 0))
            elif o < 0:  # neighbour at v + o (earlier voxel)
                dst.append(slice(-o, None))
                src.append(slice(None, n + o))
            else:
                dst.append(slice(None, n - o if o else None))
                src.append(slice(o, None))
        shifted[(..., *dst)] = lab[(..., *src)]
        valid = torch.zeros_like(lab, dtype=torch.bool)
        valid[(..., *dst)] = True
        affs.append(((lab == shifted) & (lab != 0) & valid).float())
    return torch.stack(affs, dim=-4)


def weight_binary_ratio(target: torch.Tensor) -> torch.Tensor:
    """Per-voxel weights up-weighting the minority class (TokenUnify/Superhuman rule), f clipped to [0.05, 0.99]."""
    f = target.float().mean().clamp(0.05, 0.99)
    if f > 0.5:
        return torch.where(target > 0.5, torch.ones_like(target), torch.full_like(target, float(f / (1 - f))))
    return torch.where(target > 0.5, torch.full_like(target, float((1 - f) / f)), torch.ones_like(target))


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    w = weight_binary_ratio(target) if weight is None else weight
    return (w * (pred - target) ** 2).mean()


# ------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------
def _contingency(seg: np.ndarray, gt: np.ndarray, ignore_gt: Sequence[int]) -> Any:
    from scipy import sparse

    seg = np.asarray(seg).ravel()
    gt = np.asarray(gt).ravel()
    if seg.shape != gt.shape:
        raise ValueError(f"segmentation and ground truth differ in size: {seg.shape} vs {gt.shape}")
    keep = ~np.isin(gt, list(ignore_gt))
    _, gi = np.unique(gt[keep], return_inverse=True)
    _, si = np.unique(seg[keep], return_inverse=True)
    return sparse.coo_matrix((np.ones(gi.size), (gi, si))).tocsr()  # (n_gt, n_seg) counts


def voi(seg: np.ndarray, gt: np.ndarray, ignore_gt: Sequence[int] = (0,)) -> tuple[float, float]:
    """(VOI split, VOI merge) = (H(seg|gt), H(gt|seg)) in bits, voxels with gt in ``ignore_gt`` ignored."""
    cont = _contingency(seg, gt, ignore_gt)
    n = cont.sum()
    if n == 0:
        return 0.0, 0.0
    p = cont.data / n
    rows = np.repeat(np.arange(cont.shape[0]), np.diff(cont.indptr))
    p_gt = np.asarray(cont.sum(1)).ravel() / n
    p_seg = np.asarray(cont.sum(0)).ravel() / n
    h_seg_given_gt = -np.sum(p * np.log2(p / p_gt[rows]))  # bits, as scikit-image (and TokenUnify's numbers)
    h_gt_given_seg = -np.sum(p * np.log2(p / p_seg[cont.indices]))
    return float(max(h_seg_given_gt, 0.0)) + 0.0, float(max(h_gt_given_seg, 0.0)) + 0.0  # no -0.0


def adapted_rand(seg: np.ndarray, gt: np.ndarray, ignore_gt: Sequence[int] = (0,)) -> float:
    """Adapted Rand error (1 - F-score of pair precision and recall), as scikit-image's ``adapted_rand_error``."""
    cont = _contingency(seg, gt, ignore_gt)
    n = cont.sum()
    if n == 0:
        return 0.0
    sum_p2 = float(cont.data @ cont.data) - n
    a = np.asarray(cont.sum(1)).ravel()
    b = np.asarray(cont.sum(0)).ravel()
    sum_a2, sum_b2 = float(a @ a) - n, float(b @ b) - n
    if sum_a2 + sum_b2 == 0:
        return 0.0
    return float(1.0 - 2.0 * sum_p2 / (sum_a2 + sum_b2))


def segmentation_metrics(seg: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    split, merge = voi(seg, gt)
    return {"voi_split": split, "voi_merge": merge, "voi": split + merge, "arand": adapted_rand(seg, gt)}


# ------------------------------------------------------------------------------------------------------------
# Fragments and agglomeration
# ------------------------------------------------------------------------------------------------------------
def watershed_fragments(affs: np.ndarray, boundary_threshold: float = 0.5, min_distance: int = 2) -> np.ndarray:
    """Per-section 2D watershed fragments: affs (3, Z, Y, X) -> (Z, Y, X) uint64 ids (unique across sections)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    b = 1.0 - 0.5 * (affs[1] + affs[2])  # (Z, Y, X) boundary map
    frags = np.zeros(b.shape, dtype=np.uint64)
    next_id = 1
    for z in range(b.shape[0]):
        dist = ndi.distance_transform_edt(b[z] < boundary_threshold)
        peaks = (dist == ndi.maximum_filter(dist, size=2 * min_distance + 1)) & (dist > 0)
        markers, n = ndi.label(peaks)
        if n == 0:
            frags[z] = next_id
            next_id += 1
            continue
        ws = watershed(b[z], markers)
        frags[z] = ws.astype(np.uint64) + (next_id - 1)
        next_id += n
    return frags


def _agglomerate_fallback(affs: np.ndarray, fragments: np.ndarray, thresholds: Sequence[float]) -> Iterator[np.ndarray]:
    """Merge adjacent fragments whose mean boundary affinity exceeds 1 - threshold (union-find, per threshold)."""
    edges: dict[tuple[int, int], list[float]] = {}
    for c, axis in enumerate((0, 1, 2)):
        a = np.moveaxis(fragments, axis, 0)
        aff = np.moveaxis(affs[c], axis, 0)[1:]  # affinity of v to v - e_axis
        u, v = a[1:].ravel(), a[:-1].ravel()
        w = aff.ravel()
        diff = u != v
        lo, hi = np.minimum(u[diff], v[diff]), np.maximum(u[diff], v[diff])
        key = lo.astype(np.uint64) * np.uint64(2**32) + hi.astype(np.uint64)
        order = np.argsort(key)
        key, ws = key[order], w[diff][order]
        uniq, start = np.unique(key, return_index=True)
        sums = np.add.reduceat(ws, start) if ws.size else np.array([])
        counts = np.diff(np.append(start, ws.size))
        for k, s, n in zip(uniq, sums, counts):
            e = (int(k >> np.uint64(32)), int(k & np.uint64(2**32 - 1)))
            acc = edges.setdefault(e, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(n)
    ids = np.unique(fragments)
    for t in thresholds:
        parent = {int(i): int(i) for i in ids}

        def find(x: int, parent: dict[int, int] = parent) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for (a, b), (s, n) in sorted(edges.items(), key=lambda kv: -kv[1][0] / kv[1][1]):
            if 1.0 - s / n < t:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[rb] = ra
        lut_keys = np.array(list(parent), dtype=np.uint64)
        lut_vals = np.array([find(int(k)) for k in lut_keys], dtype=np.uint64)
        idx = np.searchsorted(lut_keys, fragments)
        yield lut_vals[idx]


def agglomerate(affs: np.ndarray, thresholds: Sequence[float], fragments: np.ndarray | None = None,
                backend: str = "auto") -> Iterator[tuple[float, np.ndarray]]:
    """Yield (threshold, segmentation (Z, Y, X) uint64) for each threshold (ascending)."""
    affs = np.ascontiguousarray(affs[:3], dtype=np.float32)
    if fragments is None:
        fragments = watershed_fragments(affs)
    thresholds = sorted(float(t) for t in thresholds)
    use_waterz = backend == "waterz" or (backend == "auto" and _waterz is not None)
    if backend == "waterz" and _waterz is None:
        raise RuntimeError("waterz is not installed (pip install waterz); use backend='skimage'")
    if use_waterz:
        gen = _waterz.agglomerate(affs, thresholds, fragments=np.ascontiguousarray(fragments, dtype=np.uint64),
                                  scoring_function=WATERZ_SCORING, discretize_queue=256)
        for t, seg in zip(thresholds, gen):
            yield t, np.array(seg, dtype=np.uint64, copy=True)
    else:
        log.warning("waterz unavailable: using the scipy mean-affinity agglomeration fallback")
        for t, seg in zip(thresholds, _agglomerate_fallback(affs, fragments, thresholds)):
            yield t, seg


# ------------------------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_affinities(net: nn.Module, raw: np.ndarray, roi: Sequence[int], overlap: float = 0.25,
                       batch_size: int = 2, device: str | torch.device = "cpu", progress: bool = True) -> np.ndarray:
    """Whole-volume sliding-window inference with gaussian blending: raw (Z, Y, X) float in [0, 1] -> (C, Z, Y, X).

    Volumes smaller than the ROI are padded (reflect) and cropped back."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))[None, None].to(device)
    pad = [max(0, int(r) - s) for r, s in zip(roi, x.shape[-3:])]
    if any(pad):
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
    net = net.to(device).eval()
    out = sliding_window_inference(x, tuple(int(r) for r in roi), batch_size, lambda t: torch.sigmoid(net(t)),
                                   overlap=overlap, mode="gaussian", progress=progress)
    out = out[0, :, :raw.shape[0], :raw.shape[1], :raw.shape[2]]
    return out.float().cpu().numpy()


# ------------------------------------------------------------------------------------------------------------
# Pretrained weights
# ------------------------------------------------------------------------------------------------------------
_PREFIXES = ("model.net.", "net.", "model.", "module.", "")


def load_checkpoint_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, hyper_parameters) from a Lightning .ckpt, a torch state dict or a .safetensors file."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path), {}
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a checkpoint dictionary")
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], dict):
            return obj[key], dict(obj.get("hyper_parameters", {}))
    return obj, {}


def load_matching_weights(net: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                          verbose: bool = True) -> dict[str, list[str]]:
    """Copy every tensor whose name (after stripping a known prefix) and shape match; report the rest.

    Returns {"loaded", "missing", "shape_mismatch", "unexpected"}; raises when nothing loaded."""
    target = net.state_dict()
    loaded, mismatch, unexpected = {}, [], []
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix) and key[len(prefix):] in target:
                name = key[len(prefix):]
                if target[name].shape == value.shape:
                    loaded[name] = value
                else:
                    mismatch.append(f"{name} {tuple(value.shape)} != {tuple(target[name].shape)}")
                break
        else:
            unexpected.append(key)
    if not loaded:
        raise ValueError(f"{source}: no weights matched the model (0 of {len(target)} keys; first checkpoint keys: "
                         f"{list(state)[:5]})")
    net.load_state_dict({**target, **loaded})
    report = {"loaded": sorted(loaded), "missing": sorted(set(target) - set(loaded)), "shape_mismatch": mismatch,
              "unexpected": unexpected}
    if verbose:
        print(f"[weights] {source}: loaded {len(loaded)}/{len(target)} tensors; "
              f"{len(report['missing'])} not loaded (e.g. {report['missing'][:4]}); "
              f"{len(mismatch)} shape mismatches {mismatch[:3]}; {len(unexpected)} unexpected keys")
    return report
