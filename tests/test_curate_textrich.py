"""`vssl curate textrich`: the OCR scorer on rendered text and real photos (labels known by
construction), the layout features against hand-worked cases, the VLM scorer's plumbing."""

from __future__ import annotations

import random

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFont

from vssl.cli import main
from vssl.curate.textrich import _aligned_fraction, _flat_fraction, heavy_score

WORDS = "annual report revenue growth table figure results market price total north".split()


def _document(rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (420, 520), (250, 250, 248))
    d = ImageDraw.Draw(img)
    d.text((30, 20), "Quarterly Results", fill=(0, 0, 0), font=ImageFont.load_default(size=26))
    f = ImageFont.load_default(size=16)
    for i in range(14):
        line = " ".join(rng.choice(WORDS) for _ in range(5))
        d.text((30, 70 + 30 * i), line, fill=(20, 20, 20), font=f)
    return img


def _sign(photo: Image.Image) -> Image.Image:
    img = photo.convert("RGB")
    img.thumbnail((480, 480))
    d = ImageDraw.Draw(img)
    d.rectangle([20, 20, 260, 70], fill=(250, 220, 40))
    d.text((32, 28), "MARKET 24", fill=(0, 0, 0), font=ImageFont.load_default(size=32))
    return img


@pytest.fixture
def images(tmp_path, shared_data):
    pytest.importorskip("rapidocr_onnxruntime")
    rng = random.Random(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    _document(rng).save(folder / "doc.png")
    photo = Image.open(shared_data / "imagenet-samples" / "n02391049_zebra.JPEG")
    small = photo.convert("RGB")
    small.thumbnail((480, 480))
    small.save(folder / "photo.jpg")
    _sign(Image.open(shared_data / "imagenet-samples" / "n01530575_brambling.JPEG")).save(
        folder / "sign.jpg"
    )
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def test_ocr_scorer_light_heavy_and_select(images, tmp_path, capsys):
    import pyarrow as pa

    names = ["doc.png", "missing.jpg", "photo.jpg", "sign.jpg", "broken.jpg"]
    manifest = tmp_path / "m.parquet"
    pq.write_table(
        pa.table({"path": [f"imgs/{n}" for n in names], "id": [0, 1, 2, 3, 4]}), manifest
    )
    out = tmp_path / "scores.parquet"
    argv = ["curate", "textrich", str(manifest), "--out", str(out), "--max-side", "480"]
    assert main([*argv, "--select", "heavy", "--quiet"]) == 0
    table = pq.read_table(out).to_pylist()
    assert [r["path"].rsplit("/", 1)[1] for r in table] == names  # input order, nothing dropped
    doc, missing, photo, sign, broken = table
    assert doc["light"] and doc["heavy"] and doc["readable_lines"] >= 10
    assert sign["light"] and not sign["heavy"] and 1 <= sign["text_score"] <= 3
    assert not photo["light"] and not photo["heavy"] and photo["text_score"] == 0
    assert doc["heavy_score"] > sign["heavy_score"] > photo["heavy_score"]
    for bad in (missing, broken):
        assert bad["error"] and bad["text_score"] is None and not bad["light"]
    # --select on a manifest: the manifest's own rows
    assert pq.read_table(tmp_path / "scores-heavy.parquet").to_pylist() == [
        {"path": "imgs/doc.png", "id": 0}
    ]
    printed = capsys.readouterr().out
    assert "scored 3 images" in printed and "2 unreadable" in printed and "heavy: 1 rows" in printed


def test_layout_features_by_hand():
    # three boxes on one row (a table row), one far away: 3 of 4 aligned
    rects = np.array([[0, 0, 40, 10], [100, 1, 140, 11], [200, 0, 240, 10], [300, 200, 340, 212]])
    assert _aligned_fraction(rects.astype(float), width=1000) == pytest.approx(0.75)
    # two lines with the same left edge (a paragraph), one isolated
    rects = np.array([[10, 0, 300, 10], [12, 20, 200, 30], [500, 400, 560, 410]], float)
    assert _aligned_fraction(rects, width=1000) == pytest.approx(2 / 3)
    assert _aligned_fraction(rects[:1], width=1000) == 0.0
    white = np.full((100, 100, 3), 255, np.uint8)
    assert _flat_fraction(white) == 1.0
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert _flat_fraction(noise) < 0.01
    assert heavy_score(0, 0, 0, 0) == 0.0
    assert heavy_score(8, 0.08, 1, 0.5) == pytest.approx(1.0)
    assert heavy_score(4, 0.04, 0.5, 0.25) == pytest.approx(0.5)


def test_bad_input(tmp_path, capsys):
    folder = tmp_path / "x"
    folder.mkdir()
    assert main(["curate", "textrich", str(folder), "--out", str(tmp_path / "s.csv")]) == 2
    assert ".parquet" in capsys.readouterr().err
    argv = ["curate", "textrich", str(folder), "--out", str(tmp_path / "s.parquet")]
    assert main([*argv, "--scorer", "vlm"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main([*argv, "--scorer", "vlm", "--model", str(tmp_path / "nomodel")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["curate", "textrich", str(tmp_path / "none"), "--out", argv[-1]]) == 2
    assert "not found" in capsys.readouterr().err


def _tiny_vlm(folder):
    """A random LLaVA (1-layer CLIP vision tower + 1-layer Llama) with a word-level tokenizer and
    a chat template, saved as a transformers folder: what `--model DIR` loads."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "yes", "no", "Yes", "No", "user"]
    words += "Assistant : Does this image contain any readable text ? Answer only or .".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="</s>", extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    template = (
        "{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
        "{% endfor %}{% if add_generation_prompt %}Assistant :{% endif %}"
    )
    size = {"shortest_edge": 32}
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size=size, crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        chat_template=template, image_token="<image>", num_additional_image_tokens=1,
    )  # fmt: skip
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2,
        ),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def test_vlm_scorer_plumbing(tmp_path, capsys):
    pytest.importorskip("transformers")
    import torch

    from vssl.curate.textrich import LIGHT_PROMPT, VlmScorer

    model = _tiny_vlm(tmp_path / "vlm")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "vlm.parquet"
    argv = ["curate", "textrich", str(folder), "--out", str(out), "--scorer", "vlm"]
    assert main([*argv, "--model", str(model), "--quiet"]) == 0
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 2 and all(
        0 < r["text_score"] < 1 and 0 < r["heavy_score"] < 1 for r in rows
    )
    assert [r["light"] for r in rows] == [r["text_score"] >= 0.5 for r in rows]
    assert rows[0]["text_score"] != rows[1]["text_score"]  # the image reaches the model

    # the same probability through generate(): the first new token's scores, yes vs no
    scorer = VlmScorer(str(model))
    img = Image.open(folder / "0.png").convert("RGB")
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": LIGHT_PROMPT}]}
    ]
    text = scorer.processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = scorer.processor(text=[text], images=[img], return_tensors="pt")
    with torch.no_grad():
        gen = scorer.model.generate(
            **inputs, max_new_tokens=1, do_sample=False, output_scores=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    p = gen.scores[0][0].float().softmax(-1)
    tok = scorer.processor.tokenizer
    yes = p[tok.convert_tokens_to_ids(["yes", "Yes"])].sum()
    no = p[tok.convert_tokens_to_ids(["no", "No"])].sum()
    assert rows[0]["text_score"] == pytest.approx(float(yes / (yes + no)), rel=1e-4)
