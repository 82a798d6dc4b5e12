"""A tiny HunyuanVideoPipeline built from the real diffusers/transformers classes and saved with save_pretrained.

Everything is built offline. The Llama tokenizer is a word-level `tokenizers` model: every word and punctuation
mark of HunyuanVideo's prompt template is one token, and so is each newline. That makes the template's prefix
exactly `crop_start` (95) tokens, so the pipeline's crop keeps the prompt's first token, as it does with the
real Llama-3 tokenizer. It is saved as PreTrainedTokenizerFast: transformers 5's LlamaTokenizer rebuilds its
model from vocab + merges as BPE on reload, so a word-level vocabulary would not survive save/load. The CLIP
tokenizer is the real CLIPTokenizer class over a small BPE vocabulary (one merge chain per word).

The VAE keeps the real compression (4x time, 8x space; 16 channels here as in the real model) at tiny widths.
The Llama text encoder has 3 layers so that the hidden state the pipeline reads (the third from last) is a
layer's output, not the embedding table.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "a red green blue yellow square circle ball moving left right up down over in of style".split()
LLAMA_DIM, CLIP_DIM = 16, 12
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tiny_llama_tokenizer():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Words, punctuation runs and single newlines are tokens; other whitespace separates them.
    pre = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="removed", invert=True)
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    pieces = [p for p, _ in pre.pre_tokenize_str(template.replace("{}", " ".join(WORDS)))]
    names = SPECIAL + ["<unk>", "<pad>"]
    vocab = {t: i for i, t in enumerate(names + sorted(set(pieces) - set(names)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    backend.add_special_tokens(SPECIAL)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",  # as the real one: the pipeline crops the template from the left
    )
    prefix = template.split("{}")[0]
    assert len(tokenizer(prefix).input_ids) == DEFAULT_PROMPT_TEMPLATE["crop_start"]
    return tokenizer


def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(token, len(vocab))
    for word in WORDS:
        symbols = [*word[:-1], word[-1] + "</w>"]  # CLIP's BPE ends each word with </w>
        for s in symbols:
            vocab.setdefault(s, len(vocab))
        merged = symbols[0]
        for s in symbols[1:]:
            merges.append((merged, s))
            merged += s
            vocab.setdefault(merged, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)))


def build_tiny_hunyuan(folder: Path, seed: int = 0, layers: int = 1, single_layers: int = 1) -> Path:
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_llama_tokenizer(), tiny_clip_tokenizer()
    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=LLAMA_DIM,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer_2),
            hidden_size=CLIP_DIM,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer_2.bos_token_id,
            eos_token_id=tokenizer_2.eos_token_id,  # the pooled output is read at the first end-of-text token
            pad_token_id=tokenizer_2.pad_token_id,
        )
    )
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=layers,
        num_single_layers=single_layers,
        num_refiner_layers=1,
        mlp_ratio=4.0,  # as every HunyuanVideo checkpoint
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,  # HunyuanVideo T2V is guidance-distilled
        text_embed_dim=LLAMA_DIM,
        pooled_projection_dim=CLIP_DIM,
        rope_axes_dim=(2, 2, 4),  # sums to attention_head_dim
    )
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=16,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        mid_block_add_attention=False,
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),  # the converted checkpoint's scheduler
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(folder)
    return Path(folder)
