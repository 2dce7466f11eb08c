"""`vssl eval seg`: metrics against hand counts and scikit-learn, the image/mask geometry, a real
segmentation task built from real photos, bad files, and the command end to end."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vssl
from vssl.data.transforms import EvalTransform
from vssl.evaluate import seg

# Three source photos are the classes 1..3, a fourth one is the background (class 0). Chosen for
# appearance that differs (stripes, salmon fabric, grey lava, green/blue landscape), not by name.
CLASS_PHOTOS = ["n02391049_zebra", "n04033995_quilt", "n09472597_volcano"]
BACKGROUND_PHOTO = "n09193705_alp"


def make_pasted_set(root: Path, photos_dir: Path, n: int, seed: int, size: int = 112) -> None:
    """ADE20K-layout folder of ``n`` canvases: a crop of the background photo with one crop of
    each class photo pasted at a random place (later pastes cover earlier ones, and so does the
    mask). Masks are known exactly: class id per pasted square, 0 elsewhere."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    photos = [Image.open(photos_dir / f"{name}.JPEG").convert("RGB") for name in CLASS_PHOTOS]
    background = Image.open(photos_dir / f"{BACKGROUND_PHOTO}.JPEG").convert("RGB")

    def crop(img: Image.Image, out: int, lo: float, hi: float) -> Image.Image:
        # a different square of the photo each time, near its centre (where the subject is)
        w, h = img.size
        s = int(min(w, h) * rng.uniform(lo, hi))
        cx, cy = w / 2 + rng.uniform(-0.15, 0.15) * w, h / 2 + rng.uniform(-0.15, 0.15) * h
        x, y = int(np.clip(cx - s / 2, 0, w - s)), int(np.clip(cy - s / 2, 0, h - s))
        return img.crop((x, y, x + s, y + s)).resize((out, out), Image.Resampling.BILINEAR)

    for i in range(n):
        canvas = crop(background, size, 0.5, 1.0)
        mask = np.zeros((size, size), np.uint8)
        for k, photo in enumerate(photos, 1):
            s = int(rng.integers(size // 3, size // 2 + 1))
            x, y = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
            canvas.paste(crop(photo, s, 0.4, 0.8), (x, y))
            mask[y : y + s, x : x + s] = k
        canvas.save(root / "images" / f"{i:03d}.jpg", quality=95)
        Image.fromarray(mask).save(root / "annotations" / f"{i:03d}.png")


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return vssl.create_model("vit-test-p14", random_init=True)


# ---------------------------------------------------------------------------------- metrics
def test_confusion_and_miou_by_hand():
    # 4 classes; class 3 appears nowhere (its IoU is NaN and left out of the mean); the pixel
    # labelled 255 is ignored although its prediction (0) would change class 0's union.
    target = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 0, 0]])
    conf = seg.confusion_matrix(pred, target, num_classes=4)
    expected = np.zeros((4, 4), np.int64)
    for t, p in [(0, 0), (0, 1), (1, 1), (1, 1), (2, 0)]:
        expected[t, p] += 1
    np.testing.assert_array_equal(conf, expected)
    iou = seg.iou_per_class(conf)
    # class 0: I=1, U=|gt 2| + |pred 2| - 1 = 3; class 1: I=2, U=2+3-2 = 3; class 2: I=0, U=1
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 0.0])
    assert np.isnan(iou[3])
    assert seg.miou(conf) == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert seg.pixel_accuracy(conf) == pytest.approx(3 / 5)
    # accumulated over the set, not averaged per image: two halves add up to the whole
    halves = seg.confusion_matrix(pred[:1], target[:1], 4) + seg.confusion_matrix(
        pred[1:], target[1:], 4
    )
    np.testing.assert_array_equal(halves, conf)


