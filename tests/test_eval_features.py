"""`vssl embed --layers/--avgpool` and the features layer of `vssl eval`: folders, labels, cache."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import vssl
from vssl.assets import sample_images_dir
from vssl.cli import main
from vssl.data import EvalTransform, open_image
from vssl.embed import embed_images, list_inputs
from vssl.evaluate import features as F
from vssl.evaluate.features import Features, add_feature_args, features_from_args, load_features

RES = 56


@pytest.fixture(scope="module")
def model3():
    """3 blocks, so "the last 2 blocks" is a real choice; LayerScale 1.0 so blocks change tokens."""
    torch.manual_seed(0)
    return vssl.create_model("vit-test-p14", random_init=True, depth=3, layerscale=1.0)


def _batch(paths) -> torch.Tensor:
    t = EvalTransform(RES)
    return torch.stack([t(open_image(p, draft_size=t.draft_size)) for p in paths])


def _reference(model, x: torch.Tensor, last: int):
    """Block by block, by hand: normed CLS of the last ``last`` blocks, normed last patch tokens."""
    with torch.inference_mode():
        tokens = model.prepare_tokens_with_masks(x)
        cls = []
        for blk in model.blocks:
            tokens = blk(tokens)
            cls.append(model.norm(tokens)[:, 0])
        patches = model.norm(tokens)[:, 1:]
    return torch.stack(cls[-last:], dim=1).numpy(), patches.numpy()


# ------------------------------------------------------------------------------ embed --layers
def test_layers_and_avgpool_match_direct_computation(tmp_path, model3):
    inputs = list_inputs(sample_images_dir())[:7]  # batch 3: two full batches and a ragged one
    res = embed_images(
        model3,
        inputs,
        tmp_path / "all",
        batch_size=3,
        num_workers=0,
        progress=False,
        layers=2,
        avgpool=True,
        patch_tokens=True,
    )
    assert res.layers_shape == (7, 2, 32) and res.avgpool_shape == (7, 32)
    assert "layers.npy (7, 2, 32)" in res.summary() and "avgpool.npy (7, 32)" in res.summary()
    layers = np.load(tmp_path / "all" / "layers.npy")
    avgpool = np.load(tmp_path / "all" / "avgpool.npy")
    emb = np.load(tmp_path / "all" / "embeddings.npy")
    tokens = np.load(tmp_path / "all" / "patch_tokens.npy")
    assert layers.dtype == avgpool.dtype == np.float32

    ref_layers, ref_patches = _reference(model3, _batch([p for p, _ in inputs]), last=2)
    np.testing.assert_allclose(layers, ref_layers, atol=1e-5)
    np.testing.assert_allclose(avgpool, ref_patches.mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(tokens, ref_patches, atol=1e-5)
    # oldest first: the last entry is the embedding, the first one is a different block
    np.testing.assert_allclose(layers[:, 1], emb, atol=1e-6)
    assert np.abs(layers[:, 0] - layers[:, 1]).max() > 1e-2

    # Old outputs are unchanged by the one-pass path: same rows as a plain run.
    embed_images(
        model3,
        inputs,
        tmp_path / "plain",
        batch_size=3,
        num_workers=0,
        progress=False,
        patch_tokens=True,
    )
    np.testing.assert_allclose(np.load(tmp_path / "plain" / "embeddings.npy"), emb, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "plain" / "patch_tokens.npy"), tokens, atol=1e-6)


def test_avgpool_without_layers_and_stale_files_removed(tmp_path, model3):
    inputs = list_inputs(sample_images_dir())[:4]
    out = tmp_path / "o"
    embed_images(model3, inputs, out, num_workers=0, progress=False, layers=3)
    assert np.load(out / "layers.npy").shape == (4, 3, 32)
    embed_images(model3, inputs, out, num_workers=0, progress=False, avgpool=True)
    assert not (out / "layers.npy").exists()  # from the earlier run: gone
    _, ref_patches = _reference(model3, _batch([p for p, _ in inputs]), last=1)
    np.testing.assert_allclose(np.load(out / "avgpool.npy"), ref_patches.mean(axis=1), atol=1e-5)
    embed_images(model3, inputs, out, num_workers=0, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "embed.json",
        "embeddings.npy",
        "errors.jsonl",
        "manifest.parquet",
    ]


def test_layers_more_than_depth_is_an_error(tmp_path, model3):
    with pytest.raises(ValueError, match="only 3 blocks"):
        embed_images(
            model3,
            list_inputs(sample_images_dir())[:1],
            tmp_path / "o",
            layers=4,
            num_workers=0,
            progress=False,
        )


def test_compiled_layers_match_eager(tmp_path, model3):
    inputs = list_inputs(sample_images_dir())[:5]  # batch 4: the ragged batch is padded
    kw = dict(batch_size=4, num_workers=0, progress=False, layers=2, avgpool=True)
    embed_images(model3, inputs, tmp_path / "eager", **kw)
    embed_images(model3, inputs, tmp_path / "comp", compile=True, **kw)
    for name in ("embeddings.npy", "layers.npy", "avgpool.npy"):
        a, b = np.load(tmp_path / "eager" / name), np.load(tmp_path / "comp" / name)
        assert a.shape == b.shape and a.shape[0] == 5
        np.testing.assert_allclose(b, a, atol=1e-5, err_msg=name)


def test_cli_layers_avgpool(tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(
        [
            "embed",
            "vit-test-p14",
            "--output",
            str(out),
            "--layers",
            "2",
            "--avgpool",
            "--no-progress",
            "--num-workers",
            "0",
        ]
    )
    assert rc == 0
    n = len(list_inputs(sample_images_dir()))
    assert f"layers.npy ({n}, 2, 32)" in capsys.readouterr().out
    assert np.load(out / "avgpool.npy").shape == (n, 32)
    rc = main(["embed", "vit-test-p14", "--output", str(out), "--layers", "3", "--no-progress"])
    assert rc == 2 and "only 2 blocks: use layers <= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    text = capsys.readouterr().out
    assert "--layers L" in text and "--avgpool" in text and "--layers 4 --avgpool" in text


# ------------------------------------------------------------------------------ load_features
def _write_folder(d: Path, labels, n_extra_layers_rows: int = 0, dim: int = 4) -> np.ndarray:
    """A hand-made embed folder: embeddings, manifest with these labels, layers."""
    d.mkdir(parents=True)
    n = len(labels)
    emb = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    np.save(d / "embeddings.npy", emb)
    np.save(d / "layers.npy", np.zeros((n + n_extra_layers_rows, 3, dim), np.float32))
    pq.write_table(
        pa.table(
            {
                "row": pa.array(range(n), pa.int64()),
                "path": [f"/img/{i}.jpg" for i in range(n)],
                "label": pa.array(labels, pa.string()),
            }
        ),
        d / "manifest.parquet",
    )
    return emb


def test_load_features_labels_and_class_mapping(tmp_path):
    emb = _write_folder(tmp_path / "train", ["dog", "cat", "emu", "cat"])
    tr = load_features(tmp_path / "train")
    assert tr.classes == ["cat", "dog", "emu"]
    assert tr.labels.tolist() == [1, 0, 2, 0] and tr.labels.dtype == np.int64
    assert np.array_equal(tr.cls, emb) and tr.paths[2] == "/img/2.jpg" and len(tr) == 4
    assert tr.layers.shape == (4, 3, 4) and tr.avgpool is None and tr.patch_tokens is None
    assert tr.num_classes == 3 and tr.source == str(tmp_path / "train")

    _write_folder(tmp_path / "test", ["emu", "emu"])  # one class only: indices still the train's
    te = load_features(tmp_path / "test", classes=tr.classes)
    assert te.labels.tolist() == [2, 2] and te.classes == tr.classes
    assert load_features(tmp_path / "test").labels.tolist() == [0, 0]  # alone: its own classes

    _write_folder(tmp_path / "bad", ["emu", "yak"])
    with pytest.raises(ValueError, match="'yak' not among the 3 training classes"):
        load_features(tmp_path / "bad", classes=tr.classes)

    _write_folder(tmp_path / "none", [None, None])
    unl = load_features(tmp_path / "none")
    assert unl.labels is None and unl.classes is None
    with pytest.raises(ValueError, match="have no labels: classification needs"):
        unl.require(labels=True)

    _write_folder(tmp_path / "mixed", ["a", None, "b"])
    with pytest.raises(ValueError, match="1 of 3 images .* have no label"):
        load_features(tmp_path / "mixed")


def test_load_features_errors_say_what_to_do(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="not a `vssl embed` output folder .*--model"):
        load_features(tmp_path / "images")
    with pytest.raises(ValueError, match="not found"):
        load_features(tmp_path / "nope")
    _write_folder(tmp_path / "ragged", ["a", "b"], n_extra_layers_rows=1)
    with pytest.raises(ValueError, match="layers.npy has 3 rows but embeddings.npy has 2"):
        load_features(tmp_path / "ragged")
    _write_folder(tmp_path / "short", ["a", "b", "c"])
    np.save(tmp_path / "short" / "embeddings.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="2 rows but manifest.parquet lists 3"):
        load_features(tmp_path / "short")
    _write_folder(tmp_path / "nomanifest", ["a"])
    (tmp_path / "nomanifest" / "manifest.parquet").unlink()
    with pytest.raises(ValueError, match="no manifest.parquet"):
        load_features(tmp_path / "nomanifest")


def test_require_layers_slices_and_explains(tmp_path):
    _write_folder(tmp_path / "f", ["a", "b"])
    block_index = np.broadcast_to(np.arange(3, dtype=np.float32)[None, :, None], (2, 3, 4))
    np.save(tmp_path / "f" / "layers.npy", block_index)  # the block index as the value
    f = load_features(tmp_path / "f")
    last2 = f.require(layers=2).layers
    assert last2.shape == (2, 2, 4) and last2[0, :, 0].tolist() == [1.0, 2.0]  # oldest first
    with pytest.raises(
        ValueError,
        match="holds the last 3 blocks, 4 are needed: re-run `vssl embed` with --layers 4",
    ):
        f.require(layers=4)
    with pytest.raises(ValueError, match="no avgpool.npy: re-run `vssl embed` with --avgpool"):
        f.require(avgpool=True)
    (tmp_path / "f" / "layers.npy").unlink()
    with pytest.raises(ValueError, match="no layers.npy: re-run `vssl embed` with --layers 4"):
        load_features(tmp_path / "f").require(layers=4)


def test_features_validates_shapes():
    with pytest.raises(ValueError, match="3 paths for 2 feature rows"):
        Features(cls=np.zeros((2, 4), np.float32), paths=["a", "b", "c"])
    with pytest.raises(ValueError, match="avgpool has shape"):
        Features(
            cls=np.zeros((2, 4), np.float32), paths=["a", "b"], avgpool=np.zeros((2, 5), np.float32)
        )


# ------------------------------------------------------------------------------ on the fly + cache
@pytest.fixture
def cifar_lists(shared_data, tmp_path):
    """list files with labels: 3 train and 2 test images for each of 4 classes."""
    root = shared_data / "cifar10-subset"
    out = {}
    for split, per in (("train", 3), ("test", 2)):
        lines = []
        for cls in ("airplane", "bird", "cat", "ship"):
            files = sorted((root / split / cls).glob("*.jpg"))[:per]
            lines += [f"{p}\t{cls}" for p in files]
        path = tmp_path / f"{split}.txt"
        path.write_text("\n".join(lines) + "\n")
        out[split] = path
    return out


def _args(tmp_path, argv):
    p = argparse.ArgumentParser()
    add_feature_args(p)
    return p.parse_args(argv + ["--cache", str(tmp_path / "cache"), "--num-workers", "0"])


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(1)
    model = vssl.create_model("vit-test-p14", random_init=True, layerscale=1.0)
    return model, vssl.save_vssl(model, tmp_path / "tiny.safetensors")


def test_on_the_fly_embedding_is_cached_and_reused(
    tmp_path, cifar_lists, tiny_ckpt, capsys, monkeypatch
):
    model, ckpt = tiny_ckpt
    calls = []

    def counting(*a, **kw):
        calls.append(kw)
        return embed_images(*a, **kw)

    monkeypatch.setattr("vssl.embed.embed_images", counting)
    args = _args(
        tmp_path,
        [
            "--model",
            str(ckpt),
            "--train",
            str(cifar_lists["train"]),
            "--test",
            str(cifar_lists["test"]),
        ],
    )
    train = features_from_args(args, "train")
    assert len(calls) == 1 and "embedding 12 train images" in capsys.readouterr().err
    assert train.classes == ["airplane", "bird", "cat", "ship"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert train.source == str(cifar_lists["train"])
    # the cached rows are the model's features of these images
    direct = embed_images(
        model, list_inputs(cifar_lists["train"]), tmp_path / "direct", num_workers=0, progress=False
    )
    assert direct.num_embedded == 12
    np.testing.assert_allclose(
        train.cls, np.load(tmp_path / "direct" / "embeddings.npy"), atol=1e-6
    )

    test = features_from_args(args, "test", classes=train.classes)
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and len(calls) == 2

    again = features_from_args(args, "train")  # same everything: no embedding
    assert len(calls) == 2 and "re-using cached train features" in capsys.readouterr().err
    np.testing.assert_array_equal(again.cls, train.cls)
    folder = Path(again.features_dir)

    # More outputs: embedded again into the same key folder, which then holds both.
    more = features_from_args(args, "train", layers=2, avgpool=True)
    assert len(calls) == 3 and calls[-1]["layers"] == 2 and calls[-1]["avgpool"]
    assert more.layers.shape == (12, 2, 32) and Path(more.features_dir) == folder
    one = features_from_args(args, "train", layers=1)  # a subset of what is there: re-used
    assert len(calls) == 3 and one.layers.shape == (12, 1, 32)
    np.testing.assert_array_equal(one.layers[:, 0], more.layers[:, 1])
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp left

    # A changed input file changes the key: a new folder, embedded anew.
    first = Path(list_inputs(cifar_lists["train"])[0][0])
    st = first.stat()
    try:
        os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        changed = features_from_args(args, "train")
    finally:
        os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert len(calls) == 4 and Path(changed.features_dir) != folder


def test_features_from_args_errors(tmp_path, cifar_lists, tiny_ckpt):
    _, ckpt = tiny_ckpt
    args = _args(tmp_path, ["--train", str(cifar_lists["train"]), "--test", "x"])
    with pytest.raises(ValueError, match="not a `vssl embed` output folder"):
        features_from_args(args, "train")  # an image list without --model
    feats = tmp_path / "feats"
    embed_images(
        vssl.create_model("vit-test-p14"),
        list_inputs(cifar_lists["test"]),
        feats,
        num_workers=0,
        progress=False,
    )
    args = _args(tmp_path, ["--model", str(ckpt), "--train", str(feats), "--test", "x"])
    with pytest.raises(ValueError, match="is a `vssl embed` output folder; .* drop --model"):
        features_from_args(args, "train")
    args = _args(tmp_path, ["--train", str(feats), "--test", "x"])
    with pytest.raises(ValueError, match="no layers.npy: re-run `vssl embed` with --layers 4"):
        features_from_args(args, "train", layers=4)
    args = _args(tmp_path, ["--train", str(feats), "--test", "x", "--weights", "w.pth"])
    with pytest.raises(ValueError, match="--weights only apply with --model"):
        features_from_args(args, "train")
    args = _args(
        tmp_path, ["--model", "vit-test-p99", "--train", str(cifar_lists["train"]), "--test", "x"]
    )
    with pytest.raises(ValueError, match="cannot load model 'vit-test-p99'"):
        features_from_args(args, "train")


def test_feature_args_share_a_protocols_own_options(monkeypatch, tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=1024)  # e.g. a linear probe's own
    add_feature_args(p)  # must not raise "conflicting option string"
    args = p.parse_args(["--train", "a", "--test", "b"])
    assert args.batch_size == 1024 and args.model is None and args.device == "cpu"
    monkeypatch.setenv("VSSL_CACHE", str(tmp_path / "vc"))
    assert F.default_cache_dir() == tmp_path / "vc" / "features"
    monkeypatch.delenv("VSSL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert F.default_cache_dir() == tmp_path / "xdg" / "vssl" / "features"


def test_provenance_mismatch_compares_networks_not_folders():
    """Issue 16: `vssl eval` warns when train and test features come from different networks
    (embed.json: the weights' digest, else model + weights + seed); folders without embed.json
    (older embeds) are not compared."""
    from vssl.evaluate.features import provenance_mismatch

    def f(**prov):
        return Features(cls=np.zeros((1, 2), np.float32), paths=["x"], source="s", provenance=prov)

    a = f(model="m", seed=0, weights_digest="aa", resolution=224)
    assert provenance_mismatch(a, f(model="m", seed=0, weights_digest="aa", resolution=224)) is None
    why = provenance_mismatch(a, f(model="m", seed=1, weights_digest="bb", resolution=224))
    assert "different models/weights" in why and "seed 1" in why
    assert "resolutions" in provenance_mismatch(
        a, f(model="m", weights_digest="aa", resolution=518)
    )
    assert "different models" in provenance_mismatch(f(model="m", seed=0), f(model="m", seed=1))
    old = Features(cls=np.zeros((1, 2), np.float32), paths=["x"])
    assert provenance_mismatch(a, old) is None
