"""Training views: geometry once per image on the CPU (uint8), photometry batched on tensors.

DINOv2's multi-crop pipeline (``dinov2/data/augmentations.py``) does everything per crop in PIL
inside the DataLoader worker: 10 crops x (crop, resize, flip, colour jitter, grayscale, blur,
solarize, to-tensor, normalize). Here it is split in two (docs/architecture.md, Performance):

- :class:`MultiCropGeometry` (DataLoader worker, per image): random resized crop + flip of the
  decoded PIL image, one crop+resize call per crop (torch's uint8 antialiased kernels by default,
  or one PIL ``resize(box=...)``), -> uint8 tensors. uint8 is 4x less to move between processes
  than float32.
- :class:`MultiCropPhotometric` (after collation, on whatever device the batch is on): colour
  jitter, grayscale, gaussian blur, solarize and normalization for the whole batch at once with
  kornia's torchvision-compatible functional ops, each image drawing its own parameters.

torchvision is not usable in this environment, so the random-resized-crop parameter sampling is
written here by hand (:func:`sample_resized_crop`), reproducing torchvision's
``RandomResizedCrop.get_params`` algorithm.

``MAEView`` / ``SplitMaskView``: a single random resized crop + flip (uint8); normalize the batch
with :func:`normalize`. The evaluation transform is :class:`vssl.data.transforms.EvalTransform`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "MAEView",
    "MultiCropGeometry",
    "MultiCropPhotometric",
    "PhotometricParams",
    "SplitMaskView",
    "apply_photometric",
    "crop_draft_size",
    "normalize",
    "python_rng",
    "sample_resized_crop",
]

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


def python_rng(generator: torch.Generator | random.Random | None) -> random.Random:
    """A ``random.Random`` seeded from ``generator`` (one draw from it), or the global one.

    Python's RNG costs ~0.1 us a draw where a ``torch.rand(1)`` costs a few us; geometry and mask
    sampling draw tens of numbers per image. Without a generator the module-level ``random``
    is used, which DataLoader seeds differently in every worker (as it does torch's).
    """
    if generator is None:
        return random._inst  # type: ignore[attr-defined]  # the global Random instance
    if isinstance(generator, random.Random):
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return random.Random(seed)


# ------------------------------------------------------------------------------------ geometry


def sample_resized_crop(
    width: int,
    height: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    rng: random.Random | None = None,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: (top, left, h, w) of the crop.

    Up to ``attempts`` (10) tries of: area fraction ~ U(scale), log aspect ratio (w/h) ~
    U(log ratio), accepted if the box fits in the image, position uniform. Otherwise the fallback:
    a center crop of the whole image with its aspect ratio clamped into ``ratio``.
    """
    rng = rng if rng is not None else random._inst  # type: ignore[attr-defined]
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_draft_size(size: int, scale: Sequence[float], ratio: Sequence[float]) -> int:
    """Smallest short side an image needs for every crop of ``scale``/``ratio`` to be >= ``size``.

    A crop covers at least ``scale[0]`` of the image area with aspect in ``ratio``, so its short
    side is at least ``S * sqrt(scale[0] * r)`` (``S`` the image's short side, ``r = min(ratio[0],
    1/ratio[1])``). Decoding a JPEG with ``draft()`` down to this size never makes a crop upsample
    where the full-size decode would not have.
    """
    r = min(ratio[0], 1.0 / ratio[1], 1.0)
    return int(math.ceil(size / math.sqrt(scale[0] * r)))


def _crop_into(
    img: Image.Image,
    out: np.ndarray,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    flip_p: float,
    resample: Image.Resampling,
    reducing_gap: float | None,
    rng: random.Random,
) -> None:
    top, left, h, w = sample_resized_crop(img.width, img.height, scale, ratio, rng)
    crop = img.resize(
        (size, size),
        resample=resample,
        box=(left, top, left + w, top + h),
        reducing_gap=reducing_gap,
    )
    a = np.asarray(crop)
    if rng.random() < flip_p:
        a = a[:, ::-1]
    out[...] = a


def _as_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def _check_backend(backend: str, interpolation: str) -> str:
    if backend not in ("torch", "pil"):
        raise ValueError(f"backend must be 'torch' or 'pil', got {backend!r}")
    if backend == "torch" and interpolation not in _TORCH_MODES:
        return "pil"  # torch has no antialiased lanczos/nearest: PIL does those
    return backend


_TORCH_MODES = {"bicubic": "bicubic", "bilinear": "bilinear"}


def _as_chw_uint8(img: Image.Image | np.ndarray) -> torch.Tensor:
    """(1, 3, H, W) uint8 view (channels-last strides) of the RGB pixels: a PIL image is copied,
    a writable (H, W, 3) uint8 array (``open_image(as_array=True)``) is used as it is."""
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {img.dtype} {img.shape}")
        a = img if img.flags.writeable else img.copy()  # torch refuses read-only memory
    else:
        a = np.array(_as_rgb(img), dtype=np.uint8)
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)


