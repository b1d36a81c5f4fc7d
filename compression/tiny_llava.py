"""A tiny LLaVA that actually answers: a CLIP-style vision tower + 2-layer MLP projector + a small
Llama language model, built as Hugging Face ``LlavaForConditionalGeneration`` from tiny configs and
trained on a shapes visual-question task, so that token dropping (MustDrop, FastV, PiToMe) is
measured on a model whose attention means something.

Liu, Li, Wu, Lee, "Visual Instruction Tuning" (LLaVA), NeurIPS 2023 (arXiv:2304.08485) and
"Improved Baselines with Visual Instruction Tuning" (LLaVA-1.5, arXiv:2310.03744): image features
from the penultimate vision layer without CLS (``vision_feature_layer=-2``, strategy "default"),
projected by Linear-GELU-Linear and spliced into the text at the image placeholder tokens.

Task (generated from ``datasets.shapes`` attributes; one-word answers)::

    <bos> USER: <image>*N what colour is the shape ? ASSISTANT: red <eos>
    ... what shape is it ?            -> circle | square | triangle | star | diamond
    ... how many shapes are there ?   -> one | two | three
    ... where is the shape ?          -> top-left | top | top-right | left | center | ... | bottom-right

The layout [prefix | vision | question + "ASSISTANT:"] is LLaVA-1.5's (system/prefix tokens, image,
then the user text); the answer is the greedy next token after "ASSISTANT:". A real LLaVA-1.5
directory loads with :func:`load_llava` (same runner, its own processor/tokenizer).

The tower is CLIP's encoder with a 3x3 convolutional stem (``compression.conv_clip``) and is trained
first, alone, on the shape attributes (the stand-in for LLaVA's pretrained CLIP), then frozen while the
projector and the LM learn the answers (see :class:`TinyLlavaModule`).

Recipe: ``vtw fit --config configs/llava_tiny_shapes.yaml`` (LightningCLI) or, without
jsonargparse, ``python -m compression.tiny_llava --config configs/llava_tiny_shapes.yaml``; both
write a ``save_pretrained`` directory (``runs/llava_tiny/model``) with ``vocab.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

SPECIALS = ["<pad>", "<bos>", "<eos>", "<image>", "USER:", "ASSISTANT:"]
QUESTIONS = {
    "colour": "what colour is the shape ?",
    "shape": "what shape is it ?",
    "count": "how many shapes are there ?",
    "position": "where is the shape ?",
}
COUNT_WORDS = ["one", "two", "three"]
POSITION_WORDS = ["top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right"]


def build_vocab() -> list[str]:
    from datasets.shapes import COLOURS, SHAPES

    words = list(SPECIALS)
    for q in QUESTIONS.values():
        words += [w for w in q.split() if w not in words]
    for w in list(COLOURS) + list(SHAPES) + COUNT_WORDS + POSITION_WORDS:
        if w not in words:
            words.append(w)
    return words


class WordTokenizer:
    """Whitespace word-level tokenizer over a fixed vocabulary (saved as ``vocab.json``)."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = self.index["<pad>"], self.index["<bos>"], self.index["<eos>"]
        self.image_id = self.index["<image>"]

    def encode(self, text: str) -> list[int]:
        unknown = [w for w in text.split() if w not in self.index]
        if unknown:
            raise ValueError(f"words not in the tiny-LLaVA vocabulary: {unknown}")
        return [self.index[w] for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)

    def save(self, directory: str | os.PathLike) -> None:
        _atomic_write(Path(directory) / "vocab.json", json.dumps(self.vocab))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> WordTokenizer:
        path = Path(directory) / "vocab.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no vocab.json (not a tiny-LLaVA directory)")
        return cls(json.loads(path.read_text()))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# config and model


@dataclass
class TinyLlavaConfig:
    image_size: int = 36
    patch_size: int = 4  # 36/4 = 9x9 = 81 patches: MustDrop's 3x3 windows tile the grid exactly
    vision_hidden: int = 128
    vision_layers: int = 2  # feature layer -2 = the output of the first layer (LLaVA-1.5's choice, scaled)
    vision_heads: int = 4
    # "conv": compression.conv_clip's 3x3 conv stem (same token grid); "patch": CLIP's linear p x p embedding
    stem: str = "conv"
    stem_width: int = 128
    text_hidden: int = 96
    text_layers: int = 16  # >= 15 so MustDrop's default pruning layers [2, 6, 10, 14] exist
    text_heads: int = 4
    text_intermediate: int = 256
    max_position: int = 256
    # the task the model was trained on (read back by the evaluation): object radius factor of the shapes
    object_scale: float = 1.0


