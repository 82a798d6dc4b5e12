"""tools/bench.py's parts that need no GPU: arguments, rows, the FLOP count, the markdown it writes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from finetune.config import load_recipe

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench", None)


def test_defaults_are_the_tier_recipes(bench):
    args = bench.parse_args([])
    assert args.recipes == bench.TIERS and args.steps == 4 and args.out == "docs/benchmarks.md"
    assert all((ROOT / r).is_file() for r in bench.TIERS)
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "1"])


def test_rows_have_one_baseline_per_model_and_each_tier_capped_at_its_card(bench):
    rows = bench.plan_rows(bench.parse_args([]))
    baselines = [r for r in rows if r.cap_gb is None]
    models = {bench.model_of(r) for r in bench.TIERS}
    assert {"wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "ltx_video_2b", "cogvideox_5b"} <= models
    assert sorted(r.name.split()[0] for r in baselines) == sorted(models)
    assert all("memory.blocks_to_swap=0" in r.overrides for r in baselines)
    caps = {r.name: r.cap_gb for r in rows if r.cap_gb}
    assert caps["wan2.1-t2v-1.3b_8gb"] == 8 and caps["wan2.1-t2v-14b_16gb"] == 16
    assert caps["cogvideox_5b_16gb"] == 16 and len(caps) == len(bench.TIERS)
    assert all(r.cap_gb is None for r in bench.plan_rows(bench.parse_args(["--no-cap", "--no-baseline"])))


def test_step_flops_are_the_dispatched_model_work(bench):
    """Counted by torch on fake tensors: for Wan 1.3B at 832x480x81 (32,760 tokens, 512 text tokens) it is the
    hand count within 1.5%: block linears 4 FLOPs per weight and token (forward + input gradient; frozen
    weights get no weight gradient), attention 4*T*S*D forward and 10*T*S*D backward (flash recomputes the
    scores), for self (S = T) and cross attention (S = text). The rest (LoRA, embeddings) is under 1.5%."""
    flops = bench.step_flops(load_recipe(ROOT / "recipes/wan/wan2.1-t2v-1.3b_24gb.yaml"))
    d, layers, ffn, t, s = 1536, 30, 8960, 32760, 512
    by_hand = 4 * layers * ((6 * d * d + 2 * d * ffn) * t + 2 * d * d * s) + 14 * layers * d * t * (t + s)
    assert by_hand <= flops <= 1.015 * by_hand
    assert bench.gpu_peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert bench.gpu_peak_tflops("Some GPU", None) is None and bench.gpu_peak_tflops("x", 100.0) == 100.0


def test_markdown_puts_the_estimate_beside_the_measurement(bench):
    base = bench.Row("1.3B baseline", "r.yaml", [], None, peak_allocated_gb=10.0, peak_reserved_gb=11.0,
                     estimated_gb=11.3, estimated_allocated_gb=9.5, s_per_step=2.0, tokens_per_s=16380.0,
                     mfu=0.451, baseline_s_per_step=2.0)  # fmt: skip
    oom = bench.Row("wan2.1-t2v-14b_16gb", "r.yaml", [], 16, status="out of memory")
    text = bench.markdown([base, oom], {"gpu": "NVIDIA H100", "command": "python tools/bench.py"})
    row = next(line for line in text.splitlines() if line.startswith("| 1.3B baseline"))
    assert "| none | ok | 10.00 | 11.00 | 11.30 (9.50) | -5.0% | 2.00 | 1.00 | 16,380 | 45.1% |" in row
    assert "| wan2.1-t2v-14b_16gb | 16 | out of memory | – |" in text
    assert "NVIDIA H100" in text and "`python tools/bench.py`" in text


def test_the_gpu_section_replaces_only_itself_and_keeps_the_cpu_section(bench):
    page = "# Benchmarks\n\nintro\n\n## Caching throughput (CPU)\n\n| clips/s |\n|---|\n| 2.71 |\n"
    first = bench.merge_section(page, bench.markdown([], {"gpu": "H100"}))
    assert "## Caching throughput (CPU)" in first and "| 2.71 |" in first and "GPU: H100" in first
    assert first.index("GPU: H100") < first.index("## Caching throughput")
    second = bench.merge_section(first, bench.markdown([], {"gpu": "H200"}))
    assert "GPU: H200" in second and "GPU: H100" not in second and second.count("## Caching throughput") == 1
