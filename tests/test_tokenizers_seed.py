"""SEED tokenizer: causality, Stage I/II separation, VQ rule, round trips, unCLIP path, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import check_gpt_generates_decodable_tokens

from tokenizers_img.seed import (
    STAGE1_PREFIXES,
    QFormer,
    SeedModule,
    SeedTokenizer,
    build_tiny_unclip_pipeline,
    retrieval_top1,
    seed_config,
)

CAPTIONS = ["a small red circle on the left", "a large blue square at the top",
            "a medium green star in the center", "two small yellow triangles"]


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tok() -> SeedTokenizer:
    torch.manual_seed(0)
    return SeedTokenizer(seed_config("tiny", codebook_size=64)).eval()


@pytest.mark.parametrize("fused", [True, False])
def test_causal_qformer_query_i_never_changes_earlier_outputs(fused):
    torch.manual_seed(0)
    qf = QFormer(num_queries=6, width=32, depth=3, heads=4, mlp_ratio=2.0, encoder_width=16, causal=True).eval()
    qf.fused = fused
    enc = torch.randn(2, 10, 16)
    queries = qf.query_tokens.expand(2, -1, -1).clone()
    base = qf(enc, queries)
    for i in range(6):
        q2 = queries.clone()
        q2[:, i] += torch.randn(2, 32)
        out = qf(enc, q2)
        assert torch.equal(out[:, :i], base[:, :i]), f"query {i} changed an earlier output"
        assert not torch.allclose(out[:, i], base[:, i]), f"query {i} did not change its own output"
    # the bidirectional variant does leak (the mask is what makes it causal)
    qf.causal = False
    q2 = queries.clone()
    q2[:, 5] += torch.randn(2, 32)  # (a constant shift would vanish in LayerNorm)
    assert not torch.allclose(qf(enc, q2)[:, 0], qf(enc, queries)[:, 0])


def test_fused_attention_matches_reference():
    torch.manual_seed(0)
    qf = QFormer(num_queries=5, width=32, depth=2, heads=4, mlp_ratio=2.0, encoder_width=16, causal=True).eval()
    enc = torch.randn(3, 7, 16)
    qf.fused = True
    a = qf(enc)
    qf.fused = False
    b = qf(enc)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_encode_decode_shapes_and_identity(tok):
    x = _images()
    ids = tok.encode(x)
    assert ids.shape == (4, tok.seq_len) == (4, 8) and ids.dtype == torch.long
    assert tok.token_grid == (1, 8) and 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size
    with torch.no_grad():
        a = tok.decode(ids)
        b = tok.decode_latents(tok.quantize(tok.encode_latents(x)).quantized)
    assert a.shape == (4, 3, 32, 32) and torch.allclose(a, b, atol=1e-5)
    assert tok.codebook_embeddings().shape == (64, tok.config.code_dim)


def test_legacy_vq_loss_and_ste_gradient(tok):
    x = _images()
    z = tok.encode_latents(x)  # (B, d, 1, N)
    q = tok.quantize(z)
    zq = tok.quantizer.embed(q.indices)
    # taming legacy: commitment weight 1, beta = 0.25 on the codebook term
    want = F.mse_loss(zq.detach(), z) + 0.25 * F.mse_loss(zq, z.detach())
    assert torch.allclose(q.loss, want, atol=1e-6)
    # brute-force nearest code
    flat = z.detach().squeeze(2).transpose(1, 2).reshape(-1, z.shape[1])
    d = ((flat[:, None] - tok.codebook_embeddings()[None]) ** 2).sum(-1)
    assert torch.equal(d.argmin(1), q.indices.reshape(-1))
    tok.zero_grad()
    q.quantized.sum().backward()
    g = tok.encode_task_layer[2].weight.grad
    assert g is not None and g.abs().sum() > 0  # straight-through reaches the down-projection
    tok.zero_grad()


def test_retrieval_top1_hand_made():
    img = F.normalize(torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0.1]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0], [0, 1.0], [0, 1.0]]), dim=-1)
    caps = ["red", "blue", "red"]  # items 0 and 2 share a caption
    r = retrieval_top1(img, txt, caps)
    # i2t: 0->txt0 red ok; 1->txt1 (first max) blue ok; 2->txt0 red ok
    assert r["i2t"] == 1.0
    # t2i: txt0->img0 red ok; txt1->img1 blue ok; txt2 (caption red) -> img1 (blue) wrong
    assert r["t2i"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A Stage-I module after two optimizer steps, saved in the layout of a Lightning checkpoint."""
    torch.manual_seed(0)
    m = SeedModule(stage=1, overrides={"codebook_size": 64})
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    batch = {"image": _images(), "caption": CAPTIONS}
    for _ in range(2):
        loss = m.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("seed") / "stage1.ckpt"
    torch.save({"state_dict": m.state_dict()}, path)
    return m, path


