"""TokenFlow: shared-index rule, per-half normalisation, multi-scale layout, scale drop, gradients, round trips."""

from __future__ import annotations

import pytest
import torch
from conftest import check_gpt_generates_decodable_tokens

from tokenizers_img.tokenflow import (
    TokenFlowModule,
    TokenFlowTokenizer,
    per_half_normalize,
    shared_distance,
    shared_index_lookup,
    shared_index_lookup_ref,
    tokenflow_config,
)


def _images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tok() -> TokenFlowTokenizer:
    torch.manual_seed(0)
    return TokenFlowTokenizer(tokenflow_config("tiny", codebook_size=128)).eval()


@pytest.mark.parametrize("w_pix", [0.0, 0.3, 1.0, 5.0])
def test_shared_index_is_argmin_of_weighted_sum(w_pix):
    g = torch.Generator().manual_seed(1)
    z = per_half_normalize(torch.randn(200, 12, generator=g), 8)
    cb = per_half_normalize(torch.randn(50, 12, generator=g), 8)
    got = shared_index_lookup(z, cb, sem_dim=8, w_pix=w_pix, chunk=64)
    assert torch.equal(got, shared_index_lookup_ref(z, cb, 8, w_pix))
    # explicit loop over a few rows, straight from the definition
    for n in range(5):
        totals = [float(((z[n, :8] - cb[k, :8]) ** 2).sum() + w_pix * ((z[n, 8:] - cb[k, 8:]) ** 2).sum())
                  for k in range(50)]
        assert int(got[n]) == min(range(50), key=totals.__getitem__)
    d = shared_distance(z, cb, 8, w_pix)
    assert d.min() >= -1e-5 and d.max() <= 4 * (1 + w_pix) + 1e-5  # unit vectors: each d in [0, 4]
    if w_pix == 0.0:  # reduces to a semantic-only VQ
        sem = ((z[:, None, :8] - cb[None, :, :8]) ** 2).sum(-1).argmin(1)
        assert torch.equal(got, sem)
    if w_pix == 5.0:  # the pixel half matters: some ids differ from the semantic-only choice
        sem = ((z[:, None, :8] - cb[None, :, :8]) ** 2).sum(-1).argmin(1)
        assert not torch.equal(got, sem)


def test_both_halves_from_one_row_and_unit_norm(tok):
    vq = tok.quantizer.quantizers[0]
    z = torch.randn(2, 20, 3, 3)
    out = vq(z)
    s = tok.config.sem_dim
    rows = tok.codebook_embeddings()[out.indices.reshape(-1)]  # (N, 20)
    flat = out.quantized.movedim(1, -1).reshape(-1, 20)
    assert torch.allclose(flat, rows, atol=1e-6)  # semantic and pixel half of the same row
    assert torch.allclose(flat[:, :s].norm(dim=-1), torch.ones(flat.shape[0]), atol=1e-5)
    assert torch.allclose(flat[:, s:].norm(dim=-1), torch.ones(flat.shape[0]), atol=1e-5)


def test_layout_encode_decode_identity_and_features(tok):
    x = _images()
    ids = tok.encode(x)
    assert tok.seq_len == sum(s * s for s in tok.config.scales) == 121 and tok.token_grid == (1, 121)
    assert tok.final_grid == (8, 8)
    assert ids.shape == (3, 121) and 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size
    with torch.no_grad():
        a = tok.decode(ids)
        b = tok.decode_latents(tok.quantize(tok.encode_latents(x)).quantized)
        assert a.shape == (3, 3, 32, 32) and torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
        f = tok.semantic_features(ids)
        assert f.shape == (3, 64, tok.config.sem_dim)
        assert torch.isfinite(f).all()
        d = tok.semantic_features(ids, level="decoded")
        assert d.shape == (3, 64, tok.teacher.width)
        # the coarse-to-fine prefix: scale k's ids are the k-th block of the sequence
        per_scale = tok.quantizer.split_indices(ids)
        assert [p.shape[1:] for p in per_scale] == [(s, s) for s in tok.config.scales]


