"""AdamW with DINOv2's parameter groups (the convention MAE and timm share): layer-wise lr decay,
patch-embed lr multiplier, no weight decay on biases, norms and LayerScale.

The rules are ``dinov2/utils/param_groups.py``'s, applied by parameter name:

- layer id: ``patch_embed`` / ``pos_embed`` / ``cls_token`` / ``mask_token`` / ``register_tokens``
  -> 0; ``blocks.<i>.*`` -> ``i + 1``; everything else (the final norm, heads) -> ``num_layers + 1``.
  Only backbone parameters get a layer id below ``num_layers + 1`` (DINOv2 builds the groups per
  student sub-module and a head has no blocks): a head with a ``blocks`` list of its own (an MAE
  decoder) is not mistaken for the encoder.
- lr multiplier ``layer_decay ** (num_layers + 1 - layer_id)``, times ``patch_embed_lr_mult`` for
  ``patch_embed`` parameters.
- wd multiplier 0 when the name ends in ``.bias`` or contains ``norm`` (any case), ``gamma``
  (LayerScale) or ``logit_`` (an image-text model's logit scale and bias, as open_clip).
- ``frozen_until``: the step before which the parameter is held still (0: never), from the
  method's ``frozen_parameters()``; the trainer gives such groups lr 0 and zeroed gradients until
  then (DINOv2 does this to its head's last layer for the first epoch).

Parameters with identical (lr multiplier, wd multiplier, frozen_until) are fused into one group,
as DINOv2's ``fuse_params_groups`` does, so the optimizer runs few big foreach/fused kernels.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["build_optimizer", "clean_name", "layer_id", "param_groups"]

_TOKENS = ("patch_embed", "pos_embed", "cls_token", "mask_token", "register_tokens")
# wrappers that insert a path component into parameter names (DDP, FSDP1, compile, checkpointing)
_WRAPPER_PARTS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def _no_weight_decay(name: str) -> bool:
    """Biases, norms (``norm*``, transformers' ``LayerNorm``), LayerScale ``gamma`` and an
    image-text model's ``logit_scale`` / ``logit_bias`` (open_clip excludes them too)."""
    low = name.lower()
    return name.endswith(".bias") or "norm" in low or "gamma" in name or "logit_" in name


def clean_name(name: str) -> str:
    """``name`` without the path components wrappers add (``module.``, ``_orig_mod.`` ...)."""
    for part in _WRAPPER_PARTS:
        if name.startswith(part):
            name = name[len(part) :]
        name = name.replace("." + part, ".")
    return name


def layer_id(name: str, num_layers: int) -> int:
    """DINOv2's layer id of a backbone parameter name (relative to the backbone)."""
    if any(tok in name for tok in _TOKENS):
        return 0
    m = _BLOCK.search(name)
    if m is not None:
        return int(m.group(1)) + 1
    return num_layers + 1


def param_groups(
    module: nn.Module,
    *,
    layer_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    num_layers: int,
    backbone: str = "backbone",
    frozen: Iterable[tuple[Iterable[nn.Parameter], int]] = (),
) -> list[dict]:
    """Fused AdamW parameter groups for ``module``'s trainable parameters (rules: module docstring).

    ``module`` is either the backbone itself (it has ``blocks``) or a container (a method's
    ``student``) whose child ``backbone`` holds it. ``frozen``: ``(parameters, until_step)``
    pairs (a method's :class:`~vssl.methods.base.Freeze` list). Each group is a dict with
    ``params``, ``names``, ``lr_multiplier``, ``wd_multiplier`` and ``frozen_until``; set ``lr``
    and ``weight_decay`` per step as ``schedule value * multiplier``.
    """
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if not layer_decay > 0:
        raise ValueError(f"layer_decay must be > 0, got {layer_decay}")
    whole_is_backbone = isinstance(getattr(module, "blocks", None), nn.ModuleList)
    prefix = "" if whole_is_backbone else backbone + "."
    # frozen ones (a fixed weight-norm gain, say) are simply not optimized
    until: dict[int, int] = {}
    for params, step in (tuple(f) if isinstance(f, tuple) else (f.params, f.until) for f in frozen):
        for p in params:
            if p.requires_grad:
                until[id(p)] = max(int(step), until.get(id(p), 0))

    fused: dict[tuple, dict] = {}
    for raw, p in module.named_parameters():
        if not p.requires_grad:
            continue
        name = clean_name(raw)
        in_backbone = name.startswith(prefix)
        lid = layer_id(name[len(prefix) :], num_layers) if in_backbone else num_layers + 1
        lr_mult = layer_decay ** (num_layers + 1 - lid)
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if _no_weight_decay(name) else 1.0
        frozen_until = until.get(id(p), 0)
        key = (lr_mult, wd_mult, frozen_until)
        g = fused.setdefault(
            key,
            {
                "params": [],
                "names": [],
                "lr_multiplier": lr_mult,
                "wd_multiplier": wd_mult,
                "frozen_until": frozen_until,
            },
        )
        g["params"].append(p)
        g["names"].append(name)
    found = {id(p) for g in fused.values() if g["frozen_until"] for p in g["params"]}
    missing = {i for i, s in until.items() if s > 0} - found
    if missing:
        raise ValueError(
            f"{len(missing)} of the frozen parameters are not trainable parameters of the module: "
            "pass parameters of this module (with requires_grad=True)"
        )
    return list(fused.values())


def build_optimizer(
    groups: list[dict],
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over ``groups`` (lr and weight decay start at 0: the trainer sets them every step).

    The fused kernel when every parameter lives on CUDA, the foreach one otherwise (CPU).
    """
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    on_cuda = all(p.device.type == "cuda" for p in params)
    impl = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=betas, eps=eps, **impl)