def _torch_crop_into(
    t: torch.Tensor,
    out: torch.Tensor,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    flip_p: float,
    mode: str,
    rng: random.Random,
) -> None:
    """Crop + resize with torch's uint8 antialiased kernels (PIL's filters: bicubic a=-0.5)."""
    height, width = t.shape[-2:]
    top, left, h, w = sample_resized_crop(width, height, scale, ratio, rng)
    # a contiguous channels-last copy takes torch's AVX2 uint8 resize path: 1.3-1.5x faster than
    # resizing the strided slice, bit-identical output (measured on 500x375 crops)
    crop = t[:, :, top : top + h, left : left + w].contiguous(memory_format=torch.channels_last)
    r = torch.nn.functional.interpolate(
        crop, size=(size, size), mode=mode, antialias=True, align_corners=False
    )
    if rng.random() < flip_p:
        r = r.flip(-1)
    out.copy_(r[0])


def _check_crop_args(interpolation: str, ratio: Sequence[float], **scales: Sequence[float]) -> None:
    """Validate random-resized-crop settings (shared by every view)."""
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
    for name, sc in scales.items():
        if not (0 < sc[0] <= sc[1] <= 1.0):
            raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1, got {sc!r}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio!r}")


class MultiCropGeometry:
    """PIL RGB image (or (H, W, 3) uint8 array) -> {"global": uint8 (2, 3, G, G), "local": uint8
    (n_local, 3, L, L)}.

    DINOv2's geometric part: ``RandomResizedCrop(size, scale, interpolation=bicubic)`` +
    ``RandomHorizontalFlip(flip_p)`` per crop.

    ``backend="torch"`` (default): each crop is a slice of the decoded pixels and one
    ``F.interpolate(uint8, antialias=True)``: torch's uint8 kernels implement PIL's antialiased
    filters (bicubic a=-0.5) and are 2.5-5x faster than Pillow's here (Pillow without SIMD);
    results match PIL to within a level or two at interior pixels (at the crop border PIL's filter
    also reads pixels just outside the box, torch's does not). ``backend="pil"``: one PIL
    ``resize(size, box=..., reducing_gap=...)`` per crop (crop and resize in a single pass;
    ``reducing_gap`` None, torchvision's behaviour, is exact; 2.0-3.0 is faster on big photos).
    Lanczos/nearest always use PIL. Both backends draw the same boxes from the same seed.
    ``draft_size`` is what to pass to ``open_image(draft_size=...)``.
    Call with ``generator=`` (a ``torch.Generator`` or ``random.Random``) for reproducible crops.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 98,
        n_local: int = 8,
        global_scale: Sequence[float] = (0.32, 1.0),
        local_scale: Sequence[float] = (0.05, 0.32),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        interpolation: str = "bicubic",
        n_global: int = 2,
        reducing_gap: float | None = None,
        backend: str = "torch",
    ):
        _check_crop_args(interpolation, ratio, global_scale=global_scale, local_scale=local_scale)
        if n_global < 1 or n_local < 0:
            raise ValueError("need n_global >= 1 and n_local >= 0")
        self.global_size = int(global_size)
        self.local_size = int(local_size)
        self.n_global = int(n_global)
        self.n_local = int(n_local)
        self.global_scale = tuple(float(s) for s in global_scale)
        self.local_scale = tuple(float(s) for s in local_scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.flip_p = float(flip_p)
        self.interpolation = interpolation
        self.reducing_gap = reducing_gap
        self._resample = _RESAMPLE[interpolation]
        self.backend = _check_backend(backend, interpolation)

    @property
    def accepts_array(self) -> bool:
        """The torch backend takes (H, W, 3) uint8 arrays too (sources then skip PIL entirely)."""
        return self.backend == "torch"

    @property
    def draft_size(self) -> tuple[int, int]:
        """(s, s): the smallest JPEG draft size that still serves every crop without upsampling."""
        s = crop_draft_size(self.global_size, self.global_scale, self.ratio)
        if self.n_local:
            s = max(s, crop_draft_size(self.local_size, self.local_scale, self.ratio))
        return (s, s)

    def __call__(
        self,
        img: Image.Image | np.ndarray,
        generator: torch.Generator | random.Random | None = None,
    ) -> dict[str, torch.Tensor]:
        rng = python_rng(generator)
        G, L = self.global_size, self.local_size
        if isinstance(img, np.ndarray) and self.backend != "torch":
            img = Image.fromarray(img, "RGB")
        if self.backend == "torch":
            t = _as_chw_uint8(img)
            mode = _TORCH_MODES[self.interpolation]
            gt = torch.empty((self.n_global, 3, G, G), dtype=torch.uint8)
            for k in range(self.n_global):
                _torch_crop_into(t, gt[k], G, self.global_scale, self.ratio, self.flip_p, mode, rng)
            lt = torch.empty((self.n_local, 3, L, L), dtype=torch.uint8)
            for k in range(self.n_local):
                _torch_crop_into(t, lt[k], L, self.local_scale, self.ratio, self.flip_p, mode, rng)
            return {"global": gt, "local": lt}
        img = _as_rgb(img)
        g = np.empty((self.n_global, G, G, 3), dtype=np.uint8)
        for k in range(self.n_global):
            _crop_into(
                img,
                g[k],
                G,
                self.global_scale,
                self.ratio,
                self.flip_p,
                self._resample,
                self.reducing_gap,
                rng,
            )
        loc = np.empty((self.n_local, L, L, 3), dtype=np.uint8)
        for k in range(self.n_local):
            _crop_into(
                img,
                loc[k],
                L,
                self.local_scale,
                self.ratio,
                self.flip_p,
                self._resample,
                self.reducing_gap,
                rng,
            )
        return {
            "global": torch.from_numpy(np.ascontiguousarray(g.transpose(0, 3, 1, 2))),
            "local": torch.from_numpy(np.ascontiguousarray(loc.transpose(0, 3, 1, 2))),
        }

    def __repr__(self) -> str:
        return (
            f"MultiCropGeometry(global={self.n_global}x{self.global_size} scale={self.global_scale}, "
            f"local={self.n_local}x{self.local_size} scale={self.local_scale}, ratio={self.ratio}, "
            f"flip_p={self.flip_p}, interpolation={self.interpolation!r})"
        )


class MAEView:
    """PIL RGB image -> uint8 (3, size, size): MAE's ``RandomResizedCrop(size, scale=(0.2, 1),
    bicubic) + RandomHorizontalFlip``. Normalize the collated batch with :func:`normalize`."""

    def __init__(
        self,
        size: int = 224,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        interpolation: str = "bicubic",
        reducing_gap: float | None = None,
        backend: str = "torch",
    ):
        _check_crop_args(interpolation, ratio, scale=scale)
        self.size = int(size)
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.flip_p = float(flip_p)
        self.interpolation = interpolation
        self.reducing_gap = reducing_gap
        self._resample = _RESAMPLE[interpolation]
        self.backend = _check_backend(backend, interpolation)

    @property
    def draft_size(self) -> tuple[int, int]:
        s = crop_draft_size(self.size, self.scale, self.ratio)
        return (s, s)

    def __call__(
        self, img: Image.Image, generator: torch.Generator | random.Random | None = None
    ) -> torch.Tensor:
        rng = python_rng(generator)
        if self.backend == "torch":
            out_t = torch.empty((3, self.size, self.size), dtype=torch.uint8)
            _torch_crop_into(
                _as_chw_uint8(img),
                out_t,
                self.size,
                self.scale,
                self.ratio,
                self.flip_p,
                _TORCH_MODES[self.interpolation],
                rng,
            )
            return out_t
        out = np.empty((self.size, self.size, 3), dtype=np.uint8)
        _crop_into(
            _as_rgb(img),
            out,
            self.size,
            self.scale,
            self.ratio,
            self.flip_p,
            self._resample,
            self.reducing_gap,
            rng,
        )
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"flip_p={self.flip_p}, interpolation={self.interpolation!r})"
        )


class SplitMaskView(MAEView):
    """SplitMask's view: the same random resized crop + flip as MAE (scale (0.2, 1) by default)."""


