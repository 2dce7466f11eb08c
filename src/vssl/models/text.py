"""Text towers for image–text training: a small open_clip-style transformer with a BPE tokenizer
trained on the run's captions, or a local transformers text model.

- :class:`TextTransformer`: token + learned position embeddings, pre-norm blocks (causal like
  CLIP, or bidirectional), a final LayerNorm and a bias-free projection into the shared space.
  Pooling ``eot`` takes the end-of-text token (CLIP); ``cls`` appends a learned class embedding
  after the sequence and takes it (open_clip's ``embed_cls`` / ``pool_type="last"``, which also
  works for a causal tower: the appended token sees every real token). Padding is never attended.
- :func:`train_bpe_tokenizer` / :class:`BPETokenizer`: a byte-level BPE (the `tokenizers`
  library) with ``<pad>``=0, ``<sot>``, ``<eot>``; the saved ``tokenizer.json`` itself says how
  texts are wrapped (``<sot> ... <eot>``), truncated and padded to the context length, so an
  empty or over-long caption is handled by the tokenizer's own config and never crashes.
- :class:`HFTextTower`: a local transformers encoder (a BERT, the packaged MiniLM), CLS or mean
  pooling, plus the same projection.

Parameter names keep the trainer's rules (docs/architecture.md, "The method contract"): norms are
named ``norm*`` and biases ``*.bias``, so AdamW gives them no weight decay.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BPETokenizer",
    "HFTextTower",
    "POOLS",
    "SPECIAL_TOKENS",
    "TextTransformer",
    "train_bpe_tokenizer",
]

POOLS = ("eot", "cls")
SPECIAL_TOKENS = ("<pad>", "<sot>", "<eot>")  # ids 0, 1, 2


# ------------------------------------------------------------------------------------ tokenizer
def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "the text tower's BPE needs the `tokenizers` library: pip install tokenizers "
            "(or vssl's clip extra)"
        ) from None
    return tokenizers


class BPETokenizer:
    """``tokenizer(texts) -> (ids (N, L) long, lengths (N,) long)`` from a ``tokenizer.json``
    written by :func:`train_bpe_tokenizer` (every sequence padded to the context length ``L``)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        pad = tokenizer.padding
        trunc = tokenizer.truncation
        if not pad or not pad.get("length") or not trunc:
            raise ValueError(
                "the tokenizer must pad and truncate to a fixed context length "
                "(write it with vssl.models.text.train_bpe_tokenizer)"
            )
        self.context_length = int(pad["length"])
        self.pad_id = int(pad["pad_id"])
        self.eot_id = tokenizer.token_to_id("<eot>")
        if self.eot_id is None:
            raise ValueError("the tokenizer has no <eot> token")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        Tokenizer = _tokenizers().Tokenizer
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # noqa: BLE001 - a broken file is a user error: name it
            raise ValueError(f"cannot read the tokenizer {path}: {exc}") from exc

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        self.tok.save(str(tmp))
        os.replace(tmp, path)
        return path

    def to_json(self) -> str:
        return self.tok.to_str()

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        return cls(_tokenizers().Tokenizer.from_str(text))

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("the tokenizer takes a list of strings, not one string")
        enc = self.tok.encode_batch([str(t) if t is not None else "" for t in texts])
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        lengths = torch.tensor([sum(e.attention_mask) for e in enc], dtype=torch.long)
        return ids, lengths


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, context_length: int, min_frequency: int = 2
) -> BPETokenizer:
    """A byte-level BPE (GPT-2 / CLIP style: lower-cased, NFC) trained on ``texts`` with at most
    ``vocab_size`` tokens, wrapping each text as ``<sot> ... <eot>``, truncated and padded to
    ``context_length`` (the truncation keeps ``<eot>`` last, as the post-processor adds it)."""
    _tokenizers()
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    if context_length < 3:
        raise ValueError(
            f"context_length must be >= 3 (<sot>, a token, <eot>), got {context_length}"
        )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size {vocab_size} is below the byte alphabet + special tokens "
            f"({len(alphabet) + len(SPECIAL_TOKENS)}): raise method.vocab_size"
        )
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator((str(t) for t in texts if t), trainer=trainer)
    sot, eot = tok.token_to_id("<sot>"), tok.token_to_id("<eot>")
    tok.post_processor = processors.TemplateProcessing(
        single="<sot> $A <eot>", special_tokens=[("<sot>", sot), ("<eot>", eot)]
    )
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(pad_id=tok.token_to_id("<pad>"), pad_token="<pad>", length=context_length)
    return BPETokenizer(tok)


