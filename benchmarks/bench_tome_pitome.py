"""PiToMe vs ToMe on a trained shapes ViT classifier, compared at matched measured FLOPs.

    python benchmarks/bench_tome_pitome.py --ckpt runs/demo/classifier
    python benchmarks/bench_tome_pitome.py --ckpt runs/vit_small_shapes/checkpoints/last.ckpt --name tome_pitome_small

Arms: no merging; PiToMe (timm/DeiT spec, proportional attention on and off) over kept ratios;
original ToMe (constant r, proportional attention on and off) over r; and ToMe run on each PiToMe
arm's own schedule ("tome @ pitome rho=..": ToMe's bipartite matching removes exactly as many tokens
at each block as PiToMe did, so both arms have the same tokens per block and the same FLOPs). Every
row has accuracy, agreement with the unmerged model, FLOPs per image (FlopCounterMode under the math
SDPA kernel, similarity matmuls included; analytic count beside it), tokens entering each block and
images/s. The "matched" table puts beside every PiToMe arm the scheduled ToMe arm (same kept tokens)
and constant-r ToMe interpolated at the same FLOPs. Saves runs/bench/<name>/results.{md,json} and
acc_vs_flops.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from compression.vit_eval import (
    Arm,
    add_relative,
    evaluate_arm,
    interp_acc,
    load_eval_images,
    plot_acc_vs_flops,
    predict,
    removed_per_layer,
)
from vision.classifier import load_classifier
from workbench.benchutil import save_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="runs/demo/classifier")
    ap.add_argument("--name", default="tome_pitome")
    ap.add_argument("--num-samples", type=int, default=2000)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.95, 0.9, 0.85, 0.8, 0.75, 0.7])
    ap.add_argument("--rs", type=int, nargs="+", default=None, help="ToMe r values (default: spread to match)")
    ap.add_argument("--time-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (accuracy/FLOPs are the same; images/s is the device's)")
    ap.add_argument("--no-noprop", action="store_true", help="skip the prop_attn=False arms")
    args = ap.parse_args()
    if not Path(args.ckpt).exists():
        raise SystemExit(f"--ckpt {args.ckpt} not found; train a classifier first (vtw fit --config configs/classifier_shapes.yaml)")
    if args.threads:
        torch.set_num_threads(args.threads)
    net, info = load_classifier(args.ckpt)
    images, labels = load_eval_images(info["image_size"], args.num_samples)
    net, images = net.to(args.device), images.to(args.device)
    reference = predict(net, images, 256)
    T = net.patch_embed.num_patches
    depth = len(net.blocks)
    r_max = (T - 4) // depth  # ToMe's constant r cannot remove more than this and keep >= 4 tokens
    rs = args.rs or sorted({max(1, round(r_max * f)) for f in (0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0)})
    arms = [Arm("none")]
    props = [True] if args.no_noprop else [True, False]
    for prop in props:
        arms += [Arm("pitome", ratio=p, prop_attn=prop) for p in args.ratios]
        arms += [Arm("tome", r=r, prop_attn=prop) for r in rs]
    rows = []

    def run(arm: Arm) -> dict:
        row = evaluate_arm(net, arm, images, labels, reference, 256, args.time_batch, args.repeats)
        rows.append(row)
        print(f"[{len(rows)}] {row['arm']:<32} acc {row['acc']:.2f} GFLOPs {row['gflops']:.4f} img/s {row['img_per_s']:.0f}")
        return row

    scheduled = {}  # PiToMe arm name -> ToMe on the same per-block token schedule
    for arm in arms:
        row = run(arm)
        if arm.method == "pitome":
            sched = Arm("tome", prop_attn=arm.prop_attn, r_schedule=removed_per_layer(row),
                        label=f"tome @ pitome rho={arm.ratio}")
            scheduled[row["arm"]] = run(sched)
    add_relative(rows)
    base = rows[0]
    matched = []
    for prop in props:
        for row in rows:
            if row["method"] != "pitome" or ("noprop" in row["arm"]) == prop:
                continue
            tome_rows = [r for r in rows if r["method"] == "tome" and r["r"] is not None
                         and ("noprop" in r["arm"]) != prop]
            acc_t = interp_acc(tome_rows, "tome", row["gflops"])
            same = scheduled[row["arm"]]
            matched.append({"prop_attn": prop, "pitome": row["arm"], "gflops": row["gflops"],
                            "flops_cut_%": row["flops_cut_%"], "pitome_drop": row["acc_drop"],
                            "tome_same_tokens_drop": same["acc_drop"], "tome_same_tokens_gflops": same["gflops"],
                            "tome_const_r_drop_at_same_flops": None if acc_t is None else base["acc"] - acc_t,
                            "pitome_speedup": row["speedup"], "tome_same_tokens_speedup": same["speedup"]})
    meta = {"ckpt": args.ckpt, "classifier": info["config"], "num_samples": args.num_samples,
            "threads": torch.get_num_threads(), "time_batch": args.time_batch, "device": args.device,
            "flops": "per image; FlopCounterMode under sdpa_kernel(MATH); includes similarity matmuls; "
                     "sort/gather/scatter count 0"}
    out = save_table(args.name, rows, meta)
    save_table(args.name + "_matched", matched, meta)
    plot_acc_vs_flops(rows, out / "acc_vs_flops.png", f"PiToMe vs ToMe, {args.name}")
    print("plot:", out / "acc_vs_flops.png")


if __name__ == "__main__":
    main()
