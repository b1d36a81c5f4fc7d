"""The speculative demo stage in quick mode on random tiny models (pipeline smoke test, no numbers)."""

from __future__ import annotations

import pytest
import torch

from ar_gen.gpt import GPT, gpt_config, save_gpt
from ar_gen.sampling import SamplingConfig, generate


@pytest.mark.slow
def test_speculative_demo_stage_quick(tmp_path, monkeypatch) -> None:
    import ar_gen.lit_drafter as lit
    from tokenizers_img.vqgan import VQGAN
    from workbench.demo_stages import DemoContext
    from workbench.demo_stages import speculative as stage

    torch.manual_seed(0)
    tok = VQGAN.from_preset("tiny", codebook_size=32)
    tok.save_pretrained(tmp_path / "tok")
    target = GPT(gpt_config("GPT-test", vocab_size=32, block_size=64, num_classes=30)).eval()
    torch.nn.init.normal_(target.output.weight, std=0.3)
    save_gpt(target, tmp_path / "gpt")
    labels = torch.arange(16) % 30
    toks = generate(target, labels, SamplingConfig(), generator=torch.Generator().manual_seed(0))
    (tmp_path / "shards").mkdir()
    monkeypatch.setattr(lit, "token_batches", lambda *a, **k: [{"tokens": toks, "label": labels}])

    ctx = DemoContext(out_dir=tmp_path / "demo", quick=True,
                      artifacts={"gpt_ckpt": str(tmp_path / "gpt"), "shards_dir": str(tmp_path / "shards"),
                                 "tokenizer_dir": str(tmp_path / "tok")})
    result = stage.run(ctx)
    assert (tmp_path / "demo" / "speculative" / "plain_vs_lantern.png").is_file()
    assert (tmp_path / "demo" / "speculative" / "drafter" / "model.safetensors").is_file()
    assert "plain AR" in result.report_md and result.metrics["lantern_mean_accepted_length"] >= 1.0
    with pytest.raises(ValueError, match="gpt_ckpt"):
        stage.run(DemoContext(out_dir=tmp_path / "demo2", quick=True))
