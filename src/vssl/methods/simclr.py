"""SimCLR as a method: contrast two augmented views of each image (Chen et al. 2020, arXiv 2002.05709).

What the paper's objective is, without its loop (the trainer owns it):

- the views are two random crops of each image with strong colour distortion; here they are
  DINOv2's two global crops (:class:`vssl.data.views.MultiCropViews` with ``data.n_local=0``),
  whose colour jitter, grayscale, blur and solarization recipes the ``data`` section sets;
- the encoder's CLS token goes through a projection head g (an MLP with BatchNorm and ReLU,
  SimCLR's 2-layer head by default; 3 layers is SimCLR v2's), and the loss works on ``z = g(h)``;
  the encoder's own ``h`` is what evaluations use;
- the loss is NT-Xent (the paper's eq. 1): for each of the 2N views, its other view is the
  positive and the other 2N - 2 views of the global batch are the negatives, with cosine
  similarity over ``temperature``; the mean over all 2N views. Negatives come from every rank,
  with gradients (:func:`vssl.methods.contrastive.nt_xent`).

Why it is in vssl: it has no teacher, centering or prototypes, so it cannot collapse and its loss
moves from the first step. On the quickstart's few hundred CPU steps that is what DINOv2 lacked
(docs/architecture.md, "The quickstart's method"). The paper's LARS optimizer and batch 4096 are
not reproduced: the trainer's AdamW runs it, as MoCo v3 runs its ViTs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..data.views import ViewSpec
from ..models.checkpoints import Checkpoint
from ..models.vit import VisionTransformer
from .base import MethodBase, global_crop_pairs, load_backbone_strictly, register_method
from .contrastive import nt_xent

__all__ = ["SimCLR", "SimCLRConfig", "ProjectionHead"]


@dataclass
class SimCLRConfig:
    """SimCLR's method settings. ``temperature`` 0.5 is the paper's CIFAR-10 value (0.1 with its
    batch of 4096 on ImageNet); the head is the paper's 2-layer MLP with a 128-d output."""

    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    proj_layers: int = 2
    temperature: float = 0.5

    def __post_init__(self):
        for name in ("proj_hidden_dim", "proj_dim", "proj_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class ProjectionHead(nn.Module):
    """SimCLR's g: ``layers`` linear layers, BatchNorm + ReLU after each but the last."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        mods.append(nn.Linear(dim, out_dim))
        self.mlp = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


@register_method("simclr")
class SimCLR(MethodBase):
    """SimCLR around a :class:`VisionTransformer` encoder (module docstring)."""

    config_class = SimCLRConfig

    def __init__(self, backbone: VisionTransformer, cfg: SimCLRConfig | None = None):
        super().__init__()
        self.cfg = cfg or SimCLRConfig()
        head = ProjectionHead(
            backbone.embed_dim, self.cfg.proj_hidden_dim, self.cfg.proj_dim, self.cfg.proj_layers
        )
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})

    def views(self) -> ViewSpec:
        return ViewSpec("multicrop")

    def forward(self, batch: dict, step: int | None = None) -> dict[str, torch.Tensor]:
        glob = global_crop_pairs(batch, "SimCLR")
        local = batch.get("local")
        if local is not None and local.shape[0]:
            raise ValueError(
                "SimCLR contrasts two views per image and has no use for local crops: set "
                "data.n_local=0 (they would only cost time)"
            )
        h = self.student["backbone"].forward_features(glob)["x_norm_clstoken"]
        z1, z2 = self.student["head"](h).chunk(2)
        return {"loss": nt_xent(z1, z2, self.cfg.temperature)}

    def load_pretrained(self, checkpoint: str | Checkpoint) -> dict:
        """Initialize the encoder strictly from any checkpoint :func:`read_checkpoint` reads; the
        projection head starts fresh. Returns ``{"source", "format", "backbone"}``."""
        backbone = self.student["backbone"]
        ck = load_backbone_strictly(backbone, checkpoint)
        return {"source": ck.source, "format": ck.format, "backbone": True}
