"""Run under torchrun (2 gloo ranks): the globally gathered InfoNCE and SimCLR's NT-Xent must give
each rank, after DDP's averaging, the gradient of the single-process loss over the whole batch."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vssl.methods.contrastive import all_gather_with_grad, info_nce, nt_xent


def one_process_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over the whole batch written out (no process group involved)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    labels = torch.arange(len(a))
    logits = a @ b.t() / temperature
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def nt_xent_by_the_paper(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's eq. 1 and its loss, written as the paper's algorithm 1 writes them: views
    2k-1 and 2k are image k's; l(i, j) = -log exp(s_ij / t) / sum_{m != i} exp(s_im / t);
    L = 1/2N sum_k [l(2k-1, 2k) + l(2k, 2k-1)]."""
    z = []
    for a, b in zip(z1, z2):  # interleaved: view 2k-1, view 2k
        z += [a, b]
    s = [[F.cosine_similarity(zi, zj, dim=0) for zj in z] for zi in z]

    def pair(i: int, j: int) -> torch.Tensor:
        den = sum(torch.exp(s[i][m] / temperature) for m in range(len(z)) if m != i)
        return -torch.log(torch.exp(s[i][j] / temperature) / den)

    n = len(z1)
    return sum(pair(2 * k, 2 * k + 1) + pair(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


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

    # SimCLR's NT-Xent: negatives are both views of every other image of every rank
    a_ref, b_ref = a_all.clone().requires_grad_(), b_all.clone().requires_grad_()
    nt_xent_by_the_paper(a_ref, b_ref, temperature).backward()
    a, b = a_all[rows].clone().requires_grad_(), b_all[rows].clone().requires_grad_()
    loss = nt_xent(a, b, temperature)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    ref = nt_xent_by_the_paper(a_all, b_all, temperature)
    ok &= torch.allclose(mean_loss / world, ref, atol=1e-6)
    ok &= torch.allclose(a.grad / world, a_ref.grad[rows], atol=1e-6)
    ok &= torch.allclose(b.grad / world, b_ref.grad[rows], atol=1e-6)
    print(f"rank {rank}: {'OK' if ok else 'MISMATCH'}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
