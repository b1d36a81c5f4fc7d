"""The demo GPT trained with AdamW or Muon (``GPTModule(optimizer=...)``) for the same wall-clock budget.

Part 1: milliseconds per training step (forward, backward, clipping, optimizer step) of the demo GPT on
random tokens, eager, in the precision the workbench picks for this machine, for each optimizer: what
Muon's Newton-Schulz iterations cost per step.

Part 2 (``--shards``): ``workbench.demo_stages.gpt.train_gpt`` for ``--budget`` seconds per arm (compiled,
as the demo runs it), then ``--per-class`` images per class sampled with the demo's settings under each
``--sample-seeds`` and classified by the demo's shapes classifier: class consistency (and the shape part
of it), held-out loss, steps done. Arms run one after another in the order given; repeat the command
with the arms reversed to see the drift of a noisy machine.

    .venv/bin/python benchmarks/bench_gpt_optimizer.py --shards runs/demo/shards --tokenizer runs/demo/tokenizer \\
        --classifier runs/demo/classifier --arms adamw muon:1 --budget 400        # ~16 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.benchutil import save_table  # noqa: E402


def parse_arm(text: str) -> tuple[str, float]:
    """``adamw`` or ``muon[:LR_SCALE]`` -> (optimizer, muon_lr_scale)."""
    name, _, scale = text.partition(":")
    if name not in ("adamw", "muon") or (name == "adamw" and scale):
        raise SystemExit(f"--arms: {text!r} is not 'adamw' or 'muon[:LR_SCALE]'")
    try:
        return name, float(scale) if scale else 1.0
    except ValueError:
        raise SystemExit(f"--arms: {text!r}: LR_SCALE must be a number") from None


def step_times(arms: list[tuple[str, float]], vocab: int, seq: int, steps: int, bf16: bool) -> list[dict]:
    """Eager training-step time of the demo GPT with each optimizer (same weights, same batches)."""
    from ar_gen.lit import GPTModule
    from workbench.demo_stages.gpt import BATCH_SIZE, LR, MODEL, PRESET

    gen = torch.Generator().manual_seed(1)
    batches = [{"tokens": torch.randint(0, vocab, (BATCH_SIZE, seq), generator=gen),
                "label": torch.randint(0, 30, (BATCH_SIZE,), generator=gen)} for _ in range(4)]
    rows = []
    for optimizer, scale in arms:
        torch.manual_seed(0)
        module = GPTModule(preset=PRESET, vocab_size=vocab, block_size=seq, num_classes=30, overrides=MODEL,
                           lr=LR, weight_decay=0.05, optimizer=optimizer, muon_lr_scale=scale)
        module.log = lambda *a, **k: None  # no trainer attached
        opt = module.configure_optimizers()["optimizer"]
        if optimizer == "muon" and bf16:
            opt.ns_dtype = torch.bfloat16  # what GPTModule picks under a bf16-mixed trainer

        def step(i: int, module=module, opt=opt) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = module._common_step(batches[i % 4], "train")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for i in range(3):
            step(i)
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        rows.append({"part": "step", "optimizer": optimizer, "precision": "bf16" if bf16 else "fp32",
                     "batch": BATCH_SIZE, "ms_per_step": round((time.perf_counter() - t0) / steps * 1000, 1)})
        print(rows[-1], flush=True)
    return rows


def demo_arms(args, arms: list[tuple[str, float]]) -> list[dict]:
    from ar_gen.generation import decode_tokens, sample_tokens
    from ar_gen.metrics import classifier_outputs
    from ar_gen.sampling import SamplingConfig
    from tokenizers_img.base import load_tokenizer
    from vision.classifier import load_classifier
    from workbench.demo_stages.gpt import LR, SAMPLING, train_gpt

    tokenizer = load_tokenizer(args.tokenizer).eval()
    classifier, _ = load_classifier(args.classifier)
    rows = []
    for optimizer, scale in arms:
        tag = optimizer if optimizer == "adamw" else f"muon:{scale:g}"
        module, seconds, done, val_loss = train_gpt(args.shards, args.work / tag.replace(":", "_"), 10**6,
                                                    args.budget, args.seed, optimizer=optimizer,
                                                    muon_lr_scale=scale, lr=LR)
        model = module.model.eval()
        n_cls = model.config.num_classes
        labels = torch.arange(n_cls).repeat_interleave(args.per_class)
        accs, shape_accs = [], []
        for sample_seed in args.sample_seeds:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny decode steps, as in the demo
            try:
                tokens, _ = sample_tokens(model, labels, SamplingConfig(**SAMPLING), batch_size=64, seed=sample_seed)
            finally:
                torch.set_num_threads(threads)
            images, _ = decode_tokens(tokenizer, tokens)
            pred = classifier_outputs(classifier, images)[0].argmax(-1)
            accs.append((pred == labels).float().mean().item())
            n_colours = 6  # datasets.shapes: label = shape * 6 + colour
            shape_accs.append((pred // n_colours == labels // n_colours).float().mean().item())
        rows.append({"part": "demo GPT", "arm": tag, "budget_s": args.budget, "steps": done,
                     "ms_per_step": round(seconds / max(done, 1) * 1000, 1), "val_loss": round(val_loss, 4),
                     "class_accuracy": round(sum(accs) / len(accs), 3),
                     "per_sample_seed": [round(a, 3) for a in accs],
                     "shape_accuracy": round(sum(shape_accs) / len(shape_accs), 3),
                     "images": len(labels) * len(args.sample_seeds)})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="+", default=["adamw", "muon:1"], help="adamw | muon[:LR_SCALE], in run order")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="part 1: timed steps per optimizer")
    ap.add_argument("--shards", type=Path, default=None, help="token shards: also run part 2 (demo GPT stage)")
    ap.add_argument("--tokenizer", type=Path, default=Path("runs/demo/tokenizer"))
    ap.add_argument("--classifier", type=Path, default=Path("runs/demo/classifier"))
    ap.add_argument("--budget", type=float, default=400.0, help="part 2: training seconds per arm")
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--sample-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--work", type=Path, default=Path("runs/bench/gpt_optimizer_work"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="gpt_optimizer")
    args = ap.parse_args()
    arms = [parse_arm(a) for a in args.arms]
    if args.shards is not None:
        for p in (args.shards / "train", args.tokenizer, args.classifier):
            if not p.exists():
                raise SystemExit(f"{p} does not exist: run `make demo` first (or pass --shards/--tokenizer/--classifier)")

    from workbench.runtime import cpu_has_bf16_matmul

    bf16 = cpu_has_bf16_matmul()
    rows = step_times(arms, args.vocab, args.seq, args.steps, bf16)
    if args.shards is not None:
        rows += demo_arms(args, arms)
    save_table(args.name, rows, meta={"threads": torch.get_num_threads(), "torch": torch.__version__,
                                      "arms": args.arms, "budget_s": args.budget})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
