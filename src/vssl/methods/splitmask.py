"""SplitMask: split, inpaint, match (El-Nouby et al. 2021, "Are Large-scale Datasets Necessary for
Self-Supervised Pre-training?", arXiv 2112.10740). No public code exists; this follows the paper's
description (docs/architecture.md, "SplitMask", says what is stated and what vssl chose):

- **split**: per image, the patches are split by a random permutation into two disjoint halves
  A and B (:func:`vssl.data.masking.split_halves`, drawn by the data pipeline so batches stay a
  function of the step). The shared encoder sees each half alone, without mask tokens (as MAE's
  encoder does); both halves run as one batch of ``2B``;
- **inpaint**: a shallow decoder (2 blocks) takes A's encoded tokens plus mask tokens at B's
  positions and predicts B's patches, and vice versa. Targets (``target``): ``tokens`` — the
  paper's lightweight tokenizer (each patch's id is its most cosine-similar vocabulary entry in
  pixel space, :class:`~vssl.models.patch_tokenizer.PatchTokenizer`; cross-entropy) — or
  ``pixels``, MAE's normalized-pixel regression (not the paper's; the alternative the MAE line of
  work uses);
- **match**: each branch's decoder output tokens are average-pooled and InfoNCE pairs the A and B
  descriptors of the same image against the other images of the global batch (temperature 0.2;
  negatives gathered from every rank with gradients, :mod:`vssl.methods.contrastive`).

Not stated in the paper's descriptions, and chosen here: no projection head before InfoNCE, the
two losses summed with weight 1 (``contrastive_weight``), the symmetric InfoNCE, the vocabulary
(size and construction: spherical k-means of training patches, :meth:`SplitMask.prepare`), and
MAE's initialization with fixed sin-cos positions for a fresh encoder. ``forward`` returns
``{"loss", "inpaint", "contrastive"}``; the encoder is ``student["backbone"]``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.views import ViewSpec
from ..models.checkpoints import Checkpoint
from ..models.decoders import MAEDecoder, check_decoder_settings, init_mae_encoder_
from ..models.patch_tokenizer import PatchTokenizer
from ..models.vit import VisionTransformer
from .base import MethodBase, load_backbone_strictly, register_method
from .contrastive import info_nce
from .mae import patchify, pixel_targets

log = logging.getLogger("vssl")

__all__ = ["SplitMask", "SplitMaskConfig", "inpaint_loss"]

TARGETS = ("tokens", "pixels")


@dataclass
class SplitMaskConfig:
    """SplitMask's settings: the paper's where stated (2-block decoder, temperature 0.2, token
    targets), vssl's choices where not (module docstring)."""

    target: str = "tokens"
    vocab_size: int = 8192  # BEiT's vocabulary size; the paper's is not stated
    vocab_samples: int = 400_000  # patches drawn for the vocabulary's k-means
    vocab_max_batches: int = 200  # at most this many batches are drawn for them
    temperature: float = 0.2
    contrastive_weight: float = 1.0
    norm_pix_loss: bool = True  # for target: pixels
    decoder_embed_dim: int = 512
    decoder_depth: int = 2
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0

    choices = {"target": TARGETS}

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if int(self.vocab_size) < 2:
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size!r}")
        if int(self.vocab_samples) < int(self.vocab_size):
            raise ValueError(
                f"vocab_samples {self.vocab_samples} must be at least vocab_size {self.vocab_size}"
            )
        if int(self.vocab_max_batches) < 1:
            raise ValueError(f"vocab_max_batches must be >= 1, got {self.vocab_max_batches!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.contrastive_weight < 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {self.contrastive_weight!r}")
        check_decoder_settings(self.decoder_embed_dim, self.decoder_depth, self.decoder_num_heads)

    def to_dict(self) -> dict:
        return asdict(self)


def inpaint_loss(pred: torch.Tensor, target: torch.Tensor, target_kind: str) -> torch.Tensor:
    """The loss on the predicted half: cross-entropy on vocabulary ids (``pred`` (n, m, K),
    ``target`` long (n, m)) or MSE on normalized pixels (``target`` (n, m, P), mean over pixels,
    then patches). Float32."""
    if target_kind == "tokens":
        return F.cross_entropy(pred.float().flatten(0, 1), target.flatten())
    return (pred.float() - target).square().mean()


