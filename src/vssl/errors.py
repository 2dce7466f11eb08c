"""Exceptions shared across vssl's packages (defined once, re-exported where they are raised)."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint that cannot be read, written or loaded as asked; the message says what to change.

    One class for model weights (``vssl.models.checkpoints``: reading, converting, strict loading)
    and training checkpoints (``vssl.train.checkpoint``: saving, resuming). It is a ValueError (what
    the model loaders raised) and a RuntimeError (what the trainer raised), so an ``except`` written
    for either keeps catching it.
    """
