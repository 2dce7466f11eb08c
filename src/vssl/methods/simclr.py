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
  with gradients (:func:`vssl.methods.contrastive.all_gather_with_grad`).

Why it is in vssl: it has no teacher, centering or prototypes, so it cannot collapse and its loss
moves from the first step. On the quickstart's few hundred CPU steps that is what DINOv2 lacked
(docs/architecture.md, "The quickstart's method"). The paper's LARS optimizer and batch 4096 are
not reproduced: the trainer's AdamW runs it, as MoCo v3 runs its ViTs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.views import ViewSpec
from ..models.checkpoints import Checkpoint
from ..models.vit import VisionTransformer
from .base import MethodBase, load_backbone_strictly, register_method
from .contrastive import _world, all_gather_with_grad

__all__ = ["SimCLR", "SimCLRConfig", "ProjectionHead", "nt_xent"]


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


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over the global batch: ``z1[i]`` and ``z2[i]`` (this rank's (n, d) projections of
    image ``i``'s two views) are positives; every other view of every rank is a negative.

    Row layout of the keys: all ranks' ``z1`` (N rows), then all ranks' ``z2``. Each view is
    compared with all 2N keys except itself. Computed in float32.
    """
    z1 = F.normalize(z1.float(), dim=-1)
    z2 = F.normalize(z2.float(), dim=-1)
    n = z1.shape[0]
    rank, _ = _world()
    k1, k2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
    big_n = k1.shape[0]
    keys = torch.cat((k1, k2))  # (2N, d)
    queries = torch.cat((z1, z2))  # (2n, d)
    logits = queries @ keys.t() / temperature
    own = torch.arange(n, device=z1.device) + rank * n  # z1[i]'s row among the keys
    self_idx = torch.cat((own, own + big_n))
    positive = torch.cat((own + big_n, own))
    rows = torch.arange(2 * n, device=z1.device)
    logits[rows, self_idx] = float("-inf")
    return F.cross_entropy(logits, positive)


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
        glob = batch.get("global")
        if glob is None:
            raise KeyError("the batch has no 'global' crops: SimCLR needs its two views per image")
        if not torch.is_floating_point(glob):
            raise TypeError(
                "batch['global'] is uint8: apply MultiCropPhotometric (normalization) "
                "to the collated batch before the method"
            )
        if glob.shape[0] % 2:
            raise ValueError(
                f"SimCLR takes 2 views per image; batch['global'] has {glob.shape[0]} rows"
            )
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
