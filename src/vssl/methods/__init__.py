"""Methods: each builds its modules, computes its losses and updates its teacher (DESIGN §2).

A method's ``forward(batch, ...)`` returns a dict with the total ``"loss"`` (to backpropagate) and
its detached terms; loops, devices, precision and checkpoints belong to :mod:`vssl.train`.
"""

from __future__ import annotations

import torch

from .dinov2 import DINOv2, DINOv2Config

__all__ = ["DINOv2", "DINOv2Config", "nonfinite_terms"]


def nonfinite_terms(losses: dict[str, torch.Tensor]) -> list[str]:
    """Names of the loss entries that are NaN or infinite (one host sync for all of them).

    The trainer stops a run with these names and the step, instead of training on garbage.
    """
    names = [k for k, v in losses.items() if isinstance(v, torch.Tensor) and v.numel()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(losses[k].detach().float()).all() for k in names]).tolist()
    return [k for k, ok in zip(names, finite) if not ok]
