"""``vtw synth-em out.h5 --shape 64 256 256 --seed 0``: write a synthetic EM volume (CREMI-layout HDF5)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output HDF5 path (written atomically)")
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--voxel-size", type=float, nargs=3, default=(40.0, 4.0, 4.0), metavar=("Z", "Y", "X"),
                        help="voxel size in nm, stored as the 'resolution' attribute")
    parser.add_argument("--no-organelles", action="store_true", help="omit mitochondria/vesicle blobs")


def run(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from datasets.synth_em import generate_synthetic_em, write_cremi_h5

    if min(args.shape) < 1:
        raise SystemExit(f"vtw synth-em: --shape must be positive, got {args.shape}")
    t0 = time.perf_counter()
    vol = generate_synthetic_em(tuple(args.shape), seed=args.seed, voxel_size=tuple(args.voxel_size),
                                organelles=not args.no_organelles)
    path = write_cremi_h5(args.out, vol.raw, vol.labels, resolution=vol.voxel_size)
    print(f"wrote {path}: raw {vol.raw.shape} uint8 at 'volumes/raw', {vol.n_cells} neurons "
          f"(ids 1..{int(np.max(vol.labels))}) at 'volumes/labels/neuron_ids', resolution {vol.voxel_size} nm "
          f"[{time.perf_counter() - t0:.1f}s]")
    return 0
