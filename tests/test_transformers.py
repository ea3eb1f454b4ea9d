"""xentkit.integrations.transformers: patched causal LMs train exactly as unpatched ones.

Tiny randomly initialised models built from configs (no downloads): Llama (untied head), Qwen2
(tied), Gemma 2 (tied, final-logit soft-capping), GPT-2 (tied, Conv1D blocks, ``transformer``
prefix) and Phi (a head with a bias), alone or wrapped by PEFT with LoRA adapters. The unpatched
model is the spec.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

import xentkit  # noqa: E402
from xentkit.integrations.transformers import is_patched, patch, unpatch  # noqa: E402

pytestmark = pytest.mark.transformers

VOCAB = 211


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: threads only add overhead, and CI's two cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(arch: str):
    common = dict(vocab_size=VOCAB, initializer_range=0.2, pad_token_id=0)
    decoder = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **common,
    )
    if arch == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=False, **decoder)
    if arch == "qwen2":
        return transformers.Qwen2Config(tie_word_embeddings=True, **decoder)
    if arch == "gemma2":
        # A cap near the logits' size, so capping changes the loss (Gemma 2 itself uses 30).
        return transformers.Gemma2Config(head_dim=8, final_logit_softcapping=2.0, **decoder)
    if arch == "phi":
        return transformers.PhiConfig(**decoder)
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, **common
        )
    if arch == "cohere":
        return transformers.CohereConfig(**decoder)
    if arch == "bart":
        return transformers.BartConfig(
            d_model=32,
            decoder_layers=2,
            decoder_attention_heads=4,
            decoder_ffn_dim=64,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=64,
            **common,
        )
    if arch == "electra":
        return transformers.ElectraConfig(embedding_size=16, **decoder)
    if arch == "mixtral":
        return transformers.MixtralConfig(num_local_experts=2, num_experts_per_tok=1, **decoder)
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "gemma2", "gpt2", "phi"]


def _model(arch: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        _config(arch), attn_implementation="eager", dtype=dtype
    )
    return model.train()


@functools.cache
def _shared_llama():
    return _model("llama")


def _batch(batch: int = 3, length: int = 10, pads: tuple[int, ...] = (0, 4, 7), left=False):
    """Token ids, attention mask and labels (-100 on padding) of a padded batch."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads[:batch]):
        pad = min(pad, length - 1)
        if pad:
            (mask[row, :pad] if left else mask[row, length - pad :]).zero_()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _loss_and_grads(model, **inputs):
    """The loss and the gradient of every parameter that gets one (none when nothing trains)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks in both runs
    loss = model(**inputs).loss
    if loss.requires_grad:
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(actual, expected, rtol=1e-4, atol=1e-6):
    """Two ``(loss, grads)`` pairs of :func:`_loss_and_grads` agree: dtype, value, gradients."""
    (loss, grads), (expected_loss, expected_grads) = actual, expected
    torch.testing.assert_close(loss, expected_loss, rtol=rtol, atol=atol, equal_nan=True)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, expected_grads[name], rtol=rtol, atol=atol, equal_nan=True, msg=name
        )


def _assert_same_training(model, inputs, rtol=1e-4, atol=1e-6, check=True):
    """Patching ``model`` keeps its loss and gradients; returns the patched run's gradients."""
    expected = _loss_and_grads(model, **inputs)
    patch(model, check=check)
    actual = _loss_and_grads(model, **inputs)
    _assert_same(actual, expected, rtol, atol)
    return actual[1]


