"""Two-tower models, `vssl eval zeroshot` and `vssl eval retrieval`.

The metrics are checked on constructed embeddings whose answers are known (and against
scikit-learn / a sort-based brute force); the transformers adapters against the models' own
forward pass on tiny random CLIP / ALIGN / SigLIP directories built here, offline.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vssl.evaluate import retrieval, zeroshot
from vssl.evaluate.retrieval import read_pairs, retrieval_recall
from vssl.evaluate.two_tower import HFTwoTower, TwoTowerModel, encode_image_files, load_two_tower
from vssl.evaluate.zeroshot import (
    read_classnames,
    read_templates,
    topk_accuracy,
    zeroshot_classifier,
    zeroshot_logits,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class TableModel:
    """A two-tower model that maps each text to a chosen vector and each image to its mean RGB."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.text_calls: list[list[str]] = []

    def encode_text(self, texts):
        self.text_calls.append(list(texts))
        return torch.tensor([self.table[t] for t in texts], dtype=torch.float32)

    def encode_image(self, images):
        means = [np.asarray(im, np.float32).mean(axis=(0, 1)) for im in images]
        return torch.from_numpy(np.stack(means))


# ------------------------------------------------------------------------------------ zero-shot
def test_template_average_matches_hand_computation():
    # Per-prompt normalization matters: [3, 0] and [0, 1] average to the diagonal only when each is
    # normalized first ([1.5, 0.5] direction otherwise).
    m = TableModel(
        {"a cat": [3.0, 0.0], "the cat!": [0.0, 1.0], "a dog": [0.0, 2.0], "the dog!": [0.0, 5.0]}
    )
    w = zeroshot_classifier(m, ["cat", "dog"], ["a {}", "the {}!"])
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(w.numpy(), [[s, s], [0.0, 1.0]], atol=1e-7)
    assert sorted(t for call in m.text_calls for t in call) == sorted(m.table)


def test_classifier_batches_prompts_and_checks_templates():
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(5)]
    templates = ["a {}.", "b {}.", "c {}."]
    table = {
        t.replace("{}", c): list(rng.standard_normal(4) * rng.uniform(0.1, 9))
        for c in names
        for t in templates
    }
    m = TableModel(table)
    w = zeroshot_classifier(m, names, templates, batch_size=4)
    assert max(len(c) for c in m.text_calls) == 4
    ref = np.stack(
        [
            _unit(np.mean([_unit(table[t.replace("{}", c)]) for t in templates], axis=0))
            for c in names
        ]
    )
    np.testing.assert_allclose(w.numpy(), ref, atol=1e-6)
    with pytest.raises(ValueError, match="exactly once"):
        zeroshot_classifier(m, names, ["no placeholder"])


def test_topk_known_answers_including_a_top5_only_hit():
    # 8 classes whose text rows are the axes: an image's logits are its own (normalized) entries.
    names = [f"k{i}" for i in range(8)]
    m = TableModel(
        {f"a photo of a {c}.": list(np.eye(8)[i] * (i + 1)) for i, c in enumerate(names)}
    )
    w = zeroshot_classifier(m, names, ["a photo of a {}."])
    scores = np.array(
        [
            [9, 1, 2, 3, 4, 5, 6, 7],  # true 0: rank 0 -> top-1 and top-5
            [8, 7, 9, 1, 2, 3, 4, 6],  # true 1: 2 and 0 above -> rank 2: top-5 only
            [9, 8, 7, 6, 5, 4, 3, 2],  # true 7: rank 7 -> miss
            [1, 2, 3, 4, 5, 6, 7, 9],  # true 3: 4 above (7, 6, 5, 4) -> rank 4: top-5 only
        ],
        dtype=np.float32,
    )
    labels = np.array([0, 1, 7, 3])
    acc = topk_accuracy(zeroshot_logits(torch.from_numpy(scores * 3.0), w), labels, (1, 5))
    assert acc == {1: 0.25, 5: 0.75}
    from sklearn.metrics import top_k_accuracy_score

    assert acc[1] == top_k_accuracy_score(labels, scores, k=1, labels=range(8))
    assert acc[5] == top_k_accuracy_score(labels, scores, k=5, labels=range(8))


