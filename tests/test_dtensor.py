"""DTensor tensor parallelism on 3 gloo processes (and 2 of them) against single-process results.

``xentkit.linear_cross_entropy`` with an LM head's weight split along the vocabulary
(``Shard(0)``, as ``ColwiseParallel`` leaves it) and ``xentkit.cross_entropy`` with logits split
along their classes (``Shard(1)``, what ``loss_parallel()`` takes) must give the values and
gradients of the single-process functions on the full tensors (and of ``F.cross_entropy`` under
``loss_parallel()`` where it has the options), with every gradient a DTensor in its input's
placements; unsupported placements must raise a clear error on every rank.

As in ``test_distributed``, failures are collected (its ``Checks``) so that no rank is left
waiting in a collective, and the test fails at the end with the list. Each process start costs
seconds (it imports torch, DTensor and dynamo), so one test spawns 3 ranks and runs every check
in them, on meshes of all 3 ranks (uneven slices, errors, 2-D meshes) and of 2 (the full option
grid, a ColwiseParallel head, FSDP2). Every rank builds the same full tensors from shared seeds
and keeps its shards (``distribute_tensor(..., src_data_rank=None)``: no communication), except
on the data-parallel dim of a 2-D mesh, where each rank has its own batch. The references run
the ``"reference"`` backend (the spec, in float64).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_distributed import Checks, _grad_out, _grid, _problem, _spawn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

import xentkit

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


# ---------------------------------------------------------------- helpers on every rank


def _dt(full: torch.Tensor, mesh: DeviceMesh, placements, grad: bool = True) -> DTensor:
    """``full`` (the same on every rank) as a DTensor leaf, each rank keeping its shard."""
    out = distribute_tensor(full, mesh, placements, src_data_rank=None)
    return out.requires_grad_(grad)


def _replicate(full: torch.Tensor, mesh: DeviceMesh, grad: bool = False) -> DTensor:
    return _dt(full, mesh, [Replicate()] * mesh.ndim, grad)


def _split(mesh: DeviceMesh, mesh_dim: int, dim: int) -> list:
    """Shard(dim) on ``mesh_dim``, Replicate() on the other mesh dims."""
    return [Shard(dim) if d == mesh_dim else Replicate() for d in range(mesh.ndim)]


def _local(x: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's local tensor (differentiably), a plain tensor as it is."""
    return x.to_local() if isinstance(x, DTensor) else x


def _data_seed(mesh: DeviceMesh, mesh_dim: int) -> int:
    """A seed for this rank's own batch: the same within the vocabulary's mesh dim, different
    across the others (the data-parallel ranks)."""
    coordinate = mesh.get_coordinate()
    return 1000 * (1 + sum(c for d, c in enumerate(coordinate) if d != mesh_dim))


def _has_empty_slice(vocab: int, ranks: int) -> bool:
    """Whether torch's uneven Shard (torch.chunk sizes) leaves the last rank no class."""
    return math.ceil(vocab / ranks) * (ranks - 1) >= vocab


def _close_dtensor_grad(checks: Checks, name: str, grad, leaf: DTensor, expected) -> None:
    """A gradient is a DTensor in its leaf's placements and, gathered, equals ``expected``."""
    ok = isinstance(grad, DTensor) and grad.placements == leaf.placements
    checks.true(
        f"{name} placements", ok, f"got {type(grad).__name__} {getattr(grad, 'placements', '')}"
    )
    if ok:
        checks.close(name, grad.full_tensor(), expected)


# ---------------------------------------------------------------- the checks


