"""Hugging Face ``transformers``: one call makes a causal language model train with the fused loss.

:func:`patch` replaces the ``forward`` of one ``*ForCausalLM`` instance, whatever its
architecture. Called with ``labels``, the patched forward runs the model's decoder
(``model.base_model``), takes its last hidden states and sends them, with the weight and bias of
the output embedding (``model.get_output_embeddings()``), straight into
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

The loss comes back in the hidden states' dtype, as :func:`xentkit.linear_cross_entropy` returns
it (accumulated in float32 inside); ``transformers`` upcasts its logits to float32 first, so a
bfloat16 model's loss value differs from the unpatched one by bfloat16 rounding.

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

_STATE = "_xentkit_patch"


@dataclass(frozen=True)
class _Patch:
    """What :func:`patch` stores on the model: the loss options, and the instance-level
    ``forward`` it replaced (set by e.g. accelerate's hooks), restored by :func:`unpatch`."""

    options: dict[str, Any]
    replaced: Any = None


def patch(model: nn.Module, *, check: bool = True, **loss_options: Any) -> nn.Module:
    """Make ``model`` compute its loss with :func:`xentkit.linear_cross_entropy` when given labels.

    Works on any ``transformers`` causal language model built as a decoder (``base_model``)
    plus an ``nn.Linear`` output embedding, tied to the input embeddings or not, with or without
    a bias: one wrapper, no copy of any architecture's ``forward``. With ``labels`` the patched
    forward returns a ``CausalLMOutputWithPast`` whose ``loss`` is the model's loss (see the
    module docstring) and whose ``logits`` is None; without labels it is the model's own
    ``forward``. Under ``torch.autocast`` the head runs in the autocast dtype, as ``lm_head``
    would.

    Args:
        model: a ``*ForCausalLM`` (or ``*LMHeadModel``) instance; only this instance changes.
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
        TypeError: an unknown loss option, an output embedding that is not an ``nn.Linear``,
            or a model with no decoder apart from its head.
        ValueError: the check found different logits or a different loss (or a loss option
            value that :func:`xentkit.linear_cross_entropy` refuses, with its error type).
        NotImplementedError: the config asks for a mixture-of-experts router loss
            (``output_router_logits``), which the patched forward also refuses per call.

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
    _head(model)
    _decoder(model)
    unpatch(model)  # a refused model is left unpatched
    if check:
        _check_equivalence(model)
    _install(model, loss_options)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the ``forward`` that :func:`patch` replaced; a model that is not patched is
    returned as it is.

    Args:
        model: a model given to :func:`patch`, or any ``nn.Module``.
    Returns:
        ``model`` itself.
    """
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return model
    if state.replaced is None:
        del model.__dict__["forward"]
    else:
        model.forward = state.replaced
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` has patched ``model`` (and :func:`unpatch` has not restored it)."""
    return _STATE in model.__dict__


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


def _head(model: nn.Module) -> nn.Linear:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"{type(model).__name__}'s output embedding (model.get_output_embeddings()) is "
            f"{type(head).__name__}, not an nn.Linear: xentkit.linear_cross_entropy needs the "
            "head's (vocabulary, hidden) weight. Patch a causal LM whose head is an nn.Linear, or "
            "call xentkit.linear_cross_entropy on your own head's hidden states and weight."
        )
    return head


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
    model.__dict__[_STATE] = _Patch(dict(options), model.__dict__.get("forward"))
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
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(head.weight.shape[0], (2, 8), generator=generator)
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
            if hidden.shape[-1] != head.in_features:
                raise ValueError(
                    f"{type(model).__name__}'s decoder gives hidden states of size "
                    f"{hidden.shape[-1]} but its head takes {head.in_features} features: a layer "
                    "between them (a prediction-head transform) would be skipped. Leave it "
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
    tol = 1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 2e-2
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


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _patched_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: _Patch = self.__dict__[_STATE]
    original = state.replaced or functools.partial(type(self).forward, self)
    try:
        bound = _signature(type(self)).bind(self, *args, **kwargs)
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

    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = arguments.pop("return_dict", None)
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    shift_labels = arguments.pop("shift_labels", None)
    _refuse_router_loss(self, arguments)
    outputs = _decoder(self)(**arguments)
    hidden = _keep(outputs[0], logits_to_keep)
    loss = _causal_lm_loss(self, hidden, labels, shift_labels, num_items_in_batch, state.options)
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
    hidden: Tensor,
    labels: Tensor,
    shift_labels: Tensor | None,
    num_items_in_batch: Tensor | int | None,
    options: dict[str, Any],
) -> Tensor:
    if shift_labels is None:
        # Position t predicts token t + 1; the last position has nothing left to predict.
        shift_labels = F.pad(labels, (0, 1), value=options.get("ignore_index", -100))[..., 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = shift_labels.reshape(-1).to(hidden.device)
    if target.numel() != hidden.shape[0]:
        raise ValueError(
            f"labels give {target.numel()} targets (after shifting) for {hidden.shape[0]} kept "
            "positions: with logits_to_keep, pass shift_labels holding one target per kept "
            "position, or leave logits_to_keep at 0 when training."
        )
    head = _head(model)
    weight, bias = head.weight, head.bias
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        # lm_head would run in the autocast dtype; the fused op gets explicit, matching dtypes.
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    reduction = "mean" if num_items_in_batch is None else "sum"
    with torch.autocast(device, enabled=False):
        loss = xentkit.linear_cross_entropy(
            hidden, weight, target, bias, reduction=reduction, softcap=_softcap(model), **options
        )
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
