"""Batched image generation with a GPT + tokenizer: checks, progress, timing (used by ``vtw generate``,
``vtw eval-gen`` and the demo).

Sampling rules live in :mod:`ar_gen.sampling`; this module only batches conditions, keeps one seeded
``torch.Generator`` for the whole run (same seed + same batch size + same settings -> the same images),
decodes tokens with the tokenizer and times each part.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ar_gen.gpt import GPT
from ar_gen.sampling import SamplingConfig, generate


def check_compatible(model: GPT, tokenizer: Any) -> None:
    """Raise ``ValueError`` when the GPT cannot produce tokens for ``tokenizer`` (vocabulary, length, layout)."""
    c = model.config
    problems = []
    if int(tokenizer.vocab_size) != c.vocab_size:
        problems.append(f"vocabulary: GPT {c.vocab_size} vs tokenizer {tokenizer.vocab_size}")
    if int(tokenizer.seq_len) != c.block_size:
        problems.append(f"tokens per image: GPT block_size {c.block_size} vs tokenizer seq_len {tokenizer.seq_len}")
    if int(getattr(tokenizer, "token_each", 1)) != c.token_each:
        problems.append(f"sub-tokens: GPT token_each {c.token_each} vs tokenizer {tokenizer.token_each}")
    grid = tuple(getattr(tokenizer, "token_grid", (c.grid_h, c.grid_w)))
    if not problems and grid != (c.grid_h, c.grid_w) and grid[0] * grid[1] == c.block_size:
        problems.append(f"token grid: GPT {c.grid_h}x{c.grid_w} vs tokenizer {grid[0]}x{grid[1]}")
    if problems:
        raise ValueError("the GPT does not match the tokenizer: " + "; ".join(problems))


def check_classes(model: GPT, classes: Sequence[int]) -> None:
    c = model.config
    if c.model_type != "c2i":
        raise ValueError("this GPT is caption-conditioned: pass captions, not class ids")
    bad = [k for k in classes if not 0 <= int(k) < c.num_classes]
    if bad:
        raise ValueError(f"unknown class id(s) {bad}: this GPT has classes 0..{c.num_classes - 1}")


@torch.no_grad()
def sample_tokens(model: GPT, cond: torch.Tensor, sampling: SamplingConfig, batch_size: int = 16,
                  seed: int = 0, progress: bool = True, speculative: Any | None = None,
                  desc: str = "generating") -> tuple[torch.Tensor, dict[str, Any]]:
    """Tokens for every condition row (labels (N,) or caption features (N, P, Dc)), in batches.

    Returns (tokens (N, seq_len[, token_each]) long, stats dict with seconds and tokens/s).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    n = cond.shape[0]
    c = model.config
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n * c.block_size, desc=desc, unit="tok", leave=False, mininterval=1.0)
    out, spec_stats = [], []
    t0 = time.perf_counter()
    try:
        for i in range(0, n, batch_size):
            chunk = cond[i:i + batch_size].to(device)
            b = chunk.shape[0]
            if speculative is not None:
                res = speculative.generate(chunk, sampling, generator=generator)
                out.append(res.tokens.cpu())
                spec_stats.append(res.stats)
                if bar is not None:
                    bar.update(b * c.block_size)
            else:
                cb = (lambda _step, b=b: bar.update(b)) if bar is not None else None
                out.append(generate(model, chunk, sampling, generator=generator, callback=cb).cpu())
    finally:
        if bar is not None:
            bar.close()
        model.clear_caches()
    seconds = time.perf_counter() - t0
    tokens = torch.cat(out)
    stats: dict[str, Any] = {"sampling_seconds": seconds, "images": n,
                             "image_tokens_per_s": n * c.block_size / max(seconds, 1e-9)}
    if spec_stats:
        stats["speculative"] = [s.as_dict() if hasattr(s, "as_dict") else str(s) for s in spec_stats]
    return tokens, stats


@torch.no_grad()
def decode_tokens(tokenizer: Any, tokens: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, float]:
    """Tokens -> images (N, 3, H, W) clamped to [-1, 1], and the seconds it took."""
    device = next(tokenizer.parameters()).device
    t0 = time.perf_counter()
    imgs = [tokenizer.decode(tokens[i:i + batch_size].to(device)).float().cpu().clamp(-1, 1)
            for i in range(0, tokens.shape[0], batch_size)]
    return torch.cat(imgs), time.perf_counter() - t0


def save_png_grid(images: torch.Tensor, path, nrow: int) -> None:
    """Save images in [-1, 1] as one PNG grid (temp file, then rename)."""
    import os
    import tempfile
    from pathlib import Path

    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    save_image((images.clamp(-1, 1) + 1) / 2, tmp, nrow=max(1, nrow), padding=1, format="png")
    os.replace(tmp, path)
