"""``vtw eval-gen``: score generated images with the shapes classifier (class consistency + Frechet distance).

Example::

    vtw eval-gen --generated runs/generate --classifier runs/demo/classifier --out runs/generate/eval.json

Reads ``generate.json`` and the PNGs that ``vtw generate`` wrote. Metrics:

* ``class_accuracy``: fraction of images the classifier assigns to the class they were generated for;
* ``frechet_distance``: Frechet distance between the classifier's pre-logit features of the generated images
  and of held-out real shapes images (``--real-split test``, ``--num-real`` images, their own seed);
* ``frechet_real_floor``: the same distance between two disjoint real sets of the generated set's size
  (what a perfect generator would score at this sample size);
* ``inception_fid`` / ``inception_is`` when torch-fidelity and the Inception weights are present locally
  (``--inception-weights``), otherwise a line saying why they were not computed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generated", required=True, type=Path, help="output folder of `vtw generate`")
    parser.add_argument("--classifier", required=True, type=Path, help="classifier directory or .ckpt")
    parser.add_argument("--real-split", default="test", choices=["train", "val", "test"],
                        help="shapes split of the real reference images (default test: never trained on)")
    parser.add_argument("--num-real", type=int, default=2000, help="real reference images")
    parser.add_argument("--real-seed", type=int, default=0, help="shapes dataset seed of the reference images")
    parser.add_argument("--inception-weights", type=Path, default=None,
                        help="local FID Inception weights (default: torch hub checkpoints folder)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default <generated>/eval_gen.json)")


def real_shapes_images(split: str, num: int, image_size: int, seed: int, offset: int = 0):
    """(num, 3, S, S) real shapes images in [-1, 1] and labels (items offset..offset+num of the split)."""
    import torch

    from datasets.shapes import ShapesDataset

    ds = ShapesDataset(split=split, num_samples=offset + num, image_size=image_size, seed=seed)
    items = [ds[i] for i in range(offset, offset + num)]
    return torch.stack([it["image"] for it in items]), torch.tensor([int(it["label"]) for it in items])


def evaluate_images(images, labels, classifier_dir, real_split: str = "test", num_real: int = 2000,
                    real_seed: int = 0, inception_weights=None) -> dict[str, Any]:
    """Class consistency + Frechet distances of ``images`` (N, 3, H, W) in [-1, 1] generated for ``labels``."""
    import torch

    from ar_gen.metrics import class_consistency, classifier_outputs, frechet_distance, inception_metrics
    from vision.classifier import load_classifier

    net, info = load_classifier(classifier_dir)
    size = int(info["image_size"])
    if images.shape[-1] != size or images.shape[-2] != size:
        images = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                                 antialias=True, align_corners=False)
    logits, feats = classifier_outputs(net, images)
    if int(labels.max()) >= logits.shape[-1]:
        raise ValueError(f"generated class id {int(labels.max())} >= the classifier's {logits.shape[-1]} classes")
    acc, per_class = class_consistency(logits, labels)
    n = images.shape[0]
    real, _ = real_shapes_images(real_split, max(num_real, 2 * n), size, real_seed)
    _, real_feats = classifier_outputs(net, real)
    result: dict[str, Any] = {
        "num_images": n,
        "class_accuracy": acc,
        "per_class_accuracy": {int(k): float(v) for k, v in enumerate(per_class) if v == v},
        "frechet_distance": frechet_distance(feats, real_feats[:num_real]),
        "frechet_real_floor": frechet_distance(real_feats[:n], real_feats[n:2 * n]),
        "reference": f"{num_real} shapes/{real_split} images (seed {real_seed}), classifier pre-logit features",
        "class_names": info.get("class_names"),
    }
    result.update(inception_metrics(images, real[:num_real], inception_weights))
    return result


def load_generated(folder: Path):
    """Images and requested labels from a `vtw generate` folder."""
    import json

    import torch
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    meta_file = folder / "generate.json"
    if not meta_file.is_file():
        raise ValueError(f"{folder} has no generate.json (run `vtw generate --out {folder}` first)")
    meta = json.loads(meta_file.read_text())
    entries = meta.get("images") or []
    if not entries:
        raise ValueError(f"{meta_file} lists no images")
    if any(e.get("class") is None for e in entries):
        raise ValueError(f"{meta_file}: images were generated from captions; class consistency needs class ids")
    imgs = []
    for e in entries:
        path = folder / e["file"]
        if not path.is_file():
            raise ValueError(f"missing generated image {path}")
        imgs.append(pil_to_tensor(Image.open(path).convert("RGB")).float() / 127.5 - 1.0)
    return torch.stack(imgs), torch.tensor([int(e["class"]) for e in entries]), meta


def run(args: argparse.Namespace) -> int:
    import json

    from workbench.runtime import atomic_write_json

    try:
        if args.num_real < 2:
            raise ValueError(f"--num-real must be >= 2, got {args.num_real}")
        if not (args.classifier.is_dir() or args.classifier.is_file()):
            raise ValueError(f"--classifier {args.classifier} does not exist")
        images, labels, meta = load_generated(args.generated)
        result = evaluate_images(images, labels, args.classifier, args.real_split, args.num_real, args.real_seed,
                                 args.inception_weights)
    except (ValueError, FileNotFoundError) as err:
        print(f"vtw eval-gen: error: {err}")
        return 2
    result["generated"] = str(args.generated)
    result["sampling"] = meta.get("sampling")
    out = args.out or (args.generated / "eval_gen.json")
    atomic_write_json(out, result)
    show = {k: result[k] for k in ("num_images", "class_accuracy", "frechet_distance", "frechet_real_floor")}
    show.update({k: v for k, v in result.items() if k.startswith("inception")})
    print(json.dumps(show, indent=2))
    print(f"wrote {out}")
    return 0
