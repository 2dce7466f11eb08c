"""Pretraining recipes: every shipped config loads, overrides, and errors that say what to change."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pytest

from vssl.models.zoo import count_params, get_config
from vssl.train.config import (
    ConfigError,
    find_recipe,
    load_recipe,
    parse_overrides,
    recipe_to_yaml,
    save_recipe,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.stem for p in CONFIGS}
    expected = {
        "cpu_tiny32",
        "dinov2_vits14",
        "dinov2_vitb14",
        "dinov2_vitl14",
        "webdino_vitl14",
        "webdino_1b",
        "webdino_2b",
        "webdino_3b",
        "webdino_5b",
        "webdino_7b",
    }
    assert expected <= names, expected - names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_validates(path, tmp_path):
    r = load_recipe(path)
    arch = get_config(r.model.name, **r.model.arch)  # a zoo model with valid overrides
    # iBOT masks live on the global crop's patch grid: the crop must be a multiple of the patch
    assert r.data.global_size % arch.patch_size == 0
    if r.data.n_local:  # multi-crop recipes; a single view (MAE) uses the global crop only
        assert r.data.local_size % arch.patch_size == 0
    assert r.data.train is None  # the user gives the data
    # what is written into a run folder loads back to the same recipe
    save_recipe(r, tmp_path / "config.yaml")
    again = load_recipe(tmp_path / "config.yaml")
    assert again.to_dict() == r.to_dict()


@pytest.mark.parametrize(
    "name",
    [
        "webdino_vitl14",
        "webdino_1b",
        "webdino_2b",
        "webdino_3b",
        "webdino_5b",
        "webdino_7b",
        "dinov2_vitl14",
    ],
)
def test_large_recipes_use_dinov2_large_model_settings(name):
    # DINOv2's vitl14.yaml / vitg14.yaml: the L/g recipe
    r = load_recipe(name)
    t, m = r.train, r.method
    assert (t.base_lr, t.layer_decay, m.momentum_teacher) == (2e-4, 1.0, 0.994)
    assert (t.weight_decay, t.weight_decay_end) == (0.04, 0.2)
    assert (m.n_prototypes, m.bottleneck_dim, m.ibot_separate_head) == (131072, 384, True)
    assert m.centering == "sinkhorn_knopp"
    assert r.model.arch["drop_path_rate"] == 0.4
    if name.startswith("webdino"):
        # the Web-SSL sizes that exist in the zoo, at 224 px, ~2B images seen (7B: 8B)
        seen = t.epochs * t.iters_per_epoch * t.batch_size_per_rank * _ranks(name)
        assert r.model.name.startswith("webssl-dino") and r.data.global_size == 224
        target = 8e9 if name == "webdino_7b" else 2e9
        assert abs(seen - target) / target < 0.05


def _ranks(name: str) -> int:
    # the rank counts the recipes' comments assume (3072 images per step)
    return 3072 // load_recipe(name).train.batch_size_per_rank


def test_small_recipes_use_dinov2_defaults():
    for name in ("dinov2_vits14", "dinov2_vitb14"):
        t, m = load_recipe(name).train, load_recipe(name).method
        assert (t.base_lr, t.layer_decay, m.momentum_teacher, t.weight_decay_end) == (
            4e-3,
            0.9,
            0.992,
            0.4,
        )
        assert (t.epochs, t.iters_per_epoch, t.warmup_epochs) == (100, 1250, 10)


def test_overrides_parse_yaml_scalars():
    items = parse_overrides(
        [
            "train.epochs=10",
            "train.base_lr=2e-4",
            "train.compile=true",
            "model.weights=null",
            "data.global_scale=[0.4, 1.0]",
            "data.train=shards/{000000..000099}.tar",
            "data.train={0..9}.tar",
        ]
    )
    values = [(s, k, v) for s, k, v, _ in items]
    assert values[:5] == [
        ("train", "epochs", 10),
        ("train", "base_lr", "2e-4"),
        ("train", "compile", True),
        ("model", "weights", None),
        ("data", "global_scale", [0.4, 1.0]),
    ]
    assert values[5][2] == "shards/{000000..000099}.tar"
    assert values[6][2] == "{0..9}.tar"  # not YAML: kept as the text


def test_overrides_apply_with_types():
    r = load_recipe(
        "cpu_tiny32",
        [
            "train.epochs=3",
            "train.base_lr=2e-4",
            "model.depth=2",
            "data.global_scale=[0.4,1]",
            "train.output_dir=2024",
            "method.centering=centering",
            "data.train=a/{0..9}.tar",
        ],
    )
    assert r.train.epochs == 3 and isinstance(r.train.epochs, int)
    assert r.train.base_lr == pytest.approx(2e-4) and isinstance(r.train.base_lr, float)
    assert r.model.arch == {"drop_path_rate": 0.0, "depth": 2}
    assert r.data.global_scale == (0.4, 1.0)
    assert r.train.output_dir == "2024"  # a string field keeps the text
    assert r.method.centering == "ema"  # DINOv2's spelling of EMA centering
    assert r.data.train == "a/{0..9}.tar"
    # untouched values come from the file
    assert r.method.n_prototypes == 1024 and r.data.n_local == 4


@pytest.mark.parametrize(
    "override, must_contain",
    [
        (
            "train.epoch=3",
            [
                "'train.epoch'",
                "Did you mean 'train.epochs'",
                "epochs",
                "base_lr",
                "batch_size_per_rank",
            ],
        ),
        ("model.depht=2", ["'model.depht'", "'model.depth'", "drop_path_rate", "weights"]),
        ("method.n_protoypes=8", ["'method.n_protoypes'", "'method.n_prototypes'", "centering"]),
        ("data.n_locals=2", ["'data.n_locals'", "'data.n_local'", "global_size"]),
    ],
)
def test_bad_key_names_it_suggests_and_lists_allowed(override, must_contain):
    with pytest.raises(ConfigError) as e:
        load_recipe("cpu_tiny32", [override])
    msg = str(e.value)
    for text in must_contain:
        assert text in msg, (text, msg)


@pytest.mark.parametrize(
    "override, must_contain",
    [
        ("train.epochs=ten", ["train.epochs", "'ten'", "integer"]),
        ("train.base_lr=fast", ["train.base_lr", "'fast'", "number"]),
        ("train.compile=maybe", ["train.compile", "'maybe'", "true or false"]),
        ("data.global_scale=[1,2,3]", ["data.global_scale", "list of 2 numbers"]),
        ("train.precision=fp16", ["train.precision", "'fp16'", "auto", "fp32", "bf16"]),
        ("train.strategy=zero3", ["train.strategy", "'zero3'", "ddp", "fsdp2", "none"]),
        (
            "method.centering=batchnorm",
            ["method.centering", "'batchnorm'", "ema", "sinkhorn_knopp"],
        ),
        ("method.name=maee", ["method.name", "'maee'", "Did you mean 'mae'", "dinov2, mae"]),
        ("method.name=mae", ["method.n_prototypes", "keys of method 'mae'", "mask_ratio"]),
        ("model.ffn=relu", ["model.ffn", "'relu'", "mlp", "swiglu"]),
        ("train.clip_grad=-1", ["clip_grad", "-1", "> 0"]),
    ],
)
def test_bad_value_names_key_value_and_what_is_expected(override, must_contain):
    with pytest.raises(ConfigError) as e:
        load_recipe("cpu_tiny32", [override])
    msg = str(e.value)
    for text in must_contain:
        assert text in msg, (text, msg)


def test_bad_sections_and_syntax(tmp_path):
    with pytest.raises(ConfigError, match="'modle.name'.*did you mean 'model.name'"):
        load_recipe(None, ["modle.name=x"])
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        load_recipe(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="sections are flat"):
        load_recipe(None, ["train.a.b=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: vit-tiny-p4-32\ntrian:\n  epochs: 3\n")
    with pytest.raises(
        ConfigError, match=r"unknown section 'trian'.*Did you mean 'train'.*Allowed"
    ):
        load_recipe(bad)
    bad.write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match="section 'model'.*mapping"):
        load_recipe(bad)
    bad.write_text("model: {name: x\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="eval.train and eval.test"):
        load_recipe("cpu_tiny32", ["eval.train=somewhere"])


def test_find_recipe_by_name_and_close_match():
    assert find_recipe("cpu_tiny32").name == "cpu_tiny32.yaml"
    assert find_recipe("cpu_tiny32.yaml").name == "cpu_tiny32.yaml"
    with pytest.raises(FileNotFoundError, match="cpu_tiny32"):
        find_recipe("cpu_tiny")


def test_resolved_yaml_is_readable_and_complete():
    text = recipe_to_yaml(load_recipe("webdino_vitl14"))
    assert text.splitlines()[0].startswith("# resolved by vssl from")
    for section in ("model:", "data:", "method:", "train:", "eval:"):
        assert f"\n{section}\n" in text
    assert "  global_scale: [0.32, 1.0]" in text
    assert "  name: dinov2" in text


# ---------------------------------------------------------------------------------- dry run
def _pretrain_args(argv):
    from vssl.pretrain import add_pretrain_parser

    parser = argparse.ArgumentParser(prog="vssl")
    add_pretrain_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_dry_run_counts_parameters_and_prints_the_schedule(capsys):
    args = _pretrain_args(["pretrain", "webdino_vitl14", "--dry-run", "--world-size", "256"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    counts = {
        k: int(v.replace(",", ""))
        for k, v in re.findall(r"^  (student\.\w+|trainable|teacher)\D*?([\d,]+)$", out, re.M)
    }
    backbone = count_params(get_config("webssl-dino300m-full2b-224"))
    assert counts["student.backbone"] == backbone
    # DINOHead: 3-layer MLP d->2048->2048->bottleneck (with biases) + weight-normed prototypes
    d, h = 1024, 2048

    def head(b, k):
        return d * h + h + h * h + h + h * b + b + k * b + k

    assert counts["student.dino_head"] == head(384, 131072)
    assert counts["student.ibot_head"] == head(256, 131072)
    trainable = backbone + head(384, 131072) + head(256, 131072)
    assert counts["trainable"] == trainable and counts["teacher"] == trainable
    # lr peak: base_lr * sqrt(12 per rank * 256 ranks / 1024); warm-up 80 epochs x 1250 steps
    peak = 2e-4 * math.sqrt(12 * 256 / 1024)
    assert f"0 -> {peak:.3g} at step 100,000" in out
    assert "625,000 steps = 500 epochs x 1,250 iterations; 3,072 images/step" in out
    assert "teacher temp 0.04 -> 0.07 over 37,500 steps" in out
    assert "prototypes frozen for the first 1,250 steps" in out


def test_missing_data_is_a_clear_error(tmp_path):
    from vssl.pretrain import run_pretrain

    r = load_recipe(
        "cpu_tiny32",
        [
            "model.depth=1",
            "model.embed_dim=32",
            "model.num_heads=2",
            "method.n_prototypes=16",
            "method.hidden_dim=16",
            "method.bottleneck_dim=8",
            f"train.output_dir={tmp_path}/run",
        ],
    )
    with pytest.raises(ValueError, match=r"data.train is not set.*data.train=/path/to/images"):
        run_pretrain(r)
    r.data.train = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"data.train: .*nope does not exist"):
        run_pretrain(r)
    r.data.train = str(tmp_path / "shards-{000..002}.tar")
    with pytest.raises(FileNotFoundError, match=r"3 shard\(s\) .* do not exist"):
        run_pretrain(r)


def test_pretrain_under_torchrun_fsdp2_exits_0_and_exports_the_full_encoder(
    shared_data, tmp_path, torchrun_pretrain
):
    import subprocess

    from vssl.models.zoo import create_model

    images = sorted((shared_data / "cifar10-subset" / "train" / "airplane").glob("*.jpg"))[:16]
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    run = tmp_path / "run"
    cmd = [
        *torchrun_pretrain,
        "cpu_tiny32",
        f"data.train={listing}",
        "train.max_steps=1",
        "train.batch_size_per_rank=4",
        f"train.output_dir={run}",
        "train.strategy=fsdp2",
        "model.embed_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        "method.n_prototypes=16",
        "method.hidden_dim=16",
        "method.bottleneck_dim=8",
        "data.num_workers=0",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("stopped: max_steps at step 1") == 1  # rank 0 reports, once
    assert (run / "ckpt" / "step_00000001").is_dir()
    # gathered from the shards: full shapes, loads as a model by itself
    model = create_model(run / "backbone.safetensors")
    assert model.config.embed_dim == 32 and model.config.depth == 1
