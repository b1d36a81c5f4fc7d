"""Mamba scan speed and cost growth on CPU (fp32).

Part 1 (speed): one Mamba layer, d_model 256, d_state 16, expand 2, batch 2, fp32: the workbench's chunked
scan vs the ``mambapy`` package's parallel scan (``MambaBlock``, pscan) vs Hugging Face transformers'
``MambaMixer`` slow path (sequential loop), all with the SAME weights (outputs compared), forward and
forward+backward at sequence length 4096, and peak forward memory at 16384 tokens (each memory
figure from a fresh subprocess: peak RSS minus RSS before the call).

Part 2 (cost growth): time and peak memory of the Mamba layer vs a causal self-attention layer of the
same width (QKV projection + ``scaled_dot_product_attention(is_causal=True)`` + output projection) from
1k to 16k tokens, with fitted log-log exponents.

Usage::

    python benchmarks/bench_mamba_scan.py                  # defaults (about 2-4 min on 2 cores)
    python benchmarks/bench_mamba_scan.py --threads 2 --speed-length 4096 --mem-length 16384
    python benchmarks/bench_mamba_scan.py --quick          # small lengths, smoke test

Tables are printed and written to runs/bench/mamba_scan/ and runs/bench/mamba_cost_growth/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

D_MODEL, D_STATE, EXPAND, BATCH = 256, 16, 2, 2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(impl: str, seed: int = 0, chunk: int | None = None):
    """Return a module mapping (B, L, d_model) -> (B, L, d_model); all Mamba variants share weights."""
    import torch

    from vision.mamba import Mamba, MambaConfig

    torch.manual_seed(seed)
    ours = Mamba(MambaConfig(d_model=D_MODEL, d_state=D_STATE, expand=EXPAND, scan_mode="chunked", chunk=chunk))
    if impl == "ours":
        return ours
    if impl == "ours_tri":
        return Mamba(MambaConfig(d_model=D_MODEL, d_state=D_STATE, expand=EXPAND, scan_mode="chunked",
                                 directions=("fwd", "bwd", "slice")))
    if impl == "mambapy":
        from mambapy.mamba import MambaBlock
        from mambapy.mamba import MambaConfig as MPConfig

        m = MambaBlock(MPConfig(d_model=D_MODEL, n_layers=1, d_state=D_STATE, expand_factor=EXPAND, pscan=True))
        missing = m.load_state_dict(ours.state_dict(), strict=True)
        assert not missing.missing_keys
        return m
    if impl == "hf_slow":
        from transformers import MambaConfig as HFConfig
        from transformers.models.mamba.modeling_mamba import MambaMixer

        cfg = HFConfig(hidden_size=D_MODEL, state_size=D_STATE, expand=EXPAND, conv_kernel=4, use_mambapy=False,
                       num_hidden_layers=1)
        m = MambaMixer(cfg, layer_idx=0)
        m.load_state_dict(ours.state_dict(), strict=True)
        return m.eval()
    if impl == "sdpa":
        return CausalAttention(D_MODEL)
    raise ValueError(impl)


class CausalAttention:  # plain class wrapper built lazily so torch is imported only in workers
    def __new__(cls, dim: int, heads: int = 4):
        import torch.nn as nn
        import torch.nn.functional as F

        class _Attn(nn.Module):
            def __init__(self):
                super().__init__()
                self.qkv, self.proj, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

            def forward(self, x):  # (B, L, C)
                b, length, c = x.shape
                q, k, v = self.qkv(x).view(b, length, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, L, c/h)
                return self.proj(y.transpose(1, 2).reshape(b, length, c))

        return _Attn()


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process: time and/or peak memory of forward / forward+backward."""
    import torch

    torch.set_num_threads(spec["threads"])
    model = build(spec["impl"], chunk=spec.get("chunk"))
    x = torch.randn(BATCH, spec["length"], D_MODEL)
    out: dict = {}
    if spec["what"] == "mem":
        import gc

        gc.collect()
        base = _rss_bytes()
        if not _reset_peak():
            raise RuntimeError("cannot reset the peak-RSS mark (/proc/self/clear_refs)")
        with torch.no_grad():
            model(x)
        out["peak_mib"] = (_peak_bytes() - base) / 2**20
        return out
    with torch.no_grad():
        out["fwd_s"] = time_call(lambda: model(x), spec["repeats"])
    if spec.get("backward"):
        xg = x.clone().requires_grad_()

        def fb():
            model(xg).sum().backward()

        out["fwdbwd_s"] = time_call(fb, spec["repeats"])
    return out


def run_worker(spec: dict) -> dict:
    res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])})
    if res.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_same_outputs(length: int) -> dict:
    import torch

    x = torch.randn(BATCH, length, D_MODEL)
    with torch.no_grad():
        ref = build("ours")(x)
        return {name: float((build(name)(x) - ref).abs().max()) for name in ("mambapy", "hf_slow")}