def test_topk_matches_sklearn_on_random_logits_and_ties_count_against():
    from sklearn.metrics import top_k_accuracy_score

    rng = np.random.default_rng(1)
    logits = rng.standard_normal((200, 12)).astype(np.float32)
    labels = rng.integers(0, 12, 200)
    acc = topk_accuracy(torch.from_numpy(logits), labels, (1, 3, 5))
    for k in (1, 3, 5):
        assert acc[k] == pytest.approx(top_k_accuracy_score(labels, logits, k=k, labels=range(12)))
    # A collapsed model (every class scores the same) must not look perfect.
    assert topk_accuracy(torch.ones(10, 8), np.arange(10) % 8, (1, 5)) == {1: 0.0, 5: 0.0}


def test_read_templates_and_classnames(tmp_path):
    assert read_templates("simple") == ["a photo of a {}."]
    assert len(read_templates(None)) == 7
    f = tmp_path / "t.txt"
    f.write_text("# mine\nart of a {}.\n\n{} in the wild\n")
    assert read_templates(str(f)) == ["art of a {}.", "{} in the wild"]
    with pytest.raises(ValueError, match="neither a template set"):
        read_templates("nope")
    assert read_classnames(None, ["golden_retriever", "cat"]) == ["golden retriever", "cat"]
    names = tmp_path / "n.tsv"
    names.write_text("n02\tdog\nn01\tfish\n")
    assert read_classnames(str(names), ["n01", "n02"]) == ["fish", "dog"]
    plain = tmp_path / "p.txt"
    plain.write_text("fish\ndog\n")
    assert read_classnames(str(plain), ["n01", "n02"]) == ["fish", "dog"]
    with pytest.raises(ValueError, match="2 class names but the test set has 3"):
        read_classnames(str(plain), ["a", "b", "c"])


def test_encode_image_files_skips_bad_files(tmp_path):
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 128, 0)]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (9, 7), colour).save(p)
        paths.append(p)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    paths.insert(1, bad)
    m = TableModel({})
    assert isinstance(m, TwoTowerModel)
    emb, kept, errors = encode_image_files(m, paths, batch_size=2)
    assert kept == [0, 2, 3]
    assert [e["path"] for e in errors] == [str(bad)]
    np.testing.assert_allclose(emb.numpy(), [[255, 0, 0], [0, 0, 255], [0, 128, 0]])


# ------------------------------------------------------------------------------------ retrieval
def _brute_force_recall(img, txt, owner, k):
    """Sort-based reference: the top-k lists themselves (scores are distinct here)."""
    sim = _unit(img) @ _unit(txt).T
    i2t = np.mean([any(owner[j] == i for j in np.argsort(-sim[i])[:k]) for i in range(len(img))])
    t2i = np.mean([owner[j] in np.argsort(-sim[:, j])[:k] for j in range(len(txt))])
    return i2t, t2i


def test_recall_known_answers_with_several_captions():
    # Cosine similarities chosen exactly: images are axes of R^4, each caption is a unit vector
    # whose first three entries are its similarities to images 0, 1, 2.
    sims = np.array(
        [[0.1, 0.5, 0.2, 0.0, 0.6], [0.3, 0.1, 0.4, 0.2, 0.1], [0.6, 0.3, 0.5, 0.4, 0.2]]
    )
    owner = np.array([0, 0, 1, 2, 2])  # image 0 has captions 0 and 1, image 2 has 3 and 4
    txt = np.concatenate([sims.T, np.sqrt(1 - (sims.T**2).sum(1, keepdims=True))], axis=1)
    img = np.eye(4)[:3]
    r = retrieval_recall(img, txt, owner, ks=(1, 2, 3))
    # image->text: image 0's best own caption (1, 0.5) is behind caption 4 (0.6): found at k=2;
    # image 1's caption 2 is first; image 2's best (3, 0.4) is behind captions 0 and 2: k=3.
    assert r["i2t"] == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    # text->image: captions 1 and 3 rank their image first, 2 and 4 second, 0 third.
    assert r["t2i"] == pytest.approx({1: 2 / 5, 2: 4 / 5, 3: 1.0})
    for k in (1, 2, 3):
        assert (r["i2t"][k], r["t2i"][k]) == pytest.approx(_brute_force_recall(img, txt, owner, k))


