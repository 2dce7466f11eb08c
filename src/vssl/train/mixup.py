"""Mixup / CutMix with label smoothing, as timm's ``Mixup`` (``mode="batch"``) does it.

Written by hand because timm does not import in this environment (docs/architecture.md,
Fine-tuning); the semantics are timm's (``timm/data/mixup.py``), which MAE, BEiT and DeiT use:

- targets: one-hot with label smoothing, ``off = smoothing / C``, ``on = 1 - smoothing + off``;
- per batch, with probability ``prob``: when both alphas are > 0, CutMix with probability
  ``switch_prob`` else Mixup; ``lam ~ Beta(alpha, alpha)`` of the chosen one;
- Mixup: ``x = lam * x + (1 - lam) * x.flip(0)``;
- CutMix: a box of ``sqrt(1 - lam)`` of each side, centred uniformly at random, clipped to the
  image, takes the pixels of ``x.flip(0)``; ``lam`` is then corrected to the area actually kept,
  ``1 - box_area / image_area`` (timm's ``correct_lam``);
- mixed targets ``lam * y + (1 - lam) * y.flip(0)``, trained with soft-target cross-entropy.

The batch is mixed with itself reversed (timm's batch mode): no second batch to load.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Mixup", "cutmix_box", "smooth_one_hot", "soft_target_cross_entropy"]


def smooth_one_hot(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Class indices (B,) -> float (B, C) rows of ``smoothing / C``, ``1 - smoothing + smoothing / C``
    at the target (timm's ``one_hot`` with ``off_value``/``on_value``)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    out = torch.full((target.shape[0], num_classes), off, device=target.device)
    return out.scatter_(1, target.long().view(-1, 1), on)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``sum_c -target_c * log_softmax(logits)_c`` (timm's
    ``SoftTargetCrossEntropy``)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def cutmix_box(
    height: int, width: int, lam: float, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: timm's ``rand_bbox``: sides ``int(side * sqrt(1 - lam))``, centre
    uniform in the image, the box clipped to it (so it can be smaller near a border)."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    x0, x1 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return y0, y1, x0, x1


@dataclass
class Mixup:
    """``(x, target) -> (mixed x, soft targets)``; see the module docstring for the rules.

    ``mixup_alpha`` / ``cutmix_alpha``: 0 turns that one off (both 0: only label smoothing).
    The defaults are MAE's fine-tuning recipe (0.8, 1.0, prob 1, switch 0.5, smoothing 0.1).
    """

    num_classes: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(
                f"mixup and cutmix alphas must be >= 0 (0 = off), got {self.mixup_alpha}, "
                f"{self.cutmix_alpha}"
            )
        if not 0.0 <= self.prob <= 1.0 or not 0.0 <= self.switch_prob <= 1.0:
            raise ValueError(
                f"prob and switch_prob must be in [0, 1], got {self.prob}, {self.switch_prob}"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def sample(self, rng: np.random.Generator) -> tuple[float, bool]:
        """``(lam, use_cutmix)`` for one batch (timm's ``_params_per_batch``)."""
        lam, use_cutmix = 1.0, False
        if self.active and rng.random() < self.prob:
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                use_cutmix = bool(rng.random() < self.switch_prob)
                alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
            elif self.mixup_alpha > 0:
                alpha = self.mixup_alpha
            else:
                use_cutmix, alpha = True, self.cutmix_alpha
            lam = float(rng.beta(alpha, alpha))
        return lam, use_cutmix

    def __call__(
        self, x: torch.Tensor, target: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Mix ``x`` (B, C, H, W) in place and return ``(x, soft targets (B, C), lam)``.

        ``lam`` is the weight of each image's own label (after CutMix's area correction)."""
        lam, use_cutmix = self.sample(rng)
        if lam != 1.0:
            if use_cutmix:
                y0, y1, x0, x1 = cutmix_box(x.shape[-2], x.shape[-1], lam, rng)
                x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / float(x.shape[-2] * x.shape[-1])
            else:
                flipped = x.flip(0).mul_(1.0 - lam)  # a copy, taken before x changes
                x.mul_(lam).add_(flipped)
        y = smooth_one_hot(target, self.num_classes, self.label_smoothing)
        return x, y * lam + y.flip(0) * (1.0 - lam), lam
