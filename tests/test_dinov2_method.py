"""The DINOv2 method: losses against plain re-implementations, teacher EMA, real batches, loading.

References here are written independently of ``vssl.methods``: numpy Sinkhorn-Knopp, softmax and
cross-entropy by hand, brute-force nearest neighbours, per-image / per-crop loops.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb_
from PIL import Image

from vssl.data.augment import MultiCropGeometry, MultiCropPhotometric
from vssl.data.collate import collate_multicrop
from vssl.data.masking import BlockMaskGenerator
from vssl.methods import DINOv2, DINOv2Config, nonfinite_terms
from vssl.methods.losses import DINOLoss, iBOTPatchLoss, koleo_loss, sinkhorn_knopp
from vssl.models import CheckpointError, VisionTransformer, ViTConfig, export_native
from vssl.models.heads import DINOHead

TINY = ViTConfig(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, layerscale=1e-5)
HEAD = dict(n_prototypes=64, bottleneck_dim=16, hidden_dim=32)


# -- plain references ---------------------------------------------------------------------------
def np_sinkhorn(logits: np.ndarray, temp: float, iters: int) -> np.ndarray:
    """SwAV/DINOv2 Sinkhorn-Knopp in float64, as the paper writes it (Q is K x B)."""
    q = np.exp(logits.astype(np.float64) / temp).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(x))


def np_ce(p_teacher: np.ndarray, s_logits: np.ndarray, student_temp: float = 0.1) -> float:
    """-sum_k p_k log softmax(s / T)_k for one row."""
    return float(-(p_teacher * np_log_softmax(s_logits / student_temp)).sum())


def np_koleo(x: np.ndarray, eps: float = 1e-8) -> float:
    """Brute force: -mean_i log(min_{j != i} |x_i - x_j| + eps) over L2-normalized rows."""
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    d = [min(np.linalg.norm(x[i] - x[j]) for j in range(n) if j != i) for i in range(n)]
    return float(-np.mean(np.log(np.array(d) + eps)))


def t2n(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# -- fixtures -------------------------------------------------------------------------------------
def make_method(seed: int = 0, **cfg) -> DINOv2:
    torch.manual_seed(seed)
    return DINOv2(VisionTransformer(TINY), DINOv2Config(**{**HEAD, **cfg}))


def cifar_batch(shared_data: Path, n_images: int = 4, n_local: int = 2, seed: int = 0) -> dict:
    """A real multi-crop batch: cifar images -> crops -> collate with iBOT masks -> photometric."""
    root = shared_data / "cifar10-subset" / "train"
    paths = [sorted((root / c).iterdir())[0] for c in sorted(os.listdir(root))[:n_images]]
    g = torch.Generator().manual_seed(seed)
    geometry = MultiCropGeometry(global_size=32, local_size=16, n_local=n_local)
    samples = [geometry(Image.open(p).convert("RGB"), generator=g) for p in paths]
    batch = collate_multicrop(
        samples, mask_generator=BlockMaskGenerator((8, 8), max_num_patches=32), generator=g
    )
    return MultiCropPhotometric()(batch, generator=g)


# -- Sinkhorn-Knopp -------------------------------------------------------------------------------
def test_sinkhorn_knopp_matches_numpy_and_is_doubly_stochastic():
    torch.manual_seed(0)
    logits = torch.randn(12, 7)
    ours = sinkhorn_knopp(logits, teacher_temp=0.1, n_iterations=3)
    np.testing.assert_allclose(
        ours.double().numpy(), np_sinkhorn(logits.numpy(), 0.1, 3), rtol=1e-5, atol=1e-7
    )
    # normalization (DINOv2's): each row (sample) is a distribution summing to 1 exactly ...
    np.testing.assert_allclose(ours.sum(1).numpy(), np.ones(12), rtol=1e-6)
    # ... and, as the iterations converge, every prototype (column) receives B/K of the mass
    converged = sinkhorn_knopp(logits, teacher_temp=0.1, n_iterations=300)
    np.testing.assert_allclose(converged.sum(0).numpy(), np.full(7, 12 / 7), rtol=1e-4)
    np.testing.assert_allclose(converged.sum(1).numpy(), np.ones(12), rtol=1e-6)
    # 3 iterations are not yet uniform on such peaked targets (so the check above is not vacuous)
    assert np.abs(ours.sum(0).numpy() - 12 / 7).max() > 1e-3


def test_sinkhorn_knopp_does_not_overflow_at_low_temperature():
    torch.manual_seed(1)
    # large logits (long prototype vectors) at a small temperature: logits / temp ~ 70..130, past
    # float32's exp limit (~88), where DINOv2's exp(logits / temp) is inf and its targets NaN
    logits = 2.0 + 0.3 * torch.rand(10, 9)
    assert torch.isinf(torch.exp(logits / 0.02)).any()
    ours = sinkhorn_knopp(logits, teacher_temp=0.02, n_iterations=3)
    assert torch.isfinite(ours).all()
    np.testing.assert_allclose(
        ours.double().numpy(), np_sinkhorn(logits.double().numpy(), 0.02, 3), rtol=1e-4, atol=1e-7
    )  # float64 numpy does not overflow here
    # a sample far below every prototype's best one: a zero target, never NaN
    far = torch.randn(6, 5)
    far[2] -= 50.0
    out = sinkhorn_knopp(far, teacher_temp=0.02)
    assert torch.isfinite(out).all() and out[2].sum() == 0
    np.testing.assert_allclose(out[[0, 1, 3, 4, 5]].sum(1).numpy(), np.ones(5), rtol=1e-5)


# -- EMA centering and the DINO / iBOT cross-entropies -------------------------------------------
def test_ema_centering_softmax_and_update():
    torch.manual_seed(2)
    loss = DINOLoss(6, center_momentum=0.9, centering="ema")
    c = torch.randn(1, 6)
    loss.center.copy_(c)
    t = torch.randn(5, 6)
    probs = loss.teacher_probs(t, teacher_temp=0.07)
    np.testing.assert_allclose(
        probs.double().numpy(), np_softmax((t2n(t) - t2n(c)) / 0.07), rtol=1e-5
    )
    np.testing.assert_allclose(
        t2n(loss.center), 0.9 * t2n(c) + 0.1 * t2n(t).mean(0, keepdims=True), rtol=1e-6
    )
    # the iBOT center is (1, 1, K), updated by the mean over masked patches
    ib = iBOTPatchLoss(6, center_momentum=0.9)
    ib.teacher_probs(t, teacher_temp=0.07)
    np.testing.assert_allclose(
        t2n(ib.center).reshape(1, 6), 0.1 * t2n(t).mean(0, keepdims=True), rtol=1e-6
    )


def test_dino_loss_is_the_sum_of_pairwise_cross_entropies():
    torch.manual_seed(3)
    students = [torch.randn(4, 5) for _ in range(3)]
    teachers = [torch.softmax(torch.randn(4, 5), -1) for _ in range(2)]
    ours = DINOLoss(5, student_temp=0.1)(students, teachers)
    ref = sum(
        np.mean([np_ce(t2n(t)[i], t2n(s)[i]) for i in range(4)]) for s in students for t in teachers
    )
    assert ours.item() == pytest.approx(ref, rel=1e-5)


def test_ibot_loss_weights_every_masked_image_equally():
    torch.manual_seed(4)
    masks = torch.zeros(4, 6, dtype=torch.bool)
    masks[0, 2] = True  # image 0: 1 masked patch
    masks[1, [0, 1, 4]] = True  # image 1: 3
    masks[3, [1, 5]] = True  # image 3: 2; image 2: none
    n = int(masks.sum())
    s, t = torch.randn(n, 8), torch.softmax(torch.randn(n, 8) / 0.1, -1)
    weight = (1.0 / masks.sum(1).clamp(min=1)).unsqueeze(1).expand_as(masks)[masks]  # the collate's
    ours = iBOTPatchLoss(8)(s, t, weight, n_images=4).item()
    ce = [np_ce(t2n(t)[j], t2n(s)[j]) for j in range(n)]
    owner = masks.nonzero()[:, 0].tolist()  # image of each masked patch, in row-major order
    per_image = [np.mean([c for c, o in zip(ce, owner) if o == img]) for img in (0, 1, 3)]
    assert ours == pytest.approx(sum(per_image) / 4, rel=1e-5)
    assert abs(ours - np.mean(ce)) > 1e-3  # a plain per-patch mean would differ


# -- KoLeo ----------------------------------------------------------------------------------------
def test_koleo_equals_brute_force_nearest_neighbours():
    torch.manual_seed(5)
    x = torch.randn(9, 5)
    assert koleo_loss(x).item() == pytest.approx(np_koleo(t2n(x)), rel=1e-5)


def test_koleo_on_duplicates_is_finite_in_value_and_gradient():
    d = 16
    # every row identical (total collapse): distance is eps * sqrt(D) (the eps added to the difference)
    x = torch.randn(1, d).repeat(6, 1).requires_grad_(True)
    value = koleo_loss(x)
    eps = 1e-8
    assert value.item() == pytest.approx(-math.log(eps * math.sqrt(d) + eps), rel=1e-4)
    value.backward()
    assert torch.isfinite(x.grad).all()
    # two exact duplicates among distinct rows, in bf16 as under autocast
    y = torch.randn(8, d)
    y[5] = y[2]
    y = y.bfloat16().requires_grad_(True)
    v = koleo_loss(y)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(y.grad.float()).all()
    # one row has no neighbour: nothing to spread, 0 (not -log(eps))
    assert koleo_loss(torch.randn(1, d)).item() == 0.0


# -- teacher ----------------------------------------------------------------------------------------
def test_update_teacher_is_exact_ema_and_teacher_is_frozen():
    m = make_method()
    perturb_(m.student, scale=0.05, seed=1)
    old_t = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    s = {k: v.clone() for k, v in m.student.state_dict().items()}
    assert any(not torch.equal(old_t[k], s[k]) for k in s)
    m.update_teacher(0.9)
    for k, t in m.teacher.state_dict().items():
        torch.testing.assert_close(t, 0.9 * old_t[k] + 0.1 * s[k], rtol=1e-6, atol=1e-7)
    m.train()  # the teacher stays in eval mode (no drop-path); gradients: see the real-batch test
    assert not m.teacher.training and m.student.training
    assert all(not p.requires_grad for p in m.teacher.parameters())


# -- the full method on a real batch ---------------------------------------------------------------
def test_forward_backward_on_real_multicrop_batch(shared_data):
    m = make_method(
        ibot_separate_head=True, ibot_n_prototypes=48, ibot_bottleneck_dim=8, ibot_hidden_dim=24
    )
    m.train()
    batch = cifar_batch(shared_data, n_images=4, n_local=2)
    assert batch["masks"].any()
    out = m(batch, teacher_temp=0.04)
    assert set(out) == {
        "loss",
        "dino_local_crops_loss",
        "dino_global_crops_loss",
        "koleo_loss",
        "ibot_loss",
    }
    assert nonfinite_terms(out) == []
    assert all(out[k].item() > 0 for k in out if k != "koleo_loss")
    assert out["loss"].requires_grad and not any(out[k].requires_grad for k in out if k != "loss")
    out["loss"].backward()
    for name, p in m.student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert {n.split(".")[0] for n, p in m.student.named_parameters() if p.grad.abs().sum() > 0} == {
        "backbone",
        "dino_head",
        "ibot_head",
    }
    assert all(p.grad is None for p in m.teacher.parameters())
    assert {id(p) for p in m.prototype_parameters()} == {
        id(m.student.dino_head.last_layer.weight_g),
        id(m.student.dino_head.last_layer.weight_v),
        id(m.student.ibot_head.last_layer.weight_g),
        id(m.student.ibot_head.last_layer.weight_v),
    }


@pytest.mark.parametrize(
    "centering,separate,use_bn",
    [("ema", False, False), ("sinkhorn_knopp", True, False), ("ema", False, True)],
)
def test_forward_equals_a_per_crop_per_image_reimplementation(
    shared_data, centering, separate, use_bn
):
    cfg = dict(centering=centering, head_use_bn=use_bn)
    if separate:
        cfg.update(
            ibot_separate_head=True, ibot_n_prototypes=40, ibot_bottleneck_dim=8, ibot_hidden_dim=24
        )
    m = make_method(seed=3, **cfg)
    # off the init, where LayerScale 1e-5 makes every CLS token nearly the same whatever the image
    # (then swapping crops, or teacher and student, would go unnoticed)
    perturb_(m.teacher, scale=0.1, seed=4)
    perturb_(m.student, scale=0.1, seed=5)
    m.train()
    n_img, n_local, temp = 3, 2, 0.05
    batch = cifar_batch(shared_data, n_images=n_img, n_local=n_local, seed=1)
    out = m(batch, teacher_temp=temp)

    # -- by hand: run the networks crop by crop, then loop over crops and images
    glob, local, masks = batch["global"], batch["local"], batch["masks"]
    with torch.no_grad():
        t_tok = m.teacher.backbone(glob, is_training=True)
        s_glob = m.student.backbone(glob, masks=masks, is_training=True)
        s_loc = m.student.backbone(local, is_training=True)
        t_cls_logits = t2n(
            m.teacher.dino_head(t_tok["x_norm_clstoken"])
        )  # rows: crop c of image i at c*B+i
        ibot_t = m.teacher.ibot_head if separate else m.teacher.dino_head
        ibot_s = m.student.ibot_head if separate else m.student.dino_head
        # heads over the masked patches only, and over all CLS tokens (local and global) together:
        # the batches a BatchNorm in the head normalizes over (without one, rows are independent)
        t_patch_logits = np.zeros((*masks.shape, ibot_t.out_dim))  # (2B, N, K)
        s_patch_logits = np.zeros_like(t_patch_logits)
        t_patch_logits[masks.numpy()] = t2n(ibot_t(t_tok["x_norm_patchtokens"][masks]))
        s_patch_logits[masks.numpy()] = t2n(ibot_s(s_glob["x_norm_patchtokens"][masks]))
        cls_logits = t2n(
            m.student.dino_head(torch.cat((s_loc["x_norm_clstoken"], s_glob["x_norm_clstoken"])))
        )
        s_loc_logits, s_cls_logits = cls_logits[: len(local)], cls_logits[len(local) :]
        s_cls = t2n(s_glob["x_norm_clstoken"])
    if use_bn:  # DINO's teacher normalizes with batch statistics too (it is never in eval mode)
        assert m.teacher.dino_head.mlp[1].training and not m.teacher.backbone.training
    B = n_img
    mk = masks.numpy()
    if centering == "ema":  # first step: the center is still zero
        p_cls = np_softmax(t_cls_logits / temp)
        p_patch = np_softmax(t_patch_logits / temp)
    else:  # SK over the 2B CLS rows jointly, and over the masked patches jointly
        p_cls = np_sinkhorn(t_cls_logits, temp, 3)
        p_patch = np.zeros_like(t_patch_logits)
        p_patch[mk] = np_sinkhorn(t_patch_logits[mk], temp, 3)
    n_terms = 2 * n_local + 2
    local_ref = (
        sum(
            np.mean([np_ce(p_cls[c * B + i], s_loc_logits[k * B + i]) for i in range(B)])
            for k in range(n_local)
            for c in range(2)
        )
        / n_terms
    )
    global_ref = (
        sum(
            np.mean([np_ce(p_cls[(1 - c) * B + i], s_cls_logits[c * B + i]) for i in range(B)])
            for c in range(2)
        )
        / n_terms
    )
    koleo_ref = 0.1 * sum(np_koleo(s_cls[c * B : (c + 1) * B]) for c in range(2))
    ibot_ref = sum(
        np.mean([np_ce(p_patch[r, j], s_patch_logits[r, j]) for j in np.flatnonzero(mk[r])])
        for r in range(2 * B)
        if mk[r].any()
    ) / (2 * B)
    assert out["dino_local_crops_loss"].item() == pytest.approx(local_ref, rel=1e-4)
    assert out["dino_global_crops_loss"].item() == pytest.approx(global_ref, rel=1e-4)
    assert out["koleo_loss"].item() == pytest.approx(
        koleo_ref / 2, rel=1e-4
    )  # logged halved, as DINOv2
    assert out["ibot_loss"].item() == pytest.approx(ibot_ref / 2, rel=1e-4)
    assert out["loss"].item() == pytest.approx(
        local_ref + global_ref + koleo_ref + ibot_ref, rel=1e-4
    )
    if centering == "ema":  # the centers moved towards this batch's teacher logits (momentum 0.9)
        np.testing.assert_allclose(
            t2n(m.dino_loss.center)[0], 0.1 * t_cls_logits.mean(0), rtol=1e-4, atol=1e-7
        )
        np.testing.assert_allclose(
            t2n(m.ibot_patch_loss.center)[0, 0],
            0.1 * t_patch_logits[mk].mean(0),
            rtol=1e-4,
            atol=1e-7,
        )


def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(shared_data):
    m = make_method(seed=5)
    m.train()
    batch = cifar_batch(shared_data, n_images=3, n_local=2, seed=2)
    opt = torch.optim.AdamW([p for p in m.student.parameters()], lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(4):
        out = m(batch, teacher_temp=0.04)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        m.update_teacher(0.99)
        losses.append(out["loss"].item())
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.5 and losses[-1] < min(losses[:-1]), losses


def test_missing_masks_and_uint8_batches_are_explained(shared_data):
    m = make_method()
    batch = cifar_batch(shared_data)
    no_masks = {k: batch[k] for k in ("global", "local")}
    with pytest.raises(KeyError, match="mask_generator"):
        m(no_masks, teacher_temp=0.04)
    without_ibot = make_method(ibot_loss_weight=0.0)
    out = without_ibot(no_masks, teacher_temp=0.04)
    assert out["ibot_loss"].item() == 0.0 and math.isfinite(out["loss"].item())
    with pytest.raises(TypeError, match="MultiCropPhotometric"):
        m({"global": torch.zeros(4, 3, 32, 32, dtype=torch.uint8)}, teacher_temp=0.04)


def test_config_validation_names_what_is_allowed():
    assert DINOv2Config(centering="centering").centering == "ema"  # DINOv2's spelling
    with pytest.raises(ValueError, match="sinkhorn_knopp"):
        DINOv2Config(centering="sinkhorn")
    with pytest.raises(ValueError, match="allowed: .*n_prototypes"):
        DINOv2Config.from_dict({"n_prototype": 10})
    with pytest.raises(ValueError, match="nothing to train"):
        DINOv2Config(dino_loss_weight=0, ibot_loss_weight=0)
    assert DINOv2Config.from_dict(DINOv2Config(n_prototypes=8).to_dict()).n_prototypes == 8


def test_nonfinite_terms_names_the_term():
    out = {
        "loss": torch.tensor(float("nan")),
        "koleo_loss": torch.tensor(float("inf")),
        "dino_global_crops_loss": torch.tensor(1.0),
    }
    assert nonfinite_terms(out) == ["loss", "koleo_loss"]


# -- continuing from a checkpoint with heads ----------------------------------------------------------
def _training_checkpoint(
    path: Path, *, n_prototypes=64, ibot: bool = True, layout: str = "legacy", use_bn: bool = False
):
    """A DINOv2-layout teacher checkpoint {"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}."""
    torch.manual_seed(11)
    bb = perturb_(VisionTransformer(TINY), seed=2)
    heads = {"dino_head": perturb_(DINOHead(48, n_prototypes, 32, 16, use_bn=use_bn), seed=3)}
    if ibot:
        heads["ibot_head"] = perturb_(DINOHead(48, 40, 24, 8), seed=4)
    teacher = {f"backbone.{k}": v for k, v in bb.state_dict().items()}
    for name, h in heads.items():
        for k, v in h.state_dict().items():
            if layout == "parametrization" and k.startswith("last_layer.weight_"):
                k = "last_layer.parametrizations.weight." + (
                    "original0" if k.endswith("_g") else "original1"
                )
            teacher[f"{name}.{k}"] = v
    torch.save({"teacher": teacher}, path)
    return bb, heads


@pytest.mark.parametrize("layout", ["legacy", "parametrization"])
def test_load_pretrained_restores_backbone_and_heads_in_student_and_teacher(tmp_path, layout):
    path = tmp_path / "teacher_checkpoint.pth"
    bb, heads = _training_checkpoint(path, layout=layout)
    m = make_method(
        seed=7,
        ibot_separate_head=True,
        ibot_n_prototypes=40,
        ibot_bottleneck_dim=8,
        ibot_hidden_dim=24,
    )
    report = m.load_pretrained(path)
    assert report["backbone"] and report["dino_head"] and report["ibot_head"]
    x = torch.randn(3, 48)
    for branch in (m.student, m.teacher):
        for k, v in bb.state_dict().items():
            assert torch.equal(branch.backbone.state_dict()[k], v), k
        for name, h in heads.items():
            for k, v in h.state_dict().items():
                assert torch.equal(branch[name].state_dict()[k], v), (name, k)
            torch.testing.assert_close(branch[name](x), h(x))
    assert all(not p.requires_grad for p in m.teacher.parameters())


def test_load_pretrained_refuses_heads_that_do_not_fit(tmp_path):
    path = tmp_path / "teacher_checkpoint.pth"
    _training_checkpoint(path, n_prototypes=64, ibot=False)
    m = make_method(n_prototypes=32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(
        CheckpointError, match=r"dino_head does not fit.*set n_prototypes=64.*load_heads=False"
    ):
        m.load_pretrained(path)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # nothing half-loaded
    report = m.load_pretrained(path, load_heads=False)
    assert (
        report["backbone"] and not report["dino_head"] and report["heads_skipped"] == ["dino_head"]
    )
    # a separate ibot_head in the file but a shared head in the config
    path2 = tmp_path / "with_ibot.pth"
    _training_checkpoint(path2)
    with pytest.raises(CheckpointError, match="ibot_separate_head=True"):
        make_method().load_pretrained(path2)
    # a head with BatchNorm (DINO's use_bn_in_head) into a config without, and back
    path3 = tmp_path / "bn_head.pth"
    _training_checkpoint(path3, ibot=False, use_bn=True)
    with pytest.raises(CheckpointError, match="set head_use_bn=True"):
        make_method().load_pretrained(path3)
    assert make_method(head_use_bn=True).load_pretrained(path3)["dino_head"]


def test_load_pretrained_from_a_backbone_only_export_and_a_wrong_architecture(tmp_path):
    src = perturb_(VisionTransformer(TINY), seed=9)
    path = export_native(src, tmp_path / "backbone.pth", block_chunks=2)  # Web-SSL's chunked names
    m = make_method()
    heads_before = {k: v.clone() for k, v in m.student.dino_head.state_dict().items()}
    report = m.load_pretrained(str(path))
    assert report["backbone"] and not report["dino_head"]
    for branch in (m.student, m.teacher):
        for k, v in src.state_dict().items():
            assert torch.equal(branch.backbone.state_dict()[k], v), k
    assert all(torch.equal(v, m.student.dino_head.state_dict()[k]) for k, v in heads_before.items())
    wrong = export_native(VisionTransformer(TINY.replace(embed_dim=24)), tmp_path / "narrow.pth")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        make_method().load_pretrained(wrong)


# -- across ranks --------------------------------------------------------------------------------
_WORKER = textwrap.dedent("""
    import gc, json, os, sys, warnings
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from vssl.data.masking import sample_ibot_masks
    from vssl.methods import DINOv2, DINOv2Config
    from vssl.methods.losses import DINOLoss, sinkhorn_knopp
    from vssl.models import ViTConfig, VisionTransformer
    warnings.filterwarnings("ignore", message=".*returned a view tensor")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {}
    # 1. centering over all ranks' rows
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)) * 3
    rows = slice(0, 3) if rank == 0 else slice(3, 8)  # uneven, like masked patch counts
    out["sk"] = sinkhorn_knopp(logits[rows], teacher_temp=0.1, n_iterations=3).tolist()
    ema = DINOLoss(5, center_momentum=0.9, centering="ema")
    ema.teacher_probs(logits[rows], teacher_temp=0.1)
    out["center"] = ema.center.tolist()
    # 2. the method under FSDP2 (fully_shard per block, then per branch module), as a trainer wraps it
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, layerscale=1e-5)
    m = DINOv2(VisionTransformer(cfg), DINOv2Config(n_prototypes=64, bottleneck_dim=16, hidden_dim=32,
                                                    centering="sinkhorn_knopp"))
    for branch in (m.student, m.teacher):
        for blk in branch["backbone"].blocks:
            fully_shard(blk)
        for key in list(branch.keys()):
            fully_shard(branch[key])
    opt = torch.optim.AdamW(m.student.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own images
    full = lambda mod: {n: p.full_tensor().clone() for n, p in mod.named_parameters()}
    for step in range(2):
        batch = {"global": torch.randn(4, 3, 32, 32, generator=g), "local": torch.randn(4, 3, 16, 16, generator=g)}
        batch.update(sample_ibot_masks(4, grid=8, generator=g).as_dict())
        losses = m(batch, teacher_temp=0.04)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        s_before, t_before = full(m.student), full(m.teacher)
        m.update_teacher(0.9)
    t_after = full(m.teacher)
    out["ema_err"] = max((t_after[n] - (0.9 * t_before[n] + 0.1 * s_before[n])).abs().max().item() for n in t_after)
    out["moved"] = max((t_after[n] - t_before[n]).abs().max().item() for n in t_after)
    out["teacher_sum"] = float(sum(v.double().sum() for v in t_after.values()))
    out["finite"] = all(torch.isfinite(v).all().item() for v in losses.values())
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    del m, opt
    gc.collect()
    dist.destroy_process_group()
""")


def test_centering_and_fsdp2_across_two_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)) * 3
    # the two ranks' rows together are the single-process result on the whole batch
    np.testing.assert_allclose(
        np.array(r0["sk"] + r1["sk"]), np_sinkhorn(logits.numpy(), 0.1, 3), rtol=1e-5, atol=1e-7
    )
    # EMA: both ranks hold the same center, the mean over all 8 rows
    expected = 0.1 * logits.double().numpy().mean(0, keepdims=True)
    np.testing.assert_allclose(np.array(r0["center"]), expected, rtol=1e-5)
    np.testing.assert_allclose(np.array(r1["center"]), expected, rtol=1e-5)
    # FSDP2: finite losses, the exact EMA on sharded parameters, the same teacher on both ranks
    for r in (r0, r1):
        assert r["finite"] and r["ema_err"] < 1e-6 and r["moved"] > 1e-6
    assert r0["teacher_sum"] == pytest.approx(r1["teacher_sum"], rel=1e-12)
