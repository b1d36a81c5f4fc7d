"""``vtw compress``: token merging / dropping evaluation.

    vtw compress vit --ckpt runs/demo/classifier --method pitome --ratio 0.9
    vtw compress vit --ckpt runs/demo/classifier --method tome --r 4 8 12 --method pitome --ratio 0.9 0.8
    vtw compress llava --ckpt runs/llava_deep/model --method mustdrop fastv pitome
    vtw compress llava --ckpt llava-1.5-7b-hf --image cat.jpg --question "What is in the picture?" \
        --method mustdrop fastv --device cuda --dtype float16

Prints and saves (``--out``, default ``runs/compress/<target>/``) a table with FLOPs (FlopCounterMode
under the math SDPA kernel, with an analytic cross-check), tokens kept per layer, throughput and
accuracy; when more than one setting is evaluated an accuracy-vs-FLOPs PNG is written as well.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", required=True, metavar="{vit,llava}")
    vit = sub.add_parser("vit", help="ToMe / PiToMe on a ViT classifier (timm)")
    vit.add_argument("--ckpt", required=True, help="classifier directory (save_classifier) or Lightning .ckpt")
    vit.add_argument("--method", nargs="+", default=["pitome"], choices=["none", "tome", "pitome"])
    vit.add_argument("--ratio", type=float, nargs="+", default=[0.9], help="PiToMe kept ratio(s) per layer")
    vit.add_argument("--r", type=int, nargs="+", default=[4], help="ToMe tokens removed per layer")
    vit.add_argument("--mode", default="deit", choices=["deit", "strict", "bsm"], help="PiToMe matching per layer")
    vit.add_argument("--margin", type=float, default=None, help="PiToMe margin m_0 (default 0.75, linear to 0)")
    vit.add_argument("--no-prop-attn", action="store_true", help="disable proportional attention")
    vit.add_argument("--num-samples", type=int, default=2000, help="test images")
    vit.add_argument("--max-count", type=int, default=1, help="objects per image in the test split")
    vit.add_argument("--batch-size", type=int, default=256)
    vit.add_argument("--time-batch", type=int, default=64, help="batch size of the images/s measurement")
    vit.add_argument("--repeats", type=int, default=10, help="timed forwards (median); 0 skips timing")
    vit.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the timing")
    vit.add_argument("--out", default="runs/compress/vit")

    llava = sub.add_parser("llava", help="MustDrop / FastV / PiToMe on a LLaVA (tiny shapes-VQA or LLaVA-1.5)")
    llava.add_argument("--ckpt", required=True, help="directory written by save_pretrained (tiny LLaVA or LLaVA-1.5)")
    llava.add_argument("--method", nargs="+", default=["mustdrop"], choices=["none", "mustdrop", "fastv", "pitome"])
    llava.add_argument("--stages", default="123", help="MustDrop stages to enable, e.g. 1, 12, 123")
    llava.add_argument("--merge-threshold", type=float, default=None,
                       help="MustDrop stage-1 window threshold tau (default: the recipe's)")
    llava.add_argument("--global-thr", type=float, default=None, help="MustDrop gamma (default: the recipe's)")
    llava.add_argument("--individual-thr", type=float, default=None, help="MustDrop alpha (default: the recipe's)")
    llava.add_argument("--fastv-keep", type=int, default=None,
                       help="FastV vision tokens kept after layer K (default: MustDrop's final budget)")
    llava.add_argument("--fastv-layer", type=int, default=2)
    llava.add_argument("--ratio", type=float, default=0.75, help="PiToMe kept ratio per vision layer")
    llava.add_argument("--num-samples", type=int, default=500)
    llava.add_argument("--batch-size", type=int, default=50)
    llava.add_argument("--repeats", type=int, default=5, help="timed prefills (median); 0 skips timing")
    llava.add_argument("--threads", type=int, default=None)
    llava.add_argument("--out", default="runs/compress/llava")
    real = llava.add_argument_group("a LLaVA-1.5 directory (save_pretrained, e.g. llava-hf/llava-1.5-7b-hf downloaded)")
    real.add_argument("--image", nargs="+", default=None, help="image files to ask about")
    real.add_argument("--question", nargs="+", default=None, help="one question for all images, or one per image")
    real.add_argument("--max-new-tokens", type=int, default=32)
    real.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    real.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def _run_vit(args: argparse.Namespace) -> int:
    import torch

    from compression.vit_eval import (
        Arm,
        add_relative,
        evaluate_arm,
        load_eval_images,
        plot_acc_vs_flops,
        predict,
    )
    from vision.classifier import load_classifier
    from workbench.benchutil import save_table

    if not Path(args.ckpt).exists():
        raise SystemExit(f"--ckpt {args.ckpt} does not exist (train one: vtw fit --config configs/classifier_shapes.yaml)")
    if args.threads:
        torch.set_num_threads(args.threads)
    net, info = load_classifier(args.ckpt)
    images, labels = load_eval_images(info["image_size"], args.num_samples, max_count=args.max_count)
    reference = predict(net, images, args.batch_size)
    prop = not args.no_prop_attn
    arms = [Arm("none")]
    for method in args.method:
        if method == "tome":
            arms += [Arm("tome", r=r, prop_attn=prop) for r in args.r]
        elif method == "pitome":
            arms += [Arm("pitome", ratio=p, prop_attn=prop, mode=args.mode, margin=args.margin) for p in args.ratio]
    rows = []
    for arm in arms:
        rows.append(evaluate_arm(net, arm, images, labels, reference, args.batch_size, args.time_batch, args.repeats))
        print(f"{rows[-1]['arm']:<28} acc {rows[-1]['acc']:.2f}  GFLOPs {rows[-1]['gflops']:.4f}  tokens {rows[-1]['tokens']}")
    add_relative(rows)
    out = Path(args.out)
    meta = {"ckpt": args.ckpt, "num_samples": args.num_samples, "time_batch": args.time_batch,
            "flops": "per image, FlopCounterMode under sdpa_kernel(MATH), incl. similarity matmuls"}
    save_table(out.name, rows, meta, root=out.parent)
    if len(rows) > 2:
        print("plot:", plot_acc_vs_flops(rows, out / "acc_vs_flops.png", f"token merging on {Path(args.ckpt).name}"))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.target == "vit":
        return _run_vit(args)
    from compression.llava_eval import run_llava_command

    return run_llava_command(args)
