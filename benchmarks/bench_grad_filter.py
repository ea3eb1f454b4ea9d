"""Gradient filtering (``filter_eps``) on a model trained for real: the demo's tiny LM.

``python -m benchmarks.bench_grad_filter`` (``--quick``: a few steps, seconds):

1. **Loss curves.** The tiny causal transformer of ``examples/train_tiny_lm.py`` is trained
   twice from the same initial weights on the same batches, once with the exact head + loss
   gradient and once with ``filter_eps``; every step's training loss and the final held-out
   loss of both are recorded.
2. **Speed.** On the hidden states the exactly trained model produces for held-out text (so
   its softmax is as peaked as training made it), one forward + backward of
   ``xentkit.linear_cross_entropy`` is timed exactly and filtered, next to torch eager and the
   floor: the three matrix products ``h @ W.T``, ``g @ W`` and ``g.T @ h`` that the exact
   gradient cannot avoid, into resident buffers. The filtered row also reports the fraction of
   (token, class) entries its 128-token blocks keep and how far its gradients are from the
   exact ones.

Writes ``benchmarks/results/grad_filter.{json,png,md}`` (the markdown goes into RESULTS.md as
it is); ``--quick`` writes under ``benchmarks/results-quick/`` instead.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import xentkit
from benchmarks.bench_linear_cross_entropy import FLOOR_TEXT, gemm_floor
from benchmarks.machine import describe, machine_info
from benchmarks.run import DEFAULT_OUT, QUICK_OUT, write_section
from xentkit.kernels import grad_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_tiny_lm import Grammar, TinyLM, batches, optimizer_and_schedule


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_grad_filter")
    p.add_argument("--quick", action="store_true", help="a few steps on a tiny model")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per training run")
    p.add_argument("--dim", type=int, default=256, help="model width D")
    p.add_argument("--topics", type=int, default=32, help="each adds 512 words")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eps", type=float, default=2**-12, help="filter_eps of the filtered run")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens of the timed step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    return p


def train(grammar: Grammar, corpus: Tensor, args, eps: float | None) -> tuple[TinyLM, list]:
    """The tiny LM trained with ``filter_eps=eps``, and its training loss at every step."""
    torch.manual_seed(args.seed)
    model = TinyLM(len(grammar.words), args.dim, 2, heads=4, context=args.context)
    optimizer, schedule = optimizer_and_schedule(model, args.lr, args.steps)
    data = batches(corpus, args.batch, args.context, torch.Generator().manual_seed(args.seed))
    losses = []
    for _ in range(args.steps):
        tokens, targets = next(data)
        hidden = model.hidden(tokens)
        loss = xentkit.linear_cross_entropy(hidden, model.embed.weight, targets, filter_eps=eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return model, losses


@torch.no_grad()
def held_out_loss(model: TinyLM, held_out: Tensor) -> float:
    return model.loss(held_out[:, :-1], held_out[:, 1:]).item()


def _timed(steps: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each step, the steps taking turns (a warm-up call each first),
    so that a slow spell of a shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for turn in range(repeats + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if turn:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def time_head(hidden: Tensor, weight: Tensor, target: Tensor, eps: float, repeats: int) -> dict:
    """Forward + backward times (ms) of the exact and filtered head + loss, torch eager and the
    floor, on the same inputs; the kept fraction and the filtered gradients' relative error."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()

    def grads(filter_eps: float | None) -> tuple[Tensor, ...]:
        loss = xentkit.linear_cross_entropy(h, w, target, filter_eps=filter_eps)
        return torch.autograd.grad(loss, (h, w))

    def torch_step() -> tuple[Tensor, ...]:
        return torch.autograd.grad(F.cross_entropy(F.linear(h, w), target), (h, w))

    g = torch.randn(h.shape[0], w.shape[0])
    hd, wd = hidden.detach(), weight.detach()
    steps = {
        "xentkit exact": lambda: grads(None),
        "xentkit filter_eps": lambda: grads(eps),
        "torch eager": torch_step,
        "floor (3 GEMMs)": gemm_floor(g, hd, wd),
    }
    times = _timed(steps, repeats)
    exact, approx = grads(None), grads(eps)
    errors = [float((a - e).norm() / e.norm()) for a, e in zip(approx, exact, strict=True)]
    with torch.no_grad():
        logit_grad = torch.softmax(hd @ wd.T, -1) - F.one_hot(target, wd.shape[0])
    kept = grad_filter.kept_classes(logit_grad, eps).float().mean().item()
    relative = dict(zip(("hidden", "weight"), errors, strict=True))
    return {"ms": times, "kept_fraction": kept, "grad_rel_error": relative}


