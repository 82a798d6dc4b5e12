"""The memory plan's CUDA paths (side-stream block swap, pinned activation offload, bitsandbytes layers, the
int8 text encoder) and the estimator against measured peaks at the real size. Skipped without a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from finetune import flow
from finetune.config import build_recipe
from finetune.estimate import keep_in_fp32, trace_training
from finetune.lora import add_lora, target_modules
from finetune.memory import apply_memory_plan
from finetune.models import get_family
from finetune.real_models import model_configs

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
SMALL = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=48, freq_dim=32, ffn_dim=128, num_layers=4, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
)  # fmt: skip


def recipe(path="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", *overrides):
    tree = {"model": {"family": "wan", "path": path}, "data": {"path": "unused"}}
    return build_recipe(tree, ["train.optimizer=adamw", *overrides])


def prepared(r, config, dtype):
    """finetune/train.py's order on the GPU: model on the host in its dtype, plan, LoRA, finish."""
    from diffusers import WanTransformer3DModel

    family = get_family("wan")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        transformer = WanTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    if dtype == torch.bfloat16:
        keep_in_fp32(transformer)
    plan = apply_memory_plan(transformer, r, CUDA, family)
    add_lora(transformer, r.lora, target_modules(family, transformer, r.lora.targets))
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    return transformer, plan, params, plan.finish(transformer, params)


def step(transformer, params, latent, text_dim, text_len=512):
    family = get_family("wan")
    g = torch.Generator(CUDA).manual_seed(1)
    x0 = torch.randn(latent, device=CUDA, generator=g, dtype=torch.bfloat16)
    text = torch.randn(1, text_len, text_dim, device=CUDA, generator=g, dtype=torch.bfloat16)
    noise = torch.randn(latent, device=CUDA, generator=g, dtype=torch.bfloat16)
    sigmas = torch.tensor([0.5])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        prediction = family.predict(
            transformer, flow.add_noise(x0, noise, sigmas), flow.timesteps_from_sigmas(sigmas).cuda(), text
        )
    loss = flow.flow_loss(prediction, flow.velocity_target(x0, noise))
    del prediction
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in params])
    for p in params:
        p.grad = None
    return loss.item(), grads


def test_swap_offload_and_chunks_are_exact_on_cuda():
    plain_model, _, plain_params, _ = prepared(recipe(), SMALL, torch.float32)
    plain = step(plain_model, plain_params, (1, 16, 5, 16, 16), 48, 16)
    r = recipe("x/1.3b", "memory.blocks_to_swap=3", "memory.activation_offload=true", "memory.ffn_chunks=2")
    model, plan, params, _ = prepared(r, SMALL, torch.float32)
    assert all(h.is_pinned() for pairs in plan.swapper.host.values() for _, h in pairs)
    assert all(p.device.type == "cuda" for p in params)  # LoRA stays on the GPU
    loss, grads = step(model, params, (1, 16, 5, 16, 16), 48, 16)
    assert loss == pytest.approx(plain[0], rel=1e-3)
    assert float((grads - plain[1]).norm() / plain[1].norm()) < 1e-2
    assert plan.swapper.onloads == 2 * 3
    assert not plan.swapper.in_flight  # every prefetch was used


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["memory.ffn_chunks=4"],
        ["memory.base_dtype=fp8", "memory.ffn_chunks=4", "memory.activation_offload=true"],
        ["memory.base_dtype=fp8", "memory.blocks_to_swap=10", "memory.ffn_chunks=4", "memory.activation_offload=true"],
    ],
    ids=["bf16", "chunks", "fp8-offload", "fp8-swap"],
)  # fmt: skip
def test_estimate_is_within_10_percent_of_the_measured_peak_at_832x480x81(overrides):
    r = recipe("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "train.optimizer=adamw8bit", *overrides)
    config = model_configs(r)[1]
    latent = (1, 16, 21, 60, 104)
    predicted = trace_training(r, config, latent).peak
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    transformer, _, params, optimizer = prepared(r, config, torch.bfloat16)
    step(transformer, params, latent, 4096)  # first step: creates the optimizer state
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats()
    loss, _ = step(transformer, params, latent, 4096)
    measured = torch.cuda.max_memory_allocated()
    print(f"{overrides}: estimated {predicted / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB")
    assert torch.isfinite(torch.tensor(loss))
    assert predicted == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bitsandbytes_base_trains_on_cuda(kind):
    bnb = pytest.importorskip("bitsandbytes")
    r = recipe("x/1.3b", f"memory.base_dtype={kind}", *(["memory.blocks_to_swap=2"] if kind == "nf4" else []))
    model, _, params, optimizer = prepared(r, SMALL, torch.bfloat16)
    layer = model.blocks[0].ffn.net[2].base_layer
    assert isinstance(layer, bnb.nn.Linear4bit if kind == "nf4" else bnb.nn.Linear8bitLt)
    losses = []
    for _ in range(3):
        loss, _ = step(model, params, (1, 16, 5, 16, 16), 48, 16)
        optimizer.step()
        losses.append(loss)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_int8_text_encoder_on_cuda(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from finetune.config import ModelConfig
    from finetune.memory import load_encoders_for_plan
    from finetune.models import resolve_source
    from tests.tiny import build_tiny_wan

    base = build_tiny_wan(tmp_path / "base")
    source = resolve_source(ModelConfig(path=str(base)))
    family = get_family("wan")
    gpu = load_encoders_for_plan(family, source, CUDA, torch.bfloat16, recipe(str(base)).memory)
    int8 = load_encoders_for_plan(
        family, source, CUDA, torch.bfloat16, recipe(str(base), "memory.text_encoder=int8").memory
    )
    cpu = load_encoders_for_plan(
        family, source, CUDA, torch.bfloat16, recipe(str(base), "memory.text_encoder=cpu").memory
    )
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in int8.text_encoder.modules())
    assert next(cpu.text_encoder.parameters()).device.type == "cpu"
    want = family.encode_prompts(gpu, ["a red ball"], 16)[0].float()
    for other in (int8, cpu):
        got = family.encode_prompts(other, ["a red ball"], 16)[0].float()
        assert float((got - want).norm() / want.norm()) < 0.1
