"""Side-by-side ablation of the demo's tokenizer choices: image-gradient loss weight, codebook size, optimizer.

Each arm trains the demo's tiny VQGAN (``workbench.demo_stages.vqgan.train_tiny``) for the same number of
batches (not seconds, so a busy machine cannot favour an arm) or, with ``--vq-budget S``, for the same S
seconds as the demo does (an optimizer whose step costs more then pays for it in batches), scores the shapes classifier on its
reconstructions of 1000 held-out images (the ceiling for any generator on these tokens) and, unless
``--no-gpt``, tokenizes the demo's shards with it, trains the demo GPT for the same number of steps and
scores class consistency and the Frechet distance of generated images (``demo_stages.gpt.sample_and_score``).

Arms are ``<codes>:<grad weight>[:<optimizer>[:<muon lr scale>]]``, e.g. ``512:0`` (the tiny preset with
pixel L2 only, the demo before session 8), ``256:4`` (Adam) and ``256:4:muon`` (the demo since session 20:
Muon on the hidden conv filters, ``TokenizerModule(optimizer="muon")``).

    .venv/bin/python benchmarks/bench_demo_tokenizer.py --arms 512:0 512:4 256:4   # 29 min on 2 cores
    .venv/bin/python benchmarks/bench_demo_tokenizer.py --arms 256:4 256:4:muon --vq-budget 180 --no-gpt
    .venv/bin/python benchmarks/bench_demo_tokenizer.py --quick                     # smoke test

Needs a shapes classifier (``--classifier``, default ``runs/demo/classifier`` from ``make demo``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.benchutil import save_table  # noqa: E402


def parse_arm(text: str) -> tuple[int, float, str, float]:
    try:
        parts = text.split(":")
        if not 2 <= len(parts) <= 4 or (len(parts) > 2 and parts[2] not in ("adam", "muon")):
            raise ValueError
        return (int(parts[0]), float(parts[1]), parts[2] if len(parts) > 2 else "adam",
                float(parts[3]) if len(parts) > 3 else 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError("--arms entries look like 256:4 or 256:4:muon[:2] "
                                         f"(codes:grad_weight[:adam|muon[:muon_lr_scale]]), got {text!r}") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", type=parse_arm, nargs="+", default=[parse_arm(a) for a in ("512:0", "512:4", "256:4")])
    ap.add_argument("--vq-steps", type=int, default=800)
    ap.add_argument("--vq-budget", type=float, default=None,
                    help="train each VQGAN arm for this many seconds (up to 100000 batches) instead of --vq-steps")
    ap.add_argument("--gpt-steps", type=int, default=1200)
    ap.add_argument("--no-gpt", action="store_true", help="tokenizer arms only (reconstruction ceiling)")
    ap.add_argument("--classifier", type=Path, default=Path("runs/demo/classifier"))
    ap.add_argument("--work", type=Path, default=Path("runs/bench/demo_tokenizer_work"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default="demo_tokenizer")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not (args.classifier / "config.json").is_file() or not (args.classifier / "model.safetensors").is_file():
        ap.error(f"--classifier {args.classifier} holds no shapes classifier (run `make demo` first)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from ar_gen.sampling import SamplingConfig
    from tokenizers_img.lit import evaluate_reconstruction
    from workbench.cli import main as vtw_main
    from workbench.commands.eval_gen import evaluate_images
    from workbench.demo_stages import gpt as gpt_stage
    from workbench.demo_stages import vqgan as vq_stage
    from workbench.demo_stages.vqgan import train_tiny, val_images

    vq_steps, gpt_steps = (4, 3) if args.quick else (args.vq_steps, args.gpt_steps)
    n_train, n_val, per_class, num_real = (128, 64, 2, 64) if args.quick else (20000, 1000, 8, 1000)
    rows = []
    t_all = time.monotonic()
    if args.vq_budget and not args.quick:
        vq_steps = 100000
    for codes, weight, optimizer, muon_scale in args.arms:
        arm = f"{codes}:{weight:g}" + ("" if optimizer == "adam" else f":muon:{muon_scale:g}")
        work = args.work / f"k{codes}_g{weight:g}_{optimizer}{muon_scale:g}"
        t0 = time.monotonic()
        module, data, vq_s, _ = train_tiny("vqgan", work / "vqgan", work / "tokenizer", vq_steps,
                                           None if args.quick else args.vq_budget, args.seed, args.quick,
                                           overrides={"codebook_size": codes}, grad_weight=weight,
                                           optimizer=optimizer, muon_lr_scale=muon_scale)
        tok = module.tokenizer.eval()
        images = val_images(data)
        m = evaluate_reconstruction(tok, images)
        labels = torch.tensor([data.datasets["val"][i]["label"] for i in range(images.shape[0])])
        with torch.no_grad():
            recon = torch.cat([tok.decode(tok.encode(images[i:i + 250])).float().clamp(-1, 1)
                               for i in range(0, images.shape[0], 250)])
        ceiling = evaluate_images(recon, labels, args.classifier, "test", num_real, args.seed)
        row = {"arm (codes:grad[:opt])": arm, "vq batches": module.batch_step, "vq s": round(vq_s),
               "PSNR dB": round(m["psnr"], 2), "usage %": round(100 * m["usage"], 1),
               "classifier on recon %": round(100 * ceiling["class_accuracy"], 1),
               "recon Frechet": round(ceiling["frechet_distance"], 2)}
        if not args.no_gpt:
            shards = work / "shards"
            for split, n in (("train", n_train), ("val", n_val)):
                rc = vtw_main(["tokenize", "--tokenizer", str(work / "tokenizer"), "--data", "shapes", "--split",
                               split, "--num-samples", str(n), "--seed", str(args.seed), "--batch-size", "250",
                               "--out", str(shards / split), "--overwrite"])
                if rc != 0:
                    raise RuntimeError(f"vtw tokenize failed for arm {arm}, split {split} (exit code {rc})")
            gmod, gpt_s, done, val_loss = gpt_stage.train_gpt(shards, work / "gpt", gpt_steps, None, args.seed,
                                                              args.quick)
            model = gmod.model.eval()
            n_cls = 4 if args.quick else model.config.num_classes
            r = gpt_stage.sample_and_score(model, tok, shards, args.classifier, SamplingConfig(**gpt_stage.SAMPLING),
                                           per_class, n_cls, num_real, n_val, args.seed, work / "samples.png")
            row.update({"gpt steps": done, "gpt s": round(gpt_s), "gpt val loss": round(val_loss, 3),
                        "class consistency %": round(100 * r["scores"]["class_accuracy"], 1),
                        "Frechet": round(r["scores"]["frechet_distance"], 2),
                        "real floor": round(r["scores"]["frechet_real_floor"], 2)})
        row["arm s"] = round(time.monotonic() - t0)
        rows.append(row)
        print(row, flush=True)
    save_table(args.name, rows, meta={
        "vq_steps": vq_steps, "vq_budget_s": args.vq_budget, "vq_batch_size": vq_stage.BATCH_SIZE, "gpt_steps": None if args.no_gpt else gpt_steps, "seed": args.seed,
        "gpt": f"demo GPT {gpt_stage.MODEL}, batch {gpt_stage.BATCH_SIZE}, lr {gpt_stage.LR}",
        "sampling": gpt_stage.SAMPLING, "images_per_class": per_class, "classifier": str(args.classifier),
        "quick": args.quick, "total_minutes": (time.monotonic() - t_all) / 60})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
