"""TokenizerModule: a few real optimisation steps with the GAN on, logged metrics, PNG grid, export, ckpt reload."""

from __future__ import annotations

import warnings

import pytest
import torch

from datasets.shapes import ShapesDataModule
from tokenizers_img.lit import TokenizerModule, evaluate_reconstruction, image_metrics, load_any_tokenizer

TINY = {"image_size": 16, "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 8, "codebook_size": 32,
        "codebook_embed_dim": 4, "norm_groups": 4}
TINY_BAE = {"image_size": 16, "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "emb_dim": 8, "norm_groups": 4,
            "split": "2-8"}


@pytest.mark.slow
@pytest.mark.parametrize("kind,overrides,adaptive", [("vqgan", TINY, False), ("bae", TINY_BAE, True)])
def test_fit_with_gan_logs_and_exports(tmp_path, kind, overrides, adaptive):
    import lightning.pytorch as pl

    pl.seed_everything(0)
    module = TokenizerModule(kind=kind, preset="tiny", overrides=overrides, lr=1e-3, disc_start=2, disc_weight=0.5,
                             disc_adaptive=adaptive, disc_ndf=8, disc_layers=2, num_recon_images=4,
                             lr_schedule="cosine")
    before = {k: v.clone() for k, v in module.discriminator.state_dict().items()}
    data = ShapesDataModule(image_size=16, batch_size=4, train_samples=16, val_samples=8)
    trainer = pl.Trainer(max_steps=6, val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=2,
                         default_root_dir=str(tmp_path), logger=False, enable_checkpointing=True,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
    logged = trainer.callback_metrics
    for key in ("val/loss", "val/psnr", "val/ssim", "val/usage"):
        assert key in logged and torch.isfinite(logged[key]), key
    assert module.batch_step == 4  # 2 generator-only batches + 2 with the discriminator = 6 optimizer steps
    changed = any(not torch.equal(before[k], v) for k, v in module.discriminator.state_dict().items())
    assert changed, "discriminator never stepped after disc_start"
    assert list((tmp_path / "recon").glob("recon_step*.png"))
    tok, meta = load_any_tokenizer(tmp_path / "tokenizer")
    assert meta["seq_len"] == 64 and type(tok) is type(module.tokenizer)
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt")) if (tmp_path / "checkpoints").is_dir() else \
        next(tmp_path.rglob("*.ckpt"))
    tok2, _ = load_any_tokenizer(ckpt)
    assert type(tok2) is type(tok)


def test_image_metrics_and_evaluate_reconstruction():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    noisy = (x + 0.02).clamp(-1, 1)
    m = image_metrics(x, x)
    assert m["psnr"] > 80 and m["ssim"] == pytest.approx(1.0, abs=1e-4)
    # constant offset 0.01 in [0, 1] units -> PSNR = 10 log10(1 / 1e-4) = 40 dB (up to the clamp)
    assert image_metrics(x, noisy)["psnr"] == pytest.approx(40.0, abs=1.0)
    module = TokenizerModule(kind="vqgan", preset="tiny", overrides=TINY, disc_weight=0.0, perceptual_weight=0.0)
    r = evaluate_reconstruction(module.tokenizer, x, batch_size=3)
    assert r["num_images"] == 4 and 0 < r["usage"] <= 1 and 1 <= r["perplexity"] <= 32


def test_image_gradient_loss_hand_made_and_in_the_generator_loss():
    from tokenizers_img.losses import image_gradient_loss

    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert image_gradient_loss(x, x + 0.3) < 1e-12  # a constant offset has the same finite differences
    # one 2x2 image, one channel: x = [[0, 1], [0, 1]], x_hat = 0 -> dx diffs (1, 1) vs 0, dy diffs (0, 0)
    a = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    assert image_gradient_loss(a, torch.zeros_like(a)) == pytest.approx(1.0)
    # TokenizerModule computes it only when grad_weight > 0 (LlamaGen's loss is unchanged by default)
    x_hat = torch.rand_like(x) * 2 - 1
    on = TokenizerModule(kind="vqgan", preset="tiny", overrides=TINY, disc_weight=0.0, perceptual_weight=0.0,
                         grad_weight=2.0)
    off = TokenizerModule(kind="vqgan", preset="tiny", overrides=TINY, disc_weight=0.0, perceptual_weight=0.0)
    assert on._grad_loss(x, x_hat) == image_gradient_loss(x, x_hat) > 0
    assert off._grad_loss(x, x_hat) == 0 and off.hparams.grad_weight == 0


@pytest.mark.parametrize("kind,overrides", [("vqgan", TINY), ("bae", TINY_BAE)])
def test_muon_takes_hidden_conv_filters_and_trains(tmp_path, kind, overrides):
    import lightning.pytorch as pl

    from tokenizers_img.lit import muon_split
    from vision.optim import MuonAdamW

    pl.seed_everything(0)
    module = TokenizerModule(kind=kind, preset="tiny", overrides=overrides, lr=2e-3, perceptual_weight=0.0,
                             disc_weight=0.0, optimizer="muon", muon_lr_scale=2.0)
    hidden, rest = muon_split(module.tokenizer)
    names = {id(p): n for n, p in module.tokenizer.named_parameters()}
    hidden_names = {names[id(p)] for p in hidden}
    assert len(hidden) + len(rest) == len(names) and not {id(p) for p in hidden} & {id(p) for p in rest}
    assert all(n.startswith(("encoder.", "decoder.")) and n.endswith("weight") for n in hidden_names)
    assert "encoder.conv_in.weight" not in hidden_names and "decoder.conv_out.weight" not in hidden_names
    assert any(p.dim() == 4 and p.shape[-1] == 3 for p in hidden)  # 3x3 filters go to Muon
    assert not any("quant" in n or n == "embed" for n in hidden_names)  # codebook side stays with Adam

    data = ShapesDataModule(image_size=16, batch_size=8, train_samples=8, val_samples=8)
    data.setup("fit")
    batch = torch.stack([data.datasets["train"][i]["image"] for i in range(8)])

    def rec_error():
        with torch.no_grad():
            return torch.nn.functional.mse_loss(module.tokenizer.decode(module.tokenizer.encode(batch)), batch).item()

    before, filters = rec_error(), [p.detach().clone() for p in hidden]
    trainer = pl.Trainer(max_steps=30, default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
    opt = trainer.optimizers[0]
    assert isinstance(opt, MuonAdamW) and opt.param_groups[0]["muon"] and opt.param_groups[0]["lr"] > 0
    assert all(not torch.equal(a, p) for a, p in zip(filters, hidden))
    assert rec_error() < 0.5 * before
    with pytest.raises(ValueError, match="optimizer must be"):
        TokenizerModule(kind=kind, preset="tiny", overrides=overrides, optimizer="sgd")
