"""``vssl curate textrich``: score images for readable text and for charts / tables / documents.

Web-SSL (docs/architecture.md, *Web data*) trained on MC-2B filtered by a small VLM to images
with readable text ("light", 50.3%) or with charts, tables or documents ("heavy", 1.3%), and that
is what made language-free models good at OCR and chart VQA. Two scorers:

- ``ocr`` (default, offline on a CPU): PP-OCRv4 detection + recognition from rapidocr-onnxruntime
  (models inside its wheel). The image is resized first (long side ``--max-side``), because the
  package's own resize upscales every image to a 736 px short side (~1 s each). Detection alone
  fires on textures, so a detected line only counts as text when its recognized string has
  confidence >= 0.8 and >= 3 letters or digits. Only the largest ``--max-recognize`` boxes are
  recognized; the confirmed fraction of those estimates the rest (recognition costs per box).
  ``text_score`` = the estimated number of readable lines; ``heavy_score`` in [0, 1] combines the
  layout (readable lines, text area, boxes aligned into rows / columns) with the share of the
  image that is flat background, as charts, tables and documents have and photos do not.
- ``vlm``: Web-SSL's own way, a small VLM through transformers asked the Web-SSL prompts; the
  scores are the probabilities of "yes".

Thresholds: ``light = text_score >= --light-threshold``, ``heavy = heavy_score >=
--heavy-threshold``; the OCR defaults were chosen on labelled rendered charts, tables, documents,
photos and photos with a drawn sign (benchmarks/textrich_eval.py; precision / recall in
BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HELP = "score images for readable text (light) and charts/tables/documents (heavy), Web-SSL-style"

# defaults chosen on the labelled set of benchmarks/textrich_eval.py (see BENCHMARKS.md)
OCR_LIGHT_THRESHOLD = 1.0  # at least one readable line
OCR_HEAVY_THRESHOLD = 0.75
VLM_THRESHOLD = 0.5  # P(yes) for both prompts

LIGHT_PROMPT = "Does this image contain any readable text? Answer only yes or no."
HEAVY_PROMPT = (
    "Please think carefully before answering. Does this image contain charts, tables, or "
    "documents with readable text? Answer only yes or no."
)


# ----------------------------------------------------------------------------------- OCR scorer
@dataclass
class OcrConfig:
    max_side: int = 480  # long side the image is resized to before detection (see BENCHMARKS.md)
    max_recognize: int = 8  # boxes recognized per image (largest first)
    min_box_height: int = 8  # px at max_side: smaller boxes are not candidates
    min_confidence: float = 0.8  # recognition confidence of a readable line
    min_alnum: int = 3  # letters or digits in a readable line
    max_crop_ratio: float = 8.0  # recognize at most this width/height of a line (its start):
    # enough to read >= 3 characters, and recognition cost grows with the crop's width
    threads: int = 0  # onnxruntime intra-op threads (0: all cores)


def _alnum(text: str) -> int:
    return sum(ch.isalnum() for ch in text)


def _flat_fraction(rgb: np.ndarray) -> float:
    """Share of pixels in the most common colour (16 levels per channel) at 64 px: large for
    the blank background of documents, tables and charts, small for photos."""
    from PIL import Image

    small = np.asarray(Image.fromarray(rgb).resize((64, 64), Image.Resampling.BOX))
    q = (small // 16).astype(np.int32)
    codes = (q[..., 0] * 256 + q[..., 1] * 16 + q[..., 2]).ravel()
    return float(np.bincount(codes).max() / codes.size)


def _aligned_fraction(rects: np.ndarray, width: int) -> float:
    """Share of boxes that share a row (y-centre within half a line) or a left edge / centre
    column (within 2% of the width) with another box: lines of a document, cells of a table,
    tick labels of a chart."""
    n = len(rects)
    if n < 2:
        return 0.0
    x0, y0, x1, y1 = rects.T
    yc, xc, h = (y0 + y1) / 2, (x0 + x1) / 2, np.maximum(y1 - y0, 1)
    tol = 0.02 * width
    same_row = np.abs(yc[:, None] - yc[None]) < 0.5 * np.minimum(h[:, None], h[None])
    same_col = (np.abs(x0[:, None] - x0[None]) < tol) | (np.abs(xc[:, None] - xc[None]) < tol)
    hit = same_row | same_col
    np.fill_diagonal(hit, False)
    return float(hit.any(1).mean())


class OcrScorer:
    """PP-OCRv4 (rapidocr-onnxruntime) text lines -> text_score, heavy_score and layout stats."""

    columns = ("text_score", "heavy_score", "boxes", "readable_lines", "text_area", "flat")

    def __init__(self, cfg: OcrConfig | None = None):
        try:
            import rapidocr_onnxruntime
            from rapidocr_onnxruntime.ch_ppocr_det import TextDetector
            from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer
            from rapidocr_onnxruntime.utils import read_yaml
        except ImportError as exc:
            raise ValueError(
                f"the OCR scorer needs rapidocr-onnxruntime ({exc}): pip install 'vssl[textrich]'"
            ) from None
        self.cfg = cfg or OcrConfig()
        root = Path(rapidocr_onnxruntime.__file__).parent
        conf = read_yaml(str(root / "config.yaml"))
        threads = self.cfg.threads or -1
        for part in ("Det", "Rec"):
            conf[part]["model_path"] = str(root / conf[part]["model_path"])
            conf[part]["intra_op_num_threads"] = threads
            conf[part]["inter_op_num_threads"] = 1
        # "max": never upscale (the default "min" upscales to a 736 px short side); images are
        # already resized to max_side, so the detector sees them as they are (multiple of 32)
        conf["Det"]["limit_type"] = "max"
        self.det = TextDetector(conf["Det"])
        self.rec = TextRecognizer(conf["Rec"])

    def prepare(self, img) -> np.ndarray:
        """PIL image -> RGB uint8 array with the long side at most ``max_side``."""
        from PIL import Image

        s = self.cfg.max_side / max(img.size)
        if s < 1:
            size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
            img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(img.convert("RGB"))

    def __call__(self, rgb: np.ndarray) -> dict:
        cfg = self.cfg
        h, w = rgb.shape[:2]
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        boxes, _ = self.det(bgr)
        boxes = np.zeros((0, 4, 2), np.float32) if boxes is None or len(boxes) == 0 else boxes
        rects = np.stack([boxes.min(1), boxes.max(1)], 1).reshape(-1, 4) if len(boxes) else None
        out = dict.fromkeys(self.columns, 0.0)
        out["boxes"] = len(boxes)
        out["flat"] = _flat_fraction(rgb)
        if rects is None:
            return out
        bw, bh = rects[:, 2] - rects[:, 0], rects[:, 3] - rects[:, 1]
        cand = np.flatnonzero((bh >= cfg.min_box_height) & (bw >= 0.5 * bh))
        if len(cand) == 0:
            return out
        order = cand[np.argsort(-(bw * bh)[cand])][: cfg.max_recognize]
        crops = []
        for i in order:
            x0, y0, x1, y1 = rects[i]
            pad = 0.1 * (y1 - y0)
            x1 = min(x1, x0 + cfg.max_crop_ratio * (y1 - y0))
            crops.append(
                bgr[
                    int(max(0, y0 - pad)) : int(min(h, y1 + pad)) + 1,
                    int(max(0, x0 - pad)) : int(min(w, x1 + pad)) + 1,
                ]
            )
        results, _ = self.rec(crops)
        ok = np.array(
            [s >= cfg.min_confidence and _alnum(t) >= cfg.min_alnum for t, s, *_ in results]
        )
        if not ok.any():
            return out
        frac = ok.mean()  # the recognized share that was readable, applied to the others
        lines = float(ok.sum() + frac * (len(cand) - len(order)))
        area = min(1.0, float(frac * (bw * bh)[cand].sum()) / (w * h))
        aligned = _aligned_fraction(rects[cand], w)
        out.update(readable_lines=lines, text_score=lines, text_area=area)
        out["heavy_score"] = heavy_score(lines, area, aligned, out["flat"])
        return out


def heavy_score(lines: float, area: float, aligned: float, flat: float) -> float:
    """Chart / table / document likelihood in [0, 1]: many readable lines, much text area, lines
    aligned into rows or columns, and a flat background. Each term saturates; the weights and
    saturation points were set on the labelled set of benchmarks/textrich_eval.py."""
    return float(
        0.35 * min(1.0, lines / 8)
        + 0.2 * min(1.0, area / 0.08)
        + 0.15 * aligned
        + 0.3 * min(1.0, flat / 0.5)
    )


# ----------------------------------------------------------------------------------- VLM scorer
class VlmScorer:
    """A small VLM (e.g. SmolVLM2) through transformers, asked Web-SSL's two yes/no prompts; the
    scores are P("yes") among the first answer token's yes / no spellings."""

    columns = ("text_score", "heavy_score")

    def __init__(self, model_dir: str, device: str = "cpu", max_side: int = 512):
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(
                f"--model {model_dir} is not a folder: give a local transformers VLM directory "
                "(e.g. a SmolVLM2 snapshot)"
            )
        try:
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor
        except ImportError as exc:
            raise ValueError(
                f"--scorer vlm needs transformers ({exc}): pip install transformers"
            ) from None
        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir).to(device).eval()
        self.device, self.max_side = device, max_side
        tok = self.processor.tokenizer
        self.yes = _token_ids(tok, ("yes", "Yes", " yes", " Yes", "YES"))
        self.no = _token_ids(tok, ("no", "No", " no", " No", "NO"))
        if not self.yes or not self.no:
            raise ValueError(f"{model_dir}: the tokenizer has no single token for 'yes' / 'no'")

    def prepare(self, img) -> np.ndarray:
        s = self.max_side / max(img.size)
        if s < 1:
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))))
        return np.asarray(img.convert("RGB"))

    def p_yes(self, rgb: np.ndarray, prompt: str) -> float:
        from PIL import Image

        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=[[Image.fromarray(rgb)]], return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with self.torch.inference_mode():
            logits = self.model(**inputs).logits[0, -1].float()
        probs = logits.softmax(-1)
        yes, no = probs[self.yes].sum(), probs[self.no].sum()
        return float(yes / (yes + no))

    def __call__(self, rgb: np.ndarray) -> dict:
        return {
            "text_score": self.p_yes(rgb, LIGHT_PROMPT),
            "heavy_score": self.p_yes(rgb, HEAVY_PROMPT),
        }


