"""Decoding throughput of the workbench GPT vs Hugging Face and LlamaGen, with the bandwidth bound.

Setting (issue 5): a GPT-B-shaped model (12 layers, d 768, 12 heads, vocabulary 16384) with random
weights (the zero-initialised output layer is re-drawn N(0, 0.02) so sampling is realistic), fp32, this
CPU, 8 images with classifier-free guidance (16 rows), 256 tokens, plain multinomial sampling.

Compared side by side in one process, interleaved, median of ``--repeats`` runs after a warm-up:
* ``workbench``: :func:`ar_gen.sampling.generate` (static KV cache, decode attends to filled slots only,
  linears on packed weights: MKL's on Intel, oneDNN's elsewhere, ``VTW_PACKED_LINEAR`` picks one);
  ``workbench-unpacked``: the same loop on ``F.linear``;
* ``hf-static``: transformers ``LlamaForCausalLM.generate(cache_implementation="static")`` on the same
  shape and the same 16 rows (no CFG arithmetic: HF has none; this is LANTERN's timing baseline);
* ``llamagen``: LlamaGen's own ``generate`` (FoundationVision/LlamaGen ``autoregressive/models``), only
  when ``--llamagen-path`` points to a checkout of it (its code is not part of this project).

Reported: rows-tokens/s (one row = one cond or uncond stream), image-tokens/s, the fraction of the
memory-bandwidth bound (weights + the filled KV cache read once per step, bandwidth measured here with a
large copy), peak extra RSS during generation, the KV-cache formula, and the cost growth of one image
(CFG) at 64 / 256 / 1024 tokens with the fitted exponent of time ~ tokens^a.

Run: ``.venv/bin/python benchmarks/bench_ar_decode.py [--llamagen-path /tmp/LlamaGen] [--quick]``
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ar_gen.gpt import GPT, gpt_config  # noqa: E402
from ar_gen.sampling import SamplingConfig, generate  # noqa: E402
from vision.layers import packed_linear_available, packed_linear_backend  # noqa: E402
from workbench.benchutil import save_table  # noqa: E402

VOCAB, DIM, LAYERS, HEADS, HIDDEN = 16384, 768, 12, 12, 2048


class PeakRSS:
    """Peak resident-set growth (bytes) of this process while the ``with`` block runs (5 ms sampling)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def measure_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth (read + write bytes / s) of a large fp32 buffer, best of ``repeats``."""
    src = torch.randn(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def build_workbench(block_size: int) -> GPT:
    torch.manual_seed(0)
    model = GPT(gpt_config("GPT-B", vocab_size=VOCAB, block_size=block_size, num_classes=1000)).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)
    return model


def build_hf(max_pos: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=max_pos,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                      pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    return model


def build_llamagen(path: str, block_size: int):
    path = str(Path(path).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    from autoregressive.models.generate import generate as lg_generate  # type: ignore[import-not-found]
    from autoregressive.models.gpt import GPT_models  # type: ignore[import-not-found]

    torch.manual_seed(0)
    model = GPT_models["GPT-B"](vocab_size=VOCAB, block_size=block_size, num_classes=1000, cls_token_num=1,
                                model_type="c2i").eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)  # zero-init head -> all ties otherwise
    return model, lg_generate


def run_workbench(model: GPT, n_img: int, tokens: int, cfg_scale: float, packed: bool = True) -> float:
    labels = torch.arange(n_img) % 1000
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    out = generate(model, labels, SamplingConfig(cfg_scale=cfg_scale), num_tokens=tokens, generator=g,
                   packed_weights=packed)
    dt = time.perf_counter() - t0
    assert out.shape == (n_img, tokens)
    return dt


def run_hf(model, rows: int, tokens: int) -> float:
    ids = torch.zeros(rows, 1, dtype=torch.long)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                         do_sample=True, top_k=0, top_p=1.0, temperature=1.0, cache_implementation="static",
                         pad_token_id=0)
    dt = time.perf_counter() - t0
    assert out.shape == (rows, tokens + 1), out.shape
    return dt


def run_llamagen(bundle, n_img: int, tokens: int, cfg_scale: float) -> float:
    model, lg_generate = bundle
    labels = torch.arange(n_img) % 1000
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = lg_generate(model, labels, tokens, cfg_scale=cfg_scale, cfg_interval=-1, temperature=1.0, top_k=0,
                          top_p=1.0, sample_logits=True)
    dt = time.perf_counter() - t0
    assert out.shape[-1] == tokens
    return dt


def step_bytes(model: GPT, rows: int, tokens: int, kv_slots_read: str = "filled") -> float:
    """Bytes read per decode step: all non-embedding weights + the KV cache (mean over the steps)."""
    c = model.config
    weights = sum(p.numel() for n, p in model.named_parameters() if "embedding" not in n) * 4
    per_slot = 2 * c.n_layer * rows * c.dim * 4  # k and v, every layer, every row, fp32
    if kv_slots_read == "filled":  # slots 1..P+N over the steps
        mean_slots = c.cls_token_num + (tokens + 1) / 2
    else:  # whole static cache every step (LlamaGen / HF static)
        mean_slots = ((c.cls_token_num + tokens + 7) // 8) * 8
    return weights + per_slot * mean_slots


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--llamagen-path", default=None, help="a checkout of FoundationVision/LlamaGen (not shipped)")
    ap.add_argument("--growth", type=int, nargs="*", default=[64, 256, 1024], help="token counts for cost growth")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--quick", action="store_true", help="64 tokens, 1 repeat, growth 16/64 (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeats, args.growth = 64, 1, [16, 64]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    rows = 2 * args.images if args.cfg_scale != 1.0 else args.images
    side = math.isqrt(args.tokens)
    block = side * side
    if block != args.tokens:
        raise SystemExit(f"--tokens must be a square number (token grid), got {args.tokens}")

    bw = measure_bandwidth_gbs()
    wb = build_workbench(block)
    runners: dict[str, callable] = {"workbench": lambda: run_workbench(wb, args.images, block, args.cfg_scale)}
    if packed_linear_available():  # the same loop on F.linear: what the packed weights contribute
        runners["workbench-unpacked"] = lambda: run_workbench(wb, args.images, block, args.cfg_scale, packed=False)
    notes = []
    if not args.skip_hf:
        hf = build_hf(block + 16)
        runners["hf-static"] = lambda: run_hf(hf, rows, block)
    lg = None
    if args.llamagen_path:
        if not (Path(args.llamagen_path) / "autoregressive" / "models" / "gpt.py").is_file():
            raise SystemExit(f"--llamagen-path {args.llamagen_path}: no autoregressive/models/gpt.py there")
        lg = build_llamagen(args.llamagen_path, block)
        runners["llamagen"] = lambda: run_llamagen(lg, args.images, block, args.cfg_scale)
    else:
        notes.append("llamagen: not measured (pass --llamagen-path to a LlamaGen checkout)")

    for fn in runners.values():  # warm-up (allocator, first-call costs) on a short run
        fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    peaks: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved so machine noise hits every method alike
        for name, fn in runners.items():
            with PeakRSS() as pr:
                times[name].append(fn())
            peaks[name] = max(peaks.get(name, 0.0), pr.extra_mb)

    c = wb.config
    s_alloc = ((c.cls_token_num + block + 7) // 8) * 8
    kv_bytes = 2 * c.n_layer * rows * s_alloc * c.dim * 4
    bound_filled = bw * 1e9 / step_bytes(wb, rows, block, "filled") * rows
    bound_full = bw * 1e9 / step_bytes(wb, rows, block, "full") * rows
    rows_out = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rps = rows * block / med
        bound = bound_filled if name.startswith("workbench") else bound_full
        rows_out.append({
            "method": name, "median_s": round(med, 3), "runs_s": " ".join(f"{t:.2f}" for t in ts),
            "rows_tok_per_s": round(rps, 1), "image_tok_per_s": round(args.images * block / med, 1),
            "bw_bound_rows_tok_per_s": round(bound, 1), "frac_of_bound": round(rps / bound, 3),
            "peak_extra_rss_mb": round(peaks[name], 1),
        })
    base = {r["method"]: r["rows_tok_per_s"] for r in rows_out}
    for r in rows_out:
        r["speedup_vs_hf"] = round(r["rows_tok_per_s"] / base["hf-static"], 2) if "hf-static" in base else None
        r["speedup_vs_llamagen"] = round(r["rows_tok_per_s"] / base["llamagen"], 2) if "llamagen" in base else None

    # cost growth: one image with CFG (2 rows), time per image vs tokens
    growth = []
    for n in args.growth:
        g_side = math.isqrt(n)
        m = build_workbench(g_side * g_side)
        run_workbench(m, 1, g_side * g_side, args.cfg_scale)
        ts = [run_workbench(m, 1, g_side * g_side, args.cfg_scale) for _ in range(max(1, min(args.repeats, 2)))]
        growth.append((g_side * g_side, statistics.median(ts)))
        del m
    if len(growth) >= 2:
        xs = [math.log(n) for n, _ in growth]
        ys = [math.log(t) for _, t in growth]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    else:
        slope = float("nan")
    for n, t in growth:
        rows_out.append({"method": f"workbench growth: 1 image (CFG), {n} tokens", "median_s": round(t, 3),
                         "image_tok_per_s": round(n / t, 1)})
    meta = {
        "model": f"GPT-B shape (12x768, 12 heads, V={VOCAB}), random weights, fp32, {args.images} images x CFG = {rows} rows, "
                 f"{block} tokens, cfg {args.cfg_scale}, multinomial (top-k off)",
        "bandwidth_gbs": round(bw, 2),
        "kv_cache_formula": "bytes = 2 (k,v) x n_layer x rows x S x n_kv_head x head_dim x bytes/elem, "
                            "S = find_multiple(P + N, 8)",
        "kv_cache_bytes": f"{kv_bytes} ({kv_bytes / 2**20:.1f} MiB) for rows={rows}, S={s_alloc}",
        "bound": "workbench: weights + filled KV slots per step; hf/llamagen: weights + whole static cache per step",
        "cost_growth_exponent": round(slope, 3),
        "threads": torch.get_num_threads(),
        "packed_linear_backend": packed_linear_backend(),
        "command": " ".join(["python", *sys.argv]),
    }
    save_table("ar_decode", rows_out, meta, notes="\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
