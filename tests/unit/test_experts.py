"""Wan 2.2 A14B's experts: the phase plan, the noise range each expert trains on (never the other's), the
boundary read from model_index.json, and which adapter file goes into which expert."""

from __future__ import annotations

import json

import pytest
import torch

from finetune import experts, flow
from finetune.config import build_recipe
from finetune.errors import UserError
from finetune.objectives import FlowMatching
from finetune.train import lr_factor


def recipe(**lora):
    return build_recipe({"model": {"path": "x"}, "data": {"path": "y"}, "train": {"steps": 7}, "lora": lora})


def test_both_splits_the_steps_high_first_and_each_phase_covers_its_range():
    high, low = experts.plan(recipe(), 0.875)
    assert (high.name, high.component, high.weights_name) == ("high", "transformer", experts.WEIGHTS_NAME)
    assert (low.name, low.component, low.weights_name) == (
        "low",
        "transformer_2",
        experts.TRANSFORMER_2_WEIGHTS_NAME,
    )
    assert (high.first_step, high.last_step, low.first_step, low.last_step) == (0, 4, 4, 7)
    assert high.sigma_range == (0.875, 1.0) and low.sigma_range == (0.0, 0.875)


@pytest.mark.parametrize("choice", ["high", "low"])
def test_one_expert_gets_every_step(choice):
    (only,) = experts.plan(recipe(experts=choice), 0.9)
    assert (only.name, only.first_step, only.last_step) == (choice, 0, 7)
    assert only.sigma_range == ((0.9, 1.0) if choice == "high" else (0.0, 0.9))


def test_a_one_transformer_model_trains_the_whole_range_and_refuses_high_or_low():
    (only,) = experts.plan(recipe(), None)
    assert (only.name, only.component, only.sigma_range, only.steps) == (None, "transformer", (0.0, 1.0), 7)
    with pytest.raises(UserError) as err:
        experts.plan(recipe(experts="high"), None)
    text = str(err.value)
    assert "\n" not in text and "lora.experts: 'high'" in text and "lora.experts=both" in text


def test_both_needs_two_steps():
    with pytest.raises(UserError, match="train.steps = 1"):
        experts.plan(
            build_recipe({"model": {"path": "x"}, "data": {"path": "y"}, "train": {"steps": 1}}), 0.875
        )


@pytest.mark.parametrize("boundary", [0.875, 0.9])
@pytest.mark.parametrize("sampling,shift", [("shift", 1.0), ("shift", 3.0), ("shift", 12.0), ("uniform", 3.0),
                                            ("logit_normal", 5.0)])  # fmt: skip
def test_an_expert_never_sees_timesteps_outside_its_range(boundary, sampling, shift):
    """The must-show: 20,000 draws per expert; the high expert's timesteps are all >= boundary * 1000 (what
    WanPipeline routes to `transformer`), the low expert's all below it, and each spans most of its range."""
    x0 = torch.zeros(20_000, 1)
    g = torch.Generator().manual_seed(0)
    high, low = experts.plan(recipe(), boundary)
    cut = boundary * 1000
    for expert in (high, low):
        objective = FlowMatching(sampling, shift, expert.sigma_range)
        _, timesteps, _ = objective.noise(x0, torch.randn(x0.shape, generator=g), g)
        if expert.name == "high":
            assert timesteps.min() >= cut and timesteps.max() < 1000
            assert timesteps.max() - timesteps.min() > 0.5 * (1000 - cut)
        else:
            assert timesteps.min() > 0 and timesteps.max() < cut
            assert timesteps.max() - timesteps.min() > 0.5 * cut


def test_the_boundary_means_the_same_timestep_in_training_and_in_diffusers_sampling():
    """diffusers compares the scheduler's timestep with boundary_ratio * 1000; that timestep is 1000 * sigma with
    the shift applied, exactly finetune.flow's timestep of a (shifted) training sigma."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(40)
    sigmas = scheduler.sigmas[:-1]
    assert torch.allclose(flow.timesteps_from_sigmas(sigmas), scheduler.timesteps, atol=1e-3)
    to_high = scheduler.timesteps >= 0.875 * scheduler.config.num_train_timesteps
    assert torch.equal(to_high, sigmas >= 0.875) and 0 < int(to_high.sum()) < 40


def write_index(folder, **entries):
    index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"], **entries}
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


def test_boundary_ratio_read_from_model_index(tmp_path):
    two = write_index(tmp_path, transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.9)
    assert experts.boundary_ratio(two) == 0.9
    assert (
        experts.boundary_ratio(write_index(tmp_path, transformer_2=[None, None], boundary_ratio=None)) is None
    )
    assert experts.boundary_ratio(write_index(tmp_path)) is None  # Wan 2.1: no such keys at all
    # A boundary without a second transformer (diffusers would never route to it) is one transformer.
    assert (
        experts.boundary_ratio(write_index(tmp_path, transformer_2=[None, None], boundary_ratio=0.875))
        is None
    )


def test_adapter_parts_send_each_file_to_its_expert(tmp_path):
    high, low = tmp_path / experts.WEIGHTS_NAME, tmp_path / experts.TRANSFORMER_2_WEIGHTS_NAME
    high.write_bytes(b"")
    assert experts.adapter_parts(high) == [("transformer", high)]
    low.write_bytes(b"")
    assert experts.adapter_parts(high) == [("transformer", high), ("transformer_2", low)]
    assert experts.adapter_parts(low) == [("transformer_2", low)]
    assert experts.comfy_name(low.name) == "pytorch_lora_weights_transformer_2_comfy.safetensors"


def test_cosine_schedule_restarts_per_phase():
    r = build_recipe({"model": {"path": "x"}, "data": {"path": "y"},
                      "train": {"steps": 10, "schedule": "cosine"}})  # fmt: skip
    # Each phase's scheduler counts from 0 and reaches ~0 at its own last step (5 of 10), not the run's.
    assert lr_factor(0, r, 5) == pytest.approx(1.0) and lr_factor(5, r, 5) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(5, r) == pytest.approx(0.5)


def test_card_names_only_the_files_present():
    from finetune.hub import model_card

    info = {"name": "a", "family": "wan", "base_model": "Wan-AI/Wan2.2-T2V-A14B-Diffusers"}
    low_only = model_card({**info, "experts": ["low"]})
    assert "load_into_transformer_2=True" in low_only and "# high-noise expert" not in low_only
    both = model_card({**info, "experts": ["high", "low"]})
    assert "# high-noise expert" in both and "# low-noise expert" in both
    assert "load_into_transformer_2" not in model_card(info)  # a one-transformer adapter: unchanged card
