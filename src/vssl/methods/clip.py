"""CLIP / ALIGN / SigLIP / LiT as a method: the language-supervised baseline on the same images.

Two towers map an image and its caption into one space (docs/architecture.md, "Image–text
methods"):

- the image tower is the backbone ViT (any vssl model) followed by a bias-free linear projection
  of its final-norm CLS token (CLIP's ``visual.proj``); ``backbone.safetensors`` is the tower, so
  kNN / linear / fine-tune treat the run like any SSL encoder;
- the text tower is a small open_clip-style transformer (:class:`~vssl.models.text.TextTransformer`)
  over a BPE tokenizer trained on the run's captions (``tokenizer.json`` in the run folder), or a
  local transformers text model (``text_model``, :class:`~vssl.models.text.HFTextTower`);
- losses on L2-normalized embeddings with a learnable logit scale ``s`` (and bias ``b``):

  - ``clip``: symmetric InfoNCE, ``s`` initialized to ln(1/0.07) (CLIP, open_clip);
  - ``align``: the same with label smoothing 0.1 and temperature 1.0 (``s`` = ln 1), as ALIGN and
    COYO-ALIGN train;
  - ``siglip``: ``-sum log sigmoid(z_ij (e^s x_i.y_j + b)) / n`` with ``z`` +1 on pairs, -1
    elsewhere, ``s`` = ln 10 and ``b`` = -10 (SigLIP's t' = log 10, b = -10);

  after every optimizer step ``s`` is clamped to [0, ln 100] (open_clip's training loop);
- negatives are all-gathered across ranks *with gradients* and each rank scores its own rows
  against every column (open_clip's ``gather_with_grad=True, local_loss=True``): with DDP's
  gradient averaging this is the gradient of the full-batch loss;
- LiT (``lock_image``): the image backbone is frozen and run in eval mode; its projection and the
  text tower train (the cheapest zero-shot classifier for a language-free encoder).

The logit scale and bias are named ``logit_*`` and get no weight decay, like biases and norms.
Captions come as ``batch["caption"]`` (``ViewSpec(captions=True)``); the trainer refuses data
without them before the first step.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.views import ViewSpec
from ..models.checkpoints import Checkpoint, CheckpointError
from ..models.text import POOLS, BPETokenizer, HFTextTower, TextTransformer, train_bpe_tokenizer
from ..models.vit import VisionTransformer
from .base import MethodBase, load_backbone_strictly, register_method
from .contrastive import all_gather_with_grad

log = logging.getLogger("vssl")

__all__ = [
    "CLIP",
    "CLIPConfig",
    "LOSSES",
    "TOKENIZER_FILE",
    "TWO_TOWER_FILE",
    "contrastive_loss",
    "gather_with_grad",
    "sigmoid_loss",
]

LOSSES = ("clip", "align", "siglip")
TOKENIZER_FILE = "tokenizer.json"
TWO_TOWER_FILE = "two_tower.safetensors"

# (logit scale init, logit bias init, label smoothing) of each paper
_DEFAULTS = {
    "clip": (math.log(1 / 0.07), None, 0.0),
    "align": (math.log(1 / 1.0), None, 0.1),
    "siglip": (math.log(10.0), -10.0, 0.0),
}


@dataclass
class CLIPConfig:
    """The two-tower method's settings (open_clip's defaults; ``None``: the loss's paper value)."""

    loss: str = "clip"
    embed_dim: int = 512
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    max_logit_scale: float = math.log(100.0)
    label_smoothing: float | None = None
    local_loss: bool = True  # each rank scores its rows against all (False: the full matrix)
    lock_image: bool = False  # LiT
    # the text tower (ignored with text_model)
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    text_mlp_ratio: float = 4.0
    text_causal: bool = True
    text_pool: str = "eot"
    tokenizer: str | None = None  # a tokenizer.json to use instead of training one
    tokenizer_max_texts: int = 200_000  # captions read to train the BPE
    tokenizer_min_frequency: int = 2
    text_model: str | None = None  # a local transformers text model directory

    choices = {"loss": LOSSES, "text_pool": POOLS + ("mean",)}

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"method.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        scale, bias, smoothing = _DEFAULTS[self.loss]
        if self.init_logit_scale is None:
            self.init_logit_scale = scale
        if self.init_logit_bias is None:
            self.init_logit_bias = bias
        elif self.loss != "siglip":
            raise ValueError("method.init_logit_bias is SigLIP's: set it only with loss=siglip")
        if self.label_smoothing is None:
            self.label_smoothing = smoothing
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                f"method.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if self.loss == "siglip" and self.label_smoothing:
            raise ValueError("label smoothing applies to the softmax losses (clip, align)")
        if not 0.0 <= self.init_logit_scale <= self.max_logit_scale:
            raise ValueError(
                f"method.init_logit_scale {self.init_logit_scale:g} is outside [0, "
                f"max_logit_scale={self.max_logit_scale:g}] (it is ln of the inverse temperature)"
            )
        for name in ("embed_dim", "vocab_size", "context_length", "text_width", "text_depth"):
            if int(getattr(self, name)) < 1:
                raise ValueError(
                    f"method.{name} must be a positive integer, got {getattr(self, name)}"
                )
        if self.text_model is None and self.text_pool not in POOLS:
            raise ValueError(f"method.text_pool must be one of {POOLS} for vssl's text tower")
        if self.text_model is not None and self.text_pool == "eot":
            self.text_pool = "cls"  # a BERT-style encoder pools its first token
        if self.text_width % self.text_heads:
            raise ValueError(
                f"method.text_width {self.text_width} is not divisible by text_heads {self.text_heads}"
            )
        if self.tokenizer_max_texts < 1:
            raise ValueError("method.tokenizer_max_texts must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------- losses
def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(all ranks' rows concatenated, this rank's row offset)``; gradients flow back to every
    rank's rows (:func:`vssl.methods.contrastive.all_gather_with_grad`: open_clip's
    ``gather_with_grad``). One process: ``(x, 0)``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return all_gather_with_grad(x), dist.get_rank() * x.shape[0]


def contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    label_smoothing: float = 0.0,
    *,
    local_loss: bool = True,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on normalized ``image``/``text`` (n, D) rows of this rank, with
    ``logit_scale`` the log inverse temperature; ALIGN's with ``label_smoothing`` 0.1. Negatives
    are every rank's rows (module docstring)."""
    all_image, offset = gather_with_grad(image)
    all_text, _ = gather_with_grad(text)
    scale = logit_scale.exp()
    if local_loss:
        labels = torch.arange(image.shape[0], device=image.device) + offset
        per_image = scale * image @ all_text.T
        per_text = scale * text @ all_image.T
    else:
        labels = torch.arange(all_image.shape[0], device=image.device)
        per_image = scale * all_image @ all_text.T
        per_text = per_image.T
    return (
        F.cross_entropy(per_image.float(), labels, label_smoothing=label_smoothing)
        + F.cross_entropy(per_text.float(), labels, label_smoothing=label_smoothing)
    ) / 2


def sigmoid_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    local_loss: bool = True,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss, summed over every (image, text) pair and divided by the
    number of images: this rank's images against every rank's texts (SigLIP's chunked
    formulation gives the same sum)."""
    all_text, offset = gather_with_grad(text)
    if local_loss:
        rows = image
    else:
        rows, _ = gather_with_grad(image)
        offset = 0
    logits = logit_scale.exp() * rows @ all_text.T + logit_bias
    signs = -torch.ones_like(logits)
    idx = torch.arange(rows.shape[0], device=rows.device)
    signs[idx, idx + offset] = 1.0
    return -F.logsigmoid(signs * logits.float()).sum() / rows.shape[0]


class LogitScale(nn.Module):
    """The learnable log inverse temperature (and SigLIP's bias): named ``logit_*`` so that the
    optimizer gives them no weight decay."""

    def __init__(self, scale: float, bias: float | None):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None


# ---------------------------------------------------------------------------------------- method
@register_method("clip")
class CLIP(MethodBase):
    """Image–text contrastive training around a :class:`VisionTransformer` (module docstring)."""

    config_class = CLIPConfig

    def __init__(self, backbone: VisionTransformer, cfg: CLIPConfig | None = None):
        super().__init__()
        cfg = cfg or CLIPConfig()
        self.cfg = cfg
        if cfg.text_model is not None:
            text = HFTextTower(cfg.text_model, cfg.embed_dim, cfg.text_pool, cfg.context_length)
        else:
            text = TextTransformer(
                cfg.vocab_size,
                cfg.context_length,
                cfg.text_width,
                cfg.text_depth,
                cfg.text_heads,
                cfg.text_mlp_ratio,
                cfg.embed_dim,
                cfg.text_causal,
                cfg.text_pool,
            )
        image_proj = nn.Linear(backbone.embed_dim, cfg.embed_dim, bias=False)
        if not image_proj.weight.is_meta:
            nn.init.normal_(image_proj.weight, std=backbone.embed_dim**-0.5)
        self.student = nn.ModuleDict(
            {
                "backbone": backbone,
                "image_proj": image_proj,
                "text": text,
                "logit": LogitScale(cfg.init_logit_scale, cfg.init_logit_bias),
            }
        )
        if getattr(backbone, "mask_token", None) is not None:
            # never masked here: a parameter without gradient would stall DDP's reducer
            backbone.mask_token.requires_grad_(False)
        if cfg.lock_image:
            backbone.requires_grad_(False)
        self.tokenizer: BPETokenizer | None = None

    # -- the contract
    def views(self) -> ViewSpec:
        return ViewSpec("single", captions=True)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.lock_image:
            self.student["backbone"].eval()  # LiT: the locked tower never trains (no drop-path)
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) unnormalized image embeddings of normalized images."""
        backbone = self.student["backbone"]
        if self.cfg.lock_image:
            with torch.no_grad():
                cls = backbone(images, is_training=True)["x_norm_clstoken"]
        else:
            cls = backbone(images, is_training=True)["x_norm_clstoken"]
        return self.student["image_proj"](cls)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(B, embed_dim) unnormalized text embeddings of raw strings."""
        text = self.student["text"]
        if isinstance(text, HFTextTower):
            return text(texts)
        if self.tokenizer is None:
            raise RuntimeError(
                "the text tower has no tokenizer yet: CLIP.prepare(data, run_dir) trains or "
                "loads it (vssl pretrain does this before the first step)"
            )
        ids, lengths = self.tokenizer(texts)
        device = text.token_embedding.weight.device
        return text(ids.to(device), lengths.to(device))

    def forward(self, batch: dict, step: int | None = None) -> dict[str, torch.Tensor]:
        missing = [k for k in ("image", "caption") if k not in batch]
        if missing:
            raise KeyError(
                f"the batch has no {missing}: CLIP needs images with captions "
                "(ViewSpec(captions=True))"
            )
        images = batch["image"]
        if not torch.is_floating_point(images):
            raise TypeError("batch['image'] is uint8: normalize it (SingleViews.finish) first")
        img = F.normalize(self.encode_image(images).float(), dim=-1)
        txt = F.normalize(self.encode_text(list(batch["caption"])).float(), dim=-1)
        logit = self.student["logit"]
        if self.cfg.loss == "siglip":
            loss = sigmoid_loss(
                img, txt, logit.logit_scale, logit.logit_bias, local_loss=self.cfg.local_loss
            )
        else:
            loss = contrastive_loss(
                img,
                txt,
                logit.logit_scale,
                self.cfg.label_smoothing,
                local_loss=self.cfg.local_loss,
            )
        out = {"loss": loss, "logit_scale": logit.logit_scale.detach().exp()}
        if logit.logit_bias is not None:
            out["logit_bias"] = logit.logit_bias.detach().clone()
        return out

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """open_clip clamps the scale after every optimizer step: 1 <= 1/T <= 100."""
        self.student["logit"].logit_scale.clamp_(0.0, self.cfg.max_logit_scale)

    # -- the run folder: tokenizer before the first step, the towers after the last
    def prepare(self, data, run_dir: str | os.PathLike) -> None:
        """Load the run's ``tokenizer.json`` (a resumed run), the one ``tokenizer`` names, or
        train a BPE on the training captions (``data.caption_texts``); rank 0's is broadcast so
        every rank tokenizes alike, and written to the run folder."""
        if self.cfg.text_model is not None:
            return
        import torch.distributed as dist

        path = Path(run_dir) / TOKENIZER_FILE
        distributed = dist.is_available() and dist.is_initialized()
        main = not distributed or dist.get_rank() == 0
        payload = [None]
        if main:
            if path.is_file():
                tok = BPETokenizer.from_file(path)
            elif self.cfg.tokenizer is not None:
                tok = BPETokenizer.from_file(self.cfg.tokenizer)
            else:
                texts = data.caption_texts(self.cfg.tokenizer_max_texts)
                tok = train_bpe_tokenizer(
                    texts,
                    self.cfg.vocab_size,
                    self.cfg.context_length,
                    self.cfg.tokenizer_min_frequency,
                )
                log.info("trained a %d-token BPE on %d captions", tok.vocab_size, len(texts))
            payload = [tok.to_json()]
        if distributed:
            dist.broadcast_object_list(payload, src=0)
        self.set_tokenizer(BPETokenizer.from_json(payload[0]))
        if main:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(path)

    def set_tokenizer(self, tok: BPETokenizer) -> None:
        """Use ``tok`` (refused when it does not fit the text tower)."""
        if tok.vocab_size > self.cfg.vocab_size:
            raise ValueError(
                f"the tokenizer has {tok.vocab_size} tokens but the text tower "
                f"{self.cfg.vocab_size}: set method.vocab_size={tok.vocab_size} or more"
            )
        if tok.context_length != self.cfg.context_length:
            raise ValueError(
                f"the tokenizer pads to {tok.context_length} tokens but method.context_length "
                f"is {self.cfg.context_length}: make them equal"
            )
        self.tokenizer = tok

    def export(self, run_dir: str | os.PathLike, student_state: dict) -> Path:
        """The towers beside ``backbone.safetensors``: ``two_tower.safetensors`` holds the image
        projection, the text tower and the logit scale (not the backbone, which is exported)."""
        from safetensors.torch import save_file

        sd = {
            k: v.detach().cpu().contiguous()
            for k, v in student_state.items()
            if not k.startswith("backbone.")
        }
        path = Path(run_dir) / TWO_TOWER_FILE
        tmp = path.with_name(path.name + ".tmp")
        save_file(sd, str(tmp), metadata={"format": "vssl-two-tower", "method": "clip"})
        os.replace(tmp, path)
        return path

    # -- continuing from released weights (LiT: the locked tower)
    @torch.no_grad()
    def load_pretrained(self, checkpoint: str | Checkpoint) -> dict:
        """The image backbone from any checkpoint :func:`read_checkpoint` reads (strictly)."""
        backbone = self.student["backbone"]
        ck = load_backbone_strictly(backbone, checkpoint)
        if self.cfg.lock_image:
            backbone.requires_grad_(False)
        return {"source": ck.source, "format": ck.format, "backbone": True}


# ----------------------------------------------------------------------- a finished run as a model
class CLIPRun:
    """A finished ``clip`` run folder as a two-tower model (``encode_image`` of PIL images,
    ``encode_text`` of strings, unnormalized), for ``vssl eval zeroshot / retrieval`` and
    ``vssl classify`` (:mod:`vssl.evaluate.two_tower`). Images are resized to the tower's
    resolution and center-cropped (CLIP's evaluation transform), normalized as in training."""

    def __init__(
        self,
        method: CLIP,
        *,
        resolution: int | None = None,
        device="cpu",
        batch_size: int = 64,
        name: str = "",
    ):
        from ..data.transforms import EvalTransform

        self.method = method.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.name = name
        # the size the run trained at (data.global_size), not the backbone's position grid
        # (DINOv2's is 518 while LiT trains it at 224)
        size = resolution or method.student["backbone"].config.img_size
        self.transform = EvalTransform(size, resize_ratio=1.0)

    def __repr__(self) -> str:
        return f"CLIPRun({self.name}, loss={self.method.cfg.loss})"

    @torch.inference_mode()
    def encode_image(self, images: list) -> torch.Tensor:
        if len(images) == 0:
            raise ValueError("encode_image needs at least one image")
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack(
                [self.transform(im.convert("RGB")) for im in images[i : i + self.batch_size]]
            )
            out.append(self.method.encode_image(x.to(self.device)).float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not one string")
        if len(texts) == 0:
            raise ValueError("encode_text needs at least one text")
        out = [
            self.method.encode_text(list(texts[i : i + self.batch_size])).float().cpu()
            for i in range(0, len(texts), self.batch_size)
        ]
        return torch.cat(out)


def is_two_tower_run(path: str | os.PathLike) -> bool:
    """A ``vssl pretrain`` run folder of this method (its ``config.yaml`` says ``clip``)."""
    import yaml

    cfg = Path(path) / "config.yaml"
    if not cfg.is_file():
        return False
    try:
        raw = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and (raw.get("method") or {}).get("name") == "clip"


def load_run(run_dir: str | os.PathLike, *, device="cpu", batch_size: int = 64) -> CLIPRun:
    """The two towers of a finished ``clip`` run: ``backbone.safetensors`` (the image tower),
    ``two_tower.safetensors`` (projection, text tower, logit scale) and ``tokenizer.json``."""
    from safetensors.torch import load_file

    from ..models.checkpoints import run_backbone
    from ..models.zoo import create_model
    from ..train.config import load_recipe

    run = Path(run_dir)
    if not is_two_tower_run(run):
        raise ValueError(
            f"{run} is not a two-tower run (its config.yaml does not say method.name: clip): "
            "zero-shot and retrieval need a text tower; an SSL run's encoder works with "
            "`vssl eval knn / linear`"
        )
    backbone_file = run_backbone(run)
    towers = run / TWO_TOWER_FILE
    if backbone_file is None or not towers.is_file():
        raise ValueError(
            f"{run} has no {TWO_TOWER_FILE} / backbone.safetensors yet: they are written when "
            "the run ends; resume it (`vssl pretrain` on the same output folder) to finish it"
        )
    recipe = load_recipe(run / "config.yaml")
    backbone = create_model(str(backbone_file))
    method = CLIP(backbone, recipe.method)
    sd = load_file(str(towers))
    own = {k: v for k, v in method.student.state_dict().items() if not k.startswith("backbone.")}
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{towers} does not fit the run's method config: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}"
        )
    method.student.load_state_dict(
        {**sd, **{f"backbone.{k}": v for k, v in backbone.state_dict().items()}}
    )
    if recipe.method.text_model is None:
        tok = run / TOKENIZER_FILE
        if not tok.is_file():
            raise ValueError(f"{run} has no {TOKENIZER_FILE}: the text tower cannot read text")
        method.set_tokenizer(BPETokenizer.from_file(tok))
    return CLIPRun(
        method,
        resolution=recipe.data.global_size,
        device=device,
        batch_size=batch_size,
        name=str(run),
    )
