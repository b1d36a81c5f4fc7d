"""Small image helpers shared by the data pipelines (no other workbench package imported).

Convention for every image the workbench hands to a model: ``float32`` tensor of shape
``(3, H, W)`` with values in ``[-1, 1]`` (``uint8`` value ``v`` maps to ``v / 127.5 - 1``).

- :func:`uint8_to_tensor` / :func:`tensor_to_uint8`: the two directions of that convention.
- :func:`to_rgb`: any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) to RGB; transparency is composited
  over white rather than dropped (dropping alpha turns transparent pixels black or garbage).
- :class:`ImageTransform`: resize (shorter side) -> center/random crop -> optional horizontal flip
  -> tensor, implemented with PIL so a JPEG can be decoded at reduced scale (``Image.draft``).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["ImageTransform", "tensor_to_uint8", "to_rgb", "uint8_to_tensor"]


def uint8_to_tensor(array: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 array -> ``(3, H, W)`` float32 tensor in ``[-1, 1]``."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {array.shape} {array.dtype}")
    if not (array.flags.writeable and array.flags.c_contiguous):  # e.g. np.asarray(PIL image) is read-only
        array = np.array(array, order="C")
    tensor = torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W)
    return tensor.float().div_(127.5).sub_(1.0)


def tensor_to_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` (or ``(B, 3, H, W)``) tensor in ``[-1, 1]`` -> ``(..., H, W, 3)`` uint8 array."""
    image = image.detach().float().cpu()
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.movedim(-3, -1).numpy()  # (..., H, W, 3)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL image to mode RGB.

    - ``L``/``1``/``CMYK``/``YCbCr``/palette without transparency: PIL's ``convert("RGB")``
      (CMYK uses PIL's naive inversion; embedded ICC profiles are ignored).
    - ``RGBA``/``LA``/``PA``/palette or ``L``/``RGB`` with a ``transparency`` key: composited over
      ``background``.
    - 16/32-bit integer and float greyscale (``I;16``, ``I``, ``F``): rescaled to 8 bit first, because
      ``convert`` clips instead of rescaling.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image).astype(np.float32)
        if mode == "F":  # floats: assume [0, 1] if they fit, else min-max
            lo, hi = float(array.min()), float(array.max())
            scale = 1.0 if (lo >= 0 and hi <= 1) else None
            array = array if scale else (array - lo) / max(hi - lo, 1e-12)
            array = array * 255.0
        else:  # 16-bit range (the common case for TIFF/PNG greyscale)
            array = array / 257.0
        image = Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), mode="L")
        return image.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


class ImageTransform:
    """PIL image -> ``(3, S, S)`` float tensor in ``[-1, 1]``.

    Steps: EXIF orientation -> RGB -> resize so the shorter side is ``round(image_size / crop_pct)``
    (bicubic, PIL's antialiasing resize) -> crop ``image_size`` (center, or random when
    ``random_crop``) -> horizontal flip with probability ``hflip`` -> tensor.

    ``crop_pct=0.875`` is the classic ImageNet evaluation recipe (resize 256, crop 224).
    Randomness uses ``torch``'s global generator, which DataLoader seeds differently per worker.
    """

    def __init__(self, image_size: int, crop_pct: float = 1.0, random_crop: bool = False,
                 hflip: float = 0.0) -> None:
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.random_crop = random_crop
        self.hflip = hflip
        self.resize_size = max(image_size, round(image_size / crop_pct))

    def __repr__(self) -> str:
        return (f"ImageTransform(image_size={self.image_size}, crop_pct={self.crop_pct}, "
                f"random_crop={self.random_crop}, hflip={self.hflip})")

    def prepare(self, image: Image.Image) -> None:
        """Call before ``image.load()``: lets JPEG decode at 1/2, 1/4 or 1/8 scale when that still
        leaves the shorter side >= the resize target (a large speed-up on ImageNet-sized files)."""
        if image.format == "JPEG":
            image.draft("RGB", (self.resize_size, self.resize_size))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(ImageOps.exif_transpose(image))
        w, h = image.size
        scale = self.resize_size / min(w, h)
        new_w, new_h = max(self.resize_size, round(w * scale)), max(self.resize_size, round(h * scale))
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
        s = self.image_size
        if self.random_crop:
            left = int(torch.randint(0, new_w - s + 1, ()).item())
            top = int(torch.randint(0, new_h - s + 1, ()).item())
        else:
            left, top = (new_w - s) // 2, (new_h - s) // 2
        image = image.crop((left, top, left + s, top + s))
        array = np.asarray(image, dtype=np.uint8)  # (S, S, 3)
        if self.hflip > 0 and float(torch.rand(())) < self.hflip:
            array = array[:, ::-1]
        return uint8_to_tensor(array)
