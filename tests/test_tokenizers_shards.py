"""`vtw tokenize` + token shards: exact tokens, augmentations, resume, corruption detection, data module."""

from __future__ import annotations

import json

import pytest
import torch

from datasets.shapes import ShapesDataset
from tokenizers_img.bae import BAEConfig, BinaryAutoencoder
from tokenizers_img.shards import TokenShardDataModule, TokenShardDataset
from tokenizers_img.vqgan import VQGAN, VQGANConfig
from workbench.cli import main


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = VQGAN(VQGANConfig(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, codebook_size=32,
                            codebook_embed_dim=4, norm_groups=4)).eval()
    d = tmp_path_factory.mktemp("tok") / "vq"
    tok.save_pretrained(d)
    return d


def tokenize(tok_dir, out, *extra):
    return main(["tokenize", "--tokenizer", str(tok_dir), "--data", "shapes", "--split", "val", "--num-samples", "20",
                 "--shard-size", "8", "--batch-size", "5", "--out", str(out), *extra])


def test_tokens_equal_direct_encoding_and_metadata(vq_dir, tmp_path):
    assert tokenize(vq_dir, tmp_path / "s") == 0
    ds = TokenShardDataset(tmp_path / "s", random_aug=False)
    assert len(ds) == 20 and ds.vocab_size == 32 and ds.seq_len == 64 and ds.num_classes == 30
    tok = VQGAN.from_pretrained(vq_dir)
    src = ShapesDataset("val", 20, 16, 0, cache=False)
    x = torch.stack([src[i]["image"] for i in range(20)])
    assert torch.equal(torch.stack([ds[i]["tokens"] for i in range(20)]), tok.encode(x))
    assert [ds[i]["label"] for i in range(20)] == [src[i]["label"] for i in range(20)]
    assert ds[3]["caption"] == src[3]["caption"] and ds[3]["tokens"].dtype == torch.long
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["complete"] and len(index["shards"]) == 3 and index["tokenizer"]["config"]["codebook_size"] == 32


@pytest.mark.parametrize("aug,num", [("flip", 2), ("tencrop", 10)])
def test_augmentations(vq_dir, tmp_path, aug, num):
    assert tokenize(vq_dir, tmp_path / aug, "--aug", aug) == 0
    ds = TokenShardDataset(tmp_path / aug)
    assert ds.tokens.shape == (20, num, 64)
    if aug == "flip":
        tok = VQGAN.from_pretrained(vq_dir)
        x = ShapesDataset("val", 20, 16, 0, cache=False)[0]["image"][None]
        assert torch.equal(ds.tokens[0, 1].long(), tok.encode(x.flip(-1))[0])
    seen = {int((ds.tokens[0] == ds[0]["tokens"].to(ds.tokens.dtype)).all(-1).nonzero()[0]) for _ in range(40)}
    assert len(seen) > 1  # random augmentation per item


def test_resume_skips_complete_shards_and_rewrites_missing(vq_dir, tmp_path, capsys):
    out = tmp_path / "r"
    tokenize(vq_dir, out)
    first = (out / "shard_00000.safetensors").stat().st_mtime_ns
    (out / "shard_00001.safetensors").unlink()
    assert tokenize(vq_dir, out) == 0
    assert "resuming: 2 of 3 shards" in capsys.readouterr().out
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == first
    assert len(TokenShardDataset(out)) == 20
    with pytest.raises(SystemExit, match="other arguments"):
        tokenize(vq_dir, out, "--aug", "flip")


def test_corrupt_and_incomplete_shards_detected(vq_dir, tmp_path):
    out = tmp_path / "c"
    tokenize(vq_dir, out)
    path = out / "shard_00002.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard_00002.safetensors is corrupt"):
        TokenShardDataset(out)
    index = json.loads((out / "index.json").read_text())
    index["complete"] = False
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="incomplete"):
        TokenShardDataset(out)


def test_bae_subtokens_and_datamodule(tmp_path):
    torch.manual_seed(0)
    bae = BinaryAutoencoder(BAEConfig(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, emb_dim=8, token_each=2,
                                      code_dim=8, norm_groups=4)).eval()
    bae.save_pretrained(tmp_path / "bae")
    for split in ("train", "val"):
        assert main(["tokenize", "--tokenizer", str(tmp_path / "bae"), "--split", split, "--num-samples", "12",
                     "--out", str(tmp_path / "tok" / split)]) == 0
    dm = TokenShardDataModule(str(tmp_path / "tok"), batch_size=4)
    assert (dm.vocab_size, dm.seq_len, dm.token_each) == (256, 64, 2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape == (4, 64, 2) and batch["label"].shape == (4,) and len(batch["caption"]) == 4
    assert next(iter(dm.val_dataloader()))["tokens"].max() < 256