@pytest.mark.parametrize("num_items", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_every_gradient_match_the_unpatched_model(arch, num_items):
    inputs = _batch()
    if num_items:
        # As Trainer passes it under gradient accumulation: tokens counted over all micro-batches.
        inputs["num_items_in_batch"] = torch.tensor(3 * int((inputs["labels"] != -100).sum()))
    _assert_same_training(_model(arch), inputs)


@given(
    batch=st.integers(1, 3),
    length=st.integers(2, 9),
    pads=st.tuples(*[st.integers(0, 9)] * 3),
    left=st.booleans(),
    num_items=st.one_of(st.none(), st.integers(1, 50)),
)
def test_padded_batches_of_any_shape(batch, length, pads, left, num_items):
    inputs = _batch(batch, length, pads, left)
    if num_items is not None:
        inputs["num_items_in_batch"] = num_items
    _assert_same_training(unpatch(_shared_llama()), inputs, check=False)


def test_a_fully_ignored_batch_gives_nan_like_transformers():
    model = _model("qwen2")
    inputs = _batch()
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    expected = model(**inputs).loss
    assert torch.isnan(expected)
    assert torch.isnan(patch(model)(**inputs).loss)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_optimizer_steps_give_the_same_parameters(arch):
    reference_model = _model(arch)
    model = patch(copy.deepcopy(reference_model))
    for m in (reference_model, model):
        # SGD, not Adam: Adam rescales gradients that are rounding noise around zero (GPT-2's key
        # bias) to full-size steps, in either implementation.
        optimizer = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
        for step in range(3):
            optimizer.zero_grad()
            torch.manual_seed(step)  # the same dropout masks in both models
            m(**_batch(pads=(step, 2, 5))).loss.backward()
            optimizer.step()
    for (name, p), q in zip(reference_model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_without_labels_the_model_is_unchanged(arch):
    model = _model(arch).eval()
    ids = _batch(batch=2)["input_ids"][:, :5]
    expected_logits = model(ids).logits
    expected = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    patch(model)
    assert torch.equal(model(ids).logits, expected_logits)
    assert torch.equal(
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0), expected
    )


def test_the_full_logits_are_never_built():
    model = patch(_model("llama"))
    out = model(**_batch())
    assert out.logits is None and out.loss.requires_grad
    assert out.past_key_values is not None  # everything else is the decoder's, as unpatched


def test_unpatch_restores_the_model():
    model = _model("gpt2").eval()
    inputs = _batch()
    expected = model(**inputs)
    assert not is_patched(model) and unpatch(model) is model  # unpatching twice is harmless
    assert patch(model) is model and is_patched(model)
    assert unpatch(model) is model and not is_patched(model)
    assert "forward" not in model.__dict__
    out = model(**inputs)
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)


def test_patching_again_replaces_the_options():
    model = patch(_model("llama"), z_loss=1.0)
    inputs = _batch()
    with_z = model(**inputs).loss
    patch(model)
    assert model(**inputs).loss < with_z


def test_an_instance_forward_set_before_patching_is_kept_and_restored():
    model = _model("llama")
    calls = []

    def hooked(*args, **kwargs):  # what accelerate-style hooks do to an instance
        calls.append(1)
        return type(model).forward(model, *args, **kwargs)

    model.forward = hooked
    patch(model)
    calls.clear()  # the check at patch time ran the model once
    model(_batch()["input_ids"])
    assert calls == [1]
    unpatch(model)
    assert model.forward is hooked


def test_a_deep_copy_of_a_patched_model_trains_its_own_parameters():
    model = patch(_model("llama"))
    twin = copy.deepcopy(model)
    twin(**_batch()).loss.backward()
    assert is_patched(twin)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in twin.parameters())


def test_the_signature_is_the_models_own():
    import inspect

    model = _model("llama")
    expected = inspect.signature(model.forward)
    assert inspect.signature(patch(model).forward) == expected


def test_return_dict_false_gives_a_tuple_led_by_the_loss():
    model = _model("llama")
    inputs = _batch()
    expected = model(**inputs).loss
    out = patch(model)(**inputs, return_dict=False, use_cache=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], expected)


@pytest.mark.parametrize("keep", ["int", "mask"])
def test_logits_to_keep_with_shift_labels(keep):
    model = _model("llama")
    inputs = _batch()
    labels = inputs["labels"]
    if keep == "int":
        logits_to_keep = 4
        shift_labels = labels[:, -4:].contiguous()
    else:
        logits_to_keep = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2)) < 0.5
        shift_labels = labels[logits_to_keep]
    inputs.update(logits_to_keep=logits_to_keep, shift_labels=shift_labels)
    _assert_same_training(model, inputs)


def test_logits_to_keep_without_matching_labels_is_refused():
    model = patch(_model("llama"))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(**_batch(), logits_to_keep=1)


