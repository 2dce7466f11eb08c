"""SplitMask (vssl.methods.splitmask): the patch tokenizer against brute force and planted
clusters, InfoNCE against its formula and (2 ranks) against one process, the whole loss against a
per-image loop that places tokens by hand, the recipes, and the CPU recipe end to end with an exact
resume that keeps the vocabulary."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vssl.methods import get_method
from vssl.methods.contrastive import info_nce
from vssl.methods.mae import patchify, pixel_targets
from vssl.methods.splitmask import SplitMask, SplitMaskConfig, _restore_order
from vssl.models.patch_tokenizer import PatchTokenizer
from vssl.models.vit import VisionTransformer

pytest.importorskip("faiss")


# ---------------------------------------------------------------------------------- tokenizer
def test_tokenizer_assigns_the_most_cosine_similar_entry():
    g = torch.Generator().manual_seed(0)
    tok = PatchTokenizer(7, 5)
    tok.codebook.copy_(F.normalize(torch.randn(7, 5, generator=g), dim=-1))
    tok.fitted.fill_(True)
    patches = torch.randn(4, 6, 5, generator=g) * 3.0
    ids = tok.encode(patches)
    assert ids.shape == (4, 6) and ids.dtype == torch.long
    for i in range(4):
        for j in range(6):
            p = patches[i, j].tolist()
            best, best_cos = None, -2.0
            for k in range(7):
                c = tok.codebook[k].tolist()
                cos = sum(x * y for x, y in zip(p, c)) / (
                    math.sqrt(sum(x * x for x in p)) * math.sqrt(sum(y * y for y in c))
                )
                if cos > best_cos:
                    best, best_cos = k, cos
            assert ids[i, j].item() == best


def test_tokenizer_fit_recovers_planted_directions_and_refuses_what_it_cannot_do():
    g = torch.Generator().manual_seed(1)
    centers = F.normalize(torch.randn(8, 12, generator=g), dim=-1)
    which = torch.arange(8).repeat(300)
    scale = 0.5 + 2.5 * torch.rand(len(which), 1, generator=g)  # cosine ignores the scale
    patches = centers[which] * scale + 0.02 * torch.randn(len(which), 12, generator=g)
    tok = PatchTokenizer(8, 12)
    with pytest.raises(RuntimeError, match="not built"):
        tok.encode(patches)
    info = tok.fit(patches, seed=0, nredo=10)  # restarts: one may merge two clusters
    assert info == {"patches": 2400, "vocab_size": 8, "used": 8}
    torch.testing.assert_close(tok.codebook.norm(dim=-1), torch.ones(8))
    cos = centers @ tok.codebook.t()
    assert (cos.max(dim=1).values > 0.99).all()
    assert len(set(cos.argmax(dim=1).tolist())) == 8  # one entry per planted direction
    ids = tok.encode(patches)
    assert torch.equal(ids, cos.argmax(dim=1)[which])  # every point goes to its own centre
    with pytest.raises(ValueError, match="cannot make a vocabulary of 8"):
        PatchTokenizer(8, 12).fit(patches[:5])


# -------------------------------------------------------------------------------- contrastive
def test_info_nce_against_its_formula():
    g = torch.Generator().manual_seed(2)
    a, b, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), 0.2

    def one_way(x, y):
        total = 0.0
        for i in range(len(x)):
            xi = x[i] / x[i].norm()
            sims = [float(xi @ (y[j] / y[j].norm())) / t for j in range(len(y))]
            total += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
        return total / len(x)

    expected = 0.5 * (one_way(a, b) + one_way(b, a))
    assert info_nce(a, b, t).item() == pytest.approx(expected, rel=1e-5)


def test_gathered_info_nce_gives_the_single_process_gradient_on_two_ranks():
    script = Path(__file__).with_name("_torchrun_contrastive.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count(": OK") == 2


# ------------------------------------------------------------------------------- the method
def _encoder() -> VisionTransformer:
    return VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        layerscale=None,
        mask_token=False,
        family="mae",
    )


def _splitmask(target: str, seed: int = 0) -> SplitMask:
    torch.manual_seed(seed)
    cfg = SplitMaskConfig(
        target=target,
        vocab_size=16,
        vocab_samples=64,
        decoder_embed_dim=16,
        decoder_depth=2,
        decoder_num_heads=2,
    )
    m = SplitMask(_encoder(), cfg)
    with torch.no_grad():  # move the zero-initialized biases and tokens off their init
        for p in m.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


class _Data:
    """What SplitMask.prepare reads: ``batches(epoch)``."""

    def __init__(self, batches):
        self._batches = batches

    def batches(self, epoch):
        return iter(self._batches)


def _batch(n: int = 4, seed: int = 3) -> dict:
    from vssl.data.masking import split_halves

    g = torch.Generator().manual_seed(seed)
    ids_a, ids_b = split_halves(n, 16, generator=g)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "ids_a": ids_a, "ids_b": ids_b}


def test_restore_order_puts_the_encoded_half_and_the_mask_tokens_in_place():
    b = _batch()
    for first, second in ((b["ids_a"], b["ids_b"]), (b["ids_b"], b["ids_a"])):
        values = torch.cat((first, second), dim=1)  # each token labelled by its position
        placed = torch.gather(values, 1, _restore_order(first, second))
        assert torch.equal(placed, torch.arange(16).expand(4, -1))


def _reference_loss(m: SplitMask, batch: dict) -> float:
    """The loss image by image: each half encoded alone, the decoder's input sequence laid out
    position by position, the other half's targets read patch by patch."""
    backbone, dec = m.student["backbone"], m.student["decoder"]
    p, n = 8, batch["image"].shape[0]
    inpaint_terms, pooled = [], {"a": [], "b": []}
    for i in range(n):
        image = batch["image"][i : i + 1]
        ids_a, ids_b = batch["ids_a"][i].tolist(), batch["ids_b"][i].tolist()
        for name, seen, hidden in (("a", ids_a, ids_b), ("b", ids_b, ids_a)):
            out = backbone(image, ids_keep=torch.tensor([seen]), is_training=True)
            enc = dec.decoder_embed(
                torch.cat((out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]), 1)
            )[0]
            seq = [enc[0]]
            for pos in range(16):
                seq.append(enc[1 + seen.index(pos)] if pos in seen else dec.mask_token[0, 0])
            x = torch.stack(seq)[None] + dec.decoder_pos_embed
            for blk in dec.decoder_blocks:
                x = blk(x)
            states = dec.decoder_norm(x)[0, 1:]
            pred = dec.decoder_pred(states)
            patches = patchify(image, p)[0]
            for pos in hidden:
                if m.cfg.target == "tokens":
                    target = m.tokenizer.encode(patches[pos])
                    inpaint_terms.append(-F.log_softmax(pred[pos], -1)[target])
                else:
                    target = pixel_targets(image, p, True)[0, pos]
                    inpaint_terms.append((pred[pos] - target).square().mean())
            pooled[name].append(states.mean(0))
    inpaint = torch.stack(inpaint_terms).mean()
    return (inpaint + info_nce(torch.stack(pooled["a"]), torch.stack(pooled["b"]), 0.2)).item()


