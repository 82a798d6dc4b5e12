"""HunyuanVideo's shipped configs are the real 13B model's (its recipe's fit: tests/unit/test_estimate.py)."""

from pathlib import Path

import torch

from finetune.config import load_recipe
from finetune.lora import target_modules
from finetune.models import get_family
from finetune.real_models import model_configs

RECIPE = Path(__file__).parents[2] / "recipes" / "hunyuan" / "hunyuanvideo_24gb.yaml"


def test_shipped_configs_are_the_real_model():
    from diffusers import HunyuanVideoTransformer3DModel

    label, transformer, (llama, clip), vae = model_configs(load_recipe(RECIPE))
    assert label == "HunyuanVideo 13B"
    assert transformer["num_attention_heads"] * transformer["attention_head_dim"] == 3072
    assert (transformer["num_layers"], transformer["num_single_layers"]) == (20, 40)
    assert (transformer["text_embed_dim"], transformer["pooled_projection_dim"]) == (4096, 768)
    assert (llama["hidden_size"], llama["num_hidden_layers"], clip["hidden_size"]) == (4096, 32, 768)
    assert vae["latent_channels"] == 16 and vae["scaling_factor"] == 0.476986
    # The diffusers defaults are the converted 13B checkpoint: our config must not drift from them.
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel()
    assert {k: transformer[k] for k in model.config if k in transformer and not k.startswith("_")} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if k in transformer
    }
    assert 12.5e9 < sum(p.numel() for p in model.parameters()) < 13.2e9
    # "blocks": 14 linears in each of the 20 dual-stream blocks, 6 in each of the 40 single-stream ones.
    modules = target_modules(get_family("hunyuan"), model, "blocks")
    assert len(modules) == 20 * 14 + 40 * 6
    assert not [m for m in modules if not m.startswith(("transformer_blocks.", "single_transformer_blocks."))]
