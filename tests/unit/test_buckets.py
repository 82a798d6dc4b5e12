"""Aspect and frame buckets, and every frame extraction mode, on numbers worked out by hand."""

import math

import pytest

from finetune.data.buckets import aspect_buckets, frame_buckets, pick_frames, pick_size
from finetune.data.extract import TooShort, plan_windows


def wan_rule(frames: int) -> int:
    return max(1, (frames - 1) // 4 * 4 + 1)


# --- aspect buckets ------------------------------------------------------------------------------


def test_aspect_buckets_keep_the_area_the_step_and_the_ratio_limit():
    buckets = aspect_buckets(832, 480, 16)
    area = 832 * 480
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert w * h <= area and w * h > area - 16 * w  # h is the tallest multiple of 16 under the area
        assert 0.25 <= w / h <= 4
    assert (832, 480) in buckets
    assert (624, 640) in buckets and (640, 624) in buckets  # nearest to square: 399,360 / 624 = 640
    assert (480, 832) in buckets  # portrait: the target turned


def test_aspect_buckets_off_gives_only_the_target():
    assert aspect_buckets(832, 480, 16, enabled=False) == [(832, 480)]
    assert aspect_buckets(100, 70, 16, enabled=False) == [(96, 64)]


@pytest.mark.parametrize(
    "source,expected",
    [
        ((1920, 1080), (832, 480)),  # 16:9 = 1.778: 832/480 = 1.733 is nearer than 848/464 = 1.828
        ((1080, 1920), (480, 832)),  # the same clip filmed upright
        ((832, 480), (832, 480)),
        ((4000, 500), (1248, 320)),  # 8:1 gets the 4:1 limit
    ],
)
def test_pick_size_nearest_aspect(source, expected):
    buckets = aspect_buckets(832, 480, 16)
    assert pick_size(source, buckets, 16, no_upscale=False) == expected
    ratio = source[0] / source[1]
    best = min(abs(math.log(w / h) - math.log(ratio)) for w, h in buckets)
    assert abs(math.log(expected[0] / expected[1]) - math.log(ratio)) == pytest.approx(best)


def test_no_upscale_shrinks_the_bucket_to_fit_the_source():
    buckets = aspect_buckets(832, 480, 16)
    assert pick_size((320, 240), buckets, 16, no_upscale=False) == (720, 544)  # 4:3, upscaled
    w, h = pick_size((320, 240), buckets, 16, no_upscale=True)
    # 720x544 must shrink by min(320/720, 240/544) = 0.441 (the height binds): 317.6 x 240 -> 304 x 240.
    assert (w, h) == (304, 240) and w <= 320 and h <= 240
    exact = pick_size((720, 544), buckets, 16, no_upscale=True)
    assert exact == (720, 544)  # an exact fit: a shrink factor of 0.99999 must not floor a side to 704
    assert pick_size((1920, 1080), buckets, 16, no_upscale=True) == (832, 480)  # already smaller: unchanged
    with pytest.raises(ValueError, match="is 8x200; smaller than the 16-pixel minimum"):
        pick_size((8, 200), buckets, 16, no_upscale=True)


# --- frame buckets -------------------------------------------------------------------------------


def test_frame_buckets_snap_to_the_family_rule_and_dedupe():
    assert frame_buckets((1, 17, 33, 49, 81), wan_rule) == (1, 17, 33, 49, 81)
    assert frame_buckets((20, 10, 18, 81), wan_rule) == (9, 17, 81)


def test_pick_frames_largest_bucket_filled():
    buckets = (1, 17, 33, 49, 81)
    assert pick_frames(48, buckets) == 33
    assert pick_frames(49, buckets) == 49
    assert pick_frames(500, buckets) == 81
    assert pick_frames(0, (17,)) is None and pick_frames(16, (17, 33)) is None


# --- extraction modes ----------------------------------------------------------------------------


def test_head_takes_the_first_frames_of_the_largest_bucket():
    assert plan_windows(40, 16, (9, 17, 33), "head") == (33, [tuple(range(33))])


def test_head_at_target_fps_takes_every_second_frame_of_a_30fps_clip():
    frames, windows = plan_windows(40, 30.0, (9, 17, 33), "head", target_fps=15)
    # 40 source frames at 30 fps = 20 frames at 15 fps: fills 17, every second source frame.
    assert frames == 17 and windows == [tuple(range(0, 34, 2))]


def test_fractional_rate_ratio_rounds_to_the_nearest_source_frame():
    _, [window] = plan_windows(100, 24.0, (5,), "head", target_fps=16)  # 1.5 source frames per output frame
    assert window == (0, 2, 3, 4, 6)  # round(0, 1.5, 3, 4.5, 6), banker's rounding on .5


def test_uniform_spreads_over_the_whole_clip():
    frames, [window] = plan_windows(100, 25, (9, 17), "uniform")
    assert frames == 17 and window[0] == 0 and window[-1] == 99
    assert window == tuple(round(i * 99 / 16) for i in range(17))


def test_slide_windows_every_stride():
    frames, windows = plan_windows(40, 8, (17,), "slide", stride=8)
    assert frames == 17
    assert [w[0] for w in windows] == [0, 8, 16]  # 16 + 17 = 33 <= 40; 24 + 17 = 41 > 40
    assert all(w == tuple(range(w[0], w[0] + 17)) for w in windows)


def test_chain_windows_back_to_back():
    frames, windows = plan_windows(40, 8, (9, 17), "chain")
    assert frames == 17 and [w[0] for w in windows] == [0, 17]
    assert windows[1] == tuple(range(17, 34))


def test_full_takes_the_whole_clip_rounded_to_the_rule_and_capped():
    assert plan_windows(40, 8, (9, 17, 81), "full", valid_frames=wan_rule)[0] == 37  # 40 -> 4k+1 = 37
    assert plan_windows(400, 8, (9, 17, 81), "full", valid_frames=wan_rule)[0] == 81  # capped


def test_too_short_names_the_length_and_the_shortest_bucket():
    with pytest.raises(TooShort, match="has 5 frames; the shortest frame bucket is 9"):
        plan_windows(5, 8, (9, 17), "head")
    with pytest.raises(TooShort, match="has 1 frame; the shortest"):
        plan_windows(1, 8, (9,), "chain")
    with pytest.raises(TooShort, match="has 10 frames at 10 fps"):
        plan_windows(30, 30, (17,), "head", target_fps=10)
    assert plan_windows(1, 8, (1, 9), "head") == (1, [(0,)])  # a 1-frame bucket takes a 1-frame clip
