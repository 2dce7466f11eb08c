"""Models: one ViT (vit.py), the named configs (registry.py), building them (zoo.py), checkpoint
I/O (checkpoints.py)."""

from .checkpoints import (
    Checkpoint,
    CheckpointError,
    export_hf,
    export_native,
    read_checkpoint,
    save_vssl,
)
from .vit import VisionTransformer, ViTConfig
from .zoo import count_params, create_model, get_config, list_models

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ViTConfig",
    "VisionTransformer",
    "count_params",
    "create_model",
    "export_hf",
    "export_native",
    "get_config",
    "list_models",
    "read_checkpoint",
    "save_vssl",
]
