"""Block masks (iBOT/BEiT + DINOv2's batch logic), MAE random masking, SplitMask halves."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from vssl.data.masking import BlockMaskGenerator, random_masking, sample_ibot_masks, split_halves


def test_block_mask_count_within_requested():
    gen = BlockMaskGenerator((16, 16), max_num_patches=128)
    g = torch.Generator().manual_seed(0)
    for target in [0, 4, 10, 26, 50, 77, 128]:
        for _ in range(20):
            m = gen(target, g)
            assert m.shape == (16, 16) and m.dtype == bool
            n = int(m.sum())
            assert n <= target
            # the sampler stops short only when no block of >= min_num_patches fits the remainder
            assert n >= target - 2 * gen.min_num_patches, (target, n)


def test_single_block_aspect_and_area():
    gen = BlockMaskGenerator((16, 16), min_num_patches=4, min_aspect=0.3)
    assert gen.max_aspect == pytest.approx(1 / 0.3)
    rng = random.Random(0)
    seen = 0
    for _ in range(3000):
        b = gen.sample_block(60, rng)
        if b is None:
            continue
        seen += 1
        assert 0.3 - 1e-12 <= b.aspect <= 1 / 0.3 + 1e-12
        assert 4 <= b.target_area <= 60
        assert b.height == round(math.sqrt(b.target_area * b.aspect))
        assert b.width == round(math.sqrt(b.target_area / b.aspect))
        assert 0 <= b.top and b.top + b.height <= 16 and 0 <= b.left and b.left + b.width <= 16
        # the realized h/w is the drawn aspect up to integer rounding
        sh, sw = math.sqrt(b.target_area * b.aspect), math.sqrt(b.target_area / b.aspect)
        hi = (sh + 0.5) / max(sw - 0.5, 1e-9)
        lo = (sh - 0.5) / (sw + 0.5)
        assert lo - 1e-9 <= b.height / b.width <= hi + 1e-9
    assert seen > 2000
    # add_block adds a rectangle, never more than the budget
    mask = np.zeros((16, 16), dtype=bool)
    added = gen.add_block(mask, 20, rng)
    assert 0 < added <= 20 and mask.sum() == added
    rows, cols = np.nonzero(mask)
    assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == added


def test_block_mask_seeded():
    gen = BlockMaskGenerator((14, 14))
    a = gen(50, torch.Generator().manual_seed(7))
    b = gen(50, torch.Generator().manual_seed(7))
    c = gen(50, torch.Generator().manual_seed(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_ibot_masks_batch_spread():
    n, N = 64, 256
    out = sample_ibot_masks(
        n, (16, 16), 0.5, (0.1, 0.5), generator=torch.Generator().manual_seed(0)
    )
    assert out.masks.shape == (n, N) and out.masks.dtype == torch.bool
    counts = out.masks.sum(1)
    masked = counts[counts > 0]
    assert (counts == 0).sum() == n // 2 and masked.numel() == n // 2
    ratios = (masked.float() / N).sort().values
    # requested ratios cover [0.1, 0.5] in n/2 equal strata; block sampling may fall a few short
    assert ratios.max() <= 0.5 + 1e-6
    assert ratios.min() >= 0.1 - 8 / N
    assert ratios[:4].max() < 0.2 and ratios[-4:].min() > 0.4  # both ends reached
    # roughly linear spread: quantiles of the masked ratios track the strata
    expect = torch.linspace(0.1, 0.5, n // 2 + 1)
    mid = (expect[:-1] + expect[1:]) / 2
    assert (ratios - mid).abs().max() < 0.05
    # DINOv2's auxiliaries
    assert torch.equal(out.mask_indices_list, out.masks.flatten().nonzero().flatten())
    assert out.n_masked_patches.tolist() == [int(out.masks.sum())]
    w = torch.zeros(n, N)
    w.view(-1)[out.mask_indices_list] = out.masks_weight
    assert torch.allclose(w.sum(1)[counts > 0], torch.ones(n // 2))
    assert out.upperbound >= int(out.masks.sum())
    # shuffled: the masked images are not simply the first half
    assert not bool((counts[: n // 2] > 0).all())


def test_ibot_masks_odd_and_seeded():
    a = sample_ibot_masks(5, 16, generator=torch.Generator().manual_seed(1))
    b = sample_ibot_masks(5, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.masks, b.masks)
    assert int((a.masks.sum(1) > 0).sum()) <= 2  # int(5 * 0.5)


def test_mae_random_masking():
    n, L = 6, 196
    g = torch.Generator().manual_seed(0)
    ids_keep, ids_restore, mask = random_masking(n, L, 0.75, g)
    keep = round(L * 0.25)
    assert ids_keep.shape == (n, keep) and ids_restore.shape == (n, L) and mask.shape == (n, L)
    assert torch.equal(mask.sum(1), torch.full((n,), float(L - keep)))
    # mask is 0 exactly at the kept indices
    assert bool((mask.gather(1, ids_keep) == 0).all())
    # ids_restore inverts the shuffle: unshuffling a shuffled sequence gives the identity
    tokens = torch.arange(L).expand(n, L)
    # ids_shuffle (kept first, then removed) is the inverse permutation of ids_restore
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(ids_shuffle[:, :keep], ids_keep)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), tokens)
    x = torch.randn(n, L)
    x_shuf = x.gather(1, ids_shuffle)
    assert torch.equal(x_shuf.gather(1, ids_restore), x)
    # seeded
    a = random_masking(n, L, 0.75, torch.Generator().manual_seed(3))
    b = random_masking(n, L, 0.75, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # a ratio whose product is not exactly representable rounds, never truncates
    assert random_masking(1, 10, 0.7)[0].shape[1] == 3


def test_split_halves():
    n, L = 5, 196
    a, b = split_halves(n, L, torch.Generator().manual_seed(0))
    assert a.shape == b.shape == (n, L // 2)
    for i in range(n):
        sa, sb = set(a[i].tolist()), set(b[i].tolist())
        assert not (sa & sb) and (sa | sb) == set(range(L))
        assert a[i].tolist() == sorted(sa)
    a2, _ = split_halves(n, L, torch.Generator().manual_seed(0))
    assert torch.equal(a, a2)
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ValueError):
        split_halves(1, 7)
