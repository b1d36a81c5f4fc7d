"""LlamaGen-style autoregressive image GPT (class- or caption-conditioned) and ELM sub-token models.

Papers
- Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation" (LlamaGen,
  arXiv 2406.06525). Architecture as in FoundationVision/LlamaGen ``autoregressive/models/gpt.py``
  (re-implemented here from the facts in ``shared/methods/ar_gen.md`` section 1):
  * input ``h0 = [cond_emb(c) (B, P, C); tok_emb(z_<N-1) (B, N-1, C)]``, token dropout on ``h0``;
  * pre-norm blocks ``h += Attn(RMSNorm(h))``, ``h += SwiGLU(RMSNorm(h))`` (``vision.layers``), no biases;
  * 2D RoPE over the raster token grid, the P condition-prefix rows of the table are **zeros** (LlamaGen's
    quirk: prefix q/k are zero vectors; kept for checkpoint compatibility). Its consequence: every query
    scores the class token's key at exactly 0, so attention cannot single the class token out and the
    label reaches late positions diluted by ~1/position. ``rope_prefix="identity"`` (unrotated prefix)
    lets the model learn that key; the workbench's own shapes recipes use it (measured on the demo GPT:
    class consistency 48% vs 21% after 1600 steps, ``configs/gpt_tiny_shapes.yaml``);
  * ``logits = output(RMSNorm(h))`` in fp32, the ``output`` layer zero-initialised, every other Linear
    and Embedding N(0, 0.02); loss = CE(logits[:, P-1:], z): the last prefix position predicts z_0;
  * class condition: ``nn.Embedding(num_classes + 1, C)``, row ``num_classes`` is the null class; during
    training a label becomes null with probability ``class_dropout_prob`` (for classifier-free guidance).
  * caption condition (t2i): a prefix of P per-token caption features (here open_clip text-tower tokens,
    LlamaGen uses FLAN-T5) through ``cap_proj`` (Linear-GELU(tanh)-Linear, no bias); the null caption is
    the ``uncond_embedding`` buffer (P, caption_dim).
- Liu et al., "Elucidating the design space of language models for image generation" (ELM,
  arXiv 2410.16257), sub-tokens (section 2(a)): with ``token_each = t > 1`` each position holds t
  sub-tokens; ``t`` embeddings are concatenated and projected ``tok_proj: (t*C -> C)``, and ``t``
  zero-initialised heads predict the sub-tokens in parallel (conditionally independent given h).

Parameter names and shapes equal LlamaGen's released c2i checkpoints (``cls_embedding.embedding_table``,
``tok_embeddings``, ``layers.i.attention.wqkv|wo``, ``layers.i.feed_forward.w1|w2|w3``,
``layers.i.attention_norm|ffn_norm``, ``norm``, ``output``); :func:`load_llamagen_checkpoint` reads
such a file (``{"model": state_dict}`` or a bare state dict) strictly.

Incremental decoding API (shared with speculative decoding, ``ar_gen/speculative*``)
--------------------------------------------------------------------------------------
``model.setup_caches(max_batch, max_seq, dtype)``
    allocates a static :class:`vision.layers.KVCache` (max_batch, H_kv, S, D) per layer with
    ``S = find_multiple(max_seq, 8)``, plus a (S, S) causal mask. ``model.clear_caches()`` removes them.
``model(idx, cond, input_pos=pos, kv_len=None, mask=None, return_hidden=False) -> GPTOutput``
    cached forward of ``T = len(pos)`` new positions (``pos`` 1-D long, the same for every row):
    ``cond`` (labels (B,) / caption features (B, P, Dc)) embeds the prefix, ``idx`` (B, T') or
    (B, T', token_each) embeds image tokens; if both are given the prefix comes first. k/v are written at
    ``pos`` and each new position attends to cache slots ``< kv_len`` (default: the whole cache) that are
    ``<= its own position`` (``mask`` overrides this: bool, True = attend, broadcastable to
    (B, 1, T, kv_len|S), e.g. a draft-tree mask). Returns ``logits`` (B, T, V) or (B, T, token_each, V)
    for **every** new position (fp32), and ``hidden`` (B, T, C), the final-norm output the heads read (for
    an EAGLE drafter), when ``return_hidden``.
    Roll-back for speculative decoding is free: rejected slots are overwritten by the next write at their
    positions, and slots beyond a query's position are never attended.
``model(idx, cond)`` (no ``input_pos``)
    the full causal forward (training, and the reference that cached decoding is tested against):
    ``idx`` = z[:, :-1] gives logits (B, N, V) for z_0..z_{N-1}; ``targets`` adds the CE loss.
Sampling loops (``prefill``, ``decode_one_token``, ``decode_n_tokens``, ``generate``) are plain functions
in :mod:`ar_gen.sampling` built on these calls.

Shapes: B batch, P = ``cls_token_num`` prefix positions, N = ``block_size`` image positions, C = ``dim``,
V = ``vocab_size``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vision.layers import KVCache, RMSNorm, TransformerBlock, find_multiple, precompute_freqs_cis_2d
from vision.towers import load_state_dict_checked

__all__ = [
    "GPT",
    "GPTConfig",
    "GPTOutput",
    "GPT_PRESETS",
    "gpt_config",
    "load_gpt",
    "load_llamagen_checkpoint",
    "save_gpt",
]


@dataclass
class GPTConfig:
    """Hyper-parameters (LlamaGen ``ModelArgs`` names where they exist)."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: = n_head (LlamaGen configs never use GQA)
    multiple_of: int = 256  # SwiGLU hidden = find_multiple(int(8*dim/3), multiple_of); tiny presets use 32/64
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02

    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0

    model_type: str = "c2i"  # "c2i" (class label prefix) or "t2i" (caption-feature prefix)
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # label / caption dropout -> null condition (CFG)
    caption_dim: int = 2048  # t2i: width of the per-token caption features
    cls_token_num: int = 1  # P: prefix length (1 for c2i, the caption length for t2i)

    vocab_size: int = 16384  # per (sub-)token
    block_size: int = 256  # N image positions (= h*w of the token grid)
    grid_h: int | None = None  # token grid; None: square sqrt(block_size)
    grid_w: int | None = None
    token_each: int = 1  # ELM sub-tokens per position (>1: concat-embeddings + parallel heads)
    rope_prefix: str = "zero"  # "zero" = LlamaGen quirk (checkpoint compatible), "identity" = unrotated
    # (class key learnable: much faster label learning for models trained from scratch, see docstring)

    def __post_init__(self) -> None:
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type must be 'c2i' or 't2i', got {self.model_type!r}")
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if (self.dim // self.n_head) % 4:
            raise ValueError(f"head dim {self.dim // self.n_head} must be divisible by 4 for 2D RoPE")
        if self.grid_h is None or self.grid_w is None:
            side = math.isqrt(self.block_size)
            if side * side != self.block_size:
                raise ValueError(f"block_size {self.block_size} is not a square; set grid_h and grid_w")
            self.grid_h, self.grid_w = side, side
        if self.grid_h * self.grid_w != self.block_size:
            raise ValueError(f"grid {self.grid_h}x{self.grid_w} != block_size {self.block_size}")
        if self.token_each < 1:
            raise ValueError(f"token_each must be >= 1, got {self.token_each}")
        if self.model_type == "c2i" and self.cls_token_num != 1:
            raise ValueError("c2i models use one class token (cls_token_num=1)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    def num_params(self) -> int:
        """Parameter count computed from the config (no model built)."""
        d, kv = self.dim, (self.n_kv_head or self.n_head) * self.head_dim
        layer = d * (d + 2 * kv) + d * d + 3 * d * self.ffn_hidden + 2 * d
        if self.model_type == "c2i":
            cond = (self.num_classes + int(self.class_dropout_prob > 0)) * d
        else:
            cond = self.caption_dim * d + d * d
        te = self.token_each
        tok = te * self.vocab_size * d + (te * d * d if te > 1 else 0)
        return cond + tok + self.n_layer * layer + d + te * d * self.vocab_size

    @property
    def seq_len(self) -> int:
        """Prefix + image positions the cache must hold for one full generation."""
        return self.cls_token_num + self.block_size


# Named size presets (a YAML recipe picks one by name and overrides single fields).
GPT_PRESETS: dict[str, dict[str, Any]] = {
    # tiny CPU presets (head dim 16/32 so that 2D RoPE has >= 2 pairs per axis)
    "GPT-test": dict(n_layer=2, n_head=2, dim=32, multiple_of=32),
    "GPT-tiny": dict(n_layer=4, n_head=6, dim=192, multiple_of=64),
    "GPT-small": dict(n_layer=8, n_head=8, dim=256, multiple_of=64),
    # LlamaGen sizes (fact sheet 1(a)); FFN hidden 2048 / 2816 / 3584 / 4096 / 8704
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
    # ELM's extra size (fact sheet 2(a))
    "GPT-2B": dict(n_layer=48, n_head=28, dim=1792),
}


def gpt_config(preset: str = "GPT-B", **overrides: Any) -> GPTConfig:
    """Config of a named preset with ``overrides`` (None values are ignored)."""
    if preset not in GPT_PRESETS:
        raise ValueError(f"unknown GPT preset {preset!r}; choose one of {sorted(GPT_PRESETS)}")
    known = {f.name for f in fields(GPTConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown GPTConfig field(s) {bad}; known: {sorted(known)}")
    return GPTConfig(**{**GPT_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V) or (B, T, token_each, V), fp32
    loss: torch.Tensor | None = None  # scalar CE when targets were given
    hidden: torch.Tensor | None = None  # (B, T, C) final-norm hidden states (return_hidden=True)


# --------------------------------------------------------------------------------------------------
# Condition embedders
# --------------------------------------------------------------------------------------------------
class LabelEmbedder(nn.Module):
    """Class label -> one prefix embedding; row ``num_classes`` is the null class (label dropout)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        # LlamaGen allocates the null row only when dropout is on; every released c2i model has it.
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.bool()
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.drop(labels, force_drop_ids)
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, C)


class _MLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Per-token caption features (B, P, Dc) -> prefix (B, P, C); null caption = ``uncond_embedding``."""

    def __init__(self, caption_dim: int, dim: int, dropout_prob: float, token_num: int):
        super().__init__()
        self.cap_proj = _MLP(caption_dim, dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim ** 0.5)
        self.dropout_prob = dropout_prob

    def drop(self, caption: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.dropout_prob
        else:
            drop = force_drop_ids.bool()
        return torch.where(drop[:, None, None], self.uncond_embedding.to(caption.dtype), caption)

    def forward(self, caption: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            caption = self.drop(caption, force_drop_ids)
        return self.cap_proj(caption)  # (B, P, C)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
class GPT(nn.Module):
    """LlamaGen ``Transformer`` (c2i / t2i), optionally with ELM sub-token embeddings and heads."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        c = config
        if c.model_type == "c2i":
            self.cls_embedding: nn.Module = LabelEmbedder(c.num_classes, c.dim, c.class_dropout_prob)
        else:
            self.cls_embedding = CaptionEmbedder(c.caption_dim, c.dim, c.class_dropout_prob, c.cls_token_num)
        if c.token_each == 1:
            self.tok_embeddings: nn.Module = nn.Embedding(c.vocab_size, c.dim)
        else:
            self.tok_embeddings = nn.ModuleList(nn.Embedding(c.vocab_size, c.dim) for _ in range(c.token_each))
            self.tok_proj = nn.Linear(c.token_each * c.dim, c.dim, bias=False)
        self.tok_dropout = nn.Dropout(c.token_dropout_p)
        dpr = [c.drop_path_rate * i / max(c.n_layer - 1, 1) for i in range(c.n_layer)]  # linspace(0, rate, L)
        self.layers = nn.ModuleList(
            TransformerBlock(c.dim, c.n_head, c.n_kv_head, multiple_of=c.multiple_of,
                             ffn_dim_multiplier=c.ffn_dim_multiplier, norm_eps=c.norm_eps,
                             attn_dropout=c.attn_dropout_p, resid_dropout=c.resid_dropout_p,
                             ffn_dropout=c.ffn_dropout_p, drop_path=dpr[i])
            for i in range(c.n_layer)
        )
        self.norm = RMSNorm(c.dim, eps=c.norm_eps)
        if c.token_each == 1:
            self.output: nn.Module = nn.Linear(c.dim, c.vocab_size, bias=False)
        else:
            self.output = nn.ModuleList(nn.Linear(c.dim, c.vocab_size, bias=False) for _ in range(c.token_each))
        freqs = precompute_freqs_cis_2d((c.grid_h, c.grid_w), c.head_dim, c.rope_base, c.cls_token_num,
                                        prefix=c.rope_prefix)  # (P + N, D/2, 2)
        self.register_buffer("freqs_cis", freqs, persistent=False)
        self.register_buffer("causal_mask", torch.empty(0, 0, dtype=torch.bool), persistent=False)
        self.initialize_weights()

    # ------------------------------------------------------------------ init / caches
    def initialize_weights(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
        heads = self.output if isinstance(self.output, nn.ModuleList) else [self.output]
        for head in heads:
            nn.init.zeros_(head.weight)  # uniform logits at init (LlamaGen / ELM)

    def setup_caches(self, max_batch: int, max_seq: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a static KV cache of ``find_multiple(max_seq, 8)`` slots for ``max_batch`` rows."""
        c = self.config
        if max_seq > c.seq_len:
            raise ValueError(f"max_seq {max_seq} > prefix + image positions {c.seq_len} of this model")
        max_seq = find_multiple(max_seq, 8)
        param = next(self.parameters())
        dtype = param.dtype if dtype is None else dtype
        n_kv = c.n_kv_head or c.n_head
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch, max_seq, n_kv, c.head_dim, dtype=dtype, device=param.device)
        self.causal_mask = torch.ones(max_seq, max_seq, dtype=torch.bool, device=param.device).tril()

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.causal_mask = torch.empty(0, 0, dtype=torch.bool, device=self.freqs_cis.device)

    @property
    def has_caches(self) -> bool:
        return self.layers[0].attention.kv_cache is not None

    # ------------------------------------------------------------------ embeddings / heads
    def null_cond(self, batch: int, device: torch.device | None = None) -> torch.Tensor:
        """The unconditional condition (null class id, or the null caption features) for ``batch`` rows."""
        device = device or self.freqs_cis.device
        if self.config.model_type == "c2i":
            if self.config.class_dropout_prob <= 0:
                raise ValueError("this c2i model was built with class_dropout_prob=0: it has no null class for CFG")
            return torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)
        unc = self.cls_embedding.uncond_embedding
        return unc.unsqueeze(0).expand(batch, -1, -1).to(device)  # (B, P, Dc)

    def embed_cond(self, cond: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Condition -> prefix embeddings (B, P, C); label/caption dropout when training."""
        c = self.config
        if c.model_type == "c2i":
            if cond.dim() != 1 or cond.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"c2i condition must be integer class ids (B,), got {tuple(cond.shape)} {cond.dtype}")
        elif cond.dim() != 3 or cond.shape[1:] != (c.cls_token_num, c.caption_dim):
            raise ValueError(f"t2i condition must be caption features (B, {c.cls_token_num}, {c.caption_dim}), "
                             f"got {tuple(cond.shape)}")
        return self.cls_embedding(cond, self.training, force_drop_ids)[:, : c.cls_token_num]

    def embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) or (B, T, token_each) token ids -> (B, T, C)."""
        te = self.config.token_each
        if te == 1:
            return self.tok_embeddings(idx)
        if idx.dim() != 3 or idx.shape[-1] != te:
            raise ValueError(f"sub-token model expects ids of shape (B, T, {te}), got {tuple(idx.shape)}")
        parts = [emb(idx[..., j]) for j, emb in enumerate(self.tok_embeddings)]  # token_each x (B, T, C)
        return self.tok_proj(torch.cat(parts, dim=-1))  # (B, T, te*C) -> (B, T, C)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden (B, T, C) -> fp32 logits (B, T, V) or (B, T, token_each, V)."""
        if self.config.token_each == 1:
            return self.output(h).float()
        return torch.stack([head(h) for head in self.output], dim=2).float()  # (B, T, te, V)

    # ------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor | None, cond: torch.Tensor | None = None, input_pos: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, mask: torch.Tensor | None = None, kv_len: int | None = None,
                return_hidden: bool = False, force_drop_ids: torch.Tensor | None = None) -> GPTOutput:
        parts = []
        if cond is not None:
            parts.append(self.embed_cond(cond, force_drop_ids))
        if idx is not None:
            parts.append(self.embed_tokens(idx))
        if not parts:
            raise ValueError("GPT.forward needs idx and/or cond")
        h = self.tok_dropout(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])  # (B, T, C)
        t = h.shape[1]
        if input_pos is None:  # full causal forward from position 0 (training / reference)
            if cond is None:
                raise ValueError("the full forward (no input_pos) starts at the condition prefix: pass cond")
            if t > self.freqs_cis.shape[0]:
                raise ValueError(f"sequence of {t} positions > prefix + block_size {self.freqs_cis.shape[0]}")
            freqs = self.freqs_cis[:t]
            for layer in self.layers:
                h = layer(h, freqs, is_causal=True)
        else:
            if not self.has_caches:
                raise RuntimeError("cached forward (input_pos given) needs model.setup_caches(...) first")
            if input_pos.shape[0] != t:
                raise ValueError(f"input_pos has {input_pos.shape[0]} positions for {t} new embeddings")
            freqs = self.freqs_cis[input_pos]  # (T, D/2, 2)
            # one token at slot kv_len - 1 sees every slot < kv_len: no mask needed (a faster SDPA call)
            if mask is None and not _is_last_slot(input_pos, kv_len):
                mask = self.causal_mask[input_pos]  # (T, S): slot j visible iff j <= pos
                if kv_len is not None:
                    mask = mask[:, :kv_len]
            for layer in self.layers:
                h = layer(h, freqs, input_pos, mask=mask, kv_len=kv_len)
        h = self.norm(h)
        if input_pos is None and cond is not None:
            h = h[:, self.config.cls_token_num - 1:]  # predictions of z_0 .. z_{T_idx}
        logits = self.head(h)
        loss = None
        if targets is not None:
            loss = self.loss_from_logits(logits, targets)
        return GPTOutput(logits, loss, h if return_hidden else None)

    def loss_from_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean CE over every (sub-)token; ``targets`` (B, N) or (B, N, token_each)."""
        if logits.shape[:-1] != targets.shape:
            raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape[:-1])}")
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def training_loss(self, tokens: torch.Tensor, cond: torch.Tensor) -> GPTOutput:
        """Teacher-forced next-token loss on full token sequences (B, N[, token_each])."""
        return self(tokens[:, :-1], cond, targets=tokens)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
        return n


# --------------------------------------------------------------------------------------------------
# Save / load (own format) and the LlamaGen converter
# --------------------------------------------------------------------------------------------------
_IGNORED_SUFFIXES = ("freqs_cis", "causal_mask", ".kv_cache.k_cache", ".kv_cache.v_cache")


def _is_last_slot(input_pos: torch.Tensor, kv_len: int | None) -> bool:
    """True for one new token written at cache slot ``kv_len - 1`` (the plain decode step, CPU eager)."""
    if kv_len is None or input_pos.shape[0] != 1 or input_pos.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return int(input_pos[0]) == kv_len - 1


def _clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):  # torch.compile / DDP wrappers
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not k.endswith(_IGNORED_SUFFIXES):
            out[k] = v
    return out


def _load_strict(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    load_state_dict_checked(model, state, source, what=f"GPT({_describe(model.config)})")


def _describe(c: GPTConfig) -> str:
    return (f"{c.model_type}, n_layer={c.n_layer}, dim={c.dim}, n_head={c.n_head}, vocab={c.vocab_size}, "
            f"block={c.block_size}, token_each={c.token_each}")


def save_gpt(model: GPT, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` (+ ``extra`` metadata) and ``model.safetensors`` (temp files, then rename)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".safetensors.tmp")
    os.close(fd)
    save_file(state, tmp, metadata={"format": "pt", "arch": "ar_gen.gpt.GPT"})
    os.replace(tmp, out / "model.safetensors")
    meta = {"arch": "ar_gen.gpt.GPT", "config": asdict(model.config), **(extra or {})}
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".json.tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(meta, fh, indent=2)
    os.replace(tmp, out / "config.json")
    return out


def load_gpt(path: str | os.PathLike, map_location: str | torch.device = "cpu",
             use_ema: bool = True) -> tuple[GPT, dict[str, Any]]:
    """Load a GPT from a ``save_gpt`` directory or a workbench Lightning ``.ckpt`` -> (model in eval, meta).

    Fails with a clear ``ValueError`` for a missing file, a checkpoint that is not a workbench GPT, or
    weights that do not fit the stored config.
    """
    p = Path(path)
    if p.is_dir():
        cfg_file, weights = p / "config.json", p / "model.safetensors"
        if not cfg_file.is_file() or not weights.is_file():
            raise ValueError(f"{p}: not a GPT directory (needs config.json and model.safetensors)")
        meta = json.loads(cfg_file.read_text())
        if meta.get("arch") != "ar_gen.gpt.GPT" or "config" not in meta:
            raise ValueError(f"{cfg_file}: not a GPT config (arch={meta.get('arch')!r})")
        from safetensors.torch import load_file

        state = load_file(str(weights), device=str(map_location))
        model = GPT(GPTConfig(**meta["config"]))
        _load_strict(model, _clean_state_dict(state), str(weights))
        return model.eval(), meta
    if not p.is_file():
        raise ValueError(f"GPT checkpoint {p} does not exist")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{p}: cannot be read as a torch checkpoint with weights_only=True ({err})") from err
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    cfg = hp.get("gpt_config") if isinstance(hp, dict) else None
    if not isinstance(cfg, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{p}: not a workbench GPT checkpoint (no hyper_parameters['gpt_config'] / state_dict); "
                         "for LlamaGen .pt files use load_llamagen_checkpoint(path, preset)")
    state = ckpt["state_dict"]
    prefix = "ema_model." if use_ema and any(k.startswith("ema_model.") for k in state) else "model."
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{p}: no 'model.*' weights in the state_dict")
    model = GPT(GPTConfig(**cfg))
    _load_strict(model, _clean_state_dict(state), str(p))
    meta = {"arch": "ar_gen.gpt.GPT", "config": cfg, **{k: v for k, v in hp.items() if k != "gpt_config"},
            "weights": prefix.rstrip(".")}
    return model.eval(), meta


def load_llamagen_checkpoint(path: str | os.PathLike, preset: str = "GPT-B", map_location: str = "cpu",
                             **overrides: Any) -> GPT:
    """Build ``preset`` and load a LlamaGen c2i/t2i ``.pt`` (``{"model"|"module"|"state_dict": sd}`` or ``sd``).

    Names map one to one; ``freqs_cis``/KV-cache entries and ``_orig_mod.``/``module.`` prefixes are ignored.
    E.g. ``load_llamagen_checkpoint("c2i_B_384.pt", "GPT-B", block_size=576)``.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"LlamaGen checkpoint {p} does not exist")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{p}: cannot be read with weights_only=True ({err}); re-save its 'model' entry "
                         "with torch.save(ckpt['model'], ...) in a trusted environment") from err
    state = ckpt
    for key in ("model", "module", "state_dict"):
        if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
            state = ckpt[key]
            break
    model = GPT(gpt_config(preset, **overrides))
    _load_strict(model, _clean_state_dict(state), str(p))
    return model.eval()