def normalize(
    x: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 (..., 3, H, W) in 0..255 (or float in [0, 1]) -> float32 ``(x/255 - mean) / std``."""
    if x.dtype == torch.uint8:
        x = x.to(torch.float32).div_(255.0)
    else:
        x = x.to(torch.float32, copy=True)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return x.sub_(m).div_(s)


# --------------------------------------------------------------------------------- photometry


@dataclass(frozen=True)
class PhotometricParams:
    """One crop group's photometric recipe (defaults: DINOv2's local crops).

    ``jitter``: torchvision ``ColorJitter(brightness, contrast, saturation, hue)`` strengths,
    applied (in a random order per image, as torchvision does) with probability ``jitter_p``;
    ``grayscale_p``: ``RandomGrayscale``; ``blur_p``: ``GaussianBlur(blur_kernel, sigma ~
    U(blur_sigma))``; ``solarize_p``: ``RandomSolarize(threshold=solarize_threshold)`` on the
    0..255 scale (pixels >= threshold are inverted).
    """

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 9
    solarize_p: float = 0.0
    solarize_threshold: float = 128.0


DINO_GLOBAL1 = PhotometricParams(blur_p=1.0)
DINO_GLOBAL2 = PhotometricParams(blur_p=0.1, solarize_p=0.2)
DINO_LOCAL = PhotometricParams(blur_p=0.5)

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _per_sample(values: Sequence[float], counts: Sequence[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), float(v)) for v, n in zip(values, counts)])


def _uniform(lo: torch.Tensor, hi: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(lo.shape, generator=g)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, gch, b = x.unbind(dim=-3)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * gch + _GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * mean).clamp_(0.0, 1.0)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * _gray(x)).clamp_(0.0, 1.0)


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` (RGB -> HSV, shift H by ``f`` turns, -> RGB), fused.

    Value and saturation are unchanged by a hue shift, so with ``maxc`` the value and ``delta =
    maxc - minc`` (= V * S) the branch-free HSV -> RGB formula ``c_n = V - V S clamp(min(k, 4 - k),
    0, 1)``, ``k = (n + 6 H) mod 6`` (n = 5, 3, 1 for R, G, B) needs no division by V. About 4x
    fewer passes over memory than ``kornia.enhance.adjust_hue`` (checked equal in the tests).
    """
    r, g, b = x.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    delta = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = 1.0 / delta.clamp(min=1e-12)
    # hue in sextants [0, 6): from the channel holding the max (ties: R before G before B)
    h6 = torch.where(
        maxc == r, (g - b) * inv, torch.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0)
    )
    h6.add_(f.to(x.dtype).view(-1, 1, 1) * 6.0)
    out = torch.empty_like(x)
    for c, n in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(h6 + n, 6.0)
        k = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.sub(maxc, delta * k, out=out[:, c])
    return out


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def _apply_subset(x: torch.Tensor, sel: torch.Tensor, fn, *args: torch.Tensor) -> None:
    """x[sel] = fn(x[sel], *args[sel]) in place; sel a CPU bool (n,) mask."""
    if not bool(sel.any()):
        return
    if bool(sel.all()):
        x.copy_(fn(x, *(a.to(x.device) for a in args)))
        return
    idx = sel.nonzero().flatten()
    idx_d = idx.to(x.device)
    x.index_copy_(0, idx_d, fn(x.index_select(0, idx_d), *(a[idx].to(x.device) for a in args)))