@pytest.mark.parametrize("options", [dict(z_loss=1e-2), dict(label_smoothing=0.1)])
def test_loss_options_reach_the_fused_loss(options):
    model = _model("gemma2")
    inputs = _batch()
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    labels = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
    # The unpatched logits are already soft-capped, so no softcap here.
    expected = xentkit.cross_entropy(logits.flatten(0, 1), labels.flatten(), **options)
    torch.testing.assert_close(patch(model, **options)(**inputs).loss, expected)


# transformers rounds the bfloat16 logits before it upcasts them, xentkit accumulates them in
# float32: the losses differ by at most a bfloat16 rounding (2**-8 relative), gradients by a few.
BF16_LOSS = dict(rtol=2**-8, atol=0.0)
BF16_GRAD = dict(rtol=2e-2, atol=2e-2)


def _assert_half_precision_training(model, inputs, context=contextlib.nullcontext):
    """A float32 loss, as transformers returns it, equal to the unpatched one in bfloat16."""
    with context():
        expected = _loss_and_grads(model, **inputs)
    patch(model)
    with context():
        actual = _loss_and_grads(model, **inputs)
    assert actual[0].dtype == expected[0].dtype == torch.float32
    torch.testing.assert_close(actual[0], expected[0], **BF16_LOSS)
    for name, grad in actual[1].items():
        # Relative to the gradient's size: LoRA's A gets a small gradient from a zero-mean one.
        scale = expected[1][name].abs().max()
        torch.testing.assert_close(grad / scale, expected[1][name] / scale, **BF16_GRAD, msg=name)


def test_mixed_precision_under_autocast():
    model = _model("llama")
    _assert_half_precision_training(
        model, _batch(), functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    )


def test_bfloat16_weights():
    _assert_half_precision_training(_model("gemma2", torch.bfloat16), _batch())


def test_gradcheck_float64():
    """Gradients of the patched loss with respect to the head, through soft-capping, in float64.

    The decoders upcast inside (RMSNorm computes in float32), so the check runs over the
    head's weight and bias with the decoder's output fixed.
    """
    config = _config("gemma2")
    config.update(dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, vocab_size=11))
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float64
    )
    model.lm_head = torch.nn.Linear(8, 11, dtype=torch.float64)  # with a bias
    patch(model)
    inputs = dict(input_ids=torch.tensor([[3, 5, 7, 2]]), labels=torch.tensor([[3, -100, 7, 2]]))

    def loss(weight, bias):
        params = {"lm_head.weight": weight, "lm_head.bias": bias}
        return torch.func.functional_call(model, params, kwargs=inputs).loss

    head = [model.lm_head.weight.detach().clone().requires_grad_(), model.lm_head.bias.detach()]
    head[1] = head[1].clone().requires_grad_()
    assert torch.autograd.gradcheck(loss, tuple(head))


