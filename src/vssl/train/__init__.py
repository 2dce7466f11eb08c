"""The trainer shared by every method (docs/architecture.md): a method computes losses; this
package owns loops, devices, schedules, checkpoints and logs, and knows no method.

- loop:        ``TrainConfig``, ``Trainer.fit()``
- data:        ``TrainData`` (deterministic batches of a method's views, exact resume)
- optim:       parameter groups (layer decay, no wd on norms/biases, frozen sets), AdamW
- schedules:   ``CosineSchedule`` (DINOv2's CosineScheduler)
- checkpoint:  atomic torch.distributed.checkpoint saves with a completeness manifest,
               ``latest_checkpoint`` (the newest intact one), restricted metadata unpickling
- distributed: torchrun setup, DDP / FSDP2 wrapping, safe teardown
"""

from .checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from .data import TrainData
from .distributed import DistInfo, setup, teardown, wrap
from .loop import (
    NonFiniteLossError,
    OutputDirError,
    TrainConfig,
    Trainer,
    TrainingAborted,
    check_output_dir,
)
from .optim import build_optimizer, param_groups
from .schedules import CosineSchedule

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "OutputDirError",
    "TrainingAborted",
    "check_output_dir",
    "find_checkpoint",
    "verify_checkpoint",
    "CosineSchedule",
    "DistInfo",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainData",
    "Trainer",
    "build_optimizer",
    "latest_checkpoint",
    "load_checkpoint",
    "param_groups",
    "save_checkpoint",
    "setup",
    "teardown",
    "wrap",
]
