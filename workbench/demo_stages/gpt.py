"""Demo stage: train the tiny class-conditional GPT on the VQGAN token shards, sample a class grid, score it.

Reads ``ctx.artifacts["shards_dir"]`` (``train/`` and ``val/`` from ``vtw tokenize``), ``["tokenizer_dir"]``
and ``["classifier_dir"]``. Training is bounded by ``STEPS`` batches or ``TIME_BUDGET_S`` seconds, whichever
comes first (the cosine schedule follows whichever is further along). Then ``PER_CLASS`` images per class
are sampled with classifier-free guidance and scored by the shapes classifier: class accuracy and the
Frechet distance of its pre-logit features against held-out real images (with the real-vs-real floor at
the same sample size, and the classifier's accuracy on tokenizer reconstructions as the ceiling any
generator on these tokens can reach). Writes ``gpt/`` (``save_gpt``), ``gpt/samples.png``, and returns
artifacts ``gpt_ckpt`` and ``sampling`` (used by the speculative-decoding stage).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict

import torch

from workbench.demo_stages import DemoContext, StageResult

# Model / optimisation budget for ~7 minutes of 2 quiet CPU cores (bf16-mixed where the CPU has AMX or AVX512-BF16).
PRESET = "GPT-tiny"
# rope_prefix "identity": the class token's key is learnable (LlamaGen's zero rows make it unaddressable);
# with it the label is learnt about twice as fast (class consistency 48% vs 21% after 1600 steps).
MODEL = dict(n_layer=4, n_head=6, dim=192, multiple_of=64, token_dropout_p=0.0, resid_dropout_p=0.0,
             ffn_dropout_p=0.0, class_dropout_prob=0.1, rope_prefix="identity")
BATCH_SIZE = 64
# 2e-3: on the AMD EPYC's ~1200-1400 steps in 280 s (batch-16 VQGAN tokens, ceiling 83.7%) lr 2e-3 / 3e-3 / 5e-3
# gave 53.8% / 48.8% / 37.9% class consistency (held-out loss 1.926 / 1.944 / 2.008); batch 32 at 3e-3, 44.2%.
LR = 2e-3
WARMUP = 50
# Muon on the blocks' weight matrices (AdamW for embeddings, head and norms; vision.optim.MuonAdamW). On the
# AMD EPYC, same tokens (ceiling 82.9%), 400 s each, 480 images x 2 sampling seeds (/tmp arms, session 19): AdamW 53.8% /
# 56.2% class consistency (1616 / 1914 steps, held-out loss 2.08 / 2.07), Muon at lr x1 71.0% (1541 steps,
# 1.960), at lr x2.5 73.8% (1549 steps, 1.926): Muon's Newton-Schulz costs ~20% of the steps, and each step
# learns far more. `benchmarks/bench_gpt_optimizer.py` on another demo's tokens (ceiling 80.4%): AdamW 56.2%,
# Muon x2.5 64.1%, x4 66.4% (1936 / 1601 / 1588 steps).
OPTIMIZER = "muon"
MUON_LR_SCALE = 2.5
STEPS = 3000
# 240 s. History on the AMD EPYC (2 vCPUs, no AMX), 400 s with AdamW: 52.1% after 1181 steps in 280 s and
# 70.8% / 64.2% after ~1930 steps in 400 s (/tmp arms, sessions 15-16); fresh-clone demos 60.4 / 62.1 / 65.0%
# (sessions 15 / 16 / 18, ceilings 89-90%). Session 19, Muon at lr x2.5: 63.3% / 67.1% in fresh-clone demos whose
# Adam-trained tokenizers' ceilings were 80.4% / 78.4%. Session 20, with the VQGAN trained by Muon too (ceiling
# 98.2%): 95.8% in a fresh-clone demo at 360 s (1209 steps, `time make demo` 14m17s); on those tokens (/tmp arms,
# 960 images, 2 sampling seeds) 300 s gave 93.1 / 94.8% (1048 steps) and 240 s 95.4 / 94.8% (1001 steps), so the
# budget is 240 s: a fresh-clone `time make demo` then took 12m07s with the venv (91.7%, 854 steps).
TIME_BUDGET_S = 240.0
QUICK_STEPS = 3
# torch.compile the training loss (GPTModule(compile=True); falls back to eager when compiling fails):
# ~25 s of compiling (empty cache) buys 1.5x steps per second on 2 CPU cores (benchmarks/bench_gpt_compile.py).
COMPILE = True
PER_CLASS = 8
SAMPLING = dict(cfg_scale=3.0, temperature=1.0, top_k=0, top_p=1.0)
NUM_REAL = 1000


def _need(ctx: DemoContext, key: str):
    from pathlib import Path

    value = ctx.artifacts.get(key)
    if value is None:
        raise ValueError(f"gpt demo stage needs ctx.artifacts[{key!r}] from an earlier stage (have {sorted(ctx.artifacts)})")
    path = Path(value)
    if not path.exists():
        raise ValueError(f"ctx.artifacts[{key!r}] = {path} does not exist")
    return path


def train_gpt(shards_dir, out_dir, steps: int, time_budget_s: float | None, seed: int = 0, quick: bool = False,
              model_overrides: dict | None = None, lr: float = LR, batch_size: int = BATCH_SIZE,
              warmup: int = WARMUP, preset: str = PRESET, compile: bool = COMPILE, optimizer: str = OPTIMIZER,
              muon_lr_scale: float = MUON_LR_SCALE):
    """Train a class-conditional GPT on token shards; returns (GPTModule, seconds, steps done, val loss)."""
    import lightning.pytorch as pl

    from ar_gen.lit import GPTModule
    from tokenizers_img.shards import TokenShardDataModule
    from workbench.runtime import default_precision

    pl.seed_everything(seed, verbose=False)
    if compile and not torch.cuda.is_available():  # Inductor's CPU build logs a "No CUDA runtime" notice
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    data = TokenShardDataModule(str(shards_dir), batch_size=batch_size, num_workers=0)
    num_classes = data.num_classes or 30
    module = GPTModule(preset=preset, vocab_size=data.vocab_size, block_size=data.seq_len,
                       num_classes=num_classes, token_each=data.token_each,
                       overrides={**MODEL, **(model_overrides or {})}, lr=lr, weight_decay=0.05,
                       warmup_steps=min(warmup, steps), min_lr_ratio=0.05, time_budget_s=time_budget_s,
                       compile=compile and not quick, optimizer=optimizer, muon_lr_scale=muon_lr_scale)
    trainer = pl.Trainer(
        max_steps=steps, max_time=None if time_budget_s is None else {"seconds": time_budget_s},
        precision=default_precision(), default_root_dir=str(out_dir), logger=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0 if quick else 8,
        val_check_interval=None, check_val_every_n_epoch=10**6, gradient_clip_val=1.0, log_every_n_steps=50,
        accelerator="auto", devices=1,
    )
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=data)
        seconds = time.monotonic() - t0
        val = trainer.validate(module, datamodule=data, verbose=False)
    val_loss = float(val[0]["val/loss"]) if val and "val/loss" in val[0] else float("nan")
    return module, seconds, int(trainer.global_step), val_loss


def sample_and_score(model, tokenizer, shards_dir, clf_dir, sampling, per_class: int, n_cls: int, num_real: int,
                     n_val: int, seed: int, grid_png=None) -> dict:
    """Sample ``per_class`` images for classes ``0..n_cls-1`` and score them with the shapes classifier.

    Returns ``stats`` (sampling), ``scores`` (class accuracy, Frechet distance vs ``num_real`` held-out
    images) and ``ceiling`` (the same scores for tokenizer reconstructions of ``n_val`` held-out shards).
    """
    from ar_gen.generation import decode_tokens, sample_tokens, save_png_grid
    from tokenizers_img.shards import TokenShardDataset
    from workbench.commands.eval_gen import evaluate_images

    labels = torch.arange(n_cls).repeat_interleave(per_class)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny decode steps: OpenMP barriers cost more than they save (and stall on a busy CPU)
    try:
        tokens, stats = sample_tokens(model, labels, sampling, batch_size=64, seed=seed, desc="gpt samples")
    finally:
        torch.set_num_threads(threads)
    images, decode_s = decode_tokens(tokenizer, tokens)
    if grid_png is not None:
        save_png_grid(images, grid_png, nrow=per_class)
    scores = evaluate_images(images, labels, clf_dir, "test", num_real, seed)
    # ceiling: the classifier on tokenizer reconstructions of held-out token shards
    val_ds = TokenShardDataset(shards_dir / "val", random_aug=False)
    n_val = min(len(val_ds), n_val)
    recon, _ = decode_tokens(tokenizer, val_ds.tokens[:n_val, 0].long())
    ceiling = evaluate_images(recon, val_ds.labels[:n_val], clf_dir, "test", num_real, seed)
    return {"stats": stats, "scores": scores, "ceiling": ceiling, "decode_seconds": decode_s, "n_val": n_val}


def run(ctx: DemoContext) -> StageResult:
    from ar_gen.generation import check_compatible
    from ar_gen.gpt import save_gpt
    from ar_gen.sampling import SamplingConfig
    from tokenizers_img.base import load_tokenizer

    shards_dir = _need(ctx, "shards_dir")
    tok_dir = _need(ctx, "tokenizer_dir")
    clf_dir = _need(ctx, "classifier_dir")
    out = ctx.out_dir / "gpt"
    tokenizer = load_tokenizer(tok_dir).eval()

    steps = QUICK_STEPS if ctx.quick else STEPS
    module, train_s, done, val_loss = train_gpt(shards_dir, out / "lightning", steps,
                                                None if ctx.quick else TIME_BUDGET_S, ctx.seed, ctx.quick)
    model = module.model.eval()
    check_compatible(model, tokenizer)
    save_gpt(model, out, extra={"tokenizer_dir": str(tok_dir), "train_steps": done, "train_seconds": train_s,
                                "val_loss": val_loss})

    c = model.config
    per_class = 2 if ctx.quick else PER_CLASS
    n_cls = min(c.num_classes, 4) if ctx.quick else c.num_classes
    sampling = SamplingConfig(**SAMPLING)
    num_real = 64 if ctx.quick else NUM_REAL
    n_val = 64 if ctx.quick else 1000
    r = sample_and_score(model, tokenizer, shards_dir, clf_dir, sampling, per_class, n_cls, num_real, n_val,
                         ctx.seed, out / "samples.png")
    stats, scores, ceiling, decode_s, n_val = r["stats"], r["scores"], r["ceiling"], r["decode_seconds"], r["n_val"]

    metrics = {
        "gpt_train_steps": done, "gpt_train_seconds": train_s, "gpt_val_loss": val_loss,
        "gpt_compiled": module.compiled,
        "gpt_params": model.num_params(),
        "gpt_class_accuracy": scores["class_accuracy"], "gpt_frechet_distance": scores["frechet_distance"],
        "gpt_frechet_real_floor": scores["frechet_real_floor"],
        "gpt_recon_class_accuracy": ceiling["class_accuracy"], "gpt_recon_frechet_distance": ceiling["frechet_distance"],
        "gpt_sampling_seconds": stats["sampling_seconds"], "gpt_image_tokens_per_s": stats["image_tokens_per_s"],
        "gpt_decode_seconds": decode_s,
    }
    inception = scores.get("inception_fid")
    report = (
        "## Class-conditional GPT (LlamaGen-style) on the VQGAN tokens\n\n"
        f"{c.n_layer} layers x {c.dim} wide, {c.n_head} heads, 2D RoPE over the {c.grid_h}x{c.grid_w} token grid, "
        f"vocabulary {c.vocab_size}, {model.num_params() / 1e6:.2f} M parameters; {done} batches of {BATCH_SIZE} in "
        f"{train_s:.0f} s (budget {TIME_BUDGET_S:.0f} s, {'torch.compile' if module.compiled else 'eager'}), "
        f"held-out next-token loss {val_loss:.3f}.\n\n"
        f"Sampling: {per_class} images per class for {n_cls} classes, CFG {sampling.cfg_scale} (cond/uncond in one "
        f"doubled batch), temperature {sampling.temperature}, top-k {sampling.top_k or 'off'}, "
        f"top-p {sampling.top_p}, seed {ctx.seed}: {stats['sampling_seconds']:.1f} s "
        f"({stats['image_tokens_per_s']:.0f} image tokens/s, KV-cached).\n\n"
        f"**Class accuracy of generated images (shapes classifier): {scores['class_accuracy'] * 100:.1f}%**; "
        f"Frechet distance in the classifier's feature space vs {num_real} held-out real images: "
        f"**{scores['frechet_distance']:.2f}** (real-vs-real floor at this sample size "
        f"{scores['frechet_real_floor']:.2f}). Ceiling from the tokenizer: the classifier scores "
        f"{ceiling['class_accuracy'] * 100:.1f}% on VQGAN reconstructions of {n_val} held-out images "
        f"(their Frechet distance {ceiling['frechet_distance']:.2f}).\n\n"
        + (f"Inception FID {inception:.2f}.\n\n" if inception is not None else
           f"Inception FID/IS: {scores.get('inception', 'not computed')}.\n\n")
        + "One row per class:\n\n![GPT samples](gpt/samples.png)\n"
    )
    return StageResult(name="gpt", metrics=metrics, report_md=report,
                       artifacts={"gpt_ckpt": out, "sampling": asdict(sampling)})