def _restore_order(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``ids_restore`` for the decoder when ``first`` are the encoded positions and ``second``
    the positions to fill with mask tokens."""
    return torch.argsort(torch.cat((first, second), dim=1), dim=1)


@register_method("splitmask")
class SplitMask(MethodBase):
    """SplitMask around a :class:`VisionTransformer` encoder (module docstring)."""

    config_class = SplitMaskConfig

    def __init__(self, backbone: VisionTransformer, cfg: SplitMaskConfig | None = None):
        super().__init__()
        cfg = cfg or SplitMaskConfig()
        self.cfg = cfg
        bcfg = backbone.config
        if bcfg.num_patches % 2:
            raise ValueError(
                f"SplitMask splits the patches into two halves: {bcfg.num_patches} patches "
                "is odd (change the image or patch size)"
            )
        patch_dim = bcfg.patch_size**2 * bcfg.in_chans
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
            out_dim=cfg.vocab_size if cfg.target == "tokens" else None,
        )
        self.student = nn.ModuleDict({"backbone": backbone, "decoder": decoder})
        self.tokenizer = (
            PatchTokenizer(cfg.vocab_size, patch_dim) if cfg.target == "tokens" else None
        )
        init_mae_encoder_(backbone)  # fixed sin-cos positions, as in MAE's pretraining

    def views(self) -> ViewSpec:
        return ViewSpec(
            "single", mask="split", patch_size=self.student["backbone"].config.patch_size
        )

    @torch.no_grad()
    def prepare(self, data, run_dir=None) -> None:
        """Build the patch vocabulary from the first batches of ``data`` (anything with
        ``batches(epoch)``, e.g. :class:`vssl.train.data.TrainData`), for token targets only. A
        vocabulary already built, or loaded with a checkpoint, is kept."""
        if self.tokenizer is None or self.tokenizer.is_fitted:
            return
        batches = iter(data.batches(0))
        try:
            patches = self._sample_patches(batches)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # stops a loader's workers
        info = self.tokenizer.fit(patches)
        log.info(
            "SplitMask vocabulary: %d entries from %d patches (%d in use)",
            info["vocab_size"],
            info["patches"],
            info["used"],
        )

    def _sample_patches(self, batches) -> torch.Tensor:
        p = self.student["backbone"].config.patch_size
        parts, n = [], 0
        for i, batch in enumerate(batches):
            patches = patchify(batch["image"].float(), p).flatten(0, 1)
            parts.append(patches.cpu())
            n += patches.shape[0]
            if n >= self.cfg.vocab_samples or i + 1 >= self.cfg.vocab_max_batches:
                break
        if not parts:
            raise ValueError("no batches to build the patch vocabulary from: the data is empty")
        patches = torch.cat(parts)
        if patches.shape[0] > self.cfg.vocab_samples:
            keep = torch.randperm(patches.shape[0], generator=torch.Generator().manual_seed(0))
            patches = patches[keep[: self.cfg.vocab_samples]]
        return patches

    def forward(self, batch: dict, step: int | None = None) -> dict[str, torch.Tensor]:
        missing = [k for k in ("image", "ids_a", "ids_b") if k not in batch]
        if missing:
            raise KeyError(
                f"the batch has no {missing}: SplitMask needs its views (one image and two "
                "patch halves per sample: vssl.data.views.SingleViews with mask='split')"
            )
        images, ids_a, ids_b = batch["image"], batch["ids_a"], batch["ids_b"]
        if not torch.is_floating_point(images):
            raise TypeError("batch['image'] is uint8: normalize it (SingleViews.finish) first")
        n = images.shape[0]
        backbone, decoder = self.student["backbone"], self.student["decoder"]
        # both halves in one encoder pass: rows [0, n) see A, rows [n, 2n) see B
        out = backbone(
            torch.cat((images, images)), ids_keep=torch.cat((ids_a, ids_b)), is_training=True
        )
        tokens = torch.cat((out["x_norm_clstoken"].unsqueeze(1), out["x_norm_patchtokens"]), 1)
        restore = torch.cat((_restore_order(ids_a, ids_b), _restore_order(ids_b, ids_a)))
        states = decoder.forward_features(tokens, restore)  # (2n, 1 + N, dim)
        filled = torch.cat((ids_b, ids_a))  # the positions each branch predicts
        idx = filled.unsqueeze(-1)
        pred = torch.gather(
            decoder.decoder_pred(states[:, 1:]),
            1,
            idx.expand(-1, -1, decoder.decoder_pred.out_features),
        )
        if self.tokenizer is not None:
            ids = self.tokenizer.encode(patchify(images.float(), backbone.config.patch_size))
            target = torch.gather(torch.cat((ids, ids)), 1, filled)
        else:
            px = pixel_targets(images, backbone.config.patch_size, self.cfg.norm_pix_loss)
            px = torch.cat((px, px))
            target = torch.gather(px, 1, idx.expand(-1, -1, px.shape[-1]))
        inpaint = inpaint_loss(pred, target, self.cfg.target)
        pooled = states[:, 1:].mean(dim=1)
        contrastive = info_nce(pooled[:n], pooled[n:], self.cfg.temperature)
        loss = inpaint + self.cfg.contrastive_weight * contrastive
        return {"loss": loss, "inpaint": inpaint.detach(), "contrastive": contrastive.detach()}

    # -- continuing from released weights ------------------------------------------------------
    @torch.no_grad()
    def load_pretrained(self, checkpoint: str | Checkpoint) -> dict:
        """Initialize the encoder strictly from any checkpoint :func:`read_checkpoint` reads (a
        Web-MAE / DINOv2 / MAE encoder, a vssl run); the decoder and the vocabulary start
        fresh (no released SplitMask weights exist). Returns ``{"source", "format", "backbone"}``."""
        backbone = self.student["backbone"]
        ck = load_backbone_strictly(backbone, checkpoint)
        backbone.pos_embed.requires_grad_(False)
        return {"source": ck.source, "format": ck.format, "backbone": True}