def test_metrics_match_sklearn():
    from sklearn.metrics import confusion_matrix as sk_confusion
    from sklearn.metrics import jaccard_score

    rng = np.random.default_rng(0)
    target = rng.integers(0, 6, size=(3, 40, 50))
    target[rng.random(target.shape) < 0.1] = 255
    target[target == 5] = 1  # class 5 absent from the ground truth, but predicted: IoU 0
    pred = rng.integers(0, 6, size=target.shape)
    pred[target == 2] = 2  # make one class easy so IoUs differ
    conf = seg.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 7)
    keep = target != 255
    t, p = target[keep], pred[keep]
    np.testing.assert_array_equal(conf, sk_confusion(t, p, labels=range(7)))
    present = [0, 1, 2, 3, 4, 5]  # 6 is in neither: NaN
    np.testing.assert_allclose(
        seg.iou_per_class(conf)[present], jaccard_score(t, p, labels=present, average=None)
    )
    assert np.isnan(seg.iou_per_class(conf)[6])
    assert seg.miou(conf) == pytest.approx(jaccard_score(t, p, labels=present, average="macro"))
    assert seg.pixel_accuracy(conf) == pytest.approx(float((t == p).mean()))


def test_confusion_rejects_unknown_target_ids():
    with pytest.raises(ValueError, match="class id 7"):
        seg.confusion_matrix(np.array([0, 1]), np.array([0, 7]), num_classes=4)


def test_class_id_mapping():
    ids = np.array([0, 1, 2, 150, 255])
    np.testing.assert_array_equal(
        seg.map_class_ids(ids, 150, reduce_zero_label=True), [255, 0, 1, 149, 255]
    )
    np.testing.assert_array_equal(seg.map_class_ids(ids[:3], 3), [0, 1, 2])
    with pytest.raises(ValueError, match="--reduce-zero-label"):
        seg.map_class_ids(ids, 150)  # ADE20K's raw ids without the flag: 150 is no class


def test_schedule_is_warmup_then_poly():
    total, warmup = 400, 15
    assert seg._lr_factor(0, total, warmup) == pytest.approx(1e-6)
    # mmcv: linear warm-up multiplies the poly value by 1 - (1 - ratio) * (1 - step / warmup)
    step = 5
    assert seg._lr_factor(step, total, warmup) == pytest.approx(
        (1 - step / total) * (1 - (1 - 1e-6) * (1 - step / warmup))
    )
    assert seg._lr_factor(warmup, total, warmup) == pytest.approx(1 - warmup / total)
    assert seg._lr_factor(total - 1, total, warmup) == pytest.approx(1 / total)


# ---------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("mode", ["crop", "resize"])
def test_mask_follows_the_image(mode):
    """Each pixel's colour encodes its class; after the transform the mask must still name the
    colour found at every pixel (away from the bicubic-blurred borders)."""
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
    ids = np.zeros((90, 150), np.int32)  # landscape, so the crop drops columns
    ids[:, 30:60] = 1
    ids[40:, 75:] = 2
    ids[:20, 120:] = 3
    img = Image.fromarray(colours[ids])
    t = seg.SegTransform(56, mode)
    x = t.image(img)
    m = t.mask(ids)
    assert x.shape == (3, 56, 56) and m.shape == (56, 56)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    rgb = ((x * std + mean) * 255).permute(1, 2, 0).numpy()
    nearest = np.linalg.norm(rgb[:, :, None] - colours[None, None].astype(float), axis=-1).argmin(
        -1
    )
    interior = np.ones_like(m, bool)
    for dy in (-1, 0, 1):  # pixels whose 3x3 neighbourhood is one class
        for dx in (-1, 0, 1):
            interior &= np.roll(m, (dy, dx), axis=(0, 1)) == m
    interior[[0, -1]] = interior[:, [0, -1]] = False
    assert interior.mean() > 0.5
    np.testing.assert_array_equal(nearest[interior], m[interior])
    assert set(np.unique(m)) <= {0, 1, 2, 3}  # nearest never invents an id
    if mode == "crop":  # the image side is torchvision's Resize + CenterCrop (the eval transform)
        torch.testing.assert_close(x, EvalTransform(56, resize_ratio=1.0)(img))


