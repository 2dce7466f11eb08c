"""vssl.train under faults: interrupts (SIGINT / SIGTERM), wall-clock checkpoints, checkpoint
completeness (manifest, rotation order, old checkpoints), damaged and crafted checkpoints (fallback,
restricted unpickling), a full disk, unwritable output folders, loggers and progress.

Tiny models on real CIFAR images, a few steps each (benchmarks/train_faults.py does the same with
real `vssl pretrain` processes and kill -9)."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import signal
import sys
import types
from pathlib import Path

import pytest
import torch
from _torchrun_train import make_method
from _torchrun_train import state_of as _state
from _torchrun_train import train_cfg as _cfg
from _torchrun_train import train_data as _data
from torch import nn

import vssl.train.checkpoint as ck
import vssl.train.loop as loop
from vssl.train import (
    CheckpointError,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from vssl.train.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointWriteError,
    checkpoint_path,
    list_checkpoints,
    verify_checkpoint,
)
from vssl.train.loop import OutputDirError, TrainingAborted, check_output_dir


@pytest.fixture
def images(shared_data, tmp_path):
    cifar = shared_data / "cifar10-subset" / "train"
    rows = []
    for cls in sorted(p.name for p in cifar.iterdir()):
        rows += [f"{p}\t{cls}" for p in sorted((cifar / cls).iterdir())[:8]]
    path = tmp_path / "train.txt"
    path.write_text("\n".join(rows) + "\n")
    return path


def _fit(images, out, method=None, **kw) -> tuple[nn.Module, dict]:
    method = method if method is not None else make_method(0)
    return method, Trainer(method, _data(images), _cfg(out, **kw), progress=False).fit()


def _signal_at(method, calls: dict[int, list[int]]):
    """Make ``method`` send itself the signals ``calls[n]`` during its n-th forward (mid-step)."""
    forward = method.forward

    def wrapped(batch, step):
        out = forward(batch, step)
        for sig in calls.get(method.calls, ()):
            os.kill(os.getpid(), sig)
        return out

    method.forward = wrapped
    return method


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Final weights and per-step losses of the uninterrupted 6-step run."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not found")
    tmp = tmp_path_factory.mktemp("full")
    cifar = SHARED / "cifar10-subset" / "train"
    rows = []
    for cls in sorted(p.name for p in cifar.iterdir()):
        rows += [f"{p}\t{cls}" for p in sorted((cifar / cls).iterdir())[:8]]
    (tmp / "train.txt").write_text("\n".join(rows) + "\n")
    method, summary = _fit(tmp / "train.txt", tmp / "run")
    assert summary["stopped"] == "completed"
    return _state(method), _losses(tmp / "run"), tmp / "train.txt"


@pytest.fixture(scope="module")
def four_steps(uninterrupted, tmp_path_factory):
    """A run folder stopped at step 4 of 6 with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("four")
    _fit(uninterrupted[2], out, max_steps=4, checkpoint_every=2)
    return out


def _losses(out) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------- interrupts


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_finishes_the_step_saves_and_resume_is_exact(
    images, tmp_path, uninterrupted, capsys, sig
):
    before = signal.getsignal(sig)
    method = _signal_at(make_method(0), {3: [sig]})
    _, summary = _fit(images, tmp_path, method)
    assert summary["stopped"] == "interrupted" and summary["signal"] == sig.name
    assert summary["step"] == 3  # the step in flight finished
    assert summary["checkpoint"] == str(checkpoint_path(tmp_path, 3))
    assert verify_checkpoint(checkpoint_path(tmp_path, 3)) is None
    assert signal.getsignal(sig) is before  # handlers restored
    assert f"{sig.name}: stopping after step 3" in capsys.readouterr().err

    resumed, s2 = _fit(images, tmp_path)
    assert s2["stopped"] == "completed" and resumed.calls == 3
    assert "resumed from step 3" in capsys.readouterr().err
    full, losses, _ = uninterrupted
    _same(_state(resumed), full)
    assert _losses(tmp_path) == losses


