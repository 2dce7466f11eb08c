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


@pytest.fixture
def listing(shared_data, tmp_path):
    """A path list of 80 real CIFAR images (8 per class): the recipes' end-to-end runs."""
    rows = []
    for cls in sorted(p.name for p in (shared_data / "cifar10-subset" / "train").iterdir()):
        rows += sorted((shared_data / "cifar10-subset" / "train" / cls).glob("*.jpg"))[:8]
    path = tmp_path / "train.txt"
    path.write_text("".join(f"{p}\n" for p in rows))
    return path


def perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its init (LayerNorm ones, zero biases, LayerScale constants), so
    that a wrongly mapped tensor cannot hide behind a symmetric initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


@pytest.fixture
def torchrun_pretrain(tmp_path):
    """The command prefix that runs `vssl pretrain` in 2 gloo processes under torchrun (through a
    launcher script, independent of the CLI wiring): append the recipe and its overrides."""
    import sys

    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import argparse, sys\nfrom vssl.pretrain import add_pretrain_parser\n"
        "p = argparse.ArgumentParser(prog='vssl')\nadd_pretrain_parser(p.add_subparsers())\n"
        "a = p.parse_args(sys.argv[1:])\nsys.exit(a.func(a))\n"
    )
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        str(launcher),
        "pretrain",
    ]
