"""vssl: language-free visual representation learning (Web-SSL, DINOv2, MAE)."""

from .models import (
    CheckpointError,
    VisionTransformer,
    ViTConfig,
    count_params,
    create_model,
    export_hf,
    export_native,
    get_config,
    list_models,
    read_checkpoint,
    save_vssl,
)

__version__ = "0.1.0"

__all__ = [
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
    "__version__",
]
