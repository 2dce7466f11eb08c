"""Data: robust decoding and the evaluation transform (sources, augmentation, masking: later)."""

from .decode import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalTransform",
    "ImageDecodeError",
    "open_image",
]
