"""``vtw tokenize``: encode an image dataset with a trained tokenizer into token shards.

Examples::

    vtw tokenize --tokenizer runs/vqgan_tiny_shapes/tokenizer --data shapes --split train \\
        --num-samples 20000 --out runs/tokens/shapes/train --aug flip
    vtw tokenize --tokenizer runs/vqgan_imagenet/tokenizer --data folder --root /data/imagenet/train \\
        --out runs/tokens/imagenet/train --aug tencrop --crop-range 1.1 --device cuda

Output: ``index.json`` + ``shard_XXXXX.safetensors`` (see :mod:`tokenizers_img.shards`). Re-running with
the same arguments resumes: shards already listed in the index whose SHA-256 still matches are skipped;
missing or corrupt ones are rewritten. Different arguments on an existing directory are refused unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer directory (save_pretrained) or a TokenizerModule Lightning .ckpt")
    parser.add_argument("--data", choices=("shapes", "folder"), default="shapes", help="image source")
    parser.add_argument("--split", default="train", help="shapes split (train/val/test)")
    parser.add_argument("--num-samples", type=int, default=20000, help="shapes: number of images")
    parser.add_argument("--seed", type=int, default=0, help="shapes: dataset seed")
    parser.add_argument("--root", default=None, help="folder: class-per-subfolder image tree")
    parser.add_argument("--captions-file", default=None, help="folder: captions.csv / captions.jsonl instead of classes")
    parser.add_argument("--image-size", type=int, default=None, help="image side (default: the tokenizer's)")
    parser.add_argument("--out", required=True, help="output directory for index.json and shards")
    parser.add_argument("--aug", choices=("none", "flip", "tencrop"), default="none",
                        help="store 1, 2 (image + h-flip) or 10 (LlamaGen ten-crop incl. flips) codes per image")
    parser.add_argument("--crop-range", type=float, default=1.1, help="tencrop: resize to crop_range * size first")
    parser.add_argument("--shard-size", type=int, default=4096, help="images per shard")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing index with other arguments")


def _num_augs(aug: str) -> int:
    return {"none": 1, "flip": 2, "tencrop": 10}[aug]


def build_source(args: argparse.Namespace, image_size: int):
    """Dataset of dicts with "image" (3, S', S') in [-1, 1], "label", "caption"; S' = crop size for tencrop."""
    side = int(round(image_size * args.crop_range)) if args.aug == "tencrop" else image_size
    if args.data == "shapes":
        from datasets.shapes import ShapesDataset

        # the same scene renders at any resolution, so the ten-crop source is simply rendered larger
        ds = ShapesDataset(args.split, args.num_samples, side, args.seed, cache=False)
        return ds, {"kind": "shapes", "split": args.split, "num_samples": args.num_samples, "seed": args.seed,
                    "num_classes": ds.num_classes}
    if args.root is None and args.captions_file is None:
        raise ValueError("--data folder needs --root (class tree) or --captions-file")
    if args.captions_file is not None:
        from datasets.image_folder import CaptionFolderDataset

        ds = CaptionFolderDataset(args.captions_file, root=args.root, image_size=side)
    else:
        from datasets.image_folder import ImageFolderDataset

        ds = ImageFolderDataset(args.root, image_size=side, train=False)
    return ds, {"kind": "folder", "root": str(args.root), "captions_file": args.captions_file,
                "num_samples": len(ds), "num_classes": getattr(ds, "num_classes", None)}


def augment(images, aug: str, image_size: int):
    """images (B, 3, S', S') -> (B, A, 3, S, S)."""
    import torch
    import torchvision.transforms.v2.functional as TF

    if aug == "none":
        return images[:, None]
    if aug == "flip":
        return torch.stack([images, images.flip(-1)], dim=1)
    crops = TF.ten_crop(images, [image_size, image_size])  # 5 crops + their flips, each (B, 3, S, S)
    return torch.stack(list(crops), dim=1)


