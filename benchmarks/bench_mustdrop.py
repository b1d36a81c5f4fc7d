"""MustDrop vs FastV vs PiToMe-in-the-tower on the tiny shapes-VQA LLaVA.

    python benchmarks/bench_mustdrop.py                       # runs/llava_deep/model (configs/llava_deep_shapes.yaml)
    python benchmarks/bench_mustdrop.py --ckpt runs/llava_tiny/model --name mustdrop_tiny

1. Calibration (val split): MustDrop thresholds (stage-1 tau, stage-2 gamma = alpha) are swept;
   the setting with the best val accuracy among those cutting >= --target-cut % of the vision-token
   FLOPs is chosen (random / LLaVA-7B thresholds mean nothing for a tiny model; unify_compress.md 3.8);
   when none reaches it, the largest cut within 3 points of the undropped val accuracy, else the
   setting with the smallest drop.
2. Test split: no dropping; MustDrop stage 1, 1+2, 1+2+3 (chosen thresholds); FastV at K (the first
   stage-2 layer, 2 unless --prune-layers says otherwise) at the
   same layer-averaged vision-token budget and at the same final count; PiToMe in the vision tower
   over kept ratios; an **oracle** row (not a method: after that first drop layer keep exactly the tokens of the
   patches that show an object, from the scene description) says whether the model needs only the
   object tokens or reads the background too. Rows: answer accuracy (per question kind), vision tokens per LM layer,
   prefill FLOPs per answer (total / vision share / of which tower + projector and LM, FlopCounterMode
   with math SDPA), prefill answers/s at the batch size and batch-1 latency, KV-cache KiB per answer
   after decoding 2 tokens. ``lm_vision_flops_cut_%`` is the LM's share (the accounting of MustDrop's
   and FastV's FLOPs figures, whose towers are a few % of LLaVA-1.5-7B); ``vision_flops_cut_%``
   includes the tower.
Saves runs/bench/<name>/results.{md,json}, <name>_calibration and acc_vs_flops.png.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from compression import fastv
from compression import llava_runner as R
from compression.llava_eval import (
    TINY_MUSTDROP,
    LlavaArm,
    add_relative,
    evaluate_llava_arm,
    load_vqa,
    plot_llava,
    time_prefill_interleaved,
)
from compression.mustdrop import MustDropConfig
from compression.tiny_llava import load_llava
from workbench.benchutil import save_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="runs/llava_deep/model")
    ap.add_argument("--name", default="mustdrop")
    ap.add_argument("--num-samples", type=int, default=500)
    ap.add_argument("--calib-samples", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5, help="timed prefills per arm, alone (median)")
    ap.add_argument("--flops-samples", type=int, default=64,
                    help="prompts whose prefill FLOPs are counted per arm (16 left the cut ~1.5 points off the 200-prompt value)")
    ap.add_argument("--rounds", type=int, default=9,
                    help="round-robin timing rounds over all test arms (the speed-ups; 0: the per-arm timings)")
    # 87, not the goal's 85: the cut of a threshold setting moves by ~2 points between the val and test images
    # (how many windows stage 1 merges varies per image); the margin keeps the test cut above 85
    ap.add_argument("--target-cut", type=float, default=87.0, help="vision-FLOPs cut (%%) the calibration aims at")
    ap.add_argument("--cut-metric", choices=["lm", "all"], default="lm",
                    help="which vision-FLOPs cut --target-cut refers to: the LM's (default) or incl. the tower")
    ap.add_argument("--taus", type=float, nargs="+", default=[0.7, 0.8, 0.9])
    ap.add_argument("--thrs", type=float, nargs="+", default=[0.01, 0.03, 0.05, 0.06, 0.07, 0.08, 0.1, 0.3])
    ap.add_argument("--pitome-ratios", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--fastv-keeps", type=int, nargs="*", default=[4, 8, 16], help="more FastV budgets (layer K) for the curve")
    ap.add_argument("--prune-layers", type=int, nargs="+", default=None,
                    help="MustDrop stage-2 layers (default (2, 6, 10, 14)); the first one is also FastV's K and "
                         "the oracle's layer")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if not Path(args.ckpt).exists():
        raise SystemExit(f"--ckpt {args.ckpt} not found; train: vtw fit --config configs/llava_deep_shapes.yaml "
                         "(or python -m compression.tiny_llava --config configs/llava_deep_shapes.yaml)")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_llava(args.ckpt).model
    num_layers = len(R.parts(model)["lm"].layers)
    md_defaults = dict(TINY_MUSTDROP)
    if args.prune_layers:
        if sorted(set(args.prune_layers)) != args.prune_layers or not all(0 <= i < num_layers for i in args.prune_layers):
            raise SystemExit(f"--prune-layers must be increasing LM layers in [0, {num_layers}), got {args.prune_layers}")
        md_defaults["prune_layers"] = tuple(args.prune_layers)
    first_layer = MustDropConfig(**md_defaults).prune_layers[0]  # FastV's K and the oracle's layer
    val = load_vqa(args.ckpt, "val", args.calib_samples)
    test = load_vqa(args.ckpt, "test", args.num_samples)

    # 1. calibration on val
    calib = [evaluate_llava_arm(model, LlavaArm("none", "none"), val, args.batch_size, 0, flops_batch=args.flops_samples)]
    for tau in args.taus:
        for thr in args.thrs:
            cfg = MustDropConfig(**{**md_defaults, "merge_threshold": tau, "global_thr": thr, "individual_thr": thr})
            arm = LlavaArm(f"mustdrop tau={tau} thr={thr}", "mustdrop", cfg, extra={"tau": tau, "thr": thr})
            calib.append(evaluate_llava_arm(model, arm, val, args.batch_size, 0, flops_batch=args.flops_samples))
            print(f"calib {arm.name:<32} acc {calib[-1]['acc']:.1f} vision GFLOPs {calib[-1]['gflops_vision']:.4f}")
    add_relative(calib)
    cut = "lm_vision_flops_cut_%" if args.cut_metric == "lm" else "vision_flops_cut_%"
    ok = [r for r in calib[1:] if r[cut] >= args.target_cut]
    # nothing reaches the target cut: the largest cut within 3 points of val accuracy, else the smallest drop
    best = max(ok, key=lambda r: (r["acc"], r[cut])) if ok else max(
        calib[1:], key=lambda r: (r["acc_drop"] <= 3.0, r[cut] if r["acc_drop"] <= 3.0 else -r["acc_drop"]))
    chosen = {**md_defaults, "merge_threshold": best["tau"], "global_thr": best["thr"], "individual_thr": best["thr"]}
    print("chosen MustDrop thresholds:", chosen)
    meta = {"ckpt": args.ckpt, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
            "flops": "prefill per answer (batch 1), FlopCounterMode under sdpa_kernel(MATH); vision = total - text-only",
            "chosen": chosen, "calibration_cut_metric": cut}
    save_table(args.name + "_calibration", calib, meta)

    # 2. test
    base_cfg = MustDropConfig(**chosen)
    arms = [LlavaArm("none", "none"),
            LlavaArm("mustdrop s1", "mustdrop", replace(base_cfg, stage2=False, stage3=False)),
            LlavaArm("mustdrop s1+s2", "mustdrop", replace(base_cfg, stage3=False)),
            LlavaArm("mustdrop s1+s2+s3", "mustdrop", base_cfg)]
    rows = [evaluate_llava_arm(model, a, test, args.batch_size, args.repeats, args.flops_samples) for a in arms]
    timed = list(arms)  # every test arm, in the order of rows
    for r in rows:
        print(f"{r['arm']:<24} acc {r['acc']:.1f} vision GFLOPs {r['gflops_vision']:.4f} ans/s {r['answers_per_s']:.1f}")
    md = rows[-1]  # MustDrop, all three stages
    oracle = LlavaArm(f"oracle: object tokens after L{first_layer}", "oracle", oracle_layer=first_layer)
    rows.append(evaluate_llava_arm(model, oracle, test, args.batch_size, args.repeats, args.flops_samples))
    timed.append(oracle)
    print(f"{oracle.name:<24} acc {rows[-1]['acc']:.1f} final tokens {rows[-1]['vis_tokens_final']:.1f}")
    full = rows[0]["vis_tokens_in"]
    keeps = {fastv.budget_matched_keep(md["vis_tokens_layer_mean"], full, num_layers, first_layer): "same mean tokens/layer as MustDrop",
             max(1, int(round(md["vis_tokens_final"]))): "same final tokens as MustDrop"}
    keeps.setdefault(max(1, int(round(rows[-1]["vis_tokens_final"]))), "same final tokens as the oracle")
    for keep in args.fastv_keeps:
        keeps.setdefault(keep, "sweep")
    for keep, why in keeps.items():
        arm = LlavaArm(f"fastv K={first_layer} keep={keep}", "fastv", fastv=fastv.FastVConfig(first_layer, keep),
                       extra={"budget": why})
        rows.append(evaluate_llava_arm(model, arm, test, args.batch_size, args.repeats, args.flops_samples))
        timed.append(arm)
        print(f"{arm.name:<24} acc {rows[-1]['acc']:.1f} vision GFLOPs {rows[-1]['gflops_vision']:.4f}")
    for ratio in args.pitome_ratios:
        arm = LlavaArm(f"pitome tower rho={ratio}", "pitome", pitome_ratio=ratio)
        rows.append(evaluate_llava_arm(model, arm, test, args.batch_size, args.repeats, args.flops_samples))
        timed.append(arm)
        print(f"{arm.name:<24} acc {rows[-1]['acc']:.1f} vision GFLOPs {rows[-1]['gflops_vision']:.4f}")
    if args.rounds > 0:  # the speed-ups: all arms timed round-robin in one loop (answers/s of each arm alone kept)
        for row, aps in zip(rows, time_prefill_interleaved(model, timed, test, args.batch_size, args.rounds)):
            row["answers_per_s_alone"], row["answers_per_s"] = row["answers_per_s"], aps
        meta["prefill_timing"] = (f"batch {args.batch_size}, all arms round-robin, median of {args.rounds} rounds "
                                  "after one warm-up round")
    add_relative(rows)
    out = save_table(args.name, rows, meta)
    plot_llava(rows, out / "acc_vs_flops.png")
    print("plot:", out / "acc_vs_flops.png")


if __name__ == "__main__":
    main()
