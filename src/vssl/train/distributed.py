"""torchrun environment -> process group and device; DDP / FSDP2 wrapping; a teardown that exits 0.

One process per device, as torchrun starts them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). gloo on
CPU, nccl on CUDA. Wrapping uses the existing engines only: ``DistributedDataParallel``, or FSDP2's
``fully_shard`` on every ViT block, then on each module that owns blocks, then on the root.

Teardown order matters with gloo: destroying the process group while a DDP reducer (or FSDP
state) still references it, or leaving it to interpreter shutdown, can abort the process at exit
(SIGABRT, a non-zero exit code for a finished run). :func:`teardown` therefore synchronizes,
drops the wrapper, collects garbage, and only then destroys the group.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "STRATEGIES", "setup", "teardown", "unwrap", "wrap"]

STRATEGIES = ("none", "ddp", "fsdp2")
# backbone entry points besides forward that FSDP2 must treat as forwards (unshard around them)
_FORWARD_METHODS = ("forward_features", "get_intermediate_layers")


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: ``backend`` is None for a single process without a group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device: str | torch.device | None = None) -> DistInfo:
    """Read torchrun's environment; initialize the process group when ``WORLD_SIZE > 1``.

    Idempotent: an already initialized group is used as it is. ``device`` overrides the choice of
    ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    if device is None:
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = None
    if world_size > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend=backend, **kwargs)
        backend = dist.get_backend()
    return DistInfo(
        rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend
    )


def _owns_blocks(m: nn.Module) -> bool:
    return isinstance(getattr(m, "blocks", None), nn.ModuleList) and len(m.blocks) > 0


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (DDP does this itself; FSDP2
    shards each rank's local tensors, so they must agree before ``fully_shard``)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_meta:
            continue
        dist.broadcast(t.data, src=src)


def wrap(
    module: nn.Module,
    strategy: str,
    info: DistInfo | None = None,
    *,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """Return ``module`` ready for data-parallel training with ``strategy``.

    ``"none"``: the module itself (one process). ``"ddp"``: ``DistributedDataParallel`` (the
    forward must go through the returned wrapper). ``"fsdp2"``: ``fully_shard`` applied in place on
    every block of every module with a ``blocks`` list (the ViTs, a method's copies included), then on
    those modules, then on ``module`` (the root, whose forward must be the one called); rank 0's
    weights are broadcast first so the shards agree.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    info = info or setup()
    if strategy == "none":
        if info.distributed:
            raise ValueError(
                f"strategy 'none' with WORLD_SIZE={info.world_size} would train {info.world_size} "
                "independent models: use strategy 'ddp' or 'fsdp2'"
            )
        return module
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"strategy {strategy!r} needs a process group: launch with torchrun "
            "(and call vssl.train.distributed.setup())"
        )
    if info.device.type == "cuda":
        # BatchNorm (e.g. in a projection head) normalizes over the global batch;
        # SyncBatchNorm is CUDA-only, so on CPU ranks each normalizes over its own batch
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(
            module, device_ids=device_ids, find_unused_parameters=find_unused_parameters
        )
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    broadcast_module(module)
    owners = [m for m in module.modules() if m is not module and _owns_blocks(m)]
    for m in owners:
        for blk in m.blocks:
            fully_shard(blk)
        fully_shard(m)
        # methods call the backbone's forward_features directly: FSDP2 must gather around it too
        for name in _FORWARD_METHODS:
            if callable(getattr(m, name, None)):
                register_fsdp_forward_method(m, name)
    fully_shard(module)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 works in place: the module itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def teardown(wrapped: nn.Module | None = None, *, barrier: bool = True) -> None:
    """Barrier, drop ``wrapped`` (pass the last reference), collect, destroy the process group.

    ``barrier=False`` after an error: the other ranks may be inside another collective, and a
    barrier would then hang instead of letting the failure surface. Safe to call without a
    process group (then it only collects).
    """
    initialized = dist.is_available() and dist.is_initialized()
    if initialized and barrier:
        dist.barrier()
    del wrapped
    gc.collect()
    if initialized:
        dist.destroy_process_group()
