"""Tokenizer training losses: PatchGAN discriminator, hinge GAN loss, adaptive GAN weight, LPIPS.

* PatchGAN ``NLayerDiscriminator``: Isola et al. "pix2pix" (arXiv 1611.07004) as used by taming
  (arXiv 2012.09841) and LlamaGen: conv4 s2 + LeakyReLU(0.2), then (n_layers - 1) x [conv4 s2, BN,
  LeakyReLU], conv4 s1, BN, LeakyReLU, conv4 s1 -> 1 logit per patch; weights N(0, 0.02).
* Hinge loss: L_D = 0.5 [mean relu(1 - D(x)) + mean relu(1 + D(x_hat))], L_G = -mean D(x_hat).
* Adaptive weight (taming Eq. 7): lambda = ||grad_{last} L_rec|| / (||grad_{last} L_G|| + 1e-4), clamped to
  [0, 1e4] (times ``disc_weight``). LlamaGen leaves it off; ELM's BAE uses it (capped at 1).
* LPIPS (Zhang et al. 2018, arXiv 1801.03924) through torchmetrics' bundled linear heads on torchvision's
  ImageNet VGG16. The VGG16 weights cannot be downloaded offline: when the file is not in the local torch
  hub cache the perceptual loss is switched off with one warning (:func:`build_lpips` returns None).
* Image-gradient loss (not in LlamaGen or ELM; the workbench's offline stand-in for an edge-sensitive
  perceptual term): L_grad = MSE(d_x x_hat, d_x x) + MSE(d_y x_hat, d_y x) over horizontal and vertical
  finite differences. Plain pixel L2 on small training budgets blurs the outline of small objects; this
  term penalises exactly that (32x32 shapes, 800 batches: weight 4 lifts the shapes classifier's accuracy
  on reconstructions from 57.9% to 84.3%; ``benchmarks/bench_demo_tokenizer.py``).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NLayerDiscriminator", "hinge_d_loss", "hinge_g_loss", "adaptive_gan_weight", "build_lpips",
           "lpips_weights_available", "image_gradient_loss"]


class NLayerDiscriminator(nn.Module):
    """PatchGAN: (B, 3, H, W) -> (B, 1, H', W') patch logits."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                   nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()


def image_gradient_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """MSE between the horizontal and between the vertical finite differences of ``x_hat`` and ``x`` (B, C, H, W).

    Zero when ``x_hat - x`` is constant over each image plane; computed in fp32.
    """
    x, x_hat = x.float(), x_hat.float()
    dx_real, dx_fake = x[..., :, 1:] - x[..., :, :-1], x_hat[..., :, 1:] - x_hat[..., :, :-1]  # (B, C, H, W-1)
    dy_real, dy_fake = x[..., 1:, :] - x[..., :-1, :], x_hat[..., 1:, :] - x_hat[..., :-1, :]  # (B, C, H-1, W)
    return F.mse_loss(dx_fake, dx_real) + F.mse_loss(dy_fake, dy_real)


def adaptive_gan_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """taming's lambda = ||d rec / d last|| / (||d g / d last|| + 1e-4), clamped to [0, max_weight], detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


_LPIPS_WARNED = False


def _vgg16_weights_file() -> str:
    from torchvision.models import VGG16_Weights

    name = os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def lpips_weights_available() -> bool:
    """True if torchvision's VGG16 ImageNet weights are in the local torch hub cache."""
    try:
        return os.path.isfile(_vgg16_weights_file())
    except ImportError:
        return False


def build_lpips(enabled: bool = True) -> nn.Module | None:
    """Frozen LPIPS-VGG (inputs in [-1, 1], returns (B,) distances) or None, with one warning if unavailable."""
    global _LPIPS_WARNED
    if not enabled:
        return None
    if not lpips_weights_available():
        if not _LPIPS_WARNED:
            warnings.warn(
                f"LPIPS perceptual loss switched OFF: VGG16 ImageNet weights not found at {_vgg16_weights_file()} "
                "(no network). Copy vgg16-397923af.pth there to enable it; training continues with pixel + GAN losses.",
                stacklevel=2,
            )
            _LPIPS_WARNED = True
        return None
    from torchmetrics.functional.image.lpips import _LPIPS

    net = _LPIPS(pretrained=True, net="vgg", pnet_tune=False).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
