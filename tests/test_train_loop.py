"""vssl.train: the Trainer loop (exact resume, non-finite guard, budgets, metrics, monitors),
TrainData determinism, and atomic checkpoints. Tiny models on the real CIFAR images."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _torchrun_train import B, data_kwargs, make_method
from _torchrun_train import state_of as _state
from _torchrun_train import train_cfg as _cfg
from _torchrun_train import train_data as _data
from torch import nn

from vssl.data.augment import MultiCropPhotometric
from vssl.train import (
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    TrainData,
    Trainer,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from vssl.train.checkpoint import STATE_FILE, checkpoint_path, list_checkpoints


@pytest.fixture
def cifar(shared_data):
    return shared_data / "cifar10-subset"


@pytest.fixture
def images(cifar, tmp_path):
    """A list file of 160 real CIFAR training images (16 per class, labelled): listing it is
    instant, where walking the 10,000-image folder costs a second per TrainData."""
    rows = []
    for cls in sorted(p.name for p in (cifar / "train").iterdir()):
        rows += [f"{p}\t{cls}" for p in sorted((cifar / "train" / cls).iterdir())[:16]]
    path = tmp_path / "train.txt"
    path.write_text("\n".join(rows) + "\n")
    return path


def _lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _steps(out) -> list[dict]:
    return [r for r in _lines(out) if "loss" in r]


def _expected(step: int, total: int = 6, base_lr: float = 2e-2) -> dict:
    """DINOv2's schedules at 0-based ``step`` for ``_cfg`` (2 warm-up iterations), by hand."""
    peak = base_lr * math.sqrt(B / 1024)

    def cos(base, final, i, n):
        return final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n))

    lr = [0.0, peak][step] if step < 2 else cos(peak, 1e-6, step - 2, total - 2)
    return {
        "lr": lr,
        "wd": cos(0.04, 0.4, step, total),
        "momentum": cos(0.992, 1.0, step, total),
        "teacher_temp": [0.04, 0.07][step] if step < 2 else 0.07,
    }


# --------------------------------------------------------------------------------- the loop


def test_exact_resume_equals_uninterrupted_run(images, tmp_path):
    full = make_method(0)
    s_full = Trainer(full, _data(images), _cfg(tmp_path / "a"), progress=False).fit()
    assert s_full["stopped"] == "completed" and s_full["step"] == 6

    first = make_method(0)
    s1 = Trainer(first, _data(images), _cfg(tmp_path / "b", max_steps=3), progress=False).fit()
    assert s1["stopped"] == "max_steps" and s1["step"] == 3
    assert latest_checkpoint(tmp_path / "b") == checkpoint_path(tmp_path / "b", 3)

    resumed = make_method(0)  # a fresh process would rebuild the same initial model
    s2 = Trainer(resumed, _data(images), _cfg(tmp_path / "b"), progress=False).fit()
    assert s2["resumed_from"] == str(checkpoint_path(tmp_path / "b", 3))
    assert s2["step"] == 6 and s2["stopped"] == "completed"
    assert resumed.calls == 3  # only steps 4..6 ran after the resume

    a, b = _steps(tmp_path / "a"), _steps(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in (
            "loss",
            "global_loss",
            "local_loss",
            "grad_norm",
            "lr",
            "wd",
            "momentum",
            "teacher_temp",
        ):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    # the loss moved: the sequence being compared is not a constant
    assert len({round(r["loss"], 6) for r in a}) > 3
    sa, sb = _state(full), _state(resumed)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-6, msg=k)
    init = _state(make_method(0))
    assert any(not torch.equal(sa[k], init[k]) for k in sa if k.startswith("teacher."))


