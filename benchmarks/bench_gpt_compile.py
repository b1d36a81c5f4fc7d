"""GPT training speed with and without ``torch.compile`` (``GPTModule(compile=True)``), side by side.

Part 1 (always): one training step of a GPT preset (forward, CE loss, backward, clipping, AdamW) on random
tokens, eager and compiled, in the precision the workbench picks for this machine (bf16-mixed with AMX,
else fp32). Reports the first-call seconds (compiling, with an empty Inductor cache unless
``--warm-cache``), milliseconds per step after warm-up, the ratio, and the largest difference between the
eager and compiled losses over the timed steps (both models start from the same weights and see the same
batches).

Part 2 (``--shards``): the demo GPT stage itself (``workbench.demo_stages.gpt.train_gpt``) for the same
wall-clock budget eager and compiled, then ``sample_and_score`` (class consistency and Frechet distance of
generated images, shapes classifier). ``--threads 1`` stands in for a slower machine.

    .venv/bin/python benchmarks/bench_gpt_compile.py                                   # part 1, ~2 min
    .venv/bin/python benchmarks/bench_gpt_compile.py --shards runs/demo/shards --tokenizer runs/demo/tokenizer \\
        --classifier runs/demo/classifier --budget 280                                   # + part 2, ~12 min
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.benchutil import save_table  # noqa: E402


def compile_cache(warm: bool):
    """A fresh, empty Inductor cache (disk and memory) so a compile is timed as on a new machine."""
    torch._dynamo.reset()
    if warm:
        return contextlib.nullcontext()
    from torch._inductor import utils as inductor_utils

    fresh = getattr(inductor_utils, "fresh_cache", None) or getattr(inductor_utils, "fresh_inductor_cache", None)
    return fresh() if fresh is not None else contextlib.nullcontext()


def _train_step(model, loss_fn, batches: list, bf16: bool):
    """A closure running training step ``i`` (AdamW, clipping) on ``batches[i % len]``; returns the loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)

    def step(i: int) -> float:
        tokens, labels = batches[i % len(batches)]
        torch.manual_seed(i)  # label dropout draws the same nulls in both modes
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(tokens, labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def step_times(preset: str, vocab: int, seq: int, batch: int, steps: int, warmup: int, bf16: bool,
               warm: bool = False) -> list[dict]:
    """Eager and compiled training-step timings of one preset (sizes as named, the demo GPT's dropout and RoPE
    settings) on identical inputs."""
    from ar_gen.gpt import GPT, gpt_config
    from workbench.demo_stages.gpt import MODEL

    torch.manual_seed(0)
    sizes = ("n_layer", "n_head", "dim", "multiple_of")
    cfg = gpt_config(preset, vocab_size=vocab, block_size=seq, num_classes=30,
                     **{k: v for k, v in MODEL.items() if k not in sizes})  # the preset's size, demo's dropouts
    base = GPT(cfg)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, vocab, (batch, seq), generator=gen), torch.randint(0, 30, (batch,), generator=gen))
               for _ in range(4)]
    rows, losses = [], {}
    for mode in ("eager", "compile"):
        model = copy.deepcopy(base).train()
        with compile_cache(warm):
            step = _train_step(model, torch.compile(model.training_loss) if mode == "compile" else model.training_loss,
                               batches, bf16)
            t0 = time.perf_counter()
            seen = [step(0)]
            first_s = time.perf_counter() - t0
            seen += [step(i) for i in range(1, warmup)]
            t0 = time.perf_counter()
            seen += [step(i) for i in range(warmup, warmup + steps)]
            ms = (time.perf_counter() - t0) / steps * 1000
        losses[mode] = seen
        rows.append({"part": "step", "preset": preset, "mode": mode, "precision": "bf16" if bf16 else "fp32",
                     "batch": batch, "first_call_s": round(first_s, 1), "ms_per_step": round(ms, 1)})
    rows[1]["speedup"] = round(rows[0]["ms_per_step"] / rows[1]["ms_per_step"], 2)
    rows[1]["max_loss_diff"] = round(max(abs(a - b) for a, b in zip(losses["eager"], losses["compile"])), 4)
    return rows


def demo_arms(args) -> list[dict]:
    from ar_gen.sampling import SamplingConfig
    from tokenizers_img.base import load_tokenizer
    from workbench.demo_stages.gpt import BATCH_SIZE, PER_CLASS, SAMPLING, sample_and_score, train_gpt

    tokenizer = load_tokenizer(args.tokenizer).eval()
    rows = []
    for mode in ("eager", "compile"):
        with compile_cache(args.warm_cache):
            module, seconds, done, val_loss = train_gpt(args.shards, args.work / mode, 10**6, args.budget, args.seed,
                                                        compile=mode == "compile")
        r = sample_and_score(module.model.eval(), tokenizer, args.shards, args.classifier,
                             SamplingConfig(**SAMPLING), PER_CLASS, module.model.config.num_classes, 1000, 1000,
                             args.seed, args.work / mode / "samples.png")
        rows.append({"part": "demo GPT", "mode": mode, "threads": torch.get_num_threads(), "budget_s": args.budget,
                     "steps": done, "batch": BATCH_SIZE, "val_loss": round(val_loss, 3),
                     "class_accuracy": round(r["scores"]["class_accuracy"], 3),
                     "frechet": round(r["scores"]["frechet_distance"], 2),
                     "ceiling": round(r["ceiling"]["class_accuracy"], 3)})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["GPT-tiny"], help="GPT presets for part 1 (their sizes, the demo's dropout/RoPE settings)")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--shards", type=Path, default=None, help="token shards: also run part 2 (demo GPT stage)")
    ap.add_argument("--tokenizer", type=Path, default=Path("runs/demo/tokenizer"))
    ap.add_argument("--classifier", type=Path, default=Path("runs/demo/classifier"))
    ap.add_argument("--budget", type=float, default=280.0, help="part 2: training seconds per arm")
    ap.add_argument("--work", type=Path, default=Path("runs/bench/gpt_compile_work"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warm-cache", action="store_true", help="keep Inductor's disk cache (default: a fresh one)")
    ap.add_argument("--name", default="gpt_compile")
    args = ap.parse_args()
    if args.shards is not None:
        for p in (args.shards / "train", args.tokenizer, args.classifier):
            if not p.exists():
                raise SystemExit(f"{p} does not exist: run `make demo` first (or pass --shards/--tokenizer/--classifier)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from workbench.runtime import cpu_has_bf16_matmul

    bf16 = cpu_has_bf16_matmul()
    rows = []
    for preset in args.presets:
        rows += step_times(preset, args.vocab, args.seq, args.batch, args.steps, args.warmup, bf16, args.warm_cache)
        print(rows[-2:], flush=True)
    if args.shards is not None:
        rows += demo_arms(args)
    save_table(args.name, rows, meta={"threads": torch.get_num_threads(), "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