def _check_linear(
    checks: Checks, mesh: DeviceMesh, vocab: int, mesh_dim: int, every: int, own_data: bool = False
) -> None:
    """xentkit.linear_cross_entropy with the weight (and bias) split along the vocabulary on
    ``mesh_dim`` over the option grid (every ``every``-th case): the value and the gradients of
    the hidden states, weight and bias against the single-process reference on the full weight.
    Hidden states, targets and class weights are plain or replicated DTensors in turn; with
    ``own_data`` each rank of the other mesh dims has its own batch (and plain inputs)."""
    dim, batch, seq = 3, 2, 3
    seed = _data_seed(mesh, mesh_dim) if own_data else 0
    for i, opts, weighted in _grid():
        if i % every:
            continue
        _, target, class_weight, grad_rows = _problem(
            seed + i, batch * seq, vocab, opts["ignore_index"], weighted, F64
        )
        target = target.reshape(batch, seq)
        g = torch.Generator().manual_seed(seed + 100 + i)
        hidden = torch.randn(batch, seq, dim, generator=g, dtype=F64)
        weight = torch.randn(vocab, dim, generator=g, dtype=F64)
        bias = torch.randn(vocab, generator=g, dtype=F64) if i % 3 else None
        grad_out = _grad_out(opts["reduction"], grad_rows, F64)
        grad_out = grad_out.reshape(batch, seq) if opts["reduction"] == "none" else grad_out
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
        expected = xentkit.linear_cross_entropy(
            *leaves[:2], target, leaves[2] if bias is not None else None,
            class_weight=class_weight, backend="reference", **opts,
        )  # fmt: skip
        grads = torch.autograd.grad(expected, leaves, grad_out)

        replicated = not own_data and i % 4 >= 2
        h_in = _replicate(hidden, mesh, True) if replicated else hidden.clone().requires_grad_()
        w_in = _dt(weight, mesh, _split(mesh, mesh_dim, 0))
        b_in = None if bias is None else _dt(bias, mesh, _split(mesh, mesh_dim, 0))
        t_in = _replicate(target, mesh) if not own_data and i % 4 in (1, 2) else target
        cw_in = class_weight
        if class_weight is not None and not own_data and i % 8 == 3:
            cw_in = _replicate(class_weight, mesh)
        mine = xentkit.linear_cross_entropy(
            h_in, w_in, t_in, b_in, class_weight=cw_in, chunk_size=(None, 1, 4)[i % 3], **opts
        )
        name = f"linear mesh={tuple(mesh.shape)} V={vocab} case {i} {opts} weighted={weighted}"
        checks.true(
            f"{name} loss type", isinstance(mine, DTensor) == replicated, type(mine).__name__
        )
        mine_leaves = [t for t in (h_in, w_in, b_in) if t is not None]
        mine_grads = torch.autograd.grad(_local(mine), mine_leaves, grad_out)
        checks.close(f"{name} value", _local(mine), expected)
        if replicated:
            _close_dtensor_grad(checks, f"{name} grad input", mine_grads[0], h_in, grads[0])
        else:
            checks.close(f"{name} grad input", mine_grads[0], grads[0])
        _close_dtensor_grad(checks, f"{name} grad weight", mine_grads[1], w_in, grads[1])
        if bias is not None:
            _close_dtensor_grad(checks, f"{name} grad bias", mine_grads[2], b_in, grads[2])


# Logits layouts, cycled over the grid: torch's (N, C), (N, C, d), unbatched (C), and the
# (B, T, V) output of a ColwiseParallel head, flattened to (B * T, V) as a DTensor op.
_LAYOUTS = ("NC", "NCd", "C", "BTV")


def _logits_problem(i: int, layout: str, vocab: int, opts: dict, weighted: bool, seed: int):
    """Full logits in ``layout`` (classes at dim 1, 0 for ``C``; last for ``BTV``), targets,
    class weights and an incoming gradient of the target's shape."""
    logits, target, class_weight, grad_rows = _problem(
        seed + i, 6, vocab, opts["ignore_index"], weighted, F64
    )
    grad_out = _grad_out(opts["reduction"], grad_rows, F64)
    if layout == "NCd":  # rows (n, d) -> (3, V, 2)
        logits, target = logits.reshape(3, 2, vocab).transpose(1, 2), target.reshape(3, 2)
    elif layout == "C":
        logits, target, grad_out = logits[0], target[0], grad_out[0] if grad_out.dim() else grad_out
    elif layout == "BTV":
        logits = logits.reshape(2, 3, vocab)
    if opts["reduction"] == "none" and layout != "C":
        grad_out = grad_out.reshape(target.shape)
    return logits.contiguous(), target, class_weight, grad_out