def test_schedules_freeze_and_step_budget(images, tmp_path):
    method = make_method(0)
    init = _state(method)
    trainer = Trainer(method, _data(images), _cfg(tmp_path, max_steps=2), progress=False)
    summary = trainer.fit()
    assert summary["stopped"] == "max_steps" and summary["step"] == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]
    after = _state(method)
    # the prototypes are frozen for the first epoch (2 steps); everything else trained
    proto = "student.head.last_layer.weight"
    assert torch.equal(after[proto], init[proto])
    assert not torch.equal(after["student.head.mlp.0.weight"], init["student.head.mlp.0.weight"])
    assert not torch.equal(
        after["student.backbone.blocks.1.mlp.fc1.weight"],
        init["student.backbone.blocks.1.mlp.fc1.weight"],
    )
    # per-step values follow DINOv2's schedules; the teacher got the scheduled momentum
    rows = _steps(tmp_path)
    for r in rows:
        want = _expected(r["step"] - 1)
        for key, value in want.items():
            assert r[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (r["step"], key)
    assert method.momenta == pytest.approx([_expected(i)["momentum"] for i in range(2)])
    # the optimizer's groups carry lr x multiplier; prototypes got lr 0 during the freeze
    for g in trainer.optimizer.param_groups:
        want = 0.0 if g["frozen_until"] > 1 else _expected(1)["lr"] * g["lr_multiplier"]
        assert g["lr"] == pytest.approx(want)
        assert g["weight_decay"] == pytest.approx(_expected(1)["wd"] * g["wd_multiplier"])

    # the budget does not change the schedules: continuing unfreezes the prototypes at step 3
    summary = Trainer(method, _data(images), _cfg(tmp_path, max_steps=3), progress=False).fit()
    assert summary["step"] == 3
    assert not torch.equal(method.state_dict()[proto], init[proto])
    assert _steps(tmp_path)[-1]["lr"] == pytest.approx(_expected(2)["lr"])


def test_time_budget_stops_and_checkpoints(images, tmp_path):
    summary = Trainer(
        make_method(0), _data(images), _cfg(tmp_path, time_budget_s=1e-3), progress=False
    ).fit()
    assert summary["stopped"] == "time_budget" and summary["step"] == 1
    assert summary["checkpoint"] == str(checkpoint_path(tmp_path, 1))
    assert json.loads((checkpoint_path(tmp_path, 1) / STATE_FILE).read_text())["step"] == 1


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(images, tmp_path):
    method = make_method(0, nan_at=5)
    trainer = Trainer(method, _data(images), _cfg(tmp_path, checkpoint_every=2), progress=False)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    assert err.value.step == 5
    assert "local_loss" in err.value.terms and "global_loss" not in err.value.terms
    msg = str(err.value)
    assert "step 5" in msg and "local_loss=nan" in msg and "step_00000004" in msg
    # nothing of the broken step was written; the last good checkpoint is the newest and loads
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 4)
    assert not list((tmp_path / "ckpt").glob("step_00000005*"))
    assert [r["step"] for r in _steps(tmp_path)] == [1, 2, 3, 4]
    fresh = make_method(0)
    fresh_trainer = Trainer(fresh, _data(images), _cfg(tmp_path), progress=False)
    meta = load_checkpoint(
        latest_checkpoint(tmp_path), {"model": fresh, "optimizer": fresh_trainer.optimizer}
    )
    assert meta["step"] == 4
    # the run stopped before the optimizer step: memory and checkpoint hold the same state
    now, loaded = _state(method), _state(fresh)
    for k in now:
        assert torch.equal(loaded[k], now[k]), k
        assert torch.isfinite(loaded[k]).all()


def test_metrics_jsonl_and_knn_monitor_on_the_teacher(cifar, images, tmp_path):
    from vssl.evaluate.monitor import KNNMonitor

    monitor = KNNMonitor(
        cifar / "train",
        cifar / "test",
        every_n_steps=2,
        k=5,
        max_per_split=30,
        resolution=32,
        num_workers=0,
    )
    seen, run = [], monitor.maybe_run

    def recording(step, model):
        seen.append((step, model))
        return run(step, model)

    monitor.maybe_run = recording
    method = make_method(0)
    Trainer(
        method,
        _data(images),
        _cfg(tmp_path, epochs=2, log_every=3),
        monitors=[monitor],
        progress=False,
    ).fit()
    assert all(model is method.teacher["backbone"] for _, model in seen)
    assert [s for s, _ in seen] == [0, 1, 2, 3, 4]
    lines = _lines(tmp_path)
    assert [r["step"] for r in lines] == [0, 2, 3, 4]  # monitor steps 0, 2, 4; log steps 3, 4
    assert set(lines[0]) == {"step", "epoch", "knn_top1", "knn_top5", "knn_seconds"}
    assert set(lines[1]) == {"step", "epoch", "knn_top1", "knn_top5", "knn_seconds"}
    full = {
        "step",
        "epoch",
        "loss",
        "global_loss",
        "local_loss",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "grad_norm",
        "images_per_s",
        "seconds",
    }
    assert set(lines[2]) == full
    assert set(lines[3]) == full | {"knn_top1", "knn_top5", "knn_seconds"}
    assert [r["epoch"] for r in lines[2:]] == [1, 1]
    for r in lines[2:]:
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["images_per_s"] > 0
        assert r["loss"] == pytest.approx(r["global_loss"] + r["local_loss"], rel=1e-5)
    assert lines[3]["seconds"] > lines[2]["seconds"] > 0
    for r in (lines[0], lines[1], lines[3]):
        assert 0.0 <= r["knn_top1"] <= r["knn_top5"] <= 1.0


