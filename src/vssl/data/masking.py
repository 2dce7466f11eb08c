"""Patch masks: iBOT/BEiT block masking (+ DINOv2's batch logic), MAE random masking, SplitMask halves.

All seedable with a ``torch.Generator`` (or torch's global RNG when none is given).

- :class:`BlockMaskGenerator` is BEiT's ``MaskingGenerator`` as DINOv2 uses it
  (``dinov2/data/masking.py``): rectangles of random area and aspect are added until the requested
  number of patches is masked (never more; possibly a few fewer when no block fits).
- :func:`sample_ibot_masks` is the masking part of DINOv2's ``collate_data_and_cast``.
- :func:`random_masking` is MAE's per-sample shuffle (``models_mae.random_masking``).
- :func:`split_halves` splits the patches of each image into two disjoint random halves (SplitMask).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from .augment import python_rng

__all__ = [
    "Block",
    "BlockMaskGenerator",
    "IBotMasks",
    "random_masking",
    "sample_ibot_masks",
    "split_halves",
]


@dataclass(frozen=True)
class Block:
    """A sampled rectangle: position, size in patches, and the area/aspect (h/w) it was drawn with."""

    top: int
    left: int
    height: int
    width: int
    target_area: float
    aspect: float


class BlockMaskGenerator:
    """BEiT / iBOT block-wise masking on a ``grid`` (H, W) of patches.

    ``gen(num_masking_patches, generator=None)`` -> bool numpy (H, W) mask with at most that many
    True. Each block: area ~ U(min_num_patches, min(remaining, max_num_patches)), aspect h/w with
    log-uniform in [min_aspect, max_aspect] (max_aspect defaults to 1/min_aspect); up to 10 tries
    for a block that adds new patches without exceeding the remaining budget.
    DINOv2 uses grid (16, 16) for 224/14 and ``max_num_patches = 0.5 * 256``.
    """

    def __init__(
        self,
        grid: tuple[int, int] | int = (16, 16),
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_num_patches: float | None = None,
    ):
        if isinstance(grid, int):
            grid = (grid, grid)
        self.height, self.width = int(grid[0]), int(grid[1])
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        if not (0 < min_aspect <= max_aspect):
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def sample_block(self, max_mask_patches: float, rng: random.Random) -> Block | None:
        """One draw of BEiT's block sampler; None when the rectangle does not fit the grid."""
        target_area = rng.uniform(self.min_num_patches, max_mask_patches)
        aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < self.width and h < self.height:
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            return Block(top, left, h, w, target_area, aspect)
        return None

    def add_block(self, mask: np.ndarray, max_mask_patches: float, rng: random.Random) -> int:
        """BEiT's ``_mask``: add one block to ``mask`` in place; returns the number of new patches."""
        delta = 0
        for _ in range(10):
            b = self.sample_block(max_mask_patches, rng)
            if b is not None:
                region = mask[b.top : b.top + b.height, b.left : b.left + b.width]
                new = b.height * b.width - int(region.sum())
                if 0 < new <= max_mask_patches:
                    region[...] = True
                    delta += new
            if delta > 0:
                break
        return delta

    def __call__(
        self,
        num_masking_patches: int = 0,
        generator: torch.Generator | random.Random | None = None,
    ) -> np.ndarray:
        rng = python_rng(generator)
        mask = np.zeros(self.shape, dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self.add_block(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return mask

    def __repr__(self) -> str:
        return (
            f"BlockMaskGenerator(grid={self.shape}, min_num_patches={self.min_num_patches}, "
            f"max_num_patches={self.max_num_patches}, aspect=({self.min_aspect:.3f}, {self.max_aspect:.3f}))"
        )


@dataclass
class IBotMasks:
    """DINOv2's masking outputs for a batch of ``n`` global crops.

    ``masks`` bool (n, H*W); ``mask_indices_list`` the flat indices of masked patches in
    ``masks.flatten()``; ``masks_weight`` one float per masked patch, 1/(masked patches of its
    image); ``n_masked_patches`` long (1,); ``upperbound`` the patch budget DINOv2 sizes buffers by.
    """

    masks: torch.Tensor
    mask_indices_list: torch.Tensor
    masks_weight: torch.Tensor
    n_masked_patches: torch.Tensor
    upperbound: int

    def as_dict(self) -> dict:
        return {
            "masks": self.masks,
            "mask_indices_list": self.mask_indices_list,
            "masks_weight": self.masks_weight,
            "n_masked_patches": self.n_masked_patches,
            "upperbound": self.upperbound,
        }


def sample_ibot_masks(
    n_images: int,
    grid: tuple[int, int] | int = (16, 16),
    mask_probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
    generator: torch.Generator | random.Random | None = None,
    mask_generator: BlockMaskGenerator | None = None,
) -> IBotMasks:
    """DINOv2's ``collate_data_and_cast`` masking for ``n_images`` global crops.

    ``int(n_images * mask_probability)`` images get block masks whose target ratios are spread over
    ``ratio_min_max``: image ``i`` draws its ratio from the ``i``-th of ``n_masked`` equal
    sub-intervals (``linspace(lo, hi, n_masked + 1)``); the rest get empty masks; the list is then
    shuffled. ``mask_generator`` defaults to ``BlockMaskGenerator(grid, max_num_patches=0.5*H*W)``
    (DINOv2's setting).
    """
    if mask_generator is None:
        g = (grid, grid) if isinstance(grid, int) else tuple(grid)
        mask_generator = BlockMaskGenerator(g, max_num_patches=0.5 * g[0] * g[1])
    rng = python_rng(generator)
    N = mask_generator.num_patches
    n_masked = int(n_images * mask_probability)
    probs = torch.linspace(float(ratio_min_max[0]), float(ratio_min_max[1]), n_masked + 1).tolist()
    masks: list[np.ndarray] = []
    upperbound = 0
    for i in range(n_masked):
        lo, hi = probs[i], probs[i + 1]
        masks.append(mask_generator(int(N * rng.uniform(lo, hi)), rng))
        upperbound += int(N * hi)
    for _ in range(n_masked, n_images):
        masks.append(mask_generator(0, rng))
    rng.shuffle(masks)
    if masks:
        collated = torch.from_numpy(np.stack(masks)).flatten(1)
    else:
        collated = torch.zeros((0, N), dtype=torch.bool)
    mask_indices_list = collated.flatten().nonzero().flatten()
    masks_weight = (
        (1.0 / collated.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated)[collated]
    )
    return IBotMasks(
        masks=collated,
        mask_indices_list=mask_indices_list,
        masks_weight=masks_weight,
        n_masked_patches=torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
        upperbound=upperbound,
    )


def random_masking(
    n: int,
    num_patches: int,
    mask_ratio: float = 0.75,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking by argsort of uniform noise.

    Returns ``ids_keep`` long (n, len_keep), ``ids_restore`` long (n, num_patches) (the inverse
    permutation: ``gather(cat(kept, masked), ids_restore)`` puts tokens back in place), and ``mask``
    float (n, num_patches), 0 keep / 1 remove. ``len_keep = round(num_patches * (1 - mask_ratio))``
    (MAE truncates with ``int()``, identical for its sizes and immune here to 48.9999 float error).
    Noise is drawn on the generator's device (CPU by default) and moved to ``device``; ``noise``
    (n, num_patches) gives it instead (what transformers' ``ViTMAEModel(noise=...)`` takes).
    """
    if not (0.0 <= mask_ratio < 1.0):
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    len_keep = int(round(num_patches * (1.0 - mask_ratio)))
    if noise is None:
        gdev = generator.device if generator is not None else "cpu"
        noise = torch.rand(n, num_patches, generator=generator, device=gdev)
    if device is not None:
        noise = noise.to(device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(n, num_patches, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, ids_restore, mask


def split_halves(
    n: int,
    num_patches: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SplitMask: per image, a random split of the patch indices into two disjoint halves.

    Returns ``ids_a``, ``ids_b`` long (n, num_patches // 2), each sorted ascending (positional
    order), together covering every patch once. ``num_patches`` must be even.
    """
    if num_patches % 2:
        raise ValueError(f"split_halves needs an even number of patches, got {num_patches}")
    gdev = generator.device if generator is not None else "cpu"
    noise = torch.rand(n, num_patches, generator=generator, device=gdev)
    if device is not None:
        noise = noise.to(device)
    perm = torch.argsort(noise, dim=1)
    half = num_patches // 2
    ids_a = perm[:, :half].sort(dim=1).values
    ids_b = perm[:, half:].sort(dim=1).values
    return ids_a, ids_b
