"""PCA maps of patch features and the HTML report pieces (vssl.viz)."""

from __future__ import annotations

import base64
import io
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from vssl.models.zoo import create_model
from vssl.viz.pca import patch_tokens, pca_components, pca_maps, pca_rgb
from vssl.viz.report import (
    image_table,
    line_chart,
    loss_series,
    png_data_uri,
    read_metrics,
    training_report,
)


# ------------------------------------------------------------------------------------------ PCA
def test_pca_components_match_covariance_eigenvectors():
    rng = np.random.default_rng(0)
    # anisotropic data: 3 clearly ordered variances plus noise
    x = rng.normal(size=(400, 6)) * np.array([5.0, 3.0, 2.0, 0.3, 0.2, 0.1]) + 7.0
    proj, comps = pca_components(x, 3)
    # reference: eigenvectors of the sample covariance, largest eigenvalues first
    centred = x - x.mean(0)
    evals, evecs = np.linalg.eigh(centred.T @ centred / (len(x) - 1))
    ref = evecs[:, ::-1][:, :3].T
    for i in range(3):
        assert abs(abs(comps[i] @ ref[i]) - 1.0) < 1e-8  # same direction up to sign
        # sign convention: the largest-magnitude loading is positive
        assert comps[i][np.abs(comps[i]).argmax()] > 0
    np.testing.assert_allclose(proj, centred @ comps.T, atol=1e-9)
    # projections are uncorrelated and their variances are the top eigenvalues
    cov = np.cov(proj.T)
    np.testing.assert_allclose(np.diag(cov), evals[::-1][:3], rtol=1e-8)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 1e-8