def test_second_signal_aborts_at_once(images, tmp_path, monkeypatch):
    monkeypatch.setattr(loop._Interrupts, "REPEAT_S", 0.0)
    before = signal.getsignal(signal.SIGTERM)
    method = _signal_at(make_method(0), {3: [signal.SIGTERM, signal.SIGTERM]})
    # two signals in step 3: aborted inside it, the step-2 checkpoint is the newest
    with pytest.raises(TrainingAborted) as err:
        _fit(images, tmp_path, method, checkpoint_every=2)
    assert err.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 2)


def test_a_repeat_within_a_second_is_the_same_interrupt(images, tmp_path):
    # a terminal's Ctrl-C reaches every process of the group, and torchrun forwards it again
    method = _signal_at(make_method(0), {2: [signal.SIGINT, signal.SIGINT]})
    _, summary = _fit(images, tmp_path, method)
    assert summary["stopped"] == "interrupted" and summary["step"] == 2


def test_no_handlers_outside_the_main_thread(images, tmp_path):
    import threading

    seen = {}

    def run():
        _, seen["summary"] = _fit(images, tmp_path, max_steps=1)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen["summary"]["stopped"] == "max_steps"


def test_wall_clock_checkpoints(images, tmp_path):
    assert TrainConfig().checkpoint_every_s == 600
    _fit(images, tmp_path, max_steps=3, checkpoint_every_s=1e-9, keep_checkpoints=None)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_00000001",
        "step_00000002",
        "step_00000003",
    ]
    with pytest.raises(ValueError, match="checkpoint_every_s"):
        TrainConfig(checkpoint_every_s=0)


# ------------------------------------------------------------------------ checkpoint proofs


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def _save(run, step, model, opt, **kw):
    return save_checkpoint(
        checkpoint_path(run, step),
        {"model": model, "optimizer": opt, "meta": {"step": step}},
        **kw,
    )


def test_manifest_proves_completeness_and_rotation_removes_it_first(tmp_path, monkeypatch):
    model, opt = _tiny()
    p1 = _save(tmp_path, 1, model, opt)
    files = json.loads((p1 / MANIFEST_FILE).read_text())["files"]
    assert set(files) == {STATE_FILE, ".metadata", "__0_0.distcp"}
    assert all(files[n] == (p1 / n).stat().st_size for n in files)

    # a kill during rotation: the proof is gone before any other file
    monkeypatch.setattr(ck.shutil, "rmtree", lambda *a, **k: None)
    _save(tmp_path, 2, model, opt, keep_last=1)
    monkeypatch.undo()
    assert not (p1 / MANIFEST_FILE).exists() and not (p1 / STATE_FILE).exists()
    assert (p1 / "__0_0.distcp").exists()  # the deletion was "cut short"
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 2)]
    assert "cut short" in verify_checkpoint(p1)


def test_old_checkpoints_without_a_manifest_still_load(tmp_path):
    model, opt = _tiny()
    p = _save(tmp_path, 1, model, opt)
    (p / MANIFEST_FILE).unlink()  # as written before manifests existed
    assert verify_checkpoint(p) is None and latest_checkpoint(tmp_path) == p
    fresh, fresh_opt = _tiny(1)
    assert load_checkpoint(p, {"model": fresh, "optimizer": fresh_opt}) == {"step": 1}
    _same(_state(fresh), _state(model))
    # ... and the half-deleted one (metadata + state, no shard) is not complete
    (p / "__0_0.distcp").unlink()
    assert verify_checkpoint(p) == "__0_0.distcp is missing"
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="__0_0.distcp is missing"):
        load_checkpoint(p, {"model": fresh})


def _truncate(p):
    shard = p / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])


def _garble(p):  # same size: passes the manifest, fails when read
    shard = p / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[:64] = b"\x00" * 64
    shard.write_bytes(bytes(raw))


def _remove(p):
    (p / ".metadata").unlink()


