"""Quality metrics for generated images: classifier class consistency, Frechet distance, Inception FID/IS.

* Class consistency: the fraction of generated images that a fixed classifier assigns to the class they
  were generated for (the workbench's shapes ViT, ``vision.classifier``).
* Frechet distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule", arXiv 1706.08500):
  ``FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})`` between Gaussian fits of
  two feature sets; with the shapes classifier's pre-logit features it is the embedded default, with
  Inception-v3 pool features it is the standard FID.
* Inception FID / IS via torchmetrics (needs ``torch-fidelity`` and the Inception weights file locally;
  :func:`inception_metrics` says what is missing instead of downloading).

Images are float tensors (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features -> mean (D,), covariance (D, D) in float64 (unbiased, N-1)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got {tuple(features.shape)}")
    f = features.double()
    mu = f.mean(0)
    return mu, torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits of two (N, D) feature sets (float64, symmetric PSD sqrt)."""
    mu_a, s_a = gaussian_stats(feats_a)
    mu_b, s_b = gaussian_stats(feats_b)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    fd = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross.trace()
    return float(fd.clamp(min=0))


@torch.no_grad()
def classifier_outputs(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 256
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, 3, H, W) in [-1, 1] -> (logits (N, C), pre-logit features (N, D)) of a timm ViT."""
    net.eval()
    device = next(net.parameters()).device
    logits, feats = [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device).float()
        f = net.forward_features(x)
        feats.append(net.forward_head(f, pre_logits=True).float().cpu())
        logits.append(net.forward_head(f).float().cpu())
    return torch.cat(logits), torch.cat(feats)


def class_consistency(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy of ``logits`` against requested ``labels`` and the per-class accuracy (C,) (nan if absent)."""
    pred = logits.argmax(-1)
    correct = (pred == labels).float()
    n_cls = logits.shape[-1]
    per = torch.full((n_cls,), float("nan"))
    for c in labels.unique().tolist():
        per[c] = correct[labels == c].mean()
    return float(correct.mean()), per


def find_inception_weights(path: str | os.PathLike | None = None) -> Path | None:
    """The FID Inception weights file: ``path`` if given, else torch hub's checkpoints folder, else None."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"--inception-weights {p} does not exist")
        return p
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME
    return hub if hub.is_file() else None


def inception_metrics(fake: torch.Tensor, real: torch.Tensor, weights: str | os.PathLike | None = None,
                      batch_size: int = 64) -> dict[str, float | str]:
    """Inception FID and IS (torchmetrics) or ``{"inception": "<why not computed>"}``; never downloads."""
    try:
        import torch_fidelity  # noqa: F401
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
    except ImportError as err:
        return {"inception": f"not computed: torchmetrics' Inception metrics need torch-fidelity "
                             f"(pip install torch-fidelity) ({err})"}
    w = find_inception_weights(weights)
    if w is None:
        return {"inception": f"not computed: no Inception weights found (put {INCEPTION_WEIGHTS_NAME} in "
                             f"{Path(torch.hub.get_dir()) / 'checkpoints'} or pass --inception-weights)"}
    fid = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(w))
    isc = InceptionScore(normalize=True, feature_extractor_weights_path=str(w))
    for imgs, is_real in ((real, True), (fake, False)):
        for i in range(0, imgs.shape[0], batch_size):
            x = ((imgs[i:i + batch_size].float() + 1) / 2).clamp(0, 1)
            fid.update(x, real=is_real)
            if not is_real:
                isc.update(x)
    is_mean, is_std = isc.compute()
    return {"inception_fid": float(fid.compute()), "inception_is": float(is_mean), "inception_is_std": float(is_std)}
