"""The one image-tokenizer interface of the workbench.

Every tokenizer (VQGAN, ELM's BAE, SEED, TokenFlow) subclasses :class:`ImageTokenizer`:

============================  =====================================================================
``encode(images)``            images float (B, 3, H, W) in [-1, 1] -> LongTensor (B, seq_len) in raster
                              order, or (B, seq_len, token_each) when ``token_each > 1`` (BAE)
``decode(indices)``           inverse of ``encode`` -> images (B, 3, H, W), about [-1, 1]
``encode_latents(images)``    continuous latents (B, C, h, w) before quantization
``quantize(latents)``         :class:`QuantizerOutput` (quantized, indices, loss, stats)
``decode_latents(quantized)`` images from quantized latents
``codebook_embeddings()``     (vocab_size, D) latent vector of every token id
``check_images(images)``      clear ``ValueError`` for bad range / channels / size
============================  =====================================================================

Properties: ``vocab_size`` (ids per (sub-)token position), ``token_grid`` ((h, w) of the final token
grid; 1-D tokenizers use (1, L)), ``seq_len`` (positions an AR model generates; h*w for 2-D raster
tokenizers), ``token_each`` (sub-tokens per position; 1 except BAE) and ``downsample``.

Identity that the tests check for every tokenizer (in ``eval()`` mode)::

    decode(encode(x)) == decode_latents(quantize(encode_latents(x)).quantized)

Save / load: ``save_pretrained(dir)`` writes ``model.safetensors`` plus ``config.json`` (the model's
config dataclass as ``dataclasses.asdict``) through huggingface_hub's ``PyTorchModelHubMixin``;
``from_pretrained(dir)`` rebuilds the model from the config and loads the weights *strictly*: a
checkpoint of another architecture fails with a ``ValueError`` naming the missing, unexpected and
mis-shaped keys.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from vision.towers import load_state_dict_checked

__all__ = ["ImageTokenizer", "QuantizerOutput", "load_state_dict_strict", "load_tokenizer"]

# Images may overshoot [-1, 1] a little after resizing / interpolation; beyond this is a bug upstream
# (e.g. images in [0, 255] or [0, 1] passed by mistake).
RANGE_TOLERANCE = 1e-2
TOKENIZER_META = "vtw_tokenizer.json"  # written next to config.json: which class to rebuild


def load_tokenizer(path: str | os.PathLike, map_location: str = "cpu") -> ImageTokenizer:
    """Load any workbench tokenizer saved with ``save_pretrained`` (class read from ``vtw_tokenizer.json``)."""
    import importlib
    import json
    from pathlib import Path

    path = Path(path)
    meta_file = path / TOKENIZER_META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved tokenizer directory (no {TOKENIZER_META}; "
                                "save it with tokenizer.save_pretrained(dir))")
    cls_path = json.loads(meta_file.read_text())["class"]
    module_name, _, cls_name = cls_path.rpartition(".")
    if not module_name.startswith("tokenizers_img."):
        raise ValueError(f"{meta_file}: refusing to import class {cls_path!r} outside tokenizers_img")
    cls = getattr(importlib.import_module(module_name), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, ImageTokenizer)):
        raise ValueError(f"{meta_file}: {cls_path} is not an ImageTokenizer")
    return cls.from_pretrained(str(path), map_location=map_location)


class QuantizerOutput(NamedTuple):
    """What every quantizer (and ``ImageTokenizer.quantize``) returns."""

    quantized: Tensor  # straight-through quantized latents, same shape as the input latents
    indices: Tensor  # LongTensor of code ids (layout documented by each quantizer)
    loss: Tensor  # scalar: codebook + commitment (or bit-confidence) loss, already weighted
    stats: dict[str, Tensor]  # detached scalars for logging: "usage", "perplexity", ...


def config_from_dict(config_cls: type, data: Any, owner: str) -> Any:
    """Build the config dataclass ``config_cls`` from a dict (e.g. config.json); unknown keys are an error."""
    import dataclasses

    if isinstance(data, config_cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{owner} expects a {config_cls.__name__} or a dict, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config keys {unknown} are not fields of {config_cls.__name__} "
                         f"(a config of another tokenizer class?); {owner} expects {sorted(known)}")
    return config_cls(**data)


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``model``; a ``ValueError`` (:class:`vision.towers.CheckpointMismatchError`)
    names every missing, unexpected and shape-mismatched key (see :func:`vision.towers.check_state_dict`)."""
    load_state_dict_checked(model, state_dict, source, what=f"{type(model).__name__} (wrong architecture or config?)")


