"""DINOHead: DINOv2's layout and numerics, checked against formulas and torch's own weight norm."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import perturb_
from torch import nn

from vssl.models.heads import DINOHead, WeightNormLinear, describe_head


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.special.erf(x / math.sqrt(2.0)))  # exact GELU, written out


def _reference_head(sd: dict[str, torch.Tensor], x: torch.Tensor, n_linear: int) -> torch.Tensor:
    """DINOv2's head as formulas over its checkpoint tensors, in float64."""
    h = x.double()
    for i in range(n_linear):
        w, b = sd[f"mlp.{2 * i}.weight"].double(), sd[f"mlp.{2 * i}.bias"].double()
        h = h @ w.T + b
        if i < n_linear - 1:
            h = _gelu(h)
    h = h / h.norm(dim=-1, keepdim=True)
    g, v = sd["last_layer.weight_g"].double(), sd["last_layer.weight_v"].double()
    w = g * v / v.norm(dim=1, keepdim=True)
    return h @ w.T


def test_state_dict_uses_dinov2_names_and_shapes():
    head = DINOHead(48, 64, hidden_dim=32, bottleneck_dim=16, nlayers=3)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (32, 48),
        "mlp.0.bias": (32,),
        "mlp.2.weight": (32, 32),
        "mlp.2.bias": (32,),
        "mlp.4.weight": (16, 32),
        "mlp.4.bias": (16,),
        "last_layer.weight_g": (64, 1),
        "last_layer.weight_v": (64, 16),
    }
    one = DINOHead(48, 64, hidden_dim=32, bottleneck_dim=16, nlayers=1).state_dict()
    assert set(one) == {"mlp.weight", "mlp.bias", "last_layer.weight_g", "last_layer.weight_v"}
    two = DINOHead(48, 64, hidden_dim=32, bottleneck_dim=16, nlayers=2).state_dict()
    assert {k for k in two if k.startswith("mlp")} == {
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
    }


def test_batchnorm_head_uses_dino_keys_and_batch_statistics():
    torch.manual_seed(3)
    head = perturb_(
        DINOHead(24, 40, hidden_dim=20, bottleneck_dim=12, nlayers=3, use_bn=True), scale=0.3
    )
    sd = head.state_dict()
    # DINO / DINOv2 _build_mlp with use_bn: Linear, BatchNorm1d, GELU, Linear, BatchNorm1d, GELU, Linear
    assert {k for k in sd if k.endswith("weight") and k.startswith("mlp")} == {
        "mlp.0.weight",
        "mlp.1.weight",
        "mlp.3.weight",
        "mlp.4.weight",
        "mlp.6.weight",
    }
    assert "mlp.1.running_mean" in sd
    assert describe_head(sd) == {
        "in_dim": 24,
        "nlayers": 3,
        "bottleneck_dim": 12,
        "hidden_dim": 20,
        "use_bn": True,
        "n_prototypes": 40,
    }
    x = torch.randn(9, 24, dtype=torch.float64)
    h = x
    for lin, bn in ((0, 1), (3, 4), (6, None)):
        h = h @ sd[f"mlp.{lin}.weight"].double().T + sd[f"mlp.{lin}.bias"].double()
        if bn is not None:  # training mode: this batch's mean and biased variance
            h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
            h = h * sd[f"mlp.{bn}.weight"].double() + sd[f"mlp.{bn}.bias"].double()
            h = _gelu(h)
    h = h / h.norm(dim=-1, keepdim=True)
    w = sd["last_layer.weight_g"].double() * sd["last_layer.weight_v"].double()
    ref = h @ (w / sd["last_layer.weight_v"].double().norm(dim=1, keepdim=True)).T
    head.train()
    torch.testing.assert_close(head(x.float()).double(), ref, rtol=1e-4, atol=1e-5)
    # the same image in a different batch gets a different output: statistics are the batch's
    assert not torch.allclose(head(x[:3].float())[0], head(x.float())[0])


