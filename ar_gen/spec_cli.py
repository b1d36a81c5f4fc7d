"""Speculative decoding options for ``vtw generate`` (and the demo / benchmark), in one place.

``workbench/commands/generate.py`` calls :func:`add_speculative_arguments` on its parser and, after
loading the GPT and the tokenizer, :func:`build_speculative` (which checks every input before any
expensive work). The returned :class:`SpeculativeGenerator` produces the same token tensor as plain
sampling plus a statistics dict::

    vtw generate ... --speculative lantern --drafter runs/drafter/checkpoints/last.ckpt \\
        --gamma 4 --lantern-k 1000 --lantern-delta 0.1
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ar_gen.acceptance import AcceptanceConfig, NeighbourTable
from ar_gen.sampling import SamplingConfig
from ar_gen.speculative import DRAFT_MODES, SpecOutput, speculative_generate

MODES = ("none", "exact", "lantern")


def add_speculative_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("speculative decoding (LANTERN / EAGLE)")
    g.add_argument("--speculative", choices=MODES, default="none",
                   help="none: plain AR; exact: lossless speculative sampling; lantern: relaxed acceptance")
    g.add_argument("--drafter", type=Path, default=None,
                   help="drafter: an EAGLE drafter (.ckpt of EagleDrafterModule or save_eagle dir), a small GPT "
                        "on the same tokenizer, or an n-gram table (.safetensors from fit_ngram_drafter)")
    g.add_argument("--gamma", type=int, default=4, help="drafted tokens per target forward (chain length)")
    g.add_argument("--draft", choices=DRAFT_MODES, default="sample",
                   help="sample: drafts x ~ q, accepted with min(1, p~(x)/q(x)) (rejection sampling; far higher "
                        "acceptance on the flat distributions of visual AR); top1: deterministic drafts, q(x) = 1 "
                        "(LANTERN's dynamic-tree rule). Both lossless at delta 0; n-gram drafters are always top1")
    g.add_argument("--lantern-k", type=int, default=1000, help="latent neighbourhood size k (clamped to V-1)")
    g.add_argument("--lantern-delta", type=float, default=0.1,
                   help="TV bound delta (<= 1); > 1 means LANTERN++'s multiplicative bound lambda")
    g.add_argument("--lantern-residual", choices=["aggregated", "official"], default="aggregated",
                   help="after a rejection, remove the aggregated neighbours from the residual (default) or, as "
                        "the released LANTERN code, the k+1 nearest (with k near V that leaves a uniform draw)")
    g.add_argument("--neighbour-cache", type=Path, default=None,
                   help="folder for the cached neighbour tables (default $VTW_CACHE or ~/.cache/vtw)")


def load_drafter_runner(path: str | os.PathLike, target: nn.Module, map_location: str = "cpu"):
    """EAGLE drafter or small GPT drafter from ``path`` -> a runner for ``speculative_generate``."""
    import json

    from ar_gen.eagle import load_eagle
    from ar_gen.gpt import load_gpt
    from ar_gen.spec_models import EagleDraftRunner, GPTDraftRunner, NGramDraftRunner, NGramTable

    p = Path(path)
    if not p.exists():
        raise ValueError(f"--drafter {p} does not exist")
    kind = None
    if p.is_file() and p.suffix == ".safetensors":
        table = NGramTable.load(p)
        if (table.vocab_size, table.grid_w) != (target.config.vocab_size, target.config.grid_w):
            raise ValueError(f"n-gram drafter {p} (vocab={table.vocab_size}, grid width={table.grid_w}) does not fit "
                             f"the target (vocab={target.config.vocab_size}, grid width={target.config.grid_w})")
        return NGramDraftRunner(table)
    if p.is_dir() and (p / "config.json").is_file():
        kind = json.loads((p / "config.json").read_text()).get("arch")
    elif p.is_file():
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
        kind = "ar_gen.eagle.EagleDrafter" if "eagle_config" in hp else (
            "ar_gen.gpt.GPT" if "gpt_config" in hp else None)
    if kind == "ar_gen.eagle.EagleDrafter":
        drafter, _ = load_eagle(p, map_location)
        return EagleDraftRunner(drafter, target)
    if kind == "ar_gen.gpt.GPT":
        small, _ = load_gpt(p, map_location)
        tc, dc = target.config, small.config
        if (dc.vocab_size, dc.block_size, dc.num_classes) != (tc.vocab_size, tc.block_size, tc.num_classes):
            raise ValueError(f"drafter GPT {p} (vocab={dc.vocab_size}, block={dc.block_size}, classes={dc.num_classes}) "
                             f"does not fit the target (vocab={tc.vocab_size}, block={tc.block_size}, "
                             f"classes={tc.num_classes})")
        return GPTDraftRunner(small)
    raise ValueError(f"--drafter {p}: neither an EAGLE drafter, a workbench GPT checkpoint nor an n-gram table")


@dataclass
class SpeculativeGenerator:
    """Target + drafter + acceptance rule, ready to generate batches of class-conditional tokens."""

    target: nn.Module
    drafter: Any
    acceptance: AcceptanceConfig
    gamma: int = 4
    table: NeighbourTable | None = None
    draft: str = "sample"

    def generate(self, labels: torch.Tensor, sampling: SamplingConfig, num_tokens: int | None = None,
                 generator: torch.Generator | None = None) -> SpecOutput:
        from ar_gen.spec_models import RowCachedGPT

        c = self.target.config
        n = c.block_size if num_tokens is None else num_tokens
        device = next(self.target.parameters()).device
        if hasattr(self.drafter, "to"):
            self.drafter.to(device)  # the target may have moved after build_speculative (vtw generate --device)
        if self.table is not None and self.table.indices.device != device:
            self.table.to(device)
        runner = RowCachedGPT(self.target)
        try:
            return speculative_generate(runner, self.drafter, labels, n, self.gamma, self.acceptance, sampling,
                                        self.table, generator, null_class=c.num_classes, draft=self.draft)
        finally:
            runner.release()


def build_speculative(args: argparse.Namespace, target: nn.Module, tokenizer: Any | None = None
                      ) -> SpeculativeGenerator | None:
    """From parsed ``--speculative ...`` options; None for ``--speculative none``. Fails fast on bad input."""
    mode = getattr(args, "speculative", "none")
    if mode == "none":
        return None
    if mode not in MODES:
        raise ValueError(f"--speculative must be one of {MODES}, got {mode!r}")
    if args.drafter is None:
        raise ValueError(f"--speculative {mode} needs --drafter CKPT")
    if args.gamma < 1:
        raise ValueError(f"--gamma must be >= 1, got {args.gamma}")
    draft = getattr(args, "draft", "sample")
    if draft not in DRAFT_MODES:
        raise ValueError(f"--draft must be one of {DRAFT_MODES}, got {draft!r}")
    c = target.config
    if c.model_type != "c2i" or c.token_each != 1:
        raise ValueError("--speculative supports class-conditional single-token GPTs only "
                         f"(this GPT: model_type={c.model_type}, token_each={c.token_each})")
    acceptance = AcceptanceConfig("exact" if mode == "exact" else "lantern", args.lantern_k, args.lantern_delta,
                                  getattr(args, "lantern_residual", "aggregated"))
    table = None
    if acceptance.relaxed:
        if tokenizer is None or not hasattr(tokenizer, "codebook_embeddings"):
            raise ValueError("--speculative lantern needs the tokenizer (its codebook_embeddings()) for neighbourhoods")
        codebook = tokenizer.codebook_embeddings().detach().float().cpu()
        if codebook.shape[0] != c.vocab_size:
            raise ValueError(f"tokenizer codebook has {codebook.shape[0]} codes, the GPT vocabulary is {c.vocab_size}")
        table = NeighbourTable.from_codebook(codebook, args.lantern_k, getattr(args, "neighbour_cache", None))
        acceptance.lantern_k = table.k
    drafter = load_drafter_runner(args.drafter, target)
    return SpeculativeGenerator(target, drafter, acceptance, args.gamma, table, draft)


def make_generator(target: nn.Module, drafter_runner: Any, mode: str, gamma: int = 4, lantern_k: int = 1000,
                   lantern_delta: float = 0.1, codebook: torch.Tensor | None = None,
                   cache_dir: str | os.PathLike | None = None, draft: str = "sample") -> SpeculativeGenerator:
    """Programmatic twin of :func:`build_speculative` (demo, benchmark)."""
    acceptance = AcceptanceConfig("exact" if mode == "exact" else "lantern", lantern_k, lantern_delta)
    table = None
    if acceptance.relaxed:
        if codebook is None:
            raise ValueError("LANTERN needs the tokenizer codebook")
        table = NeighbourTable.from_codebook(codebook.detach().float().cpu(), lantern_k, cache_dir)
        acceptance.lantern_k = table.k
    return SpeculativeGenerator(target, drafter_runner, acceptance, gamma, table, draft)


# --------------------------------------------------------------------------------------------------
# Side-by-side comparison of decoding arms (demo stage and benchmark)
# --------------------------------------------------------------------------------------------------


@dataclass
class Arm:
    name: str  # label in tables
    mode: str  # "plain" | "exact" | "lantern"
    lantern_k: int = 1000
    lantern_delta: float = 0.0
    drafter: Any = None  # a drafter runner for this arm (default: run_arms' drafter_runner)
    gamma: int | None = None  # chain length for this arm (default: run_arms' gamma)
    draft: str = "sample"  # "sample" (x ~ q) or "top1" (deterministic drafts)


def run_arms(target: nn.Module, drafter_runner: Any, arms: list[Arm], labels: torch.Tensor, sampling: SamplingConfig,
             batch_size: int = 8, gamma: int = 4, codebook: torch.Tensor | None = None, seed: int = 0,
             repeats: int = 1, cache_dir: str | os.PathLike | None = None, warmup: bool = True,
             progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Generate ``labels`` with every arm (same chunks of ``batch_size``, same seeds per chunk).

    Wall-clock: per arm, the median over ``repeats`` of the total time for all chunks (after one warm-up
    chunk per arm); arms are interleaved chunk by chunk so that load changes of a shared machine hit all. Returns table rows (speed-up relative to the first arm, which should be "plain") and
    the tokens of the last repeat per arm.
    """
    import statistics
    import time

    from tqdm.auto import tqdm

    from ar_gen.sampling import generate

    rows: list[dict[str, Any]] = []
    tokens: dict[str, torch.Tensor] = {}
    n_tokens = target.config.block_size
    chunks = [labels[i:i + batch_size] for i in range(0, labels.shape[0], batch_size)]
    bar = tqdm(total=len(arms) * repeats * len(chunks), desc=f"decoding arms (batch {batch_size})",
               disable=not progress)
    specs = {arm.name: None if arm.mode == "plain" else make_generator(
        target, arm.drafter or drafter_runner, arm.mode, arm.gamma or gamma, arm.lantern_k, arm.lantern_delta,
        codebook, cache_dir, arm.draft) for arm in arms}
    if warmup:
        for arm in arms:
            _one_chunk(target, specs[arm.name], chunks[0], sampling, seed, generate)
    times = {arm.name: [0.0] * repeats for arm in arms}
    outs: dict[str, list[torch.Tensor]] = {arm.name: [] for arm in arms}
    aggs = {arm.name: {"target_forwards": 0, "tau_num": 0.0, "tau_den": 0, "mass": 0.0, "draft_s": 0.0,
                       "verify_s": 0.0, "accept_s": 0.0} for arm in arms}
    for rep in range(repeats):
        for i, chunk in enumerate(chunks):
            for arm in arms:  # interleaved, so that a change of machine load hits every arm alike
                start = time.perf_counter()
                toks, stats = _one_chunk(target, specs[arm.name], chunk, sampling, seed + i, generate)
                times[arm.name][rep] += time.perf_counter() - start
                bar.update(1)
                if rep == repeats - 1:
                    agg = aggs[arm.name]
                    outs[arm.name].append(toks)
                    agg["target_forwards"] += stats["target_forwards"]
                    agg["tau_num"] += stats["mean_accepted_length"] * stats["iterations"]
                    agg["tau_den"] += stats["iterations"]
                    agg["mass"] += stats["relaxed_mass_per_image"] * chunk.shape[0]
                    for key in ("draft_s", "verify_s", "accept_s"):
                        agg[key] += stats.get(key, 0.0)
    for arm in arms:
        agg = aggs[arm.name]
        tokens[arm.name] = torch.cat(outs[arm.name])
        wall = statistics.median(times[arm.name])
        rows.append({
            "arm": arm.name,
            "batch": batch_size,
            "wall_s_per_image": wall / labels.shape[0],
            "speedup": None,
            "target_forwards_per_call": agg["target_forwards"] / len(chunks) if arm.mode != "plain" else n_tokens,
            "mean_accepted_length": agg["tau_num"] / agg["tau_den"] if agg["tau_den"] else 1.0,
            "relaxed_mass_per_image": agg["mass"] / labels.shape[0],
            # where one iteration's time goes (last repeat): plain decoding has one token step per iteration
            "ms_per_iteration": 1000 * times[arm.name][-1] / max(agg["tau_den"], 1),
            "draft_ms_per_iteration": 1000 * agg["draft_s"] / max(agg["tau_den"], 1),
            "verify_ms_per_iteration": 1000 * agg["verify_s"] / max(agg["tau_den"], 1),
            "accept_ms_per_iteration": 1000 * agg["accept_s"] / max(agg["tau_den"], 1),
        })
    bar.close()
    base = rows[0]["wall_s_per_image"]
    for row in rows:
        row["speedup"] = base / row["wall_s_per_image"]
    return rows, tokens