def test_features_are_the_last_block_patch_tokens(tmp_path, shared_data):
    make_pasted_set(tmp_path, shared_data / "imagenet-samples", n=3, seed=0, size=70)
    model = tiny_model()
    pairs, missing = seg.find_pairs(tmp_path)
    assert len(pairs) == 3 and not missing
    data = seg.extract_patch_features(model, pairs, num_classes=4, resolution=56, batch_size=2)
    assert data.feats.shape == (3, 32, 4, 4) and data.feats.dtype == torch.float16
    assert data.masks.shape == (3, 56, 56) and data.masks.dtype == torch.uint8
    t = seg.SegTransform(56)
    x = torch.stack([t.image(Image.open(p).convert("RGB")) for p, _ in pairs])
    with torch.no_grad():  # an independent path through the model: forward_features
        ref = (
            model.forward_features(x)["x_norm_patchtokens"].reshape(3, 4, 4, 32).permute(0, 3, 1, 2)
        )
    torch.testing.assert_close(data.feats.float(), ref, atol=2e-3, rtol=2e-3)
    expected = [t.mask(np.asarray(Image.open(m))) for _, m in pairs]
    np.testing.assert_array_equal(data.masks.numpy(), np.stack(expected))


# ---------------------------------------------------------------------------------- the probe
def test_probe_segments_pasted_photos(tmp_path, shared_data):
    """The issue's real test: a frozen random ViT's patch tokens keep enough colour and texture
    for a linear probe to tell four photos apart, far better than the majority-class answer."""
    photos = shared_data / "imagenet-samples"
    make_pasted_set(tmp_path / "train", photos, n=24, seed=0)
    make_pasted_set(tmp_path / "val", photos, n=12, seed=1)
    # 36 iterations instead of DINOv2's 40k: a higher learning rate than its 1e-3
    result = seg.train_linear_seg(
        tiny_model(),
        tmp_path / "train",
        tmp_path / "val",
        num_classes=4,
        resolution=112,
        epochs=12,
        lr=5e-2,
        batch_size=8,
    )
    # the constant predictor (majority class of the val pixels everywhere), from the val masks
    val = np.stack(
        [np.asarray(Image.open(p)) for p in sorted((tmp_path / "val/annotations").iterdir())]
    )
    counts = np.bincount(val.ravel(), minlength=4)
    constant_miou = (counts.max() / counts.sum()) / 4  # IoU of the majority class, 0 for the rest
    assert result.confusion.sum() == val.size  # every val pixel scored once, nothing ignored
    np.testing.assert_array_equal(result.confusion.sum(1), counts)
    assert result.num_train == 24 and result.num_val == 12 and not result.skipped
    assert result.losses[-1] < 0.6 * result.losses[0]
    assert result.miou > 2 * constant_miou and result.miou > constant_miou + 0.2, (
        result.summary(),
        constant_miou,
    )
    assert result.pixel_acc > counts.max() / counts.sum() + 0.05
    assert np.isfinite(result.per_class_iou).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probe_evaluates_the_same_on_cuda():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 8, 4, 4, generator=g).half()
    masks = torch.randint(0, 3, (6, 32, 32), generator=g).to(torch.uint8)
    head, _ = seg.fit_linear_seg(feats, masks, num_classes=3, epochs=2, batch_size=3)
    cpu = seg.evaluate_linear_seg(head, feats, masks, num_classes=3)
    gpu = seg.evaluate_linear_seg(head, feats, masks, num_classes=3, device="cuda")
    assert np.abs(cpu - gpu).sum() <= 4  # argmax ties may flip a pixel or two


