"""The model zoo: named ViT configs and the look-ups on them (no model building, no checkpoint I/O).

Both ``zoo`` (``create_model``) and ``checkpoints`` (matching a file's shapes to zoo entries) read
this registry; it imports neither of them.

Configs are transcribed from the upstream constructors: Web-SSL ``dinov2/vision_transformer.py``
(``webssl_dino*``: SwiGLU, LayerScale 1e-5, block_chunks=4) and ``mae/mae.py`` (timm
``vit_large_patch16_224.mae`` with other sizes: GELU MLP, no LayerScale, no mask token), and DINOv2
``hub/backbones.py`` (img_size 518, LayerScale 1.0; ``-reg``: 4 registers, antialiased resize with
no offset).
"""

from __future__ import annotations

from dataclasses import dataclass

from .vit import ViTConfig

__all__ = [
    "ZOO",
    "ZooEntry",
    "get_config",
    "get_entry",
    "is_zoo_name",
    "list_models",
    "register_model",
]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    config: ViTConfig
    description: str
    random_init_ok: bool = False  # small CPU/test models: no released weights to ask for


# Every named config, by name. Read it through list_models / get_entry / is_zoo_name.
ZOO: dict[str, ZooEntry] = {}


def register_model(name: str, config: ViTConfig, description: str, random_init_ok: bool = False):
    """Add a named config to the zoo; a name can be registered once."""
    if name in ZOO:
        raise ValueError(f"model {name!r} is already registered")
    ZOO[name] = ZooEntry(name, config, description, random_init_ok)


def _webdino(dim, depth, heads, img_size=224):
    return ViTConfig(
        img_size=img_size,
        patch_size=14,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        ffn="swiglu",
        layerscale=1e-5,
        interpolate_offset=0.1,
        family="dinov2",
    )


def _webmae(patch, dim, depth, heads):
    return ViTConfig(
        img_size=224,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        ffn="mlp",
        layerscale=None,
        mask_token=False,
        interpolate_offset=0.0,
        interpolate_antialias=False,
        family="mae",
    )


def _dinov2_hub(dim, depth, heads, ffn="mlp", reg=False):
    return ViTConfig(
        img_size=518,
        patch_size=14,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        ffn=ffn,
        layerscale=1.0,
        num_register_tokens=4 if reg else 0,
        interpolate_offset=0.0 if reg else 0.1,
        interpolate_antialias=reg,
        family="dinov2",
    )


for _size, (_d, _l, _h) in {
    "300m": (1024, 24, 16),
    "1b": (1536, 40, 24),
    "2b": (2688, 24, 21),
    "3b": (3072, 26, 24),
    "5b": (3584, 32, 28),
}.items():
    _data = ("full", "light", "heavy") if _size in ("2b", "3b") else ("full",)
    for _kind in _data:
        register_model(
            f"webssl-dino{_size}-{_kind}2b-224",
            _webdino(_d, _l, _h),
            f"Web-DINO ViT-{_size.upper()} on MC-2B ({_kind})",
        )
for _res in (224, 378, 518):
    register_model(
        f"webssl-dino7b-full8b-{_res}",
        _webdino(4096, 32, 32, _res),
        f"Web-DINO ViT-7B, 8B images, {_res}px",
    )
for _size, (_p, _d, _l, _h) in {
    "300m": (16, 1024, 24, 16),
    "700m": (14, 1280, 32, 16),
    "1b": (14, 1536, 40, 24),
    "2b": (14, 2688, 24, 21),
    "3b": (14, 3072, 26, 24),
}.items():
    register_model(
        f"webssl-mae{_size}-full2b-224",
        _webmae(_p, _d, _l, _h),
        f"Web-MAE ViT-{_size.upper()} encoder on MC-2B",
    )
# MAE's own encoders (He et al. 2021, models_mae.py presets; the timm-style layout of Web-MAE).
for _name, (_p, _d, _l, _h) in {
    "b16": (16, 768, 12, 12),
    "l16": (16, 1024, 24, 16),
    "h14": (14, 1280, 32, 16),
}.items():
    register_model(
        f"mae-vit-{_name}",
        _webmae(_p, _d, _l, _h),
        f"MAE ViT-{_name[0].upper()}/{_name[1:]} encoder (ImageNet-1k)",
    )
for _arch, (_d, _l, _h, _ffn) in {
    "s": (384, 12, 6, "mlp"),
    "b": (768, 12, 12, "mlp"),
    "l": (1024, 24, 16, "mlp"),
    "g": (1536, 40, 24, "swiglu"),
}.items():
    register_model(
        f"dinov2-vit{_arch}14", _dinov2_hub(_d, _l, _h, _ffn), f"DINOv2 ViT-{_arch.upper()}/14"
    )
    register_model(
        f"dinov2-vit{_arch}14-reg",
        _dinov2_hub(_d, _l, _h, _ffn, reg=True),
        f"DINOv2 ViT-{_arch.upper()}/14 with 4 registers",
    )

# Small architectures for CPU pretraining and tests (no released weights; random init allowed).
register_model(
    "vit-test-p14",
    ViTConfig(
        img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2, ffn="mlp", layerscale=1e-5
    ),
    "tiny ViT for tests (2 blocks, width 32)",
    random_init_ok=True,
)
register_model(
    "vit-tiny-p16",
    ViTConfig(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, layerscale=1e-5),
    "ViT-Ti/16 (DeiT-tiny size), for CPU work",
    random_init_ok=True,
)
register_model(
    "vit-small-p16",
    ViTConfig(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, layerscale=1e-5),
    "ViT-S/16, for CPU/GPU pretraining from scratch",
    random_init_ok=True,
)
register_model(
    "vit-tiny-p4-32",
    ViTConfig(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, layerscale=1e-5),
    "ViT for 32-px images (CIFAR): 8x8 patches, 6 blocks",
    random_init_ok=True,
)
register_model(
    "vit-tiny-p8-32",
    ViTConfig(img_size=32, patch_size=8, embed_dim=192, depth=6, num_heads=3, layerscale=None),
    "ViT for 32-px images on a CPU budget: 4x4 patches (4x fewer tokens), no LayerScale",
    random_init_ok=True,
)


def list_models(pattern: str | None = None) -> list[str]:
    """Zoo names, optionally filtered by a substring or a glob pattern (``"webssl-dino*"``)."""
    import fnmatch

    names = sorted(ZOO)
    if pattern:
        if any(c in pattern for c in "*?["):
            names = [n for n in names if fnmatch.fnmatch(n, pattern)]
        else:
            names = [n for n in names if pattern in n]
    return names


def is_zoo_name(name: str) -> bool:
    """Whether ``name`` is a zoo name (else it may be a checkpoint path)."""
    return name in ZOO


def get_entry(name: str) -> ZooEntry:
    """The zoo entry ``name``; ValueError with close names when there is none."""
    try:
        return ZOO[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, ZOO, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} `vssl models` lists the {len(ZOO)} names; a "
            "checkpoint path (.pth/.safetensors/transformers directory) works too."
        ) from None


def get_config(name: str, **overrides) -> ViTConfig:
    """The config of zoo entry ``name``, with ``overrides`` (``depth=2``, ...) applied."""
    return get_entry(name).config.replace(**overrides) if overrides else get_entry(name).config
