"""``vtw segment``: whole-volume neuron segmentation from an affinity checkpoint, with optional evaluation.

    vtw segment raw.h5[:key] --checkpoint seg.ckpt --out seg.h5 [--gt labels.h5:key] [--thresholds 0.1 0.3 0.5]

Sliding-window inference (MONAI, gaussian blending) -> affinities -> fragments -> waterz agglomeration at
each threshold (scikit-image/scipy fallback) -> HDF5 (``volumes/segmentation/threshold_<t>``,
``volumes/affinities``). With ``--gt``: VOI split/merge and adapted Rand error per threshold (JSON + table)
and a PNG of a few slices (raw, prediction, ground truth, errors). Inputs are checked before any work, and
outputs are written to temporary names then renamed (no half-written file on error).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("raw", help="raw volume: path or path:key (HDF5, zarr, TIFF); default key volumes/raw")
    parser.add_argument("--checkpoint", required=True, help="affinity fine-tuning checkpoint (.ckpt from vtw fit)")
    parser.add_argument("--out", required=True, help="output HDF5 file")
    parser.add_argument("--gt", default=None, help="ground-truth labels path[:key] (enables metrics)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--backend", choices=["auto", "waterz", "skimage"], default="auto")
    parser.add_argument("--report-dir", default=None, help="metrics JSON/Markdown and PNG (default: next to --out)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--normalize", choices=["minmax", "dtype"], default="minmax")


def _save_png(path, raw, seg, gt, z_slices) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def colour(lab):
        rng = np.random.default_rng(0)
        lut = rng.random((int(lab.max()) + 1, 3))
        lut[0] = 0
        return lut[lab % len(lut)]

    cols = 4 if gt is not None else 2
    fig, axes = plt.subplots(len(z_slices), cols, figsize=(3 * cols, 3 * len(z_slices)), squeeze=False)
    for r, z in enumerate(z_slices):
        panels = [("raw", raw[z], "gray"), ("prediction", colour(seg[z].astype(np.int64)), None)]
        if gt is not None:
            g = gt[z].astype(np.int64)
            s = seg[z].astype(np.int64)
            # error map: voxels whose gt-neighbour relation disagrees with the prediction's (split or merge)
            err = np.zeros(g.shape, bool)
            for ax in (0, 1):
                sg = np.diff(g, axis=ax) != 0
                ss = np.diff(s, axis=ax) != 0
                e = (sg != ss) & (np.delete(g, 0, axis=ax) != 0)
                if ax == 0:
                    err[1:] |= e
                else:
                    err[:, 1:] |= e
            panels += [("ground truth", colour(g), None), ("boundary errors", err, "magma")]
        for c, (title, img, cmap) in enumerate(panels):
            axes[r, c].imshow(img, cmap=cmap)
            axes[r, c].set_title(f"{title} z={z}", fontsize=8)
            axes[r, c].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import tempfile
    from pathlib import Path

    import h5py
    import numpy as np
    import torch
    from tqdm import tqdm

    from datasets.em import DEFAULT_LABEL_KEY, DEFAULT_RAW_KEY, check_pair, open_volume
    from vision.em_segmentation import (
        agglomerate,
        load_checkpoint_state,
        predict_affinities,
        segmentation_metrics,
    )
    from vision.tokenunify import SegMamba, segmamba_config
    from vision.towers import CheckpointMismatchError, load_state_dict_checked
    from workbench.benchutil import markdown_table

    # ---- validate inputs before any expensive work ----
    raw_vol = open_volume(args.raw, DEFAULT_RAW_KEY)
    gt_vol = open_volume(args.gt, DEFAULT_LABEL_KEY) if args.gt else None
    if gt_vol is not None:
        check_pair(raw_vol, gt_vol)
    state, hp = load_checkpoint_state(args.checkpoint)
    task = hp.get("task")
    if task != "affinity":
        raise SystemExit(f"vtw segment: {args.checkpoint} is not an affinity segmentation checkpoint "
                         f"(hyper_parameters task={task!r}; expected 'affinity', from AffinitySegLit)")
    offsets = hp.get("offsets") or [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    net = SegMamba(segmamba_config(hp.get("preset", "tiny"), out_chans=len(offsets), **dict(hp.get("model_overrides") or {})))
    prefix = "net."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        load_state_dict_checked(net, weights, str(args.checkpoint), what=f"the SegMamba '{hp.get('preset')}' model")
    except CheckpointMismatchError as err:
        raise SystemExit(f"vtw segment: {err}") from None
    if any(t <= 0 or t >= 1 for t in args.thresholds):
        raise SystemExit(f"vtw segment: thresholds must lie in (0, 1), got {args.thresholds}")
    roi = tuple(int(c) for c in hp.get("crop", (16, 80, 80)))
    out_path = Path(args.out)
    report_dir = Path(args.report_dir) if args.report_dir else out_path.parent / (out_path.stem + "_report")

    # ---- inference ----
    raw = raw_vol[:]
    if args.normalize == "minmax":
        lo, hi = float(raw.min()), float(raw.max())
        x = (raw.astype(np.float32) - lo) / (hi - lo + 1e-8)
    else:
        x = raw.astype(np.float32) / (np.iinfo(raw.dtype).max if raw.dtype.kind in "iu" else 1.0)
    print(f"[segment] {raw_vol.path}:{raw_vol.key} {raw.shape}, roi {roi}, overlap {args.overlap}")
    affs = predict_affinities(net, x, roi, overlap=args.overlap, batch_size=args.batch_size,
                              device=torch.device(args.device))
    gt = gt_vol[:] if gt_vol is not None else None

    # ---- agglomeration + writing (temp name, then rename) ----
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    rows = []
    segs = {}
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("volumes/affinities", data=affs.astype(np.float16), compression="gzip")
            for t, seg in tqdm(agglomerate(affs, args.thresholds, backend=args.backend), total=len(args.thresholds),
                               desc="agglomerate"):
                d = f.create_dataset(f"volumes/segmentation/threshold_{t:.2f}", data=seg, compression="gzip")
                d.attrs["resolution"] = np.asarray(raw_vol.resolution)
                segs[t] = seg
                row = {"threshold": t, "segments": int(len(np.unique(seg)))}
                if gt is not None:
                    row.update(segmentation_metrics(seg, gt))
                rows.append(row)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    print(markdown_table(rows))
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = {"raw": args.raw, "checkpoint": args.checkpoint, "out": str(out_path), "rows": rows}
    if gt is not None:
        best = min(rows, key=lambda r: r["voi"])
        summary["best"] = best
        print(f"[segment] best threshold {best['threshold']}: VOI {best['voi']:.4f} "
              f"(split {best['voi_split']:.4f}, merge {best['voi_merge']:.4f}), ARAND {best['arand']:.4f}")
        seg_for_png = segs[best["threshold"]]
    else:
        seg_for_png = segs[sorted(segs)[len(segs) // 2]]
    for name, text in (("metrics.json", json.dumps(summary, indent=2)), ("metrics.md", markdown_table(rows))):
        fd, tmpf = tempfile.mkstemp(dir=report_dir, prefix=f".{name}.")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmpf, report_dir / name)
    zs = sorted({0, raw.shape[0] // 2, raw.shape[0] - 1})
    _save_png(report_dir / "slices.png", x, seg_for_png, gt, zs)
    print(f"[segment] wrote {out_path} and {report_dir}/(metrics.json, metrics.md, slices.png)")
    return 0
