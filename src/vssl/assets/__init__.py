"""Files shipped inside the package: the sample images `vssl embed` uses when given no --input."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["sample_images_dir"]


def sample_images_dir() -> Path:
    """The folder of bundled sample JPEGs (synthetic; made by scripts/make_sample_images.py)."""
    path = resources.files(__name__).joinpath("samples")
    if not isinstance(path, Path):  # e.g. a zipped install: no real folder to walk
        raise RuntimeError(
            f"vssl's sample images are not on the file system ({path}); install vssl unzipped"
        )
    if not path.is_dir():
        raise RuntimeError(f"vssl's sample images are missing ({path}); reinstall vssl")
    return path
