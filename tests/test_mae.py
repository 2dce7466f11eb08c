"""MAE / Web-MAE (vssl.methods.mae): numerics against transformers' ViTMAEForPreTraining and a
brute-force loss, the visible-tokens-only encoder, the views, continuing from checkpoints with and
without a decoder, the recipe end to end, exact resume and the trained encoder's export."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vssl.data.views import ViewSpec
from vssl.methods import MAE, MAEConfig, get_method, list_methods
from vssl.methods.base import UnknownMethodError
from vssl.methods.mae import mae_loss, patchify
from vssl.models.checkpoints import CheckpointError
from vssl.models.vit import VisionTransformer, sincos_pos_embed_2d


def _encoder(**kw) -> VisionTransformer:
    args = dict(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        layerscale=None,
        mask_token=False,
        family="mae",
    )
    args.update(kw)
    return VisionTransformer(**args)


def _mae(seed: int = 0, **cfg) -> MAE:
    torch.manual_seed(seed)
    args = dict(decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2)
    args.update(cfg)
    return MAE(_encoder(), MAEConfig(**args))


def _batch(n: int = 3, seed: int = 1, ratio: float = 0.75, noise=None) -> dict:
    from vssl.data.masking import random_masking

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    ids_keep, ids_restore, mask = random_masking(n, 16, ratio, generator=g, noise=noise)
    return {"image": images, "ids_keep": ids_keep, "ids_restore": ids_restore, "mask": mask}


# ------------------------------------------------------------------------- against transformers
def _hf_mae(transformers):
    cfg = transformers.ViTMAEConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
        norm_pix_loss=True,
        layer_norm_eps=1e-6,
        mask_ratio=0.75,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(3)
    model = transformers.ViTMAEForPreTraining(cfg).eval()
    # MAE's fixed sin-cos positions, as transformers' own initializers write them (its lazy init
    # may leave them at zero on construction)
    model.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
    model.vit.embeddings.initialize_weights()
    model.decoder.initialize_weights(16)
    assert model.vit.embeddings.position_embeddings.abs().sum() > 0
    return model


def _from_hf(hf_sd: dict) -> dict:
    """transformers' in-memory ViTMAE names -> vssl's (encoder: DINOv2/timm names; decoder: MAE's)."""
    out, used = {}, set()

    def take(k):
        used.add(k)
        return hf_sd[k]

    def block(src: str, dst: str):
        a = f"{src}.attention."
        out[f"{dst}.attn.qkv.weight"] = torch.cat([take(a + f"{x}_proj.weight") for x in "qkv"])
        out[f"{dst}.attn.qkv.bias"] = torch.cat([take(a + f"{x}_proj.bias") for x in "qkv"])
        for ours, theirs in (
            ("attn.proj", "attention.o_proj"),
            ("norm1", "layernorm_before"),
            ("norm2", "layernorm_after"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            for p in ("weight", "bias"):
                out[f"{dst}.{ours}.{p}"] = take(f"{src}.{theirs}.{p}")

    e = "vit.embeddings."
    out["backbone.cls_token"] = take(e + "cls_token")
    out["backbone.pos_embed"] = take(e + "position_embeddings")
    for p in ("weight", "bias"):
        out[f"backbone.patch_embed.proj.{p}"] = take(e + f"patch_embeddings.projection.{p}")
        out[f"backbone.norm.{p}"] = take(f"vit.layernorm.{p}")
        for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
            out[f"decoder.{name}.{p}"] = take(f"decoder.{name}.{p}")
    for i in range(2):
        block(f"vit.layers.{i}", f"backbone.blocks.{i}")
        block(f"decoder.decoder_layers.{i}", f"decoder.decoder_blocks.{i}")
    out["decoder.mask_token"] = take("decoder.mask_token")
    out["decoder.decoder_pos_embed"] = take("decoder.decoder_pos_embed")
    assert used == set(hf_sd), sorted(set(hf_sd) - used)
    return out


def test_sincos_position_embedding_matches_transformers():
    transformers = pytest.importorskip("transformers")
    hf = _hf_mae(transformers)
    torch.testing.assert_close(
        sincos_pos_embed_2d(32, 4),
        hf.vit.embeddings.position_embeddings.detach(),
        rtol=0,
        atol=1e-6,
    )
    torch.testing.assert_close(
        sincos_pos_embed_2d(16, 4), hf.decoder.decoder_pos_embed.detach(), rtol=0, atol=1e-6
    )
    # and the method puts exactly these in place, fixed (not trained)
    m = _mae()
    assert torch.equal(m.student["backbone"].pos_embed.detach(), sincos_pos_embed_2d(32, 4))
    assert not m.student["backbone"].pos_embed.requires_grad
    assert not m.student["decoder"].decoder_pos_embed.requires_grad


def test_forward_matches_transformers_vitmae_with_the_same_noise():
    transformers = pytest.importorskip("transformers")
    hf = _hf_mae(transformers)
    ours = _mae()
    ours.student.load_state_dict(_from_hf(hf.state_dict()), strict=True)
    ours.eval()
    g = torch.Generator().manual_seed(7)
    images = torch.randn(3, 3, 32, 32, generator=g)
    noise = torch.rand(3, 16, generator=g)
    with torch.no_grad():
        ref = hf(pixel_values=images, noise=noise)
        batch = _batch(noise=noise)
        batch["image"] = images
        torch.testing.assert_close(batch["mask"], ref.mask)
        torch.testing.assert_close(batch["ids_restore"], ref.ids_restore)
        loss = ours(batch, 0)["loss"]
        pred, _ = ours.reconstruct(batch)
    torch.testing.assert_close(pred, ref.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- the loss itself
def test_loss_against_a_brute_force_loop_over_patches():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 8, 12, generator=g)
    p = 4
    n = (8 // p) * (12 // p)
    pred = torch.randn(2, n, p * p * 3, generator=g)
    mask = torch.zeros(2, n)
    mask[0, [1, 4]] = 1
    mask[1, [0, 2, 5]] = 1
    for norm in (True, False):
        total, count = 0.0, 0
        for b in range(2):
            for k in range(n):
                if not mask[b, k]:
                    continue
                r, c = divmod(k, 12 // p)
                patch = images[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p]  # (C, p, q)
                target = patch.permute(1, 2, 0).reshape(-1)  # MAE's (p, q, c) order
                if norm:
                    target = (target - target.mean()) / math.sqrt(target.var().item() + 1e-6)
                total += ((pred[b, k] - target) ** 2).mean().item()
                count += 1
        assert mae_loss(images, pred, mask, p, norm).item() == pytest.approx(
            total / count, rel=1e-5
        )
    assert patchify(images, p).shape == (2, n, 48)


def test_encoder_sees_only_the_visible_tokens_without_mask_tokens():
    m = _mae()
    seen = []
    m.student["backbone"].blocks[0].register_forward_pre_hook(
        lambda mod, a: seen.append(a[0].shape)
    )
    batch = _batch(n=3)
    out = m(batch, 0)
    assert seen == [torch.Size([3, 1 + 4, 32])]  # CLS + 25% of 16 patches
    assert out.keys() == {"loss"} and torch.isfinite(out["loss"])
    # the kept tokens carry their own positions: same as encoding those patches in the full pass
    vit = m.student["backbone"]
    with torch.no_grad():
        kept = vit.prepare_tokens_kept(batch["image"], batch["ids_keep"])
        full = vit.prepare_tokens_with_masks(batch["image"])
        idx = batch["ids_keep"][0] + 1
        torch.testing.assert_close(kept[0, 1:], full[0, idx])
        torch.testing.assert_close(kept[:, 0], full[:, 0])
    out["loss"].backward()
    assert vit.pos_embed.grad is None and m.student["decoder"].mask_token.grad is not None


# ------------------------------------------------------------------------------------ the views
def test_views_one_crop_and_a_random_mask_per_image_deterministic(shared_data, tmp_path):
    from vssl.train.data import TrainData

    files = sorted((shared_data / "cifar10-subset" / "train" / "cat").glob("*.jpg"))[:16]
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{p}\n" for p in files))
    m = _mae()
    assert m.views() == ViewSpec("single", mask="random", mask_ratio=0.75, patch_size=8)
    data = TrainData(
        listing,
        batch_size=8,
        global_size=32,
        global_scale=(0.2, 1.0),
        photometric=None,
        views=m.views(),
        seed=4,
    )
    b0, b1 = list(data.batches(0))
    assert b0["image"].shape == (8, 3, 32, 32) and b0["image"].dtype == torch.float32
    assert b0["ids_keep"].shape == (8, 4) and b0["ids_restore"].shape == (8, 16)
    assert torch.equal(b0["mask"].sum(1), torch.full((8,), 12.0))
    # the mask is the complement of the kept ids, and differs between images
    for row in range(8):
        assert set(torch.nonzero(b0["mask"][row] == 0).flatten().tolist()) == set(
            b0["ids_keep"][row].tolist()
        )
    assert len({tuple(r.tolist()) for r in b0["ids_keep"]}) > 1
    # a function of (seed, epoch, step): resuming at step 1 gives batch 1 exactly
    again = next(
        TrainData(
            listing,
            batch_size=8,
            global_size=32,
            global_scale=(0.2, 1.0),
            photometric=None,
            views=m.views(),
            seed=4,
        ).batches(0, 1)
    )
    assert all(torch.equal(again[k], b1[k]) for k in b1 if torch.is_tensor(b1[k]))
    with pytest.raises(ValueError, match="photometric=false"):
        TrainData(listing, batch_size=8, global_size=32, views=m.views())


def test_image_text_views_refuse_data_without_captions(shared_data, tmp_path):
    from vssl.data.views import MissingViewError
    from vssl.train.data import TrainData

    files = sorted((shared_data / "cifar10-subset" / "train" / "cat").glob("*.jpg"))[:8]
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{p}\n" for p in files))
    spec = ViewSpec("single", captions=True)
    with pytest.raises(MissingViewError, match="caption"):
        TrainData(listing, batch_size=4, global_size=32, photometric=None, views=spec)
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp_path / "pairs.parquet"
    pq.write_table(
        pa.table(
            {"path": [str(p) for p in files], "text": [f"a photo of cat {i}" for i in range(8)]}
        ),
        manifest,
    )
    data = TrainData(manifest, batch_size=4, global_size=32, photometric=None, views=spec)
    batch = next(data.batches(0))
    assert len(batch["caption"]) == 4 and all(
        c.startswith("a photo of cat") for c in batch["caption"]
    )


# ------------------------------------------------------------------------ registry and recipes
def test_registry_lists_methods_and_names_the_unknown_one():
    assert {"dinov2", "mae"} <= set(list_methods())
    assert get_method("mae") is MAE
    with pytest.raises(
        UnknownMethodError, match=r"unknown method 'mea'.*Did you mean 'mae'.*dinov2"
    ):
        get_method("mea")


@pytest.mark.parametrize(
    "name, model, lr_at_4096",
    [
        ("mae_vitb16", "mae-vit-b16", 2.4e-3),
        ("mae_vitl16", "mae-vit-l16", 2.4e-3),
        ("webmae_300m", "webssl-mae300m-full2b-224", 1.6e-3),
        ("webmae_3b", "webssl-mae3b-full2b-224", 1.6e-3),
    ],
)
def test_mae_recipes_follow_the_papers(name, model, lr_at_4096):
    from vssl.train.config import load_recipe
    from vssl.train.loop import peak_lr

    r = load_recipe(name)
    t, m = r.train, r.method
    assert r.method_name == "mae" and r.model.name == model
    assert (
        m.mask_ratio,
        m.norm_pix_loss,
        m.decoder_embed_dim,
        m.decoder_depth,
        m.decoder_num_heads,
    ) == (0.75, True, 512, 8, 16)
    assert (t.adamw_beta1, t.adamw_beta2, t.weight_decay, t.weight_decay_end) == (
        0.9,
        0.95,
        0.05,
        0.05,
    )
    assert (t.lr_scaling, t.lr_base_batch, t.layer_decay, t.clip_grad) == ("linear", 256, 1.0, None)
    ranks = 4096 // t.batch_size_per_rank
    assert peak_lr(t, ranks) == pytest.approx(lr_at_4096)
    assert r.data.global_scale == (0.2, 1.0) and r.data.photometric is False
    if name.startswith("webmae"):  # 80K warm-up iterations, ~2B images seen
        assert t.warmup_epochs * t.iters_per_epoch == 80_000
        assert abs(t.epochs * t.iters_per_epoch * 4096 - 2e9) / 2e9 < 0.01
    else:
        assert (t.epochs, t.warmup_epochs, t.iters_per_epoch) == (800, 40, None)


# ----------------------------------------------------------------- continuing from checkpoints
def test_continue_from_an_mae_checkpoint_keeps_its_decoder_and_refuses_a_wrong_one(tmp_path):
    src = _mae(seed=1)
    # MAE's own pretraining checkpoint layout: {"model": encoder keys + decoder_* + mask_token}
    sd = {**src.student["backbone"].state_dict(), **src.student["decoder"].state_dict()}
    torch.save({"model": sd}, tmp_path / "mae_pretrain.pth")
    dst = _mae(seed=2)
    report = dst.load_pretrained(str(tmp_path / "mae_pretrain.pth"))
    assert report["backbone"] and report["decoder"]
    for k, v in src.student.state_dict().items():
        assert torch.equal(dst.student.state_dict()[k], v), k
    assert not dst.student["backbone"].pos_embed.requires_grad

    # an encoder-only file (a released Web-MAE encoder): the decoder stays freshly initialized
    torch.save(src.student["backbone"].state_dict(), tmp_path / "encoder.pth")
    fresh = _mae(seed=3)
    before = {k: v.clone() for k, v in fresh.student["decoder"].state_dict().items()}
    assert fresh.load_pretrained(str(tmp_path / "encoder.pth"))["decoder"] is False
    assert all(torch.equal(fresh.student["decoder"].state_dict()[k], v) for k, v in before.items())
    assert torch.equal(
        fresh.student["backbone"].blocks[0].attn.qkv.weight,
        src.student["backbone"].blocks[0].attn.qkv.weight,
    )

    # a decoder of another depth is refused, naming the keys and the setting that fits
    deeper = _mae(seed=1, decoder_depth=3)
    torch.save(
        {
            "model": {
                **deeper.student["backbone"].state_dict(),
                **deeper.student["decoder"].state_dict(),
            }
        },
        tmp_path / "deeper.pth",
    )
    target = _mae(seed=4)
    with pytest.raises(CheckpointError, match=r"(?s)decoder_blocks\.2\..*method\.decoder_depth=3"):
        target.load_pretrained(str(tmp_path / "deeper.pth"))


# ----------------------------------------------------------------- the recipe, end to end on CPU
def _run(listing, out, *extra):
    from vssl.pretrain import run_pretrain
    from vssl.train.config import load_recipe

    r = load_recipe(
        "cpu_mae32",
        [
            f"data.train={listing}",
            f"train.output_dir={out}",
            "model.depth=2",
            "model.embed_dim=48",
            "model.num_heads=3",
            "method.decoder_embed_dim=32",
            "method.decoder_depth=1",
            "train.batch_size_per_rank=16",
            "data.num_workers=0",
            "train.epochs=3",
            "train.warmup_epochs=1",
            "train.log_every=1",
            *extra,
        ],
    )
    return run_pretrain(r, progress=False)


def test_cpu_mae32_trains_resumes_exactly_and_exports_the_encoder(listing, tmp_path):
    from safetensors.torch import load_file

    from vssl.models.checkpoints import export_hf
    from vssl.models.zoo import create_model

    full = _run(listing, tmp_path / "full")
    assert full["stopped"] == "completed" and full["step"] == 15  # 80 images / 16 x 3 epochs
    part = _run(listing, tmp_path / "part", "train.max_steps=7")
    assert part["stopped"] == "max_steps"
    rest = _run(listing, tmp_path / "part")
    assert rest["resumed_from"].endswith("step_00000007") and rest["step"] == 15

    def rows(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    a, b = rows(tmp_path / "full"), rows(tmp_path / "part")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 16))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-7), ra["step"]
    assert a[-1]["loss"] < a[0]["loss"]  # it learns to reconstruct
    wa = load_file(tmp_path / "full" / "backbone.safetensors")
    wb = load_file(tmp_path / "part" / "backbone.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)

    # the run folder itself reads as its encoder (vssl embed/info/convert take it); a run from
    # before the method contract, with teacher_backbone.safetensors, too
    model = create_model(tmp_path / "full").eval()
    old = tmp_path / "old_run"
    old.mkdir()
    (old / "teacher_backbone.safetensors").write_bytes(
        (tmp_path / "full" / "backbone.safetensors").read_bytes()
    )
    assert torch.equal(create_model(old).blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)

    # vssl convert: a timm-style .pth (MAE's names: no LayerScale, no mask token)
    from vssl.cli import main

    assert (
        main(["convert", str(tmp_path / "full"), str(tmp_path / "enc.pth"), "--to", "native"]) == 0
    )
    sd = torch.load(tmp_path / "enc.pth", weights_only=True)
    sd = sd.get("model", sd) if "model" in sd else sd
    assert {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.mlp.fc1.weight",
        "norm.weight",
    } <= set(sd)
    assert not any("ls1" in k or "mask_token" in k for k in sd)
    torch.testing.assert_close(sd["blocks.1.mlp.fc2.weight"], model.blocks[1].mlp.fc2.weight)

    # the exported encoder is a plain model (what vssl embed reads) and converts to transformers
    assert model.config.family == "mae" and model.config.layerscale is None
    x = torch.randn(2, 3, 32, 32)
    transformers = pytest.importorskip("transformers")
    hf_dir = export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModel.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "ViTModel"
    with torch.no_grad():
        ours = model.forward_features(x)
        theirs = hf(pixel_values=x).last_hidden_state
    torch.testing.assert_close(theirs[:, 0], ours["x_norm_clstoken"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs[:, 1:], ours["x_norm_patchtokens"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_cpu_mae32_under_torchrun(listing, tmp_path, strategy, torchrun_pretrain):
    """2 processes (gloo): the MAE recipe trains, exits 0 and exports the whole encoder."""
    import subprocess

    from vssl.models.zoo import create_model

    run = tmp_path / "run"
    cmd = [
        *torchrun_pretrain,
        "cpu_mae32",
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
        "method.decoder_depth=1",
        "data.num_workers=0",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("stopped: max_steps at step 2") == 1
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    model = create_model(run / "backbone.safetensors")
    assert model.config.embed_dim == 48 and model.config.depth == 2
    assert not any(torch.isnan(p).any() for p in model.parameters())
