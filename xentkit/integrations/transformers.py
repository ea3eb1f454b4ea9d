"""Hugging Face ``transformers``: one call makes a causal language model train with the fused loss.

:func:`patch` replaces the ``forward`` of one ``*ForCausalLM`` instance, whatever its
architecture. Called with ``labels``, the patched forward runs the model's decoder
(``model.base_model``), takes its last hidden states and sends them, with the weight and bias of
the output embedding (``model.get_output_embeddings()``), straight into the fused op of
:func:`xentkit.linear_cross_entropy`. The ``(batch, sequence, vocabulary)`` logits are never
built, so the output's ``logits`` is None. The loss is the one ``transformers`` computes
(``ForCausalLMLoss``):

.. math:: \\text{loss} = \\frac{1}{M} \\sum_{b, t:\\, y_{b,t+1} \\ne -100}
          -\\log \\operatorname{softmax}\\big(c \\tanh(W h_{b,t} / c) \\big)_{y_{b,t+1}}

- labels are shifted left by one and padded with -100 at the end (``shift_labels``, when given,
  is used as it is);
- :math:`M` is the number of counted tokens, or ``num_items_in_batch`` when given (gradient
  accumulation: the sum over this batch divided by the count over all accumulated batches);
- :math:`c` is the config's ``final_logit_softcapping`` (Gemma 2), no capping when it has none;
- ``logits_to_keep`` selects hidden states as it would select logits.

The loss is float32, as ``transformers`` computes it from logits upcast to float32 (float64 for a
float64 model, where ``transformers`` would round it to float32). Under ``torch.autocast``, or
with bfloat16 weights, the head runs in that half dtype, as ``lm_head`` would, so the loss equals
the unpatched one within the half dtype's matmul rounding.

PEFT (0.18 or later): given a ``PeftModel`` or its ``LoraModel``, :func:`patch` patches the
``transformers`` model inside them, so PEFT's own forward still runs around the patched one
(:func:`unpatch` and :func:`is_patched` take any of the three). LoRA on the decoder's layers needs
nothing more. LoRA on the head (``target_modules=[..., "lm_head"]``) makes it
``W h + b + s B A dropout(h)`` per active adapter; the fused op computes that as one linear map
of the hidden states side by side with ``s A dropout(h)``, through ``W`` side by side with ``B``:
exact, dropout included, and the gradients reach ``A`` and ``B`` (``W`` only if it is
trainable). The price is a concatenated copy of the head's weight per call, and its whole weight
gradient. Other adapters on the head (DoRA and the other LoRA variants, IA3, LoHa, ...) are
refused. A call that passes PEFT's per-call arguments to the LoRA head (``adapter_names`` for a
batch of mixed adapters) runs the model's own forward, logits and all.

Without ``labels`` the model runs its own ``forward``, unchanged (generation, logits for
evaluation). :func:`unpatch` restores the model.

Example:
    >>> import torch, transformers
    >>> from xentkit.integrations.transformers import patch
    >>> _ = torch.manual_seed(0)
    >>> config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    >>> model = transformers.LlamaForCausalLM(config)
    >>> ids = torch.randint(128, (2, 16))
    >>> expected = model(ids, labels=ids).loss
    >>> out = patch(model)(ids, labels=ids)
    >>> out.logits is None, torch.allclose(out.loss, expected)
    (True, True)
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import xentkit
from xentkit import _checks, functional, reference

# The options of :func:`xentkit.linear_cross_entropy` that :func:`patch` passes through. The
# reduction and soft-capping are not among them: they are the model's (see the module docstring).
LOSS_OPTIONS = (
    "class_weight",
    "ignore_index",
    "label_smoothing",
    "z_loss",
    "chunk_size",
    "backend",
)
# Their defaults, read from the public function: the private one that leaves the loss in float32
# takes every argument explicitly.
_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(xentkit.linear_cross_entropy).parameters.items()
    if name in LOSS_OPTIONS
}

_STATE = "_xentkit_patch"


@dataclass(frozen=True)
class _Patch:
    """What :func:`patch` stores on the model: the loss options, the signature of the class's
    ``forward`` (read once: a cache around ``inspect.signature`` would be traced through by
    ``torch.compile`` on every call), and the instance-level ``forward`` it replaced (set by e.g.
    accelerate's hooks), restored by :func:`unpatch`."""

    options: dict[str, Any]
    signature: inspect.Signature
    replaced: Any = None


def patch(model: nn.Module, *, check: bool = True, **loss_options: Any) -> nn.Module:
    """Make ``model`` compute its loss with :func:`xentkit.linear_cross_entropy` when given labels.

    Works on any ``transformers`` causal language model built as a decoder (``base_model``)
    plus an ``nn.Linear`` output embedding (or PEFT's LoRA ``Linear`` around one), tied to the
    input embeddings or not, with or without a bias: one wrapper, no copy of any architecture's
    ``forward``. With ``labels`` the patched forward returns a ``CausalLMOutputWithPast`` whose
    ``loss`` is the model's loss, in float32 (see the module docstring), and whose ``logits`` is
    None; without labels it is the model's own ``forward``. Under ``torch.autocast`` the head
    runs in the autocast dtype, as ``lm_head`` would.

    Args:
        model: a ``*ForCausalLM`` (or ``*LMHeadModel``) instance, or a PEFT ``PeftModel`` or
            ``LoraModel`` around one; only the ``transformers`` model instance changes.
        check: before patching, run one small batch (2 x 8 random tokens, eval mode, no
            gradients) through the model and refuse it if its logits are not ``lm_head`` of the
            decoder's last hidden states (soft-capped by ``config.final_logit_softcapping``) or its
            loss is not their cross entropy. This catches architectures that scale their logits
            (Cohere's ``logit_scale``, Granite's ``logits_scaling``) or add terms to the loss.
            False skips it, for a model that cannot run a forward pass now.
        **loss_options: ``class_weight``, ``ignore_index``, ``label_smoothing``, ``z_loss``,
            ``chunk_size`` and ``backend`` of :func:`xentkit.linear_cross_entropy`; the defaults
            give the model's own loss.
    Returns:
        ``model`` itself, patched; patching a patched model replaces its options.
    Raises:
        TypeError: an unknown loss option, an output embedding that is neither an ``nn.Linear``
            nor PEFT's LoRA ``Linear`` around one, or a model with no decoder apart from its head.
        ValueError: the check found different logits or a different loss (or a loss option
            value that :func:`xentkit.linear_cross_entropy` refuses, with its error type).
        NotImplementedError: the config asks for a mixture-of-experts router loss
            (``output_router_logits``), or (found by the check) the head's active LoRA adapter
            is a variant such as DoRA; the patched forward also refuses both per call.

    Example:
        >>> import torch, transformers
        >>> from xentkit.integrations.transformers import is_patched, patch, unpatch
        >>> config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2)
        >>> model = patch(transformers.GPT2LMHeadModel(config), z_loss=1e-4)
        >>> is_patched(model), is_patched(unpatch(model))
        (True, False)

    See also :func:`unpatch`, :func:`is_patched`.
    """
    _check_options(loss_options)
    inner = _unwrap(model)
    _head(inner)
    _decoder(inner)
    unpatch(inner)  # a refused model is left unpatched
    if check:
        _check_equivalence(inner)
    _install(inner, loss_options)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the ``forward`` that :func:`patch` replaced; a model that is not patched is
    returned as it is.

    Args:
        model: a model given to :func:`patch` (or the PEFT wrappers around it, or the model
            inside them), or any ``nn.Module``.
    Returns:
        ``model`` itself.
    """
    inner = _unwrap(model)
    state = inner.__dict__.pop(_STATE, None)
    if state is None:
        return model
    if state.replaced is None:
        del inner.__dict__["forward"]
    else:
        inner.forward = state.replaced
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` has patched ``model`` (and :func:`unpatch` has not restored it);
    for a PEFT model, whether the ``transformers`` model inside it is patched."""
    return _STATE in _unwrap(model).__dict__


def _unwrap(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside PEFT's wrappers (``PeftModel`` holds a ``LoraModel``,
    which holds it; a prompt-learning ``PeftModel`` holds it directly), or ``model`` itself."""
    if "peft" not in sys.modules:  # nothing is wrapped by a library that was never imported
        return model
    from peft import PeftMixedModel, PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    while True:
        if isinstance(model, (PeftModel, PeftMixedModel)):
            model = model.base_model
        elif isinstance(model, BaseTuner):
            model = model.model
        else:
            return model


def _check_options(options: dict[str, Any]) -> None:
    for name in options:
        if name not in LOSS_OPTIONS:
            raise TypeError(
                f"patch() got an unexpected loss option {name!r}: expected some of "
                f"{', '.join(LOSS_OPTIONS)}. The reduction follows transformers (mean, or sum / "
                "num_items_in_batch) and softcap is read from config.final_logit_softcapping."
            )
    _checks.check_options(options.get("label_smoothing", 0.0), options.get("z_loss", 0.0))
    functional.resolve_backend(options.get("backend"), "linear_cross_entropy", torch.device("cpu"))


def _head(model: nn.Module) -> nn.Module:
    """The output embedding: an ``nn.Linear``, or PEFT's LoRA ``Linear`` around one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Linear) or (
        _is_lora_linear(head) and isinstance(head.base_layer, nn.Linear)
    ):
        return head
    raise TypeError(
        f"{type(model).__name__}'s output embedding (model.get_output_embeddings()) is "
        f"{type(head).__module__}.{type(head).__qualname__}, neither an nn.Linear nor PEFT's LoRA "
        "Linear around one: xentkit.linear_cross_entropy needs the head's (vocabulary, hidden) "
        "weight. Patch a causal LM whose head is an nn.Linear (with PEFT, leave the head out of "
        "target_modules or adapt it with plain LoRA), or call xentkit.linear_cross_entropy on "
        "your own head's hidden states and weight."
    )


