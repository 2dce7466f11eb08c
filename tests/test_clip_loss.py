"""CLIP / ALIGN / SigLIP losses against references (transformers' loss functions, the SigLIP
formula written out pair by pair), and the all-gather with gradients against the full-batch loss
in 2 gloo processes under torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vssl.methods.clip import CLIPConfig, contrastive_loss, sigmoid_loss


def _embeddings(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def test_clip_loss_matches_transformers():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss as clip_loss

    img, txt = _embeddings()
    scale = torch.tensor(math.log(1 / 0.07))
    ours = contrastive_loss(img, txt, scale)
    # transformers' CLIPModel: logits_per_text = text @ image.T * logit_scale.exp()
    ref = clip_loss(txt @ img.T * scale.exp())
    torch.testing.assert_close(ours, ref)


def test_align_loss_matches_transformers():
    from transformers.models.align.modeling_align import align_loss

    img, txt = _embeddings(seed=1)
    temperature = 1.0
    cfg = CLIPConfig(loss="align")
    assert cfg.label_smoothing == 0.1 and cfg.init_logit_scale == 0.0  # ALIGN: T = 1.0
    ours = contrastive_loss(img, txt, torch.tensor(cfg.init_logit_scale), cfg.label_smoothing)
    ref = align_loss(txt @ img.T / temperature)
    torch.testing.assert_close(ours, ref)


def test_siglip_loss_matches_the_pairwise_formula():
    img, txt = _embeddings(n=5, seed=2)
    cfg = CLIPConfig(loss="siglip")
    assert cfg.init_logit_scale == pytest.approx(math.log(10)) and cfg.init_logit_bias == -10.0
    t, b = torch.tensor(cfg.init_logit_scale), torch.tensor(cfg.init_logit_bias)
    ours = sigmoid_loss(img, txt, t, b)
    total = 0.0  # -1/|B| sum_i sum_j log(1 / (1 + exp(z_ij (-t' x_i.y_j - b))))  (paper, Alg. 1)
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            logit = math.exp(math.log(10)) * float(img[i] @ txt[j]) - 10.0
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    assert ours.item() == pytest.approx(total / 5, rel=1e-5)


def test_siglip_loss_matches_transformers_formula():
    # transformers' SiglipModel(return_loss=True) computes its loss inline from these logits
    img, txt = _embeddings(n=7, seed=3)
    t, b = torch.tensor(1.3), torch.tensor(-4.0)
    logits_per_text = txt @ img.T * t.exp() + b
    eye = torch.eye(7)
    ref = -F.logsigmoid((2 * eye - 1) * logits_per_text).sum(-1).mean()
    torch.testing.assert_close(sigmoid_loss(img, txt, t, b), ref)


def test_config_defaults_and_bad_values():
    clip = CLIPConfig()
    assert clip.init_logit_scale == pytest.approx(math.log(1 / 0.07))
    assert clip.max_logit_scale == pytest.approx(math.log(100))
    assert clip.label_smoothing == 0.0 and clip.init_logit_bias is None
    with pytest.raises(ValueError, match="loss must be one of"):
        CLIPConfig(loss="infonce")
    with pytest.raises(ValueError, match="SigLIP"):
        CLIPConfig(loss="clip", init_logit_bias=-10.0)
    with pytest.raises(ValueError, match="init_logit_scale"):
        CLIPConfig(init_logit_scale=10.0)


_SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist, torch.nn.functional as F
from vssl.methods.clip import contrastive_loss, sigmoid_loss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
N, D = 8, 6
img_all = F.normalize(torch.randn(N, D, generator=g), dim=-1)
txt_all = F.normalize(torch.randn(N, D, generator=g), dim=-1)
n = N // world
out = {}
for name in ("clip", "align", "siglip"):
    for local in (True, False):
        img = img_all[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        txt = txt_all[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        scale = torch.tensor(1.7, requires_grad=True)
        if name == "siglip":
            loss = sigmoid_loss(img, txt, scale, torch.tensor(-3.0), local_loss=local)
        else:
            loss = contrastive_loss(img, txt, scale, 0.1 if name == "align" else 0.0, local_loss=local)
        loss.backward()
        out[f"{name}/{local}"] = {
            "loss": loss.item(), "img_grad": img.grad.tolist(), "txt_grad": txt.grad.tolist(),
            "scale_grad": scale.grad.item(),
        }
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


def test_all_gather_with_grad_equals_the_full_batch_loss(tmp_path):
    """Each rank scores its 4 pairs against all 8: with DDP's gradient average the step is the
    single-process step on the 8 pairs (open_clip's gather_with_grad semantics)."""
    script = tmp_path / "gather.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            str(script),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    g = torch.Generator().manual_seed(0)
    img_all = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    txt_all = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    for name in ("clip", "align", "siglip"):
        img = img_all.clone().requires_grad_(True)
        txt = txt_all.clone().requires_grad_(True)
        scale = torch.tensor(1.7, requires_grad=True)
        if name == "siglip":
            full = sigmoid_loss(img, txt, scale, torch.tensor(-3.0))
        else:
            full = contrastive_loss(img, txt, scale, 0.1 if name == "align" else 0.0)
        full.backward()
        for local in (True, False):
            res = [r[f"{name}/{local}"] for r in ranks]
            # DDP averages over the 2 ranks: the mean of the rank losses and gradients is the
            # full-batch one; each rank's rows got every rank's gradient through the gather
            mean_loss = sum(r["loss"] for r in res) / 2
            assert mean_loss == pytest.approx(full.item(), rel=1e-5), (name, local)
            got_img = torch.cat([torch.tensor(r["img_grad"]) for r in res]) / 2
            got_txt = torch.cat([torch.tensor(r["txt_grad"]) for r in res]) / 2
            torch.testing.assert_close(got_img, img.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got_txt, txt.grad, rtol=1e-4, atol=1e-6)
            scale_grad = sum(r["scale_grad"] for r in res) / 2
            assert scale_grad == pytest.approx(scale.grad.item(), rel=1e-4)
