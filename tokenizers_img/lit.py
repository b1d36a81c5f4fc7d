"""Lightning training of image tokenizers (VQGAN, BAE): generator + PatchGAN discriminator.

Manual optimization with two optimizers (Adam, LlamaGen defaults lr 1e-4, betas (0.9, 0.95), grad clip
1.0). Generator loss (LlamaGen ``vq_loss.py`` / ELM ``BinaryGAN.train_iter``)::

    L_G = w_rec * {L1 | L2}(x, x_hat) + w_grad * L_grad(x, x_hat) + w_p * LPIPS(x, x_hat) + w_q * L_quant
          + [step >= disc_start] * w_d * lambda * hinge_G(D(x_hat))

with lambda = 1 (LlamaGen) or taming's adaptive weight (``disc_adaptive=True``, ELM). ``L_grad``
(``grad_weight``, default 0 as in LlamaGen) is the image-gradient loss of
:func:`tokenizers_img.losses.image_gradient_loss`; the demo's VQGAN stage uses 4. The discriminator
step uses hinge_D on (x, sg x_hat) with the same gate. Validation logs ``val/loss`` (pixel + gradient +
quantizer + perceptual loss), ``val/psnr`` and ``val/ssim`` (torchmetrics, images mapped to [0, 1]),
codebook usage over the whole validation set, and writes a reconstruction grid PNG (originals above,
reconstructions below) every validation. At the end of ``fit`` the tokenizer is saved with
``save_pretrained`` to ``<default_root_dir>/tokenizer``.

``optimizer="muon"`` trains the hidden conv filters of the encoder and decoder with Muon
(:class:`vision.optim.MuonAdamW`, each filter orthogonalised as its (out, in*kh*kw) matrix, at
``muon_lr_scale * lr``) and keeps Adam for the first and last convolutions, the quantizer side (codebook,
``quant_conv``, ``post_quant_conv``), norms and biases, following Muon's recipe for input/output layers.

Note: ``trainer.max_steps`` counts optimizer steps; once the discriminator is on, one batch takes two
(Lightning counts both optimizers). ``disc_start`` and the schedules count *batches*.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor

from tokenizers_img.base import ImageTokenizer
from tokenizers_img.losses import (
    NLayerDiscriminator,
    adaptive_gan_weight,
    build_lpips,
    hinge_d_loss,
    hinge_g_loss,
    image_gradient_loss,
)

__all__ = ["TokenizerModule", "build_tokenizer", "save_image_grid", "image_metrics", "load_any_tokenizer",
           "evaluate_reconstruction"]


def build_tokenizer(kind: str, preset: str, overrides: dict[str, Any] | None = None) -> ImageTokenizer:
    """``kind`` in {"vqgan", "bae"}; ``preset`` a name of that family's preset registry."""
    overrides = dict(overrides or {})
    if kind == "vqgan":
        from tokenizers_img.vqgan import VQGAN

        return VQGAN.from_preset(preset, **overrides)
    if kind == "bae":
        from tokenizers_img.bae import BinaryAutoencoder

        split = overrides.pop("split", None)
        return BinaryAutoencoder.from_preset(preset, split=split, **overrides)
    raise ValueError(f"unknown tokenizer kind {kind!r}; known: 'vqgan', 'bae'")