class ImageTokenizer(nn.Module, PyTorchModelHubMixin, library_name="vision-token-workbench"):
    """Abstract base of all image tokenizers (see the module docstring for the contract).

    Subclasses implement ``encode_latents``, ``quantize``, ``decode_latents``, ``indices_to_quantized``,
    ``codebook_embeddings`` and the properties ``vocab_size``, ``token_grid``, ``downsample``. The
    default ``encode``/``decode`` flatten the quantizer's (B, h, w) index map to raster order; override
    ``tokens_from_indices`` / ``indices_to_quantized`` for other layouts (BAE, multi-scale).
    """

    # ----------------------------------------------------------------- properties (override)
    @property
    def vocab_size(self) -> int:
        """Number of ids per (sub-)token position."""
        raise NotImplementedError

    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) of the final token grid; 1-D tokenizers use (1, L)."""
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        """Positions an AR model generates (h*w for 2-D raster tokenizers)."""
        h, w = self.token_grid
        return h * w

    @property
    def token_each(self) -> int:
        """Sub-tokens per position (1 except BAE)."""
        return 1

    @property
    def downsample(self) -> int:
        """Spatial reduction factor image -> latent grid; image sides must be multiples of it."""
        return 1

    @property
    def image_size(self) -> int | None:
        """Training image side if the tokenizer is tied to one size (None: any multiple of downsample)."""
        return None

    # ----------------------------------------------------------------- abstract pipeline
    def encode_latents(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> continuous latents (B, C, h, w)."""
        raise NotImplementedError

    def quantize(self, latents: Tensor) -> QuantizerOutput:
        """latents (B, C, h, w) -> :class:`QuantizerOutput`."""
        raise NotImplementedError

    def decode_latents(self, quantized: Tensor) -> Tensor:
        """quantized latents (B, C, h, w) -> images (B, 3, H, W)."""
        raise NotImplementedError

    def indices_to_quantized(self, tokens: Tensor) -> Tensor:
        """tokens as returned by ``encode`` -> quantized latents accepted by ``decode_latents``."""
        raise NotImplementedError

    def codebook_embeddings(self) -> Tensor:
        """(vocab_size, D): the latent vector of every token id (as the decoder sees it)."""
        raise NotImplementedError

    def tokens_from_indices(self, indices: Tensor) -> Tensor:
        """Quantizer indices -> the (B, seq_len[, token_each]) layout of ``encode``.

        Default: (B, h, w) maps in raster order -> (B, h*w).
        """
        return indices.reshape(indices.shape[0], -1)  # (B, h*w)

    # ----------------------------------------------------------------- concrete API
    def check_images(self, images: Any) -> None:
        """Raise a clear ``ValueError`` for input that is not a float (B, 3, H, W) batch in [-1, 1]."""
        if not isinstance(images, Tensor):
            raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 channels (RGB) in dim 1, got {images.shape[1]} "
                             f"(shape {tuple(images.shape)})")
        if not torch.is_floating_point(images):
            raise ValueError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype}")
        h, w = images.shape[-2:]
        f = self.downsample
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not a multiple of the tokenizer's downsample factor {f}")
        if images.numel():
            lo, hi = float(images.min()), float(images.max())
            if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
                raise ValueError(
                    f"images must be in [-1, 1] (got min {lo:.3g}, max {hi:.3g}); map [0, 1] images with x*2-1"
                )

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> LongTensor (B, seq_len) or (B, seq_len, token_each)."""
        self.check_images(images)
        q = self.quantize(self.encode_latents(images))
        return self.tokens_from_indices(q.indices).long()

    def decode(self, indices: Tensor) -> Tensor:
        """LongTensor from ``encode`` -> images (B, 3, H, W) in about [-1, 1]."""
        self.check_tokens(indices)
        return self.decode_latents(self.indices_to_quantized(indices))

    def check_tokens(self, indices: Tensor) -> None:
        """Raise ``ValueError`` if ``indices`` has the wrong dtype, layout or out-of-range ids."""
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"token indices must be an integer tensor, got {getattr(indices, 'dtype', type(indices))}")
        want = (self.seq_len,) if self.token_each == 1 else (self.seq_len, self.token_each)
        if tuple(indices.shape[1:]) != want:
            raise ValueError(f"token indices must have shape (B, {', '.join(map(str, want))}), "
                             f"got {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")

    def forward(self, images: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """Training forward: images -> (reconstruction, quantizer output)."""
        q = self.quantize(self.encode_latents(images))
        return self.decode_latents(q.quantized), q

    # ----------------------------------------------------------------- save / strict loading
    def _save_pretrained(self, save_directory) -> None:
        """safetensors weights (mixin) plus ``vtw_tokenizer.json`` naming the class for :func:`load_tokenizer`."""
        import json
        from pathlib import Path

        super()._save_pretrained(save_directory)
        meta = {"class": f"{type(self).__module__}.{type(self).__qualname__}", "vocab_size": self.vocab_size,
                "token_grid": list(self.token_grid), "seq_len": self.seq_len, "token_each": self.token_each}
        path = Path(save_directory) / TOKENIZER_META
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, path)

    @classmethod
    def _load_as_safetensor(cls, model, model_file: str, map_location: str, strict: bool):  # noqa: ARG003
        from safetensors.torch import load_file

        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"no weights file {model_file}")
        state = load_file(model_file, device=str(map_location))
        load_state_dict_strict(model, state, source=model_file)
        model.eval()
        return model

    @classmethod
    def _load_as_pickle(cls, model, model_file: str, map_location: str, strict: bool):  # noqa: ARG003
        state = torch.load(model_file, map_location=torch.device(map_location), weights_only=True)
        load_state_dict_strict(model, state, source=model_file)
        model.eval()
        return model
