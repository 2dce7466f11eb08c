"""Projection heads of self-supervised methods: DINOv2's DINO / iBOT head.

:class:`DINOHead` is DINOv2's ``dinov2/layers/dino_head.py``: an MLP ``in_dim -> hidden -> ... ->
bottleneck`` (GELU between layers), L2 normalization, then bias-free weight-normalized prototypes.
Parameter names are DINOv2's (``mlp.0/2/4``, ``last_layer.weight_g``, ``last_layer.weight_v``) so
the ``dino_head.*`` / ``ibot_head.*`` tensors of DINOv2 and Web-SSL training checkpoints load as
they are. The weight norm is written out (:class:`WeightNormLinear`) instead of using
``torch.nn.utils.weight_norm`` (deprecated) or its parametrization (which renames the tensors to
``parametrizations.weight.original0/1``); state dicts in that layout, and plain ``last_layer.weight``,
load too.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead", "WeightNormLinear", "describe_head"]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``weight_g * weight_v / ||weight_v||`` (row-wise norm).

    As ``torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))`` with ``weight_g`` filled with
    1 (DINOv2's init): every prototype is a direction whose length ``weight_g`` is learned, so the
    logits of an L2-normalized input are scaled cosine similarities.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight_g = nn.Parameter(torch.empty(self.out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.register_load_state_dict_pre_hook(_accept_other_weight_norm_layouts)
        if not self.weight_v.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # nn.Linear's default init for the directions (what DINOv2 gets: its trunc-normal init is
        # applied before the last layer exists), unit lengths.
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight_v.uniform_(-bound, bound)
        self.weight_g.fill_(1.0)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


def _accept_other_weight_norm_layouts(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
):
    """Rename torch's parametrized weight-norm keys, or split a plain weight into (g, v)."""
    g0, v1 = (
        prefix + "parametrizations.weight.original0",
        prefix + "parametrizations.weight.original1",
    )
    if g0 in state_dict and v1 in state_dict:
        state_dict[prefix + "weight_g"] = state_dict.pop(g0)
        state_dict[prefix + "weight_v"] = state_dict.pop(v1)
    plain = prefix + "weight"
    if plain in state_dict and prefix + "weight_v" not in state_dict:
        w = state_dict.pop(plain)
        state_dict[prefix + "weight_v"] = w
        state_dict[prefix + "weight_g"] = w.norm(dim=1, keepdim=True)  # g * v/|v| == w exactly


class DINOHead(nn.Module):
    """DINOv2's DINO / iBOT head: MLP to a bottleneck, L2 norm, weight-normed prototypes.

    ``nlayers`` counts the MLP's linear layers (DINOv2: 3, i.e. ``in->hidden->hidden->bottleneck``;
    1 is a single ``in->bottleneck`` linear, stored as ``mlp.weight`` as DINOv2 does).
    ``last_layer`` holds the prototypes, which DINOv2 keeps frozen during the first epoch.

    ``use_bn`` puts a BatchNorm after each hidden linear layer (DINO / DINOv2's ``use_bn``, keys
    ``mlp.0/1/3/4/6`` as theirs): it removes the part of the features common to the batch, so the
    head's outputs differ between images from the first step (used by the short CPU recipe).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        mlp_bias: bool = True,
        use_bn: bool = False,
    ):
        super().__init__()
        nlayers = max(int(nlayers), 1)
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.hidden_dim, self.bottleneck_dim, self.nlayers = (
            int(hidden_dim),
            int(bottleneck_dim),
            nlayers,
        )
        self.mlp_bias, self.use_bn = bool(mlp_bias), bool(use_bn)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)
        else:

            def hidden(n_in: int) -> list[nn.Module]:
                bn = [nn.BatchNorm1d(hidden_dim)] if use_bn else []
                return [nn.Linear(n_in, hidden_dim, bias=mlp_bias), *bn, nn.GELU()]

            layers = hidden(in_dim)
            for _ in range(nlayers - 2):
                layers += hidden(hidden_dim)
            layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=mlp_bias))
            self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Trunc-normal(0.02) MLP weights, zero biases (DINOv2); prototypes as WeightNormLinear."""
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # fp16 cannot represent 1e-12; DINOv2 uses 1e-6 there
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


_MLP_KEY = re.compile(r"^mlp\.(?:(\d+)\.)?weight$")


def describe_head(sd: dict[str, torch.Tensor]) -> dict:
    """Architecture implied by a head's state dict (keys relative to the head, e.g. ``mlp.0.weight``).

    Returns ``in_dim``, ``hidden_dim``, ``bottleneck_dim``, ``nlayers``, ``n_prototypes`` (those
    that can be read off the shapes), for error messages that say which config would fit.
    """
    out: dict = {}
    weights = sorted(
        (
            (int(m.group(1)) if m.group(1) else -1, v)
            for k, v in sd.items()
            if (m := _MLP_KEY.match(k)) and v.ndim == 2
        ),  # 1-d: a BatchNorm's weight
        key=lambda t: t[0],
    )
    if weights:
        out["in_dim"] = int(weights[0][1].shape[1])
        out["nlayers"] = len(weights)
        out["bottleneck_dim"] = int(weights[-1][1].shape[0])
        if len(weights) > 1:
            out["hidden_dim"] = int(weights[0][1].shape[0])
    if any(k.startswith("mlp.") and k.endswith(".running_mean") for k in sd):
        out["use_bn"] = True
    for key in (
        "last_layer.weight_v",
        "last_layer.parametrizations.weight.original1",
        "last_layer.weight",
    ):
        if key in sd:
            out["n_prototypes"] = int(sd[key].shape[0])
            out.setdefault("bottleneck_dim", int(sd[key].shape[1]))
            break
    return out
