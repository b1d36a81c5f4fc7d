import os

# Any accidental hub download must fail at once instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check_gpt_generates_decodable_tokens(tok, top_k: int) -> None:
    """A tokenizer's ids work unchanged with the AR GPT: sampled ids are in range and decode to images.

    Shared by the SEED and TokenFlow tests (imported as ``from conftest import ...``)."""
    import torch

    from ar_gen.gpt import GPT, gpt_config
    from ar_gen.sampling import SamplingConfig, generate

    h, w = tok.token_grid
    torch.manual_seed(0)
    model = GPT(gpt_config("GPT-test", vocab_size=tok.vocab_size, block_size=tok.seq_len, grid_h=h, grid_w=w,
                           num_classes=30)).eval()
    ids = generate(model, torch.tensor([0, 7]), SamplingConfig(top_k=top_k), generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, tok.seq_len) and int(ids.max()) < tok.vocab_size
    with torch.no_grad():
        images = tok.decode(ids)
    assert images.shape == (2, 3, tok.image_size, tok.image_size) and torch.isfinite(images).all()
