"""Native / chunked / prefixed / MAE / vssl checkpoints, and every promised error message."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import perturb_

import vssl
from vssl.models import checkpoints as ck
from vssl.models.checkpoints import CheckpointError

TINY = dict(depth=2, embed_dim=48, num_heads=3, img_size=56)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return perturb_(vssl.create_model("webssl-dino1b-full2b-224", random_init=True, **TINY)).eval()


def same_outputs(a, b, size=56):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fa, fb = a.forward_features(x), b.forward_features(x)
    for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(fa[k], fb[k], atol=0, rtol=0)


def test_native_round_trip(model, tmp_path):
    path = ck.export_native(model, tmp_path / "m.pth")
    sd = torch.load(path, weights_only=True)
    assert "blocks.1.mlp.w12.weight" in sd and "blocks.0.ls1.gamma" in sd and "mask_token" in sd
    loaded = vssl.create_model("webssl-dino1b-full2b-224", weights=path, **TINY)
    same_outputs(model, loaded)


def test_chunked_keys_as_web_ssl_writes_them(model, tmp_path):
    path = ck.export_native(model, tmp_path / "m.pth", block_chunks=2)
    keys = torch.load(path, weights_only=True).keys()
    # Web-SSL's BlockChunk layout keeps the global block index: blocks.<chunk>.<index>
    assert "blocks.0.0.attn.qkv.weight" in keys and "blocks.1.1.attn.qkv.weight" in keys
    same_outputs(model, vssl.create_model("webssl-dino1b-full2b-224", weights=path, **TINY))


def test_training_checkpoint_teacher_with_heads(model, tmp_path):
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    heads = {
        "dino_head.mlp.0.weight": torch.randn(16, 48),
        "ibot_head.last_layer.weight_g": torch.ones(8, 1),
    }
    torch.save({"teacher": sd | heads}, tmp_path / "teacher_checkpoint.pth")
    c = ck.read_checkpoint(tmp_path / "teacher_checkpoint.pth")
    assert set(c.heads) == set(heads)
    loaded = vssl.create_model(
        "webssl-dino1b-full2b-224", weights=tmp_path / "teacher_checkpoint.pth", **TINY
    )
    same_outputs(model, loaded)


def test_full_training_checkpoint_picks_teacher_or_student(model, tmp_path):
    student = perturb_(
        vssl.create_model("webssl-dino1b-full2b-224", random_init=True, **TINY), seed=5
    )
    wrapped = {f"teacher.backbone.{k}": v for k, v in model.state_dict().items()}
    wrapped |= {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
    wrapped |= {"teacher.dino_head.last_layer.weight": torch.randn(4, 8)}
    torch.save({"model": wrapped, "iteration": 10}, tmp_path / "model_0000010.pth")
    t = vssl.create_model(
        "webssl-dino1b-full2b-224", weights=tmp_path / "model_0000010.pth", **TINY
    )
    same_outputs(model, t)
    s = ck.load_model(tmp_path / "model_0000010.pth", config=t.config, branch="student")
    same_outputs(student.eval(), s)


def test_ddp_module_prefix(model, tmp_path):
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")
    same_outputs(
        model, vssl.create_model("webssl-dino1b-full2b-224", weights=tmp_path / "ddp.pth", **TINY)
    )


def test_timm_mae_pretraining_checkpoint_sets_decoder_aside(tmp_path):
    torch.manual_seed(1)
    mae = perturb_(vssl.create_model("webssl-mae1b-full2b-224", random_init=True, **TINY)).eval()
    sd = dict(mae.state_dict())
    assert "mask_token" not in sd and not any(".ls1." in k for k in sd)  # timm ViT layout
    sd |= {
        "mask_token": torch.zeros(1, 1, 32),
        "decoder_embed.weight": torch.randn(32, 48),
        "decoder_pred.weight": torch.randn(14 * 14 * 3, 32),
    }
    torch.save({"model": sd}, tmp_path / "mae_pretrain.pth")
    loaded = vssl.create_model(
        "webssl-mae1b-full2b-224", weights=tmp_path / "mae_pretrain.pth", **TINY
    )
    same_outputs(mae, loaded)


def test_vssl_safetensors_describes_itself(model, tmp_path):
    path = vssl.save_vssl(model, tmp_path / "m.safetensors")
    loaded = vssl.create_model(path)  # no zoo name needed
    assert loaded.config == model.config
    same_outputs(model, loaded)


def test_native_pth_without_name_infers_zoo_entry(tmp_path):
    model = vssl.create_model("vit-test-p14")
    ck.export_native(model, tmp_path / "m.pth")
    loaded = vssl.create_model(tmp_path / "m.pth")
    assert loaded.config.num_heads == model.config.num_heads
    same_outputs(model, loaded)


def test_loaded_model_is_materialized_in_requested_dtype(model, tmp_path):
    path = ck.export_native(model, tmp_path / "m.pth")
    m = vssl.create_model("webssl-dino1b-full2b-224", weights=path, dtype="bf16", **TINY)
    assert all(not p.is_meta and p.dtype == torch.bfloat16 for p in m.parameters())


# -- errors -------------------------------------------------------------------------------------
def _raises(match, fn, *a, **kw):
    with pytest.raises(CheckpointError) as e:
        fn(*a, **kw)
    assert re.search(match, str(e.value), re.S), str(e.value)
    return str(e.value)


def test_missing_key_is_named(model, tmp_path):
    sd = dict(model.state_dict())
    del sd["blocks.1.norm2.weight"]
    torch.save(sd, tmp_path / "m.pth")
    _raises(
        r"missing keys \(1\): blocks\.1\.norm2\.weight",
        vssl.create_model,
        "webssl-dino1b-full2b-224",
        weights=tmp_path / "m.pth",
        **TINY,
    )


def test_unexpected_key_is_named(model, tmp_path):
    sd = dict(model.state_dict()) | {"blocks.0.extra.weight": torch.zeros(3)}
    torch.save(sd, tmp_path / "m.pth")
    _raises(
        r"unexpected keys \(1\): blocks\.0\.extra\.weight",
        vssl.create_model,
        "webssl-dino1b-full2b-224",
        weights=tmp_path / "m.pth",
        **TINY,
    )


def test_depth_mismatch_suggests_override(model, tmp_path):
    path = ck.export_native(model, tmp_path / "m.pth")
    msg = _raises(
        r"unexpected keys",
        vssl.create_model,
        "webssl-dino1b-full2b-224",
        weights=path,
        **(TINY | {"depth": 1}),
    )
    assert "depth=2" in msg


def test_resolution_mismatch_suggests_img_size(model, tmp_path):
    path = ck.export_native(model, tmp_path / "m.pth")
    msg = _raises(
        r"pos_embed checkpoint \(1, 17, 48\) vs model \(1, 10, 48\)",
        vssl.create_model,
        "webssl-dino1b-full2b-224",
        weights=path,
        **(TINY | {"img_size": 42}),
    )
    assert "img_size=56" in msg


def meta_state_dict(name: str) -> dict:
    """A zoo entry's state dict on the meta device: shapes without memory (the check reads shapes)."""
    with torch.device("meta"):
        return vssl.VisionTransformer(vssl.get_config(name)).state_dict()


