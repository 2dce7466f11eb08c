"""Multi-crop geometry/photometry, MAE/SplitMask views and multi-crop collation."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vssl.data.augment import (
    MAEView,
    MultiCropGeometry,
    MultiCropPhotometric,
    PhotometricParams,
    SplitMaskView,
    _hue,
    apply_photometric,
    crop_draft_size,
    normalize,
    sample_resized_crop,
)
from vssl.data.collate import collate_multicrop
from vssl.data.masking import BlockMaskGenerator
from vssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _image(w=320, h=240, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth colourful content plus noise, so crops differ
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    a = a + rng.integers(0, 40, size=a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


# ------------------------------------------------------------------ random resized crop sampling


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (224, 224), (1000, 120)])
def test_resized_crop_within_bounds(size):
    w_img, h_img = size
    scale, ratio = (0.05, 0.32), (3 / 4, 4 / 3)
    rng = random.Random(0)
    area = w_img * h_img
    n_fallback = 0
    for _ in range(2000):
        top, left, h, w = sample_resized_crop(w_img, h_img, scale, ratio, rng)
        assert 0 <= top and top + h <= h_img and 0 <= left and left + w <= w_img
        assert h > 0 and w > 0
        centered = top == (h_img - h) // 2 and left == (w_img - w) // 2
        if centered and (h == h_img or w == w_img) and w * h > scale[1] * area:
            n_fallback += 1
            continue
        # w = round(sqrt(A * r)), h = round(sqrt(A / r)) with A in scale*area and r in ratio
        assert (w - 0.5) * (h - 0.5) <= scale[1] * area + 1e-9
        assert (w + 0.5) * (h + 0.5) >= scale[0] * area - 1e-9
        assert (w - 0.5) / (h + 0.5) <= ratio[1] + 1e-9
        assert (w + 0.5) / (h - 0.5) >= ratio[0] - 1e-9
    assert n_fallback < (200 if size == (1000, 120) else 1)


def test_resized_crop_aspect_and_area_statistics():
    rng = random.Random(1)
    W, H = 2000, 1500  # large, so integer rounding is negligible
    areas, logs = [], []
    for _ in range(3000):
        top, left, h, w = sample_resized_crop(W, H, (0.32, 1.0), (3 / 4, 4 / 3), rng)
        areas.append(w * h / (W * H))
        logs.append(math.log(w / h))
    areas, logs = np.array(areas), np.array(logs)
    assert areas.min() >= 0.32 - 0.005 and areas.max() <= 1.0
    assert logs.min() >= math.log(3 / 4) - 0.01 and logs.max() <= math.log(4 / 3) + 0.01
    # both ends of the ranges are reached
    assert areas.min() < 0.36 and areas.max() > 0.9
    assert logs.min() < math.log(3 / 4) + 0.05 and logs.max() > math.log(4 / 3) - 0.05


def test_resized_crop_fallback_center():
    # scale > what fits: every attempt fails -> center crop with the aspect clamped into `ratio`
    class NoFit(random.Random):
        def uniform(self, a, b):  # area fraction 1.0 and the extreme aspect -> never fits
            return b

    top, left, h, w = sample_resized_crop(1000, 100, (1.0, 1.0), (3 / 4, 4 / 3), NoFit(0))
    assert (h, w) == (100, 133) and top == 0 and left == (1000 - 133) // 2
    top, left, h, w = sample_resized_crop(100, 1000, (1.0, 1.0), (3 / 4, 4 / 3), NoFit(0))
    assert (h, w) == (133, 100) and left == 0 and top == (1000 - 133) // 2
    # a thin image with the real sampler: the fallback is taken and stays within the image
    rng = random.Random(0)
    for _ in range(50):
        top, left, h, w = sample_resized_crop(1000, 20, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert h == 20 and w == round(20 * 4 / 3) and left == (1000 - w) // 2


def test_draft_size():
    geo = MultiCropGeometry()
    s = geo.draft_size[0]
    r = (3 / 4, 4 / 3)
    assert s == max(crop_draft_size(224, (0.32, 1.0), r), crop_draft_size(98, (0.05, 0.32), r))
    # an image of short side s: the smallest possible local/global crops are still >= the output
    assert math.sqrt(0.05 * s * s * 3 / 4) >= 98 - 1e-6
    assert math.sqrt(0.32 * s * s * 3 / 4) >= 224 - 1e-6
    assert MAEView().draft_size[0] == crop_draft_size(224, (0.2, 1.0), (3 / 4, 4 / 3))


# ------------------------------------------------------------------------------ geometry views


def test_multicrop_geometry_shapes_and_dtype():
    geo = MultiCropGeometry()
    out = geo(_image(), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"global", "local"}
    assert out["global"].shape == (2, 3, 224, 224) and out["global"].dtype == torch.uint8
    assert out["local"].shape == (8, 3, 98, 98) and out["local"].dtype == torch.uint8
    assert out["global"].is_contiguous() and out["local"].is_contiguous()
    assert int(out["global"].max()) > 100  # real content, not zeros
    small = MultiCropGeometry(global_size=64, local_size=32, n_local=3)(_image().convert("L"))
    assert small["global"].shape == (2, 3, 64, 64) and small["local"].shape == (3, 3, 32, 32)


def test_multicrop_geometry_seeded():
    geo = MultiCropGeometry(global_size=64, local_size=32, n_local=4)
    img = _image()
    a = geo(img, generator=torch.Generator().manual_seed(3))
    b = geo(img, generator=torch.Generator().manual_seed(3))
    c = geo(img, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a["global"], b["global"]) and torch.equal(a["local"], b["local"])
    assert not torch.equal(a["global"], c["global"])


def test_full_crop_matches_pil_resize_and_flip():
    img = _image(200, 150)
    geo = MultiCropGeometry(
        global_size=50,
        local_size=20,
        n_local=1,
        global_scale=(1.0, 1.0),
        ratio=(200 / 150, 200 / 150),
        flip_p=0.0,
        backend="pil",
    )
    out = geo(img, generator=torch.Generator().manual_seed(0))
    ref = np.asarray(img.resize((50, 50), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(out["global"][0].numpy(), ref)
    geo_f = MultiCropGeometry(
        global_size=50,
        local_size=20,
        n_local=1,
        global_scale=(1.0, 1.0),
        ratio=(200 / 150, 200 / 150),
        flip_p=1.0,
        backend="pil",
    )
    out_f = geo_f(img, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(out_f["global"][1].numpy(), ref[:, :, ::-1])
    # the torch backend: PIL's antialiased bicubic up to rounding (whole-image box: no border effect)
    geo_t = MultiCropGeometry(
        global_size=50,
        local_size=20,
        n_local=1,
        global_scale=(1.0, 1.0),
        ratio=(200 / 150, 200 / 150),
        flip_p=1.0,
        backend="torch",
    )
    out_t = geo_t(img, generator=torch.Generator().manual_seed(0))
    assert (
        out_t["global"][1].int() - torch.from_numpy(ref[:, :, ::-1].copy()).int()
    ).abs().max() <= 1


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_torch_and_pil_backends_agree(interpolation):
    img = _image(500, 375)
    kw = dict(interpolation=interpolation, n_local=8)
    a = MultiCropGeometry(backend="torch", **kw)(img, generator=torch.Generator().manual_seed(5))
    b = MultiCropGeometry(backend="pil", **kw)(img, generator=torch.Generator().manual_seed(5))
    for k in ("global", "local"):
        d = (a[k].int() - b[k].int()).abs()
        assert d.float().mean() < 0.1  # same boxes and flips; kernels equal up to rounding
        assert d[..., 3:-3, 3:-3].max() <= 2  # interior (PIL also reads just outside the box)
    assert MultiCropGeometry(interpolation="lanczos").backend == "pil"


@pytest.mark.parametrize("cls", [MAEView, SplitMaskView])
@pytest.mark.parametrize("backend", ["torch", "pil"])
def test_mae_and_splitmask_views(cls, backend):
    v = cls(size=96, backend=backend)
    x = v(_image(), generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 96, 96) and x.dtype == torch.uint8
    assert torch.equal(x, v(_image(), generator=torch.Generator().manual_seed(0)))
    assert v.scale == (0.2, 1.0)
    y = normalize(torch.stack([x, x]))
    assert y.dtype == torch.float32
    expect = (x.float() / 255 - MEAN) / STD
    assert torch.allclose(y[0], expect, atol=1e-6)


def test_real_images(shared_data):
    from vssl.data.decode import open_image

    files = sorted((shared_data / "imagenet-samples").iterdir())[:4]
    geo = MultiCropGeometry()
    samples = [geo(open_image(f, draft_size=geo.draft_size)) for f in files]
    batch = MultiCropPhotometric()(collate_multicrop(samples))
    assert batch["global"].shape == (8, 3, 224, 224) and batch["local"].shape == (32, 3, 98, 98)
    assert torch.isfinite(batch["global"]).all() and torch.isfinite(batch["local"]).all()


# -------------------------------------------------------------------------------------- collate


def _fake_sample(i: int, n_local=3, g=8, l=4, label=True):  # noqa: E741 (l: local size)
    s = {
        "global": torch.stack(
            [torch.full((3, g, g), 10 * i + k, dtype=torch.uint8) for k in range(2)]
        ),
        "local": torch.stack(
            [torch.full((3, l, l), 10 * i + k, dtype=torch.uint8) for k in range(n_local)]
        ),
    }
    return (s, i) if label else s


def test_collate_layout_crop1_first():
    b = collate_multicrop([_fake_sample(i) for i in range(4)])
    assert b["global"].shape == (8, 3, 8, 8) and b["local"].shape == (12, 3, 4, 4)
    assert b["global"].dtype == torch.uint8
    ids = b["global"][:, 0, 0, 0].tolist()
    assert ids == [0, 10, 20, 30, 1, 11, 21, 31]  # all crop-1s (k=0), then all crop-2s
    assert b["local"][:, 0, 0, 0].tolist() == [0, 10, 20, 30, 1, 11, 21, 31, 2, 12, 22, 32]
    assert b["label"].tolist() == [0, 1, 2, 3]
    nolab = collate_multicrop([_fake_sample(i, label=False) for i in range(2)])
    assert "label" not in nolab and "masks" not in nolab


def test_collate_with_masks():
    gen = BlockMaskGenerator((4, 4), min_num_patches=1, max_num_patches=8)
    b = collate_multicrop(
        [_fake_sample(i) for i in range(4)],
        mask_generator=gen,
        generator=torch.Generator().manual_seed(0),
    )
    assert b["masks"].shape == (8, 16) and b["masks"].dtype == torch.bool
    assert (b["masks"].sum(1) > 0).sum() <= 4
    assert b["n_masked_patches"].item() == b["masks"].sum().item() == b["mask_indices_list"].numel()


# ------------------------------------------------------------------------------------ photometry


def _batch(b=4, g=32, l=16, n_local=2, seed=0):  # noqa: E741 (l: local size)
    gen = torch.Generator().manual_seed(seed)
    return {
        "global": torch.randint(0, 256, (2 * b, 3, g, g), dtype=torch.uint8, generator=gen),
        "local": torch.randint(0, 256, (n_local * b, 3, l, l), dtype=torch.uint8, generator=gen),
        "label": torch.arange(b),
    }


def test_photometric_shapes_dtype_normalized():
    batch = _batch()
    out = MultiCropPhotometric()(batch, generator=torch.Generator().manual_seed(0))
    assert out["global"].dtype == torch.float32 and out["global"].shape == batch["global"].shape
    assert out["local"].dtype == torch.float32 and out["local"].shape == batch["local"].shape
    assert out["label"] is batch["label"]
    lo = ((0 - MEAN) / STD).min().item()
    hi = ((1 - MEAN) / STD).max().item()
    for k in ("global", "local"):
        assert out[k].min() >= lo - 1e-5 and out[k].max() <= hi + 1e-5
    assert batch["global"].dtype == torch.uint8  # input untouched


def test_photometric_identity_is_normalize():
    batch = _batch()
    ph = MultiCropPhotometric(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    out = ph(batch)
    assert torch.allclose(out["global"], normalize(batch["global"]), atol=1e-6)
    assert torch.allclose(out["local"], normalize(batch["local"]), atol=1e-6)


def test_photometric_grayscale_p1():
    batch = _batch()
    out = MultiCropPhotometric(grayscale_p=1.0)(batch, generator=torch.Generator().manual_seed(0))
    for k in ("global", "local"):
        unnorm = out[k] * STD + MEAN
        assert torch.allclose(unnorm[:, 0], unnorm[:, 1], atol=1e-5)
        assert torch.allclose(unnorm[:, 0], unnorm[:, 2], atol=1e-5)


def test_photometric_solarize_p1_matches_hand_computation():
    batch = _batch()
    p = PhotometricParams(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=1.0)
    out = apply_photometric(batch["global"], [p], [batch["global"].shape[0]])
    u8 = batch["global"].to(torch.int32)
    expect = torch.where(u8 >= 128, 255 - u8, u8).to(torch.float32) / 255.0
    assert torch.allclose(out, (expect - MEAN) / STD, atol=1e-5)
    # only crop-2s get DINOv2's solarize: with p forced to 1 there and blur/jitter off,
    # crop-1s stay plain and crop-2s are solarized
    ph = MultiCropPhotometric(
        global1=PhotometricParams(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
        global2=PhotometricParams(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=1.0),
    )
    o = ph(batch)["global"]
    B = batch["global"].shape[0] // 2
    assert torch.allclose(o[:B], normalize(batch["global"][:B]), atol=1e-5)
    assert torch.allclose(o[B:], ((expect - MEAN) / STD)[B:], atol=1e-5)


def test_photometric_blur_groups():
    # blur p=1 for crop-1 only: crop-1s get smoother, crop-2s unchanged
    batch = _batch(g=32)
    ph = MultiCropPhotometric(
        global1=PhotometricParams(jitter_p=0.0, grayscale_p=0.0, blur_p=1.0, blur_sigma=(1.5, 2.0)),
        global2=PhotometricParams(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
    )
    o = ph(batch)["global"]
    ref = normalize(batch["global"])
    B = 4
    assert torch.allclose(o[B:], ref[B:], atol=1e-6)
    assert o[:B].std() < 0.6 * ref[:B].std()


def test_photometric_seeded_and_random():
    batch = _batch()
    ph = MultiCropPhotometric()
    a = ph(batch, generator=torch.Generator().manual_seed(1))
    b = ph(batch, generator=torch.Generator().manual_seed(1))
    c = ph(batch, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a["global"], b["global"]) and torch.equal(a["local"], b["local"])
    assert not torch.equal(a["global"], c["global"])


def test_jitter_ops_match_torchvision_definitions():
    """Brightness/contrast/saturation as torchvision defines them (blend with black / the gray
    mean / the grayscale image), each applied alone with p=1."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=gen)
    xf = x.float() / 255
    for which in range(3):
        strengths = [0.0, 0.0, 0.0, 0.0]
        strengths[which] = 0.5
        p = PhotometricParams(jitter=tuple(strengths), jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)
        g1 = torch.Generator().manual_seed(5)
        out = apply_photometric(x, [p], [6], g1, mean=None, std=None)
        # reproduce the factor draw: _uniform over (n, 4) first
        g2 = torch.Generator().manual_seed(5)
        f = 0.5 + torch.rand(6, 4, generator=g2)[:, which]
        fv = f.view(-1, 1, 1, 1)
        gray = (0.2989 * xf[:, 0] + 0.587 * xf[:, 1] + 0.114 * xf[:, 2]).unsqueeze(1)
        if which == 0:
            ref = xf * fv
        elif which == 1:
            ref = fv * xf + (1 - fv) * gray.mean(dim=(1, 2, 3), keepdim=True)
        else:
            ref = fv * xf + (1 - fv) * gray
        assert torch.allclose(out, ref.clamp(0, 1), atol=1e-5), which