def to_unit(x: Tensor) -> Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def image_metrics(x: Tensor, x_hat: Tensor) -> dict[str, Tensor]:
    """PSNR (dB) and SSIM of images in [-1, 1], computed on [0, 1] (data_range 1), batch means."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = to_unit(x_hat), to_unit(x)
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean()
    ssim = structural_similarity_index_measure(a, b, data_range=1.0)
    return {"psnr": psnr, "ssim": ssim}


@torch.no_grad()
def evaluate_reconstruction(tokenizer: ImageTokenizer, images: Tensor, batch_size: int = 250) -> dict[str, float]:
    """Eval-mode PSNR/SSIM of ``decode(encode(x))`` over ``images`` (N, 3, H, W) in [-1, 1], plus codebook
    usage (fraction of the vocabulary used over all images) and perplexity / vocab_size."""
    was_training = tokenizer.training
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    psnr, ssim, n = 0.0, 0.0, 0
    hist = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device)
        tokens = tokenizer.encode(x)
        x_hat = tokenizer.decode(tokens)
        m = image_metrics(x, x_hat)
        psnr += float(m["psnr"]) * x.shape[0]
        ssim += float(m["ssim"]) * x.shape[0]
        n += x.shape[0]
        hist += torch.bincount(tokens.reshape(-1).cpu(), minlength=tokenizer.vocab_size)
    tokenizer.train(was_training)
    p = hist.float() / hist.sum().clamp_min(1)
    perplexity = float(torch.exp(-(p * p.clamp_min(1e-10).log()).sum()))
    return {"psnr": psnr / max(n, 1), "ssim": ssim / max(n, 1), "usage": float((hist > 0).float().mean()),
            "perplexity": perplexity, "num_images": n}


def save_image_grid(x: Tensor, x_hat: Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """PNG with originals in the top row(s) and reconstructions below (atomic write)."""
    from torchvision.utils import save_image

    n = x.shape[0]
    nrow = nrow or n
    grid = torch.cat([to_unit(x), to_unit(x_hat)]).cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    save_image(grid, tmp, nrow=nrow, padding=1, pad_value=1.0)
    os.replace(tmp, path)
    return path


def muon_split(tokenizer: torch.nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(hidden conv filters for Muon, everything else for Adam): the >= 2-D weights under ``encoder.`` and
    ``decoder.`` except the image-side ``encoder.conv_in`` and ``decoder.conv_out``."""
    hidden, rest = [], []
    for name, p in tokenizer.named_parameters():
        inner = name.startswith(("encoder.", "decoder.")) and p.dim() >= 2
        edge = name in ("encoder.conv_in.weight", "decoder.conv_out.weight")
        (hidden if inner and not edge else rest).append(p)
    return hidden, rest


