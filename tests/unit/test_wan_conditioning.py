"""The image conditioning of Wan I2V / FLF2V / TI2V-5B training, checked against WanImageToVideoPipeline's own
prepare_latents / encode_image / denoising-step arithmetic (diffusers 0.42), bit for bit; and the loss that
leaves the given frames out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import objectives
from finetune.config import ModelConfig
from finetune.models import family_for, resolve_source, wan_i2v
from tests.wan_i2v_tiny import build_tiny_wan_i2v, build_tiny_wan_ti2v

FRAMES = 9


def clip_pixels(size: int, seed: int = 0) -> np.ndarray:
    """(F, H, W, 3) uint8 frames, as decoded media are."""
    return np.random.default_rng(seed).integers(0, 256, (FRAMES, size, size, 3), dtype=np.uint8)


def as_video(pixels: np.ndarray) -> torch.Tensor:
    """(1, 3, F, H, W) in [-1, 1], as the cache stage hands clips to encode_video."""
    return torch.from_numpy(pixels).permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1


def family_and_encoders(folder):
    cfg = ModelConfig(path=str(folder))
    source = resolve_source(cfg)
    family = family_for(cfg, source)
    return family, family.load_encoders(source, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan-cond")
    return {
        "i2v": build_tiny_wan_i2v(root / "i2v"),
        "flf2v": build_tiny_wan_i2v(root / "flf2v", last_frame=True),
        "ti2v": build_tiny_wan_ti2v(root / "ti2v"),
        "i2v-no-clip": build_tiny_wan_i2v(root / "i2v-no-clip", clip=False),
    }


@pytest.mark.parametrize("variant", ["i2v", "flf2v", "i2v-no-clip"])
def test_cached_condition_and_embeddings_equal_the_pipelines(bases, variant):
    from diffusers import WanImageToVideoPipeline

    last, clip = variant == "flf2v", variant != "i2v-no-clip"
    family, enc = family_and_encoders(bases[variant])
    assert family.name == "wan" and family.variant == variant.removesuffix("-no-clip")
    pixels = clip_pixels(32)
    video = as_video(pixels)
    cached = family.encode_video(enc, video)

    pipe = WanImageToVideoPipeline.from_pretrained(bases[variant])
    first, final = video[:, :, 0], video[:, :, -1]
    _, expected = pipe.prepare_latents(
        first, 1, 16, 32, 32, FRAMES, torch.float32, torch.device("cpu"), None, None, final if last else None
    )
    ours = torch.cat([wan_i2v.frame_mask(cached["condition"], last), cached["condition"]], dim=1)
    assert torch.equal(ours, expected)  # mask + VAE latents of [first, zeros..., (last)], bit for bit
    images = [Image.fromarray(pixels[0])] + ([Image.fromarray(pixels[-1])] if last else [])
    if clip:
        assert torch.equal(cached["image_embeds"][0], pipe.encode_image(images if last else images[0], "cpu"))
    else:  # Wan 2.2 I2V-A14B style: the condition only
        assert set(cached) == {"latents", "condition"}
    # The last latent frame holds pixel frames 5-8 in its 4 mask channels: frame 8 is given only for FLF2V.
    assert expected[0, 3, -1].eq(1).all() == last and expected[0, :3, -1].eq(0).all()

    # The training forward is the pipeline's: [noisy, mask, condition] and the image embeddings.
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(cached["latents"].shape, generator=g)
    text = torch.randn(1, 6, 24, generator=g)
    t = torch.tensor([700.0])
    extras = {k: v for k, v in cached.items() if k != "latents"}
    with torch.no_grad():
        got = family.predict(pipe.transformer, noisy, t, text, extras)
        image = pipe.encode_image(images if last else images[0], "cpu") if clip else None
        want = pipe.transformer(
            hidden_states=torch.cat([noisy, expected], dim=1),
            timestep=t,
            encoder_hidden_states=text,
            encoder_hidden_states_image=image,
            return_dict=False,
        )[0]
    assert torch.equal(got, want)


def test_flf2v_batches_pair_each_clips_two_images(bases):
    """Two clips in a batch: clip b's [first, last] embeddings stay together (the pipeline's repeat order)."""
    family, enc = family_and_encoders(bases["flf2v"])
    cached = [family.encode_video(enc, as_video(clip_pixels(32, seed))) for seed in (1, 2)]
    batch = {k: torch.cat([c[k] for c in cached]) for k in ("latents", "condition", "image_embeds")}
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(bases["flf2v"], subfolder="transformer")
    text = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        together = family.predict(transformer, batch["latents"], t, text, batch)
        alone = [
            family.predict(transformer, c["latents"], t[i : i + 1], text[i : i + 1], c)
            for i, c in enumerate(cached)
        ]
    assert torch.allclose(together, torch.cat(alone), atol=1e-5)


def test_ti2v_first_latent_frame_is_the_images_condition_and_the_step_is_the_pipelines(bases):
    from diffusers import WanImageToVideoPipeline

    family, enc = family_and_encoders(bases["ti2v"])
    assert family.variant == "ti2v" and family.size_multiple == 32 and family.condition is not None
    video = as_video(clip_pixels(64))
    x0 = family.encode_video(enc, video)  # (1, 48, 3, 4, 4): nothing else cached
    assert not isinstance(x0, dict) and x0.shape == (1, 48, 3, 4, 4)

    pipe = WanImageToVideoPipeline.from_pretrained(bases["ti2v"])
    assert pipe.config.expand_timesteps
    latents, condition, first_frame_mask = pipe.prepare_latents(
        video[:, :, 0],
        1,
        48,
        64,
        64,
        FRAMES,
        torch.float32,
        torch.device("cpu"),
        torch.Generator().manual_seed(0),
    )
    assert torch.equal(x0[:, :, :1], condition)  # the causal VAE encodes frame 0 alone

    t = torch.tensor(640.0)
    model_input, per_token, keep = family.condition(x0, latents, t.view(1), {})
    assert torch.equal(model_input, (1 - first_frame_mask) * condition + first_frame_mask * latents)
    expected_t = (first_frame_mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0)
    assert torch.equal(per_token, expected_t) and per_token.shape == (1, 3 * 2 * 2)
    assert per_token[0, :4].eq(0).all() and per_token[0, 4:].eq(640).all()  # first frame's tokens at t = 0
    assert keep[0, 0, :, 0, 0].tolist() == [False, True, True]


def test_ti2v_one_frame_items_train_unconditioned():
    x0, noisy, t = torch.randn(2, 48, 1, 4, 4), torch.randn(2, 48, 1, 4, 4), torch.tensor([10.0, 20.0])
    assert wan_i2v.first_frame_condition(x0, noisy, t) == (noisy, t, None)


def test_loss_leaves_the_condition_frames_out():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 3, 2, 2, generator=g)
    prediction = torch.randn(2, 4, 3, 2, 2, generator=g)
    keep = torch.ones(1, 1, 3, 2, 2, dtype=torch.bool)
    keep[:, :, 0] = False
    masked = objectives.loss(prediction, target, keep)
    assert masked == pytest.approx(
        torch.nn.functional.mse_loss(prediction[:, :, 1:], target[:, :, 1:]).item()
    )
    spoiled = prediction.clone()
    spoiled[:, :, 0] += 100.0  # anything on the given frame does not count...
    assert objectives.loss(spoiled, target, keep) == masked
    assert objectives.loss(spoiled, target) > 100 * masked  # ...but would without the mask
