"""One VisionTransformer for every DINOv2 / Web-DINO / Web-MAE checkpoint.

Module and parameter names follow DINOv2's ``vision_transformer.py`` (``blocks.i.attn.qkv``,
``ls1.gamma``, ``mlp.w12`` ...), so a native checkpoint loads without renaming and a user who knows
DINOv2 finds the same attributes. Options cover the released variants: GELU MLP or SwiGLU FFN,
LayerScale, register tokens, biases, a mask token, and the two position-embedding interpolation
schemes (DINOv2's scale-factor with +0.1 offset, and transformers' resize-to-grid).
Attention goes through ``F.scaled_dot_product_attention``: no xformers. ``forward(x,
ids_keep=...)`` encodes only the kept patches (MAE's encoder sees no mask tokens), and
:func:`sincos_pos_embed_2d` is MAE's fixed 2-D sin-cos position embedding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding, (1, grid_size**2 [+1], dim), float32.

    Half the channels encode the column, half the row (MAE's ``meshgrid(grid_w, grid_h)``: "w goes
    first"); per axis ``[sin(pos * w_i), cos(pos * w_i)]`` with ``w_i = 1 / 10000**(2i / (dim/2))``,
    computed in float64 as MAE's numpy code; the CLS row is zeros. Written by hand: MAE's own
    ``util/pos_embed.py`` fails on NumPy >= 1.24 and timm is not usable here.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # position k = row * grid + col

    def axis(pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat((out.sin(), out.cos()), dim=1)

    emb = torch.cat((axis(cols), axis(rows)), dim=1)
    if cls_token:
        emb = torch.cat((emb.new_zeros(1, dim), emb), dim=0)
    return emb.float().unsqueeze(0)


@dataclass
class ViTConfig:
    """Architecture of a ViT; every field maps to one upstream option."""

    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    ffn: str = "mlp"  # "mlp" (GELU) | "swiglu" (DINOv2's SwiGLUFFNFused sizing)
    layerscale: float | None = None  # LayerScale init value; None = no LayerScale
    num_register_tokens: int = 0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    norm_eps: float = 1e-6
    mask_token: bool = True
    # Position-embedding interpolation, as DINOv2 parameterizes it. offset > 0: scale_factor
    # (M + offset)/M (original DINOv2 / Web-SSL); offset == 0: resize to the target grid
    # (transformers). antialias: Dinov2WithRegisters and timm use it.
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    drop_path_rate: float = 0.0
    # Which upstream family the weights come from: "dinov2" (Dinov2Model-compatible) or "mae"
    # (timm / ViTModel-compatible). Decides the export format; no effect on the forward pass.
    family: str = "dinov2"
    # How pixels become tokens: "patch" (one strided conv: every released checkpoint) or "conv"
    # (a convolutional stem, ConvStem: for small data and short runs, e.g. the CPU recipes)
    stem: str = "patch"

    def __post_init__(self):
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(
                f"stem='conv' halves the resolution per layer: patch_size must be a power of 2, "
                f"got {self.patch_size}"
            )
        if self.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {self.ffn!r}")
        if self.family not in ("dinov2", "mae"):
            raise ValueError(f"family must be 'dinov2' or 'mae', got {self.family!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn == "swiglu":
            # SwiGLU keeps 2/3 of the MLP width, rounded up to a multiple of 8 (DINOv2, Web-SSL).
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ViT config keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def replace(self, **overrides) -> ViTConfig:
        return ViTConfig.from_dict({**self.to_dict(), **overrides})


class PatchEmbed(nn.Module):
    """Non-overlapping patches via a strided conv; output (B, N, D)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ConvStem(nn.Module):
    """The convolutional stem of Xiao et al. 2021 ("Early Convolutions Help Transformers See
    Better", arXiv 2106.14881) in place of the patchify conv: log2(patch_size) 3x3 stride-2 convs
    with BatchNorm and ReLU (widths doubling up to ``embed_dim``), then a 1x1 conv to the tokens.
    Same output as :class:`PatchEmbed` (one token per patch_size x patch_size pixels), but with the
    locality prior of a CNN: it optimizes faster and more stably, which is what a few hundred CPU
    steps on small data need. Their stem also adds stride-1 convs; this is its minimal form."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        n = patch_size.bit_length() - 1
        layers: list[nn.Module] = []
        c_in = in_chans
        for i in range(n):
            c_out = max(embed_dim // 2 ** (n - 1 - i), 8)
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, embed_dim, 1))
        self.stem = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """DINOv2's fused SwiGLU: one ``w12`` projection split into gate and value halves."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (per sample); identity at eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias, cfg.proj_bias)
        self.ls1 = LayerScale(d, cfg.layerscale) if cfg.layerscale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        ffn_cls = SwiGLUFFN if cfg.ffn == "swiglu" else Mlp
        self.mlp = ffn_cls(d, cfg.ffn_hidden_dim, cfg.ffn_bias)
        self.ls2 = LayerScale(d, cfg.layerscale) if cfg.layerscale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x


