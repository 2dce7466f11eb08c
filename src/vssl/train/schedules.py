"""Per-step schedules with DINOv2's ``CosineScheduler`` semantics.

DINOv2 drives every scheduled value (the trainer's learning rate and weight decay, and its
method's own schedules) from one schedule shape indexed by the iteration: ``freeze_iters`` zeros, then a linear warm-up of
``warmup_iters`` values (``numpy.linspace(start_warmup_value, base_value, warmup_iters)``: the last
warm-up value is ``base_value`` itself), then a half cosine from ``base_value`` to ``final_value``
over the remaining iterations; any step at or past ``total_iters`` gives ``final_value``.
The value is computed in closed form (no per-iteration table: a 7B run has ~10^6 steps).
"""

from __future__ import annotations

import math

__all__ = ["CosineSchedule"]


class CosineSchedule:
    """``schedule[step] -> float``; see the module docstring for the exact shape."""

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ):
        total_iters, warmup_iters, freeze_iters = (
            int(total_iters),
            int(warmup_iters),
            int(freeze_iters),
        )
        if min(total_iters, warmup_iters, freeze_iters) < 0:
            raise ValueError(
                f"iteration counts must be >= 0, got total_iters={total_iters}, "
                f"warmup_iters={warmup_iters}, freeze_iters={freeze_iters}"
            )
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError(
                f"warmup_iters ({warmup_iters}) + freeze_iters ({freeze_iters}) exceed total_iters "
                f"({total_iters}): shorten the warm-up or lengthen the run"
            )
        self.base_value = float(base_value)
        self.final_value = float(final_value)
        self.total_iters = total_iters
        self.warmup_iters = warmup_iters
        self.start_warmup_value = float(start_warmup_value)
        self.freeze_iters = freeze_iters

    def __len__(self) -> int:
        return self.total_iters

    def __getitem__(self, step: int) -> float:
        step = int(step)
        if step < 0:
            raise IndexError(f"schedule step must be >= 0, got {step}")
        if step >= self.total_iters:
            return self.final_value
        if step < self.freeze_iters:
            return 0.0
        i = step - self.freeze_iters
        if i < self.warmup_iters:
            if self.warmup_iters == 1:  # linspace(a, b, 1) == [a]
                return self.start_warmup_value
            frac = i / (self.warmup_iters - 1)
            return self.start_warmup_value + (self.base_value - self.start_warmup_value) * frac
        i -= self.warmup_iters
        n = self.total_iters - self.warmup_iters - self.freeze_iters
        return self.final_value + 0.5 * (self.base_value - self.final_value) * (
            1.0 + math.cos(math.pi * i / n)
        )

    def __repr__(self) -> str:
        return (
            f"CosineSchedule(base_value={self.base_value}, final_value={self.final_value}, "
            f"total_iters={self.total_iters}, warmup_iters={self.warmup_iters}, "
            f"start_warmup_value={self.start_warmup_value}, freeze_iters={self.freeze_iters})"
        )
