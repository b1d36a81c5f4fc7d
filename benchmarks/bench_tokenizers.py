"""Tokenizer benchmark: reconstruction quality of the tiny VQGAN / BAE on shapes and CPU throughput.

Quality: validation PSNR / SSIM / codebook usage (1000 32x32 shapes) of
  * the tiny VQGAN trained by the demo (``runs/demo/tokenizer``; trained here with the demo recipe if absent),
  * the tiny BAE at 16 bits (split 2-8), trained here with the same recipe and budget.
Targets (issue 3): PSNR >= 26 dB and usage >= 80% for the VQGAN, PSNR >= 26 dB for the BAE.

Throughput: encode + decode images/s (eval, no grad) of the tiny preset at 32 px and LlamaGen's VQ-16
at 256 px, fp32 and bf16 autocast, next to the parameter count LlamaGen publishes for VQ-16 (72M).

    .venv/bin/python benchmarks/bench_tokenizers.py            # full (trains what is missing, ~8 min)
    .venv/bin/python benchmarks/bench_tokenizers.py --quick    # smoke run, numbers meaningless
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizers_img.bae import BinaryAutoencoder  # noqa: E402
from tokenizers_img.base import load_tokenizer  # noqa: E402
from tokenizers_img.lit import evaluate_reconstruction  # noqa: E402
from tokenizers_img.vqgan import VQGAN  # noqa: E402
from workbench.benchutil import save_table  # noqa: E402

LLAMAGEN_VQ16_PARAMS_M = 72.0  # LlamaGen README: VQ-16 tokenizer, 72M parameters


def get_trained(kind: str, path: Path, args) -> tuple[object, dict]:
    """Load a trained tiny tokenizer from ``path`` or train it with the demo recipe."""
    from workbench.demo_stages.vqgan import OVERRIDES, STEPS, TIME_BUDGET_S, train_tiny

    if (path / "vtw_tokenizer.json").is_file() and not args.retrain:
        return load_tokenizer(path), {"trained": f"loaded {path}"}
    overrides = {"split": "2-8"} if kind == "bae" else dict(OVERRIDES)
    steps = 4 if args.quick else STEPS
    module, _, seconds, precision = train_tiny(kind, path.parent / f"{path.name}_run", path, steps,
                                               None if args.quick else TIME_BUDGET_S, quick=args.quick,
                                               overrides=overrides)
    return module.tokenizer.eval(), {"trained": f"{module.batch_step} batches, {seconds:.0f} s, {precision}"}


def shapes_val(n: int) -> torch.Tensor:
    from datasets.shapes import ShapesDataset

    ds = ShapesDataset("val", n, 32, 0, cache=False)
    return torch.stack([ds[i]["image"] for i in range(n)])


@torch.no_grad()
def throughput(tok, image_size: int, batch: int, bf16: bool, min_seconds: float) -> float:
    tok.eval()
    x = torch.rand(batch, 3, image_size, image_size) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        tok.decode(tok.encode(x))  # warm-up
        n, t0 = 0, time.perf_counter()
        while True:
            tok.decode(tok.encode(x))
            n += batch
            if time.perf_counter() - t0 >= min_seconds:
                break
    return n / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vqgan", default="runs/demo/tokenizer", help="trained tiny VQGAN (save_pretrained dir)")
    parser.add_argument("--bae", default="runs/bench/tokenizers/bae_tiny", help="trained tiny BAE dir (trained if absent)")
    parser.add_argument("--retrain", action="store_true", help="train both tiny tokenizers again")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 training steps, tiny eval, short timing")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_val = 64 if args.quick else 1000
    seconds = 0.5 if args.quick else 5.0
    vqgan_dir = Path(args.vqgan) if not args.quick else Path("runs/bench/tokenizers/vqgan_tiny_quick")
    bae_dir = Path(args.bae) if not args.quick else Path("runs/bench/tokenizers/bae_tiny_quick")

    rows = []
    images = shapes_val(n_val)
    for name, kind, path, target_usage in (("tiny VQGAN (8x8 grid)", "vqgan", vqgan_dir, 0.8),
                                           ("tiny BAE (16 bits, 2-8, 8x8, thresholded bits)", "bae", bae_dir, None)):
        tok, info = get_trained(kind, path, args)
        m = evaluate_reconstruction(tok, images)
        ok = m["psnr"] >= 26 and (target_usage is None or m["usage"] >= target_usage)
        rows.append({"tokenizer": name, "val PSNR dB": round(m["psnr"], 2), "val SSIM": round(m["ssim"], 3),
                     "usage %": round(100 * m["usage"], 1), "perplexity": round(m["perplexity"], 1),
                     "vocab": tok.vocab_size, "target met": "yes" if ok else "NO", "training": info["trained"]})
    save_table("tokenizers_quality", rows, meta={"val_images": n_val, "data": "shapes 32x32 val split, seed 0",
                                                 "quick": args.quick})

    speed = []
    for preset, cls, size, batch in (("tiny", VQGAN, 32, 64), ("VQ-16", VQGAN, 256, 2),
                                     ("tiny", BinaryAutoencoder, 32, 64)):
        torch.manual_seed(0)
        tok = cls.from_preset(preset)
        params = sum(p.numel() for p in tok.parameters()) / 1e6
        for bf16 in (False, True):
            ips = throughput(tok, size, batch, bf16, seconds)
            speed.append({"model": f"{cls.__name__} {preset}", "image px": size, "tokens": tok.seq_len,
                          "params M": round(params, 2),
                          "LlamaGen published params M": LLAMAGEN_VQ16_PARAMS_M if preset == "VQ-16" else None,
                          "precision": "bf16 autocast" if bf16 else "fp32", "batch": batch,
                          "enc+dec img/s": round(ips, 2)})
    save_table("tokenizers_throughput", speed, meta={"threads": args.threads, "quick": args.quick},
               notes="encode + decode, eval mode, no grad, random images; CPU shared with other jobs may be slower.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
