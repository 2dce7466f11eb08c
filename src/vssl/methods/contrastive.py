"""Contrastive losses over the global batch: negatives gathered from every rank, with gradients.

A contrastive loss needs the other images of the *global* batch as negatives. ``all_gather``
returns tensors without history, so gradients would reach only this rank's own rows; that is
open_clip's ``gather_with_grad=False`` approximation. :func:`all_gather_with_grad` keeps the exact
gradient (``torch.distributed.nn.all_gather``, open_clip's ``gather_with_grad=True``): its backward
sums the gradients every rank computed for each row (reduce-scatter on NCCL, all-to-all on gloo)
and hands each rank those of its own rows. With DDP's gradient averaging, every rank then gets the
gradient of the mean of the per-rank losses, as if one process had computed the loss over the
whole batch (tests/_torchrun_contrastive.py checks it on 2 gloo ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["all_gather_with_grad", "info_nce", "nt_xent"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` (n, ...) of every rank concatenated in rank order (world * n, ...); gradients flow
    back to the rank that owns each row. One process: ``x`` itself. Every rank must pass the
    same ``n``."""
    _, world = _world()
    if world == 1:
        return x
    from torch.distributed import nn as dist_nn

    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows: ``a[i]`` should match ``b[i]`` against every other
    row of ``b`` in the global batch, and the other way round (the mean of both directions).

    ``a``, ``b``: (n, d) this rank's descriptors, L2-normalized here (cosine similarity / ``temperature``).
    Computed in float32. The positives of this rank sit at ``rank * n + i`` of the gathered rows.
    """
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    rank, _ = _world()
    labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    logits_ab = a @ all_gather_with_grad(b).t() / temperature
    logits_ba = b @ all_gather_with_grad(a).t() / temperature
    return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1) over the global batch: ``z1[i]`` and ``z2[i]``
    (this rank's (n, d) projections of image ``i``'s two views) are positives; every other view
    of every rank is a negative.

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
