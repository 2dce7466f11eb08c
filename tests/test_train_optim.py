"""vssl.train.optim (DINOv2 parameter groups, AdamW) and vssl.train.schedules (CosineScheduler)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from vssl.models.vit import VisionTransformer
from vssl.train.optim import build_optimizer, clean_name, param_groups
from vssl.train.schedules import CosineSchedule

# ------------------------------------------------------------------------------- param groups


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4))
        self.last_layer = nn.Linear(4, 6, bias=False)


class _Decoder(nn.Module):
    """A head with a `blocks` list of its own (as MAE's decoder): must not get layer decay."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])


def _student() -> nn.ModuleDict:
    vit = VisionTransformer(
        img_size=16,
        patch_size=8,
        embed_dim=16,
        depth=2,
        num_heads=2,
        layerscale=1e-5,
        num_register_tokens=1,
    )
    student = nn.ModuleDict({"backbone": vit, "dino_head": _Head(), "decoder": _Decoder()})
    student["backbone"].norm.bias.requires_grad_(False)  # frozen parameters are left out
    return student


# DINOv2's rules written out by hand for depth 2, layer_decay 0.5, patch_embed_lr_mult 0.2:
# layer 0 (tokens, patch embed) -> 0.5**3, block i -> 0.5**(2-i), the rest -> 1; the patch embed
# additionally x0.2; no weight decay on biases, norms, LayerScale gammas.
_BLOCK_PARAMS = {  # suffix -> wd multiplier
    "norm1.weight": 0.0,
    "norm1.bias": 0.0,
    "attn.qkv.weight": 1.0,
    "attn.qkv.bias": 0.0,
    "attn.proj.weight": 1.0,
    "attn.proj.bias": 0.0,
    "ls1.gamma": 0.0,
    "norm2.weight": 0.0,
    "norm2.bias": 0.0,
    "mlp.fc1.weight": 1.0,
    "mlp.fc1.bias": 0.0,
    "mlp.fc2.weight": 1.0,
    "mlp.fc2.bias": 0.0,
    "ls2.gamma": 0.0,
}
HAND_TABLE = {  # name -> (lr multiplier, wd multiplier, frozen_until)
    "backbone.cls_token": (0.125, 1.0, 0),
    "backbone.pos_embed": (0.125, 1.0, 0),
    "backbone.register_tokens": (0.125, 1.0, 0),
    "backbone.mask_token": (0.125, 1.0, 0),
    "backbone.patch_embed.proj.weight": (0.025, 1.0, 0),
    "backbone.patch_embed.proj.bias": (0.025, 0.0, 0),
    **{f"backbone.blocks.0.{k}": (0.25, wd, 0) for k, wd in _BLOCK_PARAMS.items()},
    **{f"backbone.blocks.1.{k}": (0.5, wd, 0) for k, wd in _BLOCK_PARAMS.items()},
    "backbone.norm.weight": (1.0, 0.0, 0),
    "dino_head.mlp.0.weight": (1.0, 1.0, 0),
    "dino_head.mlp.0.bias": (1.0, 0.0, 0),
    "dino_head.mlp.2.weight": (1.0, 1.0, 0),
    "dino_head.mlp.2.bias": (1.0, 0.0, 0),
    "dino_head.last_layer.weight": (1.0, 1.0, 7),
    "decoder.blocks.0.weight": (1.0, 1.0, 0),
    "decoder.blocks.0.bias": (1.0, 0.0, 0),
}


def _table(groups) -> dict:
    out = {}
    for g in groups:
        assert len(g["params"]) == len(g["names"])
        for name in g["names"]:
            assert name not in out, f"{name} in two groups"
            out[name] = (g["lr_multiplier"], g["wd_multiplier"], g["frozen_until"])
    return out


def test_param_groups_match_hand_table():
    student = _student()
    groups = param_groups(
        student,
        layer_decay=0.5,
        patch_embed_lr_mult=0.2,
        num_layers=2,
        frozen=[([student["dino_head"].last_layer.weight], 7)],
    )
    got = _table(groups)
    assert set(got) == set(HAND_TABLE)
    for name, (lr, wd, last) in HAND_TABLE.items():
        assert got[name][0] == pytest.approx(lr, rel=1e-12), name
        assert got[name][1:] == (wd, last), name
    # fused: one group per distinct (lr, wd, frozen_until) combination, every trainable parameter once
    assert len(groups) == len(set(HAND_TABLE.values()))
    params = [p for g in groups for p in g["params"]]
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert len(params) == len(trainable) and {id(p) for p in params} == {id(p) for p in trainable}
    named = dict(student.named_parameters())
    for g in groups:  # names and params line up
        assert all(named[n] is p for n, p in zip(g["names"], g["params"]))


def test_param_groups_on_the_backbone_itself_and_wrapped_names():
    vit = _student()["backbone"]
    got = _table(param_groups(vit, layer_decay=0.5, patch_embed_lr_mult=0.2, num_layers=2))
    for name, row in HAND_TABLE.items():
        if name.startswith("backbone."):
            assert got[name[len("backbone.") :]] == pytest.approx(row), name
    assert (
        clean_name("module.backbone._orig_mod.blocks.3.attn.qkv.weight")
        == "backbone.blocks.3.attn.qkv.weight"
    )
    assert (
        clean_name("_fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.ls1.gamma")
        == "blocks.0.ls1.gamma"
    )


def test_frozen_parameters_come_from_the_method_not_from_names():
    from vssl.methods.base import Freeze

    student = _student()
    head = student["dino_head"]
    groups = param_groups(
        student, num_layers=2, frozen=[Freeze([head.mlp[2].weight], 5), ([head.mlp[0].weight], 3)]
    )
    got = _table(groups)
    assert got["dino_head.mlp.2.weight"][2] == 5 and got["dino_head.mlp.0.weight"][2] == 3
    assert got["dino_head.last_layer.weight"][2] == 0  # no rule by name: the method says
    with pytest.raises(ValueError, match="frozen parameters"):
        param_groups(student, num_layers=2, frozen=[([nn.Parameter(torch.zeros(1))], 2)])


def test_build_optimizer_adamw_foreach_on_cpu():
    groups = param_groups(_student(), layer_decay=0.9, num_layers=2)
    opt = build_optimizer(groups, betas=(0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["foreach"] is True and not g["fused"]
        assert g["betas"] == (0.9, 0.95) and g["lr"] == 0.0
        assert "lr_multiplier" in g and "wd_multiplier" in g and "frozen_until" in g
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer([{"params": []}])


# ------------------------------------------------------------------------------------ schedules


def _dinov2_reference(base, final, total, warmup=0, start_warmup=0.0, freeze=0):
    """DINOv2's CosineScheduler table, built the way dinov2/utils/utils.py does (numpy)."""
    freeze_schedule = np.zeros(freeze)
    warmup_schedule = np.linspace(start_warmup, base, warmup)
    iters = np.arange(total - warmup - freeze)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((freeze_schedule, warmup_schedule, cosine))


@pytest.mark.parametrize(
    "kw",
    [
        dict(base=4e-3, final=1e-6, total=40, warmup=10),
        dict(base=0.04, final=0.4, total=25),
        dict(base=0.992, final=1.0, total=17),
        dict(base=1e-3, final=1e-5, total=30, warmup=6, start_warmup=1e-4, freeze=5),
        dict(base=2.0, final=0.5, total=9, warmup=1, start_warmup=0.25),
    ],
)
def test_cosine_schedule_matches_dinov2(kw):
    ref = _dinov2_reference(**kw)
    s = CosineSchedule(
        kw["base"],
        kw["final"],
        kw["total"],
        warmup_iters=kw.get("warmup", 0),
        start_warmup_value=kw.get("start_warmup", 0.0),
        freeze_iters=kw.get("freeze", 0),
    )
    assert len(s) == len(ref) == kw["total"]
    for i, want in enumerate(ref):
        assert s[i] == pytest.approx(want, rel=1e-12, abs=1e-15), i
    for i in (kw["total"], kw["total"] + 7):
        assert s[i] == kw["final"]


def test_teacher_temperature_warmup_then_constant():
    # DINOv2's teacher temperature: total == warmup iterations, base == final
    s = CosineSchedule(0.07, 0.07, 30, warmup_iters=30, start_warmup_value=0.04)
    assert s[0] == pytest.approx(0.04)
    assert s[29] == pytest.approx(0.07)
    assert s[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert s[1000] == 0.07


def test_cosine_schedule_closed_form_points():
    s = CosineSchedule(1.0, 0.0, 100, warmup_iters=0)
    assert s[0] == 1.0
    assert s[50] == pytest.approx(0.5)
    assert s[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))


def test_cosine_schedule_rejects_bad_lengths():
    with pytest.raises(ValueError, match="exceed total_iters"):
        CosineSchedule(1.0, 0.0, 10, warmup_iters=8, freeze_iters=3)
    with pytest.raises(ValueError, match=">= 0"):
        CosineSchedule(1.0, 0.0, -1)
    with pytest.raises(IndexError):
        CosineSchedule(1.0, 0.0, 10)[-1]