@pytest.mark.parametrize(
    "damage,why",
    [(_truncate, "has 100 bytes"), (_garble, "__0_0.distcp is damaged"), (_remove, ".metadata")],
)
def test_damaged_newest_checkpoint_falls_back(
    images, tmp_path, uninterrupted, four_steps, capsys, damage, why
):
    shutil.copytree(four_steps, tmp_path, dirs_exist_ok=True)
    newest = checkpoint_path(tmp_path, 4)
    damage(newest)
    method, summary = _fit(images, tmp_path)
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}" in err and why in err
    assert summary["resumed_from"] == str(checkpoint_path(tmp_path, 2))
    assert "resumed from step 2" in err
    assert summary["stopped"] == "completed" and method.calls == 4
    _same(_state(method), uninterrupted[0])


def test_no_intact_checkpoint_is_a_clear_error(images, tmp_path):
    _fit(images, tmp_path, max_steps=2)
    _truncate(checkpoint_path(tmp_path, 2))
    with pytest.raises(CheckpointError) as err:
        _fit(images, tmp_path)
    msg = str(err.value)
    assert f"no intact checkpoint in {tmp_path / 'ckpt'}" in msg and "step_00000002" in msg


# ------------------------------------------------------------------------ crafted checkpoints


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_metadata_is_refused_and_never_runs(images, tmp_path):
    _fit(images, tmp_path, max_steps=2)
    p = checkpoint_path(tmp_path, 2)
    marker = tmp_path / "MARKER"
    (p / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    # a crafted folder comes with a matching manifest
    man = json.loads((p / MANIFEST_FILE).read_text())
    man["files"][".metadata"] = (p / ".metadata").stat().st_size
    (p / MANIFEST_FILE).write_text(json.dumps(man))
    why = verify_checkpoint(p)
    assert "refused" in why and "system" in why
    with pytest.raises(CheckpointError, match="refused.*system"):
        load_checkpoint(p, {"model": make_method(0)})
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        _fit(images, tmp_path)
    assert not marker.exists()
    # plain pickle would have run it: the test's crafted file is real
    pickle.loads((p / ".metadata").read_bytes())
    assert marker.exists()


def test_unpickler_allows_real_metadata_only(tmp_path):
    model, opt = _tiny()
    p = _save(tmp_path, 1, model, opt)
    md = ck.read_dcp_metadata(p)
    assert "model.0.weight" in md.state_dict_metadata
    for evil in (
        b"cbuiltins\neval\n(S'1'\ntR.",
        b"cbuiltins\ngetattr\n.",
        b"ctorch\nload\n.",
        b"ctorch.distributed.checkpoint.metadata\nos\n.",
    ):
        with pytest.raises(CheckpointError, match="refused"):
            ck._MetadataUnpickler(io.BytesIO(evil)).load()


def test_non_tensor_entries_load_with_weights_only(tmp_path):
    marker = tmp_path / "MARKER"
    buf = io.BytesIO()
    torch.save(_Evil(marker), buf)
    planner = ck._SafeLoadPlanner()
    item = types.SimpleNamespace(dest_index=types.SimpleNamespace(fqn="optim.param_groups.0.lr"))
    with pytest.raises(CheckpointError, match="refused"):
        planner.load_bytes(item, io.BytesIO(buf.getvalue()))
    assert not marker.exists()


# -------------------------------------------------------------------------------- full disk


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _tiny()
    p1 = _save(tmp_path, 1, model, opt)
    real = ck.dcp.save

    def full(state_dict, checkpoint_id, **kw):
        real(state_dict, checkpoint_id=checkpoint_id, **kw)  # part of it written ...
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.dcp, "save", full)
    with pytest.raises(CheckpointWriteError) as err:
        _save(tmp_path, 2, model, opt, keep_last=1)
    msg = str(err.value)
    assert "no space left on device" in msg and "needed ~0 MB" in msg and str(p1) in msg
    assert isinstance(err.value, OSError) and isinstance(err.value, CheckpointError)
    assert not list((tmp_path / "ckpt").glob("*.tmp"))  # the partial save is gone
    assert latest_checkpoint(tmp_path) == p1 and verify_checkpoint(p1) is None


