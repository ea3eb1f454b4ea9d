"""xentkit.integrations.trl: TRL's fused LM head and distillation kernel on xentkit's kernels.

Three layers: the stand-ins against TRL's own kernels on random inputs (every field, values and
gradients, every option); TRL's trainers on tiny random models, run with and without the patch
from the same seed, logging the same numbers step by step; and patch()/unpatch() themselves
(idempotent, exact restoration, the version check).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

pytestmark = pytest.mark.transformers
trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: E402
from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: E402
from trl.trainer import distillation_trainer as trl_distillation  # noqa: E402
from trl.trainer import utils as trl_utils  # noqa: E402

import xentkit  # noqa: E402
from xentkit import functional  # noqa: E402
from xentkit.integrations import trl as xentkit_trl  # noqa: E402


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with TRL's own kernels in place."""
    xentkit_trl.unpatch()
    yield
    xentkit_trl.unpatch()


FIELDS = ("log_probs", *xentkit_trl.OPTIONAL_OUTPUTS)


def _close(actual: torch.Tensor | None, expected: torch.Tensor | None, name: str) -> None:
    assert (actual is None) == (expected is None), name
    if expected is None:
        return
    assert actual.dtype == expected.dtype, name
    if expected.dtype == torch.bool:
        assert torch.equal(actual, expected), name
    else:
        # float32 rounding on the scale of the largest entry (a gradient's small entries are the
        # differences of large ones)
        atol = 2e-6 * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(actual, expected, rtol=2e-5, atol=atol, msg=name)


# ----------------------------------------------------------------------------------------------
# The stand-ins against TRL's kernels
# ----------------------------------------------------------------------------------------------

LOG_PROB_OPTIONS = list(itertools.product((1.0, 0.7), (1.0, 0.5), (None, 3.0), (False, True)))


