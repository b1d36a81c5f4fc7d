"""Vision/text tower builders: tiny random towers saved and loaded back the way a user would."""

from __future__ import annotations

import pytest
import torch

from vision.towers import (
    CheckpointMismatchError,
    build_text_tower,
    build_vision_tower,
    read_state_dict,
    save_state_dict,
)


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("preset", ["timm-vit-tiny-32", "clip-tiny-32"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_vision_tower_save_load_round_trip(tmp_path, preset, suffix):
    torch.manual_seed(0)
    tower = build_vision_tower(preset).eval()
    out = tower(_images())
    assert out.tokens.shape == (2, tower.num_patches, tower.width)
    assert out.pooled.shape == (2, tower.embed_dim)
    path = tower.save(tmp_path / f"tower{suffix}")
    torch.manual_seed(1)  # a different random init must be overwritten by the checkpoint
    loaded = build_vision_tower(preset, pretrained=str(path)).eval()
    again = loaded(_images())
    assert torch.equal(out.tokens, again.tokens) and torch.equal(out.pooled, again.pooled)


def test_text_tower_round_trip_from_full_clip_checkpoint(tmp_path):
    torch.manual_seed(0)
    vision = build_vision_tower("clip-tiny-32").eval()
    text = build_text_tower("clip-tiny-32").eval()
    full = {**vision.tower_state_dict(), **text.tower_state_dict()}  # a whole open_clip CLIP checkpoint
    path = save_state_dict(full, tmp_path / "clip.safetensors")
    import open_clip

    clip = open_clip.create_model("wb-clip-tiny-32", pretrained=str(path))  # open_clip itself accepts it
    captions = ["a small red circle", "a large blue square"]
    ref = clip.eval().encode_text(open_clip.get_tokenizer("wb-clip-tiny-32")(captions, context_length=32))
    text2 = build_text_tower("clip-tiny-32", pretrained=str(path)).eval()
    vision2 = build_vision_tower("clip-tiny-32", pretrained=str(path)).eval()
    assert torch.allclose(text2(captions), ref, atol=1e-6)
    assert torch.equal(text2(captions), text(captions))
    assert torch.equal(vision2(_images()).pooled, vision(_images()).pooled)


def test_wrong_architecture_names_keys(tmp_path):
    clip_path = build_vision_tower("clip-tiny-32").save(tmp_path / "clip_visual.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        build_vision_tower("timm-vit-tiny-32", pretrained=str(clip_path))
    msg = str(err.value)
    assert "missing keys" in msg and "pos_embed" in msg
    assert "unexpected keys" in msg and "visual.conv1.weight" in msg

    # same family, different width: shape mismatches are named with both shapes
    small = build_vision_tower("timm-vit-small-32").save(tmp_path / "small.pt")
    with pytest.raises(CheckpointMismatchError) as err:
        build_vision_tower("timm-vit-tiny-32", pretrained=str(small))
    msg = str(err.value)
    assert "shape-mismatched keys" in msg and "cls_token: checkpoint (1, 1, 128) vs model (1, 1, 64)" in msg


def test_bad_paths_and_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_vision_tower("timm-vit-tiny-32", pretrained=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="unknown vision tower"):
        build_vision_tower("not-a-tower")
    tower = build_vision_tower("timm-vit-tiny-32")
    with pytest.raises(ValueError, match="expects 32x32 images, got 64x64"):
        tower(_images(size=64))


def test_checkpoint_containers_and_weights_only(tmp_path):
    tower = build_vision_tower("timm-vit-tiny-32")
    state = tower.tower_state_dict()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    got = read_state_dict(tmp_path / "wrapped.pth")
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)

    import fractions  # an arbitrary pickled object: refused by weights_only=True

    torch.save({"obj": fractions.Fraction(1, 3)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        read_state_dict(tmp_path / "evil.pt")


@pytest.mark.parametrize("name,tag", [("open_clip:ViT-B-32", "openai"), ("timm:vit_tiny_patch16_224", True)])
def test_offline_named_tag_gives_clear_error(monkeypatch, name, tag):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    try:
        build_vision_tower(name, pretrained=tag)
    except RuntimeError as err:
        msg = str(err)
        assert "HF_HUB_OFFLINE=1" in msg and "local path" in msg
    else:  # only possible when the weights sit in the local HF cache
        pytest.skip(f"{name} {tag} found in the local cache")


def test_unknown_tag_is_rejected_before_download():
    with pytest.raises(ValueError, match="no tag 'not-a-tag'"):
        build_vision_tower("open_clip:ViT-B-32", pretrained="not-a-tag")


def test_demo_classifier_checkpoint_loads_as_tower(tmp_path):
    """The evaluation classifier that `make demo` saves (timm ViT with a 30-way head) is a tower preset."""
    from vision.classifier import build_vit, classifier_config, classifier_features, save_classifier

    torch.manual_seed(0)
    config = classifier_config("tiny", num_classes=30)
    net = build_vit(config).eval()
    save_classifier(net, config, None, tmp_path / "classifier")
    tower = build_vision_tower("timm-vit-classifier-tiny", pretrained=str(tmp_path / "classifier" / "model.safetensors"))
    x = _images()
    with torch.no_grad():
        assert torch.allclose(tower.eval()(x).pooled, classifier_features(net, x), atol=1e-6)


def test_mismatch_message_collapses_numbered_blocks_and_keeps_single_shapes():
    from torch import nn

    from vision.towers import check_state_dict

    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(20)])  # keys "0.weight", "0.bias", ... "19.bias"
    with pytest.raises(CheckpointMismatchError) as err:
        check_state_dict(model, {}, "empty.pt")
    msg = str(err.value)
    assert "missing keys (40): 0.* (2), 1.* (2)," in msg and "11.* (2) ... (+8 more)" in msg
    assert "12.*" not in msg
    # three shape mismatches in three blocks, limit 2: each block holds one key, which keeps its shapes
    state = dict(model.state_dict())
    for i in (0, 5, 9):
        state[f"{i}.weight"] = torch.zeros(3, 2)
    with pytest.raises(CheckpointMismatchError) as err:
        check_state_dict(model, state, "bad.pt", limit=2)
    msg = str(err.value)
    assert "shape-mismatched keys (3): 0.weight: checkpoint (3, 2) vs model (2, 2), 5.weight: checkpoint" in msg
    assert msg.endswith("... (+1 more)")
