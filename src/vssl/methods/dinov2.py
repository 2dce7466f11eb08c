"""DINOv2 / Web-DINO as a method: student and EMA teacher, DINO + iBOT + KoLeo losses.

What DINOv2's ``SSLMetaArch.forward_backward`` computes, without its loop, devices or precision
(the trainer owns those, docs/architecture.md):

- the teacher (an EMA copy, no gradients, eval mode) sees the 2 global crops; its CLS logits are
  swapped crop-wise so that student crop A is matched to teacher crop B and vice versa;
- the student sees the global crops with iBOT mask tokens and the local crops without;
- DINO loss: every local crop against both teacher crops, plus A<->B for the global crops, each
  divided by the number of pairs ``n_local_crops_loss_terms + n_global_crops_loss_terms``
  (``2 * n_local + 2``);
- iBOT loss: masked patch tokens of the student against the teacher's (unmasked) tokens at the
  same positions, each image weighted ``1/#masked`` and the sum divided by the number of global
  crops;
- KoLeo (weight 0.1) on the student's pre-head CLS tokens of each global crop separately;
- shared DINO/iBOT head (one head call for CLS and patch tokens) or a separate iBOT head.

The method owns DINOv2's step schedules (docs/architecture.md, "The method contract"): the teacher
temperature (linear warm-up, then constant), the teacher's EMA momentum (cosine to 1) and the
prototype freeze, each a function of the step from :meth:`DINOv2.plan`.

``forward`` returns ``{"loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss",
"ibot_loss"}``. The terms are the values DINOv2 logs, so curves compare with its logs: the KoLeo
and iBOT terms are logged halved (``koleo_loss = 0.1 * (k_A + k_B) / 2``, ``ibot_loss =
ibot / 2``) while ``loss`` holds them in full:
``loss = w_dino * (local + global) + 2 * koleo_loss + 2 * w_ibot * ibot_loss``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..data.views import ViewSpec
from ..models.checkpoints import Checkpoint, CheckpointError, check_state_dict, read_checkpoint
from ..models.heads import DINOHead, describe_head
from ..models.vit import VisionTransformer
from ..train.schedules import CosineSchedule
from .base import Freeze, StepPlan, global_crop_pairs, register_method
from .losses import CENTERINGS, DINOLoss, iBOTPatchLoss, koleo_loss

log = logging.getLogger("vssl")

__all__ = ["DINOv2", "DINOv2Config"]


@dataclass
class DINOv2Config:
    """DINOv2's method settings (``ssl_default_config.yaml``'s ``dino`` and ``ibot`` sections).

    Defaults are DINOv2's defaults; the ViT-L/g recipes use ``n_prototypes=131072``,
    ``bottleneck_dim=384``, ``ibot_separate_head=True``, ``centering="sinkhorn_knopp"``.
    The teacher schedules are DINOv2's ``teacher`` section (momentum cosine ``momentum_teacher ->
    final_momentum_teacher``; temperature warm-up ``warmup_teacher_temp -> teacher_temp`` over
    ``warmup_teacher_temp_epochs``, then constant) and ``optim.freeze_last_layer_epochs``; the lr
    and weight-decay schedules belong to the trainer. ``mask_probability`` / ``mask_ratio`` size
    the iBOT masks of the views (DINOv2 configures them under ``ibot``).
    """

    choices = {"centering": tuple(CENTERINGS)}
    aliases = {"centering": {"centering": "ema"}}  # DINOv2's yaml calls EMA centering "centering"

    n_prototypes: int = 65536
    bottleneck_dim: int = 256
    hidden_dim: int = 2048
    nlayers: int = 3
    head_use_bn: bool = False  # BatchNorm in the heads' MLPs (DINO's use_bn_in_head)
    dino_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    ibot_loss_weight: float = 1.0
    ibot_separate_head: bool = False
    ibot_n_prototypes: int = 65536
    ibot_bottleneck_dim: int = 256
    ibot_hidden_dim: int = 2048
    ibot_nlayers: int = 3
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    student_temp: float = 0.1
    centering: str = "ema"  # "ema" (DINOv2's "centering") | "sinkhorn_knopp"
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    koleo_eps: float = 1e-8
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    freeze_last_layer_epochs: float = 1

    def __post_init__(self):
        if self.centering == "centering":  # DINOv2's spelling of EMA centering
            self.centering = "ema"
        if self.centering not in CENTERINGS:
            raise ValueError(
                f"centering must be one of {list(CENTERINGS)} (DINOv2's 'centering' "
                f"means 'ema'), got {self.centering!r}"
            )
        for name in (
            "n_prototypes",
            "bottleneck_dim",
            "hidden_dim",
            "nlayers",
            "ibot_n_prototypes",
            "ibot_bottleneck_dim",
            "ibot_hidden_dim",
            "ibot_nlayers",
            "sinkhorn_iterations",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("dino_loss_weight", "koleo_loss_weight", "ibot_loss_weight"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.dino_loss_weight == 0 and self.ibot_loss_weight == 0:
            raise ValueError("dino_loss_weight and ibot_loss_weight are both 0: nothing to train")
        if not self.koleo_eps > 0:
            raise ValueError(
                f"koleo_eps must be > 0 (it keeps duplicate features finite), got {self.koleo_eps!r}"
            )
        if not self.student_temp > 0:
            raise ValueError(f"student_temp must be > 0, got {self.student_temp!r}")
        if not 0.0 <= self.center_momentum < 1.0:
            raise ValueError(f"center_momentum must be in [0, 1), got {self.center_momentum!r}")
        if not 0.0 < self.mask_probability <= 1.0 and self.ibot_loss_weight > 0:
            raise ValueError(
                f"mask_probability must be in (0, 1] with iBOT on, got {self.mask_probability!r}"
            )
        for name in ("momentum_teacher", "final_momentum_teacher"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("teacher_temp", "warmup_teacher_temp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        lo, hi = self.mask_ratio
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(
                f"mask_ratio must be (lo, hi) with 0 <= lo <= hi < 1, got {self.mask_ratio!r}"
            )
        self.mask_ratio = (float(lo), float(hi))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DINOv2Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DINOv2 method keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)


def _reshard(module: nn.Module) -> None:
    """Free the gathered parameters of FSDP2-sharded submodules (no-op without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _param_key(name: str) -> str:
    """A parameter name without the wrappers' prefixes (DDP, torch.compile, checkpointing)."""
    for wrapper in (
        "module.",
        "_orig_mod.",
        "_checkpoint_wrapped_module.",
        "_fsdp_wrapped_module.",
    ):
        name = name.replace(wrapper, "")
    return name


@register_method("dinov2")
class DINOv2(nn.Module):
    """DINOv2 method around a :class:`VisionTransformer` backbone (module docstring).

    ``student`` is what the optimizer trains; ``teacher`` is its deep copy, without gradients,
    updated only by :meth:`update_teacher`. Call the submodules through ``__call__`` only (as
    here), so DDP / FSDP2 wrappers put around them keep working.
    """

    config_class = DINOv2Config

    def __init__(self, backbone: VisionTransformer, cfg: DINOv2Config | None = None):
        super().__init__()
        cfg = cfg or DINOv2Config()
        self.cfg = cfg
        self.do_dino = cfg.dino_loss_weight > 0
        self.do_koleo = self.do_dino and cfg.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot_loss_weight > 0
        if self.do_ibot and getattr(backbone, "mask_token", None) is None:
            raise ValueError(
                "iBOT needs a backbone with a mask token (ViTConfig mask_token=True), "
                "or set ibot_loss_weight=0"
            )
        dim = backbone.embed_dim
        student = {
            "backbone": backbone,
            "dino_head": DINOHead(
                dim,
                cfg.n_prototypes,
                cfg.hidden_dim,
                cfg.bottleneck_dim,
                cfg.nlayers,
                use_bn=cfg.head_use_bn,
            ),
        }
        if self.do_ibot and cfg.ibot_separate_head:
            student["ibot_head"] = DINOHead(
                dim,
                cfg.ibot_n_prototypes,
                cfg.ibot_hidden_dim,
                cfg.ibot_bottleneck_dim,
                cfg.ibot_nlayers,
                use_bn=cfg.head_use_bn,
            )
        self.student = nn.ModuleDict(student)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        common = dict(
            student_temp=cfg.student_temp,
            center_momentum=cfg.center_momentum,
            centering=cfg.centering,
            sinkhorn_iterations=cfg.sinkhorn_iterations,
        )
        self.dino_loss = DINOLoss(cfg.n_prototypes, **common)
        ibot_dim = cfg.ibot_n_prototypes if cfg.ibot_separate_head else cfg.n_prototypes
        self.ibot_patch_loss = iBOTPatchLoss(ibot_dim, **common)
        self._schedules = None

    # -- the method contract (vssl.methods.base) ------------------------------------------------
    def views(self) -> ViewSpec:
        """Multi-crop, with iBOT block masks on the backbone's patch grid when iBOT is on."""
        return ViewSpec(
            "multicrop",
            mask="block" if self.do_ibot else None,
            mask_ratio=tuple(self.cfg.mask_ratio),
            mask_probability=self.cfg.mask_probability,
            patch_size=self.student["backbone"].config.patch_size,
        )

    def plan(self, plan: StepPlan) -> None:
        """DINOv2's teacher schedules over the run's steps (``dinov2/train/train.py``)."""
        c = self.cfg
        tt = plan.epochs_to_steps(c.warmup_teacher_temp_epochs)
        self._schedules = {
            "momentum": CosineSchedule(
                c.momentum_teacher, c.final_momentum_teacher, plan.total_steps
            ),
            "teacher_temp": CosineSchedule(
                c.teacher_temp,
                c.teacher_temp,
                tt,
                warmup_iters=tt,
                start_warmup_value=c.warmup_teacher_temp,
            ),
        }
        self.freeze_steps = plan.epochs_to_steps(c.freeze_last_layer_epochs)
        self._temp_warmup_steps = tt

    def schedule_lines(self) -> list[str]:
        """The teacher schedules in words (``vssl pretrain --dry-run``)."""
        c = self.cfg
        self._plan()
        return [
            f"  teacher EMA  {c.momentum_teacher:g} -> {c.final_momentum_teacher:g} (cosine)",
            f"  teacher temp {c.warmup_teacher_temp:g} -> {c.teacher_temp:g} over "
            f"{self._temp_warmup_steps:,} steps (linear), then constant",
            f"  prototypes frozen for the first {self.freeze_steps:,} steps",
        ]

    def _plan(self) -> dict:
        if self._schedules is None:
            raise RuntimeError(
                "DINOv2.plan(StepPlan) sets the teacher schedules: call it (the "
                "trainer does) or pass teacher_temp= explicitly"
            )
        return self._schedules

    def scheduled(self, step: int) -> dict[str, float]:
        s = self._plan()
        return {"momentum": s["momentum"][step], "teacher_temp": s["teacher_temp"][step]}

    def after_step(self, step: int) -> None:
        """The teacher follows the student with the scheduled momentum."""
        self.update_teacher(self._plan()["momentum"][step])

    def frozen_parameters(self) -> list[Freeze]:
        """The prototypes, for the first ``freeze_last_layer_epochs``."""
        self._plan()
        return [Freeze(self.prototype_parameters(), self.freeze_steps)]

    def encoder(self) -> nn.Module:
        """The teacher backbone: what DINOv2 evaluates and releases."""
        return self.teacher["backbone"]

    def train(self, mode: bool = True) -> DINOv2:
        """The teacher stays in eval mode (no drop-path), as in DINOv2; BatchNorms in its heads
        (``head_use_bn``) keep normalizing with batch statistics, as DINO's teacher does."""
        super().train(mode)
        self.teacher.eval()
        for m in self.teacher.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.SyncBatchNorm)):
                m.train(mode)
        return self

    @staticmethod
    def _shared_head(
        head: DINOHead, cls: torch.Tensor, patch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared DINO/iBOT head over CLS and patch tokens: one call, as DINOv2 does; a head
        with BatchNorm gets them in two calls, so each is normalized by its own statistics."""
        if head.use_bn:
            return head(cls), head(patch)
        out = head(torch.cat((cls, patch)))
        return out[: cls.shape[0]], out[cls.shape[0] :]

    # -- the losses ---------------------------------------------------------------------------
    def _batch_layout(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
        glob = global_crop_pairs(batch, "DINOv2")
        b = glob.shape[0] // 2
        local = batch.get("local")
        if local is None or local.shape[0] == 0:
            return glob, None, b, 0
        if local.shape[0] % b:
            raise ValueError(
                f"batch['local'] has {local.shape[0]} rows, not a multiple of the "
                f"{b} images in batch['global']"
            )
        return glob, local, b, local.shape[0] // b

    def forward(
        self, batch: dict, step: int | None = None, *, teacher_temp: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Losses of one batch at ``step`` (the teacher temperature is the scheduled one unless
        ``teacher_temp`` is given)."""
        if teacher_temp is None:
            if step is None:
                raise TypeError("DINOv2.forward needs the step (or teacher_temp=)")
            teacher_temp = self._plan()["teacher_temp"][step]
        glob, local, b, n_local = self._batch_layout(batch)
        do_dino, do_ibot = self.do_dino, self.do_ibot
        separate = "ibot_head" in self.student
        masks = mask_idx = masks_weight = None
        if do_ibot:
            missing = [k for k in ("masks", "mask_indices_list", "masks_weight") if k not in batch]
            if missing:
                raise KeyError(
                    f"the batch has no {missing}: iBOT needs the collate's masks "
                    "(collate_multicrop(mask_generator=...)), or set ibot_loss_weight=0"
                )
            masks = batch["masks"].to(glob.device, non_blocking=True)
            mask_idx = batch["mask_indices_list"].to(glob.device, non_blocking=True)
            masks_weight = batch["masks_weight"].to(glob.device, non_blocking=True)

        # teacher: targets for the CLS tokens (crops swapped) and for the masked patches
        with torch.no_grad():
            t_out = self.teacher["backbone"](glob, is_training=True)
            t_cls = t_out["x_norm_clstoken"]
            t_cls = torch.cat((t_cls[b:], t_cls[:b]))  # teacher B first: student A <-> teacher B
            t_patch = None
            if do_ibot:
                t_patch = t_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_idx)
            if do_ibot and not separate:
                t_cls_logits, t_patch_logits = self._shared_head(
                    self.teacher["dino_head"], t_cls, t_patch
                )
            else:
                t_cls_logits = self.teacher["dino_head"](t_cls)
                t_patch_logits = self.teacher["ibot_head"](t_patch) if do_ibot else None
            t_dino = self.dino_loss.teacher_probs(t_cls_logits, teacher_temp) if do_dino else None
            t_ibot = (
                self.ibot_patch_loss.teacher_probs(t_patch_logits, teacher_temp)
                if do_ibot
                else None
            )
        _reshard(self.teacher)  # FSDP2 keeps a root's parameters gathered after forward; the
        # teacher has no backward to free them (DINOv2's reshard_fsdp_model(self.teacher))

        # student
        s_glob = self.student["backbone"](glob, masks=masks, is_training=True)
        s_cls = s_glob["x_norm_clstoken"]
        all_cls = s_cls
        if n_local:
            s_local_cls = self.student["backbone"](local, is_training=True)["x_norm_clstoken"]
            all_cls = torch.cat((s_local_cls, s_cls))
        if do_ibot:
            s_patch = s_glob["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_idx)
            if separate:
                out = self.student["dino_head"](all_cls)
                s_patch_logits = self.student["ibot_head"](s_patch)
            else:
                out, s_patch_logits = self._shared_head(self.student["dino_head"], all_cls, s_patch)
        else:
            out = self.student["dino_head"](all_cls)
        s_local_logits = out[: n_local * b] if n_local else None
        s_cls_logits = out[n_local * b :]

        zero = glob.new_zeros((), dtype=torch.float32)
        n_terms = max(2 * n_local, 1) + 2  # n_local_crops_loss_terms + n_global_crops_loss_terms
        dino_local = dino_global = koleo = ibot = zero
        loss = zero
        if do_dino:
            teacher_crops = t_dino.chunk(2)
            if n_local:
                dino_local = self.dino_loss(s_local_logits.chunk(n_local), teacher_crops) / n_terms
            # [A; B] against [B; A]: the mean over 2B rows, times 2, is the sum of the two pairs
            dino_global = self.dino_loss([s_cls_logits], [t_dino]) * 2 / n_terms
            loss = loss + self.cfg.dino_loss_weight * (dino_local + dino_global)
            if self.do_koleo:
                koleo = self.cfg.koleo_loss_weight * sum(
                    koleo_loss(c, self.cfg.koleo_eps) for c in s_cls.chunk(2)
                )
                loss = loss + koleo
        if do_ibot:
            # DINOv2 scales by 2 (both global crops together) and by 1/n_global_crops: factor 1
            ibot = self.ibot_patch_loss(
                s_patch_logits, t_ibot, masks_weight, n_images=masks.shape[0]
            )
            loss = loss + self.cfg.ibot_loss_weight * ibot
        return {
            "loss": loss,
            "dino_local_crops_loss": dino_local.detach(),
            "dino_global_crops_loss": dino_global.detach(),
            "koleo_loss": (koleo / 2).detach(),
            "ibot_loss": (ibot / 2).detach(),
        }

    # -- teacher, prototypes --------------------------------------------------------------------
    def _paired_parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        s = {_param_key(n): p for n, p in self.student.named_parameters()}
        t = {_param_key(n): p for n, p in self.teacher.named_parameters()}
        if s.keys() != t.keys():
            only_s, only_t = sorted(s.keys() - t.keys()), sorted(t.keys() - s.keys())
            raise RuntimeError(
                "student and teacher parameters differ (wrap both the same way): only in student "
                f"{only_s[:5]}, only in teacher {only_t[:5]}"
            )
        names = sorted(s)
        return [s[n] for n in names], [t[n] for n in names]

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, with foreach kernels."""
        s, t = self._paired_parameters()
        s = [p.detach() for p in s]
        t = [p.detach() for p in t]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)

    def prototype_parameters(self) -> list[nn.Parameter]:
        """The student heads' prototypes (``last_layer``): DINOv2 zeroes their gradients during
        the first epoch so that the random prototypes do not chase a still-random backbone."""
        return [
            p
            for k in ("dino_head", "ibot_head")
            if k in self.student
            for p in self.student[k].last_layer.parameters()
        ]

    # -- continuing from released weights ------------------------------------------------------
    @torch.no_grad()
    def load_pretrained(
        self, checkpoint: str | Path | Checkpoint, *, load_heads: bool = True
    ) -> dict:
        """Initialize student and teacher from any checkpoint :func:`read_checkpoint` reads.

        The backbone is loaded strictly into both (a training checkpoint's ``teacher`` branch is
        preferred, as ``read_checkpoint`` does). When the file carries ``dino_head.*`` /
        ``ibot_head.*`` tensors (DINOv2 / Web-SSL ``*_ssl_teacher.pth``) and ``load_heads``, they
        are loaded into the student's and the teacher's heads; heads that do not fit the config
        raise :class:`CheckpointError` naming the settings that would. A heads-only file (Web-SSL
        ``*_ssl_heads.pth``) loads only the heads. Call it before the trainer wraps the modules
        (DDP / FSDP2). Returns what was loaded: ``{"source", "format", "backbone", "dino_head",
        "ibot_head"[, "heads_skipped"]}``.
        """
        ck = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
        report: dict = {
            "source": ck.source,
            "format": ck.format,
            "backbone": False,
            "dino_head": False,
            "ibot_head": False,
        }
        heads = {k: v for k, v in ck.heads.items() if k.startswith(("dino_head.", "ibot_head."))}
        if not ck.state_dict and not heads:
            raise CheckpointError(f"{ck.source} holds neither backbone weights nor dino/ibot heads")
        # check everything before changing anything: a refused file leaves the method as it was
        if ck.state_dict:
            check_state_dict(self.student["backbone"], ck.state_dict, ck.source)
        groups = self._check_heads(heads, ck.source) if load_heads else {}
        if heads and not load_heads:
            report["heads_skipped"] = sorted({k.split(".")[0] for k in heads})
        if ck.state_dict:
            for branch in (self.student, self.teacher):
                branch["backbone"].load_state_dict(dict(ck.state_dict), strict=True)
            report["backbone"] = True
            if ck.origin_interpolation:
                cfg = self.student["backbone"].config
                have = {k: getattr(cfg, k) for k in ck.origin_interpolation}
                if have != ck.origin_interpolation:
                    log.warning(
                        "%s was trained with position-embedding interpolation %s; the "
                        "backbone uses %s (set them in the model config to match)",
                        ck.source,
                        ck.origin_interpolation,
                        have,
                    )
        for g, sd in groups.items():
            for branch in (self.student, self.teacher):
                branch[g].load_state_dict(dict(sd), strict=True)
            report[g] = True
        if load_heads and "ibot_head" in self.student and "ibot_head" not in groups:
            log.warning(
                "%s has no ibot_head: the separate iBOT head starts from scratch", ck.source
            )
        return report

    def _check_heads(self, heads: dict[str, torch.Tensor], source: str) -> dict[str, dict]:
        """Split ``dino_head.*`` / ``ibot_head.*`` and check each fits its head; returns the groups."""
        groups = {
            g: {k[len(g) + 1 :]: v for k, v in heads.items() if k.startswith(g + ".")}
            for g in ("dino_head", "ibot_head")
        }
        groups = {g: sd for g, sd in groups.items() if sd}
        if "ibot_head" in groups and "ibot_head" not in self.student:
            if not self.do_ibot:
                log.info("%s: ibot_head not used (ibot_loss_weight=0)", source)
                del groups["ibot_head"]
            else:
                raise CheckpointError(
                    f"{source} carries a separate ibot_head "
                    f"({_fmt_head(describe_head(groups['ibot_head']))}) but the method shares the "
                    "DINO head for iBOT: set ibot_separate_head=True (and its ibot_* sizes), or "
                    "pass load_heads=False to start the heads from scratch"
                )
        for g, sd in groups.items():
            target = self.student[g]
            want = {
                "n_prototypes": target.out_dim,
                "bottleneck_dim": target.bottleneck_dim,
                "hidden_dim": target.hidden_dim,
                "nlayers": target.nlayers,
                "in_dim": target.in_dim,
            }
            have = describe_head(sd)
            with torch.device("meta"):  # a shape-only twin: checking costs no memory
                probe = DINOHead(
                    target.in_dim,
                    target.out_dim,
                    target.hidden_dim,
                    target.bottleneck_dim,
                    target.nlayers,
                    target.mlp_bias,
                    target.use_bn,
                )
            try:
                probe.load_state_dict(dict(sd), strict=True, assign=True)
            except RuntimeError as e:
                prefix = "" if g == "dino_head" else "ibot_"
                fix = [
                    f"{prefix}{k}={v}"
                    for k, v in have.items()
                    if k in ("n_prototypes", "bottleneck_dim", "hidden_dim", "nlayers")
                    and want[k] != v
                ]
                if have.get("use_bn", False) != target.use_bn:
                    fix.append(f"head_use_bn={have.get('use_bn', False)}")
                if have.get("in_dim") not in (None, want["in_dim"]):
                    fix.append(
                        f"a backbone of width {have['in_dim']} (this one is {want['in_dim']})"
                    )
                hint = (
                    ("set " + ", ".join(fix))
                    if fix
                    else f"its tensors are not DINOv2's head layout ({e})"
                )
                raise CheckpointError(
                    f"{source}: {g} does not fit the method config (checkpoint: {_fmt_head(have)}; "
                    f"config: {_fmt_head(want)}): {hint}, or pass load_heads=False to start the "
                    "heads from scratch"
                ) from None
        return groups


def _fmt_head(d: dict) -> str:
    order = ("n_prototypes", "bottleneck_dim", "hidden_dim", "nlayers", "in_dim")
    return ", ".join(f"{k}={d[k]}" for k in order if k in d) or "unrecognized layout"
