"""The family objectives: flow matching unchanged from flow.py's functions, v-prediction equal to diffusers'
DDPM-style schedulers, and a restricted sigma range that a sample never leaves."""

from __future__ import annotations

import pytest
import torch

from finetune import flow, objectives


def test_flow_matching_full_range_is_the_plain_flow_step():
    x0, noise = torch.randn(6, 4, 2, 3, 3), torch.randn(6, 4, 2, 3, 3)
    objective = objectives.FlowMatching("shift", 3.0)
    noisy, timesteps, target = objective.noise(x0, noise, torch.Generator().manual_seed(5))
    sigmas = flow.sample_sigmas(6, "shift", 3.0, torch.Generator().manual_seed(5))
    assert torch.equal(timesteps, flow.timesteps_from_sigmas(sigmas))
    assert torch.equal(noisy, flow.add_noise(x0, noise, sigmas))
    assert torch.equal(target, noise - x0)


@pytest.mark.parametrize("low,high", [(0.875, 1.0), (0.0, 0.875), (0.3, 0.6)])
def test_flow_matching_never_leaves_its_sigma_range(low, high):
    objective = objectives.FlowMatching("logit_normal", 5.0, (low, high))
    x0 = torch.zeros(4096, 1)
    _, timesteps, _ = objective.noise(x0, torch.ones_like(x0), torch.Generator().manual_seed(0))
    sigmas = timesteps / 1000
    assert low <= sigmas.min() and sigmas.max() <= high
    assert sigmas.max() - sigmas.min() > 0.5 * (high - low)  # the range is used, not one point of it


def test_v_prediction_matches_the_cogvideox_scheduler():
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
        rescale_betas_zero_snr=True, snr_shift_scale=3.0, timestep_spacing="trailing",
    )  # fmt: skip
    alphas = objectives.alphas_cumprod(dict(scheduler.config, _class_name="CogVideoXDDIMScheduler"))
    assert torch.allclose(alphas, scheduler.alphas_cumprod.float())
    assert alphas[-1] < 1e-6  # zero terminal SNR: the last timestep is pure noise
    objective = objectives.VPrediction(alphas)
    x0, noise = torch.randn(64, 4, 2, 2, 2), torch.randn(64, 4, 2, 2, 2)
    noisy, t, target = objective.noise(x0, noise, torch.Generator().manual_seed(1))
    assert t.min() >= 0 and t.max() <= 999 and len(set(t.tolist())) > 40
    assert torch.allclose(noisy, scheduler.add_noise(x0, noise, t), atol=1e-5)
    assert torch.allclose(target, scheduler.get_velocity(x0, noise, t), atol=1e-5)
    # x0 recovered from the true v: a x_t - b v = x0 (the identity finetrainers' x0-space loss relies on)
    a = alphas[t].sqrt().view(-1, 1, 1, 1, 1)
    b = (1 - alphas[t]).sqrt().view(-1, 1, 1, 1, 1)
    assert torch.allclose(a * noisy - b * target, x0, atol=1e-5)
