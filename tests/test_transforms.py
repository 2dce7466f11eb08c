"""EvalTransform reproduces DINOv2's Resize(256, bicubic) + CenterCrop(224) + Normalize.

Reference: transformers' PIL image processor for BiT, which is what DINOv2's HF processors are
(shortest_edge 256, crop 224, bicubic, ImageNet mean/std). Measured on the 100 ImageNet photos:
bit-identical (max abs difference 0.0) wherever both crop at the same offset (the test re-checks
all 10 shifted photos and 25 aligned ones). HF's center crop
floors ``(h - 224) / 2`` while torchvision rounds half to even, so for a resized side with
``side - 224 = 3 (mod 4)`` (10 of the 100 photos) HF's crop sits one pixel earlier; there we check
we equal HF's *resized* image cropped at torchvision's offset (DINOv2 semantics).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vssl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    center_crop_box,
    resized_size,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PHOTOS = SHARED_DATA / "imagenet-samples"
TOL = 1e-5  # normalized units; measured 0.0


def _photos() -> list[Path]:
    if not PHOTOS.is_dir():
        pytest.skip(f"../shared/data not found: {PHOTOS} is missing (real photos for parity tests)")
    files = sorted(PHOTOS.glob("*.JPEG"))
    assert files, f"no photos in {PHOTOS}"
    return files


def _hf_processor(**kw):
    transformers = pytest.importorskip("transformers")
    # transformers 5: BitImageProcessor is the torchvision backend, the PIL one has its own class;
    # transformers 4: BitImageProcessor is the PIL/numpy ("slow") processor.
    cls = getattr(transformers, "BitImageProcessorPil", None)
    if cls is None:
        cls = transformers.BitImageProcessor
        kw["use_fast"] = False
    return cls(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        resample=Image.Resampling.BICUBIC,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
        **kw,
    )


def test_matches_hf_bit_processor_on_photos():
    files = _photos()
    hf = _hf_processor()
    hf_uncropped = _hf_processor(do_center_crop=False)
    t = EvalTransform(224)

    def offsets(f):
        with Image.open(f) as im:  # header only
            w, h = resized_size(im.width, im.height, 256)
        return w, h, center_crop_box(w, h, 224, 224)[:2]

    def is_aligned(f):
        w, h, tv = offsets(f)
        return tv == ((w - 224) // 2, (h - 224) // 2)

    # Every photo where the two crops disagree, plus 25 where they agree (keeps the test ~3 s).
    shifted_files = [f for f in files if not is_aligned(f)]
    files = shifted_files + [f for f in files if is_aligned(f)][:25]
    assert shifted_files, "expected some photos with the 3 (mod 4) size case"
    aligned = shifted = 0
    worst = 0.0
    for f in files:
        img = Image.open(f).convert("RGB")
        mine = t(img).numpy()
        assert mine.shape == (3, 224, 224) and mine.dtype == np.float32
        ref = hf(img, return_tensors="np")["pixel_values"][0]
        w, h, (left, top) = offsets(f)
        if is_aligned(f):
            aligned += 1
            diff = float(np.abs(mine - ref).max())
            worst = max(worst, diff)
            assert diff <= TOL, f"{f.name}: max abs diff {diff}"
        else:
            shifted += 1
            full = hf_uncropped(img, return_tensors="np")["pixel_values"][0]
            assert full.shape[1:] == (h, w), (
                f"{f.name}: HF resized to {full.shape[1:]}, we to {(h, w)}"
            )
            ours_crop = full[:, top : top + 224, left : left + 224]
            diff = float(np.abs(mine - ours_crop).max())
            assert diff <= TOL, f"{f.name}: max abs diff {diff} vs HF resize + torchvision crop"
            # ... and HF's own crop really is the 1-pixel-shifted one (not an equal picture).
            assert float(np.abs(mine - ref).max()) > 0.05
    assert aligned == 25 and shifted == len(shifted_files)
    assert worst <= TOL


def test_center_crop_rounding_is_torchvision():
    # (415 - 224) / 2 = 95.5: torchvision int(round(95.5)) = 96 (half to even), HF floors to 95.
    assert center_crop_box(415, 256, 224, 224) == (96, 16, 320, 240)
    # (413 - 224) / 2 = 94.5 -> 94 (half to even rounds down here).
    assert center_crop_box(413, 256, 224, 224)[0] == 94
    assert center_crop_box(224, 224, 224, 224) == (0, 0, 224, 224)


def test_resize_rule():
    assert resized_size(500, 375, 256) == (341, 256)  # int(256 * 500 / 375) = 341 (341.33)
    assert resized_size(375, 500, 256) == (256, 341)
    assert resized_size(100, 100, 64) == (64, 64)
    t = EvalTransform(224)
    assert t.resize_size == 256 and t.draft_size == (256, 256)
    t56 = EvalTransform(56)
    assert t56.resize_size == 64 and t56.crop_size == (56, 56)
    assert EvalTransform(224, resize_ratio=1.0).resize_size == 224


def test_normalization_values():
    color = (128, 64, 255)
    x = EvalTransform(32)(Image.new("RGB", (50, 40), color))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    for c in range(3):
        expected = (color[c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(x[c], torch.full_like(x[c], expected), atol=1e-6)


@pytest.mark.parametrize("size", [(640, 120), (120, 640), (20, 30), (301, 299)])
def test_square_output_from_any_aspect(size):
    img = Image.new("RGB", size, (10, 200, 30))
    assert EvalTransform(56)(img).shape == (3, 56, 56)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (60, 60)])
def test_non_square_crop(size):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    t = EvalTransform((98, 196))  # (height, width)
    out = t(img)
    assert out.shape == (3, 98, 196)
    assert t.resize_size == (112, 224)
    # Covering resize: the crop is strictly inside the resized picture (no zero padding).
    resized = t.resize(img)
    assert resized.width >= 224 and resized.height >= 112
    assert min(resized.width / 224, resized.height / 112) == pytest.approx(1.0, abs=0.01)


def test_center_crop_content_on_photo():
    """The crop is the center of the resized image: a marked center pixel stays at the center."""
    img = Image.new("RGB", (300, 200), (0, 0, 0))
    img.paste((255, 255, 255), (140, 90, 160, 110))  # white square at the center
    x = EvalTransform(112, resize_ratio=1.0)(img)
    white = (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert x[0, 56, 56] == pytest.approx(white, abs=1e-3)
    assert x[0, 5, 5] == pytest.approx(-IMAGENET_MEAN[0] / IMAGENET_STD[0], abs=1e-3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="resize_ratio"):
        EvalTransform(224, resize_ratio=0.9)
    with pytest.raises(ValueError, match="positive"):
        EvalTransform(0)
    with pytest.raises(ValueError, match="interpolation"):
        EvalTransform(224, interpolation="cubic")
