"""Training data: find media and captions (folders, metadata files, several datasets), probe and decode them,
and plan the samples (buckets, frame windows) that the cache encodes."""

from finetune.data.decode import MediaError, MediaInfo, decode_windows, load_clip, probe
from finetune.data.discover import IMAGE_EXTS, VIDEO_EXTS, Item, Problem, discover

__all__ = [
    "IMAGE_EXTS",
    "VIDEO_EXTS",
    "Item",
    "MediaError",
    "MediaInfo",
    "Problem",
    "decode_windows",
    "discover",
    "load_clip",
    "probe",
]