def _token_ids(tok, words) -> list[int]:
    ids = set()
    for w in words:
        enc = tok.encode(w, add_special_tokens=False)
        # one token that decodes back to the word (not <unk>, which would count every unknown)
        if len(enc) == 1 and tok.decode(enc).strip() == w.strip():
            ids.add(enc[0])
    return sorted(ids)


# ----------------------------------------------------------------------------------- driver
def _samples(src: str):
    """(name column, iterator of (name, image bytes or None, error)) for any vssl input."""
    from vssl.data.decode import ImageDecodeError
    from vssl.data.download import is_download_folder
    from vssl.data.sources import ShardSource, open_source

    if is_download_folder(src):  # `vssl data download` output: its tars, not its parquet files
        src = sorted(str(p) for p in Path(src).glob("*.tar"))
    source = open_source(src, decode=False)
    col = "key" if isinstance(source, ShardSource) else "path"

    def gen():
        if col == "key":
            for s in source:
                yield s.key, s.source, s.image, None
            for key, reason in source.skipped:  # unreadable members, after the shard's others
                yield key, None, None, reason
            return
        for i, item in enumerate(source.items):  # files: in input order, failures in place
            try:
                s = source.load(i)
            except ImageDecodeError as exc:
                yield item.path or item.key, None, None, exc.reason
            else:
                yield s.source or s.key, s.source, s.image, None

    return col, gen(), (len(source) if hasattr(source, "__len__") else None), source