def plot(data: dict, path: Path) -> Path:
    """Both training curves (smoothed) and the timed step's bars as multiples of the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for name, losses in data["train_loss"].items():
        smooth, out = None, []
        for value in losses:
            smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
            out.append(smooth)
        curves.plot(range(1, len(out) + 1), out, label=name)
    curves.set(xlabel="step", ylabel="training loss (nats, smoothed)", title="loss curves")
    curves.legend()
    times = data["timing"]["ms"]
    floor = times["floor (3 GEMMs)"]
    names = list(times)
    bars.bar(names, [times[n] / floor for n in names], color="tab:blue")
    bars.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    bars.set(ylabel="time / floor (3 GEMMs)", title=data["timing_case"])
    bars.tick_params(axis="x", labelrotation=15)
    fig.suptitle(f"gradient filtering: {describe(data['machine'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(data: dict, image: str) -> str:
    """The RESULTS.md section (as it is) from the JSON."""
    timing, held = data["timing"], data["held_out_loss"]
    floor = timing["ms"]["floor (3 GEMMs)"]
    exact = timing["ms"]["xentkit exact"]
    lines = [
        "## Gradient filtering on the trained tiny LM (`filter_eps`)",
        "",
        f"- command: `{data['command']}`",
        f"- machine: {describe(data['machine'])}",
        f"- model: {data['model']}; {data['steps']} steps each, same initial weights and batches",
        f"- floor: {FLOOR_TEXT}",
        "",
        "| training | final training loss (mean of last 50 steps) | held-out loss |",
        "|---|---:|---:|",
    ]
    for name, losses in data["train_loss"].items():
        tail = losses[-50:]
        lines.append(f"| {name} | {sum(tail) / len(tail):.3f} | {held[name]:.3f} |")
    lines += [
        "",
        f"One forward + backward on {data['timing_case']} (hidden states of the exactly trained "
        f"model on held-out text; median of {data['repeats']}, the four taking turns):",
        "",
        "| provider | time | × floor | × xentkit exact |",
        "|---|---:|---:|---:|",
    ]
    for name, ms in timing["ms"].items():
        lines.append(f"| {name} | {ms:.0f} ms | {ms / floor:.2f}× | {ms / exact:.2f}× |")
    error = timing["grad_rel_error"]
    lines += [
        "",
        f"- entries kept by the filter: {timing['kept_fraction']:.1%} of the (token, class) "
        "pairs of the step's gradient",
        f"- filtered gradients vs exact (relative norm of the difference): hidden states "
        f"{error['hidden']:.3f}, weight {error['weight']:.3f}",
        "",
        f"![gradient filtering]({image})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(arguments)
    if args.quick:
        args.steps, args.dim, args.topics, args.tokens, args.repeats = 6, 32, 2, 256, 1
    out = QUICK_OUT if args.quick else DEFAULT_OUT
    grammar = Grammar(args.topics, nouns=320, verbs=128, adjectives=64, seed=args.seed)
    corpus = grammar.corpus(200_000)
    power = math.log2(args.eps) if args.eps > 0 else None
    label = f"2**{power:.0f}" if power is not None and power == round(power) else f"{args.eps:g}"
    names = {"exact": None, f"filter_eps={label}": args.eps}
    trained, curves = {}, {}
    for name, eps in names.items():
        start = time.perf_counter()
        trained[name], curves[name] = train(grammar, corpus, args, eps)
        print(f"{name}: {args.steps} steps in {time.perf_counter() - start:.0f} s, "
              f"last loss {curves[name][-1]:.3f}")  # fmt: skip
    rows = args.tokens // args.context
    held_out = grammar.corpus(rows * (args.context + 1)).view(rows, -1)
    model = trained["exact"]
    with torch.no_grad():
        hidden = model.hidden(held_out[:, :-1]).reshape(-1, args.dim)
    target = held_out[:, 1:].reshape(-1)
    vocab = len(grammar.words)
    data = {
        "suite": "grad_filter",
        "command": shlex.join(["python", "-m", "benchmarks.bench_grad_filter", *arguments]),
        "machine": machine_info(),
        "model": f"TinyLM D={args.dim}, 2 layers, V={vocab}, batch {args.batch}x{args.context}",
        "steps": args.steps,
        "eps": args.eps,
        "repeats": args.repeats,
        "train_loss": curves,
        "held_out_loss": {name: held_out_loss(m, held_out) for name, m in trained.items()},
        "timing_case": f"N={hidden.shape[0]} D={args.dim} V={vocab} float32",
        "timing": time_head(hidden, model.embed.weight, target, args.eps, args.repeats),
    }
    write_section(out, data, plot, markdown, remake_report=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