TINY_LLAVA_PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(vision_hidden=32, vision_layers=2, stem_width=32, text_hidden=32, text_layers=4, text_heads=2,
                 text_intermediate=64, image_size=24),  # tests only
    "tiny": {},  # ~2.5M params: the CPU recipe
    # sparse scenes on a 12x12 token grid (objects at 0.6x size on 48 px: ~10% of the patches touch an
    # object, vs ~23% for "tiny"), closer to the redundancy of LLaVA's 576 CLIP tokens
    "sparse": dict(image_size=48, object_scale=0.6),
    # LLaVA-1.5-7B's LM depth (32 layers), so that MustDrop's stage-2 layers (2, 6, 10, 14) and FastV's K = 2
    # sit where they sit in Vicuna-7B: the layers before the first drop are 3/32 of the LM, not 3/16 (with
    # 16 layers no drop after layer 2 can cut 85% of the vision tokens' LM FLOPs). The lighter conv stem
    # (64 channels) keeps the tower a small share of the prefill, as CLIP-L is of LLaVA-1.5-7B's (~4%).
    "deep": dict(text_layers=32, stem_width=64),
}


def tiny_llava_config(preset: str = "tiny", **overrides: Any) -> TinyLlavaConfig:
    if preset not in TINY_LLAVA_PRESETS:
        raise ValueError(f"unknown tiny-LLaVA preset {preset!r}; choose one of {sorted(TINY_LLAVA_PRESETS)}")
    return TinyLlavaConfig(**{**TINY_LLAVA_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})


def build_tiny_llava(cfg: TinyLlavaConfig, vocab_size: int, image_token_id: int, pad_id: int = 0,
                     bos_id: int = 1, eos_id: int = 2) -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    if cfg.stem not in ("conv", "patch"):
        raise ValueError(f"unknown stem {cfg.stem!r}; choose 'conv' or 'patch'")
    grid = cfg.image_size // cfg.patch_size
    vision_kw = dict(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                     num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                     image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3)
    if cfg.stem == "conv":
        from compression.conv_clip import ConvStemCLIPVisionConfig

        vision = ConvStemCLIPVisionConfig(stem_width=cfg.stem_width, **vision_kw)
    else:
        vision = CLIPVisionConfig(**vision_kw)
    text = LlamaConfig(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                       num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                       num_key_value_heads=cfg.text_heads, vocab_size=vocab_size,
                       max_position_embeddings=cfg.max_position, pad_token_id=pad_id, bos_token_id=bos_id,
                       eos_token_id=eos_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=grid * grid, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(config)


# ----------------------------------------------------------------------------------------------
# data


def question_answer(item: dict[str, Any], kind: str) -> tuple[str, str]:
    from datasets.shapes import COLOURS, SHAPES

    if kind == "colour":
        return QUESTIONS[kind], COLOURS[item["colour"]]
    if kind == "shape":
        return QUESTIONS[kind], SHAPES[item["shape"]]
    if kind == "count":
        return QUESTIONS[kind], COUNT_WORDS[item["count"] - 1]
    if kind == "position":
        return QUESTIONS[kind], POSITION_WORDS[item["position"]]
    raise ValueError(f"unknown question kind {kind!r}; choose one of {sorted(QUESTIONS)}")


def prompt_ids(tok: WordTokenizer, question: str, num_image_tokens: int) -> tuple[list[int], int]:
    """[<bos>, USER:] + <image>*N + question + [ASSISTANT:]; returns (ids, prefix length)."""
    prefix = [tok.bos_id, tok.index["USER:"]]
    return prefix + [tok.image_id] * num_image_tokens + tok.encode(question) + [tok.index["ASSISTANT:"]], len(prefix)


class ShapesVQA(Dataset):
    """Shapes images with one question each (kind cycles with the index). Items: ``pixel_values``
    (3, H, W) in [-1, 1], ``input_ids`` (L,), ``labels`` (L,) (-100 except answer and <eos>),
    ``answer`` (answer token id), ``kind`` (int index into QUESTIONS), ``attrs`` (4,) (shape, colour,
    count - 1, position) and ``object_patches`` (N,) bool (:meth:`object_patches`)."""

    def __init__(self, split: str, num_samples: int, image_size: int, num_image_tokens: int, seed: int = 0,
                 max_count: int = 3, vocab: list[str] | None = None, object_scale: float = 1.0) -> None:
        from datasets.shapes import ShapesDataset

        self.shapes = ShapesDataset(split, num_samples=num_samples, image_size=image_size, seed=seed,
                                    max_count=max_count, object_scale=object_scale)
        self.tok = WordTokenizer(vocab or build_vocab())
        self.num_image_tokens = num_image_tokens
        self.grid = math.isqrt(num_image_tokens)
        if self.grid ** 2 != num_image_tokens or image_size % self.grid:
            raise ValueError(f"num_image_tokens={num_image_tokens} is not a square grid of patches that divides "
                             f"image_size={image_size}")
        self.image_size = image_size
        self.kinds = list(QUESTIONS)

    def object_patches(self, index: int) -> Tensor:
        """(grid^2,) bool: which patches show part of an object (coverage >= 0.1 anywhere in the patch)."""
        from datasets.shapes import object_coverage

        patch = self.image_size // self.grid
        cover = torch.from_numpy(object_coverage(self.shapes.scene(index), self.image_size))  # (H, W)
        return cover.view(self.grid, patch, self.grid, patch).amax((1, 3)).flatten() >= 0.1  # (grid^2,)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.shapes[index]
        kind = self.kinds[index % len(self.kinds)]
        question, answer = question_answer(item, kind)
        ids, _ = prompt_ids(self.tok, question, self.num_image_tokens)
        answer_id = self.tok.index[answer]
        input_ids = ids + [answer_id, self.tok.eos_id]
        labels = [-100] * len(ids) + [answer_id, self.tok.eos_id]
        attrs = torch.tensor([item["shape"], item["colour"], item["count"] - 1, item["position"]])
        return {"pixel_values": item["image"], "input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
                "answer": answer_id, "kind": self.kinds.index(kind), "prompt_len": len(ids), "attrs": attrs,
                "object_patches": self.object_patches(index)}


def collate(items: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Tensor]:
    L = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    labels = torch.full((len(items), L), -100, dtype=torch.long)
    mask = torch.zeros(len(items), L, dtype=torch.long)
    for i, it in enumerate(items):  # right padding for training (all prompts end at the same place anyway)
        n = len(it["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = it["input_ids"], it["labels"], 1
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]), "input_ids": ids, "labels": labels,
            "attention_mask": mask, "answer": torch.tensor([it["answer"] for it in items]),
            "kind": torch.tensor([it["kind"] for it in items]), "attrs": torch.stack([it["attrs"] for it in items]),
            "object_patches": torch.stack([it["object_patches"] for it in items])}


