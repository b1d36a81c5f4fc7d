"""Attention in bf16 CPU training: SDPA's flash kernel vs two eager matmuls around an fp32 softmax.

Part 1, the attention call alone (forward + backward, bf16 inputs): ``F.scaled_dot_product_attention``
(flash kernel), the same with fp32 up-casts, and :func:`vision.layers.attention_eager_lowp`, at the shapes
the workbench trains on CPU (demo GPT, shapes recipe GPT, the classifier ViT, a GPT-B-like 256-token row).
Part 2, whole training steps under ``torch.autocast("cpu", bfloat16)`` (forward, backward, AdamW): the
demo GPT and the shapes classifier with attention forced through SDPA vs the eager path that
:func:`vision.layers.attention` (GPT) and ``ImageClassifier.on_train_start`` (timm's ``fused_attn``) now
pick for bf16 CPU training. Medians of ``--repeats`` after two warm-up calls, both arms in one run.

Run: ``.venv/bin/python benchmarks/bench_cpu_attention.py [--threads 2] [--repeats 10]``
Writes ``runs/bench/cpu_attention/results.{md,json}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.benchutil import save_table  # noqa: E402

# (label, (B, H, T, D)) attention shapes of the CPU recipes
SHAPES = [
    ("demo GPT (4x192, batch 64)", (64, 6, 65, 32)),
    ("shapes recipe GPT (6x256, batch 64)", (64, 8, 65, 32)),
    ("classifier ViT (batch 64)", (64, 3, 65, 64)),
    ("GPT-B-like row (batch 8, 256 tokens)", (8, 12, 257, 64)),
]


def median_ms(fn, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        fn()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def attention_rows(repeats: int) -> list[dict]:
    from vision.layers import attention_eager_lowp

    arms = {
        "sdpa_flash_bf16_ms": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa_fp32_upcast_ms": lambda q, k, v: F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), is_causal=True).to(q.dtype),
        "eager_bf16_ms": lambda q, k, v: attention_eager_lowp(q, k, v, is_causal=True),
    }
    rows = []
    for label, shape in SHAPES:
        torch.manual_seed(0)
        q, k, v = (torch.randn(shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        row: dict = {"case": f"attention fwd+bwd: {label}", "shape": str(shape)}
        for name, fn in arms.items():
            def call(fn=fn, qkv=(q, k, v)):
                for t in qkv:
                    t.grad = None
                fn(*qkv).float().sum().backward()
            row[name] = round(median_ms(call, repeats), 2)
        row["speedup_eager_vs_sdpa"] = round(row["sdpa_flash_bf16_ms"] / row["eager_bf16_ms"], 2)
        rows.append(row)
    return rows


def gpt_step_row(repeats: int) -> dict:
    import vision.layers as layers
    from ar_gen.gpt import GPT, gpt_config
    from workbench.demo_stages.gpt import MODEL

    torch.manual_seed(0)
    model = GPT(gpt_config("GPT-tiny", vocab_size=512, block_size=64, num_classes=30, **MODEL)).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    tokens, labels = torch.randint(0, 512, (64, 64)), torch.randint(0, 30, (64,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.training_loss(tokens, labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    eager = median_ms(step, repeats)
    original = layers._cpu_lowp_training
    layers._cpu_lowp_training = lambda q, k, v: False  # force SDPA for the comparison arm
    try:
        sdpa = median_ms(step, repeats)
    finally:
        layers._cpu_lowp_training = original
    return {"case": "train step: demo GPT (4x192, batch 64, bf16 autocast)", "shape": "64 x 65 tokens",
            "sdpa_step_ms": round(sdpa, 1), "eager_step_ms": round(eager, 1),
            "speedup_eager_vs_sdpa": round(sdpa / eager, 2)}


def classifier_step_row(repeats: int) -> dict:
    from vision.classifier import build_vit, classifier_config

    torch.manual_seed(0)
    net = build_vit(classifier_config("tiny", num_classes=30, image_size=32)).train()
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    images, labels = torch.randn(64, 3, 32, 32), torch.randint(0, 30, (64,))
    timm_attn = [m for m in net.modules() if hasattr(m, "fused_attn")]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(images).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {}
    for fused in (True, False):
        for m in timm_attn:
            m.fused_attn = fused
        times[fused] = median_ms(step, repeats)
    return {"case": "train step: shapes classifier ViT (batch 64, bf16 autocast)", "shape": "64 x 3 x 32 x 32",
            "sdpa_step_ms": round(times[True], 1), "eager_step_ms": round(times[False], 1),
            "speedup_eager_vs_sdpa": round(times[True] / times[False], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--name", default="cpu_attention")
    args = ap.parse_args()
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    torch.set_num_threads(args.threads)
    rows = attention_rows(args.repeats) + [gpt_step_row(args.repeats), classifier_step_row(args.repeats)]
    save_table(args.name, rows, meta={"repeats": args.repeats, "threads": args.threads},
               notes="Medians in ms; speed-up = SDPA time / eager time, both arms in this run.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
