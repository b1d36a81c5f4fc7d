"""The LLaVA-1.5 path of ``vtw compress llava``: a directory with a Hugging Face processor (here a tiny random
LLaVA-1.5-shaped model with a locally built tokenizer and CLIP image processor, saved as the hub's
llava-hf checkpoints are) answers questions about image files through the same runner as the tiny
shapes-VQA model, and its undropped greedy answer equals Hugging Face's own ``generate``."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def llava15_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<unk>", "<s>", "</s>", "<pad>", "USER", ":", "ASSISTANT", "what", "is", "in", "the", "picture", "?",
             "a", "red", "square", "circle", "blue"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", padding_side="left")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=4,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=48, patch_size=4)  # 12 x 12 patches: 3 x 3 windows tile the grid
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=144, vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("llava15") / "llava-1.5-tiny"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    images = []
    for i, colour in enumerate([(200, 30, 30), (20, 40, 220)]):
        img = Image.new("RGB", (60, 48), (240, 240, 240))
        img.paste(colour, (10 + 20 * i, 8, 34 + 20 * i, 32))
        images.append(path.parent / f"img{i}.png")
        img.save(images[-1])
    return path, images


def test_runner_answers_equal_hf_generate(llava15_dir):
    from compression import llava_runner as R
    from compression.llava_eval import LlavaArm, ask_llava, llava15_inputs
    from compression.tiny_llava import load_llava

    path, images = llava15_dir
    loaded = load_llava(path)
    assert not loaded.tiny
    pil = [Image.open(p).convert("RGB") for p in images]
    questions = ["what is in the picture ?", "what is the blue square ?"]
    px, prompts = llava15_inputs(loaded.tokenizer, pil, questions)
    assert all(int((p == loaded.model.config.image_token_index).sum()) == 144 for p in prompts)
    rows = ask_llava(loaded.model, loaded.tokenizer, pil, questions, [LlavaArm("none", "none")], max_new_tokens=4)
    for i, prompt in enumerate(prompts):  # HF's own greedy decoding, one prompt at a time (no padding)
        with torch.no_grad():
            ref = loaded.model.generate(input_ids=prompt[None], pixel_values=px[i:i + 1], max_new_tokens=4,
                                        do_sample=False, min_new_tokens=4)[0, len(prompt):]
        tokens, _ = R.generate(loaded.model, px[i:i + 1], [prompt], None, max_new_tokens=4)
        assert tokens[0].tolist() == ref.tolist()
        expected = ref.tolist()
        if loaded.tokenizer.tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(loaded.tokenizer.tokenizer.eos_token_id)]
        assert rows[0]["answers"][i] == loaded.tokenizer.tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert rows[0]["vis_tokens_in"] == 144


def test_compress_llava_cli_on_a_llava15_directory(llava15_dir, tmp_path, capsys):
    from workbench.cli import main

    path, images = llava15_dir
    out = tmp_path / "answers"
    argv = ["compress", "llava", "--ckpt", str(path), "--image", *map(str, images), "--question",
            "what is in the picture ?", "--method", "mustdrop", "fastv", "--fastv-keep", "8",
            "--global-thr", "0.5", "--individual-thr", "0.5", "--merge-threshold", "-1", "--max-new-tokens", "3",
            "--out", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "answers.json").read_text())
    rows = {r["arm"]: r for r in record["rows"]}
    assert record["mustdrop"]["merge_threshold"] == -1 and record["questions"] == ["what is in the picture ?"] * 2
    assert rows["none"]["vis_tokens_in"] == 144 and rows["none"]["vis_tokens_final"] == 144
    assert rows["mustdrop s1"]["vis_tokens_in"] == 16  # tau -1: each of the 16 windows merges into one token
    assert rows["mustdrop s1+s2+s3"]["vis_tokens_final"] <= 16
    assert rows["fastv K=2 keep=8"]["vis_tokens_final"] == 8
    assert all(len(r["answers"]) == 2 for r in rows.values())
    with pytest.raises(SystemExit, match="give --image and --question"):
        main(["compress", "llava", "--ckpt", str(path)])
    with pytest.raises(SystemExit, match="cannot read it as an image"):
        main(["compress", "llava", "--ckpt", str(path), "--image", str(path / "config.json"), "--question", "what ?"])