def test_grad_checkpointing_recomputes_blocks_and_keeps_the_math(images, tmp_path):
    calls, results = {}, {}
    for flag in (False, True):
        method = make_method(0)
        count = [0]
        # a pre-hook: the recomputation stops early, before a forward hook would fire
        method.student["backbone"].blocks[0].register_forward_pre_hook(
            lambda *_, count=count: count.__setitem__(0, count[0] + 1)
        )
        trainer = Trainer(
            method,
            _data(images),
            _cfg(tmp_path / str(flag), max_steps=2, grad_checkpointing=flag),
            progress=False,
        )
        assert method.student["backbone"].grad_checkpointing is flag
        assert method.teacher["backbone"].grad_checkpointing is False  # no backward there
        trainer.fit()
        calls[flag], results[flag] = count[0], (_steps(tmp_path / str(flag)), _state(method))
    # 2 steps x (global + local forward); checkpointing runs each block forward again in backward
    assert calls == {False: 4, True: 8}
    assert [r["loss"] for r in results[True][0]] == pytest.approx(
        [r["loss"] for r in results[False][0]], rel=1e-6
    )
    for k, v in results[False][1].items():
        torch.testing.assert_close(results[True][1][k], v, rtol=0, atol=1e-6, msg=k)
    with pytest.raises(RuntimeError, match="already ran fit"):
        trainer.fit()


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"unknown train config keys \['epoch'\].*allowed"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="precision.*allowed"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="strategy.*allowed"):
        TrainConfig(strategy="deepspeed")
    with pytest.raises(ValueError, match="batch_size_per_rank"):
        TrainConfig(batch_size_per_rank=0)


def test_trainer_rejects_mismatched_batch_size(images, tmp_path):
    with pytest.raises(ValueError, match="batch_size_per_rank"):
        Trainer(
            make_method(0), _data(images), _cfg(tmp_path, batch_size_per_rank=16), progress=False
        )


# ---------------------------------------------------------------------------------- TrainData


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_train_data_batches_are_a_function_of_seed_epoch_step(images):
    full_recipe = dict(seed=5, photometric=MultiCropPhotometric())  # DINOv2's, blur included
    data = _data(images, **full_recipe)
    epoch0 = list(data.batches(0))
    assert len(epoch0) == data.batches_per_epoch == 4
    b = epoch0[0]
    assert b["global"].shape == (2 * B, 3, 32, 32) and b["global"].dtype == torch.float32
    assert b["local"].shape == (2 * B, 3, 16, 16)
    assert b["masks"].shape == (2 * B, 16) and b["masks"].dtype == torch.bool
    assert int(b["n_masked_patches"]) == int(b["masks"].sum()) > 0
    assert b["label"].shape == (B,)
    # resuming at step 2 gives exactly batches 2 and 3, with no work done for 0 and 1
    assert all(_same(x, y) for x, y in zip(list(data.batches(0, start_step=2)), epoch0[2:]))
    # the same with DataLoader workers (each builds whole batches from its own seeds)
    workers = list(_data(images, num_workers=2, **full_recipe).batches(0, start_step=1))
    assert len(workers) == 3 and all(_same(x, y) for x, y in zip(workers, epoch0[1:]))
    # another epoch or another seed draws other images and crops
    assert not _same(next(data.batches(1)), b)
    assert not _same(next(_data(images, seed=6, photometric=MultiCropPhotometric()).batches(0)), b)


def test_train_data_splits_ranks_disjointly(images):
    r0 = _data(images, rank=0, world_size=2, batches_per_epoch=None)
    r1 = _data(images, rank=1, world_size=2, batches_per_epoch=None)
    assert r0.batches_per_epoch == r1.batches_per_epoch == 160 // (2 * B)
    order = r0.epoch_order(3)
    assert torch.equal(order, r1.epoch_order(3))  # one permutation shared by the ranks
    seen = []
    for step in range(r0.batches_per_epoch):
        i0, i1 = r0.batch_indices(3, step, order), r1.batch_indices(3, step, order)
        assert len(i0) == len(i1) == B
        seen += i0 + i1
    assert len(seen) == len(set(seen)) == r0.batches_per_epoch * 2 * B


def test_train_data_over_shards_resumes_at_a_batch_boundary(cifar, tmp_path):
    from vssl.data.pack import pack

    folder = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for p in sorted((cifar / "train" / cls).iterdir())[:24]:
            (folder / cls / p.name).write_bytes(p.read_bytes())
    pack(folder, tmp_path / "shards", samples_per_shard=12)
    kw = dict(seed=2, batches_per_epoch=None, shuffle_buffer=8, num_workers=2)
    data = TrainData(tmp_path / "shards", batch_size=B, **data_kwargs(), **kw)
    assert data.stream is not None and data.batches_per_epoch == 48 // B
    full = list(data.batches(0))
    assert len(full) == 6
    resumed = list(
        TrainData(tmp_path / "shards", batch_size=B, **data_kwargs(), **kw).batches(0, 4)
    )
    assert len(resumed) == 2 and all(_same(x, y) for x, y in zip(resumed, full[4:]))
    labels = torch.cat([b["label"] for b in full])
    assert sorted(labels.tolist()) == [0] * 24 + [1] * 24  # every image once per epoch


