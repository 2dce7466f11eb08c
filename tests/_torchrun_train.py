"""A tiny self-distillation method for trainer tests, and the script `torchrun` runs for them.

``TinyDINO`` is a real method on a real model: a ViT student with an MLP + L2-norm + prototype head,
an EMA teacher, and DINO's cross-entropy between teacher and student crops (no centering), so the
trainer is tested without depending on ``vssl.methods.dinov2``.

Run as a script (``torchrun --nproc-per-node 2 _torchrun_train.py LISTS OUT``, gloo): trains the
same tiny method for 6 steps on the images listed in ``LISTS/train.txt`` (with a kNN monitor on
``LISTS/knn_{train,test}.txt``; ``path<TAB>label`` lines), with DDP in one go and with FSDP2 as 3 steps + a resumed run of 3, and
writes each rank's full final state to ``OUT/<strategy>_rank<r>.pt`` and rank 0's fit() summaries
to ``OUT/<strategy>_summaries.json``; runs, metrics and checkpoints go to ``OUT/<strategy>/``.
Then ``ddp_signal``: DDP again, with a SIGTERM that reaches rank 1 only during step 2 (both ranks
must stop after step 2 and write one checkpoint), and a resumed run to step 6.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

from vssl.methods.base import Freeze, StepPlan
from vssl.models.vit import VisionTransformer
from vssl.train.schedules import CosineSchedule


class TinyHead(nn.Module):
    def __init__(self, dim: int, out_dim: int = 16, bottleneck: int = 8):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, bottleneck))
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class TinyDINO(nn.Module):
    """DINO CLS loss (global pairs A<->B and globals -> locals), EMA teacher; ``nan_at``: the
    forward call (1-based) at which ``local_loss`` becomes NaN, to test the trainer's guard.

    It keeps the method contract (vssl.methods.base) by itself, without MethodBase: DINOv2's
    teacher schedules (temperature 0.04 -> 0.07 over ``temp_warmup_epochs``, momentum cosine
    0.992 -> 1) and the prototype freeze for ``freeze_epochs``."""

    def __init__(
        self,
        backbone: VisionTransformer,
        out_dim: int = 16,
        nan_at: int | None = None,
        temp_warmup_epochs: float = 1,
        freeze_epochs: float = 1,
    ):
        super().__init__()
        self.temp_warmup_epochs, self.freeze_epochs = temp_warmup_epochs, freeze_epochs
        head = TinyHead(backbone.embed_dim, out_dim)
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.nan_at = nan_at
        self.calls = 0
        self.momenta: list[float] = []

    def _embed(self, modules: nn.ModuleDict, x: torch.Tensor, masks=None) -> torch.Tensor:
        feats = modules["backbone"].forward_features(x, masks=masks)["x_norm_clstoken"]
        return modules["head"](feats)

    # -- the method contract
    def plan(self, plan: StepPlan) -> None:
        tt = plan.epochs_to_steps(self.temp_warmup_epochs)
        self.momentum = CosineSchedule(0.992, 1.0, plan.total_steps)
        self.temp = CosineSchedule(0.07, 0.07, tt, warmup_iters=tt, start_warmup_value=0.04)
        self.freeze_until = plan.epochs_to_steps(self.freeze_epochs)

    def scheduled(self, step: int) -> dict:
        return {"momentum": self.momentum[step], "teacher_temp": self.temp[step]}

    def after_step(self, step: int) -> None:
        self.update_teacher(self.momentum[step])

    def frozen_parameters(self) -> list[Freeze]:
        return [Freeze(self.prototype_parameters(), self.freeze_until)]

    def encoder(self) -> nn.Module:
        return self.teacher["backbone"]

    def forward(self, batch: dict, step: int) -> dict:
        teacher_temp = self.temp[step]
        self.calls += 1
        g, loc = batch["global"], batch["local"]
        b = g.shape[0] // 2
        with torch.no_grad():
            t = F.softmax(self._embed(self.teacher, g) / teacher_temp, dim=-1)
        s_g = F.log_softmax(self._embed(self.student, g, batch.get("masks")) / 0.1, dim=-1)
        s_l = F.log_softmax(self._embed(self.student, loc) / 0.1, dim=-1)
        t_a, t_b = t[:b], t[b:]
        global_loss = -0.5 * ((t_a * s_g[b:]).sum(-1).mean() + (t_b * s_g[:b]).sum(-1).mean())
        n_loc = s_l.shape[0] // b
        local_loss = sum(
            -(tt * sl).sum(-1).mean() for tt in (t_a, t_b) for sl in s_l.chunk(n_loc)
        ) / (2 * n_loc)
        if self.nan_at is not None and self.calls == self.nan_at:
            local_loss = local_loss * float("nan")
        loss = global_loss + local_loss
        return {
            "loss": loss,
            "global_loss": global_loss.detach(),
            "local_loss": local_loss.detach(),
        }

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        self.momenta.append(momentum)
        s = list(self.student.parameters())
        t = list(self.teacher.parameters())
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)

    def prototype_parameters(self) -> list[nn.Parameter]:
        return [self.student["head"].last_layer.weight]


def make_method(seed: int = 0, drop_path: float = 0.1, **kw) -> TinyDINO:
    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        layerscale=1e-1,
        drop_path_rate=drop_path,
    )
    return TinyDINO(vit, **kw)


def data_kwargs() -> dict:
    """Small crops of the 32-px CIFAR images: 2 global 32 px + 2 local 16 px, iBOT masks on the
    4x4 token grid of patch 8."""
    return dict(global_size=32, local_size=16, n_local=2, patch_size=8)


#: Images per batch in the single-process trainer tests.
B = 8


def train_data(images, **kw):
    """TrainData batches of ``B`` with DINOv2's photometric recipe minus the blur (kornia's blur is
    most of a tiny step's time; TrainData's own tests keep it)."""
    from vssl.data.augment import MultiCropPhotometric
    from vssl.train import TrainData

    args = dict(
        batch_size=B,
        seed=1,
        batches_per_epoch=4,
        photometric=MultiCropPhotometric(blur_p=0.0),
        **data_kwargs(),
    )
    args.update(kw)
    return TrainData(images, **args)


def train_cfg(out, **kw):
    """6 steps: 3 epochs of 2 iterations; warm-ups (and TinyDINO's freeze) last 1 epoch."""
    from vssl.train import TrainConfig

    args = dict(
        epochs=3,
        iters_per_epoch=2,
        batch_size_per_rank=B,
        base_lr=2e-2,
        warmup_epochs=1,
        log_every=1,
        output_dir=str(out),
        seed=3,
    )
    args.update(kw)
    return TrainConfig(**args)


def state_of(method: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``method``'s state dict."""
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def main(lists: str, out_dir: str) -> None:
    import json
    import os

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from vssl.evaluate.monitor import KNNMonitor
    from vssl.train import TrainConfig, TrainData, Trainer, setup, teardown

    info = setup()
    # DDP: 6 steps straight; FSDP2: 3 steps, then a new process-like start that resumes to 6
    for strategy, budgets in (("ddp", [None]), ("fsdp2", [3, None])):
        summaries = []
        for max_steps in budgets:
            data = TrainData(
                os.path.join(lists, "train.txt"),
                batch_size=4,
                seed=1,
                batches_per_epoch=3,
                **data_kwargs(),
            )
            method = make_method(seed=0, temp_warmup_epochs=0, freeze_epochs=0)
            cfg = TrainConfig(
                epochs=2,
                iters_per_epoch=3,
                batch_size_per_rank=4,
                base_lr=1e-2,
                warmup_epochs=0,
                strategy=strategy,
                log_every=1,
                output_dir=os.path.join(out_dir, strategy),
                seed=2,
                max_steps=max_steps,
            )
            monitor = KNNMonitor(
                os.path.join(lists, "knn_train.txt"),
                os.path.join(lists, "knn_test.txt"),
                every_n_steps=3,
                k=5,
                resolution=32,
                num_workers=0,
            )
            summaries.append(Trainer(method, data, cfg, monitors=[monitor], progress=False).fit())
        full = get_model_state_dict(method, options=StateDictOptions(full_state_dict=True))
        full = {k: v.detach().clone() for k, v in full.items()}
        torch.save(full, os.path.join(out_dir, f"{strategy}_rank{info.rank}.pt"))
        if info.is_main:
            with open(os.path.join(out_dir, f"{strategy}_summaries.json"), "w") as f:
                json.dump(summaries, f)
    # an interrupt that reaches one rank only: every rank stops after the same step
    import signal

    summaries = []
    for phase in ("interrupted", "resumed"):
        data = TrainData(
            os.path.join(lists, "train.txt"),
            batch_size=4,
            seed=1,
            batches_per_epoch=3,
            **data_kwargs(),
        )
        method = make_method(seed=0, temp_warmup_epochs=0, freeze_epochs=0)
        if phase == "interrupted" and info.rank == 1:
            forward = method.forward

            def forward_then_signal(batch, step, forward=forward, method=method):
                out = forward(batch, step)
                if method.calls == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                return out

            method.forward = forward_then_signal
        cfg = TrainConfig(
            epochs=2,
            iters_per_epoch=3,
            batch_size_per_rank=4,
            base_lr=1e-2,
            warmup_epochs=0,
            strategy="ddp",
            log_every=1,
            output_dir=os.path.join(out_dir, "ddp_signal"),
            seed=2,
        )
        summaries.append(Trainer(method, data, cfg, progress=False).fit())
    full = {k: v.detach().clone() for k, v in method.state_dict().items()}
    torch.save(full, os.path.join(out_dir, f"ddp_signal_rank{info.rank}.pt"))
    with open(os.path.join(out_dir, f"ddp_signal_summaries_rank{info.rank}.json"), "w") as f:
        json.dump(summaries, f)
    teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
