"""`vssl finetune`: bad folders, layer decay, position-embedding resampling, exact resume, the best
checkpoint, results, real images and torchrun, all on tiny models."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb_
from PIL import Image

from vssl.cli import main
from vssl.finetune import (
    BEST,
    LAST,
    METRICS,
    Classifier,
    FinetuneConfig,
    evaluate,
    finetune,
    layer_decay_groups,
    load_classifier,
    read_class_folders,
    resize_pos_embed_,
)
from vssl.models.zoo import create_model

COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def _write_split(root: Path, n: int, seed: int, classes=(0, 1, 2), size: int = 28) -> Path:
    """Class k: colour k plus noise (learnable from the mean colour), PNG files."""
    rng = np.random.default_rng(seed)
    for k in classes:
        d = root / f"class{k}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            px = np.clip(np.array(COLORS[k]) + rng.normal(0, 40, (size, size, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture
def folders(tmp_path):
    return _write_split(tmp_path / "train", 8, 0), _write_split(tmp_path / "test", 3, 1)


def _cfg(train, test, out, **kw) -> FinetuneConfig:
    base = dict(
        model="vit-test-p14",
        random_init=True,
        train=str(train),
        test=str(test),
        output=str(out),
        img_size=28,
        epochs=2,
        warmup_epochs=0.5,
        batch_size=4,
        num_workers=0,
        progress=False,
        results="-",
    )
    return FinetuneConfig(**(base | kw))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------------------ bad input
def test_bad_folders_fail_before_training(tmp_path, folders, capsys):
    train, test = folders
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next(train.rglob("*.png")), flat / "a.png")
    with pytest.raises(ValueError, match="no class subfolders .*1 files directly in it"):
        read_class_folders(flat, "--train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders .*it is empty"):
        read_class_folders(tmp_path / "empty", "--train")
    one = _write_split(tmp_path / "one", 2, 0, classes=(1,))
    with pytest.raises(ValueError, match="only one class .*'class1'"):
        read_class_folders(one, "--train")
    with pytest.raises(FileNotFoundError, match="--test .*does not exist"):
        read_class_folders(tmp_path / "nowhere", "--test")
    two = _write_split(tmp_path / "two", 4, 0, classes=(0, 1))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"1 classes that --train .* lacks \('class2'\)"):
        finetune(_cfg(two, test, out))
    assert not out.exists()  # refused before anything was built or written
    # the CLI prints the same as `vssl finetune: error: ...` with exit status 2
    code = main(
        ["finetune", "vit-test-p14", "--random-init", "--train", str(flat)]
        + ["--test", str(test), "--output", str(out)]
    )
    assert code == 2
    assert "vssl finetune: error: --train" in capsys.readouterr().err
    # files beside the class folders are named, not lost silently
    shutil.copy(next(train.rglob("*.png")), train / "stray.png")
    assert len(read_class_folders(train, "--train")) == 24
    assert "1 files directly in the folder" in capsys.readouterr().err


def test_settings_are_checked():
    with pytest.raises(ValueError, match="--layer-decay"):
        _cfg("a", "b", "c", layer_decay=0.0)
    with pytest.raises(ValueError, match="--random-init and --weights"):
        _cfg("a", "b", "c", weights="w.pth")
    with pytest.raises(ValueError, match="--pool"):
        _cfg("a", "b", "c", pool="max")


def test_a_zoo_name_needs_weights_or_random_init(folders, tmp_path):
    train, test = folders
    with pytest.raises(ValueError, match="pass --weights PATH .* or --random-init"):
        finetune(_cfg(train, test, tmp_path / "o", random_init=False))


# ------------------------------------------------------------------------------------ model
def test_layer_decay_multipliers_follow_maes_formula():
    backbone = create_model("vit-test-p14", random_init=True)  # depth 2
    model = Classifier(backbone, 5, "avg")
    decay, depth = 0.65, 2
    groups = layer_decay_groups(model, decay)
    seen = {}
    for g in groups:
        for name in g["names"]:
            seen[name] = (g["lr_multiplier"], g["wd_multiplier"])
    # MAE util/lr_decay.py: num_layers = depth + 1; scale = decay^(num_layers - layer id) with
    # id 0 for the embeddings and tokens, i + 1 for block i, num_layers for the head and fc_norm
    for name, (lr_mult, wd_mult) in seen.items():
        if name.startswith(("backbone.patch_embed", "backbone.pos_embed", "backbone.cls_token")):
            exponent = depth + 1
        elif name.startswith("backbone.blocks."):
            exponent = depth - int(name.split(".")[2])
        else:
            assert name.startswith(("head.", "fc_norm.")), name
            exponent = 0
        assert lr_mult == pytest.approx(decay**exponent), name
        no_wd = name.endswith(("bias", "pos_embed", "cls_token")) or "norm" in name
        no_wd = no_wd or name.endswith("gamma")
        assert wd_mult == (0.0 if no_wd else 1.0), name
    assert "backbone.mask_token" not in seen  # unused in fine-tuning: not trained
    assert "backbone.norm.weight" not in seen  # avg pool: MAE drops the encoder norm for fc_norm
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(seen) == n_trainable
    assert math.isclose(model.head.weight.std().item(), 2e-5, rel_tol=0.3)


def test_heads_pool_as_mae_and_dinov2_do():
    backbone = perturb_(create_model("vit-test-p14", random_init=True))
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = backbone.forward_features(x)
        avg = Classifier(copy.deepcopy(backbone), 3, "avg")
        perturb_(avg.head, seed=1), perturb_(avg.fc_norm, seed=2)  # off their init values
        # MAE's global pool: mean of the patch tokens before the encoder norm, then fc_norm
        pooled = torch.nn.functional.layer_norm(
            ref["x_prenorm"][:, 1:].mean(dim=1),
            (32,),
            avg.fc_norm.weight,
            avg.fc_norm.bias,
            eps=1e-6,
        )
        assert torch.allclose(avg(x), pooled @ avg.head.weight.T + avg.head.bias, atol=1e-5)
        cls = Classifier(copy.deepcopy(backbone), 3, "cls")
        perturb_(cls.head, seed=3)
        expected = ref["x_norm_clstoken"] @ cls.head.weight.T + cls.head.bias
        assert torch.allclose(cls(x), expected, atol=1e-5)


def test_position_embedding_resampled_as_embed_does():
    original = perturb_(create_model("vit-test-p14", random_init=True))  # 56 px, 4x4 grid
    resized = copy.deepcopy(original)
    assert resize_pos_embed_(resized, 28)
    assert resized.pos_embed.shape == (1, 1 + 4, 32) and resized.config.img_size == 28
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():  # `vssl embed` resamples on the fly in every forward: the same tokens
        a = original.forward_features(x)["x_prenorm"]
        b = resized.forward_features(x)["x_prenorm"]
    assert torch.allclose(a, b, atol=1e-6)
    assert not resize_pos_embed_(resized, 28)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14: use 28 or 42"):
        resize_pos_embed_(resized, 30)


# ------------------------------------------------------------------------------------ training
def test_resume_continues_exactly(tmp_path, folders):
    train, test = folders
    # every random part on: RandAugment, Mixup/CutMix, drop path
    kw = dict(epochs=2, drop_path=0.2)
    straight = finetune(_cfg(train, test, tmp_path / "a", **kw))
    part = finetune(_cfg(train, test, tmp_path / "b", **kw), stop_after_epoch=1)
    assert part.epochs_run == 1 and not (tmp_path / "b" / LAST).exists()
    with pytest.raises(ValueError, match="pass --resume"):
        finetune(_cfg(train, test, tmp_path / "b", **kw))
    with pytest.raises(Exception, match="other settings .*layer_decay"):
        finetune(_cfg(train, test, tmp_path / "b", resume=True, **kw, layer_decay=0.5))
    # a crash after epoch 2 was logged but before its checkpoint: the resume drops that line
    with open(tmp_path / "b" / METRICS, "a") as f:
        f.write(json.dumps({"epoch": 2, "test_top1": -1.0}) + "\n")
    resumed = finetune(_cfg(train, test, tmp_path / "b", resume=True, **kw))
    assert resumed.epochs_run == 1
    a, b = _tensors(tmp_path / "a" / LAST), _tensors(tmp_path / "b" / LAST)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows_a = [json.loads(x) for x in (tmp_path / "a" / METRICS).read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "b" / METRICS).read_text().splitlines()]
    volatile = {"seconds", "train_images_per_s"}
    strip = [{k: v for k, v in r.items() if k not in volatile} for r in rows_a]
    assert strip == [{k: v for k, v in r.items() if k not in volatile} for r in rows_b]
    assert (straight.top1, straight.best_top1) == (resumed.top1, resumed.best_top1)


def test_learns_lr_schedule_best_checkpoint_and_results(tmp_path, folders):
    train, test = folders
    results = tmp_path / "results.jsonl"
    cfg = _cfg(
        train,
        test,
        tmp_path / "run",
        epochs=2,
        warmup_epochs=1,
        lr=3e-3,
        min_lr=1e-5,
        mixup=0.0,
        cutmix=0.0,
        randaug_n=0,
        drop_path=0.0,
        results=str(results),
    )
    from vssl.finetune import record_result

    result = finetune(cfg)
    record_result(cfg, result)
    rows = [json.loads(x) for x in (tmp_path / "run" / METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    # colour classes: the loss falls from log(3) (a fresh head) and the test images are separated
    assert (
        rows[0]["train_loss"] < math.log(3) and rows[1]["train_loss"] < rows[0]["train_loss"] - 0.1
    )
    assert result.best_top1 == 1.0, rows
    # lr of each epoch's last step (24 images / 4 = 6 steps per epoch, 6 warm-up steps):
    # MAE's linear warm-up, then a half-cycle cosine from the peak to min_lr
    total, warm = 12, 6
    for r in rows:
        step = r["epoch"] * 6 - 1
        if step < warm:  # MAE's warm-up: lr x step / warm-up steps
            expected = 3e-3 * step / warm
        else:
            t = (step - warm) / (total - warm)
            expected = 1e-5 + 0.5 * (3e-3 - 1e-5) * (1 + math.cos(math.pi * t))
        assert r["lr"] == pytest.approx(expected, rel=1e-9)
    # best.safetensors is the classifier of the best epoch: evaluated again, the same top-1
    model, classes = load_classifier(tmp_path / "run" / BEST)
    assert classes == ["class0", "class1", "class2"]
    from vssl.data.transforms import EvalTransform
    from vssl.finetune import _FolderImages, _loader

    items = read_class_folders(test, "--test")
    data = _FolderImages(items, {c: i for i, c in enumerate(classes)}, EvalTransform(28))
    h1, _, n, _ = evaluate(
        model,
        _loader(data, [list(range(9))], 0),
        torch.device("cpu"),
        torch.autocast("cpu", enabled=False),
    )
    assert h1 / n == result.best_top1
    # the results file, as `vssl eval report` reads it
    from vssl.evaluate.report import to_markdown
    from vssl.evaluate.results import read_results

    lines = read_results([results])
    assert {(r["protocol"], r["metric"]) for r in lines} == {
        ("finetune", "top1"),
        ("finetune", "top5"),
        ("finetune", "best_top1"),
    }
    assert lines[0]["img_size"] == 28 and lines[0]["model"] == "vit-test-p14 (random init)"
    assert "| finetune | test | top1 |" in to_markdown(lines)


def test_cli_on_real_images_from_a_run_folder(tmp_path, shared_data, capsys):
    """A `vssl pretrain`-style run folder (backbone.safetensors) at 32 px, 8-px patches, fine-tuned
    on a few real CIFAR images through the CLI."""
    from vssl.models.checkpoints import save_vssl
    from vssl.models.vit import VisionTransformer, ViTConfig

    src = shared_data / "cifar10-subset"
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("airplane", "cat", "ship"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for f in sorted((src / split / cls).iterdir())[:n]:
                shutil.copy(f, d / f.name)
    run = tmp_path / "run"
    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    save_vssl(VisionTransformer(cfg), run / "backbone.safetensors")
    results = tmp_path / "r.jsonl"
    code = main(
        ["finetune", str(run), "--train", str(tmp_path / "train"), "--test"]
        + [str(tmp_path / "test"), "--epochs", "1", "--batch-size", "6", "--num-workers", "0"]
        + ["--output", str(tmp_path / "out"), "--results", str(results), "--no-progress"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "using its encoder backbone.safetensors" in err
    assert "input 32 px" in err
    assert out.startswith("finetune top-1 ")
    assert len(read_class_folders(tmp_path / "test", "--test")) == 6
    assert {r["metric"] for r in map(json.loads, results.read_text().splitlines())} == {
        "top1",
        "top5",
        "best_top1",
    }


def test_torchrun_two_processes(tmp_path, folders):
    """DDP over gloo: two processes split each global batch and the test set; one result."""
    train, test = folders
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import argparse, sys\nfrom vssl.finetune import add_finetune_parser\n"
        "p = argparse.ArgumentParser(prog='vssl')\nadd_finetune_parser(p.add_subparsers())\n"
        "a = p.parse_args(sys.argv[1:])\nsys.exit(a.func(a))\n"
    )
    results = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(launcher)]
    cmd += ["finetune", "vit-test-p14", "--random-init", "--train", str(train), "--test", str(test)]
    cmd += ["--img-size", "28", "--epochs", "1", "--batch-size", "4", "--num-workers", "0"]
    cmd += ["--output", str(tmp_path / "out"), "--results", str(results), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finetune top-1") == 1  # rank 0 reports
    settings = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert settings["world_size"] == 2 and settings["global_batch"] == 8
    assert settings["iters_per_epoch"] == 3  # 24 images / (4 x 2)
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(rows) == 3
    # the two ranks' test shards add up to the whole test set: one process, the same top-1
    from vssl.data.transforms import EvalTransform
    from vssl.finetune import _FolderImages, _loader

    model, classes = load_classifier(tmp_path / "out" / LAST)
    items = read_class_folders(test, "--test")
    data = _FolderImages(items, {c: i for i, c in enumerate(classes)}, EvalTransform(28))
    h1, _, n, _ = evaluate(
        model,
        _loader(data, [list(range(9))], 0),
        torch.device("cpu"),
        torch.autocast("cpu", enabled=False),
    )
    top1 = next(r["value"] for r in rows if r["metric"] == "top1")
    assert n == 9 and h1 / n == pytest.approx(top1)


def test_hf_folder_and_zoo_name_with_weights(tmp_path, folders):
    """The other ways vssl loads a backbone: a transformers folder, a zoo name with --weights."""
    from vssl.models.checkpoints import export_hf, save_vssl

    train, test = folders
    source = perturb_(create_model("vit-test-p14", random_init=True, seed=3))
    export_hf(source, tmp_path / "hf")
    save_vssl(source, tmp_path / "w.safetensors")
    other = create_model("vit-test-p14", random_init=True, seed=4)  # what a wrong load would give
    runs = {
        "hf": _cfg(train, test, tmp_path / "o1", model=str(tmp_path / "hf"), random_init=False),
        "zoo": _cfg(
            train,
            test,
            tmp_path / "o2",
            weights=str(tmp_path / "w.safetensors"),
            random_init=False,
            pool="cls",
        ),
    }
    for name, cfg in runs.items():
        result = finetune(dataclasses.replace(cfg, epochs=1, batch_size=8))
        assert result.epochs_run == 1 and 0.0 <= result.top1 <= 1.0, name
        trained, _ = load_classifier(tmp_path / ("o1" if name == "hf" else "o2") / LAST)
        # the backbone started from the source's weights: 3 small steps later it is still close
        trained_w = trained.backbone.blocks[0].attn.qkv.weight
        assert (trained_w - source.blocks[0].attn.qkv.weight).abs().max() < 0.01, name
        assert (trained_w - other.blocks[0].attn.qkv.weight).abs().max() > 0.01, name