def test_scale_drop_only_in_training():
    torch.manual_seed(0)
    t = TokenFlowTokenizer(tokenflow_config("tiny", codebook_size=64, scale_drop_prob=1.0))
    x = _images()
    t.train()
    q = t.quantize(t.encode_latents(x))
    dropped = (q.indices < 0).all(0)
    assert dropped.any() and not dropped[0]  # one scale dropped, never the first (1x1)
    t.eval()
    for _ in range(3):
        assert int(t.encode(x).min()) >= 0


def test_gradients_reach_both_encoders_not_the_teacher(tok):
    tok.train()
    try:
        tok.zero_grad()
        loss, _, logs = tok.losses(_images())
        loss.backward()
        assert all(p.grad is None for p in tok.teacher.parameters())
        sem = [p.grad for p in tok.semantic_encoder.parameters() if p.grad is not None]
        pix = [p.grad for p in tok.pixel_encoder.parameters() if p.grad is not None]
        assert sem and any(g.abs().sum() > 0 for g in sem)
        assert pix and any(g.abs().sum() > 0 for g in pix)
        assert {"sem_cos", "mse", "vq", "psnr"} <= set(logs)
    finally:
        tok.zero_grad()
        tok.eval()


def test_semantic_encoder_starts_from_teacher():
    fresh = TokenFlowTokenizer(tokenflow_config("tiny", codebook_size=64))
    t, s = fresh.teacher.state_dict(), fresh.semantic_encoder.state_dict()
    assert all(torch.equal(t[k], s[k]) for k in t)


def test_save_load_round_trip(tok, tmp_path):
    x = _images()
    tok.save_pretrained(tmp_path / "tf")
    again = TokenFlowTokenizer.from_pretrained(tmp_path / "tf")
    ids = tok.encode(x)
    assert torch.equal(again.encode(x), ids)
    with torch.no_grad():
        assert torch.equal(again.decode(ids), tok.decode(ids))


def test_bad_inputs(tok):
    with pytest.raises(ValueError, match="expects 32x32 images, got 64x64"):
        tok.encode(_images(size=64))
    with pytest.raises(ValueError, match="shape"):
        tok.decode(torch.zeros(1, 64, dtype=torch.long))  # one scale only: wrong length
    with pytest.raises(ValueError, match="last scale"):
        TokenFlowTokenizer(tokenflow_config("tiny", scales=(1, 2, 4)))
    with pytest.raises(ValueError, match="unknown TokenFlowConfig fields"):
        tokenflow_config("tiny", codebok_size=3)


@pytest.mark.slow
def test_lightning_fit_logs_and_gan_step(tmp_path):
    from lightning.pytorch import Trainer

    from datasets.shapes import ShapesDataModule

    torch.manual_seed(0)
    module = TokenFlowModule(overrides={"codebook_size": 64, "disc_start": 1})
    data = ShapesDataModule(batch_size=8, train_samples=32, val_samples=8, test_samples=8)
    trainer = Trainer(max_steps=6, limit_val_batches=1, val_check_interval=3, default_root_dir=str(tmp_path),
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    d_before = [p.clone() for p in module.discriminator.parameters()]
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    assert {"val/loss", "val/psnr", "val/teacher_cos", "val/usage"} <= set(metrics)
    assert trainer.global_step == 6  # 3 batches x 2 optimizers
    assert any(not torch.equal(a, b) for a, b in zip(d_before, module.discriminator.parameters()))
    assert list((tmp_path / "samples").glob("tokenflow_recon_step*.png"))


def test_generate_with_ar_gpt(tok):
    """The AR generator works unchanged: GPT over (1, seq_len) positions, sampled ids decode to images."""
    check_gpt_generates_decodable_tokens(tok, top_k=50)
