"""SimCLR: NT-Xent against the paper's equation, the method on its views, the recipe end to end."""

from __future__ import annotations

import json

import pytest
import torch
from _torchrun_contrastive import nt_xent_by_the_paper

from vssl.methods import get_method, list_methods
from vssl.methods.contrastive import nt_xent
from vssl.methods.simclr import SimCLR, SimCLRConfig
from vssl.models.vit import VisionTransformer


def test_nt_xent_matches_the_papers_equation_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for t in (0.1, 0.5):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        ra, rb = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss, ref = nt_xent(a, b, t), nt_xent_by_the_paper(ra, rb, t)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(a.grad, ra.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.grad, rb.grad, rtol=1e-4, atol=1e-6)
    # identical views of orthogonal images: the positive dominates and the loss approaches 0
    eye = torch.eye(4) * 10
    assert nt_xent(eye, eye, 0.05).item() < 1e-6


def _encoder() -> VisionTransformer:
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, layerscale=None
    )


def test_method_contrasts_the_two_global_crops_and_refuses_local_crops():
    assert "simclr" in list_methods() and get_method("simclr") is SimCLR
    torch.manual_seed(0)
    method = SimCLR(_encoder(), SimCLRConfig(proj_hidden_dim=16, proj_dim=8, temperature=0.5))
    assert method.views().kind == "multicrop" and method.views().mask is None
    glob = torch.randn(6, 3, 32, 32)  # crop 1 of images 0..2, then crop 2
    out = method({"global": glob}, 0)
    h = method.encoder().forward_features(glob)["x_norm_clstoken"]
    z1, z2 = method.student["head"](h).chunk(2)
    torch.testing.assert_close(out["loss"], nt_xent_by_the_paper(z1, z2, 0.5), rtol=1e-5, atol=0)
    out["loss"].backward()
    assert method.student["backbone"].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="data.n_local=0"):
        method({"global": glob, "local": torch.randn(12, 3, 16, 16)}, 0)
    with pytest.raises(ValueError, match="SimCLR takes 2 global crops per image"):
        method({"global": glob[:5]}, 0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SimCLRConfig(temperature=0)


def test_cpu_simclr32_trains_and_resumes_exactly(listing, tmp_path):
    from vssl.pretrain import run_pretrain
    from vssl.train.config import load_recipe

    def run(out, *extra):
        r = load_recipe(
            "cpu_simclr32",
            [
                f"data.train={listing}",
                f"train.output_dir={out}",
                "model.depth=2",
                "model.embed_dim=48",
                "model.num_heads=3",
                "method.proj_hidden_dim=32",
                "train.batch_size_per_rank=16",
                "data.num_workers=1",  # a loader worker collates the empty local crops
                "train.epochs=3",
                "train.warmup_epochs=1",
                "train.log_every=1",
                *extra,
            ],
        )
        return run_pretrain(r, progress=False)

    full = run(tmp_path / "full")
    assert full["stopped"] == "completed" and full["step"] == 15  # 80 images / 16 x 3 epochs
    run(tmp_path / "part", "train.max_steps=7")
    rest = run(tmp_path / "part")
    assert rest["resumed_from"].endswith("step_00000007") and rest["step"] == 15

    def rows(run_dir):
        return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]

    a, b = rows(tmp_path / "full"), rows(tmp_path / "part")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 16))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6), ra["step"]
    # chance level of NT-Xent with 31 candidates is log(31) = 3.43; it must move below it
    assert min(r["loss"] for r in a[-5:]) < a[0]["loss"]
    assert (tmp_path / "full" / "backbone.safetensors").is_file()


def test_load_pretrained_initializes_the_encoder_and_refuses_another(tmp_path):
    from safetensors.torch import save_file

    from vssl.models.checkpoints import CheckpointError

    torch.manual_seed(1)
    released = _encoder()
    save_file(released.state_dict(), tmp_path / "encoder.safetensors")
    method = SimCLR(_encoder(), SimCLRConfig(proj_hidden_dim=16, proj_dim=8))
    report = method.load_pretrained(str(tmp_path / "encoder.safetensors"))
    assert report["backbone"] is True
    for k, v in released.state_dict().items():
        torch.testing.assert_close(method.encoder().state_dict()[k], v, rtol=0, atol=0, msg=k)
    wider = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)
    save_file(wider.state_dict(), tmp_path / "wider.safetensors")
    with pytest.raises(CheckpointError, match="wider.safetensors"):
        method.load_pretrained(str(tmp_path / "wider.safetensors"))