def test_stage2_leaves_stage1_weights_untouched(stage1):
    m1, path = stage1
    m2 = SeedModule(stage=2, overrides={"codebook_size": 64}, stage1_checkpoint=str(path))
    before = {k: v.clone() for k, v in m2.tokenizer.stage1_state_dict().items()}
    assert all(torch.equal(before[k], m1.tokenizer.state_dict()[k]) for k in before)  # loaded
    other = {k: v.clone() for k, v in m2.tokenizer.state_dict().items() if not k.startswith(STAGE1_PREFIXES)}
    cfg = m2.configure_optimizers()
    opt = cfg["optimizer"]
    m2.train()
    assert not m2.tokenizer.qformer.training and not m2.tokenizer.vision_tower.training
    for _ in range(3):
        loss = m2.training_step({"image": _images(), "caption": CAPTIONS}, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = m2.tokenizer.stage1_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "Stage II changed Stage-I weights"
    now = m2.tokenizer.state_dict()
    assert any(not torch.equal(other[k], now[k]) for k in other), "Stage II trained nothing"


def test_stage1_checkpoint_of_other_config_names_keys(stage1, tmp_path):
    _, path = stage1
    with pytest.raises(ValueError, match="shape-mismatched keys.*qformer"):
        SeedModule(stage=2, overrides={"codebook_size": 64, "width": 32}, stage1_checkpoint=str(path))
    with pytest.raises(FileNotFoundError, match="stage1_checkpoint"):
        SeedModule(stage=2, stage1_checkpoint=str(tmp_path / "missing.ckpt"))


def test_save_load_round_trip(tok, tmp_path):
    x = _images()
    tok.save_pretrained(tmp_path / "seed")
    again = SeedTokenizer.from_pretrained(tmp_path / "seed")
    ids = tok.encode(x)
    assert torch.equal(again.encode(x), ids)
    with torch.no_grad():
        assert torch.equal(again.decode(ids), tok.decode(ids))
        assert torch.equal(again.generation_embedding(ids), tok.generation_embedding(ids))


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(ValueError, match="expects 32x32 images, got 64x64"):
        tok.encode(_images(size=64))
    with pytest.raises(ValueError, match="one caption per image"):
        tok.itc_loss(_images(), CAPTIONS[:2])
    with pytest.raises(FileNotFoundError, match="unclip_path"):
        SeedTokenizer(seed_config("tiny", unclip_path=str(tmp_path / "no-such-unclip")))
    with pytest.raises(ValueError, match="token ids must be in"):
        tok.decode(torch.full((1, 8), 64))


def test_stage1_needs_captions(stage1):
    m, _ = stage1
    with pytest.raises(ValueError, match="no 'caption' key"):
        m.training_step({"image": _images()}, 0)


@pytest.mark.slow
def test_unclip_path_end_to_end(tmp_path):
    torch.manual_seed(0)
    base = SeedTokenizer(seed_config("tiny", codebook_size=64))
    build_tiny_unclip_pipeline(tmp_path / "unclip", embed_dim=base.gen_dim, image_size=32)
    tok = SeedTokenizer(seed_config("tiny", codebook_size=64, unclip_path=str(tmp_path / "unclip"))).eval()
    ids = tok.encode(_images(2))
    imgs = tok.decode(ids, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (2, 3, 32, 32) and torch.isfinite(imgs).all()
    assert imgs.min() >= -1 and imgs.max() <= 1
    again = tok.decode(ids, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(imgs, again)  # deterministic given the generator
    pixel = tok.decode(ids, renderer="pixel")
    assert pixel.shape == imgs.shape


def test_generate_with_ar_gpt(tok):
    """The AR generator works unchanged over SEED's 1-D causal tokens; sampled ids decode to images."""
    check_gpt_generates_decodable_tokens(tok, top_k=20)