def test_init_is_dinov2s():
    torch.manual_seed(0)
    head = DINOHead(96, 512, hidden_dim=256, bottleneck_dim=64)
    assert torch.equal(head.last_layer.weight_g, torch.ones(512, 1))  # prototype lengths 1
    for i in (0, 2, 4):
        w = head.mlp[i].weight
        assert torch.all(head.mlp[i].bias == 0)
        # trunc_normal_(std=0.02) truncates at +-2 absolute (torch's default): a plain N(0, 0.02)
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    bound = 1 / math.sqrt(64)  # nn.Linear's default init for the directions
    assert head.last_layer.weight_v.abs().max() <= bound
    # unit prototypes on unit inputs: logits are cosines
    logits = head(torch.randn(20, 96))
    assert logits.abs().max() <= 1 + 1e-5


@pytest.mark.parametrize("nlayers", [1, 3])
def test_forward_matches_formula(nlayers):
    torch.manual_seed(1)
    head = perturb_(DINOHead(24, 40, hidden_dim=20, bottleneck_dim=12, nlayers=nlayers), scale=0.3)
    x = torch.randn(7, 24)
    sd = head.state_dict()
    if nlayers == 1:
        sd = {("mlp.0." + k[4:] if k.startswith("mlp.") else k): v for k, v in sd.items()}
    ref = _reference_head(sd, x, nlayers)
    torch.testing.assert_close(head(x).double(), ref, rtol=1e-5, atol=1e-6)


def test_matches_torch_weight_norm_both_layouts():
    torch.manual_seed(2)
    x = torch.randn(5, 12)
    # the parametrization (current torch): keys parametrizations.weight.original0/1
    param = nn.utils.parametrizations.weight_norm(nn.Linear(12, 30, bias=False))
    with torch.no_grad():
        param.parametrizations.weight.original0.uniform_(0.5, 2.0)
        param.parametrizations.weight.original1.normal_()
    ours = WeightNormLinear(12, 30)
    ours.load_state_dict(param.state_dict())
    torch.testing.assert_close(ours(x), param(x))
    # the legacy hook (what DINOv2 and Web-SSL checkpoints were written with): weight_g / weight_v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        legacy = nn.utils.weight_norm(nn.Linear(12, 30, bias=False))
    with torch.no_grad():
        legacy.weight_g.uniform_(0.5, 2.0)
        legacy.weight_v.normal_()
    legacy_sd = {k: v for k, v in legacy.state_dict().items() if k in ("weight_g", "weight_v")}
    ours = WeightNormLinear(12, 30)
    ours.load_state_dict(legacy_sd)
    torch.testing.assert_close(ours(x), legacy(x))


def test_plain_weight_loads_exactly():
    w = torch.randn(30, 12)
    ours = WeightNormLinear(12, 30)
    ours.load_state_dict({"weight": w})
    torch.testing.assert_close(ours.weight, w)
    x = torch.randn(4, 12)
    torch.testing.assert_close(ours(x), x @ w.T)


def test_gradients_reach_every_parameter():
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    head(torch.randn(6, 16)).logsumexp(-1).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_mismatched_state_dict_is_refused():
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    other = DINOHead(16, 64, hidden_dim=24, bottleneck_dim=8).state_dict()
    with pytest.raises(RuntimeError, match="last_layer.weight_v"):
        head.load_state_dict(other)


def test_describe_head_reads_sizes_from_shapes():
    sd = DINOHead(48, 64, hidden_dim=32, bottleneck_dim=16, nlayers=3).state_dict()
    assert describe_head(sd) == {
        "in_dim": 48,
        "nlayers": 3,
        "bottleneck_dim": 16,
        "hidden_dim": 32,
        "n_prototypes": 64,
    }
    param = nn.utils.parametrizations.weight_norm(nn.Linear(16, 100, bias=False)).state_dict()
    sd1 = DINOHead(48, 100, bottleneck_dim=16, nlayers=1).state_dict()
    sd1 = {k: v for k, v in sd1.items() if k.startswith("mlp")}
    sd1.update({"last_layer." + k: v for k, v in param.items()})
    assert describe_head(sd1) == {
        "in_dim": 48,
        "nlayers": 1,
        "bottleneck_dim": 16,
        "n_prototypes": 100,
    }
