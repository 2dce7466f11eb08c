"""PCA maps of patch features: DINOv2's picture of what a ViT has learned.

The patch tokens of a few images are pooled, their first three principal components are mapped
to red, green and blue, and each image's patch grid is drawn in those colours: parts that the
model represents alike get the same colour across images. With ``foreground_threshold``, the
first component first separates foreground from background (DINOv2's Figure 1 recipe), the
background is drawn black and a second PCA on the foreground patches gives the colours.

PCA is fitted jointly over all images (so colours compare across them). Component signs are made
deterministic: the largest-magnitude loading of each component is positive; for foreground
thresholding the first component is then oriented so that the image borders (where background
usually is) score lower than the centre.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["pca_components", "pca_maps", "pca_rgb", "patch_tokens"]


def pca_components(x: np.ndarray, n_components: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``(projections (N, k), components (k, D))`` of the rows of ``x`` (N, D), by SVD of the
    centred data, in float64; each component's largest-|loading| entry is positive."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs an (N >= 2, D) array of tokens, got shape {x.shape}")
    k = min(n_components, x.shape[0], x.shape[1])
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:k]
    flip = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    flip[flip == 0] = 1.0
    comps = comps * flip[:, None]
    return centred @ comps.T, comps


def _minmax(v: np.ndarray) -> np.ndarray:
    """Each column scaled to [0, 1] (a constant column becomes 0.5)."""
    lo, hi = v.min(axis=0, keepdims=True), v.max(axis=0, keepdims=True)
    span = hi - lo
    out = np.where(span > 0, (v - lo) / np.where(span > 0, span, 1.0), 0.5)
    return out


def _border_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    return m


def pca_rgb(
    tokens: np.ndarray, grid: tuple[int, int], *, foreground_threshold: float | None = None
) -> np.ndarray:
    """Patch tokens (B, h*w, D) -> RGB maps (B, h, w, 3) float in [0, 1] (module docstring).

    ``foreground_threshold``: in [0, 1], on the min-max scaled first component; patches above it
    are foreground (coloured by a PCA of the foreground patches only), the rest black.
    """
    tokens = np.asarray(tokens, dtype=np.float64)
    h, w = grid
    if tokens.ndim != 3 or tokens.shape[1] != h * w:
        raise ValueError(f"tokens must be (B, {h}*{w}, D) for a {h}x{w} grid, got {tokens.shape}")
    b, n, d = tokens.shape
    flat = tokens.reshape(b * n, d)
    if foreground_threshold is None:
        proj, _ = pca_components(flat, 3)
        rgb = _minmax(proj)
        if rgb.shape[1] < 3:  # fewer than 3 components exist (tiny D): pad with grey
            rgb = np.concatenate([rgb, np.full((rgb.shape[0], 3 - rgb.shape[1]), 0.5)], axis=1)
        return rgb.reshape(b, h, w, 3)
    if not 0.0 <= foreground_threshold <= 1.0:
        raise ValueError(f"foreground_threshold must be in [0, 1], got {foreground_threshold}")
    first, _ = pca_components(flat, 1)
    first = first[:, 0].reshape(b, h, w)
    border = _border_mask(h, w)
    if h > 2 and w > 2 and first[:, border].mean() > first[:, ~border].mean():
        first = -first  # background (borders) low, foreground high
    score = _minmax(first.reshape(-1, 1))[:, 0]
    fg = score > foreground_threshold
    rgb = np.zeros((b * n, 3))
    if fg.sum() >= 2:
        proj, _ = pca_components(flat[fg], 3)
        col = _minmax(proj)
        if col.shape[1] < 3:
            col = np.concatenate([col, np.full((col.shape[0], 3 - col.shape[1]), 0.5)], axis=1)
        rgb[fg] = col
    return rgb.reshape(b, h, w, 3)


def _to_batch(model, images: Any, resolution: int | None):
    """Images (PIL, paths, or a normalized float tensor (B, 3, H, W)) -> (tensor, grid)."""
    import torch

    from ..data.transforms import EvalTransform

    patch = model.config.patch_size
    if isinstance(images, torch.Tensor):
        x = images
        if x.ndim != 4 or not torch.is_floating_point(x):
            raise ValueError(
                "a tensor of images must be float (B, 3, H, W), normalized as for "
                f"the model; got {tuple(x.shape)} {x.dtype}"
            )
    else:
        from PIL import Image

        from ..data.decode import open_image

        res = resolution or model.config.img_size
        res = max(patch, res // patch * patch)
        tf = EvalTransform(res, resize_ratio=1.0)  # the whole image, short side to res
        batch = []
        for im in images:
            if isinstance(im, (str, Path)):
                im = open_image(im)
            if not isinstance(im, Image.Image):
                raise TypeError(f"images must be PIL images, paths or a tensor; got {type(im)}")
            batch.append(tf(im.convert("RGB")))
        x = torch.stack(batch)
    h, w = x.shape[-2] // patch, x.shape[-1] // patch
    return x, (h, w)


def patch_tokens(
    model, images: Any, *, resolution: int | None = None, batch_size: int = 64
) -> tuple[np.ndarray, tuple[int, int]]:
    """``(tokens (B, h*w, D) float32, (h, w))``: ``x_norm_patchtokens`` of ``images`` in eval
    mode (the model's training flags are restored)."""
    import torch

    x, grid = _to_batch(model, images, resolution)
    param = next(model.parameters())
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start : start + batch_size].to(param.device, param.dtype)
                out.append(model.forward_features(xb)["x_norm_patchtokens"].float().cpu())
    finally:
        for m, training in modes:
            m.training = training
    tokens = torch.cat(out).numpy()
    if tokens.shape[1] != grid[0] * grid[1]:
        raise ValueError(
            f"the model returned {tokens.shape[1]} patch tokens for a {grid} grid "
            "(register tokens should not be among x_norm_patchtokens)"
        )
    return tokens, grid


def pca_maps(
    model,
    images: Sequence[Any] | Any,
    *,
    resolution: int | None = None,
    foreground_threshold: float | None = None,
    upsample: bool = True,
) -> list[np.ndarray]:
    """One RGB ``uint8`` map (H, W, 3) per image: the first 3 principal components of the
    patch tokens of all ``images`` as colours (module docstring).

    ``images``: PIL images, paths, or a normalized float tensor (B, 3, H, W). ``resolution``: the
    side images are resized and centre-cropped to (default: the model's ``img_size``).
    ``upsample``: each patch drawn as a ``patch x patch`` block, so maps align with the input
    crop; otherwise one pixel per patch.
    """
    tokens, grid = patch_tokens(model, images, resolution=resolution)
    rgb = pca_rgb(tokens, grid, foreground_threshold=foreground_threshold)
    maps = (rgb * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    if upsample:
        p = model.config.patch_size
        maps = maps.repeat(p, axis=1).repeat(p, axis=2)
    return list(maps)
