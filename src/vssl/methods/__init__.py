"""Methods: each builds its modules, declares its views, computes its losses and updates what it
owns after a step; loops, devices, precision and checkpoints belong to :mod:`vssl.train`.

The contract and the registry are in :mod:`vssl.methods.base` (docs/architecture.md):
``list_methods()``, ``get_method(name)``, ``@register_method(name)``.
"""

from __future__ import annotations

import torch

from .base import Freeze, Method, MethodBase, StepPlan, get_method, list_methods, register_method
from .clip import CLIP, CLIPConfig
from .dinov2 import DINOv2, DINOv2Config
from .mae import MAE, MAEConfig
from .splitmask import SplitMask, SplitMaskConfig

__all__ = [
    "CLIP",
    "CLIPConfig",
    "DINOv2",
    "DINOv2Config",
    "Freeze",
    "MAE",
    "MAEConfig",
    "Method",
    "MethodBase",
    "SplitMask",
    "SplitMaskConfig",
    "StepPlan",
    "get_method",
    "list_methods",
    "nonfinite_terms",
    "register_method",
]


def nonfinite_terms(losses: dict[str, torch.Tensor]) -> list[str]:
    """Names of the loss entries that are NaN or infinite (one host sync for all of them).

    The trainer stops a run with these names and the step, instead of training on garbage.
    """
    names = [k for k, v in losses.items() if isinstance(v, torch.Tensor) and v.numel()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(losses[k].detach().float()).all() for k in names]).tolist()
    return [k for k, ok in zip(names, finite) if not ok]
