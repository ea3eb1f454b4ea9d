"""Train a tiny language model whose output layer is split over the vocabulary, on 2+ processes.

Run (CPU, gloo):

    torchrun --nproc-per-node 2 examples/vocab_parallel.py

Every rank holds the same embedding and hidden layer (replicated, as the non-vocabulary part of
a Megatron-style tensor-parallel model would be here) and one slice of the LM head's rows: the
classes ``[start, start + V_r)``. ``xentkit.linear_cross_entropy(..., process_group=group)``
computes the loss over the whole vocabulary without any rank holding the ``tokens x V`` logits,
and its backward all-reduces the gradient of the hidden states, so the replicated layers get
the same gradient on every rank and need no extra synchronisation. At the end, rank 0 checks
the loss against the single-process result on the gathered head.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

import xentkit

VOCAB, DIM, BATCH, SEQ, STEPS = 1000, 64, 8, 32, 40


def toy_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and their next token, a fixed permutation of the vocabulary to learn; the same
    batch on every rank (only the vocabulary is split)."""
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return tokens, (7 * tokens + 3) % VOCAB


def main() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # local runs only; torchrun sets it
    dist.init_process_group("gloo")
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # replicated layers start equal on every rank
    embed, mix = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, DIM)
    full_head = nn.Linear(DIM, VOCAB, bias=False).weight.detach()
    sizes = [VOCAB // world + (r < VOCAB % world) for r in range(world)]  # uneven is fine
    start = sum(sizes[:rank])
    head = nn.Parameter(full_head[start : start + sizes[rank]].clone())  # this rank's classes
    params = [*embed.parameters(), *mix.parameters(), head]
    optimizer = torch.optim.SGD(params, lr=2.0)

    for step in range(STEPS):
        tokens, target = toy_batch(step)
        hidden = torch.tanh(mix(embed(tokens)))  # (BATCH, SEQ, DIM), the same on every rank
        loss = xentkit.linear_cross_entropy(
            hidden, head, target, label_smoothing=0.1, chunk_size=64, process_group=group
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and step % 10 == 0:
            print(f"step {step:2d}  loss {loss.item():.4f}")

    # The replicated layers saw the same gradient everywhere, so they are still equal.
    spread = embed.weight.detach().clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    drift = (spread - embed.weight.detach()).abs().max().item()

    # The same loss in one process, on the head gathered from every rank.
    slices = [None] * world
    dist.all_gather_object(slices, head.detach())
    with torch.no_grad():
        tokens, target = toy_batch(STEPS)
        hidden = torch.tanh(mix(embed(tokens)))
        kwargs = dict(label_smoothing=0.1)
        parallel = xentkit.linear_cross_entropy(hidden, head, target, **kwargs, process_group=group)
        single = xentkit.linear_cross_entropy(hidden, torch.cat(slices), target, **kwargs)
    if rank == 0:
        print(f"held-out loss: vocab-parallel {parallel:.6f}, one process {single:.6f}")
        print(f"ranks: {world}, head rows per rank: {sizes}, replicated layers drift: {drift:.1e}")
    torch.testing.assert_close(parallel, single, rtol=1e-5, atol=1e-6)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
