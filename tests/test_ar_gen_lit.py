"""Tests for ar_gen/lit.py, vtw generate and vtw eval-gen (tiny random tokenizer, GPT and classifier)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from ar_gen.lit import GPTModule, lr_factor


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(5, 0, 0, 0.0) == 1.0  # no total known: constant


def test_weight_decay_only_on_matrices():
    module = GPTModule(preset="GPT-test", vocab_size=16, block_size=4, num_classes=3, weight_decay=0.1)
    opt = module.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in module.model.named_parameters() if "norm" in n}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))


def test_muon_groups_take_block_matrices_and_train():
    from vision.optim import MuonAdamW

    torch.manual_seed(0)
    module = GPTModule(preset="GPT-test", vocab_size=16, block_size=16, num_classes=3, weight_decay=0.1,
                       lr=3e-3, optimizer="muon", muon_lr_scale=2.0,
                       overrides={"token_dropout_p": 0.0, "resid_dropout_p": 0.0, "ffn_dropout_p": 0.0})
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in module.model.named_parameters()}
    fused, plain, decay, no_decay = opt.param_groups
    assert fused["muon"] and fused["split"] == 3 and fused["lr"] == pytest.approx(6e-3)
    assert {names[id(p)].rsplit(".", 2)[-2] for p in fused["params"]} == {"wqkv"}
    assert {names[id(p)].rsplit(".", 2)[-2] for p in plain["params"]} == {"wo", "w1", "w2", "w3"}
    assert {names[id(p)] for p in decay["params"]} == {"cls_embedding.embedding_table.weight",
                                                        "tok_embeddings.weight", "output.weight"}
    assert not decay["muon"] and decay["lr"] == pytest.approx(3e-3) and no_decay["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(module.model.parameters()))
    # it optimises: the loss on one repeated batch falls
    module.log = lambda *a, **k: None
    gen = torch.Generator().manual_seed(1)
    batch = {"tokens": torch.randint(0, 16, (8, 16), generator=gen), "label": torch.randint(0, 3, (8,), generator=gen)}
    losses = []
    for _ in range(30):
        loss = module._common_step(batch, "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="optimizer must be 'adamw' or 'muon'"):
        GPTModule(preset="GPT-test", vocab_size=16, block_size=4, num_classes=3, optimizer="sgd")


def _two_modules(compile_: bool):
    torch.manual_seed(0)
    eager = GPTModule(preset="GPT-test", vocab_size=16, block_size=16, num_classes=3,
                      overrides={"rope_prefix": "identity", "token_dropout_p": 0.0, "resid_dropout_p": 0.0,
                                 "ffn_dropout_p": 0.0})
    other = GPTModule(preset="GPT-test", vocab_size=16, block_size=16, num_classes=3, compile=compile_,
                      overrides={"rope_prefix": "identity", "token_dropout_p": 0.0, "resid_dropout_p": 0.0,
                                 "ffn_dropout_p": 0.0})
    other.model.load_state_dict(eager.model.state_dict())
    for m in (eager, other):
        m.log = lambda *a, **k: None  # no trainer attached
    gen = torch.Generator().manual_seed(3)
    batch = {"tokens": torch.randint(0, 16, (5, 16), generator=gen), "label": torch.tensor([0, 1, 2, 0, 1])}
    return eager, other, batch


@pytest.mark.slow
def test_compiled_training_loss_and_grads_equal_eager(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)  # label dropout: eager's random stream
    eager, compiled, batch = _two_modules(True)
    losses = []
    for m in (eager, compiled):
        torch.manual_seed(7)  # the same label-dropout draws
        losses.append(m._common_step(batch, "train"))
        losses[-1].backward()
    assert compiled.compiled and not eager.compiled
    torch.testing.assert_close(losses[1], losses[0])
    a, b = eager._common_step(batch, "val"), compiled._common_step(batch, "val")  # validation stays eager
    torch.testing.assert_close(a, b)
    for (name, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    eager, other, batch = _two_modules(True)

    def broken(fn, *a, **k):
        def call(*args, **kwargs):
            raise RuntimeError("no C++ compiler here")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    torch.manual_seed(7)
    want = eager._common_step(batch, "train")
    torch.manual_seed(7)
    with pytest.warns(UserWarning, match="torch.compile failed.*no C\\+\\+ compiler.*training eagerly"):
        got = other._common_step(batch, "train")
    torch.testing.assert_close(got, want)
    assert other._compile_failed and not other.compiled
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, no second warning
        torch.testing.assert_close(other._common_step(batch, "train"), want)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A random tiny VQGAN, token shards of 48 shapes images written by `vtw tokenize`, a tiny classifier."""
    from tokenizers_img.vqgan import VQGAN
    from vision.classifier import build_vit, classifier_config, save_classifier
    from workbench.cli import main as vtw_main

    root = tmp_path_factory.mktemp("argen")
    torch.manual_seed(0)
    tok = VQGAN.from_preset("tiny").eval()
    tok.save_pretrained(str(root / "tok"))
    for split, n in (("train", 48), ("val", 16)):
        rc = vtw_main(["tokenize", "--tokenizer", str(root / "tok"), "--data", "shapes", "--split", split,
                       "--num-samples", str(n), "--batch-size", "16", "--out", str(root / "shards" / split),
                       "--device", "cpu"])
        assert rc == 0
    cfg = classifier_config("tiny", depth=1, embed_dim=32, num_heads=2)
    save_classifier(build_vit(cfg), cfg, [f"c{i}" for i in range(cfg.num_classes)], root / "clf")
    return root, tok


