"""EAGLE drafter training (LightningModule + plain loop) and the ``vtw generate`` speculative options."""

from __future__ import annotations

import argparse

import pytest
import torch

from ar_gen.eagle import load_eagle
from ar_gen.gpt import GPT, gpt_config, save_gpt
from ar_gen.lit_drafter import EagleDrafterModule, train_eagle
from ar_gen.sampling import SamplingConfig, generate
from ar_gen.spec_cli import add_speculative_arguments, build_speculative, make_generator
from ar_gen.spec_models import EagleDraftRunner


def _target(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(gpt_config("GPT-test", vocab_size=24, block_size=16, num_classes=4))
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model.eval()


def _batches(target: GPT, n: int = 64, batch: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    labels = torch.arange(n) % 4
    tokens = generate(target, labels, SamplingConfig(temperature=0.7), generator=torch.Generator().manual_seed(seed))
    return [{"tokens": tokens[i:i + batch], "label": labels[i:i + batch]} for i in range(0, n, batch)]


class _Tok:
    """Stand-in tokenizer exposing only ``codebook_embeddings()``."""

    def codebook_embeddings(self) -> torch.Tensor:
        return torch.randn(24, 4, generator=torch.Generator().manual_seed(0))


def test_lightning_module_fits_and_checkpoint_loads(tmp_path) -> None:
    from lightning.pytorch import Trainer

    target = _target()
    save_gpt(target, tmp_path / "gpt")
    module = EagleDrafterModule(str(tmp_path / "gpt"), max_steps=3, warmup_steps=1)
    batches = _batches(target, n=32)
    items = [{"tokens": b["tokens"][i], "label": b["label"][i]} for b in batches for i in range(len(b["label"]))]
    loader = torch.utils.data.DataLoader(items, batch_size=16)
    trainer = Trainer(max_steps=3, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    ckpt = tmp_path / "drafter.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=True)
    assert not any(k.startswith("_target") or "tok_embeddings" in k for k in raw["state_dict"])  # target not stored
    drafter, meta = load_eagle(ckpt)
    for k, v in module.drafter.state_dict().items():
        assert torch.equal(v, drafter.state_dict()[k])
    # the generate options build a working LANTERN generator from that checkpoint
    parser = argparse.ArgumentParser()
    add_speculative_arguments(parser)
    args = parser.parse_args(["--speculative", "lantern", "--drafter", str(ckpt), "--gamma", "3",
                              "--lantern-k", "1000", "--neighbour-cache", str(tmp_path / "nn")])
    with pytest.warns(UserWarning, match="exceeds"):
        spec = build_speculative(args, target, _Tok())
    assert spec.acceptance.lantern_k == 23 and spec.draft == "sample"  # default: drafts sampled from q
    top1 = build_speculative(parser.parse_args(["--speculative", "exact", "--drafter", str(ckpt), "--draft", "top1"]),
                             target)
    assert top1.draft == "top1"
    with pytest.warns(UserWarning, match="exceeds"):
        official = build_speculative(parser.parse_args(["--speculative", "lantern", "--drafter", str(ckpt),
                                                        "--lantern-residual", "official",
                                                        "--neighbour-cache", str(tmp_path / "nn")]), target, _Tok())
    assert official.acceptance.residual == "official" and spec.acceptance.residual == "aggregated"
    out = spec.generate(torch.tensor([0, 1]), SamplingConfig(cfg_scale=2.0, top_k=10),
                        generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (2, 16) and out.stats.target_forwards >= 1
    assert build_speculative(parser.parse_args([]), target) is None


def test_generate_options_fail_fast(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    add_speculative_arguments(parser)
    target = _target()
    with pytest.raises(ValueError, match="needs --drafter"):
        build_speculative(parser.parse_args(["--speculative", "exact"]), target)
    with pytest.raises(ValueError, match="does not exist"):
        build_speculative(parser.parse_args(["--speculative", "exact", "--drafter", str(tmp_path / "x")]), target)
    with pytest.raises(ValueError, match="codebook_embeddings"):
        build_speculative(parser.parse_args(["--speculative", "lantern", "--drafter", str(tmp_path)]), target)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="junk.ckpt|pickle|load"):
        build_speculative(parser.parse_args(["--speculative", "exact", "--drafter", str(tmp_path / "junk.ckpt")]),
                          target)


@pytest.mark.slow
def test_trained_drafter_accepts_more_than_untrained() -> None:
    target = _target(1)
    batches = _batches(target, n=128, batch=32, seed=1)
    untrained, _ = train_eagle(target, batches, steps=0, progress=False)
    trained, log = train_eagle(target, batches, steps=150, lr=3e-3, progress=False)
    assert log[-1]["loss"] < log[0]["loss"]
    labels = torch.arange(8) % 4
    sampling = SamplingConfig(cfg_scale=1.5, temperature=0.7)
    taus = []
    for drafter in (untrained, trained):
        spec = make_generator(target, EagleDraftRunner(drafter, target), "exact", gamma=3)
        taus.append(spec.generate(labels, sampling, generator=torch.Generator().manual_seed(0)).stats.mean_accepted_length)
    assert taus[1] > taus[0] + 0.2, taus


def test_ngram_drafter_file_through_generate_options(tmp_path) -> None:
    from ar_gen.spec_models import NGramDraftRunner, NGramTable

    target = _target()
    batch = _batches(target, n=32)[0]
    NGramTable.fit(batch["tokens"], batch["label"], 24, 4).save(tmp_path / "ngram.safetensors")
    parser = argparse.ArgumentParser()
    add_speculative_arguments(parser)
    spec = build_speculative(parser.parse_args(["--speculative", "exact", "--drafter",
                                                str(tmp_path / "ngram.safetensors")]), target)
    assert isinstance(spec.drafter, NGramDraftRunner)
    sampling = SamplingConfig(cfg_scale=2.0, greedy=True)
    out = spec.generate(torch.tensor([0, 1, 2]), sampling)
    assert torch.equal(out.tokens, generate(target, torch.tensor([0, 1, 2]), sampling))
    small = GPT(gpt_config("GPT-test", vocab_size=24, block_size=36, num_classes=4))
    with pytest.raises(ValueError, match="does not fit"):
        build_speculative(parser.parse_args(["--speculative", "exact", "--drafter",
                                             str(tmp_path / "ngram.safetensors")]), small)
