"""Demo stage: train an EAGLE drafter for the demo GPT and compare plain AR with speculative decoding.

Reads ``ctx.artifacts["gpt_ckpt"]`` (target), ``["shards_dir"]`` (token shards the GPT was trained on),
``["tokenizer_dir"]`` (decoder + codebook for LANTERN's neighbourhoods) and, when present,
``["classifier_dir"]`` (class-consistency accuracy) and ``["sampling"]`` (the GPT stage's sampling
settings as a dict of ``ar_gen.sampling.SamplingConfig`` fields). Writes ``speculative/drafter/``,
``speculative/plain_vs_lantern.png`` and a speed-up table.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from workbench.demo_stages import DemoContext, StageResult

TRAIN_SECONDS = 55  # ~1 minute of CPU for the drafter (75 s before the demo GPT got 400 s)
TRAIN_STEPS = 1500
QUICK_TRAIN_STEPS = 5
GAMMA = 3
NGRAM_GAMMA = 4  # n-gram drafts cost no network call, so a longer chain pays off
LANTERN_DELTA = 0.1
# Latent neighbours per code. The paper's k = 1000 is 6% of LlamaGen's 16,384 codes, as k = 16 is of the
# demo's 256. k = 1000 would clamp to V - 1, every code a neighbour of every other: on the 512-code shapes
# recipe GPT that cost 12 points of class consistency at delta 0.1, against 2.9 with k = 16 (README,
# speculative_recipe_tiny).
LANTERN_K = 16
DEFAULT_SAMPLING = {"cfg_scale": 2.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def _need(ctx: DemoContext, key: str) -> Path:
    value = ctx.artifacts.get(key)
    if value is None:
        raise ValueError(f"speculative demo stage needs ctx.artifacts[{key!r}] from an earlier stage "
                         f"(have: {sorted(ctx.artifacts)})")
    path = Path(value)
    if not path.exists():
        raise ValueError(f"ctx.artifacts[{key!r}] = {path} does not exist")
    return path


def _save_png(images: torch.Tensor, path: Path, nrow: int) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    save_image((images.clamp(-1, 1) + 1) / 2, tmp, nrow=nrow, padding=1, format="png")
    os.replace(tmp, path)


def _decode(tokenizer: Any, tokens: torch.Tensor, batch: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([tokenizer.decode(tokens[i:i + batch]).float().cpu() for i in range(0, len(tokens), batch)])


def _accuracy(classifier_dir: Path | None, images: torch.Tensor, labels: torch.Tensor) -> float | None:
    if classifier_dir is None or not Path(classifier_dir).exists():
        return None
    from vision.classifier import load_classifier

    net, info = load_classifier(classifier_dir)
    size = info.get("image_size")
    if size and images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    with torch.no_grad():
        preds = torch.cat([net(images[i:i + 64]).argmax(-1) for i in range(0, len(images), 64)])
    return float((preds == labels).float().mean())


def run(ctx: DemoContext) -> StageResult:
    from ar_gen.eagle import save_eagle
    from ar_gen.gpt import load_gpt
    from ar_gen.lit_drafter import token_batches, train_eagle
    from ar_gen.sampling import SamplingConfig
    from ar_gen.spec_cli import Arm, run_arms
    from ar_gen.spec_models import EagleDraftRunner, NGramDraftRunner, NGramTable
    from tokenizers_img.base import load_tokenizer
    from workbench.benchutil import markdown_table
    from workbench.runtime import default_precision

    gpt_ckpt = _need(ctx, "gpt_ckpt")
    shards_dir = _need(ctx, "shards_dir")
    tokenizer_dir = _need(ctx, "tokenizer_dir")
    out = ctx.out_dir / "speculative"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(ctx.seed)

    target, _ = load_gpt(gpt_ckpt)
    tokenizer = load_tokenizer(tokenizer_dir).eval()
    codebook = tokenizer.codebook_embeddings().float().cpu()
    c = target.config

    # 1. drafter, trained on the same token shards as the target
    batches = token_batches(shards_dir, batch_size=64, max_batches=8 if ctx.quick else 200, seed=ctx.seed)
    steps = QUICK_TRAIN_STEPS if ctx.quick else TRAIN_STEPS
    bf16 = default_precision() == "bf16-mixed"  # CPUs with bf16 matrix units: ~1.3x the steps in the budget
    drafter, log = train_eagle(target, batches, steps=steps, lr=2e-3, warmup_steps=min(50, steps // 5 + 1),
                               seed=ctx.seed, time_budget_s=None if ctx.quick else TRAIN_SECONDS,
                               autocast_dtype=torch.bfloat16 if bf16 else None)
    save_eagle(drafter, out / "drafter", extra={"target": str(gpt_ckpt), "train_log": log[-5:]})
    runner = EagleDraftRunner(drafter, target)
    ngram = NGramTable.fit(torch.cat([b["tokens"] for b in batches]), torch.cat([b["label"] for b in batches]),
                           c.vocab_size, c.grid_w)
    ngram.save(out / "ngram.safetensors")
    ngram_runner = NGramDraftRunner(ngram)

    # 2. the same classes plainly and with speculative decoding, same seeds and sampling settings
    sampling = SamplingConfig(**{**DEFAULT_SAMPLING, **dict(ctx.artifacts.get("sampling") or {})})
    n_cls = c.num_classes
    classes = list(range(0, n_cls, max(1, n_cls // 6)))[:6]
    per_class = 2 if ctx.quick else 4
    labels = torch.tensor([k for k in classes for _ in range(per_class)])
    arms = [Arm("plain AR", "plain"), Arm("exact speculative (EAGLE)", "exact"),
            Arm(f"LANTERN k={LANTERN_K} d={LANTERN_DELTA} (EAGLE)", "lantern", LANTERN_K, LANTERN_DELTA),
            Arm("exact speculative (n-gram)", "exact", drafter=ngram_runner, gamma=NGRAM_GAMMA),
            Arm(f"LANTERN k={LANTERN_K} d={LANTERN_DELTA} (n-gram)", "lantern", LANTERN_K, LANTERN_DELTA,
                drafter=ngram_runner, gamma=NGRAM_GAMMA)]
    rows, tokens = run_arms(target, runner, arms, labels, sampling, batch_size=8, gamma=GAMMA, codebook=codebook,
                            seed=ctx.seed, repeats=1, cache_dir=ctx.out_dir / "cache")
    # batch 1 (the setting of the LANTERN paper): speed only, on the first images
    rows_b1, _ = run_arms(target, runner, arms, labels[: 2 if ctx.quick else 8], sampling, batch_size=1,
                          gamma=GAMMA, codebook=codebook, seed=ctx.seed, repeats=1, cache_dir=ctx.out_dir / "cache")

    # 3. pictures and quality
    classifier_dir = ctx.artifacts.get("classifier_dir")
    images = {name: _decode(tokenizer, toks) for name, toks in tokens.items()}
    for row in rows:
        acc = _accuracy(classifier_dir, images[row["arm"]], labels)
        row["class_accuracy"] = acc
    plain_img, lantern_img = images[arms[0].name], images[arms[2].name]
    side = []
    for i in range(0, len(labels), per_class):  # one row per class: plain | lantern
        side += [plain_img[i:i + per_class], torch.full_like(plain_img[:1], -1.0), lantern_img[i:i + per_class]]
    _save_png(torch.cat(side), out / "plain_vs_lantern.png", nrow=2 * per_class + 1)

    lantern = rows[2]
    rows += rows_b1
    report = (
        "## Speculative decoding (EAGLE drafter, LANTERN relaxed acceptance)\n\n"
        f"EAGLE one-layer drafter (shares the GPT's embedding and head) trained for {len(log) * 20 if log else 0}"
        f"-ish steps on the token shards ({'quick' if ctx.quick else f'<= {TRAIN_SECONDS} s'}), final loss "
        f"{log[-1]['loss'] if log else float('nan'):.3f}, top-1 agreement with the target "
        f"{log[-1]['top1_agree'] if log else float('nan'):.2f}. Chain of gamma={GAMMA} drafts sampled from the "
        "drafter's distribution q, one target forward verifies them (accept with min(1, p~/q), resample from the "
        f"residual); batch 8 (and batch 1 for speed), same seeds; sampling cfg={sampling.cfg_scale}, temperature={sampling.temperature}, "
        f"top-k={sampling.top_k}, top-p={sampling.top_p}. LANTERN: the k={min(LANTERN_K, c.vocab_size - 1)} nearest "
        f"codes of the {c.vocab_size}-code tokenizer codebook are each code's latent neighbours, delta={LANTERN_DELTA}.\n\n"
        "The n-gram drafter (beyond the issue) predicts each token from its left and upper neighbours and the "
        "class with a table counted on the same shards: no network call per draft, deterministic (top-1) drafts, "
        f"chain gamma={NGRAM_GAMMA}.\n\n"
        "Left of each row: plain AR; right: LANTERN with the EAGLE drafter (same class, same seed).\n\n"
        "![plain vs LANTERN](speculative/plain_vs_lantern.png)\n\n"
        + markdown_table(rows)
        + "\nWall-clock on this shared CPU is noisy; `benchmarks/bench_speculative.py` repeats it with medians.\n"
    )
    metrics = {
        "lantern_speedup": lantern["speedup"],
        "exact_speedup": rows[1]["speedup"],
        "lantern_mean_accepted_length": lantern["mean_accepted_length"],
        "exact_mean_accepted_length": rows[1]["mean_accepted_length"],
        "lantern_ngram_speedup": rows[4]["speedup"],
        "exact_ngram_speedup": rows[3]["speedup"],
        "drafter_steps": (log[-1]["step"] + 1) if log else 0,
        "lantern_speedup_batch1": rows_b1[2]["speedup"],
        "exact_speedup_batch1": rows_b1[1]["speedup"],
    }
    for row in rows:
        if row.get("class_accuracy") is not None:
            metrics[f"class_accuracy/{row['arm']}"] = row["class_accuracy"]
    return StageResult(name="speculative", metrics=metrics, report_md=report,
                       artifacts={"drafter_dir": str(out / "drafter")})
