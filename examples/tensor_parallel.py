"""Tensor parallelism with torch's DTensor: a ``parallelize_module`` plan and xentkit's fused loss.

Run (CPU; the script spawns its own 2 gloo processes):

    python examples/tensor_parallel.py

A tiny language model (an embedding, one MLP block, a norm, an LM head) is parallelised the way
torchtitan parallelises a transformer: the embedding and the MLP's second linear
``RowwiseParallel`` (one all-reduce each in forward), the MLP's first linear ``ColwiseParallel``,
and the LM head ``ColwiseParallel(use_local_output=False)``, so that its weight is a DTensor
split along the vocabulary (``Shard(0)``; 1001 classes, unevenly: 501 and 500 rows).

The head's own forward never runs. The loss is
``xentkit.linear_cross_entropy(h, model.lm_head.weight, target)``: it sees the DTensor weight,
runs the vocab-parallel fused kernel over the mesh's process group (no rank ever holds the
tokens x V logits, or more than a chunk of its slice of them) and returns the weight's gradient
as a DTensor split like the weight, which the optimiser updates in place. Rank 0 then trains the
same model in one process and checks every step's loss against it.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import xentkit

VOCAB, DIM, HIDDEN, BATCH, SEQ, STEPS, LR = 1001, 32, 64, 4, 16, 8, 1.0
WORLD_SIZE = 2


class TinyLM(nn.Module):
    """Embedding, one residual MLP block and a norm; the LM head's weight is used by the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The hidden states ``(B, T, DIM)`` (the same on every rank under tensor parallelism)."""
        x = self.embed(tokens)
        x = x + self.down(F.gelu(self.up(x)))
        return self.norm(x)


def toy_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and their next token, a fixed permutation of the vocabulary to learn; the same
    batch on every rank (tensor parallelism splits the model, not the data)."""
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return tokens, (7 * tokens + 3) % VOCAB


def train(model: TinyLM) -> list[float]:
    """A few SGD steps with the fused loss; the loss of each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        tokens, target = toy_batch(step)
        loss = xentkit.linear_cross_entropy(model(tokens), model.lm_head.weight, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def tensor_parallel(rank: int, store: str) -> None:
    """One rank: parallelise the model over a 1-D mesh of all ranks and train it; rank 0 then
    trains the same model in one process and compares the losses."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        torch.manual_seed(0)  # every rank builds the same full model, then keeps its shards
        model = parallelize_module(
            TinyLM(),
            mesh,
            {
                "embed": RowwiseParallel(input_layouts=Replicate()),
                "up": ColwiseParallel(),
                "down": RowwiseParallel(),
                "lm_head": ColwiseParallel(use_local_output=False),
            },
        )
        head = model.lm_head.weight
        losses = train(model)
        if rank == 0:
            torch.manual_seed(0)
            expected = train(TinyLM())
            rows = head.to_local().shape[0]
            print(f"LM head {tuple(head.shape)}, placements {head.placements}, rank 0 rows {rows}")
            for step, (mine, single) in enumerate(zip(losses, expected, strict=True)):
                print(f"step {step}  loss: tensor parallel {mine:.6f}, one process {single:.6f}")
            # Float32 sums in a different order (the all-reduces), over a few steps of SGD.
            torch.testing.assert_close(losses, expected, rtol=2e-5, atol=0.0)
            print(f"{WORLD_SIZE} ranks match the single-process run")
    finally:
        dist.destroy_process_group()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(tensor_parallel, args=(store,), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main()