def _one_chunk(target, spec, labels, sampling, seed, generate_fn) -> tuple[torch.Tensor, dict[str, Any]]:
    gen = torch.Generator(device=labels.device).manual_seed(seed)
    if spec is None:
        toks = generate_fn(target, labels, sampling, generator=gen)
        n = toks.shape[1]
        return toks, {"target_forwards": n, "mean_accepted_length": 1.0, "iterations": n,
                      "relaxed_mass_per_image": 0.0}
    out = spec.generate(labels, sampling, generator=gen)
    return out.tokens, out.stats.as_dict()


def fit_ngram_drafter(shards_dir: str | os.PathLike, out: str | os.PathLike, max_batches: int = 1000) -> Path:
    """Count the spatial n-gram drafter table on ``vtw tokenize`` shards and save it (seconds on CPU)."""
    from ar_gen.lit_drafter import token_batches
    from ar_gen.spec_models import NGramTable
    from tokenizers_img.shards import read_index

    index = read_index(Path(shards_dir) / "train")
    tok = index["tokenizer"]
    batches = token_batches(shards_dir, batch_size=256, max_batches=max_batches)
    tokens = torch.cat([b["tokens"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    grid_w = int(tok["token_grid"][1])
    return NGramTable.fit(tokens, labels, int(tok["vocab_size"]), grid_w).save(out)
