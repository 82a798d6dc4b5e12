"""The training objective belongs to the family: what noise level a step trains at, how the clean latents are
noised, and what the transformer is asked to predict. Pure tensor code, unit-tested against diffusers'
schedulers.

flow          (Wan, LTX-Video, HunyuanVideo)  x_s = (1 - s) x0 + s n,       target n - x0,   timestep 1000 s
v_prediction  (CogVideoX)                     x_t = a_t x0 + b_t n,         target a_t n - b_t x0,  t in 0..999
              with a_t = sqrt(alphas_cumprod[t]), b_t = sqrt(1 - alphas_cumprod[t]) from the model's own scheduler.

The v-loss is what finetrainers trains CogVideoX with, written differently: it turns the v prediction into an
x0 prediction (x0' = a x_t - b v') and weights the x0 error by 1 / b^2; since x0' - x0 = -b (v' - v), that is
exactly the plain v-MSE used here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune import flow


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class FlowMatching:
    sampling: str  # shift | uniform | logit_normal (see flow.sample_sigmas)
    shift: float
    # The part of (0, 1) this run trains on: Wan 2.2 A14B trains each expert only on its own noise levels.
    sigma_range: tuple[float, float] = (0.0, 1.0)

    def noise(self, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None):
        """-> (noisy latents, transformer timesteps, target)."""
        sigmas = flow.sample_sigmas(len(x0), self.sampling, self.shift, generator)
        low, high = self.sigma_range
        sigmas = low + (high - low) * sigmas  # the identity for the full range
        noisy = flow.add_noise(x0, noise, sigmas)
        return noisy, flow.timesteps_from_sigmas(sigmas), flow.velocity_target(x0, noise)


@dataclass(frozen=True)
class VPrediction:
    alphas_cumprod: torch.Tensor  # (num_train_timesteps,), from the model's scheduler (after its SNR shift)
    sampling: str = "uniform"

    def sample_timesteps(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        steps = len(self.alphas_cumprod)
        # "shift" is a flow-matching notion; for a DDPM schedule it means uniform over the integer timesteps.
        method = "uniform" if self.sampling == "shift" else self.sampling
        u = flow.sample_sigmas(batch, method, 1.0, generator)
        return (u * steps).long().clamp(0, steps - 1)

    def noise(self, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None):
        timesteps = self.sample_timesteps(len(x0), generator)
        alpha_bar = self.alphas_cumprod[timesteps].double()
        a, b = _expand(alpha_bar.sqrt(), x0), _expand((1 - alpha_bar).sqrt(), x0)
        return a * x0 + b * noise, timesteps, a * noise - b * x0


def alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """The training noise schedule of a DDPM/DDIM-style scheduler config, computed by diffusers itself (betas,
    zero-terminal-SNR rescaling and CogVideoX's SNR shift all live in the scheduler's constructor)."""
    import diffusers

    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    return scheduler.alphas_cumprod.float()


def for_family(family, source, train_cfg, sigma_range: tuple[float, float] = (0.0, 1.0)):
    """The objective a family was trained with, read from the base model's own scheduler where it has one."""
    if train_cfg.first_frame_conditioning and family.condition is None:
        from finetune.errors import UserError
        from finetune.models import families_with_condition

        raise UserError(
            f"train.first_frame_conditioning: {family.name} {family.variant or 'text-to-video'} models have no "
            f"first-frame conditioning to train (models that do: {', '.join(families_with_condition())}); "
            "remove the key"
        )
    if family.objective == "v_prediction":
        from finetune.models import load_scheduler_config

        return VPrediction(alphas_cumprod(load_scheduler_config(source.base)), train_cfg.timestep_sampling)
    return FlowMatching(train_cfg.timestep_sampling, train_cfg.flow_shift or family.flow_shift, sigma_range)


def first_frame_condition(x0, noisy, timesteps, chosen: torch.Tensor, patch: tuple[int, int]):
    """-> (model input, per-token timesteps (B, tokens), loss mask). For the `chosen` clips (B,) the clean first
    latent frame replaces the noisy one and its tokens get timestep 0, as the image-to-video pipelines sample
    (WanImageToVideoPipeline with `expand_timesteps`, LTXImageToVideoPipeline); the loss leaves that frame out
    (it is given, not predicted). Tokens in the order the transformer patches (frame, row, column) with
    `patch` = its (height, width) patch. A one-frame batch (images) has nothing to condition on: unchanged."""
    if x0.shape[2] < 2:
        return noisy, timesteps, None
    b = len(x0)
    mask = torch.ones(b, 1, *x0.shape[2:], dtype=noisy.dtype, device=noisy.device)  # 1 = noisy, 0 = given
    mask[:, :, 0] = (~chosen).to(mask).view(b, 1, 1, 1)  # arithmetic, not boolean indexing (fake tensors)
    model_input = (1 - mask) * x0 + mask * noisy
    per_token = (mask[:, 0, :, :: patch[0], :: patch[1]] * _expand(timesteps, mask[:, 0])).flatten(1)
    return model_input, per_token, mask.bool()


def condition(family, x0, noisy, timesteps, extras: dict, share: float | None = None, generator=None):
    """-> (model input, timesteps, loss mask or None): the family's first-frame conditioning (Wan 2.2 TI2V-5B,
    LTX-Video) on a `share` of the clips (None: the family's default), drawn from `generator`; unchanged for
    families without it."""
    share = family.condition_share if share is None else share
    if family.condition is None or share <= 0:
        return noisy, timesteps, None
    if share >= 1:
        chosen = torch.ones(len(x0), dtype=torch.bool, device=x0.device)
    else:
        chosen = (torch.rand(len(x0), generator=generator) < share).to(x0.device)
    return family.condition(x0, noisy, timesteps, extras, chosen)


def loss(prediction: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """MSE in fp32, whatever the objective; with `keep` (broadcastable to the latents) only over the kept
    elements (the given condition frames are not predicted, so they are not scored)."""
    if keep is None:
        return flow.flow_loss(prediction, target)
    # A weighted sum, not boolean indexing: no data-dependent shapes (the estimate traces it on fake tensors).
    weight = keep.to(torch.float32)
    squared = (prediction.float() - target.float()).square()
    return (squared * weight).sum() / weight.expand_as(prediction).sum()
