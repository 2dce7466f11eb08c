"""DINOv2's losses: DINO CLS-token loss, iBOT masked-patch loss, KoLeo, and teacher centering.

Facts from DINOv2's ``dinov2/loss/{dino_clstoken_loss,ibot_patch_loss,koleo_loss}.py``:

- the teacher's prototype logits become targets either by EMA centering
  (``softmax((t - center) / teacher_temp)``, center EMA momentum 0.9) or by Sinkhorn-Knopp
  (3 iterations); both are computed over the *global* batch when torch.distributed is initialized;
- student targets are cross-entropies ``-sum_k p_teacher * log_softmax(s / student_temp)``
  (student temperature 0.1);
- KoLeo is ``-mean log(d_nn + eps)`` over L2-normalized features, ``d_nn`` the distance to the
  nearest other sample; ``eps`` keeps exact duplicates finite.

The module names and buffer shapes are DINOv2's (``dino_loss.center`` (1, K),
``ibot_patch_loss.center`` (1, 1, K)), so a DINOv2 training state maps onto them key for key.
Losses are computed in float32 whatever the autocast dtype: log-softmax over 65k prototypes in
bf16 loses the small probabilities that carry the signal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CENTERINGS",
    "DINOLoss",
    "KoLeoLoss",
    "cross_entropy",
    "global_count",
    "iBOTPatchLoss",
    "koleo_loss",
    "sinkhorn_knopp",
]

CENTERINGS = ("ema", "sinkhorn_knopp")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default) when a process group is up; a no-op otherwise."""
    if _distributed():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def global_count(n: int, device: torch.device) -> int:
    """Number of rows summed over ranks (ranks may hold different numbers of masked patches)."""
    t = torch.tensor([float(n)], device=device)
    return int(_all_reduce_(t).item())


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    n_total: int | None = None,
) -> torch.Tensor:
    """Sinkhorn-Knopp targets for (n, K) logits, over the rows of *all* ranks.

    With ``Q = exp(logits / temp)``, each iteration rescales every prototype's mass (summed over
    all ranks' rows) to ``1/K``, then every row to ``1/B`` (``B`` rows over all ranks); the result
    is multiplied by ``B``. So each returned row sums to exactly 1 (a distribution over
    prototypes) and, as the iterations converge, every prototype receives ``B/K`` of the batch's
    mass (the equipartition that prevents collapse). ``n_total`` is ``B`` when the caller knows it.

    Overflow guard: each prototype's logits are shifted by their maximum over all ranks before
    ``exp``. The first prototype normalization undoes any per-prototype factor, so the result is
    DINOv2's exactly, but ``exp`` can no longer overflow at small teacher temperatures (DINOv2's
    ``exp(logits / temp)`` is inf, and its targets NaN, once logits/temp passes ~88). A sample
    whose every logit lies ~87/temp below each prototype's best sample underflows to a zero
    target (no loss) instead of a NaN.
    """
    x = teacher_logits.float().t() / teacher_temp  # (K, n): DINOv2's / SwAV's notation
    k = x.shape[0]
    if n_total is None:
        n_total = global_count(x.shape[1], x.device)
    if n_total == 0:
        return x.new_zeros(x.shape).t()
    if x.shape[1]:
        shift = x.amax(dim=1, keepdim=True)
    else:  # no rows on this rank: neutral for the max over ranks
        shift = x.new_full((k, 1), -float("inf"))
    if _distributed():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp(x - shift)
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(n_iterations):
        q /= _all_reduce_(q.sum(dim=1, keepdim=True)).clamp_min_(tiny) * k  # prototypes: 1/K each
        q /= q.sum(dim=0, keepdim=True).clamp_min_(tiny) * n_total  # samples: 1/B each
    q *= n_total  # rows (samples) sum to 1: an assignment
    return q.t()


def cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """Per-row ``-sum_k p_teacher[k] * log_softmax(student / student_temp)[k]`` (float32)."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_p).sum(dim=-1)


class _Centering(nn.Module):
    """Turns teacher logits into targets: EMA centering or Sinkhorn-Knopp (module docstring).

    The EMA center is updated synchronously after the targets are computed (DINOv2 defers the
    all-reduce to the next step; the result is the same center, but a deferred update lives
    outside the state dict and would be lost by a checkpoint taken between the two steps).
    """

    def __init__(
        self,
        center_shape: tuple[int, ...],
        student_temp: float,
        center_momentum: float,
        centering: str,
        sinkhorn_iterations: int,
    ):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.centering = centering
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.register_buffer("center", torch.zeros(center_shape))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(n, K) teacher logits -> (n, K) float32 targets; updates the EMA center."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        t = teacher_logits.float()
        center = self.center.reshape(1, -1).to(t.device)
        probs = F.softmax((t - center) / teacher_temp, dim=-1)
        self.update_center(t)
        return probs

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean of the logits over all ranks' rows.

        Sum and count travel in one all-reduce. A batch with no rows anywhere (no masked patch
        on any rank) leaves the center unchanged instead of dividing by zero.
        """
        t = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])
        stats = torch.cat([t.sum(dim=0), t.new_tensor([t.shape[0]])])
        _all_reduce_(stats)
        count = stats[-1]
        if count.item() == 0:
            return
        mean = (stats[:-1] / count).reshape(self.center.shape)
        self.center.mul_(self.center_momentum).add_(
            mean.to(self.center.device), alpha=1.0 - self.center_momentum
        )

    def extra_repr(self) -> str:
        return (
            f"centering={self.centering!r}, student_temp={self.student_temp}, "
            f"center_momentum={self.center_momentum}, out_dim={self.center.shape[-1]}"
        )


class DINOLoss(_Centering):
    """DINO loss on CLS tokens: cross-entropy summed over (student crop, teacher crop) pairs."""

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "ema",
        sinkhorn_iterations: int = 3,
    ):
        super().__init__(
            (1, out_dim), student_temp, center_momentum, centering, sinkhorn_iterations
        )

    def forward(
        self,
        student_logits: list[torch.Tensor] | tuple[torch.Tensor, ...],
        teacher_probs: list[torch.Tensor] | tuple[torch.Tensor, ...],
    ) -> torch.Tensor:
        """``sum over s in student_logits, t in teacher_probs`` of the batch-mean cross-entropy.

        Each element is (B, K) with row ``i`` belonging to image ``i``; the caller divides by the
        number of pairs (DINOv2's ``n_global_crops_loss_terms + n_local_crops_loss_terms``).
        """
        total = torch.zeros((), device=student_logits[0].device)
        for s in student_logits:
            log_p = F.log_softmax(s.float() / self.student_temp, dim=-1)  # once per student crop
            for t in teacher_probs:
                total = total - (t.float() * log_p).sum(dim=-1).mean()
        return total


class iBOTPatchLoss(_Centering):  # noqa: N801 (DINOv2's name)
    """iBOT loss on the masked patch tokens of the global crops, weighted per image."""

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "ema",
        sinkhorn_iterations: int = 3,
    ):
        super().__init__(
            (1, 1, out_dim), student_temp, center_momentum, centering, sinkhorn_iterations
        )

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_probs: torch.Tensor,
        masks_weight: torch.Tensor,
        n_images: int,
    ) -> torch.Tensor:
        """``sum_j w_j * CE_j / n_images`` over the masked patches ``j``.

        ``masks_weight[j] = 1 / (masked patches of j's image)``, so every masked image counts
        equally whatever its mask size; ``n_images`` is the number of global crops (masked or
        not), as in DINOv2's ``forward_masked``.
        """
        ce = cross_entropy(student_logits, teacher_probs, self.student_temp)
        return (ce * masks_weight.to(ce.dtype)).sum() / n_images


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator (Sablayrolles et al. 2018), DINOv2's regularizer.

    ``-mean_i log(||x_i - x_nn(i)|| + eps)`` over L2-normalized rows, ``nn(i)`` the nearest other
    row (largest inner product). The distance is ``pairwise_distance(..., eps=eps)`` (it adds
    ``eps`` to the difference) and ``eps`` is added again inside the log, as in DINOv2: for exact
    duplicates the value is ``-log(eps * sqrt(D) + eps)`` (large, finite) and the gradient is
    finite too. Computed in float32. Fewer than 2 rows have no neighbour: the loss is 0.
    """
    x = x.float()
    n = x.shape[0]
    if n < 2:
        return x.sum() * 0.0  # keeps the graph connected (DDP) without inventing a value
    x = F.normalize(x, p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # below any cosine: a row is never its own neighbour
        nn_idx = dots.argmax(dim=1)
    d = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
    return -torch.log(d + eps).mean()


class KoLeoLoss(nn.Module):
    """Module form of :func:`koleo_loss` (DINOv2's ``KoLeoLoss``)."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return koleo_loss(x, self.eps)