def test_disk_full_on_a_real_small_filesystem(tmp_path):
    """A 1 MB tmpfs (skipped where mounting is not permitted)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        torch.manual_seed(0)
        model = nn.Linear(256, 1024)  # 1 MB of weights + 2 MB of AdamW moments
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(2, 256)).sum().backward()
        opt.step()
        small = nn.Linear(2, 2)
        p1 = save_checkpoint(checkpoint_path(mnt, 1), {"model": small, "meta": {"step": 1}})
        with pytest.raises(CheckpointWriteError, match=r"no space left on device .*needed ~3 MB"):
            _save(mnt, 2, model, opt)
        assert not list((mnt / "ckpt").glob("*.tmp"))
        assert latest_checkpoint(mnt) == p1
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------------- output folders


def test_unwritable_output_dir_is_one_clear_error_before_training(images, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker, blocker / "run"):
        with pytest.raises(OutputDirError, match=f"{blocker} is a file, not a folder"):
            Trainer(make_method(0), _data(images), _cfg(out), progress=False)
    for code, words in ((errno.EACCES, "permission denied"), (errno.EROFS, "read-only")):

        def refuse(*a, code=code, **k):
            raise OSError(code, os.strerror(code), str(tmp_path / "ro"))

        monkeypatch.setattr(loop.Path, "mkdir", refuse)
        with pytest.raises(OutputDirError, match=words) as err:
            check_output_dir(tmp_path / "ro" / "run")
        assert "train.output_dir=" in str(err.value) and "\n" not in str(err.value)
        monkeypatch.undo()
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputDirError, match="permission denied"):
            check_output_dir(ro / "run")


def test_pretrain_command_on_a_file_says_so(tmp_path, capsys):
    from vssl.cli import main

    blocker = tmp_path / "taken"
    blocker.write_text("x")
    rc = main(["pretrain", "cpu_tiny32", f"train.output_dir={blocker}", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is a file, not a folder" in err[0]


# ---------------------------------------------------------------------- progress and loggers


def test_metrics_lines_appear_as_steps_happen(images, tmp_path):
    seen = []

    class Peek:
        def maybe_run(self, step, model):
            path = tmp_path / "metrics.jsonl"
            seen.append((step, len(path.read_text().splitlines()) if path.exists() else 0))
            return None

    method = make_method(0)
    Trainer(
        method, _data(images), _cfg(tmp_path, max_steps=3), monitors=[Peek()], progress=False
    ).fit()
    assert seen == [(0, 0), (1, 0), (2, 1), (3, 2)]  # every earlier step's line is on disk


def test_progress_postfix_is_short():
    t = Trainer.__new__(Trainer)
    t._reserved = loop._RESERVED | {"momentum"}
    record = {
        "loss": 11.234567,
        "dino_local_crops_loss": 5.123456,
        "dino_global_crops_loss": 5.0,
        "koleo_loss": -0.31,
        "ibot_loss": 1.2,
        "lr": 0.000123456,
        "wd": 0.04,
        "momentum": 0.99,
        "grad_norm": 1.0,
    }
    post = t._postfix(record, 123.456)
    assert post == {
        "loss": "11.23",
        "dino_local": "5.12",
        "dino_global": "5",
        "lr": "1.2e-04",
        "img/s": "123",
    }


def test_time_budget_stop_is_announced(images, tmp_path, capsys):
    _fit(images, tmp_path, time_budget_s=1e-3)
    assert "time budget train.time_budget_s=0.001 s is spent" in capsys.readouterr().err


def test_loggers(images, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not installed
    with pytest.raises(ValueError, match="pip install tensorboard"):
        Trainer(make_method(0), _data(images), _cfg(tmp_path, loggers=["tensorboard"]))
    with pytest.raises(ValueError, match="allowed"):
        TrainConfig(loggers=["mlflow"])

    logged, finished = [], []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: types.SimpleNamespace(
        log=lambda values, step: logged.append((step, values)),
        finish=lambda: finished.append(True),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _fit(images, tmp_path, max_steps=2, loggers=["wandb"])
    assert [s for s, _ in logged] == [1, 2] and "loss" in logged[0][1] and finished


def test_pretrain_command_interrupted_exports_and_says_how_to_resume(
    images, tmp_path, capsys, monkeypatch
):
    from vssl.cli import main

    run = tmp_path / "run"
    args = [
        "pretrain",
        "cpu_tiny32",
        f"data.train={images}",
        f"train.output_dir={run}",
        "data.num_workers=0",
        "data.n_local=2",
        "model.depth=1",
        "model.embed_dim=32",
        "model.num_heads=2",
        "method.n_prototypes=64",
        "method.hidden_dim=32",
        "method.bottleneck_dim=16",
        "method.warmup_teacher_temp_epochs=1",
        "method.freeze_last_layer_epochs=1",
        "train.batch_size_per_rank=8",
        "train.epochs=4",
        "train.iters_per_epoch=1",
        "train.warmup_epochs=1",
        "--no-progress",
    ]
    real = loop.Trainer._step

    def step(self, batch, sched, i):
        out = real(self, batch, sched, i)
        if i == 1:  # Ctrl-C during the second step
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(loop.Trainer, "_step", step)
    assert main(args) == 130
    out = capsys.readouterr()
    assert "interrupted by SIGINT at step 2" in out.out and "To resume" in out.out
    assert (run / "backbone.safetensors").exists()
    assert latest_checkpoint(run) == checkpoint_path(run, 2)
    monkeypatch.setattr(loop.Trainer, "_step", real)
    assert main(args) == 0
    assert "resumed from step 2" in capsys.readouterr().err
    assert latest_checkpoint(run) == checkpoint_path(run, 4)


def test_a_checkpoint_whose_optimizer_groups_differ_is_refused_with_the_reason(tmp_path):
    """A run checkpointed with one grouping of the parameters and resumed with another: refused
    with the reason, not torch's bare ValueError."""
    model, opt = _tiny()
    p = _save(tmp_path, 1, model, opt)
    fresh, _ = _tiny(1)
    split = torch.optim.AdamW(
        [
            {"params": list(fresh[0].parameters()), "frozen_until": 0},
            {"params": list(fresh[2].parameters()), "frozen_until": 5},
        ],
        lr=1e-2,
    )
    with pytest.raises(CheckpointError, match="groups the optimizer's parameters differently"):
        load_checkpoint(p, {"model": fresh, "optimizer": split})