def test_recall_matches_brute_force_on_random_data_and_ties_count_against():
    rng = np.random.default_rng(2)
    n = 40
    owner = np.repeat(np.arange(n), rng.integers(1, 5, n))
    img = rng.standard_normal((n, 6))
    txt = img[owner] + 1.5 * rng.standard_normal((len(owner), 6))
    r = retrieval_recall(
        torch.from_numpy(img), torch.from_numpy(txt), owner, ks=(1, 5, 10), chunk=7
    )
    for k in (1, 5, 10):
        assert (r["i2t"][k], r["t2i"][k]) == pytest.approx(_brute_force_recall(img, txt, owner, k))
    assert 0 < r["t2i"][1] < r["t2i"][10] < 1
    collapsed = retrieval_recall(np.ones((20, 4)), np.ones((20, 4)), np.arange(20))
    assert collapsed == {"i2t": {1: 0.0, 5: 0.0, 10: 0.0}, "t2i": {1: 0.0, 5: 0.0, 10: 0.0}}
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_recall(np.eye(3), np.eye(3)[:2], np.array([0, 1]))


def test_read_pairs_formats(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("first caption\n\nsecond caption\n")
    (tmp_path / "b.txt").write_text("only caption\n")
    p = read_pairs(tmp_path)
    assert [Path(x).name for x in p.images] == ["a.jpg", "b.jpg"]
    assert p.captions == ["first caption", "second caption", "only caption"]
    assert p.caption_image.tolist() == [0, 0, 1]

    rows = [
        {"url": "a.jpg", "text": '"one" said'},
        {"url": "https://x.org/c.jpg", "text": "remote"},
        {"url": "b.jpg", "text": ""},
        {"url": "a.jpg", "text": "two"},
        {"url": str(tmp_path / "b.jpg"), "text": "three"},
    ]
    jl = tmp_path / "pairs.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    (tmp_path / "pairs.tsv").write_text(
        "url\ttext\n" + "".join(f"{r['url']}\t{r['text']}\n" for r in rows)
    )
    import csv

    with open(tmp_path / "pairs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["url", "text"])
        w.writeheader()
        w.writerows(rows)
    for f in ("pairs.jsonl", "pairs.parquet", "pairs.tsv", "pairs.csv"):
        p = read_pairs(tmp_path / f)
        assert p.images == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")], f
        assert p.captions == ['"one" said', "two", "three"], f
        assert p.caption_image.tolist() == [0, 0, 1], f
        assert len(p.skipped) == 2 and "remote URL" in p.skipped[0]["error"], f
    (tmp_path / "bad.jsonl").write_text('{"path": "a.jpg"}\n')
    with pytest.raises(ValueError, match="caption column"):
        read_pairs(tmp_path / "bad.jsonl")


# ------------------------------------------------------------------------------------ adapters
def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet (256 printable stand-ins for the byte values)."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in keep]
    table = dict(zip(keep, keep)) | {b: 256 + i for i, b in enumerate(extra)}
    return [chr(table[b]) for b in range(256)]


def _bert_tokenizer():
    from transformers import BertTokenizer

    words = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "cat", "dog"]
        + list("bcdefghijklmnopqrstuvwxyz")
        + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    )
    return BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(words))})


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Tiny random CLIP / ALIGN / SigLIP directories with tokenizer and PIL image processor."""
    from conftest import perturb_
    from transformers import (
        AlignConfig,
        AlignModel,
        CLIPConfig,
        CLIPModel,
        CLIPTokenizer,
        SiglipConfig,
        SiglipModel,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.efficientnet.image_processing_pil_efficientnet import (
        EfficientNetImageProcessorPil,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    root = tmp_path_factory.mktemp("two_tower")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    out = {}

    bu = _bytes_to_unicode()
    vocab = bu + [c + "</w>" for c in bu] + ["<|startoftext|>", "<|endoftext|>"]
    ctok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[])
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(
                small,
                vocab_size=len(vocab),
                max_position_embeddings=24,
                bos_token_id=ctok.bos_token_id,
                eos_token_id=ctok.eos_token_id,
                pad_token_id=ctok.pad_token_id,
            ),
            vision_config=dict(small, image_size=32, patch_size=8),
            projection_dim=16,
        )
    )
    out["clip"] = (
        clip,
        ctok,
        CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    )

    btok = _bert_tokenizer()
    align = AlignModel(
        AlignConfig(
            text_config=dict(small, vocab_size=len(btok), max_position_embeddings=80),
            vision_config=dict(
                image_size=32,
                kernel_sizes=[3, 3, 5],
                in_channels=[32, 16, 24],
                out_channels=[16, 24, 40],
                hidden_dim=40,
                strides=[1, 1, 2],
                num_block_repeats=[1, 1, 2],
                expand_ratios=[1, 6, 6],
                depthwise_padding=[],
                width_coefficient=1.0,
                depth_coefficient=1.0,
            ),
            projection_dim=40,
        )
    )
    # transformers' small conv init shrinks the signal ~1000x per block, so every image would get
    # the same embedding; He init keeps images apart.
    for mod in align.vision_model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight)
    out["align"] = (
        align,
        btok,
        EfficientNetImageProcessorPil(
            size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}
        ),
    )

    siglip = SiglipModel(
        SiglipConfig(
            text_config=dict(
                small,
                vocab_size=len(btok),
                max_position_embeddings=16,
                bos_token_id=btok.cls_token_id,
                eos_token_id=btok.sep_token_id,
                pad_token_id=btok.pad_token_id,
            ),
            vision_config=dict(small, image_size=32, patch_size=8),
        )
    )
    out["siglip"] = (siglip, btok, SiglipImageProcessorPil(size={"height": 32, "width": 32}))

    dirs = {}
    for name, (model, tok, proc) in out.items():
        perturb_(model, scale=0.05)
        d = root / name
        model.eval().save_pretrained(d)
        tok.save_pretrained(d)
        proc.save_pretrained(d)
        dirs[name] = d
    return dirs


def _images():
    rng = np.random.default_rng(3)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((40, 50), (32, 32), (64, 37))
    ]


TEXTS = ["a photo of the cat", "dog", "the cat " * 30]  # the last is longer than every text limit


def _reference(kind: str, d: Path, images, texts):
    """Normalized embeddings from the model's own forward pass on its processor's inputs."""
    from transformers import AlignModel, AutoProcessor, CLIPModel, SiglipModel

    model = {"clip": CLIPModel, "align": AlignModel, "siglip": SiglipModel}[kind]
    model = model.from_pretrained(d).eval()
    proc = AutoProcessor.from_pretrained(d, backend="pil")
    limit = {"clip": 24, "align": 64, "siglip": 16}[kind]
    padding = "max_length" if kind == "siglip" else True
    inputs = proc(
        images=images,
        text=texts,
        padding=padding,
        truncation=True,
        max_length=limit,
        return_tensors="pt",
    )
    if kind == "siglip":  # trained without a text attention mask (pads are attended)
        inputs.pop("attention_mask")
    with torch.inference_mode():
        out = model(**inputs)
    return out.image_embeds.numpy(), out.text_embeds.numpy()


@pytest.mark.parametrize("kind", ["clip", "align", "siglip"])
def test_adapter_matches_model_forward(tiny_dirs, kind):
    m = load_two_tower(tiny_dirs[kind], batch_size=2)
    assert isinstance(m, HFTwoTower) and isinstance(m, TwoTowerModel) and m.model_type == kind
    images = _images()
    img = m.encode_image(images)
    txt = m.encode_text(TEXTS)
    ref_img, ref_txt = _reference(kind, tiny_dirs[kind], images, TEXTS)
    assert img.shape == ref_img.shape and txt.shape == ref_txt.shape
    np.testing.assert_allclose(_unit(img.numpy()), ref_img, atol=2e-5)
    np.testing.assert_allclose(_unit(txt.numpy()), ref_txt, atol=2e-5)
    # the rows differ (a constant output would pass a loose check by accident)
    assert np.abs(ref_img[0] - ref_img[1]).max() > 1e-3
    assert np.abs(ref_txt[0] - ref_txt[1]).max() > 1e-3


def test_load_two_tower_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_two_tower(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="clip, align, siglip"):
        load_two_tower(tmp_path)


# ------------------------------------------------------------------------------------ CLI
def _cli(module, argv):
    """Run one protocol's subcommand through its own parser (as `vssl eval` wires it)."""
    parser = argparse.ArgumentParser(prog="vssl eval")
    module.add_parser(parser.add_subparsers(dest="protocol"))
    args = parser.parse_args(argv)
    return args.func(args)


