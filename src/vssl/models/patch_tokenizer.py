"""SplitMask's lightweight patch tokenizer: a patch's id is its most cosine-similar vocabulary entry.

SplitMask (El-Nouby et al. 2021) replaced BEiT's DALL-E tokenizer by a vocabulary in pixel space:
each patch is assigned the entry with the highest cosine similarity, and the model predicts that
id (cross-entropy). How the paper built the vocabulary, its size and the patch preprocessing are
not stated in the sources found (docs/architecture.md, "SplitMask"). vssl builds it as the
natural fit for a cosine assignment: spherical k-means (faiss) over L2-normalized patches of the
training images, as the model sees them (normalized with the ImageNet mean and std). The
codebook is a buffer, so it is saved with every checkpoint and a resumed run keeps it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("vssl")

__all__ = ["PatchTokenizer"]


class PatchTokenizer(nn.Module):
    """``encode(patches (..., D)) -> ids (...)`` by cosine similarity to ``codebook`` (K, D);
    :meth:`fit` builds the codebook from sample patches."""

    def __init__(self, vocab_size: int, patch_dim: int):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        self.vocab_size, self.patch_dim = int(vocab_size), int(patch_dim)
        self.register_buffer("codebook", torch.zeros(vocab_size, patch_dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    @torch.no_grad()
    def fit(self, patches: torch.Tensor, *, seed: int = 0, niter: int = 20, nredo: int = 1) -> dict:
        """Spherical k-means (faiss) of ``patches`` (M, D) into ``vocab_size`` unit-norm entries.
        ``nredo`` restarts keep the best of several random initializations. Returns ``{"patches",
        "vocab_size", "used"}`` (``used``: entries that some patch of the sample is assigned to)."""
        import faiss  # the k-means of the field: fast, multi-threaded, seeded

        x = F.normalize(patches.detach().float().reshape(-1, self.patch_dim), dim=-1)
        if x.shape[0] < self.vocab_size:
            raise ValueError(
                f"{x.shape[0]} patches cannot make a vocabulary of {self.vocab_size}: draw more "
                "batches (method.vocab_samples) or lower method.vocab_size"
            )
        km = faiss.Kmeans(
            self.patch_dim,
            self.vocab_size,
            niter=niter,
            nredo=nredo,
            seed=seed,
            spherical=True,
            verbose=False,
        )
        km.max_points_per_centroid = max(256, -(-x.shape[0] // self.vocab_size))
        km.train(x.cpu().numpy())
        self.codebook.copy_(F.normalize(torch.from_numpy(km.centroids), dim=-1))
        self.fitted.fill_(True)
        used = int(self.encode(x.to(self.codebook.device)).unique().numel())
        return {"patches": int(x.shape[0]), "vocab_size": self.vocab_size, "used": used}

    @torch.no_grad()
    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Ids (long, ``patches.shape[:-1]``) of the most cosine-similar vocabulary entries."""
        if not self.is_fitted:
            raise RuntimeError(
                "the patch vocabulary is not built: a fresh training run builds it in "
                "method.prepare(batches) before the first step"
            )
        x = F.normalize(patches.float(), dim=-1)
        return (x @ self.codebook.t().to(x.dtype)).argmax(dim=-1)
