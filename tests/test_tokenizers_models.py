"""VQGAN and BAE tokenizers: interface round trips, gradients, save/load, input checks, losses."""

from __future__ import annotations

import pytest
import torch

from tokenizers_img.bae import BAE_SPLITS, BAEConfig, BinaryAutoencoder
from tokenizers_img.base import ImageTokenizer, load_tokenizer
from tokenizers_img.losses import NLayerDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from tokenizers_img.quantizers import subtokens_to_bits
from tokenizers_img.vqgan import VQGAN, VQGAN_PRESETS, AttnBlock, VQGANConfig


def tiny_vqgan(**kw) -> VQGAN:
    cfg = dict(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, codebook_size=32,
               codebook_embed_dim=4, norm_groups=4)
    cfg.update(kw)
    torch.manual_seed(0)
    return VQGAN(VQGANConfig(**cfg)).eval()


def tiny_bae(split: str = "2-8", **kw) -> BinaryAutoencoder:
    t, c = BAE_SPLITS[split]
    cfg = dict(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, emb_dim=8, token_each=t, code_dim=c,
               norm_groups=4)
    cfg.update(kw)
    torch.manual_seed(0)
    return BinaryAutoencoder(BAEConfig(**cfg)).eval()


def images(b=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


TOKENIZERS = [("vqgan", tiny_vqgan), *[(f"bae-{s}", lambda s=s: tiny_bae(s)) for s in BAE_SPLITS]]


@pytest.mark.parametrize("name,make", TOKENIZERS, ids=[n for n, _ in TOKENIZERS])
def test_interface_roundtrip_and_batch_consistency(name, make):
    tok = make()
    assert isinstance(tok, ImageTokenizer)
    x = images()
    ids = tok.encode(x)
    want = (3, tok.seq_len) if tok.token_each == 1 else (3, tok.seq_len, tok.token_each)
    assert ids.shape == want and ids.dtype == torch.long
    assert tok.seq_len == 64 and tok.token_grid == (8, 8)
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    with torch.no_grad():
        via_tokens = tok.decode(ids)
        via_latents = tok.decode_latents(tok.quantize(tok.encode_latents(x)).quantized)
    assert via_tokens.shape == x.shape
    assert torch.allclose(via_tokens, via_latents, atol=1e-5), (via_tokens - via_latents).abs().max()
    per_image = torch.cat([tok.encode(x[i:i + 1]) for i in range(3)])
    assert torch.equal(per_image, ids)


def test_codebook_embeddings_are_token_latents():
    vq = tiny_vqgan()
    x = images()
    ids = vq.encode(x)
    emb = vq.codebook_embeddings()
    assert emb.shape == (vq.vocab_size, 4)
    q = vq.quantize(vq.encode_latents(x)).quantized  # (B, D, h, w)
    assert torch.allclose(emb[ids].view(3, 8, 8, 4).permute(0, 3, 1, 2), q.detach(), atol=1e-6)
    bae = tiny_bae("2-10")
    table = bae.codebook_embeddings()
    assert table.shape == (1024, 10)
    ids = bae.encode(x)
    assert torch.equal(table[ids].flatten(-2), subtokens_to_bits(ids, 10))


@pytest.mark.parametrize("make", [tiny_vqgan, tiny_bae])
def test_straight_through_gradients_reach_encoder(make):
    tok = make().train()
    x_hat, q = tok(images())
    (x_hat.square().mean() + q.loss).backward()
    g = tok.encoder.conv_in.weight.grad
    assert g is not None and g.abs().sum() > 0


@pytest.mark.parametrize("make", [tiny_vqgan, tiny_bae])
def test_save_load_bit_exact(tmp_path, make):
    tok = make()
    tok.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "model.safetensors").is_file() and (tmp_path / "tok" / "config.json").is_file()
    again = load_tokenizer(tmp_path / "tok")
    assert type(again) is type(tok) and again.config == tok.config
    for (k, a), (_, b) in zip(tok.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    x = images()
    assert torch.equal(tok.encode(x), again.encode(x))
    assert torch.equal(tok.decode(tok.encode(x)), again.decode(tok.encode(x)))


def test_wrong_architecture_checkpoint_names_keys(tmp_path):
    tiny_vqgan().save_pretrained(tmp_path / "vq")
    other = VQGANConfig(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=2, z_channels=8, codebook_size=64,
                        codebook_embed_dim=4, norm_groups=4)
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): .*decoder\.conv_blocks\.0\.res\.2") as err:
        VQGAN.from_pretrained(tmp_path / "vq", config=other)
    assert "quantizer.embedding.weight" in str(err.value)  # K 32 vs 64: shape mismatch named
    with pytest.raises(ValueError, match="codebook_embed_dim.*not fields of BAEConfig"):
        BinaryAutoencoder.from_pretrained(tmp_path / "vq")
    # same config keys, different weights file: the unexpected keys are named
    tiny_bae().save_pretrained(tmp_path / "bae")
    (tmp_path / "bae" / "model.safetensors").write_bytes((tmp_path / "vq" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"unexpected keys \(\d+\): .*quant_conv"):
        load_tokenizer(tmp_path / "bae")


@pytest.mark.parametrize("make", [tiny_vqgan, tiny_bae])
def test_bad_images_rejected(make):
    tok = make()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tok.encode(images() * 127.5 + 127.5)
    with pytest.raises(ValueError, match="3 channels"):
        tok.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiple of .* downsample factor 2"):
        tok.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="float"):
        tok.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    tok.encode(images().clamp(-1, 1) * 1.005)  # small overshoot tolerated


def test_decode_rejects_bad_tokens():
    vq = tiny_vqgan()
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        vq.decode(torch.full((1, 64), 32))
    with pytest.raises(ValueError, match="shape"):
        vq.decode(torch.zeros(1, 63, dtype=torch.long))


def test_attention_fused_matches_reference():
    torch.manual_seed(0)
    blk = AttnBlock(8, 4)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    y_fast = blk(x)
    blk.fused_attn = False
    y_ref = blk(x)
    assert torch.allclose(y_fast, y_ref, atol=1e-5), (y_fast - y_ref).abs().max()
    g1 = torch.autograd.grad(y_fast.sum(), x)[0]
    g2 = torch.autograd.grad(y_ref.sum(), x)[0]
    assert torch.allclose(g1, g2, atol=1e-4)


def test_presets_and_paper_size():
    assert VQGAN_PRESETS["VQ-16"].downsample == 16 and VQGAN_PRESETS["VQ-8"].downsample == 8
    assert VQGAN_PRESETS["tiny"].image_size // VQGAN_PRESETS["tiny"].downsample == 8
    with pytest.raises(ValueError, match="multiple"):
        VQGANConfig(image_size=18, ch_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="unknown VQGAN preset"):
        VQGAN.from_preset("huge")
    bae = BinaryAutoencoder.from_preset("tiny", split="2-12")
    assert (bae.vocab_size, bae.token_each, bae.config.num_bits) == (4096, 2, 24)


def test_gan_losses_hand_cases():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)
    d = NLayerDiscriminator(3, 8, 2)
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    w = torch.nn.Parameter(torch.ones(3))
    lam = adaptive_gan_weight((2 * w).sum(), (4 * w).sum(), w)
    assert lam.item() == pytest.approx(0.5, rel=1e-3)