def _small_test_folder(shared_data: Path, root: Path, per_class: int = 2) -> Path:
    test = root / "test"
    for cls in sorted(os.listdir(shared_data / "cifar10-subset" / "test")):
        (test / cls).mkdir(parents=True)
        for f in sorted(os.listdir(shared_data / "cifar10-subset" / "test" / cls))[:per_class]:
            os.symlink(shared_data / "cifar10-subset" / "test" / cls / f, test / cls / f)
    (test / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return test


def test_zeroshot_cli(tiny_dirs, shared_data, tmp_path, capsys):
    test = _small_test_folder(shared_data, tmp_path)
    results = tmp_path / "results.jsonl"
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na blurry photo of the {}.\n")
    rc = _cli(
        zeroshot,
        [
            "zeroshot",
            "--model",
            str(tiny_dirs["clip"]),
            "--test",
            str(test),
            "--templates",
            str(templates),
            "--batch-size",
            "8",
            "--results",
            str(results),
        ],
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "zeroshot_top1" in out.out and "broken.jpg" in out.err
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["metric"] for r in rows] == ["zeroshot_top1", "zeroshot_top5"]
    assert all(0 <= r["value"] <= 1 for r in rows)
    assert rows[0]["num_images"] == 20 and rows[0]["num_skipped"] == 1
    assert rows[0]["num_classes"] == 10 and rows[0]["num_templates"] == 2
    assert rows[0]["protocol"] == "zeroshot" and rows[0]["dataset"] == "test"

    rc = _cli(
        zeroshot, ["zeroshot", "--model", str(tmp_path), "--test", str(test), "--results", "-"]
    )
    assert rc == 2 and "vssl eval zeroshot: error:" in capsys.readouterr().err


def test_retrieval_cli(tiny_dirs, shared_data, tmp_path, capsys):
    photos = sorted((shared_data / "imagenet-samples").glob("*.JPEG"))[:6]
    rows = [
        {"path": str(p), "text": "a photo of the " + p.stem.split("_", 1)[1].replace("_", " ")}
        for p in photos
    ]
    rows += [{"path": str(p), "text": "a photo"} for p in photos[:3]]  # second captions
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = tmp_path / "results.jsonl"
    rc = _cli(
        retrieval,
        [
            "retrieval",
            "--model",
            str(tiny_dirs["siglip"]),
            "--data",
            str(pairs),
            "--batch-size",
            "4",
            "--results",
            str(results),
        ],
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "image->text" in out.out and "text->image" in out.out
    got = {r["metric"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(got) == {f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert got["i2t_recall@1"]["num_images"] == 6 and got["i2t_recall@1"]["num_captions"] == 9
    # with 6 images, text->image recall@10 must find every image
    assert got["t2i_recall@10"]["value"] == 1.0
    assert all(0 <= r["value"] <= 1 for r in got.values())

    (tmp_path / "pairs.xml").write_text("<x/>")
    rc = _cli(
        retrieval,
        [
            "retrieval",
            "--model",
            str(tiny_dirs["clip"]),
            "--data",
            str(tmp_path / "pairs.xml"),
            "--results",
            "-",
        ],
    )
    err = capsys.readouterr().err
    assert rc == 2 and "unknown pairs format" in err
