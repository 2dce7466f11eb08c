"""Training checkpoints: torch.distributed.checkpoint (DCP) for model + optimizer, written atomically.

Layout under a run directory::

    run/ckpt/step_00000120/         a complete checkpoint (DCP files + trainer_state.json)
    run/ckpt/step_00000150.tmp/     a save in progress, or the remains of one that crashed

A save writes everything into ``step_N.tmp/`` (DCP shards from every rank, then
``trainer_state.json`` last), waits for every rank, and only then rank 0 renames the folder to
``step_N/`` (a rename is atomic on POSIX). A crash at any point leaves at most a ``.tmp`` folder,
which :func:`latest_checkpoint` ignores, so the last good checkpoint is always the one resumed.
The oldest complete checkpoints beyond ``keep_last`` are deleted after a successful save.

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict.get_state_dict`` /
``set_state_dict``: plain, DDP-replicated and FSDP2-sharded (DTensor) parameters are saved and
loaded the same way, and a checkpoint can be resumed on another number of ranks (DCP reshards).
The side file ``trainer_state.json`` holds what is not a tensor: step, epoch, seed, world size,
the training config.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .._io import atomic_write
from ..errors import CheckpointError  # re-exported: vssl.train.CheckpointError

__all__ = [
    "CheckpointError",
    "STATE_FILE",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

STATE_FILE = "trainer_state.json"
CKPT_DIR = "ckpt"
_NAME = re.compile(r"^step_(\d+)$")


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call that it 'assumes a single process' when there is no process group:
    that is the intent here, so keep the log readable."""
    with warnings.catch_warnings():
        if not _dist():
            warnings.filterwarnings(
                "ignore", message=".*assuming the intent is to (save|load) in a single process"
            )
        yield


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """``run_dir/ckpt/step_<step>`` (8 digits, so names sort by step)."""
    return Path(run_dir) / CKPT_DIR / f"step_{int(step):08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``.tmp`` leftovers are not listed)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_state(tmp: Path, meta: dict) -> None:
    text = json.dumps(meta, indent=1, sort_keys=True, default=str)
    atomic_write(tmp / STATE_FILE, lambda p: Path(p).write_text(text))


def save_checkpoint(
    directory: str | os.PathLike,
    state: dict[str, Any],
    *,
    keep_last: int | None = None,
) -> Path:
    """Write ``state`` to ``directory`` atomically; call it on every rank.

    ``state``: ``{"model": nn.Module, "optimizer": Optimizer (optional), "meta": JSON-able dict}``.
    ``directory`` is the final folder (``checkpoint_path(run_dir, step)``); its parent holds the
    run's checkpoints, of which the newest ``keep_last`` are kept (None: all).
    """
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    model, optimizer, meta = _unpack(state)
    if _rank() == 0:
        if tmp.exists():  # remains of a crashed save of the same step
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = _state_dicts(model, optimizer)
    payload = {"model": model_sd}
    if optim_sd is not None:
        payload["optim"] = optim_sd
    with _quiet_single_process():
        dcp.save(payload, checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        _write_state(tmp, meta)  # written last: its presence marks the folder complete
        if final.exists():  # re-saving a step (e.g. a resumed run): swap, never a half state
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
        if keep_last is not None:
            _prune(final.parent, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    ckpts = list_checkpoints(root.parent)
    for p in ckpts[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob("step_*.tmp"):  # dead: this process completed its own save
        shutil.rmtree(p, ignore_errors=True)


def _unpack(state: dict[str, Any]) -> tuple[nn.Module, torch.optim.Optimizer | None, dict]:
    unknown = sorted(set(state) - {"model", "optimizer", "meta"})
    if unknown or "model" not in state:
        raise TypeError(
            f"checkpoint state takes 'model' (required), 'optimizer', 'meta'; got {sorted(state)}"
        )
    return state["model"], state.get("optimizer"), dict(state.get("meta") or {})


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None):
    if optimizer is None:
        return get_state_dict(model, [])[0], None
    return get_state_dict(model, optimizer)


def read_meta(directory: str | os.PathLike) -> dict:
    """The ``trainer_state.json`` of a complete checkpoint."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not a complete checkpoint (no {STATE_FILE}): a save was interrupted; "
            f"resume from latest_checkpoint(run_dir) instead"
        )
    return json.loads(path.read_text())


def load_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> dict:
    """Load a checkpoint into ``state``'s model (and optimizer) in place; returns its meta dict.

    Strict for the model: a key the model has and the checkpoint lacks, or the reverse, is an
    error naming the keys. Optimizer state may lack entries for parameters that never received a
    gradient (AdamW keeps no state for them).
    """
    directory = Path(directory)
    meta = read_meta(directory)
    model, optimizer, _ = _unpack(state)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    saved = set(dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata)
    saved_model = {k[len("model.") :] for k in saved if k.startswith("model.")}
    missing = sorted(set(model_sd) - saved_model)
    unexpected = sorted(saved_model - set(model_sd))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {directory} does not match the model: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)}); resume with the same "
            f"model and method settings, or start a new output_dir"
        )
    payload = {"model": model_sd}
    if optimizer is not None:
        if not any(k.startswith("optim.") for k in saved):
            raise CheckpointError(f"checkpoint {directory} holds no optimizer state")
        payload["optim"] = optim_sd
        impl = [{k: g.get(k) for k in ("foreach", "fused")} for g in optimizer.param_groups]
    with _quiet_single_process():
        dcp.load(
            payload,
            checkpoint_id=str(directory),
            planner=DefaultLoadPlanner(allow_partial_load=True),
        )
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=payload["model"], optim_state_dict={})
    else:
        set_state_dict(
            model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"]
        )
        for g, flags in zip(optimizer.param_groups, impl):  # keep this machine's kernels
            g.update(flags)
    return meta