def test_wrong_zoo_entry_names_the_fitting_one(tmp_path):
    """Web-DINO ViT-L weights into the DINOv2 ViT-L config: ffn and LayerScale differ."""
    sd = meta_state_dict("webssl-dino300m-full2b-224")
    msg = _raises(
        r"shape mismatches|missing keys",
        ck.build_loaded,
        vssl.get_config("dinov2-vitl14"),
        sd,
        "w.pth",
    )
    assert "webssl-dino300m-full2b-224" in msg
    assert "ffn='swiglu'" in msg and "img_size=224" in msg


def test_registers_missing_suggests_override(tmp_path):
    sd = meta_state_dict("dinov2-vits14-reg")
    msg = _raises(
        r"unexpected keys \(1\): register_tokens",
        ck.build_loaded,
        vssl.get_config("dinov2-vits14"),
        sd,
        "w.pth",
    )
    assert "num_register_tokens=4" in msg and "dinov2-vits14-reg" in msg


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth").write_text("hello, not a checkpoint")
    _raises(
        r"notes\.pth is not a checkpoint: it is a text file",
        vssl.create_model,
        "vit-test-p14",
        weights=tmp_path / "notes.pth",
    )


def test_not_a_checkpoint_names_what_the_file_is(tmp_path):
    """Issue 16: `vssl info fake.jpg` said `...: 101`; now the file's real kind is named."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.pth", format="PNG")
    (tmp_path / "page.safetensors").write_text("<html><body>404</body></html>")
    _raises(
        r"photo\.jpg is not a checkpoint: it is a JPEG image",
        ck.read_checkpoint,
        tmp_path / "photo.jpg",
    )
    _raises(r"it is a PNG image", ck.read_checkpoint, tmp_path / "photo.pth")
    _raises(r"it is a text file \(HTML", ck.read_checkpoint, tmp_path / "page.safetensors")


def test_safetensors_content_under_a_pth_name_is_read(model, tmp_path):
    ck.save_vssl(model, tmp_path / "m.safetensors")
    (tmp_path / "m.pth").write_bytes((tmp_path / "m.safetensors").read_bytes())
    same_outputs(model, vssl.create_model(tmp_path / "m.pth"))


def test_missing_path_is_not_an_unknown_model(tmp_path):
    _raises(r"/missing\.pth does not exist", vssl.create_model, "/missing.pth")
    _raises(r"does not exist", vssl.create_model, str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown model"):
        vssl.create_model("dinov2-vitx14")


def _damage(path, offset_frac=0.5):
    """Overwrite 8 bytes inside a file's data with 0xff (NaN in float32), same size."""
    data = bytearray(path.read_bytes())
    at = int(len(data) * offset_frac) // 4 * 4
    data[at : at + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def test_non_finite_weights_are_refused_naming_the_tensors(model, tmp_path):
    """Issue 16: 8 bytes overwritten inside a .safetensors loaded silently and embedded NaN."""
    path = ck.save_vssl(model, tmp_path / "m.safetensors")
    _damage(path)
    ck_ok = ck.read_checkpoint(path, check_weights=False)  # `vssl info` still reads it
    bad = ck.nonfinite_tensors(ck_ok.state_dict)
    assert bad and all(n >= 1 for n, _ in bad.values())
    name = sorted(bad)[0]
    _raises(rf"NaN/Inf values: .*{re.escape(name)}", vssl.create_model, path)
    _raises(r"NaN/Inf", vssl.create_model, "webssl-dino1b-full2b-224", weights=path, **TINY)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["blocks.1.attn.proj.weight"][0, 0] = float("inf")
    torch.save(sd, tmp_path / "inf.pth")
    _raises(
        r"blocks\.1\.attn\.proj\.weight \(1 of 2,304 values\)",
        vssl.create_model,
        "webssl-dino1b-full2b-224",
        weights=tmp_path / "inf.pth",
        **TINY,
    )


def test_fp16_overflow_on_load_is_refused(model, tmp_path):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["norm.weight"][0] = 1e6  # finite in fp32, Inf in fp16
    torch.save(sd, tmp_path / "big.pth")
    vssl.create_model("webssl-dino1b-full2b-224", weights=tmp_path / "big.pth", **TINY)  # fp32
    _raises(
        r"after conversion to fp16",
        vssl.create_model,
        "webssl-dino1b-full2b-224",
        weights=tmp_path / "big.pth",
        dtype="fp16",
        **TINY,
    )


def _fake_run(tmp_path, model=None):
    run = tmp_path / "run"
    step = run / "ckpt" / "step_00000042"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"not read")
    (run / "config.yaml").write_text("method: {name: dinov2}\n")
    if model is not None:
        ck.save_vssl(model, run / "backbone.safetensors")
    return run, step


