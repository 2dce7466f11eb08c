"""The evaluation transform: DINOv2's ``Resize(256, bicubic) + CenterCrop(224) + ToTensor + Normalize``.

Written with PIL, numpy and torch only (no torchvision), reproducing torchvision's semantics
exactly so features and benchmark numbers compare with DINOv2's ``make_classification_eval_transform``:

- resize: the short side goes to ``int(resolution * resize_ratio)``, the long side to
  ``int(new_short * long / short)`` (truncation, as torchvision and HF do), PIL bicubic (PIL always
  antialiases when shrinking, which is what torchvision does for PIL inputs);
- center crop: ``top = int(round((h - crop_h) / 2.0))`` (Python's round-half-to-even). HF image
  processors use ``(h - crop_h) // 2`` instead, so when ``h - crop_h`` is 3 mod 4 the HF crop sits
  one pixel higher/further left than torchvision's; we follow torchvision (DINOv2).
- to tensor: ``uint8 -> float32 / 255``, then ``(x - mean) / std`` in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EvalTransform", "center_crop_box", "resized_size"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) after torchvision's ``Resize(short_side)``: short side exact, long side truncated."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def center_crop_box(width: int, height: int, crop_w: int, crop_h: int) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) with torchvision's ``CenterCrop`` rounding.

    Negative offsets (crop larger than the image) make PIL pad with zeros, as torchvision pads.
    """
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return left, top, left + crop_w, top + crop_h


class EvalTransform:
    """PIL RGB image -> normalized float32 tensor (3, H, W): resize short side, center crop.

    ``resolution``: the crop, an int (square) or ``(height, width)``. ``resize_ratio``: resize target
    over crop (256/224 is DINOv2's protocol; 1.0 resizes straight to the crop's short side). For a
    non-square crop the image is resized so that it covers ``resolution * resize_ratio`` in both
    directions, then center-cropped.
    ``draft_size`` is the size to pass to ``open_image(..., draft_size=)`` so JPEGs decode at reduced
    scale but never below the resize target.
    """

    def __init__(
        self,
        resolution: int | Sequence[int] = 224,
        resize_ratio: float = 256 / 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bicubic",
    ):
        if isinstance(resolution, int):
            crop_h = crop_w = resolution
        else:
            crop_h, crop_w = (int(v) for v in resolution)
        if crop_h <= 0 or crop_w <= 0:
            raise ValueError(f"resolution must be positive, got {resolution!r}")
        if resize_ratio < 1.0:
            raise ValueError(
                f"resize_ratio must be >= 1 (resize at least to the crop size), got {resize_ratio}"
            )
        if interpolation not in _RESAMPLE:
            raise ValueError(
                f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}"
            )
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std need 3 values (RGB)")
        self.crop_size = (crop_h, crop_w)
        self.resize_ratio = float(resize_ratio)
        # + 1e-6 guards int() against a product like 255.99999999999997 (ratio given as a decimal).
        self.resize_hw = (int(crop_h * resize_ratio + 1e-6), int(crop_w * resize_ratio + 1e-6))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        self._mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)

    @property
    def resize_size(self) -> int | tuple[int, int]:
        """The short-side resize target (an int) for a square crop, else (h, w) to cover."""
        h, w = self.resize_hw
        return h if h == w else (h, w)

    @property
    def draft_size(self) -> tuple[int, int]:
        """(s, s) with s the largest resize target: safe for either orientation after EXIF rotation."""
        s = max(self.resize_hw)
        return (s, s)

    def resize(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        rh, rw = self.resize_hw
        if rh == rw:
            new_w, new_h = resized_size(w, h, rh)
        else:  # cover (rh, rw) keeping the aspect ratio
            scale = max(rh / h, rw / w)
            new_w, new_h = max(rw, int(w * scale)), max(rh, int(h * scale))
        if (new_w, new_h) == (w, h):
            return img
        return img.resize((new_w, new_h), resample=_RESAMPLE[self.interpolation])

    def crop(self, img: Image.Image) -> Image.Image:
        crop_h, crop_w = self.crop_size
        if img.size == (crop_w, crop_h):
            return img
        return img.crop(center_crop_box(img.width, img.height, crop_w, crop_h))

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """uint8 HWC -> float32 CHW in [0, 1] -> normalized.

        The same float32 operations in the same order as torchvision's ToTensor + Normalize (so
        bit-identical), done in numpy: ~1 ms at 224 px, where small torch ops cost ~10x more in
        a process whose intra-op thread pool is busy with the model.
        """
        if img.mode != "RGB":
            img = img.convert("RGB")
        a = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
        a /= np.float32(255.0)
        a -= self._mean
        a /= self._std
        return torch.from_numpy(a)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.to_tensor(self.crop(self.resize(img)))

    def __repr__(self) -> str:
        return (
            f"EvalTransform(crop={self.crop_size}, resize={self.resize_size}, "
            f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})"
        )