@pytest.mark.parametrize("target", ["tokens", "pixels"])
def test_loss_against_a_per_image_loop(target):
    m = _splitmask(target)
    batch = _batch()
    m.prepare(_Data([{"image": torch.randn(4, 3, 32, 32)} for _ in range(3)]))
    assert (m.tokenizer is not None) == (target == "tokens")
    out = m(batch, 0)
    assert set(out) == {"loss", "inpaint", "contrastive"}
    assert out["loss"].item() == pytest.approx(
        out["inpaint"].item() + out["contrastive"].item(), rel=1e-6
    )
    assert out["loss"].item() == pytest.approx(_reference_loss(m, batch), rel=1e-4)
    out["loss"].backward()
    enc = m.student["backbone"]
    assert enc.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert enc.pos_embed.grad is None  # fixed sin-cos positions, as MAE's


def test_prepare_builds_the_vocabulary_once_from_training_patches():
    m = _splitmask("tokens")
    seen = []

    def batches(epoch):
        assert epoch == 0
        for i in range(10):
            seen.append(i)
            yield {"image": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i))}

    data = _Data(None)
    data.batches = batches
    m.prepare(data)
    # 64 patches wanted, one image of 16 patches per batch: exactly 4 batches drawn
    assert seen == [0, 1, 2, 3] and m.tokenizer.is_fitted
    codebook = m.tokenizer.codebook.clone()
    m.prepare(data)  # already built (or loaded from a checkpoint): kept
    assert seen == [0, 1, 2, 3] and torch.equal(m.tokenizer.codebook, codebook)
    assert "tokenizer.codebook" in m.state_dict()


