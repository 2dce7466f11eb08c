"""Building models: ``create_model`` by zoo name or from a checkpoint, and ``count_params``.

The named configs live in ``registry`` (re-exported here: ``ZOO``, ``get_config``,
``list_models``, ...); checkpoint reading and writing in ``checkpoints``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoints as ckpt
from .registry import (
    ZOO,
    ZooEntry,
    get_config,
    get_entry,
    is_zoo_name,
    list_models,
    register_model,
)
from .vit import VisionTransformer, ViTConfig

__all__ = [
    "ZOO",
    "ZooEntry",
    "count_params",
    "create_model",
    "get_config",
    "get_entry",
    "is_zoo_name",
    "list_models",
    "register_model",
]

_ZOO = ZOO  # the old private name, still imported by callers; use ZOO or is_zoo_name()


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".pkl", ".tar")


def looks_like_path(name: str | Path) -> bool:
    """Whether a MODEL argument that is no zoo name was meant as a file or folder."""
    if isinstance(name, Path):
        return True
    text = str(name)
    return (
        "/" in text
        or "\\" in text
        or text.startswith(("~", "."))
        or text.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


def count_params(config: ViTConfig) -> int:
    """Exact parameter count, computed on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = VisionTransformer(config)
    return sum(p.numel() for p in model.parameters())


def create_model(
    name_or_path: str | Path,
    weights: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    random_init: bool = False,
    checkpoint_key: str | None = None,
    seed: int | None = None,
    **overrides,
) -> VisionTransformer:
    """Build a model by zoo name or from a checkpoint, weights loaded strictly.

    ``name_or_path``: a zoo name (``vssl models``), or a checkpoint that describes itself (a
    transformers directory, a vssl ``.safetensors``, or a native ``.pth`` whose shapes match one
    zoo architecture). ``overrides`` (``depth=2``, ``img_size=518``, ...) change the architecture
    before the weights load. Weights are read memory-mapped into a model built on the meta device,
    so the model is never held twice. Weights holding NaN or Inf are refused, naming the tensors.
    ``seed``: a random-init model is initialized from this seed (the same network every call).
    Returns the model in eval mode.
    """
    if isinstance(name_or_path, Path) or not is_zoo_name(str(name_or_path)):
        path = Path(name_or_path)
        if not path.exists():
            if looks_like_path(name_or_path):
                raise ckpt.CheckpointError(
                    f"{path} does not exist (a checkpoint file or folder was expected there)"
                )
            get_entry(str(name_or_path))  # raises "unknown model" with suggestions
        if weights is not None:
            raise ValueError(
                f"{path} is itself a checkpoint; pass either a zoo name with weights=, or the "
                "checkpoint alone"
            )
        return ckpt.load_model(
            path, dtype=dtype, device=device, checkpoint_key=checkpoint_key, **overrides
        )

    entry = get_entry(str(name_or_path))
    config = entry.config.replace(**overrides) if overrides else entry.config
    if weights is None:
        if not (random_init or entry.random_init_ok):
            raise ValueError(
                f"{entry.name} has released weights but none were given: pass weights=PATH "
                "(--weights), or random_init=True (--random-init) for an untrained model"
            )
        if seed is None:
            model = VisionTransformer(config)
        else:  # the same network for the same seed, without touching the caller's RNG
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = VisionTransformer(config)
        model = model.to(device=device, dtype=ckpt.parse_dtype(dtype) or torch.float32)
        return model.eval()
    return ckpt.load_model(
        weights,
        config=config,
        dtype=dtype,
        device=device,
        checkpoint_key=checkpoint_key,
        explicit_overrides=overrides,
        zoo_name=entry.name,
    )