def test_a_run_resumed_with_another_grouping_of_its_parameters_continues(images, tmp_path):
    """A checkpoint written with one grouping of the parameters (here no layer decay: few groups)
    and resumed with another (layer decay: one group per block): DCP restores each parameter's
    state by name and brings the groups it does not know back bare, so the first step failed
    with KeyError 'frozen_until' (a quickstart's run resumed by `vssl pretrain`). The run
    continues with its own settings."""
    _, first = _fit(images, tmp_path / "run", max_steps=1, layer_decay=1.0)
    assert first["step"] == 1
    method = make_method(0)
    trainer = Trainer(
        method, _data(images), _cfg(tmp_path / "run", layer_decay=0.5), progress=False
    )
    rest = trainer.fit()
    assert rest["resumed_from"].endswith("step_00000001") and rest["step"] == 6
    multipliers = sorted({round(g["lr_multiplier"], 6) for g in trainer.optimizer.param_groups})
    assert len(multipliers) > 2 and multipliers[-1] == 1.0  # this run's layer decay


def test_an_error_with_a_loader_open_exits_instead_of_hanging(tmp_path):
    """Workers ignore SIGTERM; an error that escapes while a loader is open must still end the
    process (multiprocessing's exit handler used to wait for the workers forever)."""
    import subprocess

    import numpy as np
    from PIL import Image

    for i in range(8):
        Image.fromarray(np.full((32, 32, 3), 30 * i, np.uint8)).save(tmp_path / f"{i}.png")
    code = f"""
import torch
import vssl.data.collate as c
original = c._crop_major
def failing(crops):
    if torch.utils.data.get_worker_info() is not None:
        raise RuntimeError("injected worker failure")
    return original(crops)
c._crop_major = failing
from vssl.pretrain import build_data, build_method
from vssl.train.config import load_recipe
recipe = load_recipe("cpu_tiny32", ["data.train={tmp_path}", "data.num_workers=1",
                                    "train.batch_size_per_rank=4"])
method, _ = build_method(recipe)
batches = build_data(recipe, method.views()).batches(0)
next(batches)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "injected worker failure" in proc.stderr
