"""Two-tower (image-text) models for zero-shot classification and retrieval.

Any object with ``encode_image(list[PIL.Image]) -> Tensor (N, D)`` and
``encode_text(list[str]) -> Tensor (N, D)`` is a :class:`TwoTowerModel`: the CLIP/ALIGN baseline
vssl trains, a transformers checkpoint (:func:`load_two_tower`), or a test double. Embeddings come
back *unnormalized*, exactly what the model's ``get_image_features``/``get_text_features`` return;
the evaluators normalize, so one convention holds for every model.

:func:`load_two_tower` reads a ``vssl pretrain`` run of the ``clip`` method, or local transformers
directories holding ``CLIPModel``, ``AlignModel`` (Kakao's ALIGN) or ``SiglipModel``, tokenizing each the way the model was trained (see
``_TEXT_RULES``). Images go through the directory's image processor with the PIL backend: the
torchvision ("fast") processors are not used, so no torchvision install is needed.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

__all__ = [
    "HFTwoTower",
    "SUPPORTED_TYPES",
    "TwoTowerModel",
    "encode_image_files",
    "load_two_tower",
    "pil_image_processor",
]


@runtime_checkable
class TwoTowerModel(Protocol):
    """What the zero-shot and retrieval evaluators need from an image-text model."""

    def encode_image(self, images: list) -> torch.Tensor:
        """(N, D) image embeddings of N RGB ``PIL.Image``s (unnormalized)."""
        ...

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(N, D) text embeddings of N strings (unnormalized)."""
        ...


# How each model family was trained to see text; the HF processors/pipelines encode the same facts.
#   padding:   "max_length" where the model pools a fixed position (SigLIP takes the last token,
#              which must therefore be the padding/EOS it was trained with); else the longest text.
#   max_length: a fixed token budget (ALIGN's processor: 64; SigLIP: 64 via its tokenizer), else the
#              text tower's position limit, so a long caption is truncated instead of crashing.
#   mask:      SigLIP was trained without an attention mask (pad tokens are attended; big_vision and
#              open_clip do the same), so passing one would change its text embeddings.
_TEXT_RULES = {
    "clip": {"padding": True, "max_length": None, "mask": True},
    "align": {"padding": True, "max_length": 64, "mask": True},
    "siglip": {"padding": "max_length", "max_length": None, "mask": False},
}
SUPPORTED_TYPES = tuple(_TEXT_RULES)


