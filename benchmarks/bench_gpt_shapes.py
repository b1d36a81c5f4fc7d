"""Class consistency of the shapes GPT recipe (``configs/gpt_tiny_shapes.yaml``, <= 30 CPU minutes).

Trains the recipe with ``vtw fit`` (unless ``--gpt`` names a checkpoint already trained), samples
``--per-class`` images for every class at several CFG scales with a fixed seed, and scores them with the
shapes classifier: class-consistency accuracy (goal >= 90%), Frechet distance in the classifier's feature
space vs held-out real images, the real-vs-real floor at the same sample size, and the tokenizer ceiling
(the classifier on VQGAN reconstructions of held-out token shards).

Inputs default to what ``make demo`` leaves in ``runs/demo/`` (``shards/``, ``tokenizer/``, ``classifier/``);
the recipe's numbers use the 15-minute tokenizer of ``configs/vqgan_tiny_shapes.yaml`` (header) and its
shards (README: the recipe end to end), measured when the demo's 3-minute tokenizer capped class
consistency at 36-69%.

Run: ``.venv/bin/python benchmarks/bench_gpt_shapes.py [--gpt CKPT] [--cfg 2 3 4] [--top-k 0 100]
[--temperature 1.0 0.9]`` (every combination of the listed settings is sampled).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.benchutil import save_table  # noqa: E402

CONFIG = "configs/gpt_tiny_shapes.yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpt", type=Path, default=None, help="trained GPT (.ckpt or save_gpt dir); default: train")
    ap.add_argument("--shards", type=Path, default=Path("runs/demo/shards"))
    ap.add_argument("--tokenizer", type=Path, default=Path("runs/demo/tokenizer"))
    ap.add_argument("--classifier", type=Path, default=Path("runs/demo/classifier"))
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--cfg", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    ap.add_argument("--top-k", type=int, nargs="+", default=[0], help="top-k value(s) (0: off)")
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0], help="sampling temperature(s)")
    ap.add_argument("--name", default="gpt_shapes", help="results go to runs/bench/<name>/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default="runs/gpt_tiny_shapes", help="training output folder (recipe default)")
    args = ap.parse_args()
    for p in (args.tokenizer, args.classifier) + (() if args.gpt else (args.shards,)):
        if not p.exists():
            raise SystemExit(f"{p} does not exist: run `make demo` first (or pass --shards/--tokenizer/--classifier)")

    from ar_gen.generation import check_compatible, decode_tokens, sample_tokens
    from ar_gen.gpt import load_gpt
    from ar_gen.sampling import SamplingConfig
    from tokenizers_img.base import load_tokenizer
    from tokenizers_img.shards import TokenShardDataset
    from workbench.commands.eval_gen import evaluate_images

    train_s = None
    if args.gpt is None:
        from workbench.cli import main as vtw_main

        t0 = time.monotonic()
        rc = vtw_main(["fit", "--config", CONFIG, f"--data.init_args.root={args.shards}",
                       f"--trainer.default_root_dir={args.root}"])
        train_s = time.monotonic() - t0
        if rc not in (0, None):
            raise SystemExit(f"vtw fit failed with exit code {rc}")
        args.gpt = Path(args.root) / "checkpoints" / "last.ckpt"
    model, meta = load_gpt(args.gpt)
    tokenizer = load_tokenizer(args.tokenizer).eval()
    check_compatible(model, tokenizer)
    c = model.config
    labels = torch.arange(c.num_classes).repeat_interleave(args.per_class)
    rows = []
    threads = torch.get_num_threads()
    settings = [(s, k, t) for s in args.cfg for k in args.top_k for t in args.temperature]
    for s, k, t in settings:
        sampling = SamplingConfig(cfg_scale=s, top_k=k, temperature=t)
        torch.set_num_threads(1)  # tiny decode steps
        tokens, stats = sample_tokens(model, labels, sampling, batch_size=120, seed=args.seed, desc=f"cfg {s}")
        torch.set_num_threads(threads)
        images, _ = decode_tokens(tokenizer, tokens)
        sc = evaluate_images(images, labels, args.classifier, "test", 2000, args.seed)
        rows.append({"setting": f"GPT samples, cfg {s}, top-k {k or 'off'}, temperature {t:g}", "images": len(labels),
                     "class_accuracy": round(sc["class_accuracy"], 4), "frechet": round(sc["frechet_distance"], 3),
                     "real_floor": round(sc["frechet_real_floor"], 3),
                     "sample_s": round(stats["sampling_seconds"], 1)})
    val = TokenShardDataset(args.shards / "val", random_aug=False) if (args.shards / "val").is_dir() else None
    if val is not None:
        n = min(len(val), 2000)
        recon, _ = decode_tokens(tokenizer, val.tokens[:n, 0].long())
        sc = evaluate_images(recon, val.labels[:n], args.classifier, "test", 2000, args.seed)
        rows.append({"setting": "ceiling: tokenizer reconstructions of val shards", "images": n,
                     "class_accuracy": round(sc["class_accuracy"], 4), "frechet": round(sc["frechet_distance"], 3),
                     "real_floor": round(sc["frechet_real_floor"], 3)})
    meta_out = {"gpt": str(args.gpt), "gpt_config": meta.get("config"), "train_seconds": train_s,
                "config": CONFIG if train_s is not None else None, "per_class": args.per_class, "seed": args.seed,
                "goal": "class accuracy >= 0.90", "command": " ".join(["python", *sys.argv])}
    save_table(args.name, rows, meta_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
