"""fp32 linear layers at decode row counts: ``F.linear`` vs packed weights (``vision.layers.packed_linears``).

Decoding multiplies a handful of rows (batch x CFG streams, times gamma + 1 in speculative verification)
by every weight matrix. MKL can pre-pack a weight for one row count (``torch.ops.mkl._mkl_linear``) and
oneDNN can reorder it into its blocked layout (``torch.ops.mkldnn._linear_pointwise``); this benchmark
times one call of each path per (layer shape, row count), all in the same run, interleaved, median of
``--repeats`` blocks of ``--calls`` calls, and prints the ratios. It is what ``vision.layers.PACKED_MIN_ROWS``
(packing only from 4 rows on) and the backend choice of ``VTW_PACKED_LINEAR=auto`` (MKL on Intel, oneDNN
elsewhere) rest on. The weights of one call fit in cache: decoding streams them from memory, which the
end-to-end ``bench_ar_decode.py`` measures.

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
    from vision.layers import PACKED_MIN_ROWS, packed_linear_available, packed_linear_backend, packs_rows

    backends = [b for b in ("mkl", "onednn") if packed_linear_available(b)]
    if not backends:
        raise SystemExit("bench_packed_linear: this torch build has neither MKL nor oneDNN packed linear ops")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    auto = packed_linear_backend("auto")
    rows_out = []
    for label, c_in, c_out in SHAPES:
        weight = torch.randn(c_out, c_in)
        for rows in args.rows:
            x = torch.randn(rows, c_in)
            fns = {"f_linear": lambda x=x, w=weight: F.linear(x, w)}
            if "mkl" in backends:
                packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
                fns["mkl"] = lambda x=x, w=weight, p=packed, r=rows: torch.ops.mkl._mkl_linear(x, p, w, None, r)
            if "onednn" in backends:
                blocked = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
                fns["onednn"] = lambda x=x, p=blocked: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
            ref = fns["f_linear"]()
            for name, fn in fns.items():
                if not torch.allclose(ref, fn(), atol=1e-4, rtol=1e-4):
                    raise SystemExit(f"bench_packed_linear: {name} result differs from F.linear at {label}, rows {rows}")
                _per_call_us(fn, 20)  # warm-up
            times = {name: [] for name in fns}
            for _ in range(args.repeats):  # interleaved blocks: load changes hit every path
                for name, fn in fns.items():
                    times[name].append(_per_call_us(fn, args.calls))
            med = {name: statistics.median(t) for name, t in times.items()}
            row = {"layer": label, "in": c_in, "out": c_out, "rows": rows, "f_linear_us": round(med["f_linear"], 1)}
            for name in backends:
                row[f"{name}_us"] = round(med[name], 1)
                row[f"{name}_speedup"] = round(med["f_linear"] / med[name], 2)
            row["workbench_uses"] = auto if packs_rows(auto, c_in * c_out, rows) else "f_linear"
            rows_out.append(row)
    meta = {"threads": args.threads, "calls": args.calls, "repeats": args.repeats,
            "packed_min_rows": PACKED_MIN_ROWS, "auto_backend": auto,
            "command": "python benchmarks/bench_packed_linear.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    save_table("packed_linear", rows_out, meta,
               notes="<backend>_speedup = F.linear time / packed time per call (median of the repeats, fp32, no autograd); "
                   "workbench_uses = the path packed_linears takes there with VTW_PACKED_LINEAR=auto.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