def _check_logits(
    checks: Checks, mesh: DeviceMesh, vocab: int, mesh_dim: int, every: int, own_data: bool = False
) -> None:
    """xentkit.cross_entropy of logits split along their classes on ``mesh_dim`` over the
    grid: value and gradient against xentkit's single-process reference, F.cross_entropy (for
    torch's options) and F.cross_entropy under loss_parallel() (which has no label smoothing and
    no empty slices); the loss a replicated DTensor, the gradient in the logits' placements."""
    seed = _data_seed(mesh, mesh_dim) if own_data else 0
    ranks = mesh.size(mesh_dim)
    for i, opts, weighted in _grid():
        if i % every:
            continue
        # Cases i = 8k, 8k + 1 have torch's options only; (i + i // 8) gives them every layout.
        layout = _LAYOUTS[(i + i // 8) % len(_LAYOUTS)]
        flat = layout == "BTV"
        logits, target, class_weight, grad_out = _logits_problem(
            i, layout, vocab, opts, weighted, seed
        )
        full = logits.clone().requires_grad_()
        full_in, target_in = (full.flatten(0, 1), target.flatten()) if flat else (full, target)
        expected = xentkit.cross_entropy(
            full_in, target_in, class_weight, backend="reference", **opts
        )
        (grad,) = torch.autograd.grad(expected, full, grad_out)

        cdim = {"C": 0, "BTV": 2}.get(layout, 1)
        leaf = _dt(logits, mesh, _split(mesh, mesh_dim, cdim))
        t_in = _replicate(target, mesh) if not own_data and i % 3 == 1 else target
        x, t = (leaf.flatten(0, 1), t_in.flatten()) if flat else (leaf, t_in)
        mine = xentkit.cross_entropy(x, t, class_weight, **opts)
        name = f"logits mesh={tuple(mesh.shape)} V={vocab} {layout} case {i} {opts} w={weighted}"
        ok = isinstance(mine, DTensor) and all(p.is_replicate() for p in mine.placements)
        checks.true(f"{name} loss placements", ok, f"{type(mine).__name__}")
        (mine_grad,) = torch.autograd.grad(_local(mine), leaf, grad_out)
        checks.close(f"{name} value", _local(mine), expected)
        _close_dtensor_grad(checks, f"{name} grad", mine_grad, leaf, grad)

        torch_opts = {k: v for k, v in opts.items() if k not in ("z_loss", "softcap")}
        if opts["z_loss"] or opts["softcap"] is not None:
            continue
        torch_loss = F.cross_entropy(full_in, target_in, class_weight, **torch_opts)
        checks.close(f"{name} value = F.cross_entropy", _local(mine), torch_loss)
        # loss_parallel() has no label smoothing and no (C) input, fails on an empty slice, and
        # its backward gathers class weights at ignored (negative) targets.
        weighted_ignored = weighted and opts["ignore_index"] < 0
        if opts["label_smoothing"] or layout == "C" or weighted_ignored:
            continue
        if _has_empty_slice(vocab, ranks):
            continue
        theirs_leaf = _dt(logits, mesh, _split(mesh, mesh_dim, cdim))
        theirs_in = theirs_leaf.flatten(0, 1) if flat else theirs_leaf
        with loss_parallel():
            theirs = F.cross_entropy(theirs_in, t, class_weight, **torch_opts)
            (theirs_grad,) = torch.autograd.grad(theirs.to_local(), theirs_leaf, grad_out)
        checks.close(f"{name} value = loss_parallel", _local(mine), theirs.to_local())
        checks.true(f"{name} loss placements = loss_parallel", mine.placements == theirs.placements)
        checks.close(f"{name} grad = loss_parallel", mine_grad.to_local(), theirs_grad.to_local())


def _check_colwise_head(checks: Checks, mesh: DeviceMesh) -> None:
    """The pattern end to end: an LM head parallelised with ColwiseParallel, its weight and
    bias to the fused loss, and its (B, T, V) output, flattened, to cross_entropy, against
    loss_parallel and the single-process head; gradients reach the head's parameters."""
    torch.manual_seed(3)
    single = nn.Linear(4, 9).double()
    head = parallelize_module(copy.deepcopy(single), mesh, ColwiseParallel(use_local_output=False))
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, 4, generator=g, dtype=F64)
    target = torch.randint(0, 9, (2, 5), generator=g)
    target[0, 1] = -100

    expected = F.cross_entropy(single(hidden).flatten(0, 1), target.flatten())
    expected.backward()
    mine = xentkit.linear_cross_entropy(hidden, head.weight, target, head.bias)
    mine.backward()
    checks.close("colwise head fused loss", mine, expected)
    _close_dtensor_grad(
        checks, "colwise head fused weight", head.weight.grad, head.weight, single.weight.grad
    )
    _close_dtensor_grad(
        checks, "colwise head fused bias", head.bias.grad, head.bias, single.bias.grad
    )

    head.zero_grad()
    logits = head(hidden)
    checks.true("colwise head output", logits.placements == (Shard(2),), str(logits.placements))
    mine = xentkit.cross_entropy(logits.flatten(0, 1), target.flatten())
    mine.backward()
    mine_grad = head.weight.grad.full_tensor()
    head.zero_grad()
    with loss_parallel():
        theirs = F.cross_entropy(head(hidden).flatten(0, 1), target.flatten())
        theirs.backward()
    checks.close("colwise head logits loss = loss_parallel", mine.to_local(), theirs.to_local())
    checks.close("colwise head logits loss", mine.to_local(), expected)
    checks.close(
        "colwise head logits grad = loss_parallel", mine_grad, head.weight.grad.full_tensor()
    )
    checks.close("colwise head logits grad", mine_grad, single.weight.grad)


def _check_single_precision(checks: Checks, mesh: DeviceMesh) -> None:
    """float32 (the loss float32, the caller's cast) and autocast (the head in bfloat16, the
    loss float32, as the single-process path) for the fused head; float32 logits."""
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(8, 6, generator=g), torch.randn(11, 6, generator=g)
    target, class_weight = torch.randint(0, 11, (8,), generator=g), torch.rand(11, generator=g)
    opts = dict(class_weight=class_weight, label_smoothing=0.1, z_loss=1e-3)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            expected = xentkit.linear_cross_entropy(
                hidden, weight, target, **opts, backend="reference"
            )
            mine = xentkit.linear_cross_entropy(
                hidden, _dt(weight, mesh, [Shard(0)]), target, **opts
            )
        checks.true(
            f"float32 autocast={autocast} dtype", mine.dtype == torch.float32, str(mine.dtype)
        )
        # float32 tolerance under autocast too: the same bfloat16 logits, not float32 ones.
        checks.close(f"float32 autocast={autocast} value", mine, expected, torch.float32)
    logits = torch.randn(8, 11, generator=g)
    mine = xentkit.cross_entropy(_dt(logits, mesh, [Shard(1)]), target, class_weight, z_loss=1e-3)
    expected = xentkit.cross_entropy(logits, target, class_weight, z_loss=1e-3, backend="reference")
    checks.true("float32 logits dtype", mine.dtype == torch.float32, str(mine.dtype))
    checks.close("float32 logits value", mine.to_local(), expected, torch.float32)


def _check_errors(checks: Checks, rank: int, mesh: DeviceMesh) -> None:
    """Every unsupported placement raises on every rank (before any collective, or from the
    shared check) with the argument and the fix; the group stays usable afterwards."""
    g = torch.Generator().manual_seed(6)
    logits, hidden, weight = (
        torch.randn(s, generator=g, dtype=F64) for s in [(4, 6), (4, 3), (6, 3)]
    )
    target = torch.randint(0, 6, (4,), generator=g)
    split_logits, split_weight = _dt(logits, mesh, [Shard(1)]), _dt(weight, mesh, [Shard(0)])
    grad_weight = torch.rand(6, dtype=F64, requires_grad=True)
    # A weight split by FSDP over data-parallel ranks, each with its own batch.
    own = torch.randint(0, 6, (4,), generator=torch.Generator().manual_seed(rank + 7))

    def ce(x=split_logits, t=target, w=None):
        return lambda: xentkit.cross_entropy(x, t, w)

    def lin(h=hidden, w=split_weight, t=target, b=None, **kw):
        return lambda: xentkit.linear_cross_entropy(h, w, t, b, **kw)

    cases = [
        ("logits split along the batch", ValueError,
         r"input has placement Shard\(dim=0\).*class dim 1", ce(_dt(logits, mesh, [Shard(0)]))),
        ("(B, T, V) logits unflattened", ValueError, r"flatten\(0, 1\)",
         ce(_dt(logits.reshape(2, 2, 6), mesh, [Shard(2)]), target.reshape(2, 2))),
        ("replicated logits", ValueError, r"input is replicated.*input.to_local\(\)",
         ce(_replicate(logits, mesh))),
        ("partial logits", ValueError, "input has placement Partial",
         ce(DTensor.from_local(logits, mesh, [Partial()]))),
        ("split target", ValueError, r"target must be .*target.full_tensor\(\)",
         ce(t=_dt(target, mesh, [Shard(0)], False))),
        ("split class weight", ValueError, r"weight must be .*full_tensor",
         ce(w=_dt(torch.rand(6, dtype=F64), mesh, [Shard(0)], False))),
        ("plain logits, DTensor target", TypeError, "plain logits",
         ce(logits, _replicate(target, mesh))),
        ("class weight requiring grad", ValueError, r"requires grad.*detach", ce(w=grad_weight)),
        ("weight split along D", ValueError,
         r"weight has placement Shard\(dim=1\).*RowwiseParallel",
         lin(w=_dt(weight, mesh, [Shard(1)]))),
        ("replicated weight", ValueError, r"weight is replicated.*weight.to_local\(\)",
         lin(w=_replicate(weight, mesh))),
        ("plain weight", TypeError, "plain weight", lin(h=_replicate(hidden, mesh), w=weight)),
        ("plain bias", ValueError, "bias must be a DTensor split like weight",
         lin(b=torch.zeros(6, dtype=F64))),
        ("replicated bias", ValueError, r"bias must be .*got \(Replicate\(\),\)",
         lin(b=_replicate(torch.zeros(6, dtype=F64), mesh))),
        ("hidden states split", ValueError, r"input must be .*input.full_tensor\(\)",
         lin(h=_dt(hidden, mesh, [Shard(0)]))),
        ("class weight requiring grad (linear)", ValueError, "requires grad",
         lin(class_weight=grad_weight)),
        ("FSDP-split weight, own batches", ValueError, r"disagree.*fully_shard.*full_tensor",
         lin(t=own)),
    ]  # fmt: skip
    for name, exc, match, call in cases:
        checks.raises(name, exc, match, call)
    mine = xentkit.linear_cross_entropy(hidden, split_weight, target)
    expected = xentkit.linear_cross_entropy(hidden, weight, target, backend="reference")
    checks.close("after the errors", mine, expected)


def _check_meshes_2d(checks: Checks, world_size: int) -> None:
    """2-D (dp, tp) meshes of every rank: (1, R), where the vocabulary's group is the world,
    and (R, 1), where each data-parallel rank has its own batch and the vocabulary's group is
    this rank alone (the world's group would see the ranks disagree). Then 2-D errors."""
    names = ("dp", "tp")
    for shape in ((1, world_size), (world_size, 1)):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        own = shape[0] > 1
        _check_linear(checks, mesh, 7, 1, every=7, own_data=own)
        _check_logits(checks, mesh, 7, 1, every=7, own_data=own)
    # The errors on the last mesh, (R, 1), and on a 1-D one.
    one_d = init_device_mesh("cpu", (world_size,))
    g = torch.Generator().manual_seed(9)
    weight, hidden = (
        torch.randn(6, 3, generator=g, dtype=F64),
        torch.randn(4, 3, generator=g, dtype=F64),
    )
    target = torch.arange(4)
    twice, split = _dt(weight, mesh, [Shard(0), Shard(0)]), _dt(weight, mesh, _split(mesh, 1, 0))

    def lin(h, w):
        return lambda: xentkit.linear_cross_entropy(h, w, target)

    checks.raises(
        "2-D: weight split over two mesh dims", ValueError, r"over mesh dims \[0, 1\]",
        lin(hidden, twice),
    )  # fmt: skip
    checks.raises(
        "2-D: hidden states on another mesh", ValueError, "different device meshes",
        lin(_replicate(hidden, one_d), split),
    )  # fmt: skip


class _TinyLM(nn.Module):
    """An embedding, a linear and an LM head whose weight goes to the fused loss in forward."""

    def __init__(self, vocab: int = 10, dim: int = 4) -> None:
        super().__init__()
        self.embed, self.mix = nn.Embedding(vocab, dim), nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.mix(self.embed(tokens)))
        return xentkit.linear_cross_entropy(hidden, self.lm_head.weight, target, z_loss=0.01)