def _is_lora_linear(module: nn.Module | None) -> bool:
    if "peft" not in sys.modules:
        return False
    from peft.tuners.lora import Linear

    # Only the forward of LoRA's own Linear is reproduced (_operands); subclasses (a quantised
    # base layer) compute theirs differently.
    return isinstance(module, Linear) and type(module).forward is Linear.forward


def _linear(head: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` of a head checked by :func:`_head`: itself, or LoRA's base layer."""
    return head if isinstance(head, nn.Linear) else head.base_layer


def _operands(head: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(input, weight, bias)`` with ``F.linear(input, weight, bias) == head(hidden)``.

    A LoRA head adds ``s_k B_k A_k dropout_k(h)`` per active adapter k to ``W h + b``: one linear
    map, the weight ``[W, B_1, B_2, ...]`` (side by side, ``V x (D + r_1 + r_2 + ...)``) applied to
    the features ``[h, s_1 A_1 dropout_1(h), ...]``. So one fused op computes it exactly, dropout
    included, and its gradients reach each ``A_k`` through the features and each ``B_k`` through
    the weight.
    """
    base = _linear(head)
    weight, bias = base.weight, base.bias
    if base is head:
        return hidden, weight, bias
    inputs, weights = [hidden], [weight]
    for lora_a, lora_b, dropout, scaling in _lora_adapters(head):
        # Each term as PEFT's forward computes it (the input in the adapter's dtype, which PEFT
        # keeps in float32 for a half-precision model), then in the base layer's dtype, to which
        # PEFT rounds the sum and in which the fused op takes all its operands.
        low_rank = lora_a(dropout(head._cast_input_dtype(hidden, lora_a.weight.dtype))) * scaling
        inputs.append(low_rank.to(hidden.dtype))
        weights.append(lora_b.weight.to(weight.dtype))
        if lora_b.bias is not None:  # lora_bias=True: B's bias, scaled like its product
            term = (lora_b.bias * scaling).to(weight.dtype)
            bias = term if bias is None else bias + term
    if len(inputs) == 1:
        return hidden, weight, bias
    return torch.cat(inputs, dim=-1), torch.cat(weights, dim=-1), bias


def _lora_adapters(head: nn.Module) -> list[tuple[nn.Module, nn.Module, nn.Module, float]]:
    """``(lora_A, lora_B, dropout, scaling)`` of each adapter that PEFT's forward of the LoRA
    ``head`` adds to its base layer now (none when disabled or merged into the base weight)."""
    if head.disable_adapters:
        if head.merged:
            head.unmerge()  # as PEFT's forward does: a disabled adapter leaves the base weight
        return []
    if head.merged:
        return []
    adapters = []
    for name in head.active_adapters:
        if name not in head.lora_A:  # an adapter that does not touch the head
            continue
        if name in head.lora_variant:
            raise NotImplementedError(
                f"The head's LoRA adapter {name!r} is a "
                f"{type(head.lora_variant[name]).__name__}: its output is not W h + s B A h, "
                "which the fused loss reproduces. Leave lm_head out of target_modules (or train "
                "it with plain LoRA), or unpatch(model)."
            )
        adapters.append(
            (head.lora_A[name], head.lora_B[name], head.lora_dropout[name], head.scaling[name])
        )
    return adapters


def _hooked_lora(head: nn.Module) -> bool:
    """Whether ``head`` is a LoRA layer with forward pre-hooks: PEFT passes per-call arguments to
    its layers that way (``adapter_names`` for a batch of mixed adapters, aLoRA's offsets), which
    the fused op, never calling the head, could not honour."""
    return not isinstance(head, nn.Linear) and bool(head._forward_pre_hooks)


def _decoder(model: nn.Module) -> nn.Module:
    # base_model follows the class's base_model_prefix; a few classes (Llama 4's text model)
    # declare a prefix they do not use and hold their decoder as `model`, the common name.
    for decoder in (getattr(model, "base_model", model), getattr(model, "model", model)):
        if isinstance(decoder, nn.Module) and decoder is not model:
            return decoder
    raise TypeError(
        f"{type(model).__name__} has no decoder apart from its head (neither model.base_model nor "
        "model.model): patch a *ForCausalLM model, which holds a base model and an lm_head."
    )


def _softcap(model: nn.Module) -> float | None:
    return getattr(model.config, "final_logit_softcapping", None)


def _install(model: nn.Module, options: dict[str, Any]) -> None:
    signature = inspect.signature(type(model).forward)
    model.__dict__[_STATE] = _Patch(dict(options), signature, model.__dict__.get("forward"))
    # A fresh function per patch that holds no reference to the model (bound with MethodType), so
    # a deep copy of a patched model calls its own decoder; `wraps` keeps the class forward's
    # signature, which generate() and Trainer inspect (logits_to_keep, **kwargs).
    model.forward = types.MethodType(_forward_like(type(model).forward), model)


def _forward_like(template: Any) -> Any:
    @functools.wraps(template)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _patched_forward(self, *args, **kwargs)

    return forward


def _check_equivalence(model: nn.Module) -> None:
    head = _head(model)
    linear = _linear(head)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(linear.out_features, (2, 8), generator=generator)
    ids = ids.to(model.get_input_embeddings().weight.device)
    labels = ids.clone()
    labels[0, :3] = -100  # a left-padded row
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        # Outside any autocast the caller is in: this checks the architecture, not precision.
        with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
            expected = model(input_ids=ids, labels=labels, return_dict=True)
            hidden = _decoder(model)(input_ids=ids)[0]
            if hidden.shape[-1] != linear.in_features:
                raise ValueError(
                    f"{type(model).__name__}'s decoder gives hidden states of size "
                    f"{hidden.shape[-1]} but its head takes {linear.in_features} features: a "
                    "layer between them (a prediction-head transform) would be skipped. Leave it "
                    "unpatched."
                )
            logits = reference.apply_softcap(head(hidden).float(), _softcap(model))
            _install(model, {})
            try:
                loss = model(input_ids=ids, labels=labels, return_dict=True).loss
            finally:
                unpatch(model)
    finally:
        for module, mode in training.items():
            module.training = mode
    theirs = expected.logits.float()
    # float32 matmuls in a different order differ by ~1e-6; half precision by its rounding.
    tol = 1e-4 if linear.weight.dtype in (torch.float32, torch.float64) else 2e-2
    name = type(model).__name__
    if logits.shape != theirs.shape or not torch.allclose(
        logits, theirs, rtol=tol, atol=tol * theirs.abs().max().item()
    ):
        raise ValueError(
            f"{name}'s logits are not lm_head(hidden states)"
            + (" soft-capped by config.final_logit_softcapping" if _softcap(model) else "")
            + " on a check batch: the architecture scales, shifts or slices them, so the fused "
            "loss would train a different model. Leave it unpatched, or pass check=False if you "
            "know the difference does not matter."
        )
    if not torch.allclose(loss.float(), expected.loss.float(), rtol=tol, atol=tol):
        raise ValueError(
            f"{name}'s loss is {expected.loss.item():.6f} on a check batch where the fused loss "
            f"is {loss.item():.6f}: its forward adds to or changes the causal-LM cross entropy "
            "(e.g. an auxiliary loss). Leave it unpatched, or pass check=False if you know the "
            "difference does not matter."
        )


def _patched_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: _Patch = self.__dict__[_STATE]
    original = state.replaced or functools.partial(type(self).forward, self)
    try:
        bound = state.signature.bind(self, *args, **kwargs)
    except TypeError:
        return original(*args, **kwargs)  # the model's own error for a call it does not accept
    arguments = dict(bound.arguments)
    del arguments["self"]
    for name, parameter in bound.signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    labels = arguments.pop("labels", None)
    if labels is None:
        return original(*args, **kwargs)
    head = _head(self)
    if _hooked_lora(head):
        return original(*args, **kwargs)

    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = arguments.pop("return_dict", None)
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    shift_labels = arguments.pop("shift_labels", None)
    _refuse_router_loss(self, arguments)
    outputs = _decoder(self)(**arguments)
    hidden = _keep(outputs[0], logits_to_keep)
    loss = _causal_lm_loss(
        self, head, hidden, labels, shift_labels, num_items_in_batch, state.options
    )
    output = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
    )
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return output if return_dict else output.to_tuple()


def _refuse_router_loss(model: nn.Module, arguments: dict[str, Any]) -> None:
    wanted = arguments.get("output_router_logits")
    if wanted is None:
        wanted = getattr(model.config, "output_router_logits", False)
    if wanted:
        raise NotImplementedError(
            f"output_router_logits=True: {type(model).__name__} would add its mixture-of-experts "
            "load-balancing loss to the language-model loss, which xentkit does not compute. "
            "Pass output_router_logits=False (or set config.output_router_logits = False), or "
            "unpatch(model) to train with the auxiliary loss."
        )


def _keep(hidden: Tensor, logits_to_keep: int | Tensor) -> Tensor:
    """The hidden states of the positions whose logits the model would keep."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # transformers 4.x slices inline: an int keeps the last ones (0: all)
        index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden[:, index, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


def _causal_lm_loss(
    model: nn.Module,
    head: nn.Module,
    hidden: Tensor,
    labels: Tensor,
    shift_labels: Tensor | None,
    num_items_in_batch: Tensor | int | None,
    options: dict[str, Any],
) -> Tensor:
    options = {**_DEFAULTS, **options}
    if shift_labels is None:
        # Position t predicts token t + 1; the last position has nothing left to predict.
        shift_labels = F.pad(labels, (0, 1), value=options["ignore_index"])[..., 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = shift_labels.reshape(-1).to(hidden.device)
    if target.numel() != hidden.shape[0]:
        raise ValueError(
            f"labels give {target.numel()} targets (after shifting) for {hidden.shape[0]} kept "
            "positions: with logits_to_keep, pass shift_labels holding one target per kept "
            "position, or leave logits_to_keep at 0 when training."
        )
    features, weight, bias = _operands(head, hidden)
    reduction = "mean" if num_items_in_batch is None else "sum"
    # The private op leaves the loss in float32, as transformers computes it from upcast logits;
    # under autocast it runs the head in the autocast dtype, as lm_head would.
    loss = functional._linear_cross_entropy(
        features,
        weight,
        target,
        bias,
        reduction=reduction,
        softcap=_softcap(model),
        process_group=None,
        **options,
    )
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
