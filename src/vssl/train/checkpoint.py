"""Training checkpoints: torch.distributed.checkpoint (DCP) for model + optimizer, written atomically.

Layout under a run directory::

    run/ckpt/step_00000120/         a complete checkpoint (DCP files + trainer_state.json)
    run/ckpt/step_00000150.tmp/     a save in progress, or the remains of one that crashed

A save writes everything into ``step_N.tmp/`` (DCP shards from every rank, ``trainer_state.json``,
then ``manifest.json`` last: every file of the checkpoint with its size, the proof that it is
complete), waits for every rank, and only then rank 0 renames the folder to ``step_N/`` (a rename
is atomic on POSIX). A crash at any point leaves at most a ``.tmp`` folder, which
:func:`latest_checkpoint` ignores; a save that fails (disk full, permission) removes its ``.tmp``
and raises :class:`CheckpointError` (``no space left on device ... (needed ~N MB)``), so the last
good checkpoint is always the one resumed. The oldest checkpoints beyond ``keep_last`` are deleted
after a successful save, the manifest (the proof) first, then the other files: a deletion cut
short never leaves a folder that passes for complete.

:func:`latest_checkpoint` returns the newest *intact* checkpoint: its manifest's files exist with
their sizes (checkpoints written before manifests: ``trainer_state.json``, ``.metadata`` and every
shard the metadata names, long enough for its entries). :func:`find_checkpoint` also says which
newer ones were skipped and why; :func:`load_checkpoint` turns a damaged file into a
:class:`CheckpointError` naming it.

Untrusted run folders: DCP reads ``.metadata`` with plain ``pickle`` and the non-tensor entries
(optimizer hyper-parameters) with ``torch.load(weights_only=False)``, so a crafted checkpoint would
run code on resume. Here ``.metadata`` goes through :class:`_MetadataUnpickler` (DCP's metadata
dataclasses, torch sizes / dtypes / layouts and plain containers, nothing else) and the
non-tensor entries through ``torch.load(weights_only=True)``.

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict.get_state_dict`` /
``set_state_dict``: plain, DDP-replicated and FSDP2-sharded (DTensor) parameters are saved and
loaded the same way, and a checkpoint can be resumed on another number of ranks (DCP reshards).
The side file ``trainer_state.json`` holds what is not a tensor: step, epoch, seed, world size,
the training config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import io
import json
import os
import pickle
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
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .._io import atomic_write
from ..errors import CheckpointError  # re-exported: vssl.train.CheckpointError

__all__ = [
    "CheckpointDamagedError",
    "CheckpointError",
    "CheckpointWriteError",
    "MANIFEST_FILE",
    "STATE_FILE",
    "checkpoint_path",
    "find_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_dcp_metadata",
    "save_checkpoint",
    "verify_checkpoint",
]

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
METADATA_FILE = ".metadata"
CKPT_DIR = "ckpt"
_NAME = re.compile(r"^step_(\d+)$")


class CheckpointDamagedError(CheckpointError):
    """A checkpoint folder that is incomplete, damaged or crafted (the message names the file):
    the trainer falls back to an older one."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, permission, I/O error): the partial save was
    removed and the previous checkpoint kept. A CheckpointError, and an OSError."""


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


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """Every ``step_N`` folder under ``root`` (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of a run that carry a completeness proof (``manifest.json``, or the
    ``trainer_state.json`` of a checkpoint written before manifests), oldest first; ``.tmp``
    leftovers are not listed. :func:`verify_checkpoint` says whether one is intact."""
    return [
        p
        for _, p in _step_folders(Path(run_dir) / CKPT_DIR)
        if (p / MANIFEST_FILE).is_file() or (p / STATE_FILE).is_file()
    ]


def find_checkpoint(
    run_dir: str | os.PathLike, *, before: int | None = None
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """``(newest intact checkpoint or None, [(newer checkpoint skipped, why), ...])``; with
    ``before``, only checkpoints of earlier steps are considered."""
    skipped = []
    for step, p in reversed(_step_folders(Path(run_dir) / CKPT_DIR)):
        if before is not None and step >= before:
            continue
        why = verify_checkpoint(p)
        if why is None:
            return p, skipped
        skipped.append((p, why))
    return None, skipped


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint of ``run_dir`` (:func:`verify_checkpoint`), or None."""
    return find_checkpoint(run_dir)[0]


def verify_checkpoint(directory: str | os.PathLike) -> str | None:
    """None when ``directory`` is a complete, intact checkpoint; otherwise why it is not.

    With a manifest: every file it lists exists with its size, and ``trainer_state.json`` and
    ``.metadata`` read. Without one (written before manifests): ``trainer_state.json`` reads and
    every shard file ``.metadata`` names exists and is long enough for its entries. Contents are
    checked when loading (:func:`load_checkpoint`).
    """
    d = Path(directory)
    if not d.is_dir():
        return "not a folder"
    manifest = d / MANIFEST_FILE
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
            files = {str(k): int(v) for k, v in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{MANIFEST_FILE} is unreadable ({type(e).__name__})"
        for name in (STATE_FILE, METADATA_FILE):
            if name not in files:
                return f"{MANIFEST_FILE} does not list {name}"
        for name, size in files.items():
            f = d / name
            if Path(name).name != name:
                return f"{MANIFEST_FILE} names {name!r}, outside the checkpoint folder"
            if not f.is_file():
                return f"{name} is missing"
            actual = f.stat().st_size
            if actual != size:
                return f"{name} has {actual:,} bytes, {MANIFEST_FILE} says {size:,} (damaged)"
    elif not (d / STATE_FILE).is_file():
        return f"no {MANIFEST_FILE} or {STATE_FILE}: a save or a deletion was cut short"
    try:
        json.loads((d / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({type(e).__name__})"
    try:
        md = read_dcp_metadata(d)
    except CheckpointError as e:
        return str(e).replace(f"{d}{os.sep}", "")
    ends: dict[str, int] = {}
    for info in (getattr(md, "storage_data", None) or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        ends[rel] = max(ends.get(rel, 0), end)
    for rel, end in sorted(ends.items()):
        f = d / rel
        if Path(rel).name != rel:
            return f"{METADATA_FILE} names {rel!r}, outside the checkpoint folder"
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size < end:
            return f"{rel} is truncated ({f.stat().st_size:,} bytes, needs {end:,})"
    return None


# ------------------------------------------------------------------------- untrusted metadata
def _dcp_classes() -> dict[str, set[str]]:
    """The classes DCP's ``.metadata`` is made of: the dataclasses and enums of its metadata
    modules (found by unpickling real checkpoints with a recording unpickler)."""
    import importlib
    import inspect

    allowed: dict[str, set[str]] = {}
    for name in (
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.filesystem",
        "torch.distributed.checkpoint.planner",
        "torch.distributed._shard.sharded_tensor.metadata",
        "torch.distributed._shard.metadata",
    ):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        allowed[name] = {
            n
            for n, obj in vars(mod).items()
            if inspect.isclass(obj)
            and obj.__module__ == name
            and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
        }
    return allowed


_SAFE_BUILTINS = {
    "dict",
    "list",
    "tuple",
    "set",
    "frozenset",
    "int",
    "float",
    "bool",
    "str",
    "bytes",
    "bytearray",
    "complex",
    "slice",
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: its dataclasses and enums, ``torch.Size``,
    torch dtypes and layouts, paths, plain containers. Any other global (``os.system``,
    ``builtins.eval``, ``torch.load``, ...) raises :class:`CheckpointError` naming it, before it
    is called."""

    _dcp: dict[str, set[str]] | None = None

    def find_class(self, module: str, name: str):
        cls = type(self)
        if cls._dcp is None:
            cls._dcp = _dcp_classes()
        ok = False
        if "." not in name:
            if module == "builtins":
                ok = name in _SAFE_BUILTINS
            elif module == "collections":
                ok = name == "OrderedDict"
            elif module == "torch":
                ok = name == "Size" or isinstance(vars(torch).get(name), torch.dtype)
            elif module == "torch.serialization":
                ok = name == "_get_layout"
            elif module in ("pathlib", "pathlib._local"):
                ok = name in (
                    "Path",
                    "PosixPath",
                    "WindowsPath",
                    "PurePosixPath",
                    "PureWindowsPath",
                )
            else:
                ok = name in cls._dcp.get(module, ())
        if not ok:
            raise CheckpointError(
                f"refused: asks for {module}.{name}, which checkpoint metadata never holds (a "
                f"crafted or damaged file; nothing was run)"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise CheckpointError("refused: holds a persistent id (a crafted or damaged file)")


def _read_metadata_file(path: Path):
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # truncated or garbled: EOFError, UnpicklingError, ValueError, ...
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path} is damaged (holds a {type(md).__name__}, not DCP Metadata)")
    return md


def read_dcp_metadata(directory: str | os.PathLike):
    """DCP's ``Metadata`` of a checkpoint folder, read with the restricted unpickler."""
    return _read_metadata_file(Path(directory) / METADATA_FILE)


class _SafeReader(FileSystemReader):
    """DCP's file reader, reading ``.metadata`` with :class:`_MetadataUnpickler` and naming the
    shard file when one cannot be read."""

    _current = None

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        get_path = getattr(self, "_get_metadata_path", None)
        path = get_path(kwargs.get("rank")) if get_path else Path(self.path) / METADATA_FILE
        md = _read_metadata_file(Path(path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def _slice_file(self, file, sinfo):
        self._current = getattr(file, "name", None)
        return super()._slice_file(file, sinfo)

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except Exception as e:
            where = Path(self._current).name if isinstance(self._current, str) else "a shard"
            if isinstance(e, CheckpointError):
                raise CheckpointError(f"{where}: {e}") from None
            raise CheckpointError(f"{where} is damaged ({_first_line(e)})") from e


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but non-tensor entries (optimizer hyper-parameters) are checked with
    ``torch.load(weights_only=True)`` before DCP's own ``weights_only=False`` load sees them."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raw = value.getvalue() if hasattr(value, "getvalue") else value.read()
        try:
            torch.load(io.BytesIO(raw), weights_only=True)
        except Exception as e:
            m = re.search(r"GLOBAL ([\w.]+)", str(e))
            if m:  # weights_only refused a global: crafted
                raise CheckpointError(
                    f"refused: the entry {read_item.dest_index.fqn!r} asks for {m.group(1)} (a "
                    f"crafted or damaged shard; nothing was run)"
                ) from None
            # torn or garbled bytes (torch's own message would advise weights_only=False)
            raise RuntimeError(f"entry {read_item.dest_index.fqn!r} is unreadable") from None
        # anything else (a torn zip record) propagates: the reader names the damaged file
        super().load_bytes(read_item, io.BytesIO(raw))


def _first_line(e: BaseException) -> str:
    if "Weights only load failed" in str(e):  # torch's advice (weights_only=False) stays out
        return f"{type(e).__name__}: not a valid torch record"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------------- saving
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


def _write_durable(path: Path, text: str) -> None:
    """``text`` into ``path`` atomically and on disk (fsync before the rename)."""

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def _write_state(tmp: Path, meta: dict) -> None:
    text = json.dumps(meta, indent=1, sort_keys=True, default=str)
    _write_durable(tmp / STATE_FILE, text)


def _write_manifest(tmp: Path, meta: dict) -> None:
    """The completeness proof, written last: every file of the checkpoint with its size."""
    files = {
        p.name: p.stat().st_size
        for p in sorted(tmp.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.endswith(".tmp")
    }
    doc = {"format": 1, "step": meta.get("step"), "files": files}
    _write_durable(tmp / MANIFEST_FILE, json.dumps(doc, indent=1, sort_keys=True))


def _all_ok(ok: bool) -> bool:
    """``ok`` on every rank (False when any rank failed)."""
    if not _dist():
        return ok
    dev = torch.device("cpu")
    if dist.get_backend() == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([1 if ok else 0], device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _tensor_bytes(obj: Any) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()  # a DTensor counts its global size
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _errors_in(e: BaseException | None, seen=None) -> list[BaseException]:
    """``e``, its causes and, for DCP's CheckpointException, every rank's failure."""
    seen = seen if seen is not None else set()
    if e is None or id(e) in seen:
        return []
    seen.add(id(e))
    out = [e]
    for f in (getattr(e, "failures", None) or {}).values():
        out += _errors_in(f[0] if isinstance(f, tuple) else f, seen)
    out += _errors_in(e.__cause__, seen) + _errors_in(e.__context__, seen)
    return out


def _free_bytes(path: Path) -> int | None:
    for p in [path, *path.parents]:
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _save_error(e: BaseException, final: Path, needed: int, previous: Path | None):
    errors = _errors_in(e)
    free = _free_bytes(final.parent)
    text = " ".join(str(x) for x in errors)
    no_space = any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in errors) or (
        "No space left" in text
        or (
            ("unexpected pos" in text or "write failed" in text)
            and free is not None
            and free < needed
        )
    )
    kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint"
    if no_space:
        free_note = f", {free / 2**20:,.0f} MB free" if free is not None else ""
        return CheckpointWriteError(
            f"no space left on device for checkpoint {final} (needed ~{needed / 2**20:,.0f} MB"
            f"{free_note}); the partial save was removed and {kept}. Free space or set "
            f"train.output_dir on a larger disk (and train.keep_checkpoints lower), then run the "
            f"same command again to resume"
        )
    cause = next((x for x in errors if isinstance(x, OSError)), errors[-1])
    return CheckpointWriteError(
        f"could not write checkpoint {final} ({_first_line(cause)}); the partial save was "
        f"removed and {kept}"
    )


def save_checkpoint(
    directory: str | os.PathLike,
    state: dict[str, Any],
    *,
    keep_last: int | None = None,
) -> Path:
    """Write ``state`` to ``directory`` atomically; call it on every rank.

    ``state``: ``{"model": nn.Module, "optimizer": Optimizer (optional), "meta": JSON-able dict}``.
    ``directory`` is the final folder (``checkpoint_path(run_dir, step)``); its parent holds the
    run's checkpoints, of which the newest ``keep_last`` are kept (None: all). A failure on any
    rank (disk full, permission, ...) removes the partial ``.tmp`` and raises
    :class:`CheckpointWriteError` on every rank; the previous checkpoints stay as they were.
    """
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    model, optimizer, meta = _unpack(state)
    main = _rank() == 0
    needed = 0
    error: BaseException | None = None

    def failed(e: BaseException | None) -> bool:
        nonlocal error
        if e is not None and error is None:
            error = e
        return not _all_ok(e is None)

    err = None
    if main:
        try:
            if tmp.exists():  # remains of a crashed save of the same step
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        except Exception as e:
            err = e
    if not failed(err):
        err = None
        try:
            model_sd, optim_sd = _state_dicts(model, optimizer)
            payload = {"model": model_sd}
            if optim_sd is not None:
                payload["optim"] = optim_sd
            needed = _tensor_bytes(payload)
            with _quiet_single_process():
                dcp.save(payload, checkpoint_id=str(tmp))
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            _reraise_interrupt(e, tmp if main else None)
            err = e
        if not failed(err):
            err = None
            if main:
                try:
                    _write_state(tmp, meta)
                    _write_manifest(tmp, meta)  # written last: the proof the folder is complete
                    if final.exists():  # re-saving a step (a resumed run): swap, never half a state
                        old = final.with_name(final.name + ".old")
                        if old.exists():
                            shutil.rmtree(old)
                        os.replace(final, old)
                        os.replace(tmp, final)
                        _remove_checkpoint(old)
                    else:
                        os.replace(tmp, final)
                    _fsync_dir(final.parent)
                except Exception as e:
                    err = e
            if not failed(err):
                if main and keep_last is not None:
                    _prune(final, keep_last)
                _barrier()
                return final
    # a rank failed: drop the partial save on rank 0, raise on every rank
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is None:
        raise CheckpointWriteError(
            f"could not write checkpoint {final}: another rank failed (see its log); the partial "
            f"save was removed"
        )
    previous = latest_checkpoint(final.parent.parent) if main else None
    exc = _save_error(error, final, needed or _tensor_bytes(dict(model.state_dict())), previous)
    raise exc from error


def _reraise_interrupt(e: BaseException, tmp: Path | None) -> None:
    """A KeyboardInterrupt / SystemExit (possibly wrapped by DCP) goes on as itself, after the
    partial save is removed."""
    stop = [x for x in _errors_in(e) if isinstance(x, (KeyboardInterrupt, SystemExit))]
    if stop:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise stop[0]


def _remove_checkpoint(p: Path) -> None:
    """Delete a checkpoint folder, its proof of completeness first."""
    for name in (MANIFEST_FILE, STATE_FILE, METADATA_FILE):
        with contextlib.suppress(OSError):
            (p / name).unlink()
    _fsync_dir(p)
    shutil.rmtree(p, ignore_errors=True)


def _prune(final: Path, keep_last: int) -> None:
    """Keep ``final`` and the newest ``keep_last - 1`` intact checkpoints before it; delete the
    other older ``step_N`` folders and dead ``.tmp`` / ``.old`` leftovers."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    root = final.parent
    m = _NAME.match(final.name)
    last = int(m.group(1)) if m else None
    older = [p for step, p in _step_folders(root) if last is None or step < last]
    intact = [p for p in older if verify_checkpoint(p) is None]
    keep = set(intact[len(intact) - (keep_last - 1) :]) if keep_last > 1 else set()
    for p in older:
        if p not in keep:
            _remove_checkpoint(p)
    for pattern in ("step_*.tmp", "step_*.old"):  # dead: this process completed its own save
        for p in root.glob(pattern):
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
        raise CheckpointDamagedError(
            f"{directory} is not a complete checkpoint (no {STATE_FILE}): a save was interrupted; "
            f"resume from latest_checkpoint(run_dir) instead"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointDamagedError(f"{path} is damaged ({_first_line(e)})") from None


def load_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> dict:
    """Load a checkpoint into ``state``'s model (and optimizer) in place; returns its meta dict.

    Strict for the model: a key the model has and the checkpoint lacks, or the reverse, is an
    error naming the keys. Optimizer state may lack entries for parameters that never received a
    gradient (AdamW keeps no state for them). A missing, truncated, damaged or crafted file is a
    :class:`CheckpointError` naming it (nothing in the folder is unpickled unrestricted).
    """
    directory = Path(directory)
    meta = read_meta(directory)
    why = verify_checkpoint(directory)
    if why is not None:
        raise CheckpointDamagedError(f"{directory} is not a complete checkpoint: {why}")
    model, optimizer, _ = _unpack(state)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    saved = set(read_dcp_metadata(directory).state_dict_metadata)
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
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        with _quiet_single_process():
            dcp.load(
                payload,
                checkpoint_id=str(directory),
                storage_reader=_SafeReader(str(directory)),
                planner=_SafeLoadPlanner(allow_partial_load=True),
            )
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        _reraise_interrupt(e, None)
        inner = [x for x in _errors_in(e) if isinstance(x, CheckpointError)]
        why = str(inner[0]) if inner else _first_line(e)
        raise CheckpointDamagedError(f"checkpoint {directory} cannot be loaded: {why}") from e
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=payload["model"], optim_state_dict={})
    else:
        try:
            set_state_dict(
                model,
                optimizer,
                model_state_dict=payload["model"],
                optim_state_dict=payload["optim"],
            )
        except ValueError as e:  # torch: "... doesn't match the size of optimizer's group"
            raise CheckpointError(
                f"checkpoint {directory} groups the optimizer's parameters differently from this "
                "run (its lr multipliers, layer decay or frozen parameters were set otherwise): "
                "resume with the settings the run was started with, or set train.output_dir to "
                f"a new folder ({e})"
            ) from e
        # DCP restores each parameter's state by name and each group's settings from the
        # checkpoint's groups: a group the checkpoint does not have (the run resumed with another
        # grouping: other layer decay, freezes, lr multipliers) comes back bare, and the next
        # step failed on its missing keys. It gets this run's settings.
        for g, own in zip(optimizer.param_groups, settings):
            for k, v in own.items():
                g.setdefault(k, v)
        for g, flags in zip(optimizer.param_groups, impl):  # keep this machine's kernels
            g.update(flags)
    return meta
