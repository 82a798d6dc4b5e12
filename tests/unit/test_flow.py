"""Flow matching: the noise levels and targets training uses must be the ones diffusers samples with."""

import math

import pytest
import torch

from finetune import flow


def test_shift_sigmas_matches_diffusers_flow_match_scheduler():
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert scheduler.config.use_dynamic_shifting is False  # the static shift formula applies
    # set_timesteps spaces the *unshifted* sigmas evenly between the scheduler's sigma_max and sigma_min
    # (already shifted at init, so unshift them back by dividing the timestep range), then shifts them.
    t_max = scheduler._sigma_to_t(scheduler.sigma_max)
    t_min = scheduler._sigma_to_t(scheduler.sigma_min)
    unshifted = torch.from_numpy(np.linspace(t_max, t_min, 10) / scheduler.config.num_train_timesteps)
    scheduler.set_timesteps(10)

    ours = flow.shift_sigmas(unshifted, 3.0).float()

    assert torch.allclose(ours, scheduler.sigmas[:-1], atol=1e-6, rtol=0)
    assert torch.allclose(flow.timesteps_from_sigmas(ours), scheduler.timesteps, atol=1e-3, rtol=0)


def test_shift_sigmas_known_values():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])

    assert torch.allclose(flow.shift_sigmas(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(flow.shift_sigmas(s, 1.0), s)  # shift 1 is the identity


def test_add_noise_endpoints_and_exact_mix():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 5, 5, generator=g)
    noise = torch.randn(3, 4, 2, 5, 5, generator=g)

    assert torch.equal(flow.add_noise(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(flow.add_noise(x0, noise, torch.ones(3)), noise)
    mixed = flow.add_noise(x0, noise, torch.full((3,), 0.25))
    assert torch.allclose(mixed, 0.75 * x0 + 0.25 * noise, atol=1e-6)


def test_add_noise_uses_each_samples_own_sigma():
    x0 = torch.zeros(3, 2, 4)
    noise = torch.ones(3, 2, 4)

    out = flow.add_noise(x0, noise, torch.tensor([0.1, 0.5, 0.9]))

    assert out.shape == x0.shape
    assert torch.allclose(out[:, 0, 0], torch.tensor([0.1, 0.5, 0.9]))
    assert torch.allclose(out[1], torch.full((2, 4), 0.5))


def test_add_noise_keeps_dtype_of_latents():
    x0 = torch.zeros(2, 3, dtype=torch.bfloat16)
    out = flow.add_noise(
        x0, torch.ones(2, 3, dtype=torch.bfloat16), torch.tensor([0.5, 0.5], dtype=torch.float64)
    )

    assert out.dtype == torch.bfloat16


def test_velocity_target_is_noise_minus_data_and_the_path_derivative():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)

    target = flow.velocity_target(x0, noise)

    assert torch.allclose(target, noise - x0)
    # d/dsigma of (1 - sigma) x0 + sigma noise, by finite difference
    a, b = flow.add_noise(x0, noise, torch.full((2,), 0.3)), flow.add_noise(x0, noise, torch.full((2,), 0.4))
    assert torch.allclose((b - a) / 0.1, target, atol=1e-4)


def test_timesteps_scale_by_1000():
    assert torch.allclose(
        flow.timesteps_from_sigmas(torch.tensor([0.0, 0.001, 0.5, 1.0])),
        torch.tensor([0.0, 1.0, 500.0, 1000.0]),
    )


def test_flow_loss_is_fp32_mse():
    pred = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    loss = flow.flow_loss(pred, torch.tensor([[0.0, 0.0]], dtype=torch.bfloat16))

    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2.5)


@pytest.mark.parametrize("method", ["uniform", "shift", "logit_normal"])
def test_sample_sigmas_in_open_unit_interval_and_seeded(method):
    a = flow.sample_sigmas(10_000, method, 3.0, torch.Generator().manual_seed(7))
    b = flow.sample_sigmas(10_000, method, 3.0, torch.Generator().manual_seed(7))
    c = flow.sample_sigmas(10_000, method, 3.0, torch.Generator().manual_seed(8))

    assert a.shape == (10_000,)
    assert bool(((a > 0) & (a < 1)).all())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_shift_sampling_moves_toward_more_noise():
    uniform = flow.sample_sigmas(10_000, "uniform", 3.0, torch.Generator().manual_seed(0))
    shifted = flow.sample_sigmas(10_000, "shift", 3.0, torch.Generator().manual_seed(0))

    assert uniform.mean().item() == pytest.approx(0.5, abs=0.02)
    assert shifted.mean().item() > uniform.mean().item() + 0.1
    # E[3u / (1 + 2u)] for u ~ U(0, 1) = 1.5 - 0.75 ln 3 ~= 0.676
    assert shifted.mean().item() == pytest.approx(1.5 - 0.75 * math.log(3), abs=0.01)
    # same draws, shifted one by one (away from the clamped ends)
    inner = (uniform > 1e-2) & (uniform < 0.99)
    assert torch.allclose(shifted[inner], flow.shift_sigmas(uniform[inner], 3.0), atol=1e-6)


def test_logit_normal_centres_on_the_middle():
    s = flow.sample_sigmas(10_000, "logit_normal", 3.0, torch.Generator().manual_seed(0))

    assert s.median().item() == pytest.approx(0.5, abs=0.02)
    # shift does not apply to logit_normal; a positive logit mean moves it up
    up = flow.sample_sigmas(10_000, "logit_normal", 3.0, torch.Generator().manual_seed(0), logit_mean=1.0)
    assert up.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.02)


def test_unknown_sampling_method_raises():
    with pytest.raises(ValueError, match="bogus"):
        flow.sample_sigmas(4, "bogus", 3.0)


# --- learning-rate schedule (finetune.train.lr_factor) -------------------------------------------


def _schedule(*overrides):
    from finetune.config import build_recipe

    return build_recipe({"model": {"path": "a/b"}, "data": {"path": "./clips"}}, list(overrides))


def test_warmup_ramps_linearly_then_constant_stays_at_one():
    from finetune.train import lr_factor

    r = _schedule("train.steps=20", "train.warmup_steps=4")

    assert [lr_factor(s, r) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(lr_factor(s, r) == 1.0 for s in range(4, 20))


def test_constant_without_warmup_is_one_from_the_first_step():
    from finetune.train import lr_factor

    r = _schedule("train.steps=10")

    assert [lr_factor(s, r) for s in range(10)] == [1.0] * 10


def test_cosine_decays_from_one_to_about_zero_at_the_last_step():
    from finetune.train import lr_factor

    r = _schedule("train.steps=100", "train.warmup_steps=10", "train.schedule=cosine")
    factors = [lr_factor(s, r) for s in range(100)]

    assert factors[0] == pytest.approx(0.1)  # warmup first
    assert factors[10] == pytest.approx(1.0)  # the peak right after warmup
    assert factors[55] == pytest.approx(0.5)  # half-way through the decay
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))  # never rises again
    assert 0 < factors[-1] < 1e-3
    assert lr_factor(100, r) == pytest.approx(0.0, abs=1e-12)
