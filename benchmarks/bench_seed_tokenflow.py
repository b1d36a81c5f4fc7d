"""Benchmark: SEED discriminativeness and TokenFlow reconstruction/semantics on the shapes data.

What it measures (issue "Image tokenizers II", numbers to reach):
  * SEED: text->image and image->text retrieval top-1 on held-out shapes captions (galleries of 100
    pairs; a hit is a retrieved item with the same caption string) with the continuous causal embedding
    and with the quantized tokens (decoder-A reconstruction); ratio quantized / continuous (target >= 0.9);
    codebook usage over the held-out tokens (target >= 0.5).
  * TokenFlow (multi-scale, 121 ids, and single-scale, 64 ids) against the workbench VQGAN at the same
    final 8x8 grid (64 ids): PSNR on held-out images, TokenFlow's semantic cosine to its teacher (target
    >= 0.9), codebook usage, and linear probes (30 shape x colour classes) on TokenFlow semantic features
    vs VQGAN pixel codes.

Setup: the frozen SEED vision tower and the TokenFlow teacher are one ``vision.towers`` preset (default the
workbench classifier ViT, ``timm-vit-classifier-tiny``; ``clip-tiny-32`` on a busy CPU) trained here first as a
shapes classifier (or given with --tower-checkpoint, e.g. the demo's classifier); SEED's text tower is the
tiny open_clip text tower trained in Stage I. Reconstruction training uses MSE + VQ (+ TokenFlow's semantic
loss), no GAN / LPIPS, identically for TokenFlow and the VQGAN, so the PSNR comparison is like for like.

    .venv/bin/python benchmarks/bench_seed_tokenflow.py            # full (GPU: minutes; CPU: hours)
    # what was measured on the 2-core CPU (the demo classifier as frozen tower / teacher; 2 threads, ~18 min):
    B="--tower timm-vit-classifier-tiny --tower-checkpoint runs/demo/classifier/model.safetensors --batch 32
       --pixel-channels 16 --train-images 10000 --val-images 500 --probe-images 1000"
    .venv/bin/python benchmarks/bench_seed_tokenflow.py $B --only seed --steps 600
    .venv/bin/python benchmarks/bench_seed_tokenflow.py $B --only tokenflow --single-scale --steps 1200
    .venv/bin/python benchmarks/bench_seed_tokenflow.py $B --only vqgan --steps 1200
    .venv/bin/python benchmarks/bench_seed_tokenflow.py $B --only merge
    .venv/bin/python benchmarks/bench_seed_tokenflow.py --quick    # smoke run (numbers not meaningful)

Writes runs/bench/seed_tokenflow/results.{md,json} and PNG reconstruction grids.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OUT = Path("runs/bench/seed_tokenflow")


def load_split(split: str, n: int, device: torch.device):
    from datasets.shapes import ShapesDataset

    ds = ShapesDataset(split, n, image_size=32, seed=0, cache=True)
    images = ds._images.float().div(127.5).sub(1.0).to(device)  # (N, 3, 32, 32) in [-1, 1]
    labels = torch.tensor([s.label for s in ds._scenes], device=device)
    captions = [s.caption for s in ds._scenes]
    return images, labels, captions


def lr_at(step: int, total: int, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


def train_loop(name, params, loss_fn, steps, lr, n_train, batch, device, betas=(0.9, 0.999), wd=0.0, clip=1.0):
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps))
    g = torch.Generator(device="cpu").manual_seed(0)
    bar = tqdm(range(steps), desc=name, mininterval=5)
    t0 = time.time()
    for step in bar:
        idx = torch.randint(0, n_train, (batch,), generator=g).to(device)
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    return time.time() - t0


@torch.no_grad()
def batched(fn, n, bs=250):
    outs = [fn(slice(i, min(i + bs, n))) for i in range(0, n, bs)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(o) for o in zip(*outs))
    return torch.cat(outs)


def linear_probe(train_x, train_y, val_x, val_y, steps=500, num_classes=30):
    """Multinomial logistic regression on standardised features (full-batch Adam); returns val accuracy."""
    with torch.enable_grad():
        mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
        xt, xv = (train_x - mu) / sd, (val_x - mu) / sd
        lin = torch.nn.Linear(xt.shape[1], num_classes).to(xt.device)
        opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(steps):
            loss = F.cross_entropy(lin(xt), train_y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return float((lin(xv).argmax(1) == val_y).float().mean())


def run_seed(tower, cls_path, xtr, ctr, xva, cva, steps, batch, dev, out, work):
    """SEED Stage I then Stage II over the frozen tower; returns (rows, summary)."""
    from tokenizers_img.seed import SeedModule, retrieval_top1, save_image_grid

    n_train, n_val = xtr.shape[0], xva.shape[0]
    seed_over = {"vision_tower": tower, "vision_pretrained": cls_path}
    m1 = SeedModule(stage=1, overrides=seed_over).to(dev)
    p1 = [p for p in m1.parameters() if p.requires_grad]
    m1.train()
    s1 = train_loop("SEED stage I", p1, lambda i: m1.tokenizer.itc_loss(xtr[i], [ctr[j] for j in i.tolist()])[0],
                    steps, 1e-3, n_train, batch, dev, wd=0.05)
    ck = work / "seed_stage1.pt"
    torch.save({"state_dict": {k: v.cpu() for k, v in m1.state_dict().items()}}, ck)
    m2 = SeedModule(stage=2, overrides=seed_over, stage1_checkpoint=str(ck)).to(dev)
    before = {k: v.clone() for k, v in m2.tokenizer.stage1_state_dict().items()}
    p2 = [p for p in m2.parameters() if p.requires_grad]
    m2.train()
    s2 = train_loop("SEED stage II", p2, lambda i: m2.tokenizer.stage2_loss(xtr[i])[0], steps, 1e-3, n_train,
                    batch, dev, wd=0.05)
    tok = m2.tokenizer.eval()
    assert all(torch.equal(before[k], v) for k, v in tok.stage1_state_dict().items()), "Stage I weights changed"
    cont, quant, ids = batched(lambda s: tok.retrieval_features(xva[s]), n_val)
    text = batched(lambda s: tok.text_itc_features(cva[s]), n_val)
    rc = retrieval_top1(cont, text, cva, gallery=100)
    rq = retrieval_top1(quant, text, cva, gallery=100)
    usage = ids.unique().numel() / tok.vocab_size
    with torch.no_grad():
        recon = tok.decode(ids[:16].to(dev), renderer="pixel")
    save_image_grid(torch.cat([xva[:16], recon]), out / "seed_pixel_decoder.png")
    summary = f"K={tok.vocab_size}, {tok.seq_len} tokens, stage I {s1:.0f}s, stage II {s2:.0f}s"
    rows = [
        {"model": "SEED", "metric": "i2t top-1 continuous", "value": rc["i2t"], "train_s": round(s1, 1)},
        {"model": "SEED", "metric": "i2t top-1 quantized", "value": rq["i2t"], "train_s": round(s2, 1)},
        {"model": "SEED", "metric": "t2i top-1 continuous", "value": rc["t2i"]},
        {"model": "SEED", "metric": "t2i top-1 quantized", "value": rq["t2i"]},
        {"model": "SEED", "metric": "quantized / continuous (mean of i2t, t2i)",
         "value": (rq["i2t"] + rq["t2i"]) / max(1e-9, rc["i2t"] + rc["t2i"])},
        {"model": "SEED", "metric": "codebook usage (val tokens)", "value": usage},
    ]
    return rows, summary


def part_tower(args, data, dev, work):
    from vision.towers import build_vision_tower

    xtr, ytr, _, xva, yva, _ = data
    tower = build_vision_tower(args.tower).to(dev)
    head = torch.nn.Linear(tower.embed_dim, 30).to(dev)
    secs = train_loop("tower classifier", [*tower.parameters(), *head.parameters()],
                      lambda i: F.cross_entropy(head(tower(xtr[i]).pooled), ytr[i], label_smoothing=0.1),
                      args.tower_steps or args.steps, 2e-3, xtr.shape[0], args.batch, dev, wd=0.05)
    tower.eval()
    acc = float(batched(lambda s: (head(tower(xva[s]).pooled).argmax(1) == yva[s]).float(), xva.shape[0]).mean())
    tower.save(work / "tower.safetensors")
    return [{"model": f"{args.tower} (teacher / frozen tower)", "metric": "classifier val accuracy",
             "value": acc, "train_s": round(secs, 1)}]


def part_tokenflow(args, data, dev, out, cls_path, label="TokenFlow multi-scale", **over):
    from tokenizers_img.seed import save_image_grid
    from tokenizers_img.tokenflow import TokenFlowTokenizer, tokenflow_config

    xtr, ytr, _, xva, yva, _ = data
    n_val = xva.shape[0]
    t = TokenFlowTokenizer(tokenflow_config("tiny", semantic_tower=args.tower, teacher_pretrained=cls_path,
                                            pixel_channels=args.pixel_channels, **over)).to(dev)
    params = [p for p in t.parameters() if p.requires_grad]
    t.train()
    t.teacher.eval()
    secs = train_loop(label, params, lambda i: t.losses(xtr[i])[0], args.steps, 5e-4, xtr.shape[0], args.batch,
                      dev, betas=(0.9, 0.95))
    t.eval()

    def ev(s):
        x = xva[s]
        q = t.quantize(t.encode_latents(x))
        rec = t.decode_latents(q.quantized)
        sem = t.decode_semantic(q.quantized)
        cos = F.cosine_similarity(sem.float(), t.teacher_features(x), dim=-1).mean(1)
        mse = ((rec.clamp(-1, 1) - x) ** 2).flatten(1).mean(1)
        return mse, cos, q.indices
    mse, cos, idv = batched(ev, n_val)
    p = float((10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean())
    n_probe = min(xtr.shape[0], args.probe_images)  # linear probes on features of the ids (understanding path)
    tr_ids = batched(lambda s: t.encode(xtr[s]), n_probe)
    f_tr = batched(lambda s: t.semantic_features(tr_ids[s]).mean(1), n_probe)
    f_va = batched(lambda s: t.semantic_features(idv[s]).mean(1), n_val)
    d_tr = batched(lambda s: t.semantic_features(tr_ids[s], level="decoded").mean(1), n_probe)
    d_va = batched(lambda s: t.semantic_features(idv[s], level="decoded").mean(1), n_val)
    probe_cb = linear_probe(f_tr, ytr[:n_probe], f_va, yva)
    probe_dec = linear_probe(d_tr, ytr[:n_probe], d_va, yva)
    with torch.no_grad():
        save_image_grid(torch.cat([xva[:16], t.decode(idv[:16])]), out / (label.replace(" ", "_") + ".png"))
    n = t.seq_len
    return [
        {"model": label, "metric": "PSNR (dB)", "value": p, "train_s": round(secs, 1), "tokens": n},
        {"model": label, "metric": "teacher cosine", "value": float(cos.mean()), "tokens": n},
        {"model": label, "metric": "codebook usage (val tokens)", "value": idv.unique().numel() / t.vocab_size,
         "tokens": n},
        {"model": label, "metric": "linear probe acc (semantic codebook features)", "value": probe_cb, "tokens": n},
        {"model": label, "metric": "linear probe acc (semantic decoder features)", "value": probe_dec, "tokens": n},
    ]


def part_vqgan(args, data, dev, out):
    from tokenizers_img.seed import save_image_grid
    from tokenizers_img.vqgan import VQGAN

    xtr, ytr, _, xva, yva, _ = data
    n_val = xva.shape[0]
    vq = VQGAN.from_preset("tiny", codebook_size=args.codebook_size, ch=args.pixel_channels,
                           norm_groups=min(16, args.pixel_channels)).to(dev)
    vq.train()

    def vq_loss(i):
        x = xtr[i]
        rec, q = vq(x)
        return F.mse_loss(rec.float(), x) + q.loss
    secs = train_loop("VQGAN", list(vq.parameters()), vq_loss, args.steps, 5e-4, xtr.shape[0], args.batch, dev,
                      betas=(0.9, 0.95))
    vq.eval()

    def vq_ev(s):
        x = xva[s]
        q = vq.quantize(vq.encode_latents(x))
        rec = vq.decode_latents(q.quantized)
        return ((rec.clamp(-1, 1) - x) ** 2).flatten(1).mean(1), q.indices.reshape(x.shape[0], -1)
    mse, vids = batched(vq_ev, n_val)
    psnr_db = float((10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean())
    n_probe = min(xtr.shape[0], args.probe_images)
    cb = vq.codebook_embeddings()
    tr_ids = batched(lambda s: vq.encode(xtr[s]), n_probe)
    probe_vq = linear_probe(cb[tr_ids].mean(1), ytr[:n_probe], cb[vids].mean(1), yva)
    with torch.no_grad():
        save_image_grid(torch.cat([xva[:16], vq.decode(vids[:16])]), out / "VQGAN.png")
    label = f"VQGAN (tiny, K={args.codebook_size})"
    return [
        {"model": label, "metric": "PSNR (dB)", "value": psnr_db, "train_s": round(secs, 1), "tokens": vq.seq_len},
        {"model": label, "metric": "codebook usage (val tokens)", "value": vids.unique().numel() / vq.vocab_size,
         "tokens": vq.seq_len},
        {"model": label, "metric": "linear probe acc (pixel code embeddings)", "value": probe_vq,
         "tokens": vq.seq_len},
    ]


def summary_rows(rows):
    """PSNR gaps TokenFlow - VQGAN (target: within 1 dB) and probe margins."""
    def get(model_prefix, metric):
        for r in rows:
            if r["model"].startswith(model_prefix) and r["metric"].startswith(metric):
                return r["value"]
        return None
    out = []
    vq_p, vq_probe = get("VQGAN", "PSNR"), get("VQGAN", "linear probe")
    for tf in ("TokenFlow multi-scale", "TokenFlow single-scale"):
        p, probe = get(tf, "PSNR"), get(tf, "linear probe acc (semantic codebook")
        if p is not None and vq_p is not None:
            out.append({"model": f"{tf} - VQGAN", "metric": "PSNR gap (dB)", "value": p - vq_p})
        if probe is not None and vq_probe is not None:
            out.append({"model": f"{tf} - VQGAN", "metric": "linear probe margin", "value": probe - vq_probe})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="all", choices=["all", "tower", "seed", "tokenflow", "vqgan", "merge"],
                    help="run one part (parts share --work; 'merge' writes the table from the saved parts)")
    ap.add_argument("--quick", action="store_true", help="tiny step counts (smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tower", default="timm-vit-classifier-tiny",
                    help="vision.towers preset of the frozen SEED tower / TokenFlow teacher (clip-tiny-32 on a busy CPU)")
    ap.add_argument("--tower-checkpoint", default=None,
                    help="trained weights of --tower (e.g. the demo classifier's model.safetensors); else trained here")
    ap.add_argument("--tower-steps", type=int, default=None, help="steps of the tower's classifier training")
    ap.add_argument("--steps", type=int, default=3000, help="steps per training stage")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pixel-channels", type=int, default=32, help="conv width of TokenFlow's pixel branch and the VQGAN")
    ap.add_argument("--codebook-size", type=int, default=1024, help="K of TokenFlow and the VQGAN")
    ap.add_argument("--single-scale", action="store_true", help="also train TokenFlow with one 8x8 scale (64 ids)")
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--val-images", type=int, default=1000)
    ap.add_argument("--probe-images", type=int, default=5000, help="training images of the linear probes")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--work", default=None, help="folder for checkpoints and partial results (default: --out)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out
    work.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.quick:
        args.steps, args.tower_steps, args.train_images, args.val_images, args.probe_images = 30, 30, 2000, 300, 500
    parts = ["tower", "seed", "tokenflow", "vqgan"] if args.only == "all" else [args.only]
    if args.tower_checkpoint is not None and "tower" in parts:
        parts.remove("tower")
    cls_path = args.tower_checkpoint or str(work / "tower.safetensors")

    data = None
    if any(p != "merge" for p in parts):
        data = (*load_split("train", args.train_images, dev), *load_split("val", args.val_images, dev))
    for part in parts:
        if part == "merge":
            continue
        torch.manual_seed(0)
        if part != "tower" and not Path(cls_path).is_file():
            raise FileNotFoundError(f"tower weights {cls_path} missing: run --only tower first or pass --tower-checkpoint")
        if part == "tower":
            rows = part_tower(args, data, dev, work)
        elif part == "seed":
            xtr, _, ctr, xva, _, cva = data
            rows, _ = run_seed(args.tower, cls_path, xtr, ctr, xva, cva, args.steps, args.batch, dev, out, work)
        elif part == "tokenflow":
            rows = part_tokenflow(args, data, dev, out, cls_path, codebook_size=args.codebook_size)
            if args.single_scale:
                rows += part_tokenflow(args, data, dev, out, cls_path, "TokenFlow single-scale",
                                       codebook_size=args.codebook_size, scales=(8,))
        else:
            rows = part_vqgan(args, data, dev, out)
        (work / f"part_{part}.json").write_text(json.dumps({"rows": rows, "argv": sys.argv[1:]}, indent=1))
    if args.only not in ("all", "merge"):
        print(json.dumps(rows, indent=1))
        return 0
    rows, commands = [], []
    for part in ("tower", "seed", "tokenflow", "vqgan"):
        f = work / f"part_{part}.json"
        if f.is_file():
            blob = json.loads(f.read_text())
            rows += blob["rows"]
            commands.append("benchmarks/bench_seed_tokenflow.py " + " ".join(blob["argv"]))
    rows += summary_rows(rows)
    for r in rows:
        for k in ("train_s", "tokens"):
            r.setdefault(k, None)
    meta = {"device": str(dev), "tower": f"{args.tower} ({cls_path})", "commands": " && ".join(commands)}
    if dev.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(dev)
    from workbench.benchutil import save_table

    save_table("seed_tokenflow", rows, meta, root=str(out.parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
