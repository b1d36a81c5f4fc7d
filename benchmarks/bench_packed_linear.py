"""fp32 linear layers at decode row counts: ``F.linear`` vs MKL-packed weights (``vision.layers.packed_linears``).

Decoding multiplies a handful of rows (batch x CFG streams, times gamma + 1 in speculative verification)
by every weight matrix. MKL can pre-pack a weight for one row count (``torch.ops.mkl._mkl_linear``); this
benchmark times one call of each path per (layer shape, row count), both in the same run, interleaved,
median of ``--repeats`` blocks of ``--calls`` calls, and prints the ratio. It is what
``vision.layers.PACKED_MIN_ROWS`` (packing only from 4 rows on) rests on.

Run: ``.venv/bin/python benchmarks/bench_packed_linear.py [--threads 1] [--rows 1 2 3 4 8 16]``
Writes ``runs/bench/packed_linear/results.{md,json}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.benchutil import save_table  # noqa: E402

# (label, in_features, out_features): the demo GPT (192 wide) and a GPT-B-shaped model (768 wide)
SHAPES = [
    ("demo GPT wqkv", 192, 576),
    ("demo GPT w1", 192, 512),
    ("demo GPT w2", 512, 192),
    ("GPT-B wqkv", 768, 2304),
    ("GPT-B wo", 768, 768),
    ("GPT-B w2", 2048, 768),
]


def _per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    from vision.layers import PACKED_MIN_ROWS, packed_linear_available

    if not packed_linear_available():
        raise SystemExit("bench_packed_linear: this torch build has no MKL packed sgemm ops (or VTW_PACKED_LINEAR=0)")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    rows_out = []
    for label, c_in, c_out in SHAPES:
        weight = torch.randn(c_out, c_in)
        for rows in args.rows:
            x = torch.randn(rows, c_in)
            packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
            plain_fn = lambda x=x, w=weight: F.linear(x, w)  # noqa: E731
            packed_fn = lambda x=x, w=weight, p=packed, r=rows: torch.ops.mkl._mkl_linear(x, p, w, None, r)  # noqa: E731
            if not torch.allclose(plain_fn(), packed_fn(), atol=1e-4, rtol=1e-4):
                raise SystemExit(f"bench_packed_linear: packed result differs from F.linear at {label}, rows {rows}")
            for fn in (plain_fn, packed_fn):  # warm-up
                _per_call_us(fn, 20)
            plain_t, packed_t = [], []
            for _ in range(args.repeats):  # interleaved blocks: load changes hit both paths
                plain_t.append(_per_call_us(plain_fn, args.calls))
                packed_t.append(_per_call_us(packed_fn, args.calls))
            plain_us, packed_us = statistics.median(plain_t), statistics.median(packed_t)
            rows_out.append({"layer": label, "in": c_in, "out": c_out, "rows": rows,
                             "f_linear_us": round(plain_us, 1), "packed_us": round(packed_us, 1),
                             "packed_speedup": round(plain_us / packed_us, 2),
                             "packed_by_workbench": rows >= PACKED_MIN_ROWS})
    meta = {"threads": args.threads, "calls": args.calls, "repeats": args.repeats,
            "packed_min_rows": PACKED_MIN_ROWS,
            "command": "python benchmarks/bench_packed_linear.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    save_table("packed_linear", rows_out, meta,
               notes="packed_speedup = F.linear time / packed time per call (median of the repeats, fp32, no autograd).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
