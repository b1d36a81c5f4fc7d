"""Token shards: what ``vtw tokenize`` writes and the AR trainers read.

Layout of a shard directory::

    index.json                 format, tokenizer (class, config, vocab_size, seq_len, token_each, token_grid),
                               source (dataset description), num_augs, complete, and per shard:
                               file, start, num_samples, sha256, labels, captions
    shard_00000.safetensors    "tokens": (N, num_augs, seq_len) or (N, num_augs, seq_len, token_each) int16/int32
                               "labels": (N,) int64

``num_augs`` is 1 (plain), 2 (image + horizontal flip) or 10 (LlamaGen's ten-crop, which includes the
flips); the dataset picks one augmentation per item at random (LlamaGen ``train_c2i``) or the first
(``random_aug=False``, for validation). Every shard's SHA-256 is checked when it is read, so a corrupt or
truncated shard is reported by name instead of training on garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["INDEX_NAME", "FORMAT", "TokenShardDataset", "TokenShardDataModule", "read_index", "write_json_atomic",
           "sha256_file", "load_shard", "collate_tokens"]

INDEX_NAME = "index.json"
FORMAT = "vtw-token-shards/1"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_index(root: str | os.PathLike) -> dict:
    """Read and sanity-check ``<root>/index.json``."""
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no token-shard index at {path} (write one with `vtw tokenize`)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {index.get('format')!r}, expected {FORMAT!r}")
    for key in ("tokenizer", "shards", "num_augs"):
        if key not in index:
            raise ValueError(f"{path}: missing key {key!r}")
    return index


def load_shard(root: str | os.PathLike, entry: dict, verify: bool = True) -> dict[str, Tensor]:
    """Load one shard, checking its SHA-256 and shapes against the index entry."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(root) / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"token shard {path} listed in the index is missing")
    if verify and sha256_file(path) != entry["sha256"]:
        raise ValueError(f"token shard {path} is corrupt: SHA-256 differs from the index (re-run `vtw tokenize`, "
                         "which rewrites shards that fail the check)")
    try:
        data = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"token shard {path} cannot be read: {err}") from err
    for key in ("tokens", "labels"):
        if key not in data:
            raise ValueError(f"token shard {path} has no tensor {key!r}")
    n = entry["num_samples"]
    if data["tokens"].shape[0] != n or data["labels"].shape[0] != n:
        raise ValueError(f"token shard {path}: {data['tokens'].shape[0]} samples, index says {n}")
    return data


class _ShardIndexInfo:
    """Tokenizer metadata read from a shard directory's ``index.json`` (``self.index``)."""

    index: dict

    @property
    def vocab_size(self) -> int:
        return int(self.index["tokenizer"]["vocab_size"])

    @property
    def seq_len(self) -> int:
        return int(self.index["tokenizer"]["seq_len"])

    @property
    def token_each(self) -> int:
        return int(self.index["tokenizer"].get("token_each", 1))


class TokenShardDataset(_ShardIndexInfo, Dataset):
    """Items ``{"tokens": LongTensor (seq_len) or (seq_len, token_each), "label": int, "caption": str}``.

    Args:
        root: directory with ``index.json`` (one split).
        random_aug: pick one of the stored augmentations at random per item (training); else the first.
        verify: check every shard's SHA-256 on load.
        allow_incomplete: accept an index that ``vtw tokenize`` has not finished.
    """

    def __init__(self, root: str | os.PathLike, random_aug: bool = True, verify: bool = True,
                 allow_incomplete: bool = False) -> None:
        self.root = Path(root)
        self.index = read_index(self.root)
        if not self.index.get("complete", False) and not allow_incomplete:
            raise ValueError(f"{self.root / INDEX_NAME} is incomplete (tokenization was interrupted); "
                             "re-run `vtw tokenize` with the same arguments to resume")
        self.random_aug = random_aug
        tokens, labels, captions = [], [], []
        for entry in self.index["shards"]:
            data = load_shard(self.root, entry, verify=verify)
            tokens.append(data["tokens"])
            labels.append(data["labels"])
            captions += list(entry.get("captions") or [""] * entry["num_samples"])
        tok = self.index["tokenizer"]
        seq_len, token_each = int(tok["seq_len"]), int(tok.get("token_each", 1))
        if tokens:
            self.tokens = torch.cat(tokens)  # (N, A, seq_len[, t])
            self.labels = torch.cat(labels)  # (N,)
        else:
            shape = (0, self.index["num_augs"], seq_len) + ((token_each,) if token_each > 1 else ())
            self.tokens, self.labels = torch.zeros(shape, dtype=torch.int16), torch.zeros(0, dtype=torch.long)
        self.captions = captions
        want = (self.index["num_augs"], seq_len) + ((token_each,) if token_each > 1 else ())
        if tuple(self.tokens.shape[1:]) != want:
            raise ValueError(f"{self.root}: tokens have shape {tuple(self.tokens.shape[1:])} per item, index implies {want}")

    @property
    def token_grid(self) -> tuple[int, int]:
        return tuple(self.index["tokenizer"]["token_grid"])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int | None:
        return self.index.get("source", {}).get("num_classes")

    @property
    def tokenizer_dir(self) -> str | None:
        return self.index["tokenizer"].get("path")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        a = int(torch.randint(self.tokens.shape[1], ())) if self.random_aug and self.tokens.shape[1] > 1 else 0
        return {"tokens": self.tokens[i, a].long(), "label": int(self.labels[i]), "caption": self.captions[i]}


def collate_tokens(items: list[dict]) -> dict:
    return {"tokens": torch.stack([it["tokens"] for it in items]),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "caption": [it["caption"] for it in items]}


class TokenShardDataModule(_ShardIndexInfo, LightningDataModule):
    """Train/val token shards written by ``vtw tokenize`` (``<root>/train``, ``<root>/val`` by default)."""

    def __init__(self, root: str = "runs/tokens", batch_size: int = 64, num_workers: int = 0,
                 train_dir: str = "train", val_dir: str = "val", verify: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root, self.batch_size, self.num_workers = Path(root), batch_size, num_workers
        self.train_dir, self.val_dir, self.verify = train_dir, val_dir, verify
        self.datasets: dict[str, TokenShardDataset] = {}
        # cheap metadata for linking model arguments (vocab_size, seq_len) before setup()
        self.index = read_index(self.root / train_dir)

    @property
    def num_classes(self) -> int | None:
        return self.index.get("source", {}).get("num_classes")

    def setup(self, stage: str | None = None) -> None:
        if "train" not in self.datasets and stage in (None, "fit"):
            self.datasets["train"] = TokenShardDataset(self.root / self.train_dir, random_aug=True, verify=self.verify)
        if "val" not in self.datasets and stage in (None, "fit", "validate") and (self.root / self.val_dir).is_dir():
            self.datasets["val"] = TokenShardDataset(self.root / self.val_dir, random_aug=False, verify=self.verify)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["train"], batch_size=self.batch_size, shuffle=True,
                          num_workers=self.num_workers, collate_fn=collate_tokens, drop_last=True,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        if "val" not in self.datasets:
            return []  # type: ignore[return-value]
        return DataLoader(self.datasets["val"], batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_tokens)
