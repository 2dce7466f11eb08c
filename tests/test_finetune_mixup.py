"""Mixup / CutMix / label smoothing against timm's formulas, written out independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vssl.train.mixup import Mixup, cutmix_box, smooth_one_hot, soft_target_cross_entropy


def _images(b=4, c=3, h=10, w=12):
    # every image a distinct constant plus a ramp: any pixel tells which image it came from
    base = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1) * 100.0
    ramp = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w) / (h * w)
    return (base + ramp).expand(b, c, h, w).contiguous()


def test_smoothed_targets_and_loss_match_torch_label_smoothing():
    y = torch.tensor([0, 3, 1])
    t = smooth_one_hot(y, 4, 0.1)
    assert torch.allclose(t[0], torch.tensor([0.925, 0.025, 0.025, 0.025]))
    assert torch.allclose(t.sum(1), torch.ones(3))
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    ref = F.cross_entropy(logits, y, label_smoothing=0.1)  # torch's: the same eps / C rule
    assert torch.allclose(soft_target_cross_entropy(logits, t), ref, atol=1e-6)


def test_mixup_only_is_the_convex_combination_with_the_reversed_batch():
    x, y = _images(), torch.tensor([0, 1, 2, 1])
    mix = Mixup(3, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
    out, target, lam = mix(x.clone(), y, np.random.default_rng(7))
    ref = np.random.default_rng(7)
    assert ref.random() < 1.0  # the prob draw
    expected_lam = ref.beta(0.8, 0.8)
    assert lam == pytest.approx(expected_lam)
    assert torch.allclose(out, expected_lam * x + (1 - expected_lam) * x.flip(0))
    t = smooth_one_hot(y, 3, 0.1)
    assert torch.allclose(target, expected_lam * t + (1 - expected_lam) * t.flip(0))
    assert torch.allclose(target.sum(1), torch.ones(4))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_cutmix_pastes_a_box_and_corrects_lam_to_its_area(seed):
    h, w = 10, 12
    x, y = _images(h=h, w=w), torch.tensor([0, 1, 2, 0])
    mix = Mixup(3, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    out, target, lam = mix(x.clone(), y, np.random.default_rng(seed))
    # the draws of timm's rand_bbox, by hand
    ref = np.random.default_rng(seed)
    ref.random()
    lam0 = ref.beta(1.0, 1.0)
    cut_h, cut_w = int(h * math.sqrt(1 - lam0)), int(w * math.sqrt(1 - lam0))
    cy, cx = ref.integers(0, h), ref.integers(0, w)
    y0, y1 = min(max(cy - cut_h // 2, 0), h), min(max(cy + cut_h // 2, 0), h)
    x0, x1 = min(max(cx - cut_w // 2, 0), w), min(max(cx + cut_w // 2, 0), w)
    expected = x.clone()
    for i in range(x.shape[0]):  # brute force, pixel by pixel
        for r in range(y0, y1):
            for c in range(x0, x1):
                expected[i, :, r, c] = x[x.shape[0] - 1 - i, :, r, c]
    assert torch.equal(out, expected)
    # lam is the share of pixels each image kept (counted), not the Beta draw when clipped
    kept = (out == x).all(dim=1)[0].float().mean().item()
    assert lam == pytest.approx(kept)
    assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (h * w))
    t = F.one_hot(y, 3).float()
    assert torch.allclose(target, lam * t + (1 - lam) * t.flip(0))


def test_cutmix_box_is_clipped_at_the_border():
    class FixedRng:  # centre in the corner
        def integers(self, lo, hi):
            return 0

    y0, y1, x0, x1 = cutmix_box(16, 16, 0.75, FixedRng())
    # sides int(16 * 0.5) = 8, centred at (0, 0): only the quarter inside the image remains
    assert (y0, y1, x0, x1) == (0, 4, 0, 4)


def test_batch_switch_and_lam_distribution():
    mix = Mixup(10)  # MAE's: mixup 0.8, cutmix 1.0, switch 0.5, prob 1
    rng = np.random.default_rng(0)
    draws = [mix.sample(rng) for _ in range(4000)]
    cut = [lam for lam, c in draws if c]
    mixed = [lam for lam, c in draws if not c]
    assert abs(len(cut) / len(draws) - 0.5) < 0.03
    assert abs(np.mean(cut) - 0.5) < 0.03 and abs(np.var(cut) - 1 / 12) < 0.01  # Beta(1, 1)
    assert abs(np.var(mixed) - 0.25 / 2.6) < 0.01  # Beta(a, a): 1 / (4 (2a + 1))
    off = Mixup(10, mixup_alpha=0.0, cutmix_alpha=0.0)
    x = _images()
    out, target, lam = off(x.clone(), torch.tensor([0, 1, 2, 3]), rng)
    assert lam == 1.0 and torch.equal(out, x)
    assert torch.allclose(target, smooth_one_hot(torch.tensor([0, 1, 2, 3]), 10, 0.1))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="alphas must be >= 0"):
        Mixup(10, mixup_alpha=-1)
    with pytest.raises(ValueError, match="label smoothing"):
        Mixup(10, label_smoothing=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        Mixup(1)
