"""Training data: find media and captions under a folder, decode them to VAE-ready tensors."""

from finetune.data.decode import MediaError, load_clip
from finetune.data.discover import IMAGE_EXTS, VIDEO_EXTS, Item, Problem, discover

__all__ = ["IMAGE_EXTS", "VIDEO_EXTS", "Item", "MediaError", "Problem", "discover", "load_clip"]
