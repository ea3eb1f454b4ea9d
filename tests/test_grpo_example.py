"""examples/grpo_tiny_lm.py trains for real: GRPO on xentkit.linear_log_probs raises the
grammar reward, the KL to the reference stays finite and positive, and the head's log-probs
take less memory than the unfused path."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grpo_tiny_lm.py"


def _example():
    spec = importlib.util.spec_from_file_location("grpo_tiny_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_grpo_raises_the_reward_with_a_finite_positive_kl():
    grpo = _example()
    history = grpo.run(grpo.Settings(steps=40, pretrain_steps=200), log=None)
    assert [h.step for h in history] == list(range(1, 41))
    first = history[0].reward  # the pretrained policy's own completions, 8 x 8 of them
    last = sum(h.reward for h in history[-10:]) / 10
    assert first < 0.3 and last > 0.55 and last > first + 0.3, (first, last)
    assert all(math.isfinite(h.kl) and h.kl > 0 for h in history)
    assert all(0 <= h.reward <= 1 and h.length >= 1 for h in history)


def test_the_checker_scores_sentences_the_grammar_writes():
    grpo = _example()
    grammar = grpo.Grammar(4, nouns=32, verbs=16, adjectives=8, seed=1)
    checker = grpo.Checker(grammar)
    assert all(checker.score(grammar.sentence()) == 1.0 for _ in range(200))
    the, dot = grammar.ids["the"], grammar.ids["."]
    noun_0, verb_0, verb_1 = (
        grammar.topics[0]["noun"][0],
        *(t["verb"][0] for t in grammar.topics[:2]),
    )
    assert checker.score([the, noun_0, verb_0, dot]) == 1.0
    assert checker.score([the, noun_0, verb_1, dot]) == 0.5  # parses, two topics
    assert checker.score([the, verb_0, noun_0, dot]) == 0.0  # does not parse


def test_the_heads_log_probs_take_less_memory_than_the_unfused_path():
    grpo = _example()
    peaks = grpo.head_memory(tokens=4096, dim=64, vocab=32768, temperature=1.0)
    fused, unfused = peaks.values()
    if fused is None or unfused is None:
        return  # no /proc/self/clear_refs here: nothing to compare
    assert fused < unfused / 2, peaks
