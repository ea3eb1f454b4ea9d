"""Train a tiny Hugging Face Llama with a 128k vocabulary, unpatched and patched with xentkit.

With a large vocabulary the language-model head and its loss dominate a small model's memory:
``transformers`` builds the ``(tokens, vocabulary)`` logits in float32, then their gradient.
:func:`xentkit.integrations.transformers.patch` sends the hidden states straight into
:func:`xentkit.linear_cross_entropy` instead. This script trains the same model on generated
token data both ways, each in its own process so that one's memory cannot hide the other's, and
prints the loss, the time of a training step and the peak memory of the process during the
steps (``VmHWM``, reset after set-up through ``/proc/self/clear_refs``, so Linux only).

Run (about a minute on two cores)::

    python examples/hf_finetune.py                      # vocabulary 128256, 4 x 256 tokens
    python examples/hf_finetune.py --backend chunked    # force one xentkit backend
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import transformers

from xentkit.integrations.transformers import patch


def _status(field: str) -> float:
    """A ``/proc/self/status`` memory field, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _batch(args: argparse.Namespace, generator: torch.Generator) -> torch.Tensor:
    """Counting sequences (each token the previous one plus one) in the first 1024 token ids,
    so that a few steps already teach the model something: loss falls from log(vocabulary)."""
    starts = torch.randint(1024, (args.batch, 1), generator=generator)
    return (starts + torch.arange(args.seq)) % 1024


def train(args: argparse.Namespace) -> dict:
    """Train in this process; the losses, the mean step time and the peak memory."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).train()
    if args.variant == "xentkit":
        loss_options = {} if args.backend is None else {"backend": args.backend}
        patch(model, **loss_options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses, times = [], []
    for step in range(args.steps + 1):
        ids = _batch(args, generator)
        if step == 1:  # after a warm-up step has allocated the optimizer's state
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # reset VmHWM to the current resident size
            baseline = _status("VmRSS")
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {
        "variant": args.variant,
        "losses": losses,
        "step_s": sum(times) / len(times),
        "peak_mib": _status("VmHWM"),
        "above_baseline_mib": _status("VmHWM") - baseline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary (Llama 3: 128256)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--backend", default=None, help="xentkit backend (default: by device)")
    parser.add_argument("--variant", choices=["transformers", "xentkit"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # a child process: train one variant, report as JSON
        print(json.dumps(train(args)))
        return

    tokens = args.batch * args.seq
    print(
        f"Llama, hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}, "
        f"{args.batch} x {args.seq} tokens per step; float32 logits would take "
        f"{tokens * args.vocab * 4 / 2**20:.0f} MiB"
    )
    header = ("loss", "first", "last", "step (s)", "peak (MiB)", "step peak")
    print("{:>12} {:>8} {:>8} {:>9} {:>11} {:>10}".format(*header))
    for variant in ("transformers", "xentkit"):
        child = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--variant", variant],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(child.stdout.strip().splitlines()[-1])
        print(
            f"{r['variant']:>12} {r['losses'][0]:8.4f} {r['losses'][-1]:8.4f} "
            f"{r['step_s']:9.2f} {r['peak_mib']:11.0f} {r['above_baseline_mib']:+10.0f}"
        )
    print("step peak: the peak during the timed steps above the resident size before them")


if __name__ == "__main__":
    main()