class VisionTransformer(nn.Module):
    """DINOv2-style ViT: CLS token, optional registers, learned absolute position embedding."""

    def __init__(self, config: ViTConfig | None = None, **kwargs):
        super().__init__()
        cfg = config.replace(**kwargs) if config is not None else ViTConfig(**kwargs)
        self.config = cfg
        d = cfg.embed_dim
        self.embed_dim = self.num_features = d
        self.patch_size = cfg.patch_size
        self.num_register_tokens = cfg.num_register_tokens
        self.n_blocks = cfg.depth

        stem = ConvStem if cfg.stem == "conv" else PatchEmbed
        self.patch_embed = stem(cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, d))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d))
            if cfg.num_register_tokens
            else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, d)) if cfg.mask_token else None
        # stochastic depth grows linearly with depth, as in DINOv2 (pure Python: safe on the meta device)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, dpr[i]) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.grad_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # -- initialization (timm/DINOv2 scheme: trunc-normal 0.02 for linears and pos-embed) -------
    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        if self.mask_token is not None:
            nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, LayerScale):
                m.gamma.fill_(self.config.layerscale)

    # -- tokens -------------------------------------------------------------------------------
    def interpolate_pos_encoding(self, num_patches: int, h: int, w: int, dtype: torch.dtype):
        """Position embedding for an (h, w)-pixel input, resampled the way the weights' origin does.

        Skips resampling only when the grid matches and the input is square, exactly as DINOv2 and
        transformers do (so a non-square input with the native patch count is still resampled).
        """
        n_pos = self.pos_embed.shape[1] - 1
        if num_patches == n_pos and h == w:
            return self.pos_embed.to(dtype)
        cfg = self.config
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        m = int(math.sqrt(n_pos))
        if m * m != n_pos:
            raise ValueError(f"pos_embed holds {n_pos} patch positions, not a square grid")
        h0, w0 = h // self.patch_size, w // self.patch_size
        grid = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if cfg.interpolate_offset:
            scale = ((h0 + cfg.interpolate_offset) / m, (w0 + cfg.interpolate_offset) / m)
            grid = F.interpolate(
                grid, scale_factor=scale, mode="bicubic", antialias=cfg.interpolate_antialias
            )
        else:
            grid = F.interpolate(
                grid,
                size=(h0, w0),
                mode="bicubic",
                align_corners=False,
                antialias=cfg.interpolate_antialias,
            )
        if grid.shape[-2:] != (h0, w0):
            raise RuntimeError(
                f"pos-embed resampled to {tuple(grid.shape[-2:])}, expected {(h0, w0)}"
            )
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat((cls_pos, patch_pos), dim=1).to(dtype)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None):
        _, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask_token (built with mask_token=False)")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        x = x + self.interpolate_pos_encoding(x.shape[1] - 1, h, w, x.dtype)
        if self.register_tokens is not None:
            reg = self.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat((x[:, :1], reg, x[:, 1:]), dim=1)
        return x

    def prepare_tokens_kept(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Tokens of the kept patches only (MAE): position embeddings are added to every patch,
        then the patches ``ids_keep`` (B, K) are gathered; CLS (+ its position) and registers
        come first. No mask token enters the encoder."""
        _, _, h, w = x.shape
        x = self.patch_embed(x)
        pos = self.interpolate_pos_encoding(x.shape[1], h, w, x.dtype)
        x = x + pos[:, 1:]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
        parts = [cls, x]
        if self.register_tokens is not None:
            parts.insert(1, self.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype))
        return torch.cat(parts, dim=1)

    def _run_block(self, blk: Block, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    # -- public API (DINOv2's) ------------------------------------------------------------------
    def forward_features(
        self,
        x: torch.Tensor,
        masks: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
    ) -> dict:
        """DINOv2's output dict. ``masks``: replace patches by the mask token (iBOT);
        ``ids_keep``: encode only these patches (MAE; ``x_norm_patchtokens`` are the kept ones)."""
        if ids_keep is not None:
            if masks is not None:
                raise ValueError("give masks (mask tokens) or ids_keep (kept patches), not both")
            x = self.prepare_tokens_kept(x, ids_keep)
        else:
            x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = self._run_block(blk, x)
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ):
        """Outputs of the last ``n`` blocks (or of the block indices in ``n``), DINOv2 semantics."""
        _, _, h, w = x.shape
        total = len(self.blocks)
        take = set(range(total - n, total)) if isinstance(n, int) else set(n)
        bad = [i for i in take if not 0 <= i < total]
        if bad:
            raise ValueError(f"block indices {sorted(bad)} out of range for depth {total}")
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            tokens = self._run_block(blk, tokens)
            if i in take:
                outputs.append(tokens)
            if len(outputs) == len(take):
                break
        if norm:
            outputs = [self.norm(o) for o in outputs]
        class_tokens = [o[:, 0] for o in outputs]
        outputs = [o[:, 1 + self.num_register_tokens :] for o in outputs]
        if reshape:
            gh, gw = h // self.patch_size, w // self.patch_size
            outputs = [
                o.reshape(o.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous() for o in outputs
            ]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def forward(
        self,
        x: torch.Tensor,
        masks: torch.Tensor | None = None,
        is_training: bool = False,
        ids_keep: torch.Tensor | None = None,
    ):
        ret = self.forward_features(x, masks, ids_keep=ids_keep)
        return ret if is_training else ret["x_norm_clstoken"]
