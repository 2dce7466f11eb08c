"""Shared fixtures. Everything is offline: tiny random models are built here, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real images); tests that need it skip when a clone has no ../shared."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found: these tests need the real images in ../shared/data")
    return SHARED_DATA


def perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its init (LayerNorm ones, zero biases, LayerScale constants), so
    that a wrongly mapped tensor cannot hide behind a symmetric initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module
