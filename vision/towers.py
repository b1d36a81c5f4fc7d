"""Thin builders for pretrained vision (timm, open_clip) and text (open_clip) towers.

Towers are the frozen or fine-tuned encoders that tokenizers build on: SEED's frozen ViT and
CLIP text encoder (Ge et al., "Planting a SEED of Vision in Large Language Model", arXiv:2307.08041),
TokenFlow's semantic encoder and teacher (Qu et al., "TokenFlow: Unified Image Tokenizer for
Multimodal Understanding and Generation", arXiv:2412.03069). A tower is *not* a new model family:
this file only wraps ``timm.create_model`` and ``open_clip.create_model`` behind one interface and
one checkpoint loader.

``pretrained=`` accepts, for every builder:
  * ``None`` / ``False``: random initialisation (what CPU tests and tiny recipes use);
  * a local checkpoint path (``.safetensors``, ``.pt``, ``.pth``, ``.bin``): read with safetensors or
    ``torch.load(weights_only=True)`` and loaded strictly; a checkpoint of another architecture
    raises :class:`CheckpointMismatchError` naming the missing, unexpected and shape-mismatched keys;
  * a registry tag (timm: ``True`` or a tag such as ``"augreg_in21k"``; open_clip: a tag such as
    ``"laion2b_s34b_b79k"``): downloaded by the library. Offline (``HF_HUB_OFFLINE=1``) and not
    cached, this fails with a message that says how to pass a local file instead.

Uniform interface (:class:`VisionTower`): images in [-1, 1], shape (B, 3, H, W) with H = W =
``image_size``; ``forward`` returns ``TowerOutput(tokens (B, N, width), pooled (B, embed_dim))``
where N = grid_h * grid_w patch tokens (prefix tokens such as CLS dropped).

Saved tower checkpoints use the library's own key names (open_clip vision keys keep their
``visual.`` prefix), so a full open_clip CLIP checkpoint feeds both the vision and the text tower.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Tiny open_clip architectures registered with open_clip on first use (CPU tests and recipes).
OPEN_CLIP_TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "wb-clip-tiny-32": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 4, "head_width": 32},
        # vocab_size must stay 49408: open_clip's bundled BPE tokenizer works offline.
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "wb-clip-small-32": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "patch_size": 4, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
    },
}

# Named tower presets: ``library``, ``model_name`` and constructor overrides.
TOWER_PRESETS: dict[str, dict[str, Any]] = {
    # CPU: a 2-block ViT on 32x32 images, patch 4 -> 8x8 grid, width 64
    "timm-vit-tiny-32": dict(library="timm", model_name="vit_tiny_patch16_224",
                             kwargs=dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)),
    "timm-vit-small-32": dict(library="timm", model_name="vit_tiny_patch16_224",
                              kwargs=dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4)),
    # the workbench's evaluation classifier (vision.classifier preset "tiny"): point pretrained= at its
    # model.safetensors to use the trained classifier as a frozen tower / teacher
    "timm-vit-classifier-tiny": dict(library="classifier", model_name="tiny", kwargs={}),
    "clip-tiny-32": dict(library="open_clip", model_name="wb-clip-tiny-32", kwargs={}),
    "clip-small-32": dict(library="open_clip", model_name="wb-clip-small-32", kwargs={}),
    # GPU / paper scale (weights by tag or local path)
    "clip-vit-b-16": dict(library="open_clip", model_name="ViT-B-16", kwargs={}),
    "clip-vit-h-14": dict(library="open_clip", model_name="ViT-H-14", kwargs={}),
    "eva-vit-g-14": dict(library="timm", model_name="eva_giant_patch14_224", kwargs={}),
    "siglip-so400m-384": dict(library="timm", model_name="vit_so400m_patch14_siglip_384", kwargs={}),
}


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model it is loaded into."""


class TowerOutput(NamedTuple):
    tokens: torch.Tensor  # (B, N, width) patch tokens, raster order, prefix tokens dropped
    pooled: torch.Tensor  # (B, embed_dim) pooled / projected image embedding


# --------------------------------------------------------------------------------------------
# checkpoint files
# --------------------------------------------------------------------------------------------

