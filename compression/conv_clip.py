"""A CLIP vision tower whose linear patch embedding is replaced by a small convolutional stem, as a
Hugging Face model type (``vtw_conv_clip_vision``) so that ``LlavaForConditionalGeneration`` builds,
saves and reloads it with ``save_pretrained`` / ``from_pretrained`` like any CLIP tower.

Xiao, Singh, Mintun, Darrell, Dollar, Girshick, "Early Convolutions Help Transformers See Better",
NeurIPS 2021 (arXiv:2106.14881): a stack of stride-2 3x3 convolutions in place of the p x p patchify
convolution, same token grid, better optimisation. On the 36-pixel shapes images a 4-layer CLIP tower
with a linear 4x4 patch embedding barely learns the shape attribute in a CPU budget; with this stem it
does in about a minute (the same finding as the shapes classifier's ``stem="conv"``).

Only the embedding changes: the encoder layers, the CLS token, the position embeddings and
``pre_layrnorm`` are CLIP's, so token merging / dropping (PiToMe, MustDrop stage 1) and
``compression.llava_runner`` run on it unchanged (the stem exposes ``.weight`` because
``CLIPVisionEmbeddings`` reads ``patch_embedding.weight.dtype``).

Importing this module registers the type with ``AutoConfig`` / ``AutoModel``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, CLIPVisionConfig, CLIPVisionModel

MODEL_TYPE = "vtw_conv_clip_vision"


class ConvPatchStem(nn.Module):
    """3x3 conv + BatchNorm + GELU at full resolution, then log2(patch_size) stages of (stride-2 conv,
    conv), doubling the channels up to ``width`` at the token grid, then a 1x1 projection to the
    tower width: (B, 3, H, W) -> (B, hidden, H / patch_size, W / patch_size)."""

    def __init__(self, in_channels: int, hidden: int, patch_size: int, width: int) -> None:
        super().__init__()
        if patch_size < 1 or patch_size & (patch_size - 1):
            raise ValueError(f"the conv stem needs a power-of-two patch_size, got {patch_size}")
        levels = patch_size.bit_length() - 1

        def conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]

        channels = max(width >> levels, 8)
        layers = conv(in_channels, channels)
        for level in range(levels):
            out = max(width >> (levels - level - 1), 8)
            layers += conv(channels, out, stride=2) + conv(out, out)
            channels = out
        self.body = nn.Sequential(*layers)
        self.proj = nn.Conv2d(channels, hidden, 1)

    @property
    def weight(self) -> Tensor:  # CLIPVisionEmbeddings casts the pixels to patch_embedding.weight.dtype
        return self.proj.weight

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.proj(self.body(pixel_values))


class ConvStemCLIPVisionConfig(CLIPVisionConfig):
    """``CLIPVisionConfig`` + ``stem_width`` (channels of the conv stem at the token grid)."""

    model_type = MODEL_TYPE

    def __init__(self, stem_width: int = 128, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stem_width = stem_width


class ConvStemCLIPVisionModel(CLIPVisionModel):
    """``CLIPVisionModel`` with :class:`ConvPatchStem` as ``embeddings.patch_embedding``."""

    config: ConvStemCLIPVisionConfig
    config_class = ConvStemCLIPVisionConfig

    def __init__(self, config: ConvStemCLIPVisionConfig) -> None:
        super().__init__(config)
        self.embeddings.patch_embedding = ConvPatchStem(config.num_channels, config.hidden_size, config.patch_size,
                                                        config.stem_width)


AutoConfig.register(MODEL_TYPE, ConvStemCLIPVisionConfig, exist_ok=True)
AutoModel.register(ConvStemCLIPVisionConfig, ConvStemCLIPVisionModel, exist_ok=True)
