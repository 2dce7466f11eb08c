"""The clip method end to end: tokenizer, text tower, optimizer groups, LiT, a `vssl pretrain` run
with class-name captions that `vssl eval zeroshot` reads, and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vssl.data.views import MissingViewError
from vssl.methods.clip import CLIP, CLIPConfig, load_run
from vssl.models.text import TextTransformer, train_bpe_tokenizer
from vssl.models.zoo import create_model
from vssl.train.optim import param_groups

CAPTIONS = ["a photo of a red cat", "a dog on the grass", "a red car", "two cats and a dog"] * 5


def test_tokenizer_wraps_truncates_and_pads(tmp_path):
    tok = train_bpe_tokenizer(CAPTIONS, vocab_size=300, context_length=8, min_frequency=1)
    sot, eot = tok.tok.token_to_id("<sot>"), tok.tok.token_to_id("<eot>")
    long = "a red cat " * 50
    ids, lengths = tok(["", long, "A Red Cat"])
    assert ids.shape == (3, 8)
    # empty: <sot> <eot> then padding
    assert ids[0, :2].tolist() == [sot, eot] and lengths[0] == 2 and (ids[0, 2:] == 0).all()
    # over-long: truncated to the context, <eot> kept last (the tokenizer's own config)
    assert lengths[1] == 8 and ids[1, 0] == sot and ids[1, -1] == eot
    # lower-cased like CLIP's tokenizer
    assert ids[2].tolist() == tok(["a red cat"])[0][0].tolist()
    path = tok.save(tmp_path / "tokenizer.json")
    again = type(tok).from_file(path)
    assert torch.equal(again([long])[0], ids[1:2])


def test_text_tower_ignores_padding_and_pools():
    torch.manual_seed(0)
    ids = torch.tensor([[1, 5, 6, 7, 2, 0, 0, 0]])
    other_pad = ids.clone()
    other_pad[0, 5:] = 9  # whatever sits after <eot> is padding
    lengths = torch.tensor([5])
    for causal, pool in ((True, "eot"), (False, "cls"), (True, "cls")):
        tower = TextTransformer(
            32, 8, width=16, depth=2, heads=2, embed_dim=4, causal=causal, pool=pool
        )
        a, b = tower(ids, lengths), tower(other_pad, lengths)
        torch.testing.assert_close(a, b)
        assert a.shape == (1, 4)
    causal = TextTransformer(32, 8, width=16, depth=2, heads=2, embed_dim=4, causal=True)
    # causal + eot pooling: tokens after <eot> cannot matter; tokens before it do
    changed = ids.clone()
    changed[0, 1] = 11
    assert not torch.allclose(causal(ids, lengths), causal(changed, lengths))


def _tiny_backbone():
    return create_model("vit-tiny-p8-32", random_init=True, depth=2, seed=0)


def _small_cfg(**kw):
    base = dict(
        embed_dim=16,
        vocab_size=300,
        context_length=16,
        text_width=32,
        text_depth=1,
        text_heads=2,
    )
    return CLIPConfig(**{**base, **kw})


def test_no_weight_decay_on_logit_scale_biases_and_norms():
    method = CLIP(_tiny_backbone(), _small_cfg(loss="siglip"))
    groups = param_groups(method.student, num_layers=2)
    wd = {n: g["wd_multiplier"] for g in groups for n in g["names"]}
    assert wd["logit.logit_scale"] == 0.0 and wd["logit.logit_bias"] == 0.0
    assert wd["text.norm.weight"] == 0.0 and wd["text.blocks.0.qkv.bias"] == 0.0
    assert wd["text.text_projection.weight"] == 1.0 and wd["image_proj.weight"] == 1.0
    assert wd["backbone.blocks.0.attn.qkv.weight"] == 1.0


def test_logit_scale_is_clamped_after_each_step():
    method = CLIP(_tiny_backbone(), _small_cfg())
    with torch.no_grad():
        method.student["logit"].logit_scale.fill_(7.0)
    method.after_step(0)
    assert method.student["logit"].logit_scale.item() == pytest.approx(math.log(100))


def _folder(root, classes=("cat", "dog"), per_class=8, seed=0):
    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            arr[..., ci] += 150  # classes differ in colour: learnable in a few steps
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def _recipe(data, out, **method):
    from vssl.train.config import load_recipe

    overrides = [
        f"data.train={data}",
        "data.captions=templates",
        "data.num_workers=0",
        "model.depth=2",
        "method.embed_dim=16",
        "method.vocab_size=512",
        "method.context_length=16",
        "method.text_width=32",
        "method.text_depth=1",
        "method.text_heads=2",
        "train.batch_size_per_rank=8",
        "train.max_steps=3",
        "train.log_every=1",
        "train.warmup_epochs=0",
        f"train.output_dir={out}",
    ] + [f"method.{k}={v}" for k, v in method.items()]
    return load_recipe("cpu_clip32", overrides)


def test_pretrain_run_is_a_two_tower_model(tmp_path):
    from vssl.evaluate.two_tower import load_two_tower
    from vssl.evaluate.zeroshot import zeroshot_classifier, zeroshot_logits
    from vssl.pretrain import run_pretrain

    data = _folder(tmp_path / "train")
    out = tmp_path / "run"
    summary = run_pretrain(_recipe(data, out), progress=False)
    assert summary["step"] == 3
    for name in ("tokenizer.json", "two_tower.safetensors", "backbone.safetensors"):
        assert (out / name).is_file(), name
    model = load_two_tower(out)
    classifier = zeroshot_classifier(model, ["cat", "dog"], ["a photo of a {}."])
    images = [Image.open(p).convert("RGB") for p in sorted((data / "cat").glob("*.png"))[:2]]
    logits = zeroshot_logits(model.encode_image(images), classifier)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    run = load_run(out)
    ids, _ = run.method.tokenizer(["a photo of a cat."])
    assert ids.shape == (1, 16)
    # the backbone file is the image tower
    tower = create_model(str(out / "backbone.safetensors"))
    for k, v in tower.state_dict().items():
        torch.testing.assert_close(run.method.student["backbone"].state_dict()[k], v)

    # resuming keeps the run's tokenizer (not retrained): same file contents
    before = (out / "tokenizer.json").read_text()
    run_pretrain(_recipe(data, out, tokenizer_min_frequency=1), progress=False)
    assert (out / "tokenizer.json").read_text() == before


def test_lit_keeps_the_image_tower_locked(tmp_path):
    from vssl.methods.clip import CLIP as _CLIP
    from vssl.pretrain import build_method

    data = _folder(tmp_path / "train")
    recipe = _recipe(data, tmp_path / "run", lock_image=True)
    method, _ = build_method(recipe)
    assert isinstance(method, _CLIP)
    before = {k: v.clone() for k, v in method.student["backbone"].state_dict().items()}
    text_before = method.student["text"].text_projection.weight.clone()
    from vssl.pretrain import build_data
    from vssl.train.loop import Trainer

    d = build_data(recipe, method.views())
    method.prepare(d, tmp_path / "run")
    Trainer(method, d, recipe.train, progress=False).fit()
    for k, v in method.student["backbone"].state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(method.student["text"].text_projection.weight, text_before)
    assert not method.student["backbone"].training  # eval mode: no drop-path in a locked tower


def test_folder_without_captions_is_refused_before_training(tmp_path):
    from vssl.pretrain import build_data, build_method

    data = _folder(tmp_path / "train")
    recipe = _recipe(data, tmp_path / "run")
    recipe.data.captions = None
    method, _ = build_method(recipe)
    with pytest.raises(MissingViewError, match=r"16 of the 16 .*data.captions=templates"):
        build_data(recipe, method.views())


def test_templates_need_class_folders(tmp_path):
    from vssl.pretrain import build_data, build_method

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(8):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(flat / f"{i}.png")
    recipe = _recipe(flat, tmp_path / "run")
    method, _ = build_method(recipe)
    with pytest.raises(ValueError, match="one subfolder per class"):
        build_data(recipe, method.views())


def test_not_a_two_tower_run_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text("method:\n  name: mae\n")
    with pytest.raises(ValueError, match="not a two-tower run"):
        load_run(tmp_path)


def test_transformers_text_model_as_text_tower(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    cfg = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=12,
    )
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    method = CLIP(_tiny_backbone(), _small_cfg(text_model=str(tmp_path / "bert")))
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "caption": ["a photo of a cat", "a dog", "", "cat " * 40],  # empty and over-long
    }
    out = method(batch, 0)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert method.student["text"].model.embeddings.word_embeddings.weight.grad is not None


@pytest.mark.parametrize(
    "name", ["clip_vitb16", "align_base", "siglip_vitb16", "lit_dinov2_vitb14", "lit_webdino_1b"]
)
def test_recipes_build(name):
    from vssl.pretrain import build_method
    from vssl.train.config import load_recipe

    method, _ = build_method(load_recipe(name), meta=True)
    text = sum(p.numel() for p in method.student["text"].parameters())
    if name == "clip_vitb16":
        # CLIP's paper (Sec. 2.4): "a 63M-parameter 12-layer 512-wide model with 8 heads"
        assert abs(text - 63.4e6) < 0.1e6
    trainable = {n.split(".")[0] for n, p in method.student.named_parameters() if p.requires_grad}
    assert ("backbone" in trainable) == (not name.startswith("lit_"))


def test_two_rank_pretrain_shares_the_tokenizer_and_exports(torchrun_pretrain, tmp_path):
    """2 gloo ranks (DDP): rank 0's tokenizer is broadcast, the all-gathered loss trains, and the
    run folder is a two-tower model afterwards."""
    import os
    import subprocess

    data = _folder(tmp_path / "train")
    out = tmp_path / "run"
    overrides = [
        f"data.train={data}",
        "data.captions=templates",
        "data.num_workers=0",
        "model.depth=1",
        "method.embed_dim=16",
        "method.vocab_size=512",
        "method.context_length=16",
        "method.text_width=32",
        "method.text_depth=1",
        "method.text_heads=2",
        "train.batch_size_per_rank=4",
        "train.max_steps=2",
        f"train.output_dir={out}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [*torchrun_pretrain, "cpu_clip32", *overrides, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = load_run(out)
    emb = model.encode_text(["a photo of a cat.", "a photo of a dog."])
    assert emb.shape == (2, 16) and torch.isfinite(emb).all()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 1 and "logit_scale" in lines[-1]


def test_template_captions_name_the_class_and_repeat_exactly(tmp_path):
    from vssl.data.views import ViewSpec
    from vssl.train.data import TrainData

    data = _folder(tmp_path / "train")
    spec = ViewSpec("single", captions=True)
    kw = dict(batch_size=8, global_size=32, photometric=None, views=spec, captions="templates")
    a = next(TrainData(data, **kw).batches(0))
    b = next(TrainData(data, **kw).batches(0))
    assert a["caption"] == b["caption"]  # a function of (seed, epoch, step): exact resume
    for caption, label in zip(a["caption"], a["label"].tolist()):
        assert ["cat", "dog"][label] in caption and caption != ["cat", "dog"][label]
    assert len(set(a["caption"])) > 2  # templates are drawn per sample
    with pytest.raises(ValueError, match="captions must be one of"):
        TrainData(data, **{**kw, "captions": "labels"})
