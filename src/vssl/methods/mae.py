"""MAE / Web-MAE as a method: masked autoencoding of normalized pixels (He et al. 2021).

What MAE's ``models_mae.py`` computes, without its loop (the trainer owns it):

- the views are one random resized crop + flip per image and a per-sample random mask
  (``mask_ratio`` 0.75: the first 25% of a random shuffle are kept), drawn by the data pipeline
  (:class:`vssl.data.views.SingleViews`) so batches are a function of the step;
- the encoder (the backbone ViT) runs on the visible patches only, with position embeddings
  added before the patches are dropped: no mask tokens in the encoder;
- the light decoder (:class:`~vssl.models.decoders.MAEDecoder`: 512-d, 8 blocks, 16 heads, fixed
  sin-cos positions) puts a learned mask token at every removed position (``ids_restore``) and
  predicts every patch's pixels;
- the loss is the mean squared error on the removed patches only, against each target patch
  normalized by its own mean and (unbiased) variance when ``norm_pix_loss`` (MAE's recipe).

From scratch, encoder and decoder get MAE's initialization and the encoder's position embedding is
MAE's fixed sin-cos; continuing from a checkpoint keeps the checkpoint's own (still not trained).
``forward`` returns ``{"loss"}``; the encoder is ``student["backbone"]``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..data.views import ViewSpec
from ..models.checkpoints import Checkpoint, CheckpointError, check_state_dict, read_checkpoint
from ..models.decoders import (
    MAEDecoder,
    check_decoder_settings,
    describe_decoder,
    init_mae_encoder_,
)
from ..models.vit import VisionTransformer
from .base import MethodBase, register_method

log = logging.getLogger("vssl")

__all__ = ["MAE", "MAEConfig", "mae_loss", "patchify", "pixel_targets"]


@dataclass
class MAEConfig:
    """MAE's method settings (``main_pretrain.py`` / ``models_mae.py`` defaults)."""

    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio!r}")
        check_decoder_settings(self.decoder_embed_dim, self.decoder_depth, self.decoder_num_heads)
        if not self.decoder_mlp_ratio > 0:
            raise ValueError(f"decoder_mlp_ratio must be > 0, got {self.decoder_mlp_ratio!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C), each patch in MAE's (p, q, c) order."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not a whole number of {p}-px patches")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def pixel_targets(images: torch.Tensor, patch_size: int, norm_pix_loss: bool = True):
    """MAE's targets: the patches (B, N, p*p*C), each normalized by its own mean and unbiased
    variance (eps 1e-6) when ``norm_pix_loss``."""
    target = patchify(images.float(), patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def mae_loss(
    images: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool = True,
) -> torch.Tensor:
    """MAE's loss: per-patch MSE (mean over pixels), averaged over the removed patches
    (``mask`` 1) only, against :func:`pixel_targets`."""
    target = pixel_targets(images, patch_size, norm_pix_loss)
    per_patch = (pred.float() - target).square().mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


@register_method("mae")
class MAE(MethodBase):
    """MAE around a :class:`VisionTransformer` encoder (module docstring)."""

    config_class = MAEConfig

    def __init__(self, backbone: VisionTransformer, cfg: MAEConfig | None = None):
        super().__init__()
        cfg = cfg or MAEConfig()
        self.cfg = cfg
        bcfg = backbone.config
        decoder = MAEDecoder(
            bcfg.num_patches,
            bcfg.patch_size,
            backbone.embed_dim,
            cfg.decoder_embed_dim,
            cfg.decoder_depth,
            cfg.decoder_num_heads,
            cfg.decoder_mlp_ratio,
            bcfg.in_chans,
            bcfg.norm_eps,
        )
        self.student = nn.ModuleDict({"backbone": backbone, "decoder": decoder})
        init_mae_encoder_(backbone)  # fixed sin-cos positions, as in MAE's pretraining

    def views(self) -> ViewSpec:
        return ViewSpec(
            "single",
            mask="random",
            mask_ratio=self.cfg.mask_ratio,
            patch_size=self.student["backbone"].config.patch_size,
        )

    def forward(self, batch: dict, step: int | None = None) -> dict[str, torch.Tensor]:
        missing = [k for k in ("image", "ids_keep", "ids_restore", "mask") if k not in batch]
        if missing:
            raise KeyError(
                f"the batch has no {missing}: MAE needs its views (one image and a "
                "random mask per sample: vssl.data.views.SingleViews)"
            )
        images = batch["image"]
        if not torch.is_floating_point(images):
            raise TypeError("batch['image'] is uint8: normalize it (SingleViews.finish) first")
        out = self.student["backbone"](images, ids_keep=batch["ids_keep"], is_training=True)
        tokens = torch.cat((out["x_norm_clstoken"].unsqueeze(1), out["x_norm_patchtokens"]), 1)
        pred = self.student["decoder"](tokens, batch["ids_restore"])
        loss = mae_loss(
            images,
            pred,
            batch["mask"],
            self.student["backbone"].config.patch_size,
            self.cfg.norm_pix_loss,
        )
        return {"loss": loss}

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pred, target)`` patches of a batch (B, N, p*p*C) in the loss's space: for pictures."""
        out = self.student["backbone"](batch["image"], ids_keep=batch["ids_keep"], is_training=True)
        tokens = torch.cat((out["x_norm_clstoken"].unsqueeze(1), out["x_norm_patchtokens"]), 1)
        pred = self.student["decoder"](tokens, batch["ids_restore"])
        patch = self.student["backbone"].config.patch_size
        return pred, pixel_targets(batch["image"], patch, self.cfg.norm_pix_loss)

    # -- continuing from released weights ------------------------------------------------------
    @torch.no_grad()
    def load_pretrained(self, checkpoint: str | Checkpoint) -> dict:
        """Initialize from any checkpoint :func:`read_checkpoint` reads: the encoder strictly
        (a Web-MAE encoder, a DINOv2 backbone, ...; its position embedding is kept), and the
        decoder when the file carries MAE's ``decoder_*`` tensors (an MAE pretraining checkpoint;
        a decoder that does not fit is refused naming the keys and the settings that would).
        Returns ``{"source", "format", "backbone", "decoder"}``."""
        ck = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
        backbone, decoder = self.student["backbone"], self.student["decoder"]
        dec = {k: v for k, v in ck.heads.items() if k.startswith("decoder_") or k == "mask_token"}
        if not ck.state_dict:
            raise CheckpointError(f"{ck.source} holds no encoder weights")
        check_state_dict(backbone, ck.state_dict, ck.source)
        if dec:
            self._check_decoder(dec, ck.source)
        backbone.load_state_dict(dict(ck.state_dict), strict=True)
        backbone.pos_embed.requires_grad_(False)
        if dec:
            decoder.load_state_dict(dec, strict=True)
        else:
            log.info("%s has no MAE decoder: the decoder starts from scratch", ck.source)
        return {"source": ck.source, "format": ck.format, "backbone": True, "decoder": bool(dec)}

    def _check_decoder(self, sd: dict[str, torch.Tensor], source: str) -> None:
        decoder = self.student["decoder"]
        expected = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        shapes = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
        if not (missing or unexpected or shapes):
            return
        have = describe_decoder(sd)
        fix = [
            f"method.{k}={v}"
            for k, v in have.items()
            if k in ("decoder_embed_dim", "decoder_depth") and getattr(self.cfg, k) != v
        ]
        lines = [
            f"{source}: the MAE decoder does not fit the method config (checkpoint: "
            f"{', '.join(f'{k}={v}' for k, v in have.items())}; config: decoder_embed_dim="
            f"{self.cfg.decoder_embed_dim}, decoder_depth={self.cfg.decoder_depth}):"
        ]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:8])}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}")
        if shapes:
            lines.append(
                "  shape mismatches: "
                + "; ".join(
                    f"{k} checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
                    for k in shapes[:8]
                )
            )
        lines.append(
            "  set " + ", ".join(fix)
            if fix
            else "  (decoder_num_heads cannot be read from weights: check it too)"
        )
        raise CheckpointError("\n".join(lines))