def score_images(
    src: str,
    scorer,
    *,
    light_threshold: float,
    heavy_threshold: float,
    progress: bool = False,
):
    """Score every image of ``src``; one output row per input, unreadable ones with ``error``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from vssl.data.decode import ImageDecodeError, open_image

    col, it, total, _ = _samples(src)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=total, unit="img", desc="textrich")
    rows = {col: [], "source": [], **{c: [] for c in scorer.columns}, "error": []}
    t0 = time.perf_counter()
    n_ok = 0
    for name, where, data, err in it:
        scores = dict.fromkeys(scorer.columns)
        if err is None:
            try:
                img = open_image(data, draft_size=scorer_draft(scorer))
                scores = scorer(scorer.prepare(img))
                n_ok += 1
            except ImageDecodeError as exc:
                err = exc.reason
        rows[col].append(str(name))
        rows["source"].append(where)
        rows["error"].append(err)
        for c in scorer.columns:
            rows[c].append(scores[c])
    table = pa.table(rows)
    ts = pc.fill_null(table.column("text_score"), -1.0)
    hs = pc.fill_null(table.column("heavy_score"), -1.0)
    table = table.append_column("light", pc.greater_equal(ts, light_threshold))
    table = table.append_column("heavy", pc.greater_equal(hs, heavy_threshold))
    if col == "path":
        table = table.drop_columns(["source"])
    return table, n_ok, time.perf_counter() - t0


def scorer_draft(scorer) -> int:
    return getattr(getattr(scorer, "cfg", None), "max_side", None) or getattr(
        scorer, "max_side", 512
    )


def select_manifest(src: str, scores, which: str):
    """The input rows whose ``which`` flag is set: the manifest's own rows (all columns) for a
    parquet input (scores are in manifest order, one per row), else the scores' rows (``path``
    feeds `vssl data pack`)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    mask = scores.column(which)
    if str(src).endswith(".parquet"):
        manifest = pq.read_table(src)
        if manifest.num_rows == scores.num_rows:
            return manifest.filter(pc.fill_null(mask, False))
    return scores.filter(pc.fill_null(mask, False))


