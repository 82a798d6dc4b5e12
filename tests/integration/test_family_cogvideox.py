"""CogVideoX end to end on a tiny CogVideoXPipeline folder: `finetune train` with its own objective
(v-prediction on the scheduler's alphas) -> CogVideoXPipeline.load_lora_weights puts a LoRA on every block
linear -> `finetune merge` at 0.7 equals base + adapter -> `finetune generate` (text-to-video, a still,
video-to-video) writes the requested frames; an unsupported mode is one line naming the families that can."""

from __future__ import annotations

import av
import pytest
import torch

from finetune.cli import main
from finetune.models import cogvideox, families_with_mode
from tests.clips import write_image, write_video
from tests.family_tiny import (
    assert_loads_on_every_block_linear,
    assert_merge_matches,
    build_tiny_cogvideox,
    make_clips,
    write_recipe,
)

SIZE, FRAMES, TEXT = 32, 9, 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cogvideox")
    base = build_tiny_cogvideox(root / "base", text_length=TEXT)
    data = make_clips(root / "clips", SIZE, 12)
    recipe = write_recipe(root / "recipe.yaml", base, data, root, SIZE, FRAMES, TEXT)
    assert main(["train", str(recipe)]) == 0
    return {"root": root, "base": base, "adapter": root / "adapter", "recipe": recipe}


def transformer_output(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 3, 4, 4, generator=g)
    text = torch.randn(1, TEXT, transformer.config.text_embed_dim, generator=g)
    with torch.no_grad():
        return cogvideox.predict(transformer, latents, torch.tensor([500]), text)


def test_adapter_loads_in_cogvideox_pipeline_on_every_block_linear(world, caplog):
    from diffusers import CogVideoXPipeline

    # attention q/k/v/out, the two FFN linears and the two adaptive-norm (modulation) linears, per block
    assert_loads_on_every_block_linear(
        CogVideoXPipeline, world, ("transformer_blocks",), transformer_output, 2 * 8, caplog
    )


def test_merge_at_0_7_matches_base_plus_adapter(world):
    from diffusers import CogVideoXPipeline

    assert_merge_matches(CogVideoXPipeline, world, transformer_output, scale=0.7, tol=1e-4)


def gen_args(world, out, frames, *extra):
    # --max-sequence-length is left at its default (512): CogVideoX must use its own 16 (226 on real weights).
    return ["generate", "--model", str(world["base"]), "--lora", f"{world['adapter']}:0.8", "--prompt",
            "a red square moving left", "--width", str(SIZE), "--height", str(SIZE), "--frames", str(frames),
            "--steps", "2", "--out", str(out), *map(str, extra)]  # fmt: skip


@pytest.mark.parametrize(
    "frames,name,sdedit", [(9, "t2v.mp4", False), (1, "still.png", False), (9, "v2v.mp4", True)]
)
def test_generate_writes_the_requested_frames(world, frames, name, sdedit):
    out = world["root"] / "gen" / name
    extra = []
    if sdedit:
        clip = write_video(world["root"] / "in.mp4", frames=12, width=SIZE, height=SIZE, color=(0, 200, 0))
        extra = ["--video", clip, "--strength", "0.6"]
    assert main(gen_args(world, out, frames, *extra)) == 0
    with av.open(str(out)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == frames and decoded[0].shape == (SIZE, SIZE, 3)


def test_unsupported_mode_is_one_line_naming_the_families_that_can(world, capsys):
    image = write_image(world["root"] / "first.png", SIZE, SIZE)
    code = main(gen_args(world, world["root"] / "x.mp4", 9, "--image", image))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    able = families_with_mode("image")
    assert "ltx" in able and "cogvideox" not in able
    assert err == (
        f"error: --image (image-to-video): the cogvideox family cannot do this; families that can: {', '.join(able)}"
    )


def test_training_used_the_v_prediction_objective(world):
    """The cached latents, noised and targeted as CogVideoX's scheduler does (add_noise / get_velocity)."""
    from diffusers import CogVideoXDDIMScheduler

    from finetune import objectives
    from finetune.models import load_scheduler_config

    config = load_scheduler_config(str(world["base"]))
    scheduler = CogVideoXDDIMScheduler.from_config(config)
    objective = objectives.VPrediction(objectives.alphas_cumprod(config))
    x0, noise = torch.randn(4, 4, 3, 4, 4), torch.randn(4, 4, 3, 4, 4)
    noisy, t, target = objective.noise(x0, noise, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and len(set(t.tolist())) == 4
    assert torch.allclose(noisy, scheduler.add_noise(x0, noise, t), atol=1e-6)
    assert torch.allclose(target, scheduler.get_velocity(x0, noise, t), atol=1e-6)
