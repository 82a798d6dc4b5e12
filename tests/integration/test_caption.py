"""`finetune caption DIR` end to end with a tiny random LLaVA (a real transformers VLM class, built offline).

Why LLaVA and not SmolVLM (the default model): SmolVLM's processor needs its own image splitter and a tokenizer
with its special image tokens; LLaVA's needs only a CLIP image processor and any tokenizer with an `<image>`
token, which `tokenizers` builds from a word list. The captioning code is the same for both: it goes through
AutoProcessor + AutoModelForImageTextToText and the processor's chat template.
"""

from __future__ import annotations

import numpy as np
import pytest

from finetune.caption import Captioner, caption_folder, middle_frame
from finetune.cli import main
from tests.clips import frame_pattern, write_corrupt, write_image, write_video

WORDS = "a the cat dog walks runs on grass beach red blue slowly camera pans sunny day street night".split()
TEMPLATE = (
    "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def build_tiny_llava(folder):
    import torch
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

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {word: i for i, word in enumerate(specials + WORDS + ["USER", ":", "ASSISTANT"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",  # CLIP's CLS token is dropped...
        num_additional_image_tokens=1,  # ...after being counted: 4 patches + CLS - CLS = 4 image tokens
        chat_template=TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
            patch_size=14,
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        image_token_index=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    # Random weights could pick </s> first and caption nothing; a random model that never stops is enough here.
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return str(build_tiny_llava(tmp_path_factory.mktemp("vlm") / "tiny-llava"))


def dataset(folder):
    write_video(folder / "clip_a.mp4", 9, 64, 48, color=(255, 0, 0))
    write_video(folder / "sub" / "clip_b.mp4", 9, 64, 48, color=(0, 0, 255))
    write_image(folder / "still.png", 40, 30)
    write_video(folder / "kept.mp4", 9, 64, 48, color=(0, 255, 0))
    (folder / "kept.txt").write_text("my own caption\n")
    write_corrupt(folder / "broken.mp4")
    return folder


def test_middle_frame_is_the_clips_middle(tmp_path):
    path = write_video(tmp_path / "c.mp4", 9, 128, 48, color=(255, 0, 0))
    picture = np.asarray(middle_frame(path)).astype(int)
    assert picture.shape == (48, 128, 3)
    # The square moves 6 px a frame, so frame 4 of 9 is the one this picture matches best, and closely.
    errors = [
        np.abs(picture - frame_pattern(i, 9, 128, 48, (255, 0, 0)).astype(int)).mean() for i in range(9)
    ]
    assert int(np.argmin(errors)) == 4 and errors[4] < 2, errors


def test_caption_folder(tmp_path, tiny_vlm, capsys):
    folder = dataset(tmp_path / "data")
    report = caption_folder(folder, model=tiny_vlm, trigger="ohwx")

    written = {p.relative_to(folder).as_posix() for p in report.written}
    assert written == {"clip_a.txt", "sub/clip_b.txt", "still.txt"}
    assert [p.name for p in report.kept] == ["kept.mp4"]
    assert [p.path.name for p in report.skipped] == ["broken.mp4"]
    assert "cannot be decoded" in report.skipped[0].reason
    assert not (folder / "broken.txt").exists()
    assert (folder / "kept.txt").read_text() == "my own caption\n"

    # Each file holds exactly what the model generates for that file's picture, after the trigger.
    captioner = Captioner(tiny_vlm)
    for media in ("clip_a.mp4", "sub/clip_b.mp4", "still.png"):
        text = (folder / media).with_suffix(".txt").read_text()
        assert text.endswith("\n") and text.count("\n") == 1
        generated = captioner(middle_frame(folder / media))
        assert generated and set(generated.split()) <= set(WORDS + ["USER", ":", "ASSISTANT"])
        assert text == f"ohwx, {generated}\n"
    assert not list(folder.rglob("*.tmp"))

    # A rerun without --overwrite touches nothing (and never loads the model: nothing needs a caption).
    before = {p: p.read_text() for p in folder.rglob("*.txt")}
    report = caption_folder(folder, model="no/such-model-is-loaded")
    assert report.written == [] and len(report.kept) == 4
    assert {p: p.read_text() for p in folder.rglob("*.txt")} == before

    # --overwrite through the CLI: the hand-written caption is replaced, the broken clip is named.
    assert main(["caption", str(folder), "--model", tiny_vlm, "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "broken.mp4" in err and "cannot be decoded" in err
    assert "4 captions written" in err
    kept = (folder / "kept.txt").read_text()
    assert kept != "my own caption\n"
    assert kept == captioner(middle_frame(folder / "kept.mp4")) + "\n"
    assert (folder / "clip_a.txt").read_text() == before[folder / "clip_a.txt"].removeprefix("ohwx, ")


def test_bad_model_is_one_line(tmp_path):
    from finetune.errors import UserError

    folder = tmp_path / "data"
    write_image(folder / "x.png", 8, 8)
    with pytest.raises(UserError, match="cannot load it as a vision-language model"):
        caption_folder(folder, model=str(tmp_path / "missing-model"))


@pytest.mark.parametrize(
    "listing", [("train/metadata.jsonl", '{"file_name": "a.png", "text": "x"}\n'), ("videos.txt", "a.png\n")]
)
def test_a_dataset_that_reads_captions_elsewhere_is_refused(tmp_path, listing):
    """Captions of a metadata file in a split folder, or of prompts.txt, would ignore the .txt files written."""
    from finetune.errors import UserError

    name, text = listing
    write_image(tmp_path / "train" / "a.png", 32, 32)
    (tmp_path / name).write_text(text)
    (tmp_path / "prompts.txt").write_text("x\n")
    with pytest.raises(
        UserError, match=r"(metadata.jsonl|prompts.txt) exists, so training reads captions from it"
    ):
        caption_folder(tmp_path, captioner=object())
    assert not (tmp_path / "train" / "a.txt").exists()
