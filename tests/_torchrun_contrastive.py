"""Run under torchrun (2 gloo ranks): the globally gathered InfoNCE must give each rank, after
DDP's averaging, the gradient of the single-process loss over the whole batch."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vssl.methods.contrastive import all_gather_with_grad, info_nce


def one_process_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over the whole batch written out (no process group involved)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    labels = torch.arange(len(a))
    logits = a @ b.t() / temperature
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n, d, temperature = 3, 5, 0.2
    g = torch.Generator().manual_seed(0)  # the same global batch on every rank
    a_all, b_all = torch.randn(world * n, d, generator=g), torch.randn(world * n, d, generator=g)

    # one process, the whole batch
    a_ref, b_ref = a_all.clone().requires_grad_(), b_all.clone().requires_grad_()
    one_process_loss(a_ref, b_ref, temperature).backward()

    # this rank's rows only, negatives gathered from the other rank
    rows = slice(rank * n, (rank + 1) * n)
    a, b = a_all[rows].clone().requires_grad_(), b_all[rows].clone().requires_grad_()
    loss = info_nce(a, b, temperature)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    ok = torch.allclose(mean_loss / world, one_process_loss(a_all, b_all, temperature), atol=1e-6)
    # DDP averages gradients over ranks
    ok &= torch.allclose(a.grad / world, a_ref.grad[rows], atol=1e-6)
    ok &= torch.allclose(b.grad / world, b_ref.grad[rows], atol=1e-6)
    gathered = all_gather_with_grad(a.detach())
    ok &= torch.equal(gathered, a_all)
    print(f"rank {rank}: {'OK' if ok else 'MISMATCH'}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
