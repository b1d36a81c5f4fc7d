"""Demo stage: train the tiny LlamaGen-style VQGAN on 32x32 shapes, then tokenize shapes into shards.

Writes ``vqgan/recon.png`` (validation originals above, reconstructions below), the tokenizer
(``tokenizer/``, ``save_pretrained``) and token shards ``shards/train`` and ``shards/val`` for the AR stage.
Training runs for at most ``STEPS`` batches or ``TIME_BUDGET_S`` seconds, whichever comes first (the
cosine learning-rate schedule follows whichever is further along), so a busy machine costs quality,
not time.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from workbench.demo_stages import DemoContext, StageResult

IMAGE_SIZE = 32
# Batch 16: on a slower CPU (AMD EPYC, 2 vCPUs, ~4.3 batches of 32 per second) the same 180 s of batch 16
# (~1470 batches) gave reconstructions the shapes classifier recognises more often than batch 32 (~850
# batches): 83.7% vs 78.0% (seed 0) and 58.3% vs 49.2% (seed 1). Before session 13 the demo used batch 32
# with a 1200-batch cap, which a fast Intel machine reached in 182 s (ceiling 96-98%).
BATCH_SIZE = 16
STEPS = 2400  # upper bound (the same images as 1200 batches of 32); the 180 s budget usually ends the run first
TIME_BUDGET_S = 180.0
QUICK_STEPS = 4
TRAIN_TOKENS, VAL_TOKENS = 20000, 1000  # images tokenized for the AR stage
QUICK_TOKENS = 64
LR = 2e-3
# Image-gradient (edge) loss weight (tokenizers_img.losses.image_gradient_loss) and 256 codes instead of the
# tiny preset's 512. Side by side at 800 VQGAN batches and 1200 GPT steps (benchmarks/bench_demo_tokenizer.py,
# README): 512 codes, pixel L2 only: the classifier recognises 57.9% of the reconstructions, GPT 19.6%
# class-consistent; weight 4: 84.3% / 29.2%; weight 4 and 256 codes: 90.7% / 50.4%, and 26.84 dB PSNR.
GRAD_WEIGHT = 4.0
OVERRIDES = {"codebook_size": 256}
# Muon on the hidden conv filters (TokenizerModule(optimizer="muon"), Adam for the rest), lr as Adam's. The same
# 180 s on the AMD EPYC (session 20, seed 0): Adam 1283 batches, 25.55 dB, the classifier recognises 79.4% of the
# reconstructions; Muon 1150 batches (its step costs ~12% more), 29.61 dB, 97.6% (lr x3: 29.47 dB, 97.3%).
OPTIMIZER = "muon"
MUON_LR_SCALE = 1.0


def train_tiny(kind: str, out_dir: Path, export_dir: Path, steps: int, time_budget_s: float | None, seed: int = 0,
               quick: bool = False, overrides: dict | None = None, lr: float = LR, grad_weight: float = GRAD_WEIGHT,
               optimizer: str = OPTIMIZER, muon_lr_scale: float = MUON_LR_SCALE):
    """Train a tiny tokenizer (``kind`` "vqgan" or "bae") on 32x32 shapes with the demo recipe.

    Pixel L2 + image-gradient loss (``grad_weight``) + quantizer loss, Muon on the hidden conv filters
    (``optimizer="muon"``) and Adam (0.9, 0.95) on the rest or Adam throughout (``"adam"``), warmup + cosine
    (following steps or wall time, whichever is further), bf16-mixed where the CPU supports it.
    Returns ``(module, datamodule, seconds, precision)``.
    """
    import lightning.pytorch as pl

    from datasets.shapes import ShapesDataModule
    from tokenizers_img.lit import TokenizerModule
    from workbench.runtime import default_precision

    pl.seed_everything(seed, verbose=False)
    data = ShapesDataModule(image_size=IMAGE_SIZE, batch_size=BATCH_SIZE, num_workers=0,
                            train_samples=20000 if not quick else 256, val_samples=1000 if not quick else 64,
                            seed=seed)
    module = TokenizerModule(kind=kind, preset="tiny", overrides=overrides, lr=lr, warmup_steps=min(50, steps),
                             lr_schedule="cosine", min_lr_ratio=0.05, rec_loss="l2", grad_weight=grad_weight,
                             perceptual_weight=0.0, disc_weight=0.0, export_dir=str(export_dir), time_budget_s=time_budget_s,
                             optimizer=optimizer, muon_lr_scale=muon_lr_scale)
    precision = default_precision()
    trainer = pl.Trainer(
        max_steps=steps, max_time=None if time_budget_s is None else {"seconds": time_budget_s},
        precision=precision, default_root_dir=str(out_dir), logger=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=50,
        accelerator="auto", devices=1,
    )
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=data)  # on_fit_end saves the tokenizer to export_dir
    return module, data, time.monotonic() - t0, precision


def val_images(data) -> torch.Tensor:
    data.setup("validate")
    ds = data.datasets["val"]
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def run(ctx: DemoContext) -> StageResult:
    from tokenizers_img.lit import evaluate_reconstruction, save_image_grid
    from workbench.cli import main as vtw_main

    out = ctx.out_dir / "vqgan"
    tok_dir, shards_dir = ctx.out_dir / "tokenizer", ctx.out_dir / "shards"
    steps = QUICK_STEPS if ctx.quick else STEPS
    module, data, train_s, precision = train_tiny("vqgan", out, tok_dir, steps,
                                                  None if ctx.quick else TIME_BUDGET_S, ctx.seed, ctx.quick,
                                                  overrides=OVERRIDES)
    batches = module.batch_step

    tok = module.tokenizer.eval()
    images = val_images(data)
    metrics = evaluate_reconstruction(tok, images)
    with torch.no_grad():
        x = images[:16]
        x_hat = tok.decode(tok.encode(x))
    save_image_grid(x, x_hat, out / "recon.png", nrow=16)

    n_train, n_val = (QUICK_TOKENS, QUICK_TOKENS) if ctx.quick else (TRAIN_TOKENS, VAL_TOKENS)
    for split, n in (("train", n_train), ("val", n_val)):
        rc = vtw_main(["tokenize", "--tokenizer", str(tok_dir), "--data", "shapes", "--split", split,
                       "--num-samples", str(n), "--seed", str(ctx.seed), "--batch-size", "250",
                       "--out", str(shards_dir / split), "--overwrite"])
        if rc != 0:
            raise RuntimeError(f"vtw tokenize failed for split {split} (exit code {rc})")

    cfg = tok.config
    report = (
        "## Tiny VQGAN tokenizer (LlamaGen-style) on shapes\n\n"
        f"Encoder/decoder ch {cfg.ch}, ch_mult {list(cfg.ch_mult)} (/{tok.downsample}), codebook {cfg.codebook_size} x "
        f"{cfg.codebook_embed_dim}-d l2-normalised codes with dead-code restart; {batches} batches of {BATCH_SIZE} in "
        f"{train_s:.0f} s, precision `{precision}`, {'Muon (hidden conv filters) + Adam' if OPTIMIZER == 'muon' else 'Adam'}, pixel L2 + {GRAD_WEIGHT:g} x image-gradient L2 + VQ loss (no GAN / "
        "LPIPS in the demo budget).\n\n"
        f"**Validation ({metrics['num_images']} images): PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, "
        f"codebook usage {metrics['usage'] * 100:.1f}%** (perplexity {metrics['perplexity']:.0f} of "
        f"{tok.vocab_size}). Token grid {tok.token_grid[0]}x{tok.token_grid[1]} = {tok.seq_len} tokens per image; "
        f"{n_train} train / {n_val} val images tokenized to `shards/`.\n\n"
        "Originals (top) and reconstructions (bottom):\n\n![VQGAN reconstructions](vqgan/recon.png)\n"
    )
    return StageResult(
        name="vqgan",
        metrics={"val_psnr": metrics["psnr"], "val_ssim": metrics["ssim"], "codebook_usage": metrics["usage"],
                 "perplexity": metrics["perplexity"], "train_batches": batches, "train_seconds": train_s,
                 "vocab_size": tok.vocab_size, "seq_len": tok.seq_len},
        report_md=report,
        artifacts={"tokenizer_dir": tok_dir, "shards_dir": shards_dir},
    )
