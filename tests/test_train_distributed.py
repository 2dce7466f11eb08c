"""2-process torchrun on gloo: DDP and FSDP2 training give the same parameters on both ranks (and
the same as each other, FSDP2 through a stop and a resume), both processes exit 0, and the sharded
checkpoint reloads in one process.

One torchrun launch runs both strategies (starting two interpreters dominates the time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _torchrun_train import make_method

from vssl.train import TrainConfig, Trainer, latest_checkpoint, load_checkpoint

SCRIPT = Path(__file__).with_name("_torchrun_train.py")


def _fsdp2_available() -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return False
    import torch.distributed.fsdp as fsdp

    return hasattr(fsdp, "fully_shard")


@pytest.mark.skipif(
    not _fsdp2_available(), reason="this torch build has no gloo backend or no FSDP2 (fully_shard)"
)
def test_torchrun_ddp_and_fsdp2_two_processes(shared_data, tmp_path):
    cifar = shared_data / "cifar10-subset"
    lists = tmp_path / "lists"
    lists.mkdir()
    for name, split, per_class in (
        ("train", "train", 8),
        ("knn_train", "train", 3),
        ("knn_test", "test", 3),
    ):
        rows = [
            f"{p}\t{c.name}"
            for c in sorted((cifar / split).iterdir())
            for p in sorted(c.iterdir())[:per_class]
        ]
        (lists / f"{name}.txt").write_text("\n".join(rows) + "\n")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(SCRIPT.parent)]
            + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(SCRIPT),
            str(lists),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # torchrun exits 0 only when both workers exit 0 (a SIGABRT at teardown would show here)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    init = {k: v.clone() for k, v in make_method(0).state_dict().items()}
    states = {
        (s, r): torch.load(tmp_path / f"{s}_rank{r}.pt", weights_only=True)
        for s in ("ddp", "fsdp2")
        for r in (0, 1)
    }
    ddp0 = states["ddp", 0]
    assert set(ddp0) == set(init)
    for key in ddp0:
        for s in ("ddp", "fsdp2"):  # replicas agree bit for bit
            assert torch.equal(states[s, 0][key], states[s, 1][key]), (s, key)
        # the two engines compute the same update (a mean of the two ranks' gradients)
        torch.testing.assert_close(states["fsdp2", 0][key], ddp0[key], rtol=0, atol=1e-6, msg=key)
    moved = [k for k in ddp0 if not torch.equal(ddp0[k], init[k])]
    assert any(k.startswith("student.") for k in moved) and any(
        k.startswith("teacher.") for k in moved
    )

    losses = {}
    for s in ("ddp", "fsdp2"):
        lines = [json.loads(x) for x in (tmp_path / s / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in lines if "loss" in r]
        assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
        losses[s] = [r["loss"] for r in steps]
        assert all(torch.isfinite(torch.tensor(losses[s])))
        assert 0.0 <= steps[-1]["knn_top1"] <= 1.0  # the monitor ran on the (sharded) teacher
    assert losses["fsdp2"] == pytest.approx(losses["ddp"], rel=1e-6)
    ddp_runs = json.loads((tmp_path / "ddp_summaries.json").read_text())
    fsdp_runs = json.loads((tmp_path / "fsdp2_summaries.json").read_text())
    assert [(r["step"], r["stopped"]) for r in ddp_runs] == [(6, "completed")]
    assert [(r["step"], r["stopped"]) for r in fsdp_runs] == [(3, "max_steps"), (6, "completed")]
    assert fsdp_runs[1]["resumed_from"].endswith("step_00000003")

    # the FSDP2 checkpoint was written as shards by both ranks and reloads in a single process
    ckpt = latest_checkpoint(tmp_path / "fsdp2")
    assert ckpt is not None and ckpt.name == "step_00000006"
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    method = make_method(0)
    trainer = Trainer(
        method,
        data=_NoData(),
        cfg=TrainConfig(
            batch_size_per_rank=4, iters_per_epoch=3, output_dir=str(tmp_path / "reload")
        ),
        progress=False,
    )
    meta = load_checkpoint(ckpt, {"model": method, "optimizer": trainer.optimizer})
    assert meta["step"] == 6 and meta["world_size"] == 2 and meta["strategy"] == "fsdp2"
    for key, value in method.state_dict().items():
        torch.testing.assert_close(value, states["fsdp2", 0][key], rtol=0, atol=0, msg=key)
    assert trainer.optimizer.state  # AdamW moments came back too

    # a SIGTERM that reached rank 1 only: both ranks stopped after step 2 with one checkpoint of
    # both shards, and the resumed run ends where the uninterrupted DDP run did, bit for bit
    for r in (0, 1):
        runs = json.loads((tmp_path / f"ddp_signal_summaries_rank{r}.json").read_text())
        assert [(x["step"], x["stopped"], x["signal"]) for x in runs] == [
            (2, "interrupted", "SIGTERM"),
            (6, "completed", None),
        ], r
        assert runs[1]["resumed_from"].endswith("step_00000002")
        final = torch.load(tmp_path / f"ddp_signal_rank{r}.pt", weights_only=True)
        for key in ddp0:
            assert torch.equal(final[key], ddp0[key]), (r, key)
    step2 = tmp_path / "ddp_signal" / "ckpt" / "step_00000002"
    assert sorted(p.name for p in step2.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


class _NoData:
    """Only what the Trainer's constructor reads (this test never calls fit)."""

    batch_size = 4
    batches_per_epoch = 3