# ---------------------------------------------------------------------------------- bad files
def test_bad_masks_are_skipped_and_listed(tmp_path, shared_data):
    make_pasted_set(tmp_path, shared_data / "imagenet-samples", n=6, seed=0, size=56)
    ann, imgs = tmp_path / "annotations", tmp_path / "images"
    data = (ann / "000.png").read_bytes()
    (ann / "000.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    Image.new("RGB", (56, 56), (1, 2, 3)).save(ann / "001.png")  # colour mask
    Image.new("L", (50, 56)).save(ann / "002.png")  # wrong size
    (ann / "003.png").unlink()  # no mask at all
    (imgs / "004.jpg").write_bytes(b"<html>not a jpeg</html>")  # bad image
    pairs, missing = seg.find_pairs(tmp_path)
    assert [Path(p).name for p, _ in missing] == ["003.jpg"]
    data = seg.extract_patch_features(tiny_model(), pairs, num_classes=4, resolution=56)
    assert [Path(p).name for p in data.paths] == ["005.jpg"]
    reasons = {Path(p).name: r for p, r in data.skipped}
    assert set(reasons) == {"000.jpg", "001.jpg", "002.jpg", "004.jpg"}
    assert "unreadable" in reasons["000.jpg"]
    assert "mode RGB" in reasons["001.jpg"]
    assert "50x56" in reasons["002.jpg"]
    assert reasons["004.jpg"].startswith("image:")


def test_out_of_range_ids_stop_with_a_hint(tmp_path, shared_data):
    make_pasted_set(tmp_path, shared_data / "imagenet-samples", n=2, seed=0, size=56)
    with pytest.raises(ValueError, match=r"annotations/000.png.*class id 3.*--num-classes 3"):
        seg.extract_patch_features(
            tiny_model(), seg.find_pairs(tmp_path)[0], num_classes=3, resolution=56
        )


def test_layout_errors_say_what_is_expected(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="annotations"):
        seg.find_pairs(tmp_path)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "images" / "training").mkdir()
    with pytest.raises(FileNotFoundError, match="no 'validation' split.*training"):
        seg.find_pairs(tmp_path, "validation")
    with pytest.raises(ValueError, match="multiple of the patch size 14: use 98 or 112"):
        seg.extract_patch_features(tiny_model(), [], num_classes=2, resolution=100)


# ---------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vssl eval")
    seg.add_parser(p.add_subparsers())
    return p


def test_cli_end_to_end(tmp_path, shared_data, capsys):
    # ADE20K's split layout: one root serves --train (training) and the default --val (validation)
    photos = shared_data / "imagenet-samples"
    root = tmp_path / "ade"
    for split, n, s in (("training", 12, 0), ("validation", 4, 1)):
        make_pasted_set(tmp_path / split, photos, n=n, seed=s, size=56)
        for kind in ("images", "annotations"):
            shutil.move(tmp_path / split / kind, root / kind / split)
    results = tmp_path / "results.jsonl"
    argv = [
        "seg",
        "--model",
        "vit-test-p14",
        "--train",
        str(root),
        "--num-classes",
        "4",
        "--resolution",
        "56",
        "--epochs",
        "3",
        "--lr",
        "0.03",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--no-progress",
        "--results",
        str(results),
    ]
    args = _parser().parse_args(argv)
    torch.manual_seed(0)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "val_pixels" in out and "seg_miou" in out and "seg_pixel_acc" in out
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["metric"] for r in rows] == ["seg_miou", "seg_pixel_acc"]
    assert rows[0]["protocol"] == "seg" and rows[0]["dataset"] == "ade"
    assert rows[0]["num_train"] == 12 and rows[0]["num_val"] == 4
    assert len(rows[0]["per_class_iou"]) == 4
    # the command passes its flags through: the same run through the API gives the same numbers
    api = seg.train_linear_seg(
        tiny_model(0), root, root, num_classes=4, resolution=56, epochs=3, lr=0.03, batch_size=4
    )
    assert rows[0]["value"] == pytest.approx(api.miou)
    assert rows[1]["value"] == pytest.approx(api.pixel_acc)
    assert f"{api.miou:.4f}" in out

    bad = _parser().parse_args([*argv[: argv.index("--resolution")], "--resolution", "50"])
    assert bad.func(bad) == 2
    assert (
        "vssl eval seg: error: resolution 50 is not a multiple of the patch size 14"
        in capsys.readouterr().err
    )
    missing = _parser().parse_args(
        [
            "seg",
            "--model",
            "vit-test-p14",
            "--train",
            str(tmp_path),
            "--num-classes",
            "4",
            "--results",
            "-",
        ]
    )
    assert missing.func(missing) == 2
    assert "expected the ADE20K layout" in capsys.readouterr().err
    flat = _parser().parse_args(
        [
            "seg",
            "--model",
            "vit-test-p14",
            "--train",
            str(tmp_path / "training"),
            "--num-classes",
            "4",
        ]
    )
    (tmp_path / "training" / "images").mkdir()  # emptied by the move above: a flat layout
    (tmp_path / "training" / "images" / "a.jpg").write_bytes(b"")
    (tmp_path / "training" / "annotations").mkdir()
    assert flat.func(flat) == 2  # never scores the probe on its own training images
    assert "--val is needed" in capsys.readouterr().err
