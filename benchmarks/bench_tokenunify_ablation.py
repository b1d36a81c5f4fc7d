"""TokenUnify pretraining ablation on synthetic EM, equal fine-tuning budget.

Arms (same SegMamba, same fine-tuning steps, seed, data and post-processing):
  scratch | random-token only | next-token only | next-all only | TokenUnify (random-token stage, then
  next-all + next-token joint; equal total pretraining steps, as the paper's sequential schedule).
Volumes: pretraining seed 100, fine-tuning seed 200, test seed 300 (different synthetic volumes).
Evaluation: sliding-window affinities on the whole test volume -> waterz at thresholds 0.1..0.9 ->
VOI split/merge (bits) and adapted Rand error; the table reports the best-VOI threshold per arm.

Usage::

    python benchmarks/bench_tokenunify_ablation.py                   # default budget (~15-25 min, 2 cores)
    python benchmarks/bench_tokenunify_ablation.py --pretrain-steps 1000 --finetune-steps 600 --seeds 0 1 2
    python benchmarks/bench_tokenunify_ablation.py --quick           # smoke test (a few minutes)
    python benchmarks/bench_tokenunify_ablation.py --pretrain-volume 64 192 192 --finetune-volume 16 64 64  # few labels
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = {
    "scratch": None,
    "random_only": [{"objectives": ["random"], "frac": 1.0}],
    "next_only": [{"objectives": ["next"], "frac": 1.0}],
    "next_all_only": [{"objectives": ["next_all"], "frac": 1.0}],
    "tokenunify": [{"objectives": ["random"], "frac": 0.5}, {"objectives": ["next_all", "next"], "frac": 0.5}],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--crop", type=int, nargs=3, default=[16, 48, 48])
    p.add_argument("--token", type=int, nargs=3, default=[4, 16, 16])
    p.add_argument("--volume", type=int, nargs=3, default=[32, 128, 128], help="size of each synthetic volume (z y x)")
    p.add_argument("--pretrain-volume", type=int, nargs=3, default=None,
                   help="size of the unlabelled pretraining volume (default --volume)")
    p.add_argument("--finetune-volume", type=int, nargs=3, default=None,
                   help="size of the labelled fine-tuning volume (default --volume); a small one gives the "
                        "label-scarce regime pretraining is for (the paper: ~1.2B unlabelled tokens, CREMI labels)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cache-dir", default="runs/data")
    p.add_argument("--name", default="tokenunify_ablation",
                   help="tables go to runs/bench/<name>/ (summary) and runs/bench/<name>_runs/ (one row per arm and seed)")
    args = p.parse_args()
    if args.quick:
        args.pretrain_steps, args.finetune_steps, args.volume = 4, 4, [16, 64, 64]

    import numpy as np
    import torch
    from tqdm import tqdm

    from datasets.em import EMRawDataset, EMSegDataset, synthetic_volume_path
    from vision.em_segmentation import (
        agglomerate,
        predict_affinities,
        seg_to_affinity,
        segmentation_metrics,
        weighted_mse,
        widen_border,
    )
    from vision.tokenunify import SegMamba, TokenUnifyConfig, TokenUnifyModel, segmamba_config

    if args.threads:
        torch.set_num_threads(args.threads)
    crop, token = tuple(args.crop), tuple(args.token)
    net_kw = dict(feat_size=(8, 16, 32, 64), hidden_size=64, depths=(1, 1, 1, 1))
    sizes = {"pretrain": args.pretrain_volume or args.volume, "finetune": args.finetune_volume or args.volume,
             "test": args.volume}
    for k, size in sizes.items():
        if any(v < c for v, c in zip(size, crop)):
            raise SystemExit(f"--{k}-volume {size} is smaller than --crop {list(crop)}")
    vols = {k: str(synthetic_volume_path(args.cache_dir, sizes[k], s)) for k, s in
            (("pretrain", 100), ("finetune", 200), ("test", 300))}

    def batches(ds, n, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            idx = torch.randint(0, len(ds), (args.batch_size,), generator=g).tolist()
            items = [ds[i] for i in idx]
            yield {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def adamw(params):
        return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)

    test_raw = EMSegDataset(vols["test"], vols["test"], crop_size=crop, samples=1)
    lo, hi = test_raw.raw.stats()
    test_x = (test_raw.raw[:].astype(np.float32) - lo) / (hi - lo + 1e-8)
    test_gt = test_raw.labels[:]

    rows = []
    t_start = time.time()
    for seed in args.seeds:
        for arm in args.arms:
            t0 = time.time()
            torch.manual_seed(seed)
            pre_losses = {}
            state = None
            if ARMS[arm] is not None:
                model = TokenUnifyModel(TokenUnifyConfig(crop=crop, token=token, model_overrides=net_kw))
                opt = adamw(model.parameters())
                ds = EMRawDataset(vols["pretrain"], crop_size=crop, samples=10**6, seed=seed)
                schedule = []
                for st in ARMS[arm]:
                    schedule += [tuple(st["objectives"])] * int(round(st["frac"] * args.pretrain_steps))
                gen = torch.Generator().manual_seed(seed)
                for step, batch in enumerate(tqdm(batches(ds, len(schedule), seed), total=len(schedule),
                                                  desc=f"{arm} pretrain s{seed}", leave=False)):
                    out = model(batch["raw"], schedule[step], generator=gen)
                    opt.zero_grad()
                    out.loss.backward()
                    opt.step()
                    for k, v in out.losses.items():
                        pre_losses[k] = float(v)
                state = model.net.state_dict()
            torch.manual_seed(seed + 1)
            net = SegMamba(segmamba_config("tiny", out_chans=3, **net_kw))
            loaded = 0
            if state is not None:
                own = net.state_dict()
                match = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
                if not match:
                    raise RuntimeError(f"{arm}: no pretrained weights matched")
                net.load_state_dict({**own, **match})
                loaded = len(match)
            opt = adamw(net.parameters())
            ds = EMSegDataset(vols["finetune"], vols["finetune"], crop_size=crop, samples=10**6, seed=seed)
            ft_loss = float("nan")
            for batch in tqdm(batches(ds, args.finetune_steps, seed + 7), total=args.finetune_steps,
                              desc=f"{arm} finetune s{seed}", leave=False):
                target = seg_to_affinity(torch.from_numpy(widen_border(batch["labels"].numpy())))
                loss = weighted_mse(torch.sigmoid(net(batch["raw"])), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                ft_loss = float(loss)
            affs = predict_affinities(net, test_x, crop, overlap=0.25, progress=False)
            best = None
            for t, seg in agglomerate(affs, args.thresholds):
                m = segmentation_metrics(seg, test_gt)
                if best is None or m["voi"] < best["voi"]:
                    best = {"threshold": t, **m}
            row = {"arm": arm, "seed": seed, "best_threshold": best["threshold"], "voi": best["voi"],
                   "voi_split": best["voi_split"], "voi_merge": best["voi_merge"], "arand": best["arand"],
                   "pretrain_steps": args.pretrain_steps if state is not None else 0,
                   "finetune_steps": args.finetune_steps, "loaded_tensors": loaded, "final_ft_loss": ft_loss,
                   "final_pretrain_losses": ", ".join(f"{k}={v:.4f}" for k, v in pre_losses.items()),
                   "minutes": (time.time() - t0) / 60}
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        save_tables(args, rows, sizes, crop, token, net_kw, t_start)  # after every seed

    return 0


def save_tables(args, rows, sizes, crop, token, net_kw, t_start) -> None:
    """Mean over the seeds done so far per arm; saved after every seed so a long run leaves results early."""
    import numpy as np

    from workbench.benchutil import save_table

    # mean over seeds per arm
    summary = []
    for arm in args.arms:
        rs = [r for r in rows if r["arm"] == arm]
        if not rs:
            continue
        summary.append({"arm": arm, "seeds": len(rs), "voi_mean": float(np.mean([r["voi"] for r in rs])),
                        "voi_std": float(np.std([r["voi"] for r in rs])),
                        "voi_split": float(np.mean([r["voi_split"] for r in rs])),
                        "voi_merge": float(np.mean([r["voi_merge"] for r in rs])),
                        "arand_mean": float(np.mean([r["arand"] for r in rs]))})
    by = {s["arm"]: s for s in summary}
    notes = []
    if "scratch" in by and "tokenunify" in by:
        rel = 1 - by["tokenunify"]["voi_mean"] / by["scratch"]["voi_mean"]
        notes.append(f"- TokenUnify VOI vs scratch: {100 * rel:+.1f}% lower (target >= 20%)")
    if "random_only" in by and "tokenunify" in by:
        rel = 1 - by["tokenunify"]["voi_mean"] / by["random_only"]["voi_mean"]
        notes.append(f"- TokenUnify VOI vs random-token only: {100 * rel:+.1f}% lower (target > 0)")
    meta = {"pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps, "crop": crop,
            "token": token, "volume": args.volume, "pretrain_volume": sizes["pretrain"],
            "finetune_volume": sizes["finetune"], "batch_size": args.batch_size, "lr": args.lr,
            "model": f"SegMamba tiny {net_kw}", "seeds": sorted({r["seed"] for r in rows}),
            "total_minutes": (time.time() - t_start) / 60,
            "voi_units": "bits (scikit-image convention)"}
    save_table(f"{args.name}_runs", rows, meta)
    save_table(args.name, summary, meta, notes="\n".join(notes))


if __name__ == "__main__":
    raise SystemExit(main())
