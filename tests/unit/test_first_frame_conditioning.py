"""First-frame conditioning by latent replacement (Wan 2.2 TI2V-5B, LTX-Video): the training input and per-token
timesteps equal LTXImageToVideoPipeline's; `train.first_frame_conditioning` picks the share of clips, seeded; a
model without it refuses the key in one line."""

from __future__ import annotations

import pytest
import torch

from finetune import objectives
from finetune.config import TrainConfig
from finetune.errors import UserError
from finetune.models import families_with_condition, ltx, wan
from tests.family_tiny import build_tiny_ltx


def test_ltx_input_and_timesteps_equal_ltx_image_to_video_pipelines(tmp_path):
    from diffusers import LTXImageToVideoPipeline
    from diffusers.utils.torch_utils import randn_tensor

    pipe = LTXImageToVideoPipeline.from_pretrained(build_tiny_ltx(tmp_path / "ltx"))
    video = torch.rand(1, 3, 17, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    enc = ltx.Encoders(None, None, pipe.vae, torch.device("cpu"))
    x0 = ltx.encode_video(enc, video)  # (1, 8, 3, 2, 2)
    latents, mask = pipe.prepare_latents(
        video[:, :, 0], 1, 8, 64, 64, 17, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(3)
    )
    noise = ltx.unpack(latents, 3, 2, 2, 1, 1)  # the pipeline's noise where the mask is 0
    t = torch.tensor([900.0])
    model_input, per_token, keep = objectives.condition(ltx.FAMILY, x0, noise, t, {}, share=1.0)
    ours = ltx.pack(model_input, 1, 1)
    assert torch.equal(ours[:, 4:], latents[:, 4:])  # the noisy frames, exactly
    # The given frame: the clip's first latent frame is the image's own latent (causal VAE), to float rounding.
    # The pipeline samples the image's latent distribution (first draw of its generator); the cache keeps the
    # mean: the two differ by exactly that sample's noise, normalised.
    with torch.no_grad():
        dist = pipe.vae.encode(video[:, :, :1]).latent_dist
    eps = randn_tensor(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    sampled = ltx.normalize(dist.mean + dist.std * eps, pipe.vae)
    assert torch.allclose(ltx.pack(sampled, 1, 1), latents[:, :4], atol=1e-5)
    assert torch.allclose(ours[:, :4], ltx.pack(ltx.normalize(dist.mean, pipe.vae), 1, 1), atol=1e-5)
    assert torch.equal(per_token, t.expand(1).unsqueeze(-1) * (1 - mask))  # the pipeline's `timestep`
    assert keep[0, 0, :, 0, 0].tolist() == [False, True, True]


def test_share_picks_clips_from_the_seeded_generator():
    x0, noisy = torch.zeros(64, 4, 3, 2, 2), torch.ones(64, 4, 3, 2, 2)
    t = torch.full((64,), 500.0)
    model_input, per_token, keep = objectives.condition(
        ltx.FAMILY, x0, noisy, t, {}, share=0.25, generator=torch.Generator().manual_seed(7)
    )
    chosen = torch.rand(64, generator=torch.Generator().manual_seed(7)) < 0.25
    assert 5 < int(chosen.sum()) < 30
    assert torch.equal(model_input[:, 0, 0, 0, 0] == 0, chosen)  # chosen clips: clean (zero) first frame
    assert torch.equal(per_token[:, 0] == 0, chosen) and per_token[:, 4:].eq(500).all()
    assert torch.equal(~keep[:, 0, 0, 0, 0], chosen) and keep[:, :, 1:].all()
    # Share 0 (LTX's default) leaves the step as text-to-video: same tensors, no mask.
    assert objectives.condition(ltx.FAMILY, x0, noisy, t, {}) == (noisy, t, None)


def test_the_key_on_a_model_without_first_frame_conditioning_is_one_line():
    assert "ltx" in families_with_condition() and "wan ti2v" in families_with_condition()
    with pytest.raises(UserError) as error:
        objectives.for_family(wan.FAMILY, None, TrainConfig(first_frame_conditioning=0.5))
    assert str(error.value).startswith("train.first_frame_conditioning: wan text-to-video models have no")
    assert "ltx, wan ti2v" in str(error.value)