def test_registry_views_and_bad_settings():
    assert get_method("splitmask") is SplitMask
    spec = _splitmask("tokens").views()
    assert (spec.kind, spec.mask, spec.patch_size) == ("single", "split", 8)
    with pytest.raises(ValueError, match="target must be one of"):
        SplitMaskConfig(target="dalle")
    with pytest.raises(ValueError, match="vocab_samples 10 must be at least vocab_size 16"):
        SplitMaskConfig(vocab_size=16, vocab_samples=10)
    odd = VisionTransformer(img_size=24, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="9 patches is odd"):
        SplitMask(odd, SplitMaskConfig(vocab_size=16, vocab_samples=64, decoder_embed_dim=16))


@pytest.mark.parametrize("name, embed_dim", [("splitmask_vits16", 384), ("splitmask_vitb16", 768)])
def test_paper_recipes(name, embed_dim):
    from vssl.pretrain import build_method
    from vssl.train.config import load_recipe

    r = load_recipe(name)
    assert r.method_name == "splitmask"
    assert (r.method.target, r.method.temperature, r.method.decoder_depth) == ("tokens", 0.2, 2)
    assert r.data.n_local == 0 and r.data.photometric is False
    method, _ = build_method(r, meta=True)
    bcfg = method.student["backbone"].config
    assert (bcfg.patch_size, bcfg.embed_dim, bcfg.img_size) == (16, embed_dim, 224)


# ----------------------------------------------------------------- the recipe, end to end on CPU
def _run(listing, out, *extra):
    from vssl.pretrain import run_pretrain
    from vssl.train.config import load_recipe

    r = load_recipe(
        "cpu_splitmask32",
        [
            f"data.train={listing}",
            f"train.output_dir={out}",
            "model.depth=2",
            "model.embed_dim=48",
            "model.num_heads=3",
            "method.decoder_embed_dim=32",
            "method.decoder_num_heads=2",
            "method.vocab_size=32",
            "method.vocab_samples=2048",
            "train.batch_size_per_rank=16",
            "data.num_workers=0",
            "train.epochs=3",
            "train.warmup_epochs=1",
            "train.log_every=1",
            *extra,
        ],
    )
    return run_pretrain(r, progress=False)


def test_cpu_splitmask32_trains_and_resumes_exactly_with_its_vocabulary(listing, tmp_path):
    from safetensors.torch import load_file

    full = _run(listing, tmp_path / "full")
    assert full["stopped"] == "completed" and full["step"] == 15  # 80 images / 16 x 3 epochs
    part = _run(listing, tmp_path / "part", "train.max_steps=7")
    rest = _run(listing, tmp_path / "part")
    assert rest["resumed_from"].endswith("step_00000007") and rest["step"] == 15

    def rows(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    a, b = rows(tmp_path / "full"), rows(tmp_path / "part")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 16))
    for ra, rb in zip(a, b):  # the resumed run predicts the same ids: the vocabulary was kept
        for k in ("loss", "inpaint", "contrastive"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-7), (ra["step"], k)
    assert part["stopped"] == "max_steps"
    for k in ("inpaint", "contrastive"):  # both terms fall (the last 5 steps against the first 5)
        assert sum(r[k] for r in a[-5:]) < sum(r[k] for r in a[:5]), k
    wa = load_file(tmp_path / "full" / "backbone.safetensors")
    wb = load_file(tmp_path / "part" / "backbone.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_cpu_splitmask32_under_torchrun(listing, tmp_path, strategy, torchrun_pretrain):
    """2 processes (gloo): the vocabulary is built before the first step, InfoNCE gathers its
    negatives from both ranks, the run exits 0 and exports the encoder."""
    from vssl.models.zoo import create_model

    run = tmp_path / "run"
    cmd = [
        *torchrun_pretrain,
        "cpu_splitmask32",
        f"data.train={listing}",
        "train.max_steps=2",
        "train.batch_size_per_rank=8",
        f"train.output_dir={run}",
        f"train.strategy={strategy}",
        "train.warmup_epochs=1",
        "train.log_every=1",
        "model.embed_dim=48",
        "model.depth=2",
        "model.num_heads=3",
        "method.decoder_embed_dim=32",
        "method.decoder_num_heads=2",
        "method.vocab_size=16",
        "method.vocab_samples=512",
        "data.num_workers=0",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["contrastive"]) for r in rows if "loss" in r)
    model = create_model(run / "backbone.safetensors")
    assert model.config.embed_dim == 48
