"""MAE's light decoder: encoded visible tokens + mask tokens -> pixels of every patch.

Parameter names are those of MAE's ``models_mae.py`` (``decoder_embed``, ``mask_token``,
``decoder_pos_embed``, ``decoder_blocks.i.*``, ``decoder_norm``, ``decoder_pred``), so the decoder
part of an MAE pretraining checkpoint loads as it is. Blocks are the encoder's pre-norm
:class:`~vssl.models.vit.Block` (timm's layout: ``attn.qkv``, ``mlp.fc1`` ...).
"""

from __future__ import annotations

import torch
from torch import nn

from .vit import Block, ViTConfig, sincos_pos_embed_2d

__all__ = [
    "MAEDecoder",
    "check_decoder_settings",
    "describe_decoder",
    "init_mae_encoder_",
    "mae_init_",
]


class MAEDecoder(nn.Module):
    """``forward(tokens, ids_restore)``: ``tokens`` (B, 1 + K, encoder_dim) are the encoder's
    normalized CLS + kept patch tokens, ``ids_restore`` (B, N) the inverse of the masking shuffle;
    returns the predicted patches (B, N, patch_size**2 * in_chans) in MAE's (p, q, c) order, or
    (B, N, out_dim) when ``out_dim`` is given (SplitMask's vocabulary logits).
    The position embedding is MAE's fixed sin-cos (not trained)."""

    def __init__(
        self,
        num_patches: int,
        patch_size: int,
        encoder_dim: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        norm_eps: float = 1e-6,
        out_dim: int | None = None,
    ):
        super().__init__()
        grid = int(round(num_patches**0.5))
        if grid * grid != num_patches:
            raise ValueError(f"the decoder needs a square patch grid, got {num_patches} patches")
        self.num_patches, self.patch_size, self.in_chans = num_patches, patch_size, in_chans
        self.dim, self.depth, self.num_heads = dim, depth, num_heads
        cfg = ViTConfig(
            embed_dim=dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            ffn="mlp",
            layerscale=None,
            norm_eps=norm_eps,
        )
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(Block(cfg) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=norm_eps)
        # MAE predicts pixels (p*p*C per patch); SplitMask's token target predicts vocabulary logits
        self.decoder_pred = nn.Linear(dim, out_dim or patch_size * patch_size * in_chans)
        if not self.mask_token.is_meta:
            mae_init_(self)
            with torch.no_grad():
                self.decoder_pos_embed.copy_(sincos_pos_embed_2d(dim, grid))

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        return self.decoder_pred(self.forward_features(tokens, ids_restore))[:, 1:]

    def forward_features(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """The normalized decoder states (B, 1 + N, dim) before the prediction layer, CLS first
        (SplitMask pools them for its contrastive term)."""
        x = self.decoder_embed(tokens)
        b, n_visible = x.shape[0], x.shape[1] - 1
        masked = self.mask_token.to(x.dtype).expand(b, ids_restore.shape[1] - n_visible, -1)
        patches = torch.cat((x[:, 1:], masked), dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat((x[:, :1], patches), dim=1) + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)


def check_decoder_settings(embed_dim: int, depth: int, num_heads: int) -> None:
    """What an :class:`MAEDecoder` needs of a method config's ``decoder_*`` settings (MAE's and
    SplitMask's), as errors naming the setting."""
    values = {
        "decoder_embed_dim": embed_dim,
        "decoder_depth": depth,
        "decoder_num_heads": num_heads,
    }
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if embed_dim % num_heads:
        raise ValueError(
            f"decoder_embed_dim {embed_dim} is not divisible by decoder_num_heads {num_heads}"
        )
    if embed_dim % 4:
        raise ValueError("decoder_embed_dim must be divisible by 4 (sin-cos positions)")


def describe_decoder(sd: dict[str, torch.Tensor]) -> dict:
    """The decoder settings a state dict in MAE's names implies (for error messages)."""
    out: dict = {}
    if "decoder_embed.weight" in sd:
        out["decoder_embed_dim"], out["encoder_dim"] = tuple(sd["decoder_embed.weight"].shape)
    blocks = {k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")}
    if blocks:
        out["decoder_depth"] = len(blocks)
    if "decoder_pos_embed" in sd:
        out["num_patches"] = sd["decoder_pos_embed"].shape[1] - 1
    if "decoder_pred.weight" in sd:
        out["pred_dim"] = sd["decoder_pred.weight"].shape[0]
    return out


@torch.no_grad()
def mae_init_(module: nn.Module) -> None:
    """MAE's initialization (``initialize_weights``): xavier-uniform linears (and the patch
    projection, viewed as a linear) with zero biases, unit LayerNorms, N(0, 0.02) CLS and mask
    tokens. Position embeddings are left to the caller (fixed sin-cos)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith("patch_embed.proj.weight"):
            nn.init.xavier_uniform_(p.view(p.shape[0], -1))
        elif name.endswith(("cls_token", "mask_token")) and p.ndim == 3:
            nn.init.normal_(p, std=0.02)


@torch.no_grad()
def init_mae_encoder_(backbone: nn.Module) -> None:
    """An encoder trained as MAE trains it (MAE and SplitMask): MAE's initialization and fixed
    sin-cos positions from scratch (a meta-device encoder, about to receive a checkpoint's
    weights, keeps its own); the position embedding is not trained either way."""
    if not backbone.pos_embed.is_meta:
        mae_init_(backbone)
        backbone.pos_embed.copy_(sincos_pos_embed_2d(backbone.embed_dim, backbone.config.grid_size))
    backbone.pos_embed.requires_grad_(False)