def _check_fsdp(checks: Checks, rank: int, mesh: DeviceMesh) -> None:
    """FSDP2 over ``mesh``: with the LM head in the root's FSDP group, the loss sees the
    gathered (plain) weight in forward; each rank's loss and the averaged gradients equal the
    single-process ones. An LM head sharded on its own and used outside its forward (a DTensor
    split over ranks with their own batches) is a clear error."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(8)
    single = _TinyLM().double()
    gens = [torch.Generator().manual_seed(20 + r) for r in range(mesh.size())]
    batches = [
        (torch.randint(0, 10, (6,), generator=g), torch.randint(0, 10, (6,), generator=g))
        for g in gens
    ]
    losses, grads = [], []
    for batch in batches:
        single.zero_grad()
        losses.append(single(*batch))
        losses[-1].backward()
        grads.append({n: p.grad.clone() for n, p in single.named_parameters()})

    model = copy.deepcopy(single)
    fully_shard(model.embed, mesh=mesh)
    fully_shard(model.mix, mesh=mesh)
    fully_shard(model, mesh=mesh)
    loss = model(*batches[rank])
    loss.backward()
    checks.close("FSDP loss", loss, losses[rank])
    for name, param in model.named_parameters():
        mean = sum(g[name] for g in grads) / len(grads)  # FSDP averages over the ranks
        checks.close(f"FSDP grad {name}", param.grad.full_tensor(), mean)

    model = copy.deepcopy(single)
    fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    checks.raises(
        "FSDP-sharded lm_head outside its forward", ValueError, "fully_shard",
        lambda: model(*batches[rank]),
    )  # fmt: skip


def _check_fsdp_patched_model(checks: Checks, rank: int, mesh: DeviceMesh) -> None:
    """FSDP2 ``fully_shard`` of a Hugging Face model patched to the fused loss: each rank's
    loss and the averaged gradients equal the unpatched model's on one process."""
    transformers = importlib.import_module("transformers")
    from torch.distributed.fsdp import fully_shard

    from xentkit.integrations.transformers import patch

    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    torch.manual_seed(9)
    single = transformers.LlamaForCausalLM(config).double()
    gens = [torch.Generator().manual_seed(30 + r) for r in range(mesh.size())]
    batches = [torch.randint(0, 50, (2, 7), generator=g) for g in gens]
    losses, grads = [], []
    for ids in batches:
        single.zero_grad()
        losses.append(single(ids, labels=ids).loss)
        losses[-1].backward()
        grads.append({n: p.grad.clone() for n, p in single.named_parameters()})

    model = patch(copy.deepcopy(single))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ids = batches[rank]
    loss = model(ids, labels=ids).loss
    loss.backward()
    # transformers computes the unpatched loss from float32 logits, even in a float64 model.
    f32 = torch.float32
    checks.close("FSDP patched model loss", loss.to(f32), losses[rank], dtype=f32)
    for name, param in model.named_parameters():
        mean = sum(g[name] for g in grads) / len(grads)  # FSDP averages over the ranks
        checks.close(f"FSDP patched model grad {name}", param.grad.full_tensor(), mean, f32)


