"""Collation of multi-crop samples into DINOv2's two batched groups (+ iBOT masks).

Layout (as DINOv2's ``collate_data_and_cast``):

- ``"global"``: (n_global*B, 3, G, G), crop index major: all crop-1s (images 0..B-1), then all
  crop-2s. ``global[k*B + i]`` is crop ``k`` of image ``i``.
- ``"local"``: (n_local*B, 3, L, L), also crop index major: ``local[k*B + i]`` is local crop ``k``
  of image ``i``.
- with ``mask_generator``: iBOT masks for the global crops (see :func:`sample_ibot_masks`):
  ``"masks"`` bool (n_global*B, H*W) in the same row order, ``"mask_indices_list"``,
  ``"masks_weight"``, ``"n_masked_patches"``, ``"upperbound"``.
- ``"label"``: long (B,) when the samples carry labels.

A sample is a dict ``{"global", "local"[, "label"]}`` (:class:`vssl.data.augment.MultiCropGeometry`'s
output, optionally with a label) or a pair ``(views_dict, label)``. Tensors stay uint8: apply
:class:`vssl.data.augment.MultiCropPhotometric` after collation (on the accelerator when there is one).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from typing import Any

import torch

from .masking import BlockMaskGenerator, sample_ibot_masks

__all__ = ["collate_multicrop", "multicrop_collate_fn"]


def _split(sample: Any) -> tuple[dict, Any]:
    if isinstance(sample, dict):
        return sample, sample.get("label")
    if isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[0], dict):
        return sample[0], sample[1]
    raise TypeError(
        "a multi-crop sample is a dict with 'global' and 'local' or a (views_dict, label) pair, "
        f"got {type(sample).__name__}"
    )


def _crop_major(crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """B tensors (K, C, H, W) -> (K*B, C, H, W) with crop k of every image together, in one copy.

    Inside a DataLoader worker the result is allocated in shared memory, as torch's
    ``default_collate`` does, so handing the batch to the main process copies nothing more
    (stack + transpose + the DataLoader's move to shared memory were three copies of ~34 MB per
    batch of 64 DINOv2 multi-crop samples).
    """
    first = crops[0]
    k, shape, b = first.shape[0], tuple(first.shape[1:]), len(crops)
    if any(tuple(c.shape) != tuple(first.shape) for c in crops):
        raise ValueError(
            f"crops of different shapes cannot be batched: {sorted({tuple(c.shape) for c in crops})}"
        )
    if torch.utils.data.get_worker_info() is not None:
        numel = k * b * math.prod(shape)  # 0 when there are no crops of this kind (n_local=0)
        storage = first._typed_storage()._new_shared(numel, device=first.device)
        out = first.new(storage).view(k * b, *shape)
    else:
        out = first.new_empty((k * b, *shape))
    grouped = out.view(k, b, *shape)
    for i, c in enumerate(crops):
        grouped[:, i].copy_(c)
    return out


def collate_multicrop(
    samples: Sequence[Any],
    mask_generator: BlockMaskGenerator | None = None,
    mask_probability: float = 0.5,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    generator: torch.Generator | random.Random | None = None,
) -> dict[str, Any]:
    """Pack multi-crop samples into ``{"global", "local"[, masks...][, "label"]}`` (module docstring)."""
    if not samples:
        raise ValueError("collate_multicrop got an empty batch")
    views, labels = zip(*(_split(s) for s in samples))
    out: dict[str, Any] = {
        "global": _crop_major([v["global"] for v in views]),
    }
    if all("local" in v and v["local"] is not None for v in views):
        out["local"] = _crop_major([v["local"] for v in views])
    if mask_generator is not None:
        m = sample_ibot_masks(
            out["global"].shape[0],
            mask_probability=mask_probability,
            ratio_min_max=mask_ratio,
            generator=generator,
            mask_generator=mask_generator,
        )
        out.update(m.as_dict())
    if all(lab is not None for lab in labels):
        out["label"] = torch.as_tensor([int(lab) for lab in labels], dtype=torch.long)
    return out


def multicrop_collate_fn(
    mask_generator: BlockMaskGenerator | None = None,
    mask_probability: float = 0.5,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
):
    """A picklable ``collate_fn`` for ``DataLoader`` with the masking settings bound."""
    return functools.partial(
        collate_multicrop,
        mask_generator=mask_generator,
        mask_probability=mask_probability,
        mask_ratio=mask_ratio,
    )