def _head(n: int, d: int, v: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.25
    # Two pairs of equal rows: their logits tie exactly, so the first-argmax rule of is_top1 counts.
    weight[7] = weight[3]
    weight[11] = weight[5]
    b = torch.randn(v, generator=g) if bias else None
    if b is not None:
        b[7], b[11] = b[3], b[5]
    target = torch.randint(v, (n,), generator=g)
    # The tied rows as targets: row 3 before row 7 (top-1 when it is the max), row 11 after row 5.
    target[:4] = torch.tensor([3, 7, 5, 11])
    # Tokens whose hidden state points at a tied row, so that the tie is the maximum.
    hidden[:2] = weight[3] * 4
    hidden[2:4] = weight[5] * 4
    return hidden, weight, b, target


@pytest.mark.parametrize("temperature, logit_scale, softcap, bias", LOG_PROB_OPTIONS)
def test_log_prob_head_equals_trl(temperature, logit_scale, softcap, bias):
    hidden, weight, b, target = _head(37, 16, 300, bias)
    params = [t.requires_grad_() for t in (hidden, weight, b) if t is not None]
    # TRL tiles the vocabulary by chunk_size: 128 makes three tiles of 300.
    args = (target, temperature, 128, softcap, logit_scale, xentkit_trl.OPTIONAL_OUTPUTS)
    expected = ChunkedLogProbFunction.apply(hidden, weight, b, *args)
    actual = xentkit_trl.LogProbHead.apply(hidden, weight, b, *args)
    for name, a, e in zip(FIELDS, actual, expected, strict=True):
        _close(a, e, name)
    assert expected[4][:4].tolist() == [True, False, True, False]  # the ties counted as TRL does
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(2, 37, generator=g)

    def grads(out):
        loss = (weights[0] * out[0]).sum() + (weights[1] * out[1]).sum()
        return torch.autograd.grad(loss, params)

    names = ("hidden", "weight", "bias")[: len(params)]
    for name, a, e in zip(names, grads(actual), grads(expected), strict=True):
        _close(a, e, f"grad of {name}")


@pytest.mark.parametrize(
    "outputs", [("log_probs",), ("log_probs", "entropy", "is_top1"), ("mean_logits",)]
)
def test_log_prob_head_computes_only_the_fields_asked_for(outputs):
    hidden, weight, b, target = _head(9, 8, 50, bias=False)
    hidden.requires_grad_()
    args = (hidden, weight, b, target, 1.0, 32, None, 1.0, outputs)
    expected = ChunkedLogProbFunction.apply(*args)
    actual = xentkit_trl.LogProbHead.apply(*args)
    for name, a, e in zip(FIELDS, actual, expected, strict=True):
        _close(a, e, name)
    # Only the log-probabilities need a gradient: the entropy's is never materialised as zeros.
    (g_actual,) = torch.autograd.grad(actual[0].sum(), hidden)
    (g_expected,) = torch.autograd.grad(expected[0].sum(), hidden)
    _close(g_actual, g_expected, "grad of hidden")


DIVERGENCE_OPTIONS = [
    # beta, temperature, student logit scale, teacher logit scale, biases
    (0.0, 1.0, 1.0, 1.0, False),
    (1.0, 1.0, 1.0, 1.0, False),
    (0.5, 1.0, 1.0, 1.0, False),
    (0.3, 0.7, 1.0, 1.0, True),
    (0.0, 0.7, 0.5, 2.0, True),
    (1.0, 1.3, 1.0, 0.5, False),
    (0.5, 0.7, 0.5, 2.0, True),
]


@pytest.mark.parametrize(
    "beta, temperature, student_scale, teacher_scale, bias", DIVERGENCE_OPTIONS
)
def test_divergence_head_equals_trl(beta, temperature, student_scale, teacher_scale, bias):
    g = torch.Generator().manual_seed(0)
    n, d_s, d_t, v = 29, 12, 20, 260
    h_s, w_s = torch.randn(n, d_s, generator=g), torch.randn(v, d_s, generator=g) / d_s**0.25
    h_t, w_t = torch.randn(n, d_t, generator=g), torch.randn(v, d_t, generator=g) / d_t**0.25
    b_s, b_t = (torch.randn(v, generator=g), torch.randn(v, generator=g)) if bias else (None, None)
    student_params = [t.requires_grad_() for t in (h_s, w_s, b_s) if t is not None]
    teacher_params = [t.requires_grad_() for t in (h_t, w_t, b_t) if t is not None]
    args = (h_s, w_s, b_s, h_t, w_t, b_t, beta, temperature, student_scale, None, teacher_scale)
    expected = ChunkedDivergenceFunction.apply(*args)
    actual = xentkit_trl.DivergenceHead.apply(*args)
    _close(actual[0], expected[0], "divergence")
    _close(actual[1], expected[1], "entropy")
    assert not actual[1].requires_grad
    weights = torch.randn(n, generator=g)

    def grads(out):
        params = student_params + teacher_params
        return torch.autograd.grad((weights * out[0]).sum(), params, allow_unused=True)

    names = ["student hidden", "student weight", "student bias"][: len(student_params)]
    names += ["teacher hidden", "teacher weight", "teacher bias"][: len(teacher_params)]
    for name, a, e in zip(names, grads(actual), grads(expected), strict=True):
        _close(a, e, f"grad of {name}")  # None for the teacher's, as TRL gives it no gradient


@pytest.mark.parametrize("capped", ["student", "teacher"])
def test_divergence_head_refuses_softcapping(capped):
    h, w = torch.randn(3, 4), torch.randn(10, 4)
    caps = (2.0, None) if capped == "student" else (None, 2.0)
    args = (h, w, None, h, w, None, 0.5, 1.0, 1.0, caps[0], 1.0, caps[1])
    with pytest.raises(NotImplementedError, match=f"the {capped} config sets final_logit_soft"):
        xentkit_trl.DivergenceHead.apply(*args)


def test_log_prob_head_in_bfloat16_returns_float32_as_trl():
    """A bfloat16 head outside autocast: the products in bfloat16, the outputs float32 (not
    rounded to bfloat16), as TRL's."""
    hidden, weight, b, target = _head(37, 16, 300, bias=True)
    hidden, weight, b = (t.bfloat16().requires_grad_() for t in (hidden, weight, b))
    args = (hidden, weight, b, target, 0.7, 128, 3.0, 0.5, xentkit_trl.OPTIONAL_OUTPUTS)
    expected = ChunkedLogProbFunction.apply(*args)
    actual = xentkit_trl.LogProbHead.apply(*args)
    for name, a, e in zip(FIELDS, actual, expected, strict=True):
        if e is None or e.dtype == torch.bool:
            continue
        assert a.dtype == e.dtype == torch.float32, name
        # the bfloat16 products of the two kernels round in different orders
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-2, msg=name)
    grads = [torch.autograd.grad(out[0].sum(), hidden)[0] for out in (actual, expected)]
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(grads[0], grads[1], rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------------------------
# TRL's trainers, with and without the patch
# ----------------------------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(90)]


def _tokenizer():
    """A word-level tokenizer built in memory: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate([*specials, *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def _model(tokenizer, seed: int, **config):
    """A 2-layer Llama with hidden size 32, randomly initialised from ``seed``."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )
    return transformers.LlamaForCausalLM(config)


def _texts(count: int, words: int, seed: int, doubled: bool = False) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(count):
        ids = torch.randint(len(WORDS), (words,), generator=g).tolist()
        if doubled:  # every word twice: a tied-embedding model predicts half of them at init
            ids = [i for i in ids for _ in range(2)]
        texts.append(" ".join(WORDS[i] for i in ids))
    return texts


COMMON = {
    "max_steps": 3,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": [],
    "use_cpu": True,
    "seed": 0,
    "bf16": False,
    "disable_tqdm": True,
    "learning_rate": 1e-2,
    "dataloader_num_workers": 0,
}


def _run(train, patched: bool, monkeypatch) -> tuple[list[dict], int]:
    """``train()``'s log history, with or without the patch, and how many times a xentkit kernel
    served TRL."""
    calls = []

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return wrapper

    with monkeypatch.context() as m:
        if hasattr(functional, "linear_head_outputs"):
            m.setattr(functional, "linear_head_outputs", counted(functional.linear_head_outputs))
        if hasattr(xentkit, "linear_distillation_loss"):
            m.setattr(
                xentkit, "linear_distillation_loss", counted(xentkit.linear_distillation_loss)
            )
        if patched:
            xentkit_trl.patch()
        try:
            history = train()
        finally:
            xentkit_trl.unpatch()
    return [row for row in history if "loss" in row], len(calls)


def _same_logs(train, keys: tuple[str, ...], monkeypatch) -> None:
    expected, trl_calls = _run(train, False, monkeypatch)
    actual, xentkit_calls = _run(train, True, monkeypatch)
    assert trl_calls == 0 and xentkit_calls > 0
    assert len(actual) == len(expected) == COMMON["max_steps"]
    for step, (a, e) in enumerate(zip(actual, expected, strict=True), 1):
        for key in keys:
            assert math.isclose(a[key], e[key], rel_tol=1e-5, abs_tol=1e-6), (step, key, a, e)


def test_sft_trainer_logs_the_same_loss_entropy_and_accuracy(tmp_path, monkeypatch):
    tokenizer = _tokenizer()
    dataset = datasets.Dataset.from_dict({"text": _texts(12, 6, seed=1, doubled=True)})

    def train():
        args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, **COMMON)
        model = _model(tokenizer, seed=0, tie_word_embeddings=True)
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.train()
        return trainer.state.log_history

    expected, _ = _run(train, False, monkeypatch)
    assert all(0 < row["mean_token_accuracy"] < 1 for row in expected)  # the test means something
    _same_logs(train, ("loss", "grad_norm", "entropy", "mean_token_accuracy"), monkeypatch)