# ---------------------------------------------------------------------------------- transformer
class _Block(nn.Module):
    """Pre-norm transformer block (open_clip's ``ResidualAttentionBlock``), SDPA attention."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    """``forward(ids (B, L), lengths (B,)) -> (B, embed_dim)`` (module docstring)."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int = 77,
        width: int = 512,
        depth: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        embed_dim: int = 512,
        causal: bool = True,
        pool: str = "eot",
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"text pool must be one of {POOLS}, got {pool!r}")
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by text heads {heads}")
        self.context_length, self.causal, self.pool = context_length, causal, pool
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, width)
        extra = 1 if pool == "cls" else 0
        self.positional_embedding = nn.Parameter(torch.empty(context_length + extra, width))
        self.cls_emb = nn.Parameter(torch.empty(width)) if pool == "cls" else None
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, embed_dim, bias=False)
        self.init_weights(depth, width)

    @torch.no_grad()
    def init_weights(self, depth: int, width: int) -> None:
        """open_clip's ``TextTransformer.init_parameters`` (std 0.02 / 0.01, scaled residuals)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.01)
        proj_std = width**-0.5 * (2 * depth) ** -0.5
        attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
        for b in self.blocks:
            nn.init.normal_(b.qkv.weight, std=attn_std)
            nn.init.normal_(b.proj.weight, std=proj_std)
            nn.init.normal_(b.mlp[0].weight, std=fc_std)
            nn.init.normal_(b.mlp[2].weight, std=proj_std)
            for lin in (b.qkv, b.proj, b.mlp[0], b.mlp[2]):
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.text_projection.weight, std=width**-0.5)

    def attention_mask(self, lengths: torch.Tensor, n: int) -> torch.Tensor:
        """(B, 1, n, n) bool: True where a query may attend a key (no padding; causal if set).
        The appended class token (last position) is always a key."""
        pos = torch.arange(n, device=lengths.device)
        keep = pos[None, :] < lengths[:, None]
        if self.pool == "cls":
            keep[:, -1] = True
        mask = keep[:, None, None, :].expand(-1, 1, n, n)
        if self.causal:
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=lengths.device).tril()
        # a padding query that sees nothing would give NaN: let it see itself (never pooled)
        return mask | torch.eye(n, dtype=torch.bool, device=lengths.device)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.context_length:
            raise ValueError(
                f"{ids.shape[1]} tokens exceed the text tower's context length "
                f"{self.context_length}: the tokenizer must truncate to it"
            )
        x = self.token_embedding(ids)
        if self.cls_emb is not None:
            x = torch.cat((x, self.cls_emb.expand(x.shape[0], 1, -1).to(x.dtype)), 1)
        n = x.shape[1]
        pos = self.positional_embedding
        if self.cls_emb is not None:
            pos = torch.cat((pos[: n - 1], pos[-1:]))
        else:
            pos = pos[:n]
        x = x + pos.to(x.dtype)
        mask = self.attention_mask(lengths, n)
        for blk in self.blocks:
            x = blk(x, mask)
        x = self.norm(x)
        if self.pool == "cls":
            pooled = x[:, -1]
        else:
            pooled = x[torch.arange(x.shape[0], device=x.device), lengths - 1]  # <eot>
        return self.text_projection(pooled)


class HFTextTower(nn.Module):
    """A local transformers text encoder as the text tower: ``forward(texts) -> (B, embed_dim)``
    (tokenized with the directory's own tokenizer, truncated to its position limit)."""

    def __init__(
        self,
        path: str | os.PathLike,
        embed_dim: int,
        pool: str = "cls",
        max_length: int | None = None,
    ):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        d = Path(path).expanduser()
        if not (d / "config.json").is_file():
            raise ValueError(
                f"method.text_model: {d} has no config.json: give a local transformers "
                "text model directory (e.g. a BERT or MiniLM saved with save_pretrained)"
            )
        if pool not in ("cls", "mean"):
            raise ValueError(
                f"method.text_pool for a transformers text model: cls or mean, not {pool!r}"
            )
        try:
            self.model = AutoModel.from_pretrained(d)
            self.tokenizer = AutoTokenizer.from_pretrained(d)
        except Exception as exc:  # noqa: BLE001 - an unreadable directory is a user error
            raise ValueError(f"cannot load a text model from {d}: {exc}") from exc
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # BERT's pooler is not used: unused parameters stall DDP
        self.path, self.pool = str(d), pool
        limits = [max_length, getattr(self.model.config, "max_position_embeddings", None)]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        limits.append(tok_max if tok_max and tok_max < 1_000_000 else None)
        self.max_length = min(int(x) for x in limits if x)
        self.text_projection = nn.Linear(self.model.config.hidden_size, embed_dim, bias=False)
        nn.init.normal_(self.text_projection.weight, std=self.model.config.hidden_size**-0.5)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        device = self.text_projection.weight.device
        tok = self.tokenizer(
            [str(t) if t is not None else "" for t in texts],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        tok = {k: v.to(device) for k, v in tok.items()}
        states = self.model(**tok).last_hidden_state
        if self.pool == "cls":
            pooled = states[:, 0]
        else:
            m = tok["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.text_projection(pooled)
