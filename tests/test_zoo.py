"""Every zoo entry: native key set and shapes, and parameter count, against the upstream code."""

from __future__ import annotations

import pytest
import torch

import vssl
from vssl.models.zoo import _ZOO

RELEASED = [n for n in vssl.list_models() if not _ZOO[n].random_init_ok]


def upstream_native_shapes(name: str) -> dict[str, tuple]:
    """Key -> shape of the upstream state dict, written from DINOv2's DinoVisionTransformer and
    timm's VisionTransformer (unchunked names), independently of vssl's module tree."""
    c = vssl.get_config(name)
    d, p, L = c.embed_dim, c.patch_size, c.depth
    n = (c.img_size // p) ** 2
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, n + 1, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    if name.startswith(("webssl-mae", "mae-vit")):
        hidden = 4 * d  # timm Mlp, mlp_ratio 4, no LayerScale, no mask token
    else:
        shapes["mask_token"] = (1, d)
        hidden = 4 * d if c.ffn == "mlp" else (int(4 * d * 2 / 3) + 7) // 8 * 8
    if name.endswith("-reg"):
        shapes["register_tokens"] = (1, 4, d)
    for i in range(L):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (d,),
            b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d),
            b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d),
            b + "attn.proj.bias": (d,),
            b + "norm2.weight": (d,),
            b + "norm2.bias": (d,),
        }
        if c.ffn == "swiglu":
            shapes |= {
                b + "mlp.w12.weight": (2 * hidden, d),
                b + "mlp.w12.bias": (2 * hidden,),
                b + "mlp.w3.weight": (d, hidden),
                b + "mlp.w3.bias": (d,),
            }
        else:
            shapes |= {
                b + "mlp.fc1.weight": (hidden, d),
                b + "mlp.fc1.bias": (hidden,),
                b + "mlp.fc2.weight": (d, hidden),
                b + "mlp.fc2.bias": (d,),
            }
        if not name.startswith(("webssl-mae", "mae-vit")):
            shapes |= {b + "ls1.gamma": (d,), b + "ls2.gamma": (d,)}
    return shapes


@pytest.mark.parametrize("name", RELEASED)
def test_native_key_set_and_shapes(name):
    with torch.device("meta"):
        model = vssl.VisionTransformer(vssl.get_config(name))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == upstream_native_shapes(name)


def transformers_param_count(name: str) -> int:
    """The same architecture built by transformers on the meta device."""
    transformers = pytest.importorskip("transformers")
    c = vssl.get_config(name)
    common = dict(
        hidden_size=c.embed_dim,
        num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads,
        image_size=c.img_size,
        patch_size=c.patch_size,
    )
    with torch.device("meta"):
        if c.family == "mae":
            m = transformers.ViTModel(
                transformers.ViTConfig(intermediate_size=4 * c.embed_dim, **common),
                add_pooling_layer=False,
            )
        elif c.num_register_tokens:
            m = transformers.Dinov2WithRegistersModel(
                transformers.Dinov2WithRegistersConfig(
                    use_swiglu_ffn=c.ffn == "swiglu",
                    num_register_tokens=c.num_register_tokens,
                    **common,
                )
            )
        else:
            m = transformers.Dinov2Model(
                transformers.Dinov2Config(use_swiglu_ffn=c.ffn == "swiglu", **common)
            )
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", RELEASED)
def test_param_count_matches_transformers(name):
    assert vssl.count_params(vssl.get_config(name)) == transformers_param_count(name)


# Published sizes (DINOv2 paper Table; Web-SSL model names) as coarse sanity bounds, in millions.
PUBLISHED = {
    "dinov2-vits14": (21, 23),
    "dinov2-vitb14": (85, 88),
    "dinov2-vitl14": (300, 306),
    "dinov2-vitg14": (1100, 1150),
    "webssl-dino300m-full2b-224": (290, 320),
    "webssl-dino1b-full2b-224": (1100, 1150),
    "webssl-dino2b-full2b-224": (2000, 2200),
    "webssl-dino3b-full2b-224": (2850, 3100),
    "webssl-dino5b-full2b-224": (4800, 5100),
    "webssl-dino7b-full8b-518": (6300, 7100),
    "webssl-mae700m-full2b-224": (600, 700),
    "webssl-mae3b-full2b-224": (2850, 3100),
    "mae-vit-b16": (85, 87),
    "mae-vit-l16": (300, 306),
    "mae-vit-h14": (625, 640),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_near_published_size(name):
    lo, hi = PUBLISHED[name]
    assert lo * 1e6 <= vssl.count_params(vssl.get_config(name)) <= hi * 1e6


def test_7b_positions_per_resolution():
    for res, n in ((224, 257), (378, 730), (518, 1370)):
        with torch.device("meta"):
            m = vssl.VisionTransformer(vssl.get_config(f"webssl-dino7b-full8b-{res}"))
        assert m.pos_embed.shape[1] == n


def test_seed_list_is_complete():
    expected = {f"webssl-dino{s}-full2b-224" for s in ("300m", "1b", "2b", "3b", "5b")}
    expected |= {f"webssl-dino{s}-{k}2b-224" for s in ("2b", "3b") for k in ("light", "heavy")}
    expected |= {f"webssl-dino7b-full8b-{r}" for r in (224, 378, 518)}
    expected |= {f"webssl-mae{s}-full2b-224" for s in ("300m", "700m", "1b", "2b", "3b")}
    expected |= {f"dinov2-vit{a}14{r}" for a in "sblg" for r in ("", "-reg")}
    assert expected <= set(vssl.list_models())
    assert any(_ZOO[n].random_init_ok for n in vssl.list_models())  # small CPU sizes


def test_list_models_filters():
    assert vssl.list_models("webssl-mae*") == sorted(n for n in _ZOO if n.startswith("webssl-mae"))
    assert "dinov2-vitg14-reg" in vssl.list_models("reg")
