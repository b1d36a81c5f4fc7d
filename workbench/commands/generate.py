"""``vtw generate``: sample images from a trained GPT + tokenizer; PNG grid, single PNGs, JSON of settings.

Examples::

    vtw generate --gpt runs/gpt_tiny_shapes/checkpoints/last.ckpt --tokenizer runs/demo/tokenizer \\
        --classes 0 3 5 --per-class 8 --cfg 2.0 --top-k 0 --seed 0 --out runs/generate
    vtw generate --gpt GPT_T2I.ckpt --tokenizer DIR --captions "a red circle" "a blue square" --per-class 4 --out DIR

Every input is checked before any sampling: unknown class ids, a GPT whose vocabulary / token count
does not match the tokenizer, a checkpoint that is not a workbench GPT -> a clear error and exit code 2.
Writes ``grid.png`` (one row per class / caption), ``images/NNNN_<cond>.png``, ``tokens.safetensors`` and
``generate.json`` (every setting, per-image condition, timings).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpt", required=True, type=Path,
                        help="GPT checkpoint: a `vtw fit` .ckpt of ar_gen.lit.GPTModule or a save_gpt directory")
    parser.add_argument("--tokenizer", required=True, type=Path, help="tokenizer directory (save_pretrained)")
    cond = parser.add_mutually_exclusive_group()
    cond.add_argument("--classes", type=int, nargs="+", default=None, help="class ids (class-conditional GPT)")
    cond.add_argument("--captions", nargs="+", default=None, help="caption prompts (caption-conditioned GPT)")
    parser.add_argument("--per-class", type=int, default=8, help="images per class id / caption")
    parser.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale s (1 = off)")
    parser.add_argument("--cfg-schedule", choices=["constant", "interval", "linear", "cos"], default="constant")
    parser.add_argument("--cfg-interval", type=float, default=-1.0,
                        help="LlamaGen's --cfg-interval (with --cfg-schedule interval): CFG off after this token")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off; per head for sub-token models")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 = off (applied after top-k)")
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="images per sampling batch (x2 rows with CFG)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    try:
        from ar_gen.spec_cli import add_speculative_arguments
    except ImportError:  # speculative decoding not installed in this checkout
        return
    add_speculative_arguments(parser)


def _fail(msg: str) -> int:
    print(f"vtw generate: error: {msg}")
    return 2


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    t_start = time.perf_counter()
    if args.per_class < 1:
        return _fail(f"--per-class must be >= 1, got {args.per_class}")
    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.tokenizer.is_dir():
        return _fail(f"--tokenizer {args.tokenizer} is not a directory")
    from ar_gen.generation import check_classes, check_compatible, decode_tokens, sample_tokens, save_png_grid
    from ar_gen.gpt import load_gpt
    from ar_gen.sampling import SamplingConfig
    from tokenizers_img.base import load_tokenizer
    from workbench.runtime import atomic_write_json

    try:
        sampling = SamplingConfig(cfg_scale=args.cfg, cfg_schedule=args.cfg_schedule, cfg_interval=args.cfg_interval,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy)
        model, meta = load_gpt(args.gpt, use_ema=not args.no_ema)
        tokenizer = load_tokenizer(args.tokenizer).eval()
        check_compatible(model, tokenizer)
        c = model.config
        if c.model_type == "c2i":
            if args.captions:
                raise ValueError("this GPT is class-conditional: pass --classes, not --captions")
            classes = args.classes if args.classes is not None else list(range(min(c.num_classes, 8)))
            check_classes(model, classes)
            conds = [int(k) for k in classes for _ in range(args.per_class)]
            names = [f"class{k}" for k in conds]
        else:
            if not args.captions:
                raise ValueError("this GPT is caption-conditioned: pass --captions \"...\" (not --classes)")
            conds = [cap for cap in args.captions for _ in range(args.per_class)]
            names = [f"caption{i // args.per_class}" for i in range(len(conds))]
        if sampling.uses_cfg and c.model_type == "c2i" and c.class_dropout_prob <= 0:
            raise ValueError("--cfg != 1 needs a GPT trained with label dropout (it has no null class)")
        speculative = None
        if getattr(args, "speculative", "none") != "none":
            from ar_gen.spec_cli import build_speculative

            speculative = build_speculative(args, model, tokenizer)
    except (ValueError, FileNotFoundError, KeyError) as err:
        return _fail(str(err))

    device = torch.device(args.device)
    model.to(device)
    tokenizer.to(device)
    if c.model_type == "c2i":
        cond = torch.tensor(conds, dtype=torch.long)
    else:
        from ar_gen.caption import CaptionEncoder

        tower = meta.get("text_tower")
        if not tower:
            return _fail(f"{args.gpt}: caption-conditioned GPT without a text_tower entry in its metadata")
        cond = CaptionEncoder.from_name(tower, meta.get("text_tower_weights")).to(device)(conds).cpu()
    t_load = time.perf_counter() - t_start
    tokens, stats = sample_tokens(model, cond, sampling, batch_size=args.batch_size, seed=args.seed,
                                  speculative=speculative)
    images, decode_s = decode_tokens(tokenizer, tokens)

    out: Path = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = []
    for i, (img, name) in enumerate(zip(images, names)):
        f = out / "images" / f"{i:04d}_{name}.png"
        save_png_grid(img[None], f, nrow=1)
        files.append(str(f.relative_to(out)))
    save_png_grid(images, out / "grid.png", nrow=args.per_class)
    from safetensors.torch import save_file

    save_file({"tokens": tokens.contiguous()}, str(out / "tokens.safetensors"))
    record = {
        "gpt": str(args.gpt), "tokenizer": str(args.tokenizer), "weights": meta.get("weights", "model"),
        "gpt_config": meta.get("config"), "seed": args.seed, "batch_size": args.batch_size,
        "per_class": args.per_class, "device": str(device), "sampling": vars(sampling),
        "speculative": getattr(args, "speculative", "none"),
        "images": [{"file": f, "class": k if c.model_type == "c2i" else None,
                    "caption": k if c.model_type != "c2i" else None} for f, k in zip(files, conds)],
        "timing": {"load_seconds": t_load, "decode_seconds": decode_s, **stats},
    }
    atomic_write_json(out / "generate.json", record)
    print(f"wrote {len(files)} images, {out / 'grid.png'} and {out / 'generate.json'}: "
          f"{stats['image_tokens_per_s']:.0f} image tokens/s sampling, {decode_s:.2f} s decoding")
    return 0
