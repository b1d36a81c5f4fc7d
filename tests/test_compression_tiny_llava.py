"""Tiny LLaVA recipe: the conv-stem CLIP tower type round-trips through save_pretrained, and the
two-phase training (tower pretraining, then frozen tower + LM) touches the right parameters."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from compression.tiny_llava import (
    ATTRIBUTE_GROUPS,
    ShapesVQA,
    ShapesVQADataModule,
    TinyLlavaModule,
    WordTokenizer,
    build_tiny_llava,
    build_vocab,
    collate,
    load_llava,
    save_tiny_llava,
    tiny_llava_config,
)


def test_conv_stem_tower_keeps_the_token_grid_and_reloads(tmp_path):
    from compression.conv_clip import ConvPatchStem, ConvStemCLIPVisionModel

    torch.manual_seed(0)
    cfg = tiny_llava_config("nano")
    tok = WordTokenizer(build_vocab())
    model = build_tiny_llava(cfg, len(tok.vocab), tok.image_id).eval()
    tower = model.model.vision_tower
    assert isinstance(tower, ConvStemCLIPVisionModel) and isinstance(tower.embeddings.patch_embedding, ConvPatchStem)
    px = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    grid = cfg.image_size // cfg.patch_size
    assert tower.embeddings.patch_embedding(px).shape == (2, cfg.vision_hidden, grid, grid)
    with torch.no_grad():
        tower.embeddings.patch_embedding.body[1].running_mean.uniform_(-1, 1)  # BatchNorm buffers must be saved too
        ref = tower(px).last_hidden_state
    save_tiny_llava(model, tok, cfg, tmp_path / "m")
    loaded = load_llava(tmp_path / "m").model.model.vision_tower
    assert type(loaded).__name__ == "ConvStemCLIPVisionModel" and loaded.config.stem_width == cfg.stem_width
    with torch.no_grad():
        assert torch.allclose(loaded(px).last_hidden_state, ref, atol=1e-6)
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        ConvPatchStem(3, 8, 6, 16)
    with pytest.raises(ValueError, match="unknown stem 'pixels'"):
        build_tiny_llava(tiny_llava_config("nano", stem="pixels"), len(tok.vocab), tok.image_id)


def test_two_phase_training_pretrains_then_freezes_the_tower(tmp_path):
    torch.manual_seed(0)
    module = TinyLlavaModule(preset="nano", image_size=24, patch_size=4, tower_steps=3, warmup_steps=1,
                             save_dir=str(tmp_path / "model"))
    data = ShapesVQADataModule(image_size=24, patch_size=4, batch_size=8, train_samples=64, val_samples=8,
                               test_samples=8)
    snapshot = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def changed(prefix: str) -> bool:
        return any(not torch.equal(v, snapshot[k]) for k, v in module.state_dict().items() if k.startswith(prefix))

    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, data)  # phase 1 only
    assert changed("model.model.vision_tower.") and changed("tower_head.")
    assert not changed("model.model.language_model.") and not changed("model.model.multi_modal_projector.")
    assert not module.tower_frozen
    after_phase1 = {k: v.detach().clone() for k, v in module.state_dict().items()}
    snapshot.update(after_phase1)
    trainer = pl.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    module.hparams.tower_steps = 0  # the new trainer counts from 0: go straight to phase 2
    trainer.fit(module, data)
    assert module.tower_frozen and not module.tower.training  # BatchNorm statistics stay put
    assert not changed("model.model.vision_tower.")  # weights and BatchNorm buffers untouched
    assert changed("model.model.language_model.") and changed("model.model.multi_modal_projector.")
    assert (tmp_path / "model" / "config.json").is_file()


def test_sparse_preset_and_data_mismatch_error(tmp_path):
    module = TinyLlavaModule(preset="sparse", tower_steps=0)
    assert (module.config.image_size, module.config.object_scale) == (48, 0.6)
    assert module.hparams_initial["image_size"] == 48 and module.hparams_initial["object_scale"] == 0.6
    assert module.model.config.text_config._attn_implementation == "eager"  # faster CPU training
    module = TinyLlavaModule(preset="nano", tower_steps=0, object_scale=0.5)
    data = ShapesVQADataModule(image_size=24, patch_size=4, batch_size=4, train_samples=8, val_samples=4,
                               test_samples=4)  # object_scale 1.0: not the task the model is configured for
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    with pytest.raises(ValueError, match="data.object_scale=1.0 but the model"):
        trainer.fit(module, data)
    with pytest.raises(ValueError, match="train_attention"):
        TinyLlavaModule(preset="nano", train_attention="flash")


def test_token_dropout_samples_only_vision_tokens():
    module = TinyLlavaModule(preset="nano", tower_steps=0, token_dropout=1.0, token_dropout_max=0.5)
    ids = torch.tensor([[1, 4] + [module.tok.image_id] * 36 + [7, 8, 5]] * 64)
    drop, first = module.sample_token_drop(ids, torch.Generator().manual_seed(0))
    assert 0 <= first < module.config.text_layers
    assert not drop[:, :2].any() and not drop[:, -3:].any()
    frac = drop.float().sum(1) / 36
    assert 0.15 < float(frac.mean()) < 0.35 and float(frac.max()) <= 0.75  # U(0, 0.5) per row, binomial spread
    with pytest.raises(ValueError, match="token_dropout"):
        TinyLlavaModule(preset="nano", token_dropout=1.5)
    with pytest.raises(ValueError, match="eager"):
        TinyLlavaModule(preset="nano", token_dropout=0.5, train_attention="sdpa")


def test_token_dropout_layers_restrict_the_first_dropped_layer():
    module = TinyLlavaModule(preset="nano", tower_steps=0, token_dropout=1.0, token_dropout_max=1.0,
                             token_dropout_layers=[1])
    ids = torch.tensor([[1, 4] + [module.tok.image_id] * 36 + [7, 8, 5]] * 8)
    g = torch.Generator().manual_seed(0)
    assert {module.sample_token_drop(ids, g)[1] for _ in range(20)} == {1}
    everywhere = TinyLlavaModule(preset="nano", tower_steps=0, token_dropout=1.0)
    assert len({everywhere.sample_token_drop(ids, g)[1] for _ in range(200)}) == everywhere.config.text_layers
    with pytest.raises(ValueError, match="token_dropout_layers"):
        TinyLlavaModule(preset="nano", token_dropout=0.5, token_dropout_layers=[99])


def test_tower_pooled_loss_and_merge_aware_training_step():
    torch.manual_seed(0)
    module = TinyLlavaModule(preset="nano", tower_steps=2, tower_pooled_loss=True, merge_aware=1.0,
                             merge_aware_tau=-1.0, token_dropout=1.0, token_dropout_layers=[1])
    ds = ShapesVQA("train", 4, 24, 36, max_count=3)
    batch = collate([ds[i] for i in range(4)])
    loss = module._tower_step(batch)
    loss.backward()
    assert module.tower_pooled_head.weight.grad is not None
    from compression.llava_runner import parts

    last = parts(module.model)["vision"].encoder.layers[-1]  # feeds only the pooled CLS output
    assert last.self_attn.q_proj.weight.grad is not None and last.self_attn.q_proj.weight.grad.abs().sum() > 0
    module.zero_grad()
    module.freeze_tower()
    loss = module._common_step(batch, "train")  # tau -1: every window merged in every row
    loss.backward()
    assert torch.isfinite(loss)
    assert module.model.model.multi_modal_projector.linear_1.weight.grad is not None
    assert all(p.grad is None for p in module.tower.parameters())
    with pytest.raises(ValueError, match="merge_aware"):
        TinyLlavaModule(preset="nano", merge_aware=2.0)


def test_lowest_ranked_hand_made():
    from compression.tiny_llava import lowest_ranked

    scores = torch.tensor([[0.5, 0.1, 0.9, 0.1, 0.3, 7.0],
                           [0.0, 0.2, 0.2, 0.8, 0.4, 0.6]])
    candidates = torch.tensor([[False, True, True, True, True, True],
                               [True, True, True, True, True, False]])
    frac = torch.tensor([0.6, 0.2])  # 5 candidates each: drop round(3.0) = 3 and round(1.0) = 1
    drop = lowest_ranked(scores, candidates, frac)
    # row 0: 0.1 (idx 1), 0.1 (idx 3, tie -> lower index first), 0.3 (idx 4); idx 0 is no candidate
    assert drop.tolist() == [[False, True, False, True, True, False],
                             [True, False, False, False, False, False]]
    assert not lowest_ranked(scores, candidates, torch.zeros(2)).any()
    assert lowest_ranked(scores, candidates, torch.ones(2)).equal(candidates)


def test_text_attention_received_equals_the_attention_maps():
    from compression.tiny_llava import keys_dropped, text_attention_received

    torch.manual_seed(0)
    module = TinyLlavaModule(preset="nano", tower_steps=0)
    model = module.model.eval()
    ds = ShapesVQA("train", 3, 24, 36, max_count=3)
    batch = collate([ds[i] for i in range(3)])
    inputs = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}
    text_rows = (batch["input_ids"] != module.tok.image_id) & (batch["labels"] == -100)
    hidden = torch.zeros_like(text_rows)
    hidden[0, 5:9] = True  # keys hidden from every layer (as stage-1 merge members are)
    for layer in (0, module.config.text_layers - 1):
        for h in (None, hidden):
            got = text_attention_received(model, inputs, batch["attention_mask"], text_rows, layer, h)
            with torch.no_grad(), keys_dropped(model, h, 0):
                out = model(**inputs, attention_mask=batch["attention_mask"], output_attentions=True)
            probs = out.attentions[layer].float().mean(1)  # (B, L, L)
            want = (probs * text_rows[:, :, None]).sum(1)
            torch.testing.assert_close(got, want)
            if h is not None:
                assert float(got[0, 5:9].abs().max()) == 0.0  # hidden keys receive nothing
    sdpa = TinyLlavaModule(preset="nano", tower_steps=0, train_attention="sdpa").model.eval()
    with pytest.raises(RuntimeError, match="eager"):
        text_attention_received(sdpa, inputs, batch["attention_mask"], text_rows, 0)


def test_guided_token_dropout_drops_the_least_attended_vision_tokens():
    module = TinyLlavaModule(preset="nano", tower_steps=0, token_dropout=1.0, token_dropout_max=1.0,
                             token_dropout_layers=[2], token_dropout_guided=1.0)
    n_vis = 36
    ids = torch.tensor([[1, 4] + [module.tok.image_id] * n_vis + [7, 8, 5]] * 16)
    scores = torch.rand(16, ids.shape[1])
    hidden = torch.zeros_like(ids, dtype=torch.bool)
    hidden[:, 2:6] = True  # already hidden: never ranked, never counted
    asked = []

    def text_attention(layer):
        asked.append(layer)
        return scores

    drop, first = module.sample_token_drop(ids, torch.Generator().manual_seed(0), text_attention, hidden)
    assert first == 2 and asked == [1]  # ranked by the attention of the layer before the first dropped one
    assert not (drop & hidden).any() and not drop[:, :2].any() and not drop[:, -3:].any()
    for row in range(16):
        d = drop[row, 6:2 + n_vis]
        if d.any() and not d.all():  # every dropped token is attended less than every kept one
            kept = scores[row, 6:2 + n_vis][~d]
            assert float(scores[row, 6:2 + n_vis][d].max()) < float(kept.min())
    assert drop.sum(1).float().std() > 0  # the fraction still varies per row
    # random dropout (share 0) ignores the callable and keeps its old draws
    plain = TinyLlavaModule(preset="nano", tower_steps=0, token_dropout=1.0, token_dropout_max=1.0,
                            token_dropout_layers=[2])
    a = plain.sample_token_drop(ids, torch.Generator().manual_seed(0), text_attention, hidden)[0]
    b = plain.sample_token_drop(ids, torch.Generator().manual_seed(0))[0]
    assert a.equal(b) and asked == [1]
    with pytest.raises(ValueError, match="token_dropout_guided"):
        TinyLlavaModule(preset="nano", token_dropout_guided=1.5)


def test_guided_token_dropout_training_step():
    torch.manual_seed(0)
    module = TinyLlavaModule(preset="nano", tower_steps=0, merge_aware=0.5, token_dropout=1.0,
                             token_dropout_layers=[1], token_dropout_guided=1.0)
    ds = ShapesVQA("train", 4, 24, 36, max_count=3)
    batch = collate([ds[i] for i in range(4)])
    loss = module._common_step(batch, "train")
    loss.backward()
    assert torch.isfinite(loss)
    assert module.model.model.multi_modal_projector.linear_1.weight.grad is not None


def test_tower_attributes_limit_the_phase1_loss():
    torch.manual_seed(0)
    module = TinyLlavaModule(preset="nano", tower_steps=2, tower_attributes=["shape", "colour", "count"])
    ds = ShapesVQA("train", 4, 24, 36, max_count=3)
    batch = collate([ds[i] for i in range(4)])
    module._tower_step(batch).backward()
    sizes = list(ATTRIBUTE_GROUPS.values())
    rows = module.tower_head.weight.grad.split(sizes, dim=0)  # one block of head rows per attribute
    names = list(ATTRIBUTE_GROUPS)
    assert rows[names.index("position")].abs().sum() == 0  # position is not learnt
    assert all(rows[names.index(n)].abs().sum() > 0 for n in ("shape", "colour", "count"))
    with pytest.raises(ValueError, match="tower_attributes"):
        TinyLlavaModule(preset="nano", tower_attributes=["where"])


def test_object_patches_cover_the_object_and_object_pooling_reads_only_them():
    ds = ShapesVQA("train", 6, 24, 36, max_count=3)
    batch = collate([ds[i] for i in range(6)])
    objects = batch["object_patches"]  # (6, 36) bool
    assert objects.shape == (6, 36) and objects.any(1).all() and not objects.all(1).any()
    # the most saturated patch (objects are saturated, backgrounds are not) is an object patch
    rgb = (batch["pixel_values"] + 1) / 2  # (6, 3, 24, 24)
    saturation = rgb.amax(1) - rgb.amin(1)  # (6, 24, 24)
    per_patch = saturation.view(6, 6, 4, 6, 4).mean((2, 4)).flatten(1)  # (6, 36)
    assert objects.gather(1, per_patch.argmax(1, keepdim=True)).all()

    torch.manual_seed(0)
    module = TinyLlavaModule(preset="nano", tower_steps=2, tower_object_attributes=["position"])
    seen = []
    module.tower_head.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    loss = module._tower_step(batch)
    with torch.no_grad():
        out = module.tower(batch["pixel_values"], output_hidden_states=True)
        tokens = out.hidden_states[module.model.config.vision_feature_layer][:, 1:]  # (6, 36, C)
    object_mean = torch.stack([tokens[i, objects[i]].mean(0) for i in range(6)])
    assert len(seen) == 2  # the mean of all patches, then the mean of the object patches
    torch.testing.assert_close(seen[0], tokens.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[1], object_mean, rtol=1e-5, atol=1e-5)
    # position is scored on the object mean, the other attributes on the mean of all patches
    with torch.no_grad():
        sizes = list(ATTRIBUTE_GROUPS.values())
        by_all = module.tower_head(tokens.mean(1)).split(sizes, -1)
        by_object = module.tower_head(object_mean).split(sizes, -1)
        chosen = [by_object[i] if name == "position" else by_all[i] for i, name in enumerate(ATTRIBUTE_GROUPS)]
        expected = sum(F.cross_entropy(lg, batch["attrs"][:, i]) for i, lg in enumerate(chosen)) / len(chosen)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tower_object_attributes"):
        TinyLlavaModule(preset="nano", tower_object_attributes=["where"])
