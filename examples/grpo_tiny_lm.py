"""Fine-tune a tiny language model with GRPO, a policy-gradient loop of RL fine-tuning, on the
per-token log-probabilities of ``xentkit.linear_log_probs`` (no downloads).

Run from the repository root (well under a minute on 2 CPU cores):

    python examples/grpo_tiny_lm.py
    python examples/grpo_tiny_lm.py --steps 5 --no-compare    # a smoke run

1. Pretraining. The tiny causal transformer of ``train_tiny_lm.py`` learns the text of its
   grammar (a smaller vocabulary here) for a few seconds with ``xentkit.linear_cross_entropy``;
   a frozen copy becomes the reference policy.
2. Reward, checkable against the grammar. A prompt is the end of a sentence and the first
   three words of the next; the policy writes up to ``--length`` more tokens. The sentence it
   ends (at its first ``.``) scores 1 when it parses under the grammar,
   ``S -> NP (Adv) V (NP) (, Conj NP V) .`` with ``NP -> Det ((Int) Adj)* N (Prep NP)``, and
   keeps to one topic's words; 0.5 when it parses but mixes topics; 0 when it does not parse
   or does not end.
3. GRPO (Shao et al., 2024, "DeepSeekMath"). For each prompt, ``--group`` completions are
   sampled at temperature ``T`` without gradient; a completion's advantage ``A`` is its reward
   minus its group's mean, over its group's standard deviation (no value network), and every
   token of the completion shares it. The policy then takes ``--epochs`` optimizer steps on
   the PPO clipped objective, averaged over the generated tokens,
   ``min(r A, clip(r, 1 - eps, 1 + eps) A) - beta KL + c H`` with the ratio
   ``r = exp(log p - log p_old)`` to the policy that sampled, the k3 estimate of the KL
   divergence to the reference ``KL = exp(q - log p) - (q - log p) - 1`` (``q``: the
   reference's log-probability of the same token; unbiased, never negative) and an optional
   entropy bonus ``c H``. Every log-probability and entropy is
   ``xentkit.linear_log_probs(hidden, head.weight, tokens, temperature=T, return_entropy=True)``
   on the hidden states of the policy (or of the reference): the tokens x V logits are never
   built. The prompt, and every token after the sentence's end, is ``-100`` (ignored: log p 0,
   no gradient).

It prints the mean reward, KL and entropy every few steps, a few completions before and after,
and at the end the peak extra memory of the head's part of such a step (log-probabilities and
entropy, forward and backward) at a realistic vocabulary (``--vocab``, ``--tokens``), for
xentkit and for the unfused ``F.linear`` + ``log_softmax`` + ``gather`` path, measured as
``train_tiny_lm.py`` measures it (Linux: the ``VmHWM`` high-water mark after
``/proc/self/clear_refs``, minus the resident size just before).

The reward favours short endings (fewer tokens, fewer chances to break the grammar): the
policy learns to close its sentence soon, and the mean completion length falls with the
reward's rise. That is what this reward asks for; a length term would ask for something else.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import xentkit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_tiny_lm.py, beside this file
from train_tiny_lm import Grammar, TinyLM, batches, peak_extra_mib

IGNORE = -100
PROMPT = 4  # tokens: the previous sentence's "." and the first three words of the next
# One letter per word class (content words: the first letter of their kind); a sentence
# parses when its letters match SENTENCE, the grammar's rules written as a regular expression.
FUNCTION_CLASSES = {
    "D": ["the", "a", "every", "some", "no", "this"],
    "I": ["very", "quite"],
    "P": ["in", "on", "with", "near"],
    "R": ["never", "often"],
    "C": ["and", "but"],
    ",": [","],
    ".": ["."],
}
_NOUN_PHRASE = r"D(?:I?A)*N(?:PD(?:I?A)*N)?"
SENTENCE = re.compile(rf"{_NOUN_PHRASE}R?V(?:{_NOUN_PHRASE})?(?:,C{_NOUN_PHRASE}V)?\.")


class Checker:
    """Scores a sentence (token ids, ending with ``.``) against the grammar that wrote the
    corpus."""

    def __init__(self, grammar: Grammar) -> None:
        self.letter = ["?"] * len(grammar.words)
        self.topic = [-1] * len(grammar.words)  # -1: a function word, at home in every topic
        for letter, words in FUNCTION_CLASSES.items():
            for word in words:
                self.letter[grammar.ids[word]] = letter
        for topic, lists in enumerate(grammar.topics):
            for kind, ids in lists.items():  # noun, verb, adjective
                for i in ids:
                    self.letter[i], self.topic[i] = kind[0].upper(), topic

    def parses(self, sentence: list[int]) -> bool:
        return SENTENCE.fullmatch("".join(self.letter[i] for i in sentence)) is not None

    def one_topic(self, sentence: list[int]) -> bool:
        return len({self.topic[i] for i in sentence} - {-1}) == 1

    def score(self, sentence: list[int]) -> float:
        """1 for a sentence the grammar could write, 0.5 for one that parses but mixes
        topics, 0 for one that does not parse."""
        return 0.5 * self.parses(sentence) * (1 + self.one_topic(sentence))


@dataclass
class Settings:
    """The run's sizes and hyperparameters (each one a command-line flag)."""

    steps: int = field(default=100, metadata={"help": "GRPO steps"})
    prompts: int = field(default=8, metadata={"help": "prompts per step"})
    group: int = field(default=8, metadata={"help": "completions per prompt (G)"})
    length: int = field(default=14, metadata={"help": "most tokens per completion"})
    epochs: int = field(default=2, metadata={"help": "optimizer steps per sampled batch"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature T"})
    lr: float = field(default=2e-3, metadata={"help": "GRPO learning rate"})
    clip: float = field(default=0.2, metadata={"help": "PPO clip range eps"})
    beta: float = field(default=0.04, metadata={"help": "weight of the KL to the reference"})
    entropy_bonus: float = field(default=0.0, metadata={"help": "weight c of the entropy"})
    pretrain_steps: int = field(default=400, metadata={"help": "supervised steps first"})
    topics: int = field(default=4, metadata={"help": "grammar topics (each adds 56 words)"})
    dim: int = field(default=64, metadata={"help": "model width D"})
    seed: int = 0
    report_every: int = field(default=10, metadata={"help": "steps per printed row"})


@dataclass
class Step:
    """What one GRPO step measured: means over its completions (reward, length) or over
    their generated tokens (KL, entropy, clipped: the share of ratios outside the clip range,
    at the last epoch)."""

    step: int
    reward: float
    kl: float
    entropy: float
    clipped: float
    length: float


MEASURES = [f.name for f in fields(Step)][1:]


@contextmanager
def threads(count: int) -> Iterator[None]:
    """Run on ``count`` CPU threads, then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pretrain(model: TinyLM, corpus: Tensor, steps: int, seed: int) -> float:
    """Supervised next-token training with ``xentkit.linear_cross_entropy``; the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    context = model.position.shape[0]
    data = batches(corpus, 16, context, torch.Generator().manual_seed(seed))
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = model.loss(*next(data))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


@torch.no_grad()
def sample(
    model: TinyLM,
    prompts: Tensor,
    group: int,
    length: int,
    temperature: float,
    stop: int,
    generator: torch.Generator,
) -> Tensor:
    """``group`` completions of each prompt, ``(prompts * group, PROMPT + length)`` at most;
    sampling stops early once every completion has written ``stop``."""
    sequences = prompts.repeat_interleave(group, 0)
    done = torch.zeros(len(sequences), dtype=torch.bool)
    for _ in range(length):
        last = model.hidden(sequences)[:, -1]
        # One position per sequence: these (prompts * group, V) logits are small.
        probs = torch.softmax(last @ model.embed.weight.T / temperature, -1)
        token = torch.multinomial(probs, 1, generator=generator)
        sequences = torch.cat([sequences, token], 1)
        done |= token[:, 0] == stop
        if done.all():
            break
    return sequences


def completion_targets(sequences: Tensor, stop: int) -> Tensor:
    """Next-token targets, ``IGNORE`` on the prompt and after each completion's first
    ``stop``: only the tokens the policy wrote, up to its sentence's end, count."""
    targets = sequences[:, 1:].clone()
    targets[:, : PROMPT - 1] = IGNORE
    written = targets[:, PROMPT - 1 :]  # a view: the masking below writes into targets
    is_stop = (written == stop).long()
    written[is_stop.cumsum(1) - is_stop > 0] = IGNORE  # a stop came strictly before
    return targets


def rewards(sequences: Tensor, stop: int, checker: Checker) -> Tensor:
    """The checker's score of each sentence that a completion ends; 0 if it never ends."""
    scores = []
    for row in sequences.tolist():
        written = row[PROMPT:]
        end = written.index(stop) + 1 if stop in written else 0
        scores.append(checker.score(row[1:PROMPT] + written[:end]) if end else 0.0)
    return torch.tensor(scores)


def log_probs(
    model: TinyLM, sequences: Tensor, targets: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Per-token log p(target) and entropy under ``model`` at temperature ``T``, from its
    hidden states and head weight (the tokens x V logits are never built)."""
    return xentkit.linear_log_probs(
        model.hidden(sequences[:, :-1]),
        model.embed.weight,
        targets,
        temperature=temperature,
        return_entropy=True,
    )


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum()


def grpo_step(
    policy: TinyLM,
    reference: TinyLM,
    optimizer: torch.optim.Optimizer,
    sequences: Tensor,
    reward: Tensor,
    stop: int,
    s: Settings,
) -> tuple[float, float, float]:
    """``s.epochs`` optimizer steps on one sampled batch; KL, entropy and the clipped share
    at the last epoch."""
    targets = completion_targets(sequences, stop)
    mask = targets != IGNORE
    grouped = reward.view(-1, s.group)
    advantage = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    advantage = advantage.view(-1, 1)  # every token of a completion shares its advantage
    with torch.no_grad():
        old, _ = log_probs(policy, sequences, targets, s.temperature)  # the sampling policy
        ref, _ = log_probs(reference, sequences, targets, s.temperature)
    for _ in range(s.epochs):
        new, entropy = log_probs(policy, sequences, targets, s.temperature)
        ratio = torch.exp(new - old)
        clipped = torch.clamp(ratio, 1 - s.clip, 1 + s.clip)
        surrogate = torch.minimum(ratio * advantage, clipped * advantage)
        kl = torch.exp(ref - new) - (ref - new) - 1
        loss = -masked_mean(surrogate - s.beta * kl + s.entropy_bonus * entropy, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    outside = ((ratio.detach() - 1).abs() > s.clip).float()
    return tuple(masked_mean(x.detach(), mask).item() for x in (kl, entropy, outside))


def run(settings: Settings | None = None, log: Callable[[str], None] | None = print) -> list[Step]:
    """Pretrain, copy the reference, then ``settings.steps`` GRPO steps: the history.

    Runs on one CPU thread (restored after): at these sizes that is the fastest, and it makes
    the numbers the same on every machine.
    """
    s = settings or Settings()
    say = log or (lambda line: None)
    with threads(1):
        torch.manual_seed(s.seed)
        grammar = Grammar(s.topics, nouns=32, verbs=16, adjectives=8, seed=s.seed)
        checker, stop = Checker(grammar), grammar.ids["."]
        policy = TinyLM(len(grammar.words), s.dim, layers=2, heads=4, context=PROMPT + s.length)
        start = time.perf_counter()
        loss = pretrain(policy, grammar.corpus(30_000), s.pretrain_steps, s.seed)
        say(
            f"pretrained {s.pretrain_steps} steps (V={len(grammar.words)}, D={s.dim}) in "
            f"{time.perf_counter() - start:.1f} s, loss {loss:.2f}; GRPO with "
            f"{s.prompts} prompts x {s.group} completions per step, T={s.temperature}"
        )
        reference = copy.deepcopy(policy).requires_grad_(False)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=s.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(s.seed)

        def new_prompts(count: int) -> Tensor:
            return torch.tensor([[stop, *grammar.sentence()[: PROMPT - 1]] for _ in range(count)])

        def show(model: TinyLM, prompts: Tensor) -> None:
            for row in sample(model, prompts, 1, s.length, s.temperature, stop, generator):
                written = row[PROMPT:].tolist()
                end = written.index(stop) + 1 if stop in written else len(written)
                score = rewards(row[None], stop, checker).item()
                prompt = grammar.decode(row[1:PROMPT].tolist())
                say(f"    {prompt} | {grammar.decode(written[:end])}   (reward {score:g})")

        examples = new_prompts(3)
        say("  before:")
        show(policy, examples)
        say(f"{'step':>6} {'reward':>7} {'KL':>7} {'entropy':>8} {'clipped':>8} {'length':>7}")
        history: list[Step] = []
        printed = 0  # steps already in a printed row
        start = time.perf_counter()
        for step in range(1, s.steps + 1):
            sequences = sample(
                policy, new_prompts(s.prompts), s.group, s.length, s.temperature, stop, generator
            )
            reward = rewards(sequences, stop, checker)
            kl, entropy, clipped = grpo_step(
                policy, reference, optimizer, sequences, reward, stop, s
            )
            length = (completion_targets(sequences, stop) != IGNORE).sum(1).float().mean()
            history.append(Step(step, reward.mean().item(), kl, entropy, clipped, length.item()))
            if step == 1 or step % s.report_every == 0 or step == s.steps:
                window, printed = history[printed:], step
                mean = {k: sum(getattr(h, k) for h in window) / len(window) for k in MEASURES}
                say(
                    f"{step:6d} {mean['reward']:7.3f} {mean['kl']:7.3f} {mean['entropy']:8.3f} "
                    f"{mean['clipped']:8.3f} {mean['length']:7.1f}"
                )
        say(
            f"  ({s.steps} steps in {time.perf_counter() - start:.1f} s; each row: the mean of "
            "the steps since the last)"
        )
        say("  after:")
        show(policy, examples)
    return history


def head_memory(tokens: int, dim: int, vocab: int, temperature: float) -> dict[str, float | None]:
    """Peak extra memory (MiB) of the head's part of a policy-gradient step, forward and
    backward (per-token log-probabilities and entropy), xentkit and the unfused torch path."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, dim, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=generator) * 0.02).requires_grad_()
    target = torch.randint(vocab, (tokens,), generator=generator)
    advantage = torch.randn(tokens, generator=generator)

    def fused() -> tuple[Tensor, Tensor]:
        return xentkit.linear_log_probs(
            hidden, weight, target, temperature=temperature, return_entropy=True
        )

    def unfused() -> tuple[Tensor, Tensor]:
        log_p = torch.log_softmax(F.linear(hidden, weight) / temperature, -1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        return log_p.gather(-1, target[:, None]).squeeze(-1), entropy

    peaks = {}
    for name, head in (
        ("xentkit.linear_log_probs", fused),
        ("F.linear + log_softmax + gather", unfused),
    ):

        def step(head=head) -> None:
            hidden.grad = weight.grad = None
            log_p, entropy = head()
            (-(log_p * advantage).mean() - 0.01 * entropy.mean()).backward()

        step()  # warm-up
        peaks[name] = peak_extra_mib(step)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag, type=type(f.default), default=f.default, help=f.metadata.get("help")
        )
    parser.add_argument("--tokens", type=int, default=2048, help="memory comparison: tokens")
    parser.add_argument("--vocab", type=int, default=32768, help="memory comparison: V")
    parser.add_argument("--head-dim", type=int, default=128, help="memory comparison: D")
    parser.add_argument("--no-compare", action="store_true", help="skip the memory comparison")
    args = parser.parse_args()
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    run(settings)
    if not args.no_compare:
        peaks = head_memory(args.tokens, args.head_dim, args.vocab, settings.temperature)
        print(
            f"head's log-probs + entropy, forward + backward: {args.tokens} tokens, "
            f"D={args.head_dim}, V={args.vocab}; peak extra memory (VmHWM):"
        )
        for name, peak in peaks.items():
            print(f"  {name:32s} {'n/a' if peak is None else f'{peak:6.0f} MiB'}")


if __name__ == "__main__":
    main()