def run(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from tokenizers_img.lit import load_any_tokenizer
    from tokenizers_img.shards import FORMAT, INDEX_NAME, read_index, sha256_file, write_json_atomic

    if args.shard_size < 1 or args.batch_size < 1:
        raise SystemExit("vtw tokenize: --shard-size and --batch-size must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer, tok_meta = load_any_tokenizer(args.tokenizer)
    tokenizer = tokenizer.to(device).eval()
    image_size = args.image_size or tokenizer.image_size
    if image_size is None:
        raise SystemExit("vtw tokenize: this tokenizer has no fixed size; pass --image-size")
    if image_size % tokenizer.downsample:
        raise SystemExit(f"vtw tokenize: --image-size {image_size} is not a multiple of {tokenizer.downsample}")
    source, source_meta = build_source(args, image_size)
    n, A = len(source), _num_augs(args.aug)
    grid = (image_size // tokenizer.downsample,) * 2
    if grid != tuple(tokenizer.token_grid):
        raise SystemExit(f"vtw tokenize: image size {image_size} gives a {grid} grid but the tokenizer's token_grid "
                         f"is {tokenizer.token_grid}; tokenize at the tokenizer's training size")
    token_dtype = torch.int16 if tokenizer.vocab_size <= 32767 else torch.int32
    settings = {"aug": args.aug, "crop_range": args.crop_range if args.aug == "tencrop" else None,
                "image_size": image_size, "shard_size": args.shard_size}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "complete": False, "num_samples": n, "num_augs": A, "settings": settings,
             "source": source_meta, "tokenizer": tok_meta, "shards": []}
    done: dict[str, dict] = {}
    if (out / INDEX_NAME).is_file():
        old = read_index(out)
        same = all(old.get(k) == index[k] for k in ("num_samples", "num_augs", "settings", "source")) and \
            old["tokenizer"].get("sha256") == tok_meta.get("sha256")
        if not same and not args.overwrite:
            raise SystemExit(f"vtw tokenize: {out / INDEX_NAME} was written with other arguments or another "
                             "tokenizer; pass --overwrite to start again or choose another --out")
        if same:
            for entry in old["shards"]:
                path = out / entry["file"]
                if path.is_file() and sha256_file(path) == entry["sha256"]:
                    done[entry["file"]] = entry
    starts = list(range(0, n, args.shard_size))
    remaining = sum(min(args.shard_size, n - s) for s in starts if f"shard_{s // args.shard_size:05d}.safetensors" not in done)
    if done:
        print(f"resuming: {len(done)} of {len(starts)} shards already complete in {out}")
    bar = tqdm(total=remaining, desc=f"tokenize -> {out}", unit="img")
    entries = []
    for s in starts:
        name = f"shard_{s // args.shard_size:05d}.safetensors"
        if name in done:
            entries.append(done[name])
            continue
        ids = list(range(s, min(s + args.shard_size, n)))
        loader = DataLoader(Subset(source, ids), batch_size=args.batch_size, num_workers=args.num_workers)
        tokens, labels, captions = [], [], []
        with torch.no_grad():
            for batch in loader:
                x = augment(batch["image"], args.aug, image_size).to(device)  # (B, A, 3, S, S)
                B = x.shape[0]
                t = tokenizer.encode(x.flatten(0, 1))  # (B*A, L[, t])
                tokens.append(t.view(B, A, *t.shape[1:]).to(token_dtype).cpu())
                labels.append(torch.as_tensor(batch["label"]).long())
                captions += list(batch.get("caption", [""] * B))
                bar.update(B)
        data = {"tokens": torch.cat(tokens).contiguous(), "labels": torch.cat(labels).contiguous()}
        tmp = out / f".{name}.tmp"
        save_file(data, str(tmp), metadata={"format": FORMAT})
        os.replace(tmp, out / name)
        entries.append({"file": name, "start": s, "num_samples": len(ids), "sha256": sha256_file(out / name),
                        "labels": data["labels"].tolist(), "captions": captions})
        index["shards"] = sorted(entries, key=lambda e: e["start"])
        write_json_atomic(out / INDEX_NAME, index)  # progress is durable shard by shard
    bar.close()
    index["shards"] = sorted(entries, key=lambda e: e["start"])
    index["complete"] = True
    write_json_atomic(out / INDEX_NAME, index)
    print(f"wrote {n} images x {A} augmentation(s) as {len(starts)} shard(s) to {out} "
          f"(seq_len {tokenizer.seq_len}, vocab {tokenizer.vocab_size})")
    return 0
