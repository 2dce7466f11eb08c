"""`vssl info/embed/convert` on a training checkpoint step folder (``RUN/ckpt/step_N/``): the
encoder of that step (DINOv2: the teacher's backbone, MAE: the student's), read through the
trainer's restricted metadata reader (issue 16)."""

from __future__ import annotations

import pytest
import torch

import vssl
from vssl.cli import main
from vssl.models import checkpoints as ck

tc = pytest.importorskip("vssl.train.checkpoint")
if not all(hasattr(tc, n) for n in ("_SafeReader", "_SafeLoadPlanner", "read_dcp_metadata")):
    pytest.skip("this vssl has no restricted DCP reader", allow_module_level=True)

RECIPES = {
    "cpu_tiny32": [
        "model.embed_dim=32",
        "model.depth=2",
        "model.num_heads=2",
        "method.n_prototypes=64",
        "method.hidden_dim=64",
        "method.bottleneck_dim=32",
    ],
    "cpu_mae32": [
        "model.embed_dim=48",
        "model.depth=2",
        "model.num_heads=3",
        "method.decoder_embed_dim=32",
        "method.decoder_depth=1",
    ],
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_step_folder_reads_as_the_encoder_of_that_step(recipe, shared_data, tmp_path, capsys):
    root = shared_data / "cifar10-subset" / "train"
    images = [p for c in sorted(root.iterdir()) for p in sorted(c.glob("*.jpg"))[:2]]
    (tmp_path / "train.txt").write_text("".join(f"{p}\n" for p in images))
    run = tmp_path / "run"
    argv = [
        "pretrain",
        recipe,
        f"data.train={tmp_path / 'train.txt'}",
        "train.max_steps=2",
        "train.batch_size_per_rank=8",
        f"train.output_dir={run}",
        "data.num_workers=0",
        "--no-progress",
        *RECIPES[recipe],
    ]
    assert main(argv) == 0
    steps = sorted((run / "ckpt").iterdir())
    assert steps, "the run wrote no checkpoint"
    step = steps[-1]
    capsys.readouterr()

    branch = "teacher's" if recipe == "cpu_tiny32" else "student's"
    assert f"using the {branch} backbone" in ck.describe_source(step)
    from_step = vssl.create_model(step)
    exported = vssl.create_model(run / "backbone.safetensors")  # the last step's encoder
    assert from_step.config == exported.config
    for (k, a), (_, b) in zip(from_step.state_dict().items(), exported.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)

    assert main(["info", str(step)]) == 0
    out = capsys.readouterr().out
    assert f"training checkpoint {step}" in out and "values:      all finite" in out
    assert main(["convert", str(step), str(tmp_path / "m.safetensors"), "--to", "vssl"]) == 0
    assert "training checkpoint" in capsys.readouterr().err