class ShapesVQADataModule(pl.LightningDataModule):
    def __init__(self, image_size: int = 36, patch_size: int = 4, batch_size: int = 64, train_samples: int = 40000,
                 val_samples: int = 1000, test_samples: int = 1000, max_count: int = 3, seed: int = 0,
                 num_workers: int = 0, object_scale: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_image_tokens = (image_size // patch_size) ** 2

    def _ds(self, split: str, n: int) -> ShapesVQA:
        h = self.hparams
        ds = ShapesVQA(split, n, h.image_size, self.num_image_tokens, h.seed, h.max_count, object_scale=h.object_scale)
        ds.shapes.build_cache()
        return ds

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if stage in (None, "fit"):
            self.train_set = self._ds("train", h.train_samples)
        if stage in (None, "fit", "validate"):
            self.val_set = self._ds("val", h.val_samples)
        if stage in (None, "test"):
            self.test_set = self._ds("test", h.test_samples)

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0,
                          drop_last=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)


# ----------------------------------------------------------------------------------------------
# training wrapper


def _attribute_groups() -> dict[str, int]:
    """Class counts of ShapesVQA's ``attrs`` columns, in order (shape, colour, count, position)."""
    from datasets.shapes import COLOURS, SHAPES

    return {"shape": len(SHAPES), "colour": len(COLOURS), "count": len(COUNT_WORDS), "position": len(POSITION_WORDS)}


ATTRIBUTE_GROUPS = _attribute_groups()


@contextlib.contextmanager
def keys_dropped(model: nn.Module, drop: Tensor | None, first: int):
    """Within the block, LM layers ``first, first + 1, ...`` of an eager-attention HF LLaVA / Llama do not
    attend to the tokens marked in ``drop`` (B, L) (their additive mask gets -inf in those key columns):
    the same attention as removing the tokens after layer ``first - 1`` with their positions kept, which is
    what ``compression.llava_runner`` does for FastV / MustDrop. ``drop=None`` or all False: no change."""
    hooks = []
    if drop is not None and bool(drop.any()):
        def mask_dropped(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            am = kwargs.get("attention_mask")
            if not isinstance(am, Tensor) or am.dim() != 4 or not am.is_floating_point():
                raise RuntimeError("keys_dropped needs the eager attention path's additive (B, 1, L, L) mask; "
                                   "call model.set_attn_implementation('eager')")
            kwargs["attention_mask"] = am.masked_fill(drop[:, None, None, :], torch.finfo(am.dtype).min)
            return args, kwargs

        from compression.llava_runner import parts

        layers = parts(model)["lm"].layers
        hooks = [layer.register_forward_pre_hook(mask_dropped, with_kwargs=True) for layer in layers[first:]]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class _StopForward(Exception):
    pass


def text_attention_received(model: nn.Module, inputs: dict[str, Tensor], attention_mask: Tensor, text_rows: Tensor,
                            layer: int, hidden: Tensor | None = None) -> Tensor:
    """How much attention each token receives from the text rows at LM ``layer`` of an eager-attention HF
    LLaVA: ``sum_t mean_h A[h, t, j]`` over the rows ``text_rows`` (B, L) bool, as a (B, L) float tensor.
    This is the score FastV ranks vision tokens by and the sum MustDrop's stage-2 rule thresholds
    (``compression.mustdrop.dual_attention_keep``). ``inputs`` are the model's keyword inputs
    (``input_ids`` + ``pixel_values``, or ``inputs_embeds`` + ``position_ids``); ``hidden`` (B, L) bool marks
    keys hidden from every layer (stage-1 merge members, :func:`keys_dropped`). Runs without gradients
    and stops after ``layer``."""
    from compression.llava_runner import parts

    captured: dict[str, Tensor] = {}

    def grab(module: nn.Module, args: tuple, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if not isinstance(weights, Tensor):
            raise RuntimeError("text_attention_received needs attention probabilities from the LM's attention "
                               "modules: call model.set_attn_implementation('eager')")
        captured["probs"] = weights
        raise _StopForward

    attn = parts(model)["lm"].layers[layer].self_attn
    handle = attn.register_forward_hook(grab)
    try:
        with torch.no_grad(), keys_dropped(model, hidden, 0):
            model(**inputs, attention_mask=attention_mask)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "probs" not in captured:
        raise RuntimeError(f"LM layer {layer} did not run")
    probs = captured["probs"].float().mean(1)  # (B, L, L) head-averaged, rows = queries
    return (probs * text_rows[:, :, None]).sum(1)  # (B, L) attention received from the text rows


def lowest_ranked(scores: Tensor, candidates: Tensor, frac: Tensor) -> Tensor:
    """Per row, the ``round(frac * n)`` candidates with the lowest scores (ties: lower index first),
    n = the row's number of candidates. scores (B, L), candidates (B, L) bool, frac (B,). Returns (B, L) bool."""
    ranked = scores.float().masked_fill(~candidates, float("inf")).argsort(dim=1, stable=True)  # (B, L) lowest first
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(scores.shape[1]).expand_as(ranked).contiguous())
    k = (frac * candidates.sum(1)).round().long()
    return (rank < k[:, None]) & candidates


def stage1_merged_inputs(model: nn.Module, input_ids: Tensor, pixel_values: Tensor, rows: Tensor,
                         threshold: float = 0.8, window: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """The LM input of an HF LLaVA whose vision tokens went through MustDrop's stage-1 window merge
    (``compression.mustdrop.window_merge`` after vision layer 0) in the rows marked by ``rows`` (B,) bool.

    Returns (inputs_embeds (B, L, C), members (B, L) bool, position_ids (B, L)): the prompt embeddings
    with the projected vision features spliced in at the ``<image>`` positions, merged windows holding
    their mean at the bottom-right token, the other members of merged windows marked, and positions that
    skip the members (stage 1 shortens the LM's input sequence). Run the LM with these positions and
    ``keys_dropped(model, members, 0)`` and the result is what ``compression.llava_runner`` computes for
    the same images with stage 1 on: the training-time twin of the evaluation path. The tower runs
    without gradients (it is frozen in phase 2); the projector gets them."""
    from compression.llava_runner import _layer_out, clip_layer_masked, parts
    from compression.mustdrop import window_merge

    p = parts(model)
    vis = p["vision"]
    layers = list(vis.encoder.layers)
    fl = p["feature_layer"]
    if not isinstance(fl, int) or p["strategy"] != "default":
        raise ValueError("stage1_merged_inputs needs one vision_feature_layer and the 'default' strategy (no CLS)")
    n_run = len(layers) + fl + 1 if fl < 0 else fl  # hidden_states[i] is the output of layer i - 1
    with torch.no_grad():
        h = vis.pre_layrnorm(vis.embeddings(pixel_values.to(vis.embeddings.patch_embedding.weight.dtype)))
        B, N, _ = h.shape
        grid = math.isqrt(N - 1)
        if grid * grid != N - 1:
            raise ValueError(f"{N - 1} patches do not form a square grid")
        valid = torch.ones(B, N, dtype=torch.bool, device=h.device)
        bias = None
        for i in range(n_run):
            h = _layer_out(layers[i](h, None)) if bias is None else clip_layer_masked(layers[i], h, bias)
            if i == 0:
                merged, merged_valid, _ = window_merge(h, grid, window, threshold)
                h = torch.where(rows[:, None, None], merged, h)
                valid = merged_valid | ~rows[:, None]
                bias = torch.zeros(valid.shape, dtype=h.dtype, device=h.device).masked_fill(~valid, float("-inf"))
                bias = bias[:, None, None]  # (B, 1, 1, N) additive key bias
    feats = p["projector"](h[:, 1:])  # (B, N - 1, C_text), CLS dropped ("default" strategy)
    is_image = input_ids == p["image_token_id"]
    if int(is_image.sum()) != feats.shape[0] * feats.shape[1]:
        raise ValueError(f"the prompts hold {int(is_image.sum())} <image> tokens, the images give "
                         f"{feats.shape[0]} x {feats.shape[1]} features")
    embeds = p["lm"].embed_tokens(input_ids)
    embeds = embeds.masked_scatter(is_image[..., None], feats.to(embeds.dtype))  # row-major: row b's features in order
    members = torch.zeros_like(is_image)
    members[is_image] = ~valid[:, 1:].reshape(-1)
    position_ids = ((~members).long().cumsum(1) - 1).clamp(min=0)  # (B, L): the members take no position
    return embeds, members, position_ids


class TinyLlavaModule(pl.LightningModule):
    """Thin Lightning wrapper, two phases in one run (LLaVA trains on a *pretrained, frozen* CLIP):

    1. ``tower_steps`` steps of tower pretraining, the stand-in for CLIP pretraining: attribute
       classification (shape, colour, count, position) from the mean of the feature-layer patch
       tokens (the tokens the LM will see), through a linear head that is not saved;
    2. the tower is frozen (``requires_grad`` off, eval mode so the stem's BatchNorm statistics
       stay put) and projector + LM learn next-token cross-entropy on the answer (+ <eos>).

    ``tower_pooled_loss`` adds a second attribute head on the last layer's CLS token (CLIP's image
    embedding), so that layer's CLS attention, which picks MustDrop's key set, is trained too.
    ``tower_attributes`` limits phase 1 to some of the attributes. Without ``position`` (a tower told to
    put the object's position into the mean of all its tokens may spread it over the background tokens
    that token dropping removes) it stays in the object tokens (seed 1: keeping only them costs 0.6
    points instead of 11.4), but the LM then learns position worse (70% undropped; README).
    ``tower_object_attributes`` (e.g. ``["position"]``) are learnt from the mean of the patches that show
    the object (the batch's ``object_patches``) instead of all patches, so they are put into the object
    tokens and need not sit in the background tokens that token dropping removes.
    Phase 2 can be made drop-aware: ``token_dropout`` (a random share of the vision tokens hidden as
    keys from an LM layer in ``token_dropout_layers`` on) and ``merge_aware`` (that share of the rows
    goes through MustDrop's stage-1 window merge at ``merge_aware_tau``, :func:`stage1_merged_inputs`).
    ``token_dropout_guided`` is the share of the dropping rows that drop the vision tokens the text
    attends to least at the layer before the drop (:func:`text_attention_received`, the ranking FastV and
    MustDrop's stage 2 use at evaluation) instead of a random subset, so the later layers learn to answer
    from the tokens the model's own attention would keep.

    The learning rate warms up and decays (cosine) within each phase. Logs ``train/tower_loss``,
    ``train/tower_acc_<attribute>`` in phase 1, ``{stage}/loss`` and ``{stage}/acc`` (greedy
    answer-token accuracy) in phase 2. ``tower_steps=0`` trains everything jointly from the start."""

    def __init__(self, preset: str = "tiny", image_size: int | None = None, patch_size: int | None = None,
                 lr: float = 3e-3, weight_decay: float = 0.05, warmup_steps: int = 100, save_dir: str | None = None,
                 tower_steps: int = 600, stem: str | None = None, object_scale: float | None = None,
                 train_attention: str = "eager", token_dropout: float = 0.0, token_dropout_max: float = 0.95,
                 token_dropout_layers: list[int] | None = None, tower_pooled_loss: bool = False,
                 merge_aware: float = 0.0, merge_aware_tau: float = 0.8, token_dropout_guided: float = 0.0,
                 tower_attributes: list[str] | None = None,
                 tower_object_attributes: list[str] | None = None) -> None:
        super().__init__()
        if tower_object_attributes and set(tower_object_attributes) - set(ATTRIBUTE_GROUPS):
            raise ValueError(f"tower_object_attributes must be a subset of {list(ATTRIBUTE_GROUPS)}, "
                             f"got {tower_object_attributes}")
        if tower_attributes is not None and (not tower_attributes or set(tower_attributes) - set(ATTRIBUTE_GROUPS)):
            raise ValueError(f"tower_attributes must be a non-empty subset of {list(ATTRIBUTE_GROUPS)}, "
                             f"got {tower_attributes}")
        if tower_steps < 0:
            raise ValueError(f"tower_steps must be >= 0, got {tower_steps}")
        if train_attention not in ("eager", "sdpa"):
            raise ValueError(f"train_attention must be 'eager' or 'sdpa', got {train_attention!r}")
        if not 0 <= token_dropout <= 1 or not 0 < token_dropout_max <= 1:
            raise ValueError(f"token_dropout must be in [0, 1] and token_dropout_max in (0, 1], got "
                             f"{token_dropout} and {token_dropout_max}")
        if not 0 <= merge_aware <= 1:
            raise ValueError(f"merge_aware must be in [0, 1], got {merge_aware}")
        if not 0 <= token_dropout_guided <= 1:
            raise ValueError(f"token_dropout_guided must be in [0, 1], got {token_dropout_guided}")
        if (token_dropout or merge_aware) and train_attention != "eager":
            raise ValueError("token_dropout / merge_aware edit the additive attention mask of the eager path: "
                             "use train_attention='eager'")
        self.config = tiny_llava_config(preset, image_size=image_size, patch_size=patch_size, stem=stem,
                                        object_scale=object_scale)
        if token_dropout_layers is not None and (
                not token_dropout_layers or any(not 0 <= i < self.config.text_layers for i in token_dropout_layers)):
            raise ValueError(f"token_dropout_layers must be a non-empty list of LM layers in "
                             f"[0, {self.config.text_layers}), got {token_dropout_layers}")
        self.save_hyperparameters()
        # record the preset's values rather than None (the CLI hands save_hyperparameters its own init args,
        # and Lightning compares the initial hparams with the data module's when it logs them)
        for key in ("image_size", "patch_size", "object_scale"):
            self.hparams[key] = self._hparams_initial[key] = getattr(self.config, key)
        self.tok = WordTokenizer(build_vocab())
        self.model = build_tiny_llava(self.config, len(self.tok.vocab), self.tok.image_id, self.tok.pad_id,
                                      self.tok.bos_id, self.tok.eos_id)
        # Training attention: HF's eager path (bf16 matmuls, fp32 softmax) is ~2.3x faster per step on CPU
        # than SDPA, whose flash backward is slow there; the saved model loads with SDPA (load_llava).
        self.model.set_attn_implementation(train_attention)
        n_attr = sum(ATTRIBUTE_GROUPS.values())
        self.tower_head = nn.Linear(self.config.vision_hidden, n_attr) if tower_steps else None
        # CLIP's image embedding is the last layer's CLS token (post-LayerNorm): training it too gives the last
        # layer's CLS attention, MustDrop's key-set signal, a meaning (without it that layer gets no gradient)
        self.tower_pooled_head = nn.Linear(self.config.vision_hidden, n_attr) if tower_steps and tower_pooled_loss else None
        self.tower_attributes = tuple(tower_attributes or ATTRIBUTE_GROUPS)  # the attributes phase 1 learns
        self.tower_frozen = False
        self._t0 = time.time()

    @property
    def tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def freeze_tower(self) -> None:
        self.tower.requires_grad_(False)
        self.tower.eval()
        self.tower_frozen = True

    def train(self, mode: bool = True) -> TinyLlavaModule:
        super().train(mode)
        if self.tower_frozen:
            self.tower.eval()
        return self

    def _tower_step(self, batch: dict[str, Tensor]) -> Tensor:
        out = self.tower(batch["pixel_values"], output_hidden_states=True)
        tokens = out.hidden_states[self.model.config.vision_feature_layer][:, 1:]  # (B, N, C) without CLS
        on_object = tuple(self.hparams.get("tower_object_attributes") or ())
        if on_object:
            if "object_patches" not in batch:
                raise ValueError("tower_object_attributes needs the batch's 'object_patches' (ShapesVQA items)")
            weight = batch["object_patches"].to(tokens.dtype)[..., None]  # (B, N, 1)
            object_mean = (tokens * weight).sum(1) / weight.sum(1).clamp(min=1.0)  # (B, C) mean of the object patches
        heads = [("", self.tower_head, tokens.mean(1))]  # (B, C) mean of all patches
        if self.tower_pooled_head is not None:
            heads.append(("pooled_", self.tower_pooled_head, out.pooler_output))  # (B, C) last layer's CLS
        losses = []
        for prefix, head, feature in heads:
            logits = head(feature).float().split(list(ATTRIBUTE_GROUPS.values()), dim=-1)
            if prefix == "" and on_object:
                from_object = head(object_mean).float().split(list(ATTRIBUTE_GROUPS.values()), dim=-1)
                logits = [o if name in on_object else m for name, m, o in zip(ATTRIBUTE_GROUPS, logits, from_object)]
            for i, (name, lg) in enumerate(zip(ATTRIBUTE_GROUPS, logits)):
                if name not in self.tower_attributes:
                    continue
                losses.append(F.cross_entropy(lg, batch["attrs"][:, i]))
                self.log(f"train/tower_{prefix}acc_{name}", (lg.argmax(-1) == batch["attrs"][:, i]).float().mean())
        loss = sum(losses) / len(losses)
        self.log("train/tower_loss", loss, prog_bar=True)
        return loss

    def sample_token_drop(self, input_ids: Tensor, generator: torch.Generator | None = None,
                          text_attention: Callable[[int], Tensor] | None = None,
                          hidden: Tensor | None = None) -> tuple[Tensor, int]:
        """Token dropout for phase 2: each row, with probability ``token_dropout``, loses a uniform random
        fraction (up to ``token_dropout_max``) of its vision tokens as attention keys from LM layer
        ``first`` on (``first`` uniform over ``token_dropout_layers``, default every layer; 0 = the whole LM).
        With ``token_dropout_guided`` > 0 and ``text_attention`` (layer -> (B, L) attention received from the
        text, :func:`text_attention_received`), that share of the dropping rows drops its lowest-ranked
        vision tokens at layer ``max(first - 1, 0)`` instead (``hidden`` (B, L): tokens already hidden, not
        ranked). Returns (drop (B, L) bool, first)."""
        B, L = input_ids.shape
        u = torch.rand(B, generator=generator)
        frac = torch.rand(B, generator=generator) * self.hparams.token_dropout_max
        is_vis = input_ids == self.tok.image_id
        rows = u < self.hparams.token_dropout
        drop = is_vis & rows[:, None] & (torch.rand(B, L, generator=generator) < frac[:, None])
        layers = self.hparams.get("token_dropout_layers") or list(range(self.config.text_layers))
        first = int(layers[int(torch.randint(0, len(layers), (), generator=generator))])
        guided_share = self.hparams.get("token_dropout_guided", 0.0)
        if guided_share > 0 and text_attention is not None:
            guided = rows & (torch.rand(B, generator=generator) < guided_share)
            if bool(guided.any()):
                candidates = is_vis if hidden is None else is_vis & ~hidden.cpu()
                ranked = lowest_ranked(text_attention(max(first - 1, 0)).cpu(), candidates, frac)
                drop = torch.where(guided[:, None], ranked, drop)
        return drop.to(input_ids.device), first

    def _common_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        drop, first, members = None, 0, None
        inputs = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}
        if stage == "train" and self.hparams.get("merge_aware", 0.0) > 0:
            # Merge-aware training: a share of the rows sees MustDrop's stage-1 window merge (tau as evaluated),
            # so the LM meets merged windows (fewer background tokens, window means) before it is measured on them.
            rows = torch.rand(batch["input_ids"].shape[0]) < self.hparams.merge_aware
            embeds, members, positions = stage1_merged_inputs(self.model, batch["input_ids"], batch["pixel_values"],
                                                              rows.to(batch["input_ids"].device),
                                                              self.hparams.merge_aware_tau)
            inputs = {"inputs_embeds": embeds, "position_ids": positions}
        if stage == "train" and self.hparams.token_dropout > 0:
            # Dropping tokens in the middle of the LM (FastV, MustDrop stage 2) removes keys that the later
            # layers never saw missing. Training with the same kind of removal, from a random layer on,
            # made the sparse-scene model usable under dropping (FastV keeping 8 of 144 tokens: -8.8 instead
            # of -25.6 points); on the dense 81-token task it was about neutral (README, "Token compression").
            text_rows = (batch["attention_mask"] > 0) & (batch["input_ids"] != self.tok.image_id) & (batch["labels"] == -100)

            def text_attention(layer: int) -> Tensor:  # the prompt's text rows (not the answer) as at evaluation
                return text_attention_received(self.model, inputs, batch["attention_mask"], text_rows, layer, members)

            drop, first = self.sample_token_drop(batch["input_ids"], text_attention=text_attention, hidden=members)
        with keys_dropped(self.model, members, 0), keys_dropped(self.model, drop, first):
            out = self.model(**inputs, attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        first = (target != -100).float().argmax(1)  # position predicting the answer token
        pred = logits[torch.arange(len(first)), first].argmax(-1)
        acc = (pred == batch["answer"]).float().mean()
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/acc", acc, prog_bar=True)
        if stage == "val":
            self.log("val/minutes", (time.time() - self._t0) / 60)
        return loss

    def training_step(self, batch, batch_idx):
        if self.global_step < self.hparams.tower_steps:
            return self._tower_step(batch)
        if self.tower_head is not None and not self.tower_frozen:
            self.freeze_tower()
        return self._common_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._common_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._common_step(batch, "test")

    def on_fit_start(self) -> None:
        self._t0 = time.time()
        dm = getattr(self.trainer, "datamodule", None)
        if isinstance(dm, ShapesVQADataModule):  # the data must be the task the model is configured for
            for key in ("image_size", "patch_size", "object_scale"):
                if dm.hparams[key] != getattr(self.config, key):
                    raise ValueError(f"data.{key}={dm.hparams[key]} but the model (preset {self.hparams.preset!r}) "
                                     f"has {key}={getattr(self.config, key)}; set both to the same value")

    def on_fit_end(self) -> None:
        if self.hparams.save_dir and self.trainer.is_global_zero:
            save_tiny_llava(self.model, self.tok, self.config, self.hparams.save_dir)

    def configure_optimizers(self):
        from vision.classifier import warmup_cosine

        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        phase1 = min(self.hparams.tower_steps, total)
        phase2 = max(total - phase1, 1)

        def factor(step: int) -> float:  # warmup + cosine within each phase
            if step < phase1:
                return warmup_cosine(step, min(self.hparams.warmup_steps, phase1 // 2), phase1)
            return warmup_cosine(step - phase1, min(self.hparams.warmup_steps, phase2 // 2), phase2)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------------------------
# save / load


def save_tiny_llava(model: nn.Module, tok: WordTokenizer, cfg: TinyLlavaConfig, directory: str | os.PathLike) -> Path:
    """``save_pretrained`` (safetensors) + ``vocab.json`` + ``tiny_llava.json``; written to a temporary
    directory first, then renamed into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    model.save_pretrained(tmp)
    tok.save(tmp)
    _atomic_write(tmp / "tiny_llava.json", json.dumps({"kind": "vtw-tiny-llava", "config": asdict(cfg)}, indent=2))
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


@dataclass
class LoadedLlava:
    model: nn.Module
    tokenizer: Any  # WordTokenizer for the tiny model, an HF processor for LLaVA-1.5
    tiny: bool
    info: dict[str, Any] = field(default_factory=dict)


def check_llava_dir(path: str | os.PathLike) -> bool:
    """Raise unless ``path`` is a LLaVA ``save_pretrained`` directory (reads only config.json); returns
    whether it is a tiny shapes-VQA LLaVA (``vocab.json`` present) rather than a LLaVA-1.5 one."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a save_pretrained directory (no config.json)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "llava":  # anything else would load as a default-size (7B) LLaVA with random weights
        raise ValueError(f"{path / 'config.json'} is not a LLaVA config (model_type={model_type!r}, expected 'llava')")
    return (path / "vocab.json").is_file()


def load_llava(path: str | os.PathLike, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None) -> LoadedLlava:
    """Load a tiny LLaVA (``vocab.json`` present) or a real LLaVA-1.5 HF directory by path (offline)."""
    from transformers import LlavaForConditionalGeneration

    import compression.conv_clip  # noqa: F401  (registers the conv-stem tower type with AutoConfig/AutoModel)

    path = Path(path)
    check_llava_dir(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn_implementation,
                                                          dtype=dtype, local_files_only=True).eval()
    if (path / "vocab.json").is_file():
        info = json.loads((path / "tiny_llava.json").read_text()) if (path / "tiny_llava.json").is_file() else {}
        return LoadedLlava(model, WordTokenizer.load(path), True, info)
    from transformers import AutoProcessor

    return LoadedLlava(model, AutoProcessor.from_pretrained(path, local_files_only=True), False, {})


# ----------------------------------------------------------------------------------------------
# plain CLI recipe (no jsonargparse needed): python -m compression.tiny_llava --config X.yaml


def _instantiate(section: dict[str, Any], default: type, **extra: Any) -> Any:
    import importlib

    path = section.get("class_path")
    cls = default
    if path:
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    return cls(**{**section.get("init_args", {}), **extra})


def main(argv: list[str] | None = None) -> int:
    """Fit from a ``vtw fit`` YAML (trainer / model / data with class_path + init_args) without
    jsonargparse; defaults to the tiny-LLaVA classes when class_path is absent."""
    import argparse

    import yaml

    ap = argparse.ArgumentParser(description="Train from a vtw fit YAML (default: tiny LLaVA on shapes VQA)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--accelerator", default=None)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--max-time", default=None, help="Lightning max_time, e.g. 00:00:14:00")
    ap.add_argument("--save-dir", default=None, help="tiny LLaVA: save_pretrained directory")
    ap.add_argument("--save-ckpt", default=None, help="write a weights-only Lightning checkpoint here at the end")
    args = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    for key in ("trainer", "model", "data"):
        if key not in cfg:
            raise SystemExit(f"{args.config}: missing top-level key {key!r}")
    pl.seed_everything(cfg.get("seed_everything", 0))
    trainer_kw = {k: v for k, v in cfg["trainer"].items() if k != "callbacks"}
    for key, value in (("accelerator", args.accelerator), ("max_steps", args.max_steps), ("max_time", args.max_time)):
        if value:
            trainer_kw[key] = value
    extra = {"save_dir": args.save_dir} if args.save_dir else {}
    module = _instantiate(cfg["model"], TinyLlavaModule, **extra)
    data = _instantiate(cfg["data"], ShapesVQADataModule)
    trainer = pl.Trainer(**trainer_kw, enable_checkpointing=False)
    t0 = time.time()
    trainer.fit(module, data)
    print(f"fit wall-clock: {(time.time() - t0) / 60:.2f} min, steps {trainer.global_step}")
    trainer.validate(module, data)
    if args.save_ckpt:
        trainer.save_checkpoint(args.save_ckpt, weights_only=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