def apply_photometric(
    x: torch.Tensor,
    params: Sequence[PhotometricParams],
    counts: Sequence[int],
    generator: torch.Generator | None = None,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> torch.Tensor:
    """Batched DINOv2 photometry on ``x`` uint8 (n, 3, H, W) (or float in [0, 1]).

    The batch is ``len(params)`` consecutive groups of ``counts[i]`` images, group ``i`` using
    ``params[i]``; every image draws its own random parameters (from ``generator``, a CPU
    generator, or torch's global RNG) and only the images an op selects are processed by it.
    Returns float32 normalized with ``mean``/``std`` (None: left in [0, 1]).
    """
    if len(params) != len(counts) or sum(counts) != x.shape[0]:
        raise ValueError(f"counts {list(counts)} must match params and the batch size {x.shape[0]}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (n, 3, H, W), got {tuple(x.shape)}")
    n = x.shape[0]
    x = (
        x.to(torch.float32).div_(255.0)
        if x.dtype == torch.uint8
        else x.to(torch.float32, copy=True)
    )
    g = generator

    # colour jitter: apply?, factors, and a random order per image (torchvision's ColorJitter)
    strengths = torch.cat(
        [torch.tensor([p.jitter], dtype=torch.float32).expand(c, 4) for p, c in zip(params, counts)]
    )
    lo = torch.cat([(1.0 - strengths[:, :3]).clamp(min=0.0), -strengths[:, 3:]], dim=1)
    hi = torch.cat([1.0 + strengths[:, :3], strengths[:, 3:]], dim=1)
    factors = _uniform(lo, hi, g)
    order = torch.rand(n, 4, generator=g).argsort(dim=1)
    do_jitter = torch.rand(n, generator=g) < _per_sample([p.jitter_p for p in params], counts)
    for step in range(4):
        for op in range(4):
            sel = do_jitter & (order[:, step] == op) & (strengths[:, op] > 0)
            _apply_subset(x, sel, _JITTER_OPS[op], factors[:, op])

    do_gray = torch.rand(n, generator=g) < _per_sample([p.grayscale_p for p in params], counts)
    _apply_subset(x, do_gray, lambda t: _gray(t).expand_as(t))

    # gaussian blur: one sigma per image, the same along x and y (torchvision's GaussianBlur)
    do_blur = torch.rand(n, generator=g) < _per_sample([p.blur_p for p in params], counts)
    sig_lo = _per_sample([p.blur_sigma[0] for p in params], counts)
    sig_hi = _per_sample([p.blur_sigma[1] for p in params], counts)
    sigma = _uniform(sig_lo, sig_hi, g)
    kernels = {p.blur_kernel for p in params}
    if len(kernels) == 1:
        k = kernels.pop()
        _apply_subset(x, do_blur, lambda t, s: _blur(t, k, s), sigma)
    else:
        ks = torch.cat([torch.full((c,), p.blur_kernel) for p, c in zip(params, counts)])
        for k in sorted(kernels):
            _apply_subset(x, do_blur & (ks == k), lambda t, s, k=k: _blur(t, k, s), sigma)

    do_sol = torch.rand(n, generator=g) < _per_sample([p.solarize_p for p in params], counts)
    thr = _per_sample([p.solarize_threshold for p in params], counts) / 255.0
    _apply_subset(x, do_sol, _solarize, thr)

    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
        x.sub_(m).div_(s)
    return x


def _blur(x: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    import kornia.filters as KF

    sig = sigma.to(x.dtype).view(-1, 1).expand(-1, 2).contiguous()
    return KF.gaussian_blur2d(x, (kernel, kernel), sig, border_type="reflect")


def _solarize(x: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= thr.view(-1, 1, 1, 1), 1.0 - x, x)


class MultiCropPhotometric:
    """Batched photometric half of DINOv2's multi-crop, applied to a collated batch.

    Input: the dict from :func:`vssl.data.collate.collate_multicrop` (``"global"`` uint8 (2B, 3,
    G, G) with all crop-1s first, ``"local"`` uint8 (B*n_local, 3, L, L)); other keys pass through.
    Output: the same dict with float32 normalized ``"global"``/``"local"``. Recipes per group:
    ``global1`` (blur p=1.0), ``global2`` (blur p=0.1, solarize p=0.2), ``local`` (blur p=0.5), all
    with colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8 and grayscale p=0.2 (DINOv2). Runs on the batch's
    device; random parameters come from ``generator`` (CPU) or torch's global RNG.
    """

    def __init__(
        self,
        global1: PhotometricParams = DINO_GLOBAL1,
        global2: PhotometricParams = DINO_GLOBAL2,
        local: PhotometricParams = DINO_LOCAL,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        n_global: int = 2,
        **overrides: Any,
    ):
        # overrides: a PhotometricParams field name sets it in all three groups (e.g. jitter_p=0.0)
        if overrides:
            bad = set(overrides) - set(PhotometricParams.__dataclass_fields__)
            if bad:
                raise TypeError(f"unknown photometric parameters: {sorted(bad)}")
            global1, global2, local = (replace(p, **overrides) for p in (global1, global2, local))
        self.global1, self.global2, self.local = global1, global2, local
        self.mean, self.std = mean, std
        self.n_global = n_global

    def global_params(self, batch_size: int) -> tuple[list[PhotometricParams], list[int]]:
        # crop 1 of each image, then crop 2, then (n_global > 2) the rest like crop 2
        return [self.global1, self.global2], [batch_size, batch_size * (self.n_global - 1)]

    def __call__(
        self, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        out = dict(batch)
        glob = batch["global"]
        if glob.shape[0] % self.n_global:
            raise ValueError(
                f"global batch {glob.shape[0]} is not a multiple of n_global={self.n_global}"
            )
        b = glob.shape[0] // self.n_global
        params, counts = self.global_params(b)
        out["global"] = apply_photometric(glob, params, counts, generator, self.mean, self.std)
        if "local" in batch and batch["local"] is not None and batch["local"].shape[0]:
            loc = batch["local"]
            out["local"] = apply_photometric(
                loc, [self.local], [loc.shape[0]], generator, self.mean, self.std
            )
        return out

    def __repr__(self) -> str:
        return f"MultiCropPhotometric(global1={self.global1}, global2={self.global2}, local={self.local})"
