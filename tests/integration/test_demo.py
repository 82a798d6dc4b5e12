"""`finetune demo` runs the real path end to end (a shortened run): files, metrics and report agree."""

import json

import numpy as np

from finetune.cli import main
from finetune.demo import HELD_OUT, run_demo
from finetune.demo_world import CAPTIONS


def test_demo_runs_end_to_end_and_learns_the_style(tmp_path):
    # The full demo (300 steps, 4 seeds: ~30 s on a free CPU core): the margins below need all its samples.
    result = run_demo(tmp_path)
    assert result["pretrained_base"], "adapters/demo-base is missing: build it with tools/build_demo_base.py"
    # The flow loss on the training clips at fixed noise must fall (the ink clips are far from anything the
    # base has seen, so it falls a lot: measured 4.47 -> 0.56).
    assert result["fixed_noise_loss_adapter"] < 0.5 * result["fixed_noise_loss_base"]
    # What the demo claims: the style moves at least halfway from the base to the style set on held-out prompts,
    # while the content (colour, shape, direction of the prompt) stays within 10% of the base's.
    assert result["style_progress"] >= 0.5, result
    assert result["content_adapter"] >= 0.9 * result["content_base"], result
    # The base makes recognisable videos: well above the 1/3 that random colour/shape/direction would score.
    assert result["content_base"] >= 0.5, result
    assert json.loads((tmp_path / "metrics.json").read_text()) == result
    for key in ("style_base", "style_adapter", "style_target", "content_base", "content_adapter"):
        assert np.isfinite(result[key]), key
    # The style set is measured from its own clips: its spread around its own mean is small next to the gap to
    # a different world; contents are shares of three attributes.
    assert 0 <= result["style_target"] < 0.1
    assert 0 <= result["content_base"] <= 1 and 0 <= result["content_adapter"] <= 1
    names = sorted(f"{p.replace(' ', '_')}_seed{seed}.mp4" for p in HELD_OUT for seed in range(4))
    for label in ("base", "adapter"):
        assert sorted(p.name for p in (tmp_path / "samples" / label).glob("*.mp4")) == names
    assert not set(HELD_OUT) & {p.read_text().strip() for p in (tmp_path / "data").glob("*.txt")}
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "samples" / "before_after.gif").is_file()
    report = (tmp_path / "report.md").read_text()
    assert "before_after.gif" in report and str(result["style_adapter"]) in report
    assert str(result["content_base"]) in report and "loss.png" in report


def test_check_data_reports_usable_clips(tmp_path, capsys):
    from finetune.demo import write_style_clips
    from tests.clips import write_corrupt

    write_style_clips(tmp_path / "data")
    write_corrupt(tmp_path / "data" / "zz_broken.mp4")
    assert (
        main(["check-data", str(tmp_path / "data"), "data.width=32", "data.height=32", "data.frames=5"]) == 0
    )
    err = capsys.readouterr().err
    clips = len(CAPTIONS) - len(HELD_OUT)
    assert f"{clips + 1} files ({clips + 1} videos, 0 images), {clips} usable at 32x32, 5 frames" in err
    assert "zz_broken.mp4: cannot be decoded" in err
