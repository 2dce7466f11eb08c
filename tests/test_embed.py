"""`vssl embed` end to end: outputs line up row by row, bad files are skipped and listed, exit codes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import vssl
from vssl.assets import sample_images_dir
from vssl.cli import main
from vssl.data import EvalTransform, open_image
from vssl.embed import embed_images, list_inputs

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PHOTOS = SHARED_DATA / "imagenet-samples"
RES = 56  # vit-test-p14: 4x4 patches of 14 px, width 32


def _photos_dir() -> Path:
    if not PHOTOS.is_dir():
        pytest.skip(f"../shared/data not found: {PHOTOS} is missing (real photos for embed tests)")
    return PHOTOS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny ViT and the same weights saved as a self-describing checkpoint for the CLI."""
    torch.manual_seed(0)
    # LayerScale 1.0, not the zoo's 1e-5: with near-zero residual branches a random CLS token
    # barely depends on the image, and rows of different images would agree to ~1e-5.
    model = vssl.create_model("vit-test-p14", random_init=True, img_size=RES, layerscale=1.0)
    ckpt = vssl.save_vssl(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
    return model, ckpt


def _forward(model, path: Path, patch: bool = False) -> np.ndarray:
    """The reference: decode + transform + forward_features for one image, outside the pipeline."""
    t = EvalTransform(RES)
    x = t(open_image(path, draft_size=t.draft_size))[None]
    with torch.inference_mode():
        out = model.forward_features(x)
    key = "x_norm_patchtokens" if patch else "x_norm_clstoken"
    return out[key][0].numpy()


def _manifest(out: Path) -> dict:
    return pq.read_table(out / "manifest.parquet").to_pydict()


def _errors(out: Path) -> list[dict]:
    lines = (out / "errors.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _jpeg(path: Path, color=(200, 30, 30), size=(80, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    img.paste((20, 20, 220), (10, 10, 40, 40))
    img.save(path, quality=90)
    return path


def _truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


# ------------------------------------------------------------------------------ real photos
@pytest.fixture(scope="module")
def photo_run(tiny, tmp_path_factory):
    photos = _photos_dir()
    _, ckpt = tiny
    out = tmp_path_factory.mktemp("feats")
    rc = main(
        [
            "embed",
            str(ckpt),
            "--input",
            str(photos),
            "--output",
            str(out),
            "--patch-tokens",
            "--batch-size",
            "32",
            "--no-progress",
        ]
    )
    return rc, out, sorted(p for p in photos.iterdir() if not p.name.startswith("."))


def test_photos_rows_and_manifest(photo_run):
    rc, out, files = photo_run
    assert rc == 0
    emb = np.load(out / "embeddings.npy")
    assert emb.dtype == np.float32 and emb.shape == (len(files), 32)
    assert np.isfinite(emb).all()
    # Different photos give clearly different rows (a pipeline repeating one image would not).
    dist = np.linalg.norm(emb[:, None] - emb[None], axis=-1) + np.eye(len(files)) * 1e9
    assert dist.min() > 0.05
    m = _manifest(out)
    assert m["row"] == list(range(len(files)))
    assert m["path"] == [str(p) for p in files]
    assert m["label"] == [None] * len(files)  # files directly in the input folder
    assert _errors(out) == []
    tokens = np.load(out / "patch_tokens.npy", mmap_mode="r")
    assert tokens.dtype == np.float32 and tokens.shape == (len(files), (RES // 14) ** 2, 32)


def test_photos_match_direct_forward(photo_run, tiny):
    """Rows equal forward_features on the same image computed here, one image at a time."""
    model, _ = tiny
    rc, out, files = photo_run
    assert rc == 0
    emb = np.load(out / "embeddings.npy")
    tokens = np.load(out / "patch_tokens.npy", mmap_mode="r")
    # 0: first row; the flatworm photo (1152x864) decodes through JPEG draft; the last row.
    big = next(i for i, p in enumerate(files) if "flatworm" in p.name)
    for i in (0, big, len(files) - 1):
        ref = _forward(model, files[i])
        np.testing.assert_allclose(emb[i], ref, rtol=0, atol=1e-5, err_msg=files[i].name)
    np.testing.assert_allclose(tokens[big], _forward(model, files[big], patch=True), atol=1e-5)
    # and a neighbouring row is a different image, so the comparison could fail
    assert np.abs(emb[1] - _forward(model, files[0])).max() > 1e-3


# ------------------------------------------------------------------------------ broken files
def _mixed_folder(root: Path) -> tuple[dict, set]:
    """Good images in class subfolders with broken files between them; returns expectations."""
    samples = sorted(sample_images_dir().glob("*.jpg"))
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    shutil.copy(samples[0], root / "cats" / "a.jpg")
    shutil.copy(samples[1], root / "cats" / "b.jpg")
    (root / "cats" / "x1_empty.jpg").write_bytes(b"")
    (root / "cats" / "x2_page.jpg").write_text("<html>not a picture</html>")
    _jpeg(root / "dogs" / "c.jpg")
    _truncated_jpeg(root / "dogs" / "trunc.jpg")
    (root / "notes.txt").write_text("a text file inside an image folder\n")
    _jpeg(root / "root.jpg", color=(10, 160, 10))
    (root / ".DS_Store").write_bytes(b"\x00\x01junk")  # hidden: not an input at all
    _jpeg(root / ".thumbs" / "hidden.jpg")
    good = {
        str(root / "cats" / "a.jpg"): "cats",
        str(root / "cats" / "b.jpg"): "cats",
        str(root / "dogs" / "c.jpg"): "dogs",
        str(root / "root.jpg"): None,
    }
    broken = {
        (str(root / "cats" / "x1_empty.jpg"), "zero bytes"),
        (str(root / "cats" / "x2_page.jpg"), "not an image (cannot identify)"),
        (str(root / "dogs" / "trunc.jpg"), "truncated file"),
        (str(root / "notes.txt"), "not an image (cannot identify)"),
    }
    return good, broken


def test_broken_files_are_skipped_and_listed(tmp_path, capsys):
    good, broken = _mixed_folder(tmp_path / "in")
    out = tmp_path / "out"
    # batch size 2: the batch [x1_empty, x2_page] has no good image at all; 2 workers decode.
    rc = main(
        [
            "embed",
            "vit-test-p14",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(out),
            "--batch-size",
            "2",
            "--num-workers",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert "embedded 4 images, skipped 4" in captured.out
    assert "RANDOM weights" in captured.err  # zoo name without --weights: loud warning
    assert {(e["path"], e["error"]) for e in _errors(out)} == broken
    m = _manifest(out)
    assert dict(zip(m["path"], m["label"])) == good
    assert m["path"] == sorted(good, key=lambda p: Path(p).relative_to(tmp_path / "in").parts)
    assert np.load(out / "embeddings.npy").shape == (4, 32)


def test_library_skips_and_truncates_outputs(tmp_path, tiny):
    """Pre-sized memmaps are cut to the embedded rows; rows still match the direct forward."""
    model, _ = tiny
    good, broken = _mixed_folder(tmp_path / "in")
    inputs = list_inputs(tmp_path / "in")
    res = embed_images(
        model,
        inputs,
        tmp_path / "out",
        batch_size=3,
        num_workers=0,
        patch_tokens=True,
        progress=False,
    )
    assert (res.num_inputs, res.num_embedded, res.num_skipped) == (8, 4, 4)
    assert res.embeddings_shape == (4, 32) and res.patch_tokens_shape == (4, 16, 32)
    emb = np.load(tmp_path / "out" / "embeddings.npy")
    tokens = np.load(tmp_path / "out" / "patch_tokens.npy")
    assert emb.shape == (4, 32) and tokens.shape == (4, 16, 32)
    assert not list((tmp_path / "out").glob("*.partial"))
    paths = _manifest(tmp_path / "out")["path"]
    for i, p in enumerate(paths):
        np.testing.assert_allclose(emb[i], _forward(model, Path(p)), atol=1e-5)
    np.testing.assert_allclose(tokens[3], _forward(model, Path(paths[3]), patch=True), atol=1e-5)
    assert res.images_per_s > 0 and "embedded 4 images, skipped 4" in res.summary()


def test_compiled_forward_same_rows_with_ragged_last_batch(tmp_path, tiny):
    """--compile pads the last batch (no recompilation) and must drop the padding rows."""
    model, _ = tiny
    inputs = list_inputs(sample_images_dir())[:5]  # batch 3: a full batch and a ragged one
    eager = embed_images(
        model, inputs, tmp_path / "eager", batch_size=3, num_workers=0, progress=False
    )
    comp = embed_images(
        model, inputs, tmp_path / "comp", batch_size=3, num_workers=0, progress=False, compile=True
    )
    assert eager.num_embedded == comp.num_embedded == 5
    np.testing.assert_allclose(
        np.load(tmp_path / "comp" / "embeddings.npy"),
        np.load(tmp_path / "eager" / "embeddings.npy"),
        atol=1e-5,
    )


@pytest.mark.parametrize(("capacity", "rows"), [(1000, 7), (100_000, 99_999), (5, 5), (12, 1)])
def test_row_writer_truncates_in_place(tmp_path, capacity, rows):
    from vssl.embed import _RowWriter

    w = _RowWriter(tmp_path / "x.npy", capacity)
    data = np.arange(rows * 6, dtype=np.float32).reshape(rows, 2, 3)
    for start in range(0, rows, 4):
        w.write(data[start : start + 4])
    assert w.close((2, 3)) == (rows, 2, 3)
    back = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert back.shape == (rows, 2, 3) and np.array_equal(back, data)
    header = (tmp_path / "x.npy").stat().st_size - data.nbytes
    assert header % 64 == 0  # still aligned: the data did not move


def test_bf16_autocast_close_to_fp32(tmp_path, tiny):
    model, _ = tiny
    inputs = [(p, None) for p in sorted(sample_images_dir().glob("*.jpg"))]
    r32 = embed_images(model, inputs, tmp_path / "fp32", num_workers=0, progress=False)
    r16 = embed_images(
        model, inputs, tmp_path / "bf16", num_workers=0, progress=False, dtype="bf16"
    )
    assert r32.num_embedded == r16.num_embedded == len(inputs)
    a = np.load(tmp_path / "fp32" / "embeddings.npy")
    b = np.load(tmp_path / "bf16" / "embeddings.npy")
    assert b.dtype == np.float32
    assert 0 < np.abs(a - b).max() < 0.1  # really ran in bf16, and still the same features
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched


def test_all_broken_folder_fails(tmp_path, capsys):
    src = tmp_path / "broken"
    src.mkdir()
    (src / "empty.jpg").write_bytes(b"")
    _truncated_jpeg(src / "half.jpg")
    rc = main(
        [
            "embed",
            "vit-test-p14",
            "--input",
            str(src),
            "--output",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert f"no image could be embedded from {src}" in err and "Traceback" not in err
    assert len(_errors(tmp_path / "o")) == 2  # the reasons are still written down
    assert np.load(tmp_path / "o" / "embeddings.npy").shape == (0, 32)  # valid, empty


@pytest.mark.parametrize("case", ["empty", "missing"])
def test_no_inputs_fails(tmp_path, capsys, case):
    src = tmp_path / "nothing"
    if case == "empty":
        (src / ".hidden").mkdir(parents=True)  # only hidden content: no inputs
    rc = main(["embed", "vit-test-p14", "--input", str(src), "--output", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(src) in err
    assert ("no input files" if case == "empty" else "input not found") in err


def test_bad_model_fails_cleanly(tmp_path, capsys):
    rc = main(["embed", "vit-test-p41", "--output", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot load model 'vit-test-p41'" in err and "vit-test-p14" in err  # suggestion
    assert "Traceback" not in err
    # A zoo model with released weights needs --weights (or --random-init).
    rc = main(["embed", "dinov2-vits14", "--output", str(tmp_path / "o")])
    assert rc == 2 and "--random-init" in capsys.readouterr().err


def test_resolution_off_patch_grid_fails(tmp_path, capsys):
    rc = main(
        [
            "embed",
            "vit-test-p14",
            "--input",
            str(sample_images_dir()),
            "--output",
            str(tmp_path / "o"),
            "--resolution",
            "60",
            "--no-progress",
        ]
    )
    assert rc == 2
    assert "not a multiple of the patch size 14: use 56 or 70" in capsys.readouterr().err


# ------------------------------------------------------------------------------ list inputs
def test_list_file_input(tmp_path, tiny):
    _, ckpt = tiny
    d = tmp_path / "imgs"
    a = _jpeg(d / "a.jpg")
    b = _jpeg(tmp_path / "elsewhere" / "b.jpg", color=(0, 0, 0))
    lst = d / "list.txt"
    lst.write_text(f"# my images\n\na.jpg\n{b}\tbirds\nmissing.jpg\n  \n")
    entries = list_inputs(lst)
    assert entries == [(a, None), (b, "birds"), (d / "missing.jpg", None)]
    out = tmp_path / "o"
    rc = main(["embed", str(ckpt), "--input", str(lst), "--output", str(out), "--no-progress"])
    assert rc == 0
    m = _manifest(out)
    assert m["path"] == [str(a), str(b)] and m["label"] == [None, "birds"]
    assert _errors(out) == [{"path": str(d / "missing.jpg"), "error": "file not found"}]


def test_list_inputs_folder_order_and_labels(tmp_path):
    root = tmp_path / "data"
    for rel in ["b/2.jpg", "b/1.jpg", "a/deep/x.jpg", "top.jpg", ".hid/y.jpg", "a/.z.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    got = [(str(p.relative_to(root)), label) for p, label in list_inputs(root)]
    assert got == [("a/deep/x.jpg", "a"), ("b/1.jpg", "b"), ("b/2.jpg", "b"), ("top.jpg", None)]
    assert list_inputs(root / "top.jpg") == [(root / "top.jpg", None)]
    with pytest.raises(FileNotFoundError):
        list_inputs(root / "nope")


def test_bundled_samples():
    files = sorted(sample_images_dir().glob("*.jpg"))
    assert len(files) >= 8
    for f in files:
        assert f.stat().st_size < 15_000
        img = open_image(f)
        assert 160 <= img.width <= 256 and 120 <= img.height <= 200


# ------------------------------------------------------------------------------ console script
@pytest.mark.skipif(shutil.which("vssl") is None, reason="the vssl console script is not installed")
def test_console_script_on_bundled_samples(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["vssl", "embed", "vit-test-p14", "--output", str(tmp_path / "o"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    n = len(list(sample_images_dir().glob("*.jpg")))
    assert f"embedded {n} images, skipped 0" in proc.stdout
    assert "bundled sample images" in proc.stderr
    assert np.load(tmp_path / "o" / "embeddings.npy").shape == (n, 32)


def test_help_has_example(capsys):
    with pytest.raises(SystemExit) as info:
        main(["embed", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "vssl embed webssl-dino1b-full2b-224 --weights" in text
    for flag in ("--patch-tokens", "--random-init", "--dtype", "--num-workers", "--no-progress"):
        assert flag in text


# ------------------------------------------------------------------ issue 16: the first hour
def _labeled(tmp_path: Path) -> Path:
    d = tmp_path / "labeled"
    for i, p in enumerate(sorted(sample_images_dir().iterdir())):
        (d / ("a" if i % 2 else "b")).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / ("a" if i % 2 else "b") / p.name)
    return d


def _embed_cli(*argv) -> int:
    return main(["embed", *argv, "--no-progress", "--num-workers", "0"])


def test_random_init_is_seeded_and_recorded(tmp_path, capsys):
    """`--random-init` builds the same network for the same --seed (default 0), another for
    another seed; embed.json records model, seed and a digest of the weights."""
    imgs = _labeled(tmp_path)
    for name, seed in (("s0", []), ("s0b", ["--seed", "0"]), ("s1", ["--seed", "1"])):
        assert (
            _embed_cli(
                "vit-test-p14", "--random-init", "-i", str(imgs), "-o", str(tmp_path / name), *seed
            )
            == 0
        )
    a, b, c = (np.load(tmp_path / n / "embeddings.npy") for n in ("s0", "s0b", "s1"))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    info = json.loads((tmp_path / "s0" / "embed.json").read_text())
    assert info["model"] == "vit-test-p14" and info["seed"] == 0 and info["resolution"] == 56
    assert (
        info["weights_digest"]
        == json.loads((tmp_path / "s0b" / "embed.json").read_text())["weights_digest"]
    )
    assert "--seed 0" in capsys.readouterr().err

    # vssl eval warns when train and test come from different networks, not when they match
    capsys.readouterr()
    knn = ["eval", "knn", "--results", str(tmp_path / "r.jsonl"), "--k", "1"]
    main([*knn, "--train", str(tmp_path / "s0"), "--test", str(tmp_path / "s1")])
    err = capsys.readouterr().err
    assert "WARNING" in err and "different models/weights" in err and "seed 1" in err, err
    main([*knn, "--train", str(tmp_path / "s0"), "--test", str(tmp_path / "s0b")])
    assert "different models" not in capsys.readouterr().err


def test_embed_takes_set_overrides_and_says_its_resolution(tmp_path, capsys):
    """`--set` as in `vssl convert`; a DINOv2 hub model embeds at 224 (its evaluation
    resolution), not its 518 img_size, and says so."""
    out = tmp_path / "o"
    rc = _embed_cli(
        "dinov2-vits14",
        "--random-init",
        "--set",
        "depth=1",
        "--set",
        "layerscale=None",
        "-o",
        str(out),
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "resolution 224 (DINOv2's evaluation resolution; --resolution to change)" in err
    info = json.loads((out / "embed.json").read_text())
    assert info["resolution"] == 224 and info["overrides"] == {"depth": 1, "layerscale": None}
    assert np.load(out / "embeddings.npy").shape == (8, 384)
    assert _embed_cli("vit-test-p14", "--set", "depth", "-o", str(out)) == 2
    assert "not KEY=VALUE" in capsys.readouterr().err


def test_non_finite_features_are_refused(tmp_path, capsys):
    """Issue 16: NaN embeddings were written with exit 0. Now: an error naming the rows, nothing
    written, exit 2."""
    from vssl.embed import NonFiniteFeaturesError

    model = vssl.create_model("vit-test-p14", random_init=True)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    imgs = sorted(sample_images_dir().iterdir())
    with pytest.raises(NonFiniteFeaturesError, match=r"8 of 8 embedded rows hold NaN/Inf"):
        embed_images(model, imgs, tmp_path / "o", num_workers=0, progress=False)
    assert (
        not list((tmp_path / "o").glob("*.npy*")) and not (tmp_path / "o" / "embed.json").exists()
    )

    path = vssl.save_vssl(model, tmp_path / "nan.safetensors")  # refused at load, naming it
    assert _embed_cli(str(path), "-o", str(tmp_path / "o2")) == 2
    assert "norm.weight (1 of 32 values)" in capsys.readouterr().err


def test_embed_run_folder_says_what_it_found(tmp_path, capsys, tiny):
    model, ckpt = tiny
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ckpt, run / "backbone.safetensors")
    assert _embed_cli(str(run), "-o", str(tmp_path / "o")) == 0
    err = capsys.readouterr().err
    assert f"run folder {run}: using its encoder backbone.safetensors" in err
    info = json.loads((tmp_path / "o" / "embed.json").read_text())
    assert info["model"] == str(run) and info["seed"] is None
