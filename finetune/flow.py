"""Flow matching, as Wan (and LTX-Video, HunyuanVideo) were trained: pure functions, unit-tested.

x_sigma = (1 - sigma) * x0 + sigma * noise        sigma in (0, 1); sigma = 1 is pure noise
target  = noise - x0                              the velocity the transformer predicts
timestep = 1000 * sigma                           what the transformer's time embedding takes
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The resolution shift of SD3/Wan: moves sigmas toward 1 (more noise) for shift > 1. Same formula as
    diffusers' FlowMatchEulerDiscreteScheduler(shift=...), so training sees the noise levels sampling uses."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    batch: int,
    method: str,
    shift: float,
    generator: torch.Generator | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """One sigma per sample. `uniform`: U(0, 1). `shift`: U(0, 1) then shifted (Wan's own recipe).
    `logit_normal`: sigmoid(N(mean, std)) (SD3), concentrating on middle noise levels."""
    if method == "logit_normal":
        sigmas = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator))
    else:
        sigmas = torch.rand(batch, generator=generator)
        if method == "shift":
            sigmas = shift_sigmas(sigmas, shift)
        elif method != "uniform":
            raise ValueError(f"unknown timestep sampling '{method}'")
    # Keep away from exactly 0 and 1, where the target is all noise or all data and carries no signal.
    return sigmas.clamp(1e-3, 1 - 1e-3)


def _expand(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = _expand(sigmas, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def timesteps_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    return sigmas * NUM_TRAIN_TIMESTEPS


def flow_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32 (a bf16 reduction over ~10^7 latent values loses precision)."""
    return torch.nn.functional.mse_loss(prediction.float(), target.float())
