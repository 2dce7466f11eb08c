"""vssl against transformers: same tokens from the same weights, in both directions."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import perturb_  # noqa: E402

import vssl  # noqa: E402

TOL = 1e-4


def _dinov2(**kw):
    cfg = transformers.Dinov2Config(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        image_size=56,
        patch_size=14,
        layerscale_value=0.5,
        **kw,
    )
    return transformers.Dinov2Model(cfg)


def _dinov2_reg(**kw):
    cfg = transformers.Dinov2WithRegistersConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        image_size=56,
        patch_size=14,
        num_register_tokens=4,
        **kw,
    )
    return transformers.Dinov2WithRegistersModel(cfg)


def _vit(**kw):
    cfg = transformers.ViTConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=192,
        image_size=64,
        patch_size=16,
        layer_norm_eps=1e-6,
        **kw,
    )
    return transformers.ViTModel(cfg, add_pooling_layer=False)


HF_CASES = {
    "dinov2-mlp": lambda: _dinov2(),
    "dinov2-swiglu": lambda: _dinov2(use_swiglu_ffn=True),
    "dinov2-registers-mlp": lambda: _dinov2_reg(),
    "dinov2-registers-swiglu": lambda: _dinov2_reg(use_swiglu_ffn=True),
    "vit-mae-encoder": lambda: _vit(),
}


def hf_tokens(hf_model, x):
    kw = {"interpolate_pos_encoding": True} if isinstance(hf_model, transformers.ViTModel) else {}
    with torch.no_grad():
        return hf_model(pixel_values=x, **kw).last_hidden_state


def assert_same_tokens(hf_model, model, x):
    ref = hf_tokens(hf_model, x)
    with torch.no_grad():
        out = model.forward_features(x)
    r = model.num_register_tokens
    torch.testing.assert_close(out["x_norm_clstoken"], ref[:, 0], atol=TOL, rtol=0)
    torch.testing.assert_close(out["x_norm_regtokens"], ref[:, 1 : 1 + r], atol=TOL, rtol=0)
    torch.testing.assert_close(out["x_norm_patchtokens"], ref[:, 1 + r :], atol=TOL, rtol=0)


def sizes(model):
    native = model.config.img_size
    p = model.config.patch_size
    return [(native, native), (5 * p, 7 * p)]  # native, and a non-square non-native grid


@pytest.fixture(params=sorted(HF_CASES))
def hf_dir(request, tmp_path):
    torch.manual_seed(0)
    hf_model = perturb_(HF_CASES[request.param]()).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    return hf_model, tmp_path / "hf"


def test_transformers_directory_loads_with_same_outputs(hf_dir):
    hf_model, path = hf_dir
    model = vssl.create_model(path)  # no zoo name: the directory's config.json describes it
    assert model.config.depth == 2 and model.config.embed_dim == 48
    for h, w in sizes(model):
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        assert_same_tokens(hf_model, model, x)


def test_export_hf_loads_in_transformers_with_same_outputs(hf_dir, tmp_path):
    hf_model, path = hf_dir
    model = vssl.create_model(path)
    out = vssl.export_hf(model, tmp_path / "exported")
    reloaded = type(hf_model).from_pretrained(out).eval()
    for h, w in sizes(model):
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h + w))
        torch.testing.assert_close(hf_tokens(reloaded, x), hf_tokens(hf_model, x), atol=TOL, rtol=0)
        assert_same_tokens(reloaded, model, x)


@pytest.mark.parametrize("name", ["dinov2-vits14-reg", "vit-test-p14"])
def test_vssl_model_exports_to_transformers(name, tmp_path):
    """A vssl-built model (not one that came from transformers) survives export_hf."""
    torch.manual_seed(1)
    over = dict(depth=2, embed_dim=48, num_heads=3, img_size=56)
    model = perturb_(vssl.create_model(name, random_init=True, **over)).eval()
    out = vssl.export_hf(model, tmp_path / "hf")
    cls = (
        transformers.Dinov2WithRegistersModel
        if model.num_register_tokens
        else transformers.Dinov2Model
    )
    hf_model = cls.from_pretrained(out).eval()
    x = torch.randn(2, 3, 56, 56)
    assert_same_tokens(hf_model, model, x)


def test_mae_zoo_model_exports_to_vitmodel(tmp_path):
    torch.manual_seed(2)
    model = perturb_(
        vssl.create_model(
            "webssl-mae300m-full2b-224",
            random_init=True,
            depth=2,
            embed_dim=64,
            num_heads=4,
            img_size=64,
        )
    ).eval()
    out = vssl.export_hf(model, tmp_path / "hf")
    hf_model = transformers.ViTModel.from_pretrained(out, add_pooling_layer=False).eval()
    for h, w in sizes(model):
        assert_same_tokens(hf_model, model, torch.randn(1, 3, h, w))


def test_pytorch_model_bin_directory(tmp_path):
    torch.manual_seed(3)
    hf_model = perturb_(_dinov2(use_swiglu_ffn=True)).eval()
    hf_model.save_pretrained(
        tmp_path / "bin", safe_serialization=False
    ) if _accepts_safe_flag() else _save_bin(hf_model, tmp_path / "bin")
    model = vssl.create_model(tmp_path / "bin")
    assert_same_tokens(hf_model, model, torch.randn(1, 3, 56, 56))


def _accepts_safe_flag() -> bool:
    import inspect

    return (
        "safe_serialization"
        in inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters
    )


def _save_bin(hf_model, path):
    """transformers 5 writes safetensors only; write the legacy layout the way 4.x did."""
    import json

    path.mkdir(parents=True)
    hf_model.save_pretrained(path)
    from safetensors.torch import load_file

    sd = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(sd, path / "pytorch_model.bin")
    json.loads((path / "config.json").read_text())  # config stays as written


def test_zoo_name_with_transformers_weights_uses_their_interpolation(tmp_path):
    """A zoo config + HF weights interpolates like transformers, not like the native code."""
    torch.manual_seed(4)
    hf_model = perturb_(_dinov2()).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    model = vssl.create_model(
        "dinov2-vits14",
        weights=tmp_path / "hf",
        depth=2,
        embed_dim=48,
        num_heads=3,
        img_size=56,
        layerscale=0.5,
    )
    assert model.config.interpolate_offset == 0.0
    assert_same_tokens(hf_model, model, torch.randn(1, 3, 70, 98))


def test_bf16_load_matches_fp32_closely(hf_dir):
    hf_model, path = hf_dir
    m32 = vssl.create_model(path)
    m16 = vssl.create_model(path, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    x = torch.randn(2, 3, m32.config.img_size, m32.config.img_size)
    with torch.no_grad():
        a = m32.forward_features(x)["x_norm_clstoken"]
        b = m16.forward_features(x.bfloat16())["x_norm_clstoken"].float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.99, cos


def test_model_without_layerscale_survives_a_transformers_round_trip(tmp_path, capsys):
    """Issue 16: transformers' Dinov2 always has LayerScale, so a model without it is exported with
    gammas of ones and read back without LayerScale: same architecture, parameter count and zoo
    match, same outputs in transformers and after the round trip."""
    from vssl.cli import main
    from vssl.models import checkpoints as ck

    torch.manual_seed(5)
    model = perturb_(vssl.create_model("vit-tiny-p8-32", depth=2)).eval()
    assert model.config.layerscale is None
    n = sum(p.numel() for p in model.parameters())
    out = vssl.export_hf(model, tmp_path / "hf")
    hf_model = transformers.Dinov2Model.from_pretrained(out).eval()
    assert_same_tokens(hf_model, model, torch.randn(2, 3, 32, 32))

    back = vssl.create_model(out)
    assert back.config.layerscale is None
    assert sum(p.numel() for p in back.parameters()) == n
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            back.forward_features(x)["x_norm_clstoken"],
            model.forward_features(x)["x_norm_clstoken"],
            atol=0,
            rtol=0,
        )

    # the CLI round trip, native -> hf -> native: the zoo match is kept
    full = perturb_(vssl.create_model("vit-tiny-p8-32")).eval()
    ck.export_native(full, tmp_path / "m.pth")
    assert main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf2"), str(tmp_path / "m2.pth"), "--to", "native"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m2.pth")]) == 0
    info = capsys.readouterr().out
    assert "layerscale=False" in info and "vit-tiny-p8-32" in info, info
    assert f"{sum(p.numel() for p in full.parameters()):,} parameters" in info


def test_transformers_dinov2_with_exact_unit_layerscale_reads_as_none(tmp_path):
    """A Dinov2Model from elsewhere (no vssl marker) whose gammas are all exactly 1.0 is a model
    without LayerScale; one with trained gammas keeps its LayerScale."""
    torch.manual_seed(6)
    hf_model = transformers.Dinov2Model(
        transformers.Dinov2Config(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=56,
            patch_size=14,
            layerscale_value=1.0,
        )
    ).eval()
    hf_model.save_pretrained(tmp_path / "ones")
    model = vssl.create_model(tmp_path / "ones")
    assert model.config.layerscale is None
    assert_same_tokens(hf_model, model, torch.randn(1, 3, 56, 56))

    perturb_(hf_model).save_pretrained(tmp_path / "trained")
    model = vssl.create_model(tmp_path / "trained")
    assert model.config.layerscale == 1.0
    assert_same_tokens(hf_model, model, torch.randn(1, 3, 56, 56))
