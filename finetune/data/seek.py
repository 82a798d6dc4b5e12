"""Decode only the stretches of a video that training needs, with the same frames as a decode from the start.

Frame `i` of a clip means the i-th frame in presentation order, as counted when decoding from the start. After a
seek the count is lost, so each decoded frame is placed by its timestamp instead: one demux pass (reading packets,
decoding nothing, about as fast as the disk) gives every frame's pts, and frame i has the i-th smallest pts.
The same pass gives the keyframes. To reach frame t we seek to the last keyframe whose frame index is <= t and
decode from there; frames before t are dropped. That is exact for closed GOPs, and for open GOPs too: the
keyframe chosen precedes t in presentation order, so t's references are decoded first.

Anything unusual (no pts, duplicate pts, a seek landing after the frame we asked for) falls back to counting
frames from the start, which is always right and only slower.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av

# Skipping fewer frames than this is not worth a seek. A seek flushes the decoder and restarts at an I-frame, the
# costliest kind: on a 2-core CPU, seek + first frame of a 720p clip took 70 ms, the time of ~15 sequential
# frames (tools/bench_seek.py). 32 keeps a margin, so a seek is only made where it clearly wins.
SEEK_MIN_SKIP = 32


@dataclass(frozen=True)
class FrameTable:
    rank: dict[int, int]  # pts -> frame index (presentation order)
    key_indices: list[int]  # frame indices of the keyframes, ascending
    # For each keyframe: its pts, the timestamp we seek to. FFmpeg's mov and matroska demuxers land exactly on
    # that keyframe (measured); a demuxer that lands after it is caught and falls back to counting.
    key_seek: list[int]


class _SeekFailed(Exception):
    pass


def worth_seeking(needed: list[int]) -> bool:
    """Whether any stretch of unneeded frames (before the first, or between two needed ones) is long enough."""
    gaps = [needed[0]] + [later - earlier - 1 for earlier, later in zip(needed, needed[1:], strict=False)]
    return max(gaps) >= SEEK_MIN_SKIP


def frame_table(path: Path) -> FrameTable | None:
    """Every frame's pts and the keyframes, from one demux pass; None when timestamps can't index frames."""
    pts_list, keys = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packet at the end
                    continue
                if packet.pts is None:
                    return None
                pts_list.append(packet.pts)
                if packet.is_keyframe:
                    keys.append(packet.pts)
        except av.error.FFmpegError:
            pass  # a damaged tail: the frames before it are indexed
    if not keys or len(set(pts_list)) != len(pts_list):
        return None
    rank = {pts: i for i, pts in enumerate(sorted(pts_list))}
    ordered = sorted((rank[pts], pts) for pts in keys)
    return FrameTable(rank, [i for i, _ in ordered], [s for _, s in ordered])


def indexed_frames(path: Path, container, stream, needed: list[int]) -> Iterator[tuple[int, av.VideoFrame]]:
    """(frame index, frame) in increasing index order, covering every index in `needed` (sorted) that the file
    holds; frames in long unneeded stretches are skipped by seeking. The caller stops when it has enough."""
    table = None
    if (
        needed and worth_seeking(needed) and Path(path).suffix.lower() != ".gif"
    ):  # GIF frames build on each other
        table = frame_table(path)
    if table is None:
        yield from enumerate(container.decode(stream))
        return
    done = [-1]  # the last index yielded, shared with the fallback
    try:
        yield from _seeking(container, stream, needed, table, done)
    except _SeekFailed:
        # Start over, counting, in a fresh container (the current one's position is unknown).
        with av.open(str(path)) as again:
            fresh = again.streams.video[0]
            fresh.thread_type = stream.thread_type
            for index, frame in enumerate(again.decode(fresh)):
                if index > done[0]:
                    yield index, frame


def _seeking(container, stream, needed: list[int], table: FrameTable, done: list[int]):
    position = 0  # the index that decoding on from here would give next
    target = needed[0]
    frames = None
    while True:
        k = bisect.bisect_right(table.key_indices, target) - 1
        key = table.key_indices[k] if k >= 0 else 0
        seeked = frames is None and key > 0 or key >= position + SEEK_MIN_SKIP
        if seeked:
            # backward=True: the keyframe at or before the timestamp; we asked for the keyframe's own.
            container.seek(table.key_seek[k], stream=stream, backward=True)
        if seeked or frames is None:
            frames = container.decode(stream)
        first = True
        for frame in frames:
            index = table.rank.get(frame.pts)
            if index is None or (first and seeked and index > target):
                raise _SeekFailed  # a frame we can't place, or the seek went past the frame we need
            first = False
            position = index + 1
            if index > done[0]:
                done[0] = index
                yield index, frame
            if index >= target:
                later = bisect.bisect_right(needed, index)
                if later == len(needed):
                    return
                target = needed[later]
                following = table.key_indices[bisect.bisect_right(table.key_indices, target) - 1]
                if following >= position + SEEK_MIN_SKIP:
                    break  # a keyframe far enough ahead: seek to it rather than decode up to it
        else:
            return  # end of the stream
