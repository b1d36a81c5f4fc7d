import pytest
import torch

from vision.classifier import (
    ClassifierConfig,
    ImageClassifier,
    build_vit,
    classifier_config,
    classifier_features,
    load_classifier,
    save_classifier,
    warmup_cosine,
)

TINY = dict(embed_dim=32, depth=1, num_heads=2)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    config = classifier_config("tiny", num_classes=5, image_size=16, **TINY)
    net = build_vit(config).eval()
    save_classifier(net, config, [f"c{i}" for i in range(5)], tmp_path / "clf")
    loaded, info = load_classifier(tmp_path / "clf")
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.equal(net(x), loaded(x))
    assert info["class_names"] == ["c0", "c1", "c2", "c3", "c4"] and info["image_size"] == 16
    assert classifier_features(loaded, x).shape == (3, 32)
    assert not list(tmp_path.glob("clf/*.tmp"))  # nothing half-written left behind


def test_wrong_architecture_names_the_keys(tmp_path):
    config = classifier_config("tiny", num_classes=5, image_size=16, **TINY)
    save_classifier(build_vit(config), config, None, tmp_path / "clf")
    import json

    meta = json.loads((tmp_path / "clf/config.json").read_text())
    meta["config"]["depth"] = 2
    meta["config"]["num_classes"] = 7
    (tmp_path / "clf/config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"missing keys \(12\): blocks\.1\..*shape-mismatched keys \(2\): .*head\.weight: checkpoint \(5, 32\) vs model \(7, 32\)"):
        load_classifier(tmp_path / "clf")


def test_loads_from_lightning_checkpoint(tmp_path):
    module = ImageClassifier(num_classes=4, image_size=16, **TINY, class_names=list("abcd"))
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    net, info = load_classifier(path)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    module.eval()
    assert torch.equal(module(x), net(x)) and info["class_names"] == list("abcd")
    torch.save({"state_dict": {"other.weight": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="not a checkpoint of vision.classifier.ImageClassifier"):
        load_classifier(tmp_path / "bad.ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_classifier(tmp_path / "missing")


def test_presets_and_bad_sizes():
    assert classifier_config("small").embed_dim == 384
    with pytest.raises(ValueError, match="unknown classifier preset"):
        classifier_config("huge")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        build_vit(ClassifierConfig(image_size=30, patch_size=4))
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        build_vit(ClassifierConfig(image_size=36, patch_size=6, stem="conv"))


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_stems_give_the_same_token_grid(stem):
    config = classifier_config("tiny", image_size=32, stem=stem, **TINY)
    net = build_vit(config).eval()
    tokens = net.forward_features(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert tokens.shape == (2, 1 + 8 * 8, 32)  # CLS + an 8x8 grid for patch 4 at 32 px
    assert net.patch_embed.num_patches == 64


def test_warmup_cosine_schedule_shape():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.01)
    values = [warmup_cosine(s, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