def test_pca_rgb_shape_range_and_tiny_width():
    rng = np.random.default_rng(1)
    rgb = pca_rgb(rng.normal(size=(3, 16, 8)), (4, 4))
    assert rgb.shape == (3, 4, 4, 3)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    # each channel is min-max scaled over all images: 0 and 1 are reached
    np.testing.assert_allclose(rgb.reshape(-1, 3).min(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(rgb.reshape(-1, 3).max(0), 1.0, atol=1e-12)
    # 2-d tokens have only 2 components: the third channel is a constant grey
    rgb2 = pca_rgb(rng.normal(size=(1, 4, 2)), (2, 2))
    assert np.all(rgb2[..., 2] == 0.5)
    with pytest.raises(ValueError, match="grid"):
        pca_rgb(rng.normal(size=(1, 5, 8)), (2, 2))


def _two_region_image(size=32):
    a = np.zeros((size, size, 3), np.uint8)
    a[:, : size // 2] = (220, 40, 30)
    a[:, size // 2 :] = (30, 60, 210)
    return Image.fromarray(a)


def test_first_component_separates_a_two_region_image():
    torch.manual_seed(0)
    model = create_model("vit-tiny-p4-32")  # random weights: the patch embedding alone differs
    maps = pca_maps(model, [_two_region_image()])
    assert len(maps) == 1
    m = maps[0]
    assert m.shape == (32, 32, 3) and m.dtype == np.uint8
    assert m.min() == 0 and m.max() == 255  # min-max scaled
    red = m[..., 0].astype(int)  # the first component drives the red channel
    left, right = red[:, :16], red[:, 16:]
    assert left.max() < right.min() or right.max() < left.min(), (left, right)
    # upsample=False: one pixel per 4-px patch, the same values
    small = pca_maps(model, [_two_region_image()], upsample=False)[0]
    assert small.shape == (8, 8, 3)
    np.testing.assert_array_equal(small, m[::4, ::4])


def test_patch_tokens_keep_training_flags_and_accept_tensors():
    torch.manual_seed(0)
    model = create_model("vit-test-p14").train()
    x = torch.randn(2, 3, 56, 56)
    tokens, grid = patch_tokens(model, x)
    assert grid == (4, 4) and tokens.shape == (2, 16, 32)
    assert model.training  # restored
    with torch.no_grad():
        ref = model.eval().forward_features(x)["x_norm_patchtokens"].numpy()
    np.testing.assert_allclose(tokens, ref, atol=1e-6)
    with pytest.raises(ValueError, match="float"):
        patch_tokens(model, torch.zeros(1, 3, 56, 56, dtype=torch.uint8))


def test_foreground_threshold_blacks_out_the_background():
    rng = np.random.default_rng(0)
    h = w = 6
    border = np.zeros((h, w), bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    d = 8
    bg, fg1, fg2 = np.zeros(d), np.zeros(d), np.zeros(d)
    bg[0], fg1[0], fg2[0] = -10.0, 10.0, 10.0  # the first component: background vs foreground
    fg1[1], fg2[1] = 3.0, -3.0  # inside the foreground two parts
    tok = np.empty((2, h, w, d))
    tok[:, border] = bg
    inner = np.argwhere(~border)
    for r, c in inner:
        tok[:, r, c] = fg1 if c < w // 2 else fg2
    tok += rng.normal(scale=0.05, size=tok.shape)
    rgb = pca_rgb(tok.reshape(2, h * w, d), (h, w), foreground_threshold=0.5)
    assert np.all(rgb[:, border] == 0.0)  # background black
    inside = rgb[:, ~border]
    assert np.all(inside.max(axis=-1) > 0)  # every foreground patch coloured
    # the foreground PCA separates the two parts on its first component (red)
    left = rgb[:, 1:-1, 1 : w // 2, 0]
    right = rgb[:, 1:-1, w // 2 : -1, 0]
    assert left.max() < right.min() or right.max() < left.min()
    # the same when the raw first component has the opposite sign (orientation by the borders)
    rgb_neg = pca_rgb(-tok.reshape(2, h * w, d), (h, w), foreground_threshold=0.5)
    assert np.all(rgb_neg[:, border] == 0.0)
    with pytest.raises(ValueError, match="foreground_threshold"):
        pca_rgb(tok.reshape(2, h * w, d), (h, w), foreground_threshold=2.0)


# --------------------------------------------------------------------------------------- report
def test_line_chart_is_valid_svg_with_points_in_order():
    svg = line_chart(
        {"loss": [(0, 3.0), (10, 1.0), (20, 2.0)], "other": [(5, 0.5)]},
        title="t & <x>",
        ylabel="loss",
    )
    root = ET.fromstring(svg)  # well-formed XML, title escaped
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f"{ns}polyline")
    assert len(lines) == 1
    pts = [tuple(map(float, p.split(","))) for p in lines[0].get("points").split()]
    assert len(pts) == 3
    xs, ys = zip(*pts)
    assert xs[0] < xs[1] < xs[2]  # x grows with the step
    # SVG y grows downwards: the largest value (3.0) is highest, the smallest (1.0) lowest
    assert ys[0] < ys[2] < ys[1]
    assert len(root.findall(f"{ns}circle")) == 1  # a one-point series is a dot
    assert "loss" in svg and "other" in svg  # legend
    assert line_chart({"a": [(0, float("nan"))]}) == ""
    assert line_chart({}) == ""


def test_png_data_uri_round_trips_pixels():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    uri = png_data_uri(img)
    assert uri.startswith("data:image/png;base64,")
    back = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    np.testing.assert_array_equal(back, img)
    big = np.asarray(Image.open(io.BytesIO(base64.b64decode(png_data_uri(img, 3).split(",")[1]))))
    np.testing.assert_array_equal(big, img.repeat(3, 0).repeat(3, 1))


def test_training_report_sections_follow_the_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 0, "knn_top1": 0.1, "knn_top5": 0.5},
        {
            "step": 5,
            "loss": 9.0,
            "dino_local_crops_loss": 4.0,
            "ibot_loss": 1.0,
            "lr": 1e-4,
            "images_per_s": 20.0,
        },
        {
            "step": 10,
            "loss": 8.0,
            "dino_local_crops_loss": 3.5,
            "ibot_loss": 0.9,
            "lr": 2e-4,
            "images_per_s": 22.0,
            "knn_top1": 0.3,
            "knn_top5": 0.7,
        },
    ]
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows) + '{"step": 11, "lo')
    got = read_metrics(path)
    assert got == rows  # the torn last line is dropped
    series = loss_series(got)
    assert series["loss"] == [(5.0, 9.0), (10.0, 8.0)]
    assert set(series) == {"loss", "dino_local_crops_loss", "ibot_loss"}
    page = training_report(
        got,
        title="run",
        extra_sections=[("Maps", image_table(["a"], [("image", [np.zeros((2, 2, 3), np.uint8)])]))],
    )
    for heading in ("Loss", "kNN accuracy during training", "Schedule and throughput", "Maps"):
        assert f"<h2>{heading}</h2>" in page
    assert len(re.findall(r"<svg ", page)) == 5  # loss, terms, kNN, lr, throughput
    assert page.count("data:image/png;base64,") == 1
    with_ref = training_report(got, knn_baselines={"raw pixels": 0.2})
    knn_svg = re.search(
        r"<h2>kNN accuracy during training</h2>(<svg .*?</svg>)", with_ref, flags=re.S
    ).group(1)
    ns = "{http://www.w3.org/2000/svg}"
    lines = ET.fromstring(knn_svg).findall(f"{ns}polyline")
    ref = [ln for ln in lines if ln.find(f"{ns}title").text == "raw pixels"]
    assert len(ref) == 1 and "raw pixels" in knn_svg
    (x_a, y_a), (x_b, y_b) = (tuple(map(float, p.split(","))) for p in ref[0].get("points").split())
    assert y_a == y_b and x_a < x_b  # flat, across the curve's step range
    no_knn = training_report([{k: v for k, v in r.items() if not k.startswith("knn")} for r in got])
    assert "kNN accuracy" not in no_knn and "<h2>Loss</h2>" in no_knn