# ---------------------------------------------------------------- what the ranks run


def _ranks(checks: Checks, rank: int, world_size: int) -> None:
    """Three ranks (uneven slices: 7 classes are 3, 3, 1 and 4 are 2, 2, 0, torch.chunk's
    layout), then a group of two of them for the full option grid and FSDP (one spawn: each
    process start costs seconds of imports)."""
    world = init_device_mesh("cpu", (world_size,))
    # Every rank builds every mesh: making a process group is collective over the world.
    pair = DeviceMesh("cpu", [0, 1])
    for vocab, every in ((7, 2), (4, 5)):
        _check_linear(checks, world, vocab, 0, every)
        _check_logits(checks, world, vocab, 0, every)
    _check_single_precision(checks, world)
    _check_errors(checks, rank, world)
    _check_meshes_2d(checks, world_size)
    if rank < 2:
        _check_linear(checks, pair, 7, 0, every=1)
        _check_logits(checks, pair, 7, 0, every=1)
        _check_colwise_head(checks, pair)
        _check_fsdp(checks, rank, pair)
        if importlib.util.find_spec("transformers") is not None:
            _check_fsdp_patched_model(checks, rank, pair)


# ---------------------------------------------------------------- the tests


@pytest.mark.distributed
def test_three_and_two_ranks_match_single_process_and_loss_parallel(tmp_path):
    _spawn(tmp_path, 3, _ranks)


@pytest.mark.distributed
def test_tensor_parallel_example_matches_one_process():
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "tensor_parallel.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "2 ranks match the single-process run" in run.stdout
