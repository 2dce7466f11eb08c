"""Forward semantics of the ViT: DINOv2's output dict, masks, intermediate layers, interpolation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_

import vssl
from vssl.models.vit import VisionTransformer


@pytest.fixture
def model():
    torch.manual_seed(0)
    return perturb_(
        vssl.create_model(
            "dinov2-vits14-reg", random_init=True, depth=3, embed_dim=48, num_heads=3, img_size=56
        )
    ).eval()


def test_forward_features_dict(model):
    out = model.forward_features(torch.randn(2, 3, 56, 84))
    assert out["x_norm_clstoken"].shape == (2, 48)
    assert out["x_norm_regtokens"].shape == (2, 4, 48)
    assert out["x_norm_patchtokens"].shape == (2, 4 * 6, 48)
    assert out["x_prenorm"].shape == (2, 1 + 4 + 24, 48)
    assert out["masks"] is None
    torch.testing.assert_close(model.norm(out["x_prenorm"])[:, 0], out["x_norm_clstoken"])
    torch.testing.assert_close(
        model(torch.zeros(1, 3, 56, 56)),
        model.forward_features(torch.zeros(1, 3, 56, 56))["x_norm_clstoken"],
    )


def test_masked_patches_ignore_their_pixels(model):
    x = torch.randn(1, 3, 56, 56)
    y = x.clone()
    y[..., :14, :14] = torch.randn(3, 14, 14)  # change only patch 0
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, 0] = True
    with torch.no_grad():
        a = model.forward_features(x, masks=masks)
        b = model.forward_features(y, masks=masks)
        c = model.forward_features(y)
    torch.testing.assert_close(a["x_prenorm"], b["x_prenorm"])
    assert not torch.allclose(a["x_prenorm"], c["x_prenorm"])
    assert a["masks"] is masks


def test_intermediate_layers_dinov2_semantics(model):
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        full = model.forward_features(x)
        (last,) = model.get_intermediate_layers(x, 1)
        torch.testing.assert_close(last, full["x_norm_patchtokens"])
        outs = model.get_intermediate_layers(x, 2, reshape=True, return_class_token=True)
        assert len(outs) == 2
        patches, cls = outs[-1]
        assert patches.shape == (2, 48, 4, 5) and cls.shape == (2, 48)
        torch.testing.assert_close(cls, full["x_norm_clstoken"])
        (raw,) = model.get_intermediate_layers(x, [2], norm=False)
        torch.testing.assert_close(raw, full["x_prenorm"][:, 5:])
        # block indices: [0] equals running one block by hand
        (first,) = model.get_intermediate_layers(x, [0], norm=False)
        t = model.blocks[0](model.prepare_tokens_with_masks(x))
        torch.testing.assert_close(first, t[:, 5:])
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, [3])


def naive_attention(attn, x):
    B, N, C = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    w = (q @ k.transpose(-2, -1) / math.sqrt(C // h)).softmax(-1)
    return attn.proj((w @ v).transpose(1, 2).reshape(B, N, C))


def test_sdpa_attention_matches_textbook_formula(model):
    x = torch.randn(2, 21, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            model.blocks[0].attn(x), naive_attention(model.blocks[0].attn, x), atol=1e-5, rtol=1e-5
        )


def dinov2_reference_pos(pos_embed, h0, w0, offset, antialias):
    """DINOv2's interpolate_pos_encoding, restated from the upstream source."""
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    kw = {"scale_factor": ((h0 + offset) / m, (w0 + offset) / m)} if offset else {"size": (h0, w0)}
    grid = F.interpolate(
        pos_embed[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=antialias,
        **kw,
    )
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)), dim=1)


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True), (0.0, False)])
def test_pos_embed_interpolation_modes(model, offset, antialias):
    model.config.interpolate_offset, model.config.interpolate_antialias = offset, antialias
    for h0, w0 in ((6, 9), (3, 2), (4, 4)):
        got = model.interpolate_pos_encoding(h0 * w0, h0 * 14, w0 * 14, torch.float32)
        if (h0, w0) == (4, 4):  # native grid, square input: used as is
            torch.testing.assert_close(got, model.pos_embed.detach())
        else:
            ref = dinov2_reference_pos(model.pos_embed.detach(), h0, w0, offset, antialias)
            torch.testing.assert_close(got, ref)


def test_offset_mode_differs_from_resize_mode(model):
    model.config.interpolate_offset = 0.1
    a = model.interpolate_pos_encoding(6 * 9, 84, 126, torch.float32)
    model.config.interpolate_offset = 0.0
    b = model.interpolate_pos_encoding(6 * 9, 84, 126, torch.float32)
    assert (a - b).abs().max() > 1e-4