def test_hue_matches_kornia():
    import kornia.enhance as KE

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16, generator=gen)
    x[0] = x[0, :1]  # gray image: hue undefined, must stay gray
    f = torch.rand(8, generator=gen) - 0.5
    assert torch.allclose(_hue(x, f), KE.adjust_hue(x, f * 2 * math.pi), atol=1e-5)
    assert torch.allclose(_hue(x, torch.zeros(8)), x, atol=1e-5)


class _FixedCrops(torch.utils.data.Dataset):
    """Deterministic multi-crop samples: crop values encode (image, crop) so layout is checkable."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        g = torch.stack([torch.full((3, 4, 4), 10 * i + k, dtype=torch.uint8) for k in range(2)])
        loc = torch.stack(
            [torch.full((3, 2, 2), 100 + 10 * i + k, dtype=torch.uint8) for k in range(3)]
        )
        return {"global": g, "local": loc}, i


def test_collate_in_dataloader_workers_matches_in_process():
    """Inside workers the batch is built in shared memory; it must equal the in-process result."""
    from vssl.data.collate import collate_multicrop

    ds = _FixedCrops()
    expected = collate_multicrop([ds[i] for i in range(3)])
    loader = torch.utils.data.DataLoader(
        ds, batch_size=3, num_workers=1, collate_fn=collate_multicrop
    )
    first = next(iter(loader))
    for key in ("global", "local", "label"):
        assert torch.equal(first[key], expected[key]), key
    # crop-major: row k*B + i is crop k of image i
    assert first["global"][1 * 3 + 2, 0, 0, 0].item() == 10 * 2 + 1
    assert first["local"][2 * 3 + 0, 0, 0, 0].item() == 100 + 2


def test_multicrop_geometry_takes_arrays_like_pil():
    """``open_image(as_array=True)`` pixels give the very crops the PIL image gives (both backends)."""
    img = _image()
    arr = np.array(img)
    for backend in ("torch", "pil"):
        geo = MultiCropGeometry(global_size=64, local_size=32, n_local=3, backend=backend)
        assert geo.accepts_array == (backend == "torch")
        a = geo(img, generator=torch.Generator().manual_seed(5))
        b = geo(arr, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a["global"], b["global"]) and torch.equal(a["local"], b["local"])
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        MultiCropGeometry()(arr.astype(np.float32))


def test_recipe_colour_settings_reach_the_multicrop_augmentation(tmp_path):
    """data.color_jitter / color_jitter_p / grayscale_p set every crop group's colour recipe;
    DINOv2's values (the defaults) keep DINOv2's per-group recipe (blur, solarize) untouched."""
    from vssl.data.augment import DINO_GLOBAL1, DINO_GLOBAL2, DINO_LOCAL
    from vssl.pretrain import build_data, build_method
    from vssl.train.config import load_recipe

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    overrides = [f"data.train={folder}", "data.num_workers=0", "train.batch_size_per_rank=2"]
    recipe = load_recipe("cpu_tiny32", overrides)
    method, _ = build_method(recipe)
    p = build_data(recipe, method.views()).views.photometric
    assert (p.global1, p.global2, p.local) == (DINO_GLOBAL1, DINO_GLOBAL2, DINO_LOCAL)

    strong = [
        "data.color_jitter=[0.4,0.4,0.4,0.5]",
        "data.color_jitter_p=1.0",
        "data.grayscale_p=0.5",
    ]
    recipe = load_recipe("cpu_tiny32", overrides + strong)
    p = build_data(recipe, method.views()).views.photometric
    for group, dino in (
        (p.global1, DINO_GLOBAL1),
        (p.global2, DINO_GLOBAL2),
        (p.local, DINO_LOCAL),
    ):
        assert group.jitter == (0.4, 0.4, 0.4, 0.5)
        assert (group.jitter_p, group.grayscale_p) == (1.0, 0.5)
        assert (group.blur_p, group.solarize_p) == (dino.blur_p, dino.solarize_p)

    # data.blur_p / data.solarize_p set every group (no blur: SimCLR's CIFAR recipe)
    recipe = load_recipe("cpu_tiny32", overrides + ["data.blur_p=0", "data.solarize_p=0.1"])
    p = build_data(recipe, method.views()).views.photometric
    for group, dino in (
        (p.global1, DINO_GLOBAL1),
        (p.global2, DINO_GLOBAL2),
        (p.local, DINO_LOCAL),
    ):
        assert (group.blur_p, group.solarize_p) == (0.0, 0.1)
        assert group.jitter == dino.jitter


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.color_jitter=[0.4,0.4,0.2,0.7]", "hue <= 0.5"),
        ("data.color_jitter=[-0.1,0.4,0.2,0.1]", "each >= 0"),
        ("data.grayscale_p=1.5", r"data.grayscale_p is a probability"),
        ("data.color_jitter_p=-1", r"data.color_jitter_p is a probability"),
        ("data.blur_p=2", r"data.blur_p is a probability"),
    ],
)
def test_bad_colour_settings_are_refused(override, message):
    from vssl.train.config import load_recipe

    with pytest.raises(ValueError, match=message):
        load_recipe("cpu_tiny32", [override])