def test_trainer_with_gradient_accumulation(tmp_path):
    """Trainer passes num_items_in_batch; patched and unpatched runs end at the same weights."""

    pytest.importorskip("accelerate")  # Trainer needs it; the transformers extra does not

    def train(model):
        rows = [{k: v[0] for k, v in _batch(1, 8, (n % 4,)).items()} for n in range(4)]
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=1,
            gradient_accumulation_steps=2,
            max_steps=2,
            learning_rate=1e-3,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        transformers.Trainer(model=model, args=args, train_dataset=rows).train()
        return model

    expected = train(_model("qwen2"))
    patched = train(patch(_model("qwen2")))
    for (name, p), q in zip(expected.named_parameters(), patched.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


# Refusals: each names what is wrong and what to do.


def test_a_head_that_is_not_linear_is_refused():
    model = _model("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(TypeError, match=r"Sequential, neither an nn\.Linear"):
        patch(model)
    assert not is_patched(model)


def test_a_model_without_a_separate_decoder_is_refused():
    class Bare(torch.nn.Module):
        def get_output_embeddings(self):
            return torch.nn.Linear(4, 5)

    with pytest.raises(TypeError, match="no decoder"):
        patch(Bare())


@pytest.mark.parametrize(
    ("arch", "match"),
    [
        ("cohere", "logits are not lm_head"),  # logits * config.logit_scale
        ("bart", "its forward adds to or changes"),  # BartForCausalLM does not shift its labels
        ("electra", "head takes 16 features"),  # a prediction-head transform before lm_head
    ],
)
def test_a_model_whose_loss_is_not_the_fused_one_is_refused(arch, match):
    model = _model(arch)
    with pytest.raises(ValueError, match=match):
        patch(model)
    assert not is_patched(model)
    assert patch(model, check=False) is model  # the caller's decision


def test_a_mixture_of_experts_auxiliary_loss_is_refused():
    model = _model("mixtral")
    inputs = _batch()
    _assert_same_training(model, inputs)  # without the router loss: same loss and gradients
    with pytest.raises(NotImplementedError, match="output_router_logits=False"):
        model(**inputs, output_router_logits=True)
    model.config.output_router_logits = True
    with pytest.raises(NotImplementedError, match="load-balancing"):
        patch(model)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(reduction="sum"), TypeError, "unexpected loss option 'reduction'"),
        (dict(softcap=30.0), TypeError, "final_logit_softcapping"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(label_smoothing=2.0), RuntimeError, "label_smoothing"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_loss_options_are_refused_at_patch_time(options, error, match):
    model = _model("llama")
    with pytest.raises(error, match=match):
        patch(model, **options)
    assert not is_patched(model)
    patch(model, z_loss=1e-3)
    with pytest.raises(error, match=match):
        patch(model, **options)
    assert model.__dict__["_xentkit_patch"].options == dict(z_loss=1e-3)  # the patch is kept


# PEFT: LoRA adapters on the decoder and on the head. init_lora_weights=False starts B away from
# zero, so the head's adapter changes the loss and A gets a gradient (PEFT's default B = 0 would
# hide a wrong LoRA term).

LORA_TARGETS = {
    "llama": ["q_proj", "v_proj", "lm_head"],
    "qwen2": ["q_proj", "lm_head"],  # the head tied to the input embeddings
    "gpt2": ["c_attn", "lm_head"],  # Conv1D blocks (fan_in_fan_out), a tied head
    "phi": ["dense", "lm_head"],  # a head with a bias
}


def _lora_config(targets, **options):
    peft = pytest.importorskip("peft")
    options = dict(r=4, init_lora_weights=False, fan_in_fan_out="c_attn" in targets) | options
    # task_type gives a PeftModelForCausalLM, whose forward passes its own arguments down.
    return peft.LoraConfig(target_modules=targets, task_type="CAUSAL_LM", **options)


def _peft_model(arch="llama", dtype=torch.float32, targets=None, **options):
    peft = pytest.importorskip("peft")
    config = _lora_config(targets or LORA_TARGETS[arch], **options)
    return peft.get_peft_model(_model(arch, dtype), config).train()


@pytest.mark.parametrize(
    ("arch", "targets", "dropout"),
    [
        ("llama", ["q_proj", "v_proj"], 0.0),  # the head untouched
        ("llama", None, 0.0),
        ("llama", None, 0.1),  # the head's LoRA dropout, with the same mask as PEFT's
        ("qwen2", None, 0.0),
        ("gpt2", None, 0.0),
        ("phi", None, 0.0),
    ],
)
def test_lora_loss_and_every_trainable_gradient_match_the_unpatched_model(arch, targets, dropout):
    model = _peft_model(arch, targets=targets, lora_dropout=dropout)
    grads = _assert_same_training(model, _batch())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == trainable  # the LoRA factors, and no frozen base weight
    if targets is None:
        assert any(".lm_head.lora_A." in name for name in grads)


@pytest.mark.parametrize("which", ["PeftModel", "LoraModel", "transformers model", "unwrapped"])
def test_patch_and_unpatch_through_any_layer_of_a_peft_model(which):
    peft = pytest.importorskip("peft")
    if which == "unwrapped":  # patched first, then wrapped: the head becomes LoRA later
        target = patch(_model("llama"))
        model = peft.get_peft_model(target, _lora_config(LORA_TARGETS["llama"])).train()
    else:
        model = _peft_model()
        layers = dict(zip(["PeftModel", "LoraModel"], [model, model.base_model], strict=True))
        target = layers.get(which, model.get_base_model())
        assert patch(target) is target
    layers = (model, model.base_model, model.get_base_model())
    assert all(is_patched(layer) for layer in layers)
    inputs = _batch()
    out = model(**inputs)
    assert out.logits is None and out.loss.dtype == torch.float32
    patched = _loss_and_grads(model, **inputs)
    assert unpatch(target) is target and not any(is_patched(layer) for layer in layers)
    assert model(**inputs).logits is not None
    _assert_same(patched, _loss_and_grads(model, **inputs))


@pytest.mark.parametrize(
    "state", ["two adapters", "lora_bias", "disabled", "merged", "merged and disabled"]
)
def test_every_state_of_a_lora_head(state):
    model = _peft_model(lora_bias=state == "lora_bias")
    if state == "two adapters":
        model.add_adapter("second", _lora_config(["lm_head"], r=2))
        model.base_model.set_adapter(["default", "second"])
    if state.startswith("merged"):
        model.merge_adapter()
    # Disabled, a merged head is unmerged by its first forward: each model runs once.
    patched = patch(copy.deepcopy(model))

    def run(m):
        with m.disable_adapter() if "disabled" in state else contextlib.nullcontext():
            return _loss_and_grads(m, **_batch())

    _assert_same(run(patched), run(model))


def test_lora_with_gradient_checkpointing():
    model = _peft_model()
    model.gradient_checkpointing_enable()
    layer = model.get_base_model().model.layers[0]
    calls = []
    layer.mlp.register_forward_hook(lambda *_: calls.append(1))
    _assert_same_training(model, _batch())
    assert len(calls) == 2 + 2 + 1  # each training run recomputes the layer; the check runs once


@pytest.mark.parametrize("precision", ["bfloat16 weights", "autocast"])
def test_lora_in_half_precision(precision):
    if precision == "autocast":
        context = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
        _assert_half_precision_training(_peft_model(), _batch(), context)
    else:  # PEFT keeps the adapters in float32 around the bfloat16 model
        model = _peft_model(dtype=torch.bfloat16)
        assert model.base_model.model.lm_head.lora_A["default"].weight.dtype == torch.float32
        _assert_half_precision_training(model, _batch())


def test_a_compiled_peft_model_has_no_graph_break_in_xentkit():
    model = patch(_peft_model(lora_dropout=0.0))
    inputs = _batch()
    torch._dynamo.reset()
    # The transformers model may break its graph elsewhere; the loss must not.
    explanation = torch._dynamo.explain(model)(**inputs)
    package = os.path.dirname(xentkit.__file__)
    breaks = [
        b.reason
        for b in explanation.break_reasons
        if any(frame.filename.startswith(package) for frame in b.user_stack)
    ]
    assert not breaks
    expected = _loss_and_grads(model, **inputs)
    # Dynamo, not the backend, decides where graphs break; aot_eager also traces the op's fake
    # and autograd implementations, without inductor's code generation (tested with the kernels).
    compiled = torch.compile(model, backend="aot_eager")
    model.zero_grad(set_to_none=True)
    loss = compiled(**inputs).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    _assert_same((loss.detach(), grads), expected)
    torch._dynamo.reset()


def test_a_mixed_adapter_batch_runs_the_models_own_forward():
    model = _peft_model()
    model.add_adapter("second", _lora_config(LORA_TARGETS["llama"], r=2))
    model.eval()
    inputs = dict(_batch(), adapter_names=["default", "second", "__base__"])
    expected = model(**inputs)
    out = patch(model)(**inputs)
    assert out.logits is not None  # PEFT's per-row adapters reach the head only through its hooks
    torch.testing.assert_close(out.loss, expected.loss)


@pytest.mark.parametrize(
    ("adapter", "error", "match"),
    [
        ("dora", NotImplementedError, "DoraLinearVariant"),
        ("ia3", TypeError, r"ia3\.layer\.Linear, neither an nn\.Linear"),
    ],
)
def test_an_adapter_on_the_head_that_is_not_plain_lora_is_refused(adapter, error, match):
    peft = pytest.importorskip("peft")
    if adapter == "dora":
        config = _lora_config(LORA_TARGETS["llama"], use_dora=True)
    else:
        config = peft.IA3Config(target_modules=["v_proj", "lm_head"], feedforward_modules=[])
    model = peft.get_peft_model(_model("llama"), config)
    with pytest.raises(error, match=match):
        patch(model)
    assert not is_patched(model)
    if adapter == "dora":  # per call as well, for an adapter set after patching
        with pytest.raises(error, match=match):
            patch(model, check=False)(**_batch())
