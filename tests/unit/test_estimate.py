"""`finetune estimate`: the tracker, the block extrapolation, and the relations the estimate must keep at the
real size (Wan2.1 at 832x480x81 = 32,760 tokens), traced on fake tensors on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.config import build_recipe, load_recipe
from finetune.estimate import LiveBytes, estimate_training, trace_training
from finetune.real_models import model_configs

RECIPES = Path(__file__).parents[2] / "recipes"
MODEL_1_3B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
MODEL_14B = "Wan-AI/Wan2.1-T2V-14B-Diffusers"


def recipe(path=MODEL_1_3B, *overrides):
    tree = {"model": {"family": "wan", "path": path}, "data": {"path": "unused"}}
    return build_recipe(tree, list(overrides))


@pytest.fixture(scope="module")
def train_gib():
    """Training estimates (GiB, overheads included), computed once per plan for the whole module."""
    memo = {}

    def get(path, *overrides):
        key = (path, *overrides)
        if key not in memo:
            memo[key] = estimate_training(recipe(path, *overrides))[0]
        return memo[key]

    return get


def test_live_bytes_counts_storages_once_and_frees_them():
    tracker = LiveBytes()
    with tracker:
        a = torch.empty(1000, dtype=torch.float32)  # 4,000 bytes
        view = a[:10]  # same storage: not counted again
        b = torch.empty(500, dtype=torch.bfloat16)  # 1,000 bytes
        assert tracker.device_bytes() == 5000
        del a
        assert tracker.device_bytes() == 5000  # the view keeps the storage alive
        del view
        assert tracker.device_bytes() == 1000
        tracker.retag(b, "host")
        assert tracker.device_bytes() == 0 and tracker.host == 1000
    assert tracker.peak == 5000 and tracker.at_peak["activations"] == 5000


def test_shipped_configs_are_the_real_models():
    _, small, (text,), vae = model_configs(recipe(MODEL_1_3B))
    _, large, _, _ = model_configs(recipe(MODEL_14B))
    assert small["num_attention_heads"] * small["attention_head_dim"] == 1536 and small["num_layers"] == 30
    assert large["num_attention_heads"] * large["attention_head_dim"] == 5120 and large["num_layers"] == 40
    assert text["d_model"] == 4096 and text["num_layers"] == 24 and vae["z_dim"] == 16


def test_unknown_model_is_a_user_error():
    from finetune.errors import UserError

    with pytest.raises(UserError, match="no config known"):
        model_configs(recipe("someone/some-model"))


@pytest.mark.parametrize("overrides", [[], ["memory.base_dtype=fp8", "memory.activation_offload=true"]])
def test_two_and_three_block_traces_extend_to_the_whole_model(overrides):
    """The affine extension that makes the estimate fast, against a trace of every block."""
    config = dict(model_configs(recipe())[1], num_layers=6)
    latent = (1, 16, 5, 30, 52)  # 5 x 15 x 26 = 1,950 tokens
    r = recipe(MODEL_1_3B, *overrides)
    fast = trace_training(r, config, latent)
    exact = trace_training(r, config, latent, exact=True)
    assert fast.peak == pytest.approx(exact.peak, rel=0.01)
    assert fast.host_offloaded == pytest.approx(exact.host_offloaded, rel=0.01)


def test_checkpointing_is_what_makes_1_3b_trainable(train_gib):
    plain = train_gib(MODEL_1_3B, "train.gradient_checkpointing=false")
    checkpointed = train_gib(MODEL_1_3B)
    assert plain > 30  # tens of GB of saved activations at 32,760 tokens
    assert checkpointed < plain / 2
    assert 6 < checkpointed < 16  # weights 2.6 GB + 30 block inputs ~3 GB + one block's recompute


def test_fp8_saves_more_than_a_gigabyte(train_gib):
    assert train_gib(MODEL_1_3B) - train_gib(MODEL_1_3B, "memory.base_dtype=fp8") > 1.0


def test_fewer_frames_cost_less(train_gib):
    assert train_gib(MODEL_1_3B, "data.frames=33") < train_gib(MODEL_1_3B) - 1.0


def test_each_memory_switch_lowers_the_1_3b_estimate(train_gib):
    chunks = train_gib(MODEL_1_3B, "memory.ffn_chunks=4")
    offload = train_gib(MODEL_1_3B, "memory.ffn_chunks=4", "memory.activation_offload=true")
    assert chunks < train_gib(MODEL_1_3B) - 1.0
    assert offload < chunks - 2.0  # 30 block inputs of ~0.1 GB leave the GPU


def test_block_swap_lowers_the_14b_estimate(train_gib):
    resident = train_gib(MODEL_14B, "memory.base_dtype=fp8")
    swapped = train_gib(MODEL_14B, "memory.base_dtype=fp8", "memory.blocks_to_swap=20")
    # 18 blocks' fp8 weights (~0.3 GiB each) leave the GPU; 2 are in flight.
    assert resident - swapped == pytest.approx(18 * 0.31, rel=0.15)


def test_nf4_is_below_fp8(train_gib):
    assert train_gib(MODEL_14B, "memory.base_dtype=nf4") < train_gib(MODEL_14B, "memory.base_dtype=fp8") - 5


@pytest.mark.parametrize(
    "path",
    sorted(RECIPES.glob("*/*_*gb.yaml")),
    ids=lambda p: p.stem,
)
def test_each_tier_recipe_is_estimated_to_fit_its_card(path):
    """The number in each tier recipe's header: training fits the card it is named for."""
    card = float(path.stem.rsplit("_", 1)[1].removesuffix("gb"))
    needed, _ = estimate_training(load_recipe(path))
    assert needed <= card
    assert f"training {needed:.1f} GiB" in path.read_text().splitlines()[1]


def test_second_expert_and_image_encoder_are_counted_where_they_are_resident():
    """Wan 2.2 A14B holds two 14B experts when nothing is offloaded; Wan 2.1 I2V caches with a 631M-parameter CLIP
    image encoder, on the GPU only when the text encoder is (its plan keeps both on the CPU otherwise)."""
    from finetune.estimate import estimate
    from finetune.real_models import model_extras

    a14b = recipe("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "data.frames=17", "data.width=320", "data.height=192")
    assert model_extras(a14b).experts == 2 and model_extras(recipe(MODEL_14B)).experts == 1
    one = estimate(recipe(MODEL_14B, "data.frames=17", "data.width=320", "data.height=192"))
    two = estimate(a14b)
    weights = one.breakdown["generate"]["transformer_weights"]
    assert two.breakdown["generate"]["transformer_weights"] == pytest.approx(2 * weights, abs=0.02)
    assert two.generate_offload_peak_gb == one.generate_offload_peak_gb  # one expert on the GPU at a time
    i2v = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
    assert model_extras(recipe(i2v)).image_encoder["hidden_size"] == 1280
    small = ["data.frames=17", "data.width=320", "data.height=192"]
    on_gpu = estimate(recipe(i2v, *small)).breakdown["cache"]["image_encoder_weights"]
    assert on_gpu == pytest.approx(630.8e6 * 2 / 2**30, abs=0.01)
    assert (
        estimate(recipe(i2v, *small, "memory.text_encoder=cpu")).breakdown["cache"]["image_encoder_weights"]
        == 0
    )