def _embeds(out) -> torch.Tensor:
    """transformers 5.x ``get_*_features`` return an output object whose ``pooler_output`` is the
    (projected) embedding; 4.x returned the tensor itself. Accept both."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(
            f"unexpected output {type(out).__name__} from get_*_features (no "
            "pooler_output): this transformers version is not supported"
        )
    return pooled


class HFTwoTower:
    """A transformers CLIP / ALIGN / SigLIP model with its tokenizer and image processor."""

    def __init__(
        self,
        model,
        tokenizer,
        image_processor,
        *,
        model_type: str,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        name: str = "",
    ):
        if model_type not in _TEXT_RULES:
            raise ValueError(
                f"unsupported model type {model_type!r}; supported: {', '.join(SUPPORTED_TYPES)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_type = model_type
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.name = name
        self.dtype = next(model.parameters()).dtype
        rules = _TEXT_RULES[model_type]
        self.padding = rules["padding"]
        self.max_length = self._max_length(rules["max_length"])
        accepted = set(inspect.signature(model.get_text_features).parameters)
        self._text_keys = [
            k
            for k in ("input_ids", "attention_mask", "token_type_ids")
            if k in accepted and (k != "attention_mask" or rules["mask"])
        ]

    def _max_length(self, fixed: int | None) -> int | None:
        limits = []
        text_config = getattr(self.model.config, "text_config", None)
        pos = getattr(text_config, "max_position_embeddings", None)
        if pos:
            limits.append(int(pos))
        tok = getattr(self.tokenizer, "model_max_length", None)
        if tok and tok < 1_000_000:  # transformers' "no limit" sentinel is ~1e30
            limits.append(int(tok))
        if fixed:
            limits.append(fixed)
        return min(limits) if limits else None

    def __repr__(self) -> str:
        return f"HFTwoTower({self.model_type}, {self.name or type(self.model).__name__})"

    @torch.inference_mode()
    def encode_image(self, images: list) -> torch.Tensor:
        if len(images) == 0:
            raise ValueError("encode_image needs at least one image")
        out = []
        for i in range(0, len(images), self.batch_size):
            px = self.image_processor(
                images=list(images[i : i + self.batch_size]), return_tensors="pt"
            )["pixel_values"]
            px = px.to(self.device, dtype=self.dtype)
            out.append(_embeds(self.model.get_image_features(pixel_values=px)).float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not one string")
        if len(texts) == 0:
            raise ValueError("encode_text needs at least one text")
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(
                list(texts[i : i + self.batch_size]),
                padding=self.padding,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                return_tensors="pt",
            )
            inputs = {k: tok[k].to(self.device) for k in self._text_keys if k in tok}
            out.append(_embeds(self.model.get_text_features(**inputs)).float().cpu())
        return torch.cat(out)


def pil_image_processor(d: str | os.PathLike):
    """The directory's image processor with the PIL backend: the default "fast" ones need
    torchvision. transformers 5 picks the backend with ``backend=``, 4.x with ``use_fast=False``."""
    import transformers
    from transformers import AutoImageProcessor

    major = int(transformers.__version__.split(".")[0])
    kw = {"backend": "pil"} if major >= 5 else {"use_fast": False}
    try:
        return AutoImageProcessor.from_pretrained(d, **kw)
    except Exception as exc:  # noqa: BLE001 - an unreadable processor is a user error: name it
        raise ValueError(
            f"cannot load the image processor in {d} (preprocessor_config.json): {exc}"
        ) from exc


def load_two_tower(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    batch_size: int = 64,
) -> TwoTowerModel:
    """Load a local transformers directory holding a CLIP, ALIGN or SigLIP model, or a finished
    ``vssl pretrain`` run of the ``clip`` method (:func:`vssl.methods.clip.load_run`, float32).

    The family comes from ``config.json``'s ``model_type``. Raises ValueError (saying what to
    change) for a missing directory, an unsupported type, or an unreadable tokenizer/processor.
    """
    from ..models.checkpoints import parse_dtype

    d = Path(path).expanduser()
    cfg_file = d / "config.json"
    if d.is_dir() and not cfg_file.is_file() and (d / "config.yaml").is_file():
        from ..methods.clip import load_run  # a `vssl pretrain` run of the clip method

        return load_run(d, device=device, batch_size=batch_size)
    if not d.is_dir():
        raise ValueError(
            f"two-tower model directory not found: {d} (give a local transformers "
            "directory with config.json, e.g. from `save_pretrained`)"
        )
    if not cfg_file.is_file():
        raise ValueError(f"{d} has no config.json: not a transformers model directory")
    try:
        model_type = json.loads(cfg_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_file} is not valid JSON: {exc}") from None
    if model_type not in _TEXT_RULES:
        raise ValueError(
            f"{d}: model_type {model_type!r} is not a supported two-tower model; "
            f"supported: {', '.join(SUPPORTED_TYPES)} (CLIPModel, AlignModel, "
            "SiglipModel)"
        )

    from transformers import AlignModel, AutoTokenizer, CLIPModel, SiglipModel

    cls = {"clip": CLIPModel, "align": AlignModel, "siglip": SiglipModel}[model_type]
    torch_dtype = parse_dtype(dtype) or torch.float32
    try:
        model = cls.from_pretrained(d, dtype=torch_dtype)
    except Exception as exc:  # noqa: BLE001 - a broken checkpoint is a user error: name it
        raise ValueError(f"cannot load {cls.__name__} from {d}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(d)
    except Exception as exc:  # noqa: BLE001
        hint = (
            " (SigLIP's sentencepiece tokenizer needs `pip install sentencepiece`)"
            if model_type == "siglip"
            else ""
        )
        raise ValueError(f"cannot load the tokenizer in {d}: {exc}{hint}") from exc
    processor = pil_image_processor(d)
    model = model.to(device)
    return HFTwoTower(
        model,
        tokenizer,
        processor,
        model_type=model_type,
        device=device,
        batch_size=batch_size,
        name=str(d),
    )


def encode_image_files(
    model: TwoTowerModel,
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 64,
    num_threads: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, list[int], list[dict]]:
    """Decode and embed image files, skipping unreadable ones (docs/architecture.md, Robustness).

    Returns ``(embeddings (M, D) float32, kept row indices into paths (M), errors)``, where each
    error is ``{"path", "error"}``. Files are decoded ``batch_size`` at a time in threads (PIL
    releases the GIL while decoding), so memory stays bounded by one batch of images.
    """
    from ..data.decode import ImageDecodeError, open_image

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    threads = num_threads or min(8, os.cpu_count() or 1)

    def load(p):
        try:
            return open_image(p), None
        except ImageDecodeError as exc:
            return None, exc.reason

    chunks, kept, errors = [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="img", file=sys.stderr, desc="images")
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(paths), batch_size):
            batch = [str(p) for p in paths[start : start + batch_size]]
            images = []
            for j, (img, reason) in enumerate(pool.map(load, batch)):
                if img is None:
                    errors.append({"path": batch[j], "error": reason})
                else:
                    images.append(img)
                    kept.append(start + j)
            if images:
                emb = model.encode_image(images)
                if emb.ndim != 2 or emb.shape[0] != len(images):
                    raise ValueError(
                        f"encode_image returned shape {tuple(emb.shape)} for "
                        f"{len(images)} images, expected ({len(images)}, D)"
                    )
                chunks.append(emb.detach().float().cpu())
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    emb = torch.cat(chunks) if chunks else torch.zeros(0, 0)
    return emb, kept, errors