class TokenizerModule(LightningModule):
    """Trains one tokenizer (``kind``/``preset``/``overrides``) with an optional PatchGAN discriminator."""

    def __init__(
        self,
        kind: str = "vqgan",
        preset: str = "tiny",
        overrides: dict[str, Any] | None = None,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",  # "constant" | "cosine" (to min_lr_ratio * lr at trainer.max_steps)
        min_lr_ratio: float = 0.1,
        rec_loss: str = "l2",  # LlamaGen: l2; ELM: l1
        rec_weight: float = 1.0,
        grad_weight: float = 0.0,  # image-gradient (edge) loss; not in LlamaGen / ELM
        perceptual_weight: float = 1.0,  # LPIPS; switched off with a warning when weights are absent
        quant_weight: float = 1.0,
        disc_start: int = 20000,  # batches before the GAN losses switch on (LlamaGen 20000)
        disc_weight: float = 0.5,
        disc_adaptive: bool = False,
        disc_ndf: int = 64,
        disc_layers: int = 3,
        disc_lr: float | None = None,
        grad_clip: float = 1.0,
        num_recon_images: int = 8,
        recon_dir: str | None = None,  # default: <default_root_dir>/recon
        export_dir: str | None = None,  # default: <default_root_dir>/tokenizer
        time_budget_s: float | None = None,  # cosine schedule also advances with elapsed / budget (wall clock)
        optimizer: str = "adam",  # "adam" | "muon" (hidden conv filters with Muon, the rest with Adam)
        muon_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if optimizer not in ("adam", "muon"):
            raise ValueError(f"optimizer must be 'adam' or 'muon', got {optimizer!r}")
        self.tokenizer = build_tokenizer(kind, preset, overrides)
        self.discriminator = NLayerDiscriminator(3, disc_ndf, disc_layers) if disc_weight > 0 else None
        self.lpips = build_lpips(perceptual_weight > 0)
        if self.lpips is not None:
            self.lpips.requires_grad_(False)
        self._val_hist: Tensor | None = None
        self._val_grid_done = False
        self._t_start: float | None = None
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))

    def on_train_start(self) -> None:
        import time

        self._t_start = time.monotonic()

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "muon":
            from vision.optim import MuonAdamW

            hidden, rest = muon_split(self.tokenizer)
            bf16 = self._trainer is not None and "bf16" in str(self.trainer.precision)
            opt_g = MuonAdamW([{"params": hidden, "muon": True, "lr": hp.lr * hp.muon_lr_scale},
                               {"params": rest}], lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay,
                              ns_dtype=torch.bfloat16 if bf16 else torch.float32)
        else:
            opt_g = torch.optim.Adam(self.tokenizer.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                     weight_decay=hp.weight_decay)
        sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, self._lr_factor)
        if self.discriminator is None:
            return [opt_g], [sched_g]
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=hp.disc_lr or hp.lr, betas=tuple(hp.betas))
        return [opt_g, opt_d], [sched_g]

    def _total_batches(self) -> int:
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        return max(1, max_steps) if max_steps and max_steps > 0 else 10**9

    def _lr_factor(self, step: int) -> float:
        hp = self.hparams
        if hp.warmup_steps and step < hp.warmup_steps:
            return (step + 1) / hp.warmup_steps
        if hp.lr_schedule == "cosine":
            total = self._total_batches()
            t = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            if hp.time_budget_s and self._t_start is not None:
                import time

                t = max(t, min(1.0, (time.monotonic() - self._t_start) / hp.time_budget_s))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    @property
    def batch_step(self) -> int:
        """Training batches done so far (unlike global_step, not doubled by the discriminator's optimizer).

        Kept in a buffer, so it is saved in checkpoints and resumes correctly."""
        return int(self.batches_seen)

    # ------------------------------------------------------------------ losses
    def _rec_loss(self, x: Tensor, x_hat: Tensor) -> Tensor:
        if self.hparams.rec_loss == "l1":
            return F.l1_loss(x_hat.float(), x.float())
        return F.mse_loss(x_hat.float(), x.float())

    def _grad_loss(self, x: Tensor, x_hat: Tensor) -> Tensor:
        if not self.hparams.grad_weight:
            return x.new_zeros((), dtype=torch.float32)
        return image_gradient_loss(x, x_hat)

    def _perceptual(self, x: Tensor, x_hat: Tensor) -> Tensor:
        if self.lpips is None:
            return x.new_zeros((), dtype=torch.float32)
        return self.lpips(x_hat.float(), x.float()).mean()

    def _gan_active(self) -> bool:
        return self.discriminator is not None and self.batch_step >= self.hparams.disc_start

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        hp = self.hparams
        x = batch["image"]
        opts = self.optimizers()
        opts = list(opts) if isinstance(opts, (list, tuple)) else [opts]
        opt_g, opt_d = opts[0], (opts[1] if len(opts) > 1 else None)
        x_hat, q = self.tokenizer(x)
        rec = self._rec_loss(x, x_hat)
        perc = self._perceptual(x, x_hat)
        grad = self._grad_loss(x, x_hat)
        nll = hp.rec_weight * rec + hp.grad_weight * grad + hp.perceptual_weight * perc
        loss_g = nll + hp.quant_weight * q.loss
        gan_on = self._gan_active()
        if gan_on:
            g_loss = hinge_g_loss(self.discriminator(x_hat))
            if hp.disc_adaptive and torch.is_grad_enabled():
                weight = adaptive_gan_weight(nll, g_loss, self.tokenizer.last_layer, max_weight=1.0)
            else:
                weight = torch.ones((), device=x.device)
            loss_g = loss_g + hp.disc_weight * weight * g_loss
            self.log("train/g_loss", g_loss.detach(), prog_bar=False, batch_size=x.shape[0])
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        if hp.grad_clip:
            self.clip_gradients(opt_g, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        sch = self.lr_schedulers()
        if sch is not None:
            (sch[0] if isinstance(sch, list) else sch).step()

        if gan_on and opt_d is not None:
            logits_real = self.discriminator(x.detach())
            logits_fake = self.discriminator(x_hat.detach())
            d_loss = hp.disc_weight * hinge_d_loss(logits_real, logits_fake)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            if hp.grad_clip:
                self.clip_gradients(opt_d, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
            opt_d.step()
            self.log("train/d_loss", d_loss.detach(), batch_size=x.shape[0])
            self.log("train/logits_real", logits_real.detach().mean(), batch_size=x.shape[0])
            self.log("train/logits_fake", logits_fake.detach().mean(), batch_size=x.shape[0])

        self.batches_seen += 1
        self.log("train/loss", loss_g.detach(), prog_bar=True, batch_size=x.shape[0])
        self.log("train/rec_loss", rec.detach(), batch_size=x.shape[0])
        if hp.grad_weight:
            self.log("train/grad_loss", grad.detach(), batch_size=x.shape[0])
        self.log("train/quant_loss", q.loss.detach(), batch_size=x.shape[0])
        if self.lpips is not None:
            self.log("train/lpips", perc.detach(), batch_size=x.shape[0])
        for k, v in q.stats.items():
            self.log(f"train/{k}", v, prog_bar=k == "usage", batch_size=x.shape[0])
        return loss_g.detach()

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_hist = None
        self._val_grid_done = False

    def _accumulate_usage(self, tokens: Tensor) -> None:
        hist = torch.bincount(tokens.reshape(-1).long().cpu(), minlength=self.tokenizer.vocab_size)
        self._val_hist = hist if self._val_hist is None else self._val_hist + hist

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        hp = self.hparams
        x = batch["image"]
        x_hat, q = self.tokenizer(x)
        rec = self._rec_loss(x, x_hat)
        perc = self._perceptual(x, x_hat)
        grad = self._grad_loss(x, x_hat)
        loss = hp.rec_weight * rec + hp.grad_weight * grad + hp.perceptual_weight * perc + hp.quant_weight * q.loss
        m = image_metrics(x, x_hat)
        self._accumulate_usage(self.tokenizer.tokens_from_indices(q.indices))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        self.log("val/rec_loss", rec, sync_dist=True, batch_size=x.shape[0])
        self.log("val/psnr", m["psnr"], prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        self.log("val/ssim", m["ssim"], sync_dist=True, batch_size=x.shape[0])
        if self.lpips is not None:
            self.log("val/lpips", perc, sync_dist=True, batch_size=x.shape[0])
        for k, v in q.stats.items():
            if k not in ("usage", "perplexity"):
                self.log(f"val/{k}", v, sync_dist=True, batch_size=x.shape[0])
        if not self._val_grid_done and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            n = min(hp.num_recon_images, x.shape[0])
            save_image_grid(x[:n], x_hat[:n], self._recon_dir() / f"recon_step{self.batch_step:07d}.png")
            self._val_grid_done = True
        return loss

    def on_validation_epoch_end(self) -> None:
        if self._val_hist is None:
            return
        hist = self._val_hist.to(self.device)
        if self.trainer.world_size > 1:
            hist = self.all_gather(hist).sum(0)
        p = hist.float() / hist.sum().clamp_min(1)
        self.log("val/usage", (hist > 0).float().mean(), prog_bar=True)
        self.log("val/perplexity", torch.exp(-(p * p.clamp_min(1e-10).log()).sum()))

    def _root(self) -> Path:
        return Path(self.trainer.default_root_dir if self._trainer is not None else ".")

    def _recon_dir(self) -> Path:
        return Path(self.hparams.recon_dir) if self.hparams.recon_dir else self._root() / "recon"

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            out = Path(self.hparams.export_dir) if self.hparams.export_dir else self._root() / "tokenizer"
            self.tokenizer.save_pretrained(out)


def load_any_tokenizer(path: str | os.PathLike, map_location: str = "cpu") -> tuple[ImageTokenizer, dict[str, Any]]:
    """Load a tokenizer from a ``save_pretrained`` directory or a ``TokenizerModule`` Lightning checkpoint.

    Returns ``(tokenizer, meta)`` where ``meta`` (JSON-able) names the class, config, vocab_size, seq_len,
    token_each, token_grid, the resolved path and the SHA-256 of the weights file.
    """
    import dataclasses

    from tokenizers_img.base import load_state_dict_strict, load_tokenizer
    from tokenizers_img.shards import sha256_file

    path = Path(path)
    if path.is_dir():
        tok = load_tokenizer(path, map_location=map_location)
        weights = path / "model.safetensors"
    elif path.is_file() and path.suffix == ".ckpt":
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        hp = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not k.startswith("_")}
        if "kind" not in hp or "preset" not in hp:
            raise ValueError(f"{path}: not a TokenizerModule checkpoint (hyper_parameters lack 'kind'/'preset')")
        tok = build_tokenizer(hp["kind"], hp["preset"], hp.get("overrides"))
        prefix = "tokenizer."
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        load_state_dict_strict(tok, state, source=str(path))
        tok.eval()
        weights = path
    else:
        raise FileNotFoundError(f"tokenizer {str(path)!r} is neither a save_pretrained directory nor a .ckpt file")
    cfg = getattr(tok, "config", None)
    meta = {
        "class": f"{type(tok).__module__}.{type(tok).__qualname__}",
        "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None,
        "vocab_size": tok.vocab_size, "seq_len": tok.seq_len, "token_each": tok.token_each,
        "token_grid": list(tok.token_grid), "path": str(path.resolve()), "sha256": sha256_file(weights),
    }
    return tok, meta