@pytest.mark.slow
def test_fit_ema_checkpoint_generate_and_eval_gen_end_to_end(tiny_setup, tmp_path, capsys):
    import lightning.pytorch as pl

    from ar_gen.gpt import load_gpt
    from tokenizers_img.shards import TokenShardDataModule
    from workbench.cli import main as vtw_main

    root, tok = tiny_setup
    data = TokenShardDataModule(str(root / "shards"), batch_size=8)
    module = GPTModule(preset="GPT-test", vocab_size=data.vocab_size, block_size=data.seq_len, num_classes=30,
                       lr=1e-2, warmup_steps=1, ema_decay=0.5)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0,
                         gradient_clip_val=1.0, accelerator="cpu", default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    val = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert math.isfinite(val["val/loss"]) and 0.0 <= val["val/acc"] <= 1.0
    # EMA (decay 0.5) moved towards the trained weights but is not equal to them
    w, e = module.model.layers[0].attention.wqkv.weight, module.ema_model.layers[0].attention.wqkv.weight
    assert not torch.equal(w, e)
    ckpt = tmp_path / "gpt.ckpt"
    trainer.save_checkpoint(ckpt)
    model, meta = load_gpt(ckpt)
    assert meta["weights"] == "ema_model"
    torch.testing.assert_close(model.layers[0].attention.wqkv.weight, e)
    raw, _ = load_gpt(ckpt, use_ema=False)
    torch.testing.assert_close(raw.layers[0].attention.wqkv.weight, w)

    out = tmp_path / "gen"
    rc = vtw_main(["generate", "--gpt", str(ckpt), "--tokenizer", str(root / "tok"), "--classes", "0", "3",
                   "--per-class", "2", "--cfg", "2.0", "--top-k", "50", "--seed", "1", "--batch-size", "3",
                   "--out", str(out)])
    assert rc == 0
    record = json.loads((out / "generate.json").read_text())
    assert [im["class"] for im in record["images"]] == [0, 0, 3, 3]
    assert record["sampling"]["cfg_scale"] == 2.0 and record["sampling"]["top_k"] == 50
    assert (out / "grid.png").is_file() and all((out / im["file"]).is_file() for im in record["images"])
    assert record["timing"]["image_tokens_per_s"] > 0
    # the same seed reproduces the same tokens exactly
    from safetensors.torch import load_file

    rc = vtw_main(["generate", "--gpt", str(ckpt), "--tokenizer", str(root / "tok"), "--classes", "0", "3",
                   "--per-class", "2", "--cfg", "2.0", "--top-k", "50", "--seed", "1", "--batch-size", "3",
                   "--out", str(tmp_path / "gen2")])
    assert rc == 0
    assert torch.equal(load_file(str(out / "tokens.safetensors"))["tokens"],
                       load_file(str(tmp_path / "gen2" / "tokens.safetensors"))["tokens"])

    rc = vtw_main(["eval-gen", "--generated", str(out), "--classifier", str(root / "clf"), "--num-real", "8"])
    assert rc == 0
    scores = json.loads((out / "eval_gen.json").read_text())
    assert 0.0 <= scores["class_accuracy"] <= 1.0 and scores["num_images"] == 4
    assert scores["frechet_distance"] >= 0 and "inception" in " ".join(scores)


def test_generate_rejects_bad_input_before_work(tiny_setup, tmp_path, capsys):
    from ar_gen.gpt import GPT, gpt_config, save_gpt
    from workbench.cli import main as vtw_main

    root, tok = tiny_setup
    good = GPT(gpt_config("GPT-test", vocab_size=tok.vocab_size, block_size=tok.seq_len, num_classes=30))
    save_gpt(good, tmp_path / "good")
    bad_vocab = GPT(gpt_config("GPT-test", vocab_size=tok.vocab_size + 1, block_size=tok.seq_len, num_classes=30))
    save_gpt(bad_vocab, tmp_path / "bad_vocab")
    base = ["generate", "--tokenizer", str(root / "tok"), "--out", str(tmp_path / "o")]
    assert vtw_main(base + ["--gpt", str(tmp_path / "good"), "--classes", "0", "30"]) == 2
    assert "unknown class id(s) [30]" in capsys.readouterr().out
    assert vtw_main(base + ["--gpt", str(tmp_path / "bad_vocab"), "--classes", "0"]) == 2
    assert "vocabulary: GPT 513 vs tokenizer 512" in capsys.readouterr().out
    torch.save({"state_dict": {"net.w": torch.zeros(1)}, "hyper_parameters": {}}, tmp_path / "clf.ckpt")
    assert vtw_main(base + ["--gpt", str(tmp_path / "clf.ckpt"), "--classes", "0"]) == 2
    assert "not a workbench GPT checkpoint" in capsys.readouterr().out
    assert vtw_main(base + ["--gpt", str(tmp_path / "good"), "--captions", "a red circle"]) == 2
    assert "class-conditional: pass --classes" in capsys.readouterr().out
    assert not (tmp_path / "o" / "generate.json").exists()


@pytest.mark.slow
def test_caption_conditioned_module_trains_on_captions():
    torch.manual_seed(0)
    module = GPTModule(preset="GPT-test", vocab_size=16, block_size=4, model_type="t2i", text_tower="clip-tiny-32",
                       lr=1e-2)
    c = module.config
    assert c.caption_dim == 64 and c.cls_token_num == 32  # open_clip tiny text tower: width 64, 32 tokens
    assert not any(k.startswith("caption_encoder") for k in module.state_dict())
    batch = {"tokens": torch.randint(0, 16, (3, 4)), "label": torch.zeros(3, dtype=torch.long),
             "caption": ["a red circle", "a blue square", "two green triangles"]}
    module.train()
    loss = module.model.training_loss(batch["tokens"], module.condition(batch)).loss
    loss.backward()
    assert math.isfinite(loss.item()) and module.model.cls_embedding.cap_proj.fc1.weight.grad is not None
