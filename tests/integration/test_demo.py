"""`finetune demo` runs the real path end to end (a shortened run) and the adapter measurably learns."""

import json

from finetune.cli import main
from finetune.demo import run_demo


def test_demo_runs_end_to_end_and_learns(tmp_path):
    result = run_demo(tmp_path, steps=60)
    # The flow loss on the training clips at fixed noise must fall by over 15% (measured: ~40% after
    # 150 steps, ~25% after 60).
    assert result["fixed_noise_loss_adapter"] < 0.85 * result["fixed_noise_loss_base"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == result
    for label in ("base", "adapter"):
        videos = sorted(p.name for p in (tmp_path / "samples" / label).glob("*.mp4"))
        assert videos == ["a_blue_circle_moving_left.mp4", "a_yellow_square_moving_up.mp4"]
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    report = (tmp_path / "report.md").read_text()
    assert "_before_after.gif" in report and str(result["fixed_noise_loss_adapter"]) in report


def test_check_data_reports_usable_clips(tmp_path, capsys):
    from finetune.demo import write_style_clips
    from tests.clips import write_corrupt

    write_style_clips(tmp_path / "data")
    write_corrupt(tmp_path / "data" / "zz_broken.mp4")
    assert (
        main(["check-data", str(tmp_path / "data"), "data.width=64", "data.height=64", "data.frames=17"]) == 0
    )
    err = capsys.readouterr().err
    assert "31 files (31 videos, 0 images), 30 usable at 64x64, 17 frames" in err
    assert "zz_broken.mp4: cannot be decoded" in err
