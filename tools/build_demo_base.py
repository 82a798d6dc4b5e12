"""Build the demo's tiny pretrained Wan-architecture pipeline (adapters/demo-base) on a CPU, reproducibly.

    python tools/build_demo_base.py [--out adapters/demo-base] [--seed 0] [--vae-steps N] [--transformer-steps N]

The shipped base was built with the defaults (seed 0); see adapters/demo-base/README.md.

The real diffusers/transformers classes (AutoencoderKLWan, WanTransformer3DModel, UMT5EncoderModel, an offline
T5Tokenizer, FlowMatchEulerDiscreteScheduler) are trained on the synthetic world of finetune/demo_world.py
(32x32, 5 frames):
1. the text encoder stays random and frozen (its outputs still differ per prompt; the transformer learns to
   read them), the tokenizer is built from the world's word list;
2. the VAE learns to reconstruct the world (both renderings: plain and ink; a real video VAE represents any
   picture, the transformer is what has never seen the ink style);
3. latents are normalised per channel (latents_mean/latents_std in the VAE config, as in Wan);
4. the transformer learns text-to-video by flow matching (the kit's finetune.flow functions) on plain clips.
Everything runs on one thread with fixed seeds and deterministic algorithms, so the same seed gives the same
bytes (see the card for the hashes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune import flow  # noqa: E402
from finetune.demo_world import CAPTIONS, WORDS, content_score, render  # noqa: E402

SIZE, FRAMES, TEXT_LENGTH = 32, 5, 16
VAE_CONFIG = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                  temperal_downsample=[False, True, True])  # fmt: skip
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=24, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=64, ffn_dim=256, num_layers=4, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
)  # fmt: skip


def _video_tensor(videos: list[np.ndarray]) -> torch.Tensor:
    """list of (F, H, W, 3) uint8 -> (B, 3, F, H, W) in [-1, 1], what AutoencoderKLWan takes."""
    return torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def _random_clip(rng: np.random.Generator, frames: int, style: str | None = None) -> np.ndarray:
    caption = CAPTIONS[rng.integers(len(CAPTIONS))].split()
    style = style or ("plain" if rng.random() < 0.5 else "ink")
    return render(caption[1], caption[2], caption[4], rng, frames, SIZE, style)


def build_text(seed: int):
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    tokenizer = T5Tokenizer(
        vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS],
        extra_ids=0,
    )
    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return tokenizer, UMT5EncoderModel(config).eval()


def train_vae(seed: int, steps: int, say, batch: int = 8, lr: float = 5e-3) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = AutoencoderKLWan(**VAE_CONFIG)
    # What made the Wan VAE learn in minutes rather than hours on a CPU (measured, see the card): a high
    # learning rate with warmup and cosine decay, MSE rather than L1, the posterior mean (no sampling) and a
    # tiny latent penalty, and the shape's pixels weighted up (else it learns backgrounds first and only).
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * s / steps)))
    )
    for step in range(steps):
        x = _video_tensor([_random_clip(rng, FRAMES) for _ in range(batch)])
        z = vae.encode(x).latent_dist.mean
        recon = vae.decode(z).sample
        weight = 1 + 4 * ((x - x[..., :1, :1]).abs().amax(1, keepdim=True) > 0.05).float()
        loss = (weight * (recon - x).pow(2)).mean() + 1e-4 * z.pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            say(f"vae step {step + 1}/{steps}: weighted MSE {loss.item():.4f}")
    return vae.eval()


def vae_error(vae, seed: int) -> float:
    """Mean absolute reconstruction error (0-1 scale) on 8 fresh clips of both renderings."""
    rng = np.random.default_rng(seed + 1000)
    x = _video_tensor([_random_clip(rng, FRAMES) for _ in range(8)])
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return float((recon - x).abs().mean() / 2)


def encode_world(tokenizer, text_encoder, vae, seed: int, per_caption: int):
    """Plain clips -> normalised latents and text embeddings, through the kit's own Wan encode functions."""
    from finetune.models import wan

    encoders = wan.Encoders(tokenizer, text_encoder, vae, torch.device("cpu"))
    rng = np.random.default_rng(seed + 1)
    captions = [c for c in CAPTIONS for _ in range(per_caption)]
    raw = []
    with torch.no_grad():
        for i in range(0, len(captions), 8):
            batch = [_random_clip_for(c, rng) for c in captions[i : i + 8]]
            raw.append(vae.encode(_video_tensor(batch)).latent_dist.mode())
    raw = torch.cat(raw)
    # Wan normalises latents per channel with fixed statistics stored in the VAE config; measure ours.
    mean, std = raw.mean(dim=(0, 2, 3, 4)), raw.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    latents = (raw - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    texts = {c: wan.encode_prompts(encoders, [c], TEXT_LENGTH)[0] for c in [*CAPTIONS, ""]}
    return latents, captions, texts


def _random_clip_for(caption: str, rng: np.random.Generator) -> np.ndarray:
    words = caption.split()
    return render(words[1], words[2], words[4], rng, FRAMES, SIZE, "plain")


def _padded(text: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(TEXT_LENGTH, text.shape[-1])
    out[: len(text)] = text
    return out


def train_transformer(latents, captions, texts, seed: int, steps: int, say) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TRANSFORMER_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + np.cos(np.pi * s / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    text_table = {c: _padded(t) for c, t in texts.items()}
    for step in range(steps):
        index = torch.randint(len(latents), (16,), generator=generator)
        x0 = latents[index]
        # 10% empty captions: the unconditional prediction that classifier-free guidance subtracts.
        drop = torch.rand(16, generator=generator) < 0.1
        text = torch.stack(
            [text_table["" if d else captions[i]] for i, d in zip(index.tolist(), drop, strict=True)]
        )
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = flow.sample_sigmas(len(x0), "shift", 3.0, generator)
        prediction = model(
            hidden_states=flow.add_noise(x0, noise, sigmas),
            timestep=flow.timesteps_from_sigmas(sigmas),
            encoder_hidden_states=text,
            return_dict=False,
        )[0]
        loss = flow.flow_loss(prediction, flow.velocity_target(x0, noise))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            say(f"transformer step {step + 1}/{steps}: flow loss {loss.item():.4f}")
    return model.eval()


def evaluate(folder: Path, seeds: int = 1) -> dict:
    """Content score of the saved pipeline on every caption (loaded the way the kit loads any Wan model)."""
    from finetune.generate import GenerateSettings, generate_frames, load_pipeline

    pipe, family = load_pipeline(str(folder), [])
    pipe.set_progress_bar_config(disable=True)
    scores = []
    for seed in range(seeds):
        for caption in CAPTIONS:
            settings = GenerateSettings(prompt=caption, width=SIZE, height=SIZE, frames=FRAMES, steps=20,
                                        guidance=3.0, seed=seed, max_sequence_length=TEXT_LENGTH)  # fmt: skip
            scores.append(content_score(generate_frames(pipe, family, settings), caption))
    return {"content": round(float(np.mean(scores)), 4), "samples": len(scores)}


def hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
    }


def build(out: Path, seed: int, vae_steps: int, transformer_steps: int, per_caption: int, say=print) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.set_num_threads(1)  # one thread: the same float sums in the same order on every machine run
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    tokenizer, text_encoder = build_text(seed)
    vae = train_vae(seed, vae_steps, say)
    latents, captions, texts = encode_world(tokenizer, text_encoder, vae, seed, per_caption)
    transformer = train_transformer(latents, captions, texts, seed, transformer_steps, say)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))  # fmt: skip
    pipe.save_pretrained(out)
    info = {
        "seed": seed,
        "vae_steps": vae_steps,
        "transformer_steps": transformer_steps,
        "clips_per_caption": per_caption,
        "vae_error": round(vae_error(vae, seed), 4),
        "build_seconds": round(time.perf_counter() - started, 1),
        "sha256": hashes(out),
    }
    (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "adapters/demo-base"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--transformer-steps", type=int, default=3000)
    parser.add_argument("--clips-per-caption", type=int, default=8)
    parser.add_argument("--no-eval", action="store_true", help="skip the content score of the result")
    args = parser.parse_args()
    info = build(args.out, args.seed, args.vae_steps, args.transformer_steps, args.clips_per_caption)
    if not args.no_eval:
        info.update(evaluate(args.out))
        (args.out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