def test_run_folder_reads_as_its_encoder_and_says_so(model, tmp_path):
    run, step = _fake_run(tmp_path, model)
    assert ck.describe_source(run) == f"run folder {run}: using its encoder backbone.safetensors"
    same_outputs(model, vssl.create_model(run))
    # a step folder is a training checkpoint: pointed to the run's exported encoder
    _raises(r"training checkpoint.*backbone\.safetensors", vssl.create_model, step)


def test_step_folder_of_an_unfinished_run(tmp_path):
    run, step = _fake_run(tmp_path)
    _raises(r"has no exported encoder.*resume the run", ck.read_checkpoint, step)
    _raises(r"run folder without an exported encoder", ck.read_checkpoint, run)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    _raises(r"empty \(0 bytes\)", vssl.create_model, "vit-test-p14", weights=tmp_path / "empty.pth")
    _raises(r"does not exist", vssl.create_model, "vit-test-p14", weights=tmp_path / "nope.pth")


def test_truncated_checkpoint(model, tmp_path):
    path = ck.export_native(model, tmp_path / "m.pth")
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    _raises(
        r"cannot read .*cut\.pth",
        vssl.create_model,
        "webssl-dino1b-full2b-224",
        weights=tmp_path / "cut.pth",
        **TINY,
    )


def test_pickled_objects_are_refused(tmp_path):
    import argparse  # any non-allow-listed global: what an untrusted pickle would smuggle in

    torch.save(
        {"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "evil.pth"
    )
    _raises(r"weights_only=True", vssl.create_model, "vit-test-p14", weights=tmp_path / "evil.pth")


def test_transformers_dir_problems(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    _raises(r"without config\.json", vssl.create_model, d)
    (d / "config.json").write_text('{"model_type": "dinov2", "hidden_size": 8}')
    _raises(r"no weights", vssl.create_model, d)
    (d / "model.safetensors").write_bytes(b"\x00" * 4)
    _raises(r"cannot read .*model\.safetensors as safetensors", vssl.create_model, d)
    (d / "config.json").write_text('{"model_type": "clip"}')
    _raises(r"model_type 'clip' is not supported", vssl.create_model, d)


def test_checkpoint_without_tensors_asks_for_key(tmp_path):
    torch.save({"epoch": 3, "args": {"lr": 0.1}}, tmp_path / "meta.pth")
    _raises(
        r"no tensors.*checkpoint_key",
        vssl.create_model,
        "vit-test-p14",
        weights=tmp_path / "meta.pth",
    )


def test_unmatched_pth_without_name_asks_for_one(tmp_path):
    model = vssl.create_model("vit-test-p14", depth=3)
    ck.export_native(model, tmp_path / "m.pth")
    _raises(r"match no zoo entry.*create_model\(", vssl.create_model, tmp_path / "m.pth")


def test_zoo_model_without_weights_needs_random_init():
    with pytest.raises(ValueError, match="random_init=True"):
        vssl.create_model("dinov2-vits14")
    with pytest.raises(ValueError, match="Did you mean dinov2-vits14"):
        vssl.create_model("dinov2-vits4")


def test_bad_override_names_allowed_keys():
    with pytest.raises(ValueError, match=r"unknown ViT config keys \['dept'\].*'depth'"):
        vssl.create_model("vit-test-p14", dept=3)