def fit_exponent(lengths, values) -> float:
    import numpy as np

    return float(np.polyfit(np.log(lengths), np.log(values), 1)[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--speed-length", type=int, default=4096)
    p.add_argument("--mem-length", type=int, default=16384)
    p.add_argument("--growth-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-hf", action="store_true", help="skip the (slow) transformers reference")
    p.add_argument("--skip-growth", action="store_true")
    p.add_argument("--chunks", type=int, nargs="*", default=[], help="also time the chunked scan at these chunk lengths")
    p.add_argument("--quick", action="store_true", help="small lengths (smoke test)")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.speed_length, args.mem_length, args.growth_lengths, args.repeats = 512, 1024, [256, 512, 1024], 1

    from workbench.benchutil import save_table

    diffs = check_same_outputs(256)
    print(f"max |output - ours| at L=256 with shared weights: {diffs}")
    common = dict(threads=args.threads, repeats=args.repeats)
    rows = []
    impls = ["ours", "ours_tri", "mambapy"] + ([] if args.skip_hf else ["hf_slow"])
    for impl in impls:
        spec = dict(common, impl=impl, length=args.speed_length, what="time", backward=impl != "hf_slow")
        try:
            t = run_worker(spec)
        except RuntimeError as err:  # e.g. another transformers version: report, keep the other rows
            print(f"{impl}: {err}", file=sys.stderr)
            continue
        m = run_worker(dict(common, impl=impl, length=args.mem_length, what="mem")) if impl != "hf_slow" else {}
        rows.append({"impl": impl, "L": args.speed_length, "fwd_s": t["fwd_s"], "fwdbwd_s": t.get("fwdbwd_s"),
                     f"peak_fwd_MiB@{args.mem_length}": m.get("peak_mib"),
                     "max_abs_diff_vs_ours": diffs.get(impl, 0.0)})
        print(rows[-1], flush=True)
    for chunk in args.chunks:
        t = run_worker(dict(common, impl="ours", length=args.speed_length, what="time", backward=True, chunk=chunk))
        rows.append({"impl": f"ours_chunk{chunk}", "L": args.speed_length, "fwd_s": t["fwd_s"],
                     "fwdbwd_s": t["fwdbwd_s"]})
        print(rows[-1], flush=True)
    by = {r["impl"]: r for r in rows}
    mem_key = f"peak_fwd_MiB@{args.mem_length}"
    summary = {
        "fwd_speedup_vs_mambapy": by["mambapy"]["fwd_s"] / by["ours"]["fwd_s"],
        "fwdbwd_speedup_vs_mambapy": by["mambapy"]["fwdbwd_s"] / by["ours"]["fwdbwd_s"],
        "peak_mem_ratio_ours_over_mambapy": by["ours"][mem_key] / by["mambapy"][mem_key],
    }
    if "hf_slow" in by and by["hf_slow"].get("fwd_s"):
        summary["fwd_speedup_vs_hf_slow"] = by["hf_slow"]["fwd_s"] / by["ours"]["fwd_s"]
    meta = {"d_model": D_MODEL, "d_state": D_STATE, "expand": EXPAND, "batch": BATCH, "dtype": "fp32",
            "threads": args.threads, "note": "ours_tri = TokenUnify 3-direction block (3 scans)", **summary}
    notes = "\n".join(f"- {k}: {v:.2f}" for k, v in summary.items())
    save_table("mamba_scan", rows, meta, notes=notes)

    if not args.skip_growth:
        grow = []
        for length in args.growth_lengths:
            row = {"L": length}
            for impl in ("ours", "sdpa"):
                t = run_worker(dict(common, impl=impl, length=length, what="time", backward=False))
                m = run_worker(dict(common, impl=impl, length=length, what="mem"))
                row[f"{impl}_fwd_s"], row[f"{impl}_peak_MiB"] = t["fwd_s"], m["peak_mib"]
            grow.append(row)
            print(row, flush=True)
        lengths = [r["L"] for r in grow]
        fits = {f"{impl}_time_exponent": fit_exponent(lengths, [r[f"{impl}_fwd_s"] for r in grow])
                for impl in ("ours", "sdpa")}
        fits.update({f"{impl}_mem_exponent": fit_exponent(lengths, [max(r[f"{impl}_peak_MiB"], 1e-3) for r in grow])
                     for impl in ("ours", "sdpa")})
        save_table("mamba_cost_growth", grow, {"threads": args.threads, "mamba": "chunked scan, 1 direction",
                                               "attention": "causal SDPA, 4 heads", **fits},
                   notes="\n".join(f"- {k}: {v:.3f}" for k, v in fits.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