def test_grpo_trainer_logs_the_same_loss_and_entropy(tmp_path, monkeypatch):
    tokenizer = _tokenizer()
    dataset = datasets.Dataset.from_dict({"prompt": _texts(8, 5, seed=2)})

    def reward(completions, **kwargs):
        return [float(len(completion)) for completion in completions]

    # With a KL term GRPO loads its reference model by name: the policy is saved, not downloaded.
    policy = tmp_path / "policy"
    _model(tokenizer, seed=0).save_pretrained(policy)

    def train():
        args = trl.GRPOConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=4,
            temperature=0.7,
            # a KL term: the reference model's fused head runs too, and the loss is not zero
            beta=0.1,
            use_vllm=False,
            **COMMON,
        )
        trainer = trl.GRPOTrainer(
            model=str(policy),
            reward_funcs=reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        return trainer.state.log_history

    _same_logs(train, ("loss", "grad_norm", "entropy", "kl", "reward"), monkeypatch)


def test_distillation_trainer_logs_the_same_loss_and_entropy(tmp_path, monkeypatch):
    tokenizer = _tokenizer()
    dataset = datasets.Dataset.from_dict({"prompt": _texts(8, 5, seed=3)})

    def train():
        args = trl.DistillationConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            max_completion_length=4,
            beta=0.5,
            temperature=0.9,
            use_vllm=False,
            **COMMON,
        )
        trainer = trl.DistillationTrainer(
            model=_model(tokenizer, seed=0),
            teacher_model=_model(tokenizer, seed=7),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        return trainer.state.log_history

    _same_logs(train, ("loss", "grad_norm", "entropy"), monkeypatch)


def test_fused_lm_head_output_equals_trl(monkeypatch):
    """``add_fused_lm_head`` (what DPO, KTO and RLOO call too): every field of its output, with a
    soft-capped, scaled head, ignored labels and ``num_items_in_batch``."""
    tokenizer = _tokenizer()
    model = _model(tokenizer, seed=0, final_logit_softcapping=2.0, logit_scale=0.5)
    outputs = ("log_probs", *xentkit_trl.OPTIONAL_OUTPUTS)
    trl_utils.add_fused_lm_head(model, temperature=0.8, outputs=outputs)
    ids = torch.randint(4, len(tokenizer), (3, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(10) < 3, -100)

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True, num_items_in_batch=11)
        (out.loss + out.entropy.sum()).backward()
        return out, [p.grad.clone() for p in model.parameters()]

    expected, expected_grads = run()
    xentkit_trl.patch()
    actual, actual_grads = run()
    for name in ("loss", *outputs, "label_mask"):
        _close(getattr(actual, name), getattr(expected, name), name)
    for a, e in zip(actual_grads, expected_grads, strict=True):
        _close(a, e, "parameter gradient")


# ----------------------------------------------------------------------------------------------
# patch() and unpatch()
# ----------------------------------------------------------------------------------------------

SITES = (
    (trl_utils, "_ChunkedLogProbFunction", ChunkedLogProbFunction),
    (trl_distillation, "ChunkedDivergenceFunction", ChunkedDivergenceFunction),
)


def test_patch_is_idempotent_and_unpatch_restores_trl_exactly():
    assert not xentkit_trl.is_patched()
    xentkit_trl.patch()
    xentkit_trl.patch(chunk_size=64)
    assert xentkit_trl.is_patched()
    assert trl_utils._ChunkedLogProbFunction is xentkit_trl.LogProbHead
    assert trl_distillation.ChunkedDivergenceFunction is xentkit_trl.DivergenceHead
    # TRL's kernels themselves stay where TRL defines them
    assert trl.kernels.ChunkedLogProbFunction is ChunkedLogProbFunction
    xentkit_trl.unpatch()
    xentkit_trl.unpatch()
    assert not xentkit_trl.is_patched()
    for module, name, kernel in SITES:
        assert getattr(module, name) is kernel


def test_patch_refuses_a_site_another_patch_replaced(monkeypatch):
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", object())
    with pytest.raises(RuntimeError, match=r"_ChunkedLogProbFunction.*something else replaced it"):
        xentkit_trl.patch()
    assert not xentkit_trl.is_patched()
    assert trl_distillation.ChunkedDivergenceFunction is ChunkedDivergenceFunction


def test_unpatch_refuses_to_undo_a_later_patch(monkeypatch):
    xentkit_trl.patch()
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", object())
    with pytest.raises(RuntimeError, match=r"replaced by .* after xentkit\.integrations"):
        xentkit_trl.unpatch()
    monkeypatch.undo()  # the later patch undone: unpatch works
    xentkit_trl.unpatch()
    for module, name, kernel in SITES:
        assert getattr(module, name) is kernel


@pytest.mark.parametrize("version", ["1.15.2", "1.17.0", "2.0.0", "1.17.0.dev0"])
def test_patch_refuses_an_unsupported_trl(monkeypatch, version):
    monkeypatch.setattr(trl, "__version__", version)
    with pytest.raises(RuntimeError, match=rf"trl{xentkit_trl.SUPPORTED}, but trl {version}") as e:
        xentkit_trl.patch()
    assert "pip install" in str(e.value)
    assert not xentkit_trl.is_patched()
    for module, name, kernel in SITES:
        assert getattr(module, name) is kernel


@pytest.mark.parametrize("version", ["1.16.0", "1.16.3", "1.16.1.dev0"])
def test_supported_versions(version):
    xentkit_trl.check_version(version)


def test_installed_trl_is_supported():
    xentkit_trl.check_version()


def test_patch_refuses_a_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        xentkit_trl.patch(chunk_size=0)
    assert not xentkit_trl.is_patched()


def test_zero3_partitioned_head_is_refused():
    weight = torch.randn(10, 4)
    weight.ds_id = 3  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        xentkit_trl.LogProbHead.apply(
            torch.randn(2, 4), weight, None, torch.zeros(2).long(), 1.0, 8
        )


# ----------------------------------------------------------------------------------------------
# The benchmark's providers time the same maths
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", ["LOG_PROBS", "DISTILL"])
def test_benchmark_providers_compute_the_same_gradients(suite):
    bench_trl = pytest.importorskip("benchmarks.bench_trl")
    from benchmarks.harness import Shape

    suite = getattr(bench_trl, suite)
    results, shape = {}, Shape(6, 4, 10)
    for provider in suite.providers:
        if provider != "floor":
            torch.manual_seed(0)
            results[provider] = suite.build(provider, shape, torch.float32, "eager").step()
    for provider, value in results.items():
        expected = results["trl-entropy" if provider.endswith("-entropy") else "trl"]
        for got, want in zip(value, expected, strict=True):
            torch.testing.assert_close(got, want, msg=provider)


def test_the_readme_block_runs(tmp_path, monkeypatch):
    """The README's TRL block, with a tiny model saved here in place of the hub's."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("## TRL\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    tokenizer = _tokenizer()
    model_dir = tmp_path / "model"
    _model(tokenizer, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    assert '"Qwen/Qwen2.5-0.5B"' in code
    code = code.replace('"Qwen/Qwen2.5-0.5B"', repr(str(model_dir)))
    # TRL's configs default to bfloat16 mixed precision, which a CPU-only machine refuses.
    code = code.replace("report_to=[],", "report_to=[], use_cpu=True, bf16=False,")
    monkeypatch.chdir(tmp_path)
    calls = []
    head_outputs = functional.linear_head_outputs
    monkeypatch.setattr(
        functional, "linear_head_outputs", lambda *a, **k: calls.append(1) or head_outputs(*a, **k)
    )
    exec(compile(code, "README.md", "exec"), {})
    assert calls and not xentkit_trl.is_patched()
