"""The contract every pretraining method keeps, and the registry that finds methods by name.

A method computes losses; the trainer (:mod:`vssl.train`) owns loops, devices, precision,
schedules of the optimizer and checkpoints, and knows no method (docs/architecture.md, "The
method contract"). A method is an ``nn.Module`` that declares:

- ``config_class``: the dataclass of the recipe's ``method:`` section (validated key by key);
- ``student``: the modules the optimizer trains (an ``nn.ModuleDict``; its child ``backbone`` gets
  layer-wise lr decay and is the encoder being trained);
- :meth:`~Method.views`: the inputs it needs, as a :class:`~vssl.data.views.ViewSpec` (multi-crop
  + iBOT masks, one view + a random mask, two halves, image + caption); ``vssl.data`` builds the
  batches from it;
- :meth:`~Method.plan`: called once with the run's :class:`StepPlan`, so that schedules the method
  owns (DINOv2's teacher temperature and momentum) are functions of the step;
- :meth:`~Method.prepare` (optional): ``prepare(data, run_dir)`` before the first step of every
  start (fresh, or resumed after the checkpoint is loaded): the method may derive state from the
  training data (``data.batches(epoch)``; SplitMask's patch vocabulary) or keep files in the run
  folder. State in buffers is checkpointed and copied by the trainer from rank 0 to every rank;
- ``forward(batch, step) -> {"loss": scalar, <term>: detached scalar, ...}``;
- :meth:`~Method.after_step`: what happens after each optimizer step (EMA teacher, ...);
- :meth:`~Method.scheduled`: the method's scheduled values at a step, logged by the trainer;
- :meth:`~Method.frozen_parameters`: parameters held still until a step (DINOv2's prototypes);
- :meth:`~Method.encoder`: the backbone to monitor and export (DINOv2: the teacher's; MAE: the
  encoder);
- :meth:`~Method.load_pretrained`: continue from released weights.

:class:`MethodBase` gives the do-nothing defaults of the optional hooks; a method may use it or
write them itself (nothing else is inherited). ``@register_method("name")`` makes the method
available to recipes (``method.name: name``), as timm's ``@register_model`` does for models.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "Freeze",
    "Method",
    "MethodBase",
    "StepPlan",
    "UnknownMethodError",
    "get_method",
    "list_methods",
    "register_method",
]


@dataclass(frozen=True)
class StepPlan:
    """The run's length as the trainer counts it: what a method's own schedules need."""

    total_steps: int
    iters_per_epoch: int
    global_batch_size: int = 1

    def epochs_to_steps(self, epochs: float) -> int:
        """Fractional epochs -> optimizer steps (rounded, as the trainer's warm-ups are)."""
        return int(round(epochs * self.iters_per_epoch))


@dataclass
class Freeze:
    """``params`` get zeroed gradients and lr 0 for steps ``< until`` (0-based)."""

    params: list = field(default_factory=list)
    until: int = 0


@runtime_checkable
class Method(Protocol):
    """What the trainer and ``vssl pretrain`` rely on (module docstring)."""

    config_class: ClassVar[type]
    student: nn.Module

    def views(self) -> Any: ...

    def plan(self, plan: StepPlan) -> None: ...

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]: ...

    def after_step(self, step: int) -> None: ...

    def scheduled(self, step: int) -> dict[str, float]: ...

    def frozen_parameters(self) -> list[Freeze]: ...

    def encoder(self) -> nn.Module: ...

    def load_pretrained(self, checkpoint: Any) -> dict: ...


class MethodBase(nn.Module):
    """Defaults for the optional hooks of :class:`Method` (no teacher, nothing scheduled or
    frozen, the student's backbone is the encoder)."""

    config_class: ClassVar[type]

    def plan(self, plan: StepPlan) -> None:
        self.step_plan = plan

    def prepare(self, data: Any, run_dir: Any) -> None:
        """Nothing to derive from the data (SplitMask overrides this)."""
        return None

    def after_step(self, step: int) -> None:
        return None

    def scheduled(self, step: int) -> dict[str, float]:
        return {}

    def frozen_parameters(self) -> list[Freeze]:
        return []

    def encoder(self) -> nn.Module:
        return self.student["backbone"]


def global_crop_pairs(batch: dict, method: str) -> torch.Tensor:
    """``batch['global']``, checked to be what a two-view method takes: normalized float crops,
    crop 1 of every image then crop 2 (an even number of rows)."""
    if "global" not in batch:
        raise KeyError(f"the batch has no 'global' crops: {method} needs 2 per image")
    glob = batch["global"]
    if not torch.is_floating_point(glob):
        raise TypeError(
            "batch['global'] is uint8: apply MultiCropPhotometric (normalization) "
            "to the collated batch before the method"
        )
    if glob.shape[0] % 2:
        raise ValueError(
            f"{method} takes 2 global crops per image; batch['global'] has "
            f"{glob.shape[0]} rows, not an even number"
        )
    return glob


def load_backbone_strictly(backbone: nn.Module, checkpoint: Any) -> Any:
    """Load any checkpoint :func:`vssl.models.checkpoints.read_checkpoint` reads (or its result)
    into ``backbone``, strictly: a file without encoder weights, or with tensors that do not fit,
    is refused naming it. Returns the :class:`~vssl.models.checkpoints.Checkpoint` (its heads
    are the caller's to use). The encoder part of the methods' ``load_pretrained``."""
    from ..models.checkpoints import Checkpoint, CheckpointError, check_state_dict, read_checkpoint

    ck = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    if not ck.state_dict:
        raise CheckpointError(f"{ck.source} holds no encoder weights")
    check_state_dict(backbone, ck.state_dict, ck.source)
    backbone.load_state_dict(dict(ck.state_dict), strict=True)
    return ck


class UnknownMethodError(KeyError, ValueError):
    """A method name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


_REGISTRY: dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: make a method available as ``method.name: <name>`` in recipes."""

    def add(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__name__}")
        if not hasattr(cls, "config_class"):
            raise TypeError(
                f"{cls.__name__} declares no config_class (the recipe's method: section)"
            )
        cls.method_name = name
        _REGISTRY[name] = cls
        return cls

    return add


def _load_builtin() -> None:
    """Import the methods shipped with vssl (they register themselves)."""
    from . import clip, dinov2, mae, simclr, splitmask  # noqa: F401


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_method(name: str) -> type:
    """The method class registered as ``name``; an unknown name lists the registered ones."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownMethodError(
            f"unknown method {name!r}.{hint} Registered methods: {', '.join(sorted(_REGISTRY))}"
        ) from None
