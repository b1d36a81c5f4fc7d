"""Per-token caption features from an open_clip text tower, the prefix of the caption-conditioned GPT.

LlamaGen's t2i model conditions on 120 FLAN-T5-XL token features through ``CaptionEmbedder``
(arXiv 2406.06525); SEED / TokenFlow tokens come with CLIP text towers, so here the prefix is the
open_clip text transformer's *per-token* output: ``ln_final(transformer(token_emb + pos_emb))``, shape
(B, context_length, width), i.e. ``CLIP.encode_text`` before its pooling and projection. The tower is
frozen; the GPT's ``cap_proj`` learns the mapping.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class CaptionEncoder(nn.Module):
    """Frozen open_clip text tower -> (B, L, width) token features. Build with :meth:`from_name`."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        clip = getattr(tower, "model", tower)
        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(clip, attr):
                raise ValueError(f"text tower {type(clip).__name__} has no {attr!r}: need an open_clip CLIP text tower")
        self.tower = tower
        self.clip = clip
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @classmethod
    def from_name(cls, name: str, pretrained: str | None = None) -> CaptionEncoder:
        """``name``: a ``vision.towers`` preset or ``open_clip:<model>``; ``pretrained``: local weights path."""
        from vision.towers import build_text_tower

        return cls(build_text_tower(name, pretrained))

    @property
    def width(self) -> int:
        return int(self.clip.token_embedding.weight.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.clip.positional_embedding.shape[0])

    def train(self, mode: bool = True) -> CaptionEncoder:  # always frozen / eval
        return super().train(False)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions: expected a list of strings, one per image")
        return self.tower.tokenize(list(captions))  # (B, L)

    @torch.no_grad()
    def forward(self, captions: Sequence[str] | torch.Tensor) -> torch.Tensor:
        clip = self.clip
        tokens = captions if torch.is_tensor(captions) else self.tokenize(captions)
        tokens = tokens.to(clip.token_embedding.weight.device)
        cast = clip.transformer.get_cast_dtype() if hasattr(clip.transformer, "get_cast_dtype") else torch.float32
        x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding.to(cast)  # (B, L, W)
        x = clip.transformer(x, attn_mask=getattr(clip, "attn_mask", None))
        return clip.ln_final(x).float()  # (B, L, W)