# --------------------------------------------------------------------------------- checkpoints


def _tiny_state(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def test_checkpoint_save_is_atomic_when_it_fails_midway(tmp_path, monitorpatch=None):
    import torch.distributed.checkpoint as dcp

    import vssl.train.checkpoint as ck

    model, opt = _tiny_state(0)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(
        checkpoint_path(tmp_path, 1), {"model": model, "optimizer": opt, "meta": {"step": 1}}
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save = dcp.save

    def crash_after_first_file(state_dict, checkpoint_id, **kw):
        real_save(state_dict, checkpoint_id=checkpoint_id, **kw)  # shards written ...
        raise OSError("I/O error")  # ... then the save fails before it completes

    for where, patch in (("dcp", crash_after_first_file), ("state file", None)):
        mp = pytest.MonkeyPatch()
        if patch is not None:
            mp.setattr(ck.dcp, "save", patch)
        else:
            mp.setattr(ck, "_write_state", lambda *a: (_ for _ in ()).throw(OSError("killed")))
        with pytest.raises(OSError):
            save_checkpoint(
                checkpoint_path(tmp_path, 2),
                {"model": model, "optimizer": opt, "meta": {"step": 2}},
            )
        mp.undo()
        assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1), where
        # a save that fails (rather than a process that dies) removes its partial folder
        assert not (tmp_path / "ckpt" / "step_00000002.tmp").exists(), where
        with pytest.raises(CheckpointError, match="not a complete checkpoint"):
            load_checkpoint(tmp_path / "ckpt" / "step_00000002.tmp", {"model": model})

    fresh, fresh_opt = _tiny_state(1)
    assert load_checkpoint(
        latest_checkpoint(tmp_path), {"model": fresh, "optimizer": fresh_opt}
    ) == {"step": 1}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, good[k]), k
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )

    # a later good save replaces the leftovers and keeps only the newest `keep_last`
    for step in (2, 3, 4):
        save_checkpoint(
            checkpoint_path(tmp_path, step),
            {"model": model, "optimizer": opt, "meta": {"step": step}},
            keep_last=2,
        )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_checkpoint_load_is_strict_about_the_model(tmp_path):
    model, opt = _tiny_state(0)
    save_checkpoint(checkpoint_path(tmp_path, 1), {"model": model, "meta": {"step": 1}})
    other = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2), nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match=r"missing \['3.bias', '3.weight'\]"):
        load_checkpoint(latest_checkpoint(tmp_path), {"model": other})
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(latest_checkpoint(tmp_path), {"model": model, "optimizer": opt})


# ------------------------------------------------------------------------ with the real method


def test_trainer_runs_dinov2(images, tmp_path):
    """The real method through the trainer: DINO + iBOT + KoLeo terms logged and finite, the
    prototypes frozen for the first epoch, the teacher moved, the checkpoint reloadable."""
    from vssl.methods.dinov2 import DINOv2, DINOv2Config
    from vssl.models.vit import VisionTransformer

    def build():
        torch.manual_seed(0)
        vit = VisionTransformer(
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            layerscale=1e-5,
            drop_path_rate=0.1,
        )
        return DINOv2(
            vit,
            DINOv2Config(
                n_prototypes=64,
                bottleneck_dim=16,
                hidden_dim=32,
                warmup_teacher_temp_epochs=1,
                ibot_n_prototypes=64,
                centering="sinkhorn_knopp",
            ),
        )

    method = build()
    init = _state(method)
    trainer = Trainer(method, _data(images), _cfg(tmp_path, max_steps=2), progress=False)
    assert trainer.frozen[0][1] == 2  # DINOv2Config's freeze_last_layer_epochs=1 of 2 iterations
    assert {id(p) for p in method.prototype_parameters()} == {
        id(p) for g in trainer.optimizer.param_groups if g["frozen_until"] for p in g["params"]
    }
    summary = trainer.fit()
    assert summary["step"] == 2
    rows = _steps(tmp_path)
    terms = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss",) + terms), r
        assert r["ibot_loss"] > 0 and r["dino_global_crops_loss"] > 0
    after = _state(method)
    protos = [k for k in after if k.startswith("student.") and "last_layer" in k]
    assert protos and all(torch.equal(after[k], init[k]) for k in protos)
    assert any(
        not torch.equal(after[k], init[k]) for k in after if k.startswith("teacher.backbone")
    )
    fresh = build()
    fresh_trainer = Trainer(fresh, _data(images), _cfg(tmp_path), progress=False)
    load_checkpoint(
        latest_checkpoint(tmp_path), {"model": fresh, "optimizer": fresh_trainer.optimizer}
    )
    for k, v in _state(fresh).items():
        assert torch.equal(v, after[k]), k
