"""Speculative decoding benchmark: plain AR vs exact speculative vs LANTERN (several delta, k).

Same target weights, drafter, class labels, seeds and sampling settings for every arm, measured side
by side in one process (shared/methods/ar_gen.md 3(g)). For each batch size: wall-clock per image
(median over --repeats after a warm-up), target forwards per generate call, mean accepted length tau
(tokens per target forward, bonus included), relaxed TV mass per image. Quality at batch 8 on a larger
label set: class-consistency accuracy of the shapes classifier and a Frechet distance in its feature
space against real shapes images.

    .venv/bin/python benchmarks/bench_speculative.py --gpt runs/demo/gpt --tokenizer runs/demo/tokenizer \
        --drafter runs/demo/speculative/drafter --classifier runs/demo/classifier

Without --drafter an EAGLE drafter is trained first on --shards for --train-seconds (with --shards the
demo folder's drafter and n-gram table are not used: they belong to the demo's GPT).
Writes runs/bench/speculative/results.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", type=Path, default=Path("runs/demo"),
                   help="where the demo left its artifacts (defaults for the paths below)")
    p.add_argument("--gpt", type=Path, default=None, help="target GPT (save_gpt dir or .ckpt); default <demo>/gpt")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir; default <demo>/tokenizer")
    p.add_argument("--drafter", type=Path, default=None, help="drafter; default <demo>/speculative/drafter")
    p.add_argument("--shards", type=Path, default=None, help="token shards (to train a drafter if none is given)")
    p.add_argument("--classifier", type=Path, default=None, help="shapes classifier dir; default <demo>/classifier")
    p.add_argument("--ngram", type=Path, default=None,
                   help="n-gram drafter table (.safetensors); default <demo>/speculative/ngram.safetensors if present")
    p.add_argument("--ngram-gamma", type=int, default=4)
    p.add_argument("--no-ngram", action="store_true", help="leave out the n-gram drafter arms")
    p.add_argument("--train-seconds", type=float, default=120.0)
    p.add_argument("--gamma", type=int, nargs="+", default=[3],
                   help="EAGLE chain length(s); the exact and LANTERN arms are run for each")
    p.add_argument("--draft", choices=["sample", "top1"], default="sample",
                   help="EAGLE drafts: sampled from q (default) or top-1; an 'exact (top-1 drafts)' arm is always "
                        "added for comparison")
    p.add_argument("--deltas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--ks", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--speed-images", type=int, default=8, help="images per batch-size timing run")
    p.add_argument("--quality-images", type=int, default=240, help="images per arm for accuracy / Frechet (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--name", default="speculative", help="runs/bench/<name>/")
    return p.parse_args(argv)


def _path(value: Path | None, default: Path, what: str, required: bool = True) -> Path | None:
    path = value if value is not None else default
    if not path.exists():
        if required:
            raise SystemExit(f"bench_speculative: {what} {path} does not exist (pass --{what})")
        return None
    return path


def _frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a, b (N, D) (float64, scipy sqrtm)."""
    import numpy as np
    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _quality_fn(classifier_dir: Path | None, n_real: int, seed: int):
    """Returns f(images (N,3,H,W) in [-1,1], labels) -> (accuracy, frechet) or None without a classifier."""
    if classifier_dir is None:
        return None
    from vision.classifier import classifier_features, load_classifier

    net, info = load_classifier(classifier_dir)
    size = info["image_size"]

    def feats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[-1] != size:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        out_f, out_p = [], []
        with torch.no_grad():
            for i in range(0, len(images), 128):
                x = images[i:i + 128].float()
                out_f.append(classifier_features(net, x))
                out_p.append(net(x).argmax(-1))
        return torch.cat(out_f), torch.cat(out_p)

    from datasets.shapes import ShapesDataset

    real = ShapesDataset(num_samples=n_real, image_size=size, split="val", seed=seed + 12345)
    real_images = torch.stack([real[i]["image"] for i in range(len(real))])
    real_feats, _ = feats(real_images)

    def score(images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        f, p = feats(images)
        return float((p == labels).float().mean()), _frechet(f, real_feats)

    return score


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ar_gen.eagle import load_eagle, save_eagle
    from ar_gen.gpt import load_gpt
    from ar_gen.lit_drafter import token_batches, train_eagle
    from ar_gen.sampling import SamplingConfig
    from ar_gen.spec_cli import Arm, run_arms
    from ar_gen.spec_models import EagleDraftRunner
    from tokenizers_img.base import load_tokenizer
    from workbench.benchutil import save_table

    demo = args.demo_dir
    gpt_path = _path(args.gpt, demo / "gpt", "gpt")
    tok_path = _path(args.tokenizer, demo / "tokenizer", "tokenizer")
    classifier = _path(args.classifier, demo / "classifier", "classifier", required=False)
    # with --shards (and no --drafter / --ngram) the drafters are trained for this target, never taken
    # from the demo folder (whose drafter belongs to the demo's GPT)
    if args.drafter is not None:
        drafter_path = _path(args.drafter, args.drafter, "drafter")
    elif args.shards is None:
        drafter_path = _path(None, demo / "speculative" / "drafter", "drafter", required=False)
    else:
        drafter_path = None
    if args.ngram is None and args.shards is None and (demo / "speculative" / "ngram.safetensors").is_file():
        args.ngram = demo / "speculative" / "ngram.safetensors"
    if drafter_path is None and args.shards is None:
        raise SystemExit("bench_speculative: no drafter found; pass --drafter or --shards to train one")
    device = torch.device(args.device)

    target, _ = load_gpt(gpt_path, map_location=str(device))
    target = target.to(device).eval()
    tokenizer = load_tokenizer(tok_path).eval()
    codebook = tokenizer.codebook_embeddings().float().cpu()
    if drafter_path is not None:
        drafter, _ = load_eagle(drafter_path)
        train_note = f"drafter {drafter_path}"
    else:
        batches = token_batches(args.shards, batch_size=64, max_batches=200, seed=args.seed)
        t0 = time.perf_counter()
        from workbench.runtime import default_precision

        bf16 = default_precision() == "bf16-mixed"  # CPUs with bf16 matrix units: more steps in the budget
        drafter, log = train_eagle(target, batches, steps=100000, lr=2e-3, time_budget_s=args.train_seconds,
                                   autocast_dtype=torch.bfloat16 if bf16 else None)
        save_eagle(drafter, Path("runs/bench") / args.name / "drafter")
        train_note = (f"drafter trained {time.perf_counter() - t0:.0f} s, {log[-1]['step'] + 1} steps"
                      f"{' (bf16 autocast)' if bf16 else ''}")
    drafter = drafter.to(device)
    runner = EagleDraftRunner(drafter, target)
    sampling = SamplingConfig(cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    other = "top1" if args.draft == "sample" else "sample"
    g0 = args.gamma[0]
    arms = [Arm("plain", "plain"), Arm(f"exact ({other} drafts) g={g0}", "exact", draft=other, gamma=g0)]
    for g in args.gamma:
        arms += [Arm(f"exact g={g}", "exact", draft=args.draft, gamma=g)]
        arms += [Arm(f"lantern k={k} d={d} g={g}", "lantern", k, d, draft=args.draft, gamma=g)
                 for k in args.ks for d in args.deltas]
    if not args.no_ngram and (args.ngram is not None or args.shards is not None):  # n-gram drafter (beyond the issue)
        from ar_gen.spec_models import NGramDraftRunner, NGramTable

        if args.ngram is not None:
            table = NGramTable.load(args.ngram)
        else:
            from ar_gen.spec_cli import fit_ngram_drafter

            table = NGramTable.load(fit_ngram_drafter(args.shards, Path("runs/bench") / args.name / "ngram.safetensors"))
        ng = NGramDraftRunner(table)
        arms += [Arm("exact (n-gram)", "exact", drafter=ng, gamma=args.ngram_gamma)]
        arms += [Arm(f"lantern k={args.ks[-1]} d={d} (n-gram)", "lantern", args.ks[-1], d, drafter=ng,
                     gamma=args.ngram_gamma) for d in args.deltas]
    n_cls = target.config.num_classes
    cache_dir = Path("runs/bench") / args.name / "neighbours"

    rows = []
    for bs in args.batch_sizes:
        labels = (torch.arange(args.speed_images) * 7 % n_cls).to(device)
        r, _ = run_arms(target, runner, arms, labels, sampling, batch_size=bs, gamma=g0, codebook=codebook,
                        seed=args.seed, repeats=args.repeats, cache_dir=cache_dir)
        rows += r
    if args.quality_images > 0:
        score = _quality_fn(classifier, max(args.quality_images, 500), args.seed)
        labels = (torch.arange(args.quality_images) % n_cls).to(device)
        r, tokens = run_arms(target, runner, arms, labels, sampling, batch_size=8, gamma=g0,
                             codebook=codebook, seed=args.seed + 1000, repeats=1, cache_dir=cache_dir, warmup=False)
        quality = {}
        for arm in arms:
            with torch.no_grad():
                images = torch.cat([tokenizer.decode(tokens[arm.name][i:i + 64].cpu()).float()
                                    for i in range(0, len(labels), 64)])
            quality[arm.name] = score(images, labels.cpu()) if score is not None else (None, None)
        for row in rows:
            acc, fd = quality[row["arm"]]
            row["class_accuracy"] = acc
            row["frechet"] = fd
    # LANTERN's headline metric: its speed-up over AR divided by the lossless drafter's (same drafter, gamma, batch)
    by_key = {(r["arm"], r["batch"]): r for r in rows}
    for row in rows:
        name = row["arm"]
        if name.startswith("lantern"):
            ref = "exact (n-gram)" if name.endswith("(n-gram)") else "exact " + name.split()[-1]
            exact = by_key.get((ref, row["batch"]))
            row["vs_exact"] = row["speedup"] / exact["speedup"] if exact else None
    # Cost model from the same runs: where the time of one draft-and-verify iteration goes. At a fixed
    # iteration cost the speed-up is proportional to tau, so the tau a 1.75x speed-up would need, and the
    # speed-up if drafting were free (same iterations, draft time removed), follow from measured numbers.
    for row in rows:
        if row["arm"] == "plain" or not row["speedup"]:
            continue
        it, draft = row["ms_per_iteration"], row["draft_ms_per_iteration"]
        row["tau_for_1.75x"] = 1.75 * row["mean_accepted_length"] / row["speedup"]
        row["speedup_if_drafts_free"] = row["speedup"] * it / max(it - draft, 1e-9)
    meta = {
        "target": str(gpt_path), "tokenizer": str(tok_path), "drafter": train_note, "gamma": args.gamma,
        "drafts": f"EAGLE arms: {args.draft} (x ~ q: accept min(1, p~/q); top1: q(x) = 1); n-gram arms: top1",
        "sampling": f"cfg {args.cfg}, temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}",
        "timing": f"median of {args.repeats} after 1 warm-up chunk, {args.speed_images} images per batch size, "
                  f"{args.threads} threads, device {args.device}",
        "quality": f"{args.quality_images} images per arm at batch 8 (class accuracy, Frechet distance in the "
                   "shapes classifier's feature space vs real val images)",
        "command": "python benchmarks/bench_speculative.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    notes = ("speedup = plain wall-clock / arm wall-clock at the same batch size; vs_exact = a LANTERN arm's "
             "speedup / the exact arm's with the same drafter, gamma and batch (the ratio LANTERN's paper "
             "headlines); target_forwards_per_call counts batched target forwards per generate call (prefill "
             "included); mean_accepted_length = tokens per target verification (bonus included). "
             "ms_per_iteration splits into draft / verify (target forward) / accept (probabilities + rule) / rest; "
             "plain rows: one token step. tau_for_1.75x = the mean accepted length a 1.75x speed-up would need "
             "at this iteration cost (more than gamma + 1 means out of reach for the chain); "
             "speedup_if_drafts_free = the speed-up with the same iterations minus the drafting time.")
    save_table(args.name, rows, meta, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