def test_non_square_input_with_native_patch_count_is_resampled(model):
    """DINOv2 and transformers skip resampling only for square inputs: 2x8 patches != 4x4 grid."""
    got = model.interpolate_pos_encoding(16, 2 * 14, 8 * 14, torch.float32)
    ref = dinov2_reference_pos(
        model.pos_embed.detach(),
        2,
        8,
        model.config.interpolate_offset,
        model.config.interpolate_antialias,
    )
    torch.testing.assert_close(got, ref)
    assert model.forward_features(torch.randn(1, 3, 28, 112))["x_norm_patchtokens"].shape == (
        1,
        16,
        48,
    )


def test_gradient_checkpointing_same_gradients(model):
    model.train()
    x = torch.randn(2, 3, 56, 56)
    model.forward_features(x)["x_norm_clstoken"].sum().backward()
    g1 = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model.grad_checkpointing = True
    model.forward_features(x)["x_norm_clstoken"].sum().backward()
    g2 = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_drop_path_only_in_training():
    m = vssl.create_model("vit-test-p14", drop_path_rate=0.5)
    assert [round(b.drop_path.p, 3) for b in m.blocks] == [0.0, 0.5]
    x = torch.randn(4, 3, 56, 56)
    torch.testing.assert_close(m(x), m(x))  # eval: deterministic
    m.train()
    torch.manual_seed(0)
    a = m.forward_features(x)["x_prenorm"]
    torch.manual_seed(1)
    b = m.forward_features(x)["x_prenorm"]
    assert not torch.allclose(a, b)


def test_swiglu_hidden_size_rule():
    for d, expected in ((1024, 2736), (1536, 4096), (4096, 10928)):
        assert vssl.ViTConfig(embed_dim=d, num_heads=8, ffn="swiglu").ffn_hidden_dim == expected


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible"):
        vssl.ViTConfig(embed_dim=50, num_heads=3)
    with pytest.raises(ValueError, match="ffn must be"):
        vssl.ViTConfig(ffn="relu")


# ------------------------------------------------------------------------ the convolutional stem
def test_conv_stem_is_xiao_et_al_minimal_stem_against_functional_ops():
    """log2(p) 3x3 stride-2 convs with BatchNorm (batch statistics in training) and ReLU, widths
    doubling up to the ViT width, then a 1x1 conv: computed here op by op."""

    torch.manual_seed(0)
    m = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, stem="conv"
    )
    convs = [c for c in m.patch_embed.stem if isinstance(c, torch.nn.Conv2d)]
    bns = [b for b in m.patch_embed.stem if isinstance(b, torch.nn.BatchNorm2d)]
    assert [tuple(c.weight.shape) for c in convs] == [
        (12, 3, 3, 3),
        (24, 12, 3, 3),
        (48, 24, 3, 3),
        (48, 48, 1, 1),
    ]
    with torch.no_grad():
        for b in bns:  # off their init, so a swapped scale/shift would show
            b.weight.uniform_(0.5, 1.5)
            b.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 3, 32, 32)
    h = x
    for c, b in zip(convs[:3], bns):
        h = F.conv2d(h, c.weight, stride=2, padding=1)
        mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5) * b.weight.view(1, -1, 1, 1) + b.bias.view(
            1, -1, 1, 1
        )
        h = h.clamp(min=0)
    h = F.conv2d(h, convs[3].weight, convs[3].bias)
    expected = h.flatten(2).transpose(1, 2)
    m.train()
    torch.testing.assert_close(m.patch_embed(x), expected, rtol=1e-4, atol=1e-5)
    assert m.forward_features(torch.randn(2, 3, 16, 16))["x_norm_patchtokens"].shape == (2, 4, 48)


def test_conv_stem_round_trips_and_refuses_what_has_no_equivalent(tmp_path):
    from vssl.models.checkpoints import (
        CheckpointError,
        export_hf,
        infer_architecture,
        load_model,
        save_vssl,
    )

    torch.manual_seed(1)
    m = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, stem="conv"
    )
    m.train()
    m(torch.randn(8, 3, 32, 32))  # BatchNorm running statistics move off their init
    m.eval()
    loaded = load_model(save_vssl(m, tmp_path / "m.safetensors")).eval()
    assert loaded.config.stem == "conv"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))
    arch = infer_architecture(m.state_dict())
    assert (arch["stem"], arch["patch_size"], arch["embed_dim"]) == ("conv", 8, 48)
    with pytest.raises(CheckpointError, match="no transformers equivalent"):
        export_hf(m, tmp_path / "hf")
    with pytest.raises(ValueError, match="power of 2"):
        VisionTransformer(
            img_size=36, patch_size=6, embed_dim=48, depth=1, num_heads=3, stem="conv"
        )