def looks_like_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and (
        str(value).endswith(CHECKPOINT_SUFFIXES) or os.sep in str(value) or os.path.exists(str(value)))


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    Unwraps the usual containers (``state_dict``, ``model``, ``module``, ``ema``) and strips a
    ``module.`` prefix left by DistributedDataParallel.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for container in ("state_dict", "model", "module", "ema"):
        if isinstance(state, Mapping) and isinstance(state.get(container), Mapping) and not any(
                torch.is_tensor(v) for v in state.values()):
            state = state[container]
            break
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointMismatchError(f"{path}: entries that are not tensors: {bad[:10]}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` (safetensors for ``.safetensors``, else ``torch.save``) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp)
        else:
            torch.save(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint",
                     what: str | None = None, limit: int = 12) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state`` has exactly ``model``'s keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return

    def fmt(items: list[str]) -> str:
        if len(items) > limit:  # many keys: collapse each numbered block, e.g. "blocks.3.* (12)"
            groups: dict[str, list[str]] = {}
            for item in items:
                parts = item.split(":", 1)[0].split(".")
                numbered = [i for i, part in enumerate(parts) if part.isdigit()]
                prefix = ".".join(parts[:numbered[-1] + 1]) + ".*" if numbered else item
                groups.setdefault(prefix, []).append(item)
            items = [f"{prefix} ({len(members)})" if len(members) > 1 else members[0]
                     for prefix, members in groups.items()]
        more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {fmt(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {fmt(unexpected)}")
    if shapes:
        parts.append(f"shape-mismatched keys ({len(shapes)}): {fmt(shapes)}")
    target = what or type(model).__name__
    raise CheckpointMismatchError(
        f"{source} does not match the architecture of {target} "
        f"({len(expected)} model keys, {len(state)} checkpoint keys): " + "; ".join(parts))


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint",
                            what: str | None = None) -> None:
    check_state_dict(model, state, source, what)
    model.load_state_dict(state, strict=True)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _download_error(library: str, name: str, tag: Any, err: BaseException) -> RuntimeError:
    hint = ("HF_HUB_OFFLINE=1 is set and the weights are not in the local cache; " if _offline()
            else "the download failed; ")
    return RuntimeError(
        f"could not load pretrained {library} weights {tag!r} for {name!r}: {hint}download the "
        f"checkpoint on a connected machine and pass its local path as pretrained='/path/to/file.safetensors' "
        f"(original error: {type(err).__name__}: {err})")


# --------------------------------------------------------------------------------------------
# towers
# --------------------------------------------------------------------------------------------

class VisionTower(nn.Module):
    """A ViT image encoder seen through one interface (see module docstring).

    ``self.model`` is the library's own module, so its ``state_dict`` uses the library's key names.
    """

    library = ""

    def __init__(self, model: nn.Module, *, name: str, image_size: int, patch_size: int, width: int,
                 embed_dim: int, mean: Sequence[float], std: Sequence[float], key_prefix: str = "") -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.width = int(width)
        self.embed_dim = int(embed_dim)
        self.key_prefix = key_prefix
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def grid_size(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def check_images(self, images: torch.Tensor, arg: str = "images") -> None:
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"{arg}: expected a float tensor (B, 3, H, W) in [-1, 1], got {shape}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"{arg}: vision tower {self.name!r} expects {self.image_size}x{self.image_size} images, "
                f"got {images.shape[-2]}x{images.shape[-1]}; resize the data (e.g. data.image_size="
                f"{self.image_size}) or pick a tower built for this resolution")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> the tower's (mean, std) normalisation."""
        x = (images.float() + 1.0) * 0.5
        return (x - self.mean) / self.std

    def _forward(self, x: torch.Tensor) -> TowerOutput:  # x normalised
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> TowerOutput:
        self.check_images(images)
        return self._forward(self.normalize(images))

    # checkpoints ---------------------------------------------------------------------------
    def tower_state_dict(self) -> dict[str, torch.Tensor]:
        """The library model's weights under the library's key names (what :meth:`load` reads)."""
        return {self.key_prefix + k: v for k, v in self.model.state_dict().items()}

    def save(self, path: str | os.PathLike) -> Path:
        return save_state_dict(self.tower_state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        state = read_state_dict(path)
        self.load_tower_state(state, source=str(path))

    def load_tower_state(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        if self.key_prefix:
            ours = {k[len(self.key_prefix):]: v for k, v in state.items() if k.startswith(self.key_prefix)}
            if not ours:
                sample = list(state)[:8]
                raise CheckpointMismatchError(
                    f"{source} has no '{self.key_prefix}*' keys for the vision tower {self.name!r} "
                    f"(first keys: {sample}); is this a {self.library} checkpoint of this architecture?")
            state = ours
        load_state_dict_checked(self.model, state, source, what=f"{self.library} tower {self.name!r}")


class TimmVisionTower(VisionTower):
    library = "timm"

    def __init__(self, model: nn.Module, name: str) -> None:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        pe = model.patch_embed
        img = pe.img_size if isinstance(pe.img_size, (tuple, list)) else (pe.img_size, pe.img_size)
        grid = getattr(pe, "grid_size", None)  # hybrid (conv-stem) embeddings report patch_size 1
        patch = img[0] // grid[0] if grid else pe.patch_size[0]
        super().__init__(model, name=name, image_size=img[0], patch_size=patch, width=model.embed_dim,
                         embed_dim=model.num_features, mean=cfg.get("mean", (0.5, 0.5, 0.5)),
                         std=cfg.get("std", (0.5, 0.5, 0.5)))

    def _forward(self, x: torch.Tensor) -> TowerOutput:
        feats = self.model.forward_features(x)  # (B, P + N, W)
        pooled = self.model.forward_head(feats, pre_logits=True)  # (B, W)
        tokens = feats[:, getattr(self.model, "num_prefix_tokens", 1):]  # (B, N, W)
        return TowerOutput(tokens, pooled)


class OpenClipVisionTower(VisionTower):
    library = "open_clip"

    def __init__(self, visual: nn.Module, name: str) -> None:
        mean = getattr(visual, "image_mean", None) or OPENAI_MEAN
        std = getattr(visual, "image_std", None) or OPENAI_STD
        super().__init__(visual, name=name, image_size=visual.image_size[0], patch_size=visual.patch_size[0],
                         width=visual.transformer.width, embed_dim=visual.output_dim, mean=mean, std=std,
                         key_prefix="visual.")
        visual.output_tokens = True

    def _forward(self, x: torch.Tensor) -> TowerOutput:
        pooled, tokens = self.model(x)  # (B, E), (B, N, W)
        return TowerOutput(tokens, pooled)


class OpenClipTextTower(nn.Module):
    """open_clip's text encoder: ``forward(list[str] | LongTensor (B, L)) -> (B, embed_dim)``.

    Holds the CLIP model with its vision tower removed; weights keep open_clip key names
    (everything but ``visual.*``), so a full CLIP checkpoint loads into it.
    """

    library = "open_clip"

    def __init__(self, clip: nn.Module, name: str) -> None:
        super().__init__()
        clip.visual = nn.Identity()  # not needed for text; keeps the state dict text-only
        self.model = clip
        self.name = name
        import open_clip

        self.tokenizer = open_clip.get_tokenizer(name)
        self.context_length = int(getattr(clip, "context_length", 77))
        proj = getattr(clip, "text_projection", None)
        if isinstance(proj, nn.Linear):
            self.embed_dim = proj.out_features
        elif torch.is_tensor(proj):
            self.embed_dim = proj.shape[1]
        else:
            self.embed_dim = int(getattr(getattr(clip, "text", None), "output_dim", 0))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts: expected a list of strings (one caption per image)")
        return self.tokenizer(list(texts), context_length=self.context_length)  # (B, L) long

    def forward(self, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        tokens = texts if torch.is_tensor(texts) else self.tokenize(texts)
        return self.model.encode_text(tokens.to(self._device()))  # (B, E)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def tower_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def save(self, path: str | os.PathLike) -> Path:
        return save_state_dict(self.tower_state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        self.load_tower_state(read_state_dict(path), source=str(path))

    def load_tower_state(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        ours = {k: v for k, v in state.items() if not k.startswith("visual.")}
        load_state_dict_checked(self.model, ours, source, what=f"open_clip text tower {self.name!r}")


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------

def _register_tiny_open_clip(model_name: str) -> None:
    if model_name not in OPEN_CLIP_TINY_CONFIGS:
        return
    import open_clip

    if model_name in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / f"{model_name}.json"
        cfg_path.write_text(json.dumps(OPEN_CLIP_TINY_CONFIGS[model_name]))
        open_clip.add_model_config(cfg_path)


def _split_pretrained(pretrained: Any) -> tuple[str | None, Any]:
    """-> (local path or None, registry tag or None). Validates paths before any model is built."""
    if pretrained is None or pretrained is False or pretrained == "":
        return None, None
    if looks_like_path(pretrained):
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
        return str(path), None
    return None, pretrained


def build_timm_tower(model_name: str, pretrained: Any = None, **kwargs: Any) -> TimmVisionTower:
    """A timm ViT as a :class:`VisionTower` (``num_classes=0``; ``kwargs`` override the architecture)."""
    import timm

    path, tag = _split_pretrained(pretrained)
    kwargs = {"num_classes": 0, **kwargs}
    if tag is None:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    else:
        full = model_name if tag is True else f"{model_name.split('.')[0]}.{tag}"
        if not timm.list_pretrained(full):
            known = timm.list_pretrained(model_name.split(".")[0] + "*")
            raise ValueError(f"pretrained={tag!r}: timm has no pretrained weights {full!r}; known: {known[:20]}")
        try:
            model = timm.create_model(full, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as err:
            raise _download_error("timm", model_name, tag, err) from err
    tower = TimmVisionTower(model, name=model_name)
    if path is not None:
        state = read_state_dict(path)
        head = [k for k in state if k.startswith(("head.", "fc_norm.")) and k not in tower.model.state_dict()]
        if head and getattr(model, "num_classes", 0) == 0:
            # a classifier checkpoint loaded as a feature tower: the head is not part of the tower
            log.info("%s: dropping classifier keys not used by the tower: %s", path, head)
            state = {k: v for k, v in state.items() if k not in head}
        tower.load_tower_state(state, source=str(path))
    return tower


def _create_open_clip(model_name: str, pretrained: Any, **kwargs: Any) -> tuple[nn.Module, str | None]:
    import open_clip

    _register_tiny_open_clip(model_name)
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; known: {open_clip.list_models()[:30]} ...")
    path, tag = _split_pretrained(pretrained)
    if tag is not None:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if tag not in tags:
            raise ValueError(f"pretrained={tag!r}: open_clip has no tag {tag!r} for {model_name!r}; known: {tags}")
        try:
            model = open_clip.create_model(model_name, pretrained=tag, **kwargs)
        except (OSError, RuntimeError) as err:
            raise _download_error("open_clip", model_name, tag, err) from err
    else:
        model = open_clip.create_model(model_name, pretrained=None, **kwargs)
    return model, path


def build_open_clip_vision_tower(model_name: str, pretrained: Any = None, **kwargs: Any) -> OpenClipVisionTower:
    clip, path = _create_open_clip(model_name, pretrained, **kwargs)
    tower = OpenClipVisionTower(clip.visual, name=model_name)
    if path is not None:
        tower.load(path)
    return tower


def build_open_clip_text_tower(model_name: str, pretrained: Any = None, **kwargs: Any) -> OpenClipTextTower:
    clip, path = _create_open_clip(model_name, pretrained, **kwargs)
    tower = OpenClipTextTower(clip, name=model_name)
    if path is not None:
        tower.load(path)
    return tower


def resolve_tower_spec(name: str) -> tuple[str, str, dict[str, Any]]:
    """``name`` is a preset of :data:`TOWER_PRESETS`, ``timm:<model>`` or ``open_clip:<model>``."""
    if name in TOWER_PRESETS:
        p = TOWER_PRESETS[name]
        return p["library"], p["model_name"], dict(p["kwargs"])
    if ":" in name:
        library, model_name = name.split(":", 1)
        if library in ("timm", "open_clip", "classifier"):
            return library, model_name, {}
    raise ValueError(f"unknown vision tower {name!r}: use a preset {sorted(TOWER_PRESETS)}, "
                     f"'timm:<model name>' or 'open_clip:<model name>'")


def build_vision_tower(name: str, pretrained: Any = None, **kwargs: Any) -> VisionTower:
    """Build a vision tower from a preset or ``library:model`` name; see the module docstring."""
    library, model_name, preset_kwargs = resolve_tower_spec(name)
    kwargs = {**preset_kwargs, **kwargs}
    if library == "timm":
        return build_timm_tower(model_name, pretrained, **kwargs)
    if library == "classifier":
        return build_classifier_tower(model_name, pretrained, **kwargs)
    return build_open_clip_vision_tower(model_name, pretrained, **kwargs)


def build_classifier_tower(preset: str = "tiny", pretrained: Any = None, **overrides: Any) -> TimmVisionTower:
    """The workbench's evaluation classifier ViT (``vision.classifier``, a timm ViT) as a feature tower;
    ``pretrained`` may be its ``model.safetensors`` (the 30-way head is dropped)."""
    from vision.classifier import build_vit, classifier_config

    path, tag = _split_pretrained(pretrained)
    if tag is not None:
        raise ValueError(f"pretrained={tag!r}: the classifier tower takes a local checkpoint path or None")
    tower = TimmVisionTower(build_vit(classifier_config(preset, num_classes=0, **overrides)), name=f"classifier-{preset}")
    if path is not None:
        state = read_state_dict(path)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        tower.load_tower_state(state, source=str(path))
    return tower


def build_text_tower(name: str, pretrained: Any = None, **kwargs: Any) -> OpenClipTextTower:
    """Build an open_clip text tower from a preset or ``open_clip:<model>`` name."""
    library, model_name, preset_kwargs = resolve_tower_spec(name)
    if library != "open_clip":
        raise ValueError(f"text tower {name!r}: only open_clip models have a text tower")
    return build_open_clip_text_tower(model_name, pretrained, **{**preset_kwargs, **kwargs})


def freeze(module: nn.Module) -> nn.Module:
    """Freeze all parameters and put the module in eval mode (returns it)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()