EXAMPLES = """\
examples:
  vssl curate textrich ./images --out scores.parquet
  vssl curate textrich 'shards/coyo-{000000..000099}.tar' --out scores.parquet --select heavy \\
      --select-out heavy.parquet
  vssl curate textrich ./images --out vlm.parquet --scorer vlm --model ./SmolVLM2-256M-Video-Instruct

Columns: path (folders, lists, manifests) or key (shards), text_score, heavy_score, light, heavy,
error (unreadable images: scores empty, never dropped), and for the OCR scorer the layout stats
boxes, readable_lines, text_area, flat. --select writes the subset manifest: the manifest's own
rows for a parquet input, else the rows of the scores (path feeds `vssl data pack`).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "textrich",
        help=HELP,
        description="Score images for readable text (Web-SSL 'light') and for charts, tables "
        "and documents ('heavy'), offline on a CPU with OCR or with a small VLM.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input", metavar="INPUT", help="image folder, path list, parquet manifest, shards"
    )
    p.add_argument("--out", required=True, help="scores parquet, one row per image")
    p.add_argument("--scorer", choices=("ocr", "vlm"), default="ocr", help="(default: ocr)")
    p.add_argument("--model", metavar="DIR", help="transformers VLM folder for --scorer vlm")
    p.add_argument(
        "--light-threshold",
        type=float,
        help=f"light = text_score >= this (default: ocr {OCR_LIGHT_THRESHOLD:g} readable line, "
        f"vlm {VLM_THRESHOLD:g})",
    )
    p.add_argument(
        "--heavy-threshold",
        type=float,
        help=f"heavy = heavy_score >= this (default: ocr {OCR_HEAVY_THRESHOLD:g}, vlm "
        f"{VLM_THRESHOLD:g})",
    )
    p.add_argument("--select", choices=("light", "heavy"), help="also write the subset manifest")
    p.add_argument("--select-out", help="subset manifest path (default: OUT with -light/-heavy)")
    o = p.add_argument_group("OCR scorer")
    d = OcrConfig()
    o.add_argument(
        "--max-side", type=int, default=d.max_side, help="resize first (default: %(default)s)"
    )
    o.add_argument(
        "--max-recognize",
        type=int,
        default=d.max_recognize,
        help="text boxes recognized per image, largest first (default: %(default)s)",
    )
    o.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
    p.add_argument("--device", default="cpu", help="--scorer vlm device (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_textrich)
    return p


def _cmd_textrich(args) -> int:
    import pyarrow.parquet as pq

    from vssl._io import atomic_write

    out = Path(args.out)
    if out.suffix != ".parquet":
        raise ValueError(f"--out must be a .parquet file, got {out}")
    if not os.path.exists(args.input) and "{" not in args.input:
        raise FileNotFoundError(f"input not found: {args.input}")
    if args.scorer == "vlm":
        if not args.model:
            raise ValueError("--scorer vlm needs --model DIR (a local transformers VLM folder)")
        scorer = VlmScorer(args.model, device=args.device)
        light_t, heavy_t = VLM_THRESHOLD, VLM_THRESHOLD
    else:
        if args.max_side < 32 or args.max_recognize < 1:
            raise ValueError("--max-side must be >= 32 and --max-recognize >= 1")
        cfg = OcrConfig(
            max_side=args.max_side, max_recognize=args.max_recognize, threads=args.threads
        )
        scorer = OcrScorer(cfg)
        light_t, heavy_t = OCR_LIGHT_THRESHOLD, OCR_HEAVY_THRESHOLD
    light_t = light_t if args.light_threshold is None else args.light_threshold
    heavy_t = heavy_t if args.heavy_threshold is None else args.heavy_threshold
    table, n_ok, secs = score_images(
        args.input,
        scorer,
        light_threshold=light_t,
        heavy_threshold=heavy_t,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    atomic_write(out, lambda tmp: pq.write_table(table, tmp))
    n = table.num_rows
    light = sum(bool(v) for v in table.column("light").to_pylist())
    heavy = sum(bool(v) for v in table.column("heavy").to_pylist())
    bad = n - n_ok
    print(
        f"scored {n_ok} images in {secs:.1f}s ({n_ok / max(secs, 1e-9):.2f} img/s): light "
        f"{light} ({100 * light / max(n, 1):.1f}%), heavy {heavy} ({100 * heavy / max(n, 1):.1f}%)"
        + (f"; {bad} unreadable (see the error column)" if bad else "")
        + f" -> {out}"
    )
    if args.select:
        sel_out = Path(args.select_out or out.with_name(f"{out.stem}-{args.select}.parquet"))
        subset = select_manifest(args.input, table, args.select)
        atomic_write(sel_out, lambda tmp: pq.write_table(subset, tmp))
        print(f"{args.select}: {subset.num_rows} rows -> {sel_out}")
    return 0 if n_ok else 1
