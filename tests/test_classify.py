"""`vssl classify` against transformers (a tiny random ViTForImageClassification and the tiny
CLIP / ALIGN / SigLIP directories of test_eval_zeroshot), and `vssl embed` on two-tower models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_zeroshot import tiny_dirs  # noqa: F401 - the module-scoped fixture

from vssl.cli import main


def _image_files(root, n=3):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 36, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def vit_classifier(tmp_path_factory):
    from conftest import perturb_
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    d = tmp_path_factory.mktemp("vitcls") / "vit"
    torch.manual_seed(0)
    labels = ["tabby", "tiger", "car", "plane", "ship", "frog"]
    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    model = perturb_(ViTForImageClassification(cfg), scale=0.5).eval()
    model.save_pretrained(d)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def test_classifier_logits_are_transformers(vit_classifier, tmp_path, capsys):
    from transformers import AutoImageProcessor, ViTForImageClassification

    paths = _image_files(tmp_path / "imgs")
    out = tmp_path / "out.json"
    assert (
        main(
            ["classify", str(vit_classifier), *map(str, paths), "--top-k", "3", "--json", str(out)]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["kind"] == "classifier" and len(res["results"]) == 3
    model = ViTForImageClassification.from_pretrained(vit_classifier).eval()
    proc = AutoImageProcessor.from_pretrained(vit_classifier, backend="pil")
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.inference_mode():
        probs = model(**proc(images=images, return_tensors="pt")).logits.softmax(-1)
    for r, p in zip(res["results"], probs):
        top = p.topk(3)
        assert [t["label"] for t in r["top"]] == [
            model.config.id2label[int(i)] for i in top.indices
        ]
        np.testing.assert_allclose([t["score"] for t in r["top"]], top.values.numpy(), rtol=1e-5)
    printed = capsys.readouterr().out
    assert str(paths[0]) in printed and r["top"][0]["label"] in printed


@pytest.mark.parametrize("kind", ["clip", "align", "siglip"])
def test_zero_shot_matches_the_models_own_logits(tiny_dirs, kind, tmp_path):  # noqa: F811
    from transformers import AlignModel, AutoProcessor, CLIPModel, SiglipModel

    d = tiny_dirs[kind]
    paths = _image_files(tmp_path / "imgs", n=2)
    labels = ["cat", "dog", "the cat"]
    out = tmp_path / "zs.json"
    argv = ["classify", str(d), *map(str, paths), "--labels", ",".join(labels), "--json", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["kind"] == "zero-shot"

    cls = {"clip": CLIPModel, "align": AlignModel, "siglip": SiglipModel}[kind]
    model = cls.from_pretrained(d).eval()
    proc = AutoProcessor.from_pretrained(d, backend="pil")
    prompts = [f"a photo of a {x}." for x in labels]
    padding = "max_length" if kind == "siglip" else True
    limit = {"clip": 24, "align": 64, "siglip": 16}[kind]
    inputs = proc(
        images=[Image.open(p).convert("RGB") for p in paths],
        text=prompts,
        padding=padding,
        truncation=True,
        max_length=limit,
        return_tensors="pt",
    )
    if kind == "siglip":
        inputs.pop("attention_mask")
    with torch.inference_mode():
        logits = model(**inputs).logits_per_image
    probs = logits.sigmoid() if kind == "siglip" else logits.softmax(-1)
    for r, p in zip(res["results"], probs):
        got = {t["label"]: t["score"] for t in r["top"]}
        np.testing.assert_allclose([got[x] for x in labels], p.numpy(), rtol=1e-4, atol=1e-6)


def test_classify_refusals(tiny_dirs, tmp_path, capsys):  # noqa: F811
    from transformers import BertConfig, BertModel

    img = _image_files(tmp_path / "imgs", n=1)[0]
    assert main(["classify", str(tiny_dirs["clip"]), str(img)]) == 2
    assert "--labels" in capsys.readouterr().err
    bert = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(bert)
    assert main(["classify", str(bert), str(img)]) == 2
    err = capsys.readouterr().err
    assert "is a bert model (BertModel)" in err and "ForImageClassification" in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method:\n  name: dinov2\n")
    assert main(["classify", str(run), str(img)]) == 2
    assert "language-free" in capsys.readouterr().err


def test_embed_two_tower_images_and_texts(tiny_dirs, tmp_path):  # noqa: F811
    from vssl.evaluate.two_tower import load_two_tower

    paths = _image_files(tmp_path / "imgs", n=3)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not an image")
    texts = tmp_path / "texts.txt"
    texts.write_text("a photo of a cat\n\na dog\n")
    out = tmp_path / "emb"
    argv = ["embed", str(tiny_dirs["align"]), "-i", str(tmp_path / "imgs"), "-o", str(out)]
    assert main([*argv, "--text", str(texts), "--no-progress"]) == 0
    emb, temb = np.load(out / "embeddings.npy"), np.load(out / "text_embeddings.npy")
    assert emb.shape[0] == 3 and temb.shape[0] == 2
    model = load_two_tower(tiny_dirs["align"])
    ref = torch.nn.functional.normalize(
        model.encode_image([Image.open(p).convert("RGB") for p in paths]), dim=-1
    )
    np.testing.assert_allclose(emb, ref.numpy(), atol=1e-5)
    ref_t = torch.nn.functional.normalize(model.encode_text(["a photo of a cat", "a dog"]), dim=-1)
    np.testing.assert_allclose(temb, ref_t.numpy(), atol=1e-5)
    errors = (out / "errors.jsonl").read_text().splitlines()
    assert len(errors) == 1 and "broken.jpg" in errors[0]
