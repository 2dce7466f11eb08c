"""The `vssl` command: models table, convert in every direction, info, and its error path."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_

import vssl
from vssl.cli import main, parse_overrides


def test_models_table_lists_every_model_with_exact_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in vssl.list_models():
        assert name in out
    row = next(line for line in out.splitlines() if line.startswith("dinov2-vitg14 "))
    assert "1,136,480,768" in row and "swiglu" in row and " 518 " in row


def test_models_filter_and_no_match(capsys):
    assert main(["models", "webssl-mae*"]) == 0
    out = capsys.readouterr().out
    assert "webssl-mae700m-full2b-224" in out and "dinov2" not in out
    assert main(["models", "nothing-like-this"]) == 2


@pytest.fixture
def native_ckpt(tmp_path):
    torch.manual_seed(0)
    model = perturb_(
        vssl.create_model(
            "dinov2-vits14", random_init=True, depth=2, embed_dim=48, num_heads=3, img_size=56
        )
    ).eval()
    return model, vssl.export_native(model, tmp_path / "m.pth")


def _same(a, b):
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(
            a.forward_features(x)["x_norm_patchtokens"],
            b.forward_features(x)["x_norm_patchtokens"],
            atol=1e-5,
            rtol=0,
        )


def test_convert_native_to_hf_to_native(native_ckpt, tmp_path, capsys):
    model, pth = native_ckpt
    sets = [
        "--set",
        "depth=2",
        "--set",
        "embed_dim=48",
        "--set",
        "num_heads=3",
        "--set",
        "img_size=56",
    ]
    assert (
        main(
            [
                "convert",
                str(pth),
                str(tmp_path / "hf"),
                "--model",
                "dinov2-vits14",
                "--to",
                "hf",
                *sets,
            ]
        )
        == 0
    )
    assert (tmp_path / "hf" / "config.json").is_file()
    assert (
        main(
            [
                "convert",
                str(tmp_path / "hf"),
                str(tmp_path / "back.pth"),
                "--to",
                "native",
                "--block-chunks",
                "2",
            ]
        )
        == 0
    )
    assert "blocks.1.1.norm1.weight" in torch.load(tmp_path / "back.pth", weights_only=True)
    back = vssl.create_model(
        "dinov2-vits14",
        weights=tmp_path / "back.pth",
        depth=2,
        embed_dim=48,
        num_heads=3,
        img_size=56,
    )
    _same(model, back)
    transformers = pytest.importorskip("transformers")
    _same(model, _HFWrap(transformers.Dinov2Model.from_pretrained(tmp_path / "hf").eval()))


class _HFWrap:
    def __init__(self, hf):
        self.hf = hf

    def forward_features(self, x):
        return {"x_norm_patchtokens": self.hf(pixel_values=x).last_hidden_state[:, 1:]}


def test_convert_to_vssl_and_bf16(native_ckpt, tmp_path, capsys):
    model, pth = native_ckpt
    sets = [
        "--set",
        "depth=2",
        "--set",
        "embed_dim=48",
        "--set",
        "num_heads=3",
        "--set",
        "img_size=56",
    ]
    out = tmp_path / "m.safetensors"
    assert (
        main(
            [
                "convert",
                str(pth),
                str(out),
                "--model",
                "dinov2-vits14",
                "--to",
                "vssl",
                "--dtype",
                "bf16",
                *sets,
            ]
        )
        == 0
    )
    assert "torch.bfloat16" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("cls_token").dtype == torch.bfloat16
    # like transformers' from_pretrained, loading gives fp32 unless a dtype is asked for
    assert next(vssl.create_model(out).parameters()).dtype == torch.float32
    assert next(vssl.create_model(out, dtype="bf16").parameters()).dtype == torch.bfloat16


def test_convert_error_is_a_message_not_a_traceback(native_ckpt, tmp_path, capsys):
    _, pth = native_ckpt
    assert (
        main(["convert", str(pth), str(tmp_path / "x"), "--model", "dinov2-vits14", "--to", "hf"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("vssl convert: error:") and "overrides that would fit" in err
    assert "Traceback" not in err


def test_info_describes_a_training_checkpoint(native_ckpt, tmp_path, capsys):
    model, _ = native_ckpt
    sd = {f"teacher.backbone.{k}": v for k, v in model.state_dict().items()}
    sd["teacher.dino_head.last_layer.weight"] = torch.zeros(4, 8)
    torch.save({"model": sd}, tmp_path / "train.pth")
    assert main(["info", str(tmp_path / "train.pth")]) == 0
    out = capsys.readouterr().out
    assert "format:      native" in out and "depth=2" in out and "dino_head" in out


def test_parse_overrides():
    assert parse_overrides(["depth=2", "ffn=swiglu", "layerscale=None", "mlp_ratio=2.5"]) == {
        "depth": 2,
        "ffn": "swiglu",
        "layerscale": None,
        "mlp_ratio": 2.5,
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["depth"])


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "embed" in capsys.readouterr().out


def test_pretrain_and_quickstart_are_subcommands(capsys):
    # the shipped 7B recipe, described on the meta device: nothing is allocated or trained
    assert main(["pretrain", "webdino_7b", "--dry-run", "--world-size", "512"]) == 0
    out = capsys.readouterr().out
    assert "webssl-dino7b-full8b-224" in out and "3,072 images/step" in out
    # a misspelt key is a message naming it (exit 2), not a traceback
    assert main(["pretrain", "cpu_tiny32", "train.epoch=3", "--dry-run"]) == 2
    assert "train.epoch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["quickstart", "--help"])
    assert e.value.code == 0 and "--minutes" in capsys.readouterr().out


# ------------------------------------------------------------------ issue 16: rough edges
def test_info_and_convert_name_the_real_problem(tmp_path, capsys):
    """`vssl info fake.jpg` said `...: 101`, `convert /missing.pth` "unknown model"; torch's
    "re-run with weights_only=False" advice never reaches the user."""
    import argparse

    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "fake.jpg")
    (tmp_path / "notes.pth").write_text("just text\n")
    torch.save({"w": torch.zeros(1), "ns": argparse.Namespace(a=1)}, tmp_path / "evil.pth")
    assert main(["info", str(tmp_path / "fake.jpg")]) == 2
    assert "fake.jpg is not a checkpoint: it is a JPEG image" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "notes.pth")]) == 2
    assert "it is a text file" in capsys.readouterr().err
    missing = str(tmp_path / "missing.pth")
    assert main(["convert", missing, str(tmp_path / "o"), "--to", "vssl"]) == 2
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err and "unknown model" not in err
    assert main(["info", str(tmp_path / "evil.pth")]) == 2
    err = capsys.readouterr().err
    assert "refusing to unpickle" in err and "argparse.Namespace" in err
    assert "weights_only=False" not in err and "Re-running" not in err


def test_info_reports_damaged_weights_and_run_folders(native_ckpt, tmp_path, capsys):
    model, _ = native_ckpt
    run = tmp_path / "run"
    vssl.save_vssl(model, run / "backbone.safetensors")
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"run folder {run}: using its encoder backbone.safetensors" in out
    assert "values:      all finite" in out

    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["blocks.0.attn.qkv.weight"][3, :2] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    assert main(["info", str(tmp_path / "nan.pth")]) == 1
    captured = capsys.readouterr()
    assert "DAMAGED:     1 tensor(s) hold NaN/Inf values: blocks.0.attn.qkv.weight (2 of" in (
        captured.out
    )
    assert (
        main(
            [
                "convert",
                str(tmp_path / "nan.pth"),
                str(tmp_path / "x.safetensors"),
                "--to",
                "vssl",
                "--model",
                "dinov2-vits14",
                "--set",
                "depth=2",
                "--set",
                "embed_dim=48",
                "--set",
                "num_heads=3",
                "--set",
                "img_size=56",
            ]
        )
        == 2
    )
    assert "blocks.0.attn.qkv.weight (2 of" in capsys.readouterr().err

    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    captured = capsys.readouterr()
    assert "run folder" in captured.err and "wrote" in captured.out


def test_closed_pipe_exits_quietly():
    """`vssl models | head -1`: no BrokenPipeError traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "vssl", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # like `head` exiting before vssl has written (it is still importing)
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
