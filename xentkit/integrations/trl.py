"""TRL: one call makes TRL's fused LM head and its distillation loss run on xentkit's kernels.

TRL (1.16) trains without the ``(batch, sequence, vocabulary)`` logits: its trainers (SFT, GRPO,
RLOO, DPO, KTO and the experimental async GRPO) give the model a fused LM head
(``trl.trainer.utils.add_fused_lm_head``), whose forward calls
``trl.kernels.ChunkedLogProbFunction`` for the per-token fields of its output, and the
``DistillationTrainer`` calls ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` for
its per-token generalized JSD. :func:`patch` replaces the two names the trainers look up when
they call them, and nothing else:

- ``trl.trainer.utils._ChunkedLogProbFunction`` (the fused head's kernel) by
  :class:`LogProbHead`, which computes every field with
  :func:`xentkit.functional.linear_head_outputs`;
- ``trl.trainer.distillation_trainer.ChunkedDivergenceFunction`` by :class:`DivergenceHead`,
  which computes the divergence with :func:`xentkit.linear_distillation_loss` and the student's
  entropy with :func:`xentkit.functional.linear_head_outputs`.

Both take TRL's own arguments and return TRL's own outputs, so every trainer runs unchanged,
on the same numbers (within float rounding). For each token :math:`n` the head's logits are
transformed as TRL transforms them:

.. math:: z = W h_n + b, \\qquad z \\leftarrow a z, \\qquad
          z \\leftarrow c \\tanh(z / c), \\qquad s = z / T

with :math:`a` the config's ``logit_scale`` (or its aliases), :math:`c` its
``final_logit_softcapping`` (none when unset) and :math:`T` the trainer's temperature. The
log-prob head returns :math:`\\log p_{y_n} = s_{y_n} - \\operatorname{lse}(s)`, the entropy,
``log_sum_sq_probs`` (:math:`\\log \\sum_j p_j^2`), ``mean_logits``
(:math:`\\tfrac1V \\sum_j s_j`) and ``is_top1`` (the target is the first argmax), each only when
the trainer asks for it; log-probabilities and entropy carry gradients to the hidden states, the
weight and the bias, the others none. Outputs are float32 whatever the head's dtype, as TRL's
are. The divergence is TRL's generalized JSD with mixture
:math:`m = \\beta p_t + (1 - \\beta) p_s` (:math:`\\beta = 0` forward KL, :math:`\\beta = 1`
reverse KL), with gradients to the student only; each head's ``logit_scale`` is folded into a
scaled copy of its weight (and bias), and a soft-capped head (``final_logit_softcapping``) is
refused with a clear error: :func:`xentkit.linear_distillation_loss` does not cap yet.

TRL's own kernels stay where TRL defines them (``trl.kernels``), untouched: code that calls
them directly still gets TRL's. What is not patched: the experimental async distillation
trainer (it projects its chunks in torch, without either kernel) and trainers that compute full
logits. DeepSpeed ZeRO-3 partitioned heads are refused with a clear error (xentkit's backward
does not re-gather the weight as TRL's does). :func:`unpatch` puts TRL's kernels back.

The supported TRL versions are :data:`SUPPORTED`; :func:`patch` refuses any other version, and
a TRL whose kernels do not have the signatures this module was written against.

Example:
    >>> import pytest
    >>> trl = pytest.importorskip("trl")  # TRL 1.x needs Python 3.11
    >>> from xentkit.integrations import trl as xentkit_trl
    >>> xentkit_trl.patch()
    >>> trl.trainer.utils._ChunkedLogProbFunction is xentkit_trl.LogProbHead
    True
    >>> xentkit_trl.unpatch()
    >>> trl.trainer.utils._ChunkedLogProbFunction is trl.kernels.ChunkedLogProbFunction
    True
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from typing import Any, NamedTuple

import torch
from torch import Tensor

import xentkit
from xentkit import functional

# The TRL versions whose kernels this module was written against and tested with.
SUPPORTED = ">=1.16,<1.17"

# TRL's per-token fields besides the log-probabilities (``trl.kernels.chunked_logprob``), in the
# order of its output tuple.
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

# The parameters of the kernels' ``forward`` (after ``ctx``) that this module takes, as TRL
# declares them: a TRL that calls them differently is refused rather than mis-served.
_LOG_PROB_PARAMETERS = (
    "hidden",
    "weight",
    "bias",
    "targets",
    "temperature",
    "chunk_size",
    "final_logit_softcapping",
    "logit_scale",
    "outputs",
)
_DIVERGENCE_PARAMETERS = (
    "student_hidden",
    "student_weight",
    "student_bias",
    "teacher_hidden",
    "teacher_weight",
    "teacher_bias",
    "beta",
    "temperature",
    "student_logit_scale",
    "student_final_logit_softcapping",
    "teacher_logit_scale",
    "teacher_final_logit_softcapping",
)


class _Site(NamedTuple):
    """A name TRL looks a kernel up by when it calls it, and where that kernel is defined."""

    module: str
    attribute: str
    kernel_module: str
    kernel: str
    parameters: tuple[str, ...]


_SITES = (
    _Site(
        "trl.trainer.utils",
        "_ChunkedLogProbFunction",
        "trl.kernels.chunked_logprob",
        "ChunkedLogProbFunction",
        _LOG_PROB_PARAMETERS,
    ),
    _Site(
        "trl.trainer.distillation_trainer",
        "ChunkedDivergenceFunction",
        "trl.kernels.chunked_divergence",
        "ChunkedDivergenceFunction",
        _DIVERGENCE_PARAMETERS,
    ),
)

# What patch() replaced, by site, restored by unpatch(); and the options the stand-ins use.
_replaced: dict[_Site, Any] = {}
_options: dict[str, Any] = {"chunk_size": None, "backend": None}


def installed_version() -> str:
    """The version of the TRL that ``import trl`` finds (``trl.__version__``)."""
    import trl

    return str(trl.__version__)


def check_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless ``version`` (default: the installed TRL's) is in
    :data:`SUPPORTED`; pre-releases of a supported version are accepted."""
    from packaging.specifiers import SpecifierSet

    version = installed_version() if version is None else version
    if not SpecifierSet(SUPPORTED).contains(version, prereleases=True):
        raise RuntimeError(
            f"xentkit.integrations.trl supports trl{SUPPORTED}, but trl {version} is installed: "
            f"install a supported TRL (pip install 'trl{SUPPORTED}'), or a xentkit release that "
            f"supports trl {version}; TRL's own kernels run unpatched meanwhile."
        )


def _check_site(site: _Site) -> None:
    """Refuse a TRL whose call site does not hold TRL's kernel, or whose kernel takes other
    arguments than those this module serves."""
    kernel = getattr(importlib.import_module(site.kernel_module), site.kernel, None)
    found = getattr(importlib.import_module(site.module), site.attribute, None)
    if kernel is None or found is not kernel:
        raise RuntimeError(
            f"{site.module}.{site.attribute} is {found!r}, not TRL's "
            f"{site.kernel_module}.{site.kernel}: something else replaced it (another patch, "
            f"such as Liger's?) or this TRL is laid out differently; undo the other patch before "
            f"xentkit.integrations.trl.patch()."
        )
    names = tuple(inspect.signature(kernel.forward).parameters)[1:]
    if names != site.parameters:
        raise RuntimeError(
            f"TRL's {site.kernel_module}.{site.kernel}.forward takes {names}, not the "
            f"{site.parameters} that xentkit.integrations.trl serves: this TRL is not one it "
            f"supports (trl{SUPPORTED})."
        )


def _stand_in(site: _Site) -> type:
    return LogProbHead if site.attribute == "_ChunkedLogProbFunction" else DivergenceHead


def patch(*, chunk_size: int | None = None, backend: str | None = None) -> None:
    """Make TRL's fused LM head and its distillation loss run on xentkit's kernels.

    Call it before or after building a trainer: the trainers look the kernels up on every call.
    Calling it again only updates the options; :func:`unpatch` restores TRL.

    Args:
        chunk_size: tokens per chunk of xentkit's kernels (chosen from the shapes when None).
            TRL's own ``chunk_size`` (its vocabulary tile width) is not used.
        backend: xentkit backend to force (``"chunked"`` or ``"reference"``); None picks one by
            device.
    Raises:
        RuntimeError: the installed TRL is not in :data:`SUPPORTED`, or its kernels are not where
            and what this module expects.
    """
    from xentkit import _checks

    _checks.check_chunk_size(chunk_size)
    check_version()
    for site in _SITES:
        if site not in _replaced:
            _check_site(site)
    _options.update(chunk_size=chunk_size, backend=backend)
    for site in _SITES:
        module = importlib.import_module(site.module)
        if site not in _replaced:
            _replaced[site] = getattr(module, site.attribute)
        setattr(module, site.attribute, _stand_in(site))


def unpatch() -> None:
    """Put TRL's own kernels back where :func:`patch` replaced them (nothing when unpatched).

    Raises:
        RuntimeError: something replaced xentkit's stand-in after :func:`patch`; nothing is
            restored then (undo that other patch first).
    """
    for site in _SITES:
        found = getattr(importlib.import_module(site.module), site.attribute, None)
        if site in _replaced and found is not _stand_in(site):
            raise RuntimeError(
                f"{site.module}.{site.attribute} was replaced by {found!r} after "
                f"xentkit.integrations.trl.patch(): undo that patch before unpatch()."
            )
    for site in list(_replaced):
        setattr(importlib.import_module(site.module), site.attribute, _replaced.pop(site))
    _options.update(chunk_size=None, backend=None)


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return bool(_replaced)


def _refuse_partitioned(*params: Tensor | None) -> None:
    """DeepSpeed ZeRO-3 partitions the head (its parameters carry ``ds_id``): TRL re-gathers it
    in its own backward, which xentkit's backward cannot do."""
    if any(p is not None and hasattr(p, "ds_id") for p in params):
        raise NotImplementedError(
            "xentkit.integrations.trl does not support a DeepSpeed ZeRO-3 partitioned LM head: "
            "call xentkit.integrations.trl.unpatch() to train with TRL's own kernels, or use "
            "ZeRO-2 / FSDP2."
        )


def _scaled(scale: float, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The head ``(weight, bias)`` whose logits are ``scale`` times the given head's."""
    if scale == 1.0:
        return weight, bias
    return weight * scale, None if bias is None else bias * scale


def _float32_outputs(hidden: Tensor) -> contextlib.AbstractContextManager:
    """TRL's per-token outputs are float32 whatever the head's dtype, while xentkit's are in the
    input's dtype outside autocast. A half-precision head outside autocast runs inside an
    autocast to its own dtype: the products stay in that dtype, as TRL's do, and the outputs are
    float32, not rounded to the half dtype."""
    device = hidden.device.type
    if hidden.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(device):
        return torch.autocast(device, dtype=hidden.dtype)
    return contextlib.nullcontext()


class LogProbHead:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction`` at TRL's fused LM head.

    Same arguments, same outputs, same gradients: see :meth:`apply`.
    """

    @staticmethod
    def apply(
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = OPTIONAL_OUTPUTS,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """Per-token fields of the head ``hidden @ weight.T + bias`` at ``targets``.

        Args:
            hidden: ``(N, D)`` hidden states.
            weight: ``(V, D)`` head weight; ``bias``: ``(V,)`` or None.
            targets: ``(N,)`` token ids, every one a valid class (TRL scores only real labels,
                or clamps the ignored ones to 0 and zeroes their outputs itself).
            temperature: the logits are divided by it (after scaling and capping).
            chunk_size: TRL's vocabulary tile width; unused (xentkit chunks tokens, see
                :func:`patch`).
            final_logit_softcapping: :math:`c` of :math:`c \\tanh(z / c)`, or None.
            logit_scale: the logits are multiplied by it first.
            outputs: which of :data:`OPTIONAL_OUTPUTS` to compute (other names are ignored, as
                TRL ignores them).
        Returns:
            ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, each ``(N,)``,
            float32 (``is_top1`` bool), None where not asked for.
        """
        del chunk_size
        _refuse_partitioned(weight, bias)
        wanted = tuple(name for name in OPTIONAL_OUTPUTS if name in outputs)
        with _float32_outputs(hidden):
            fields = functional.linear_head_outputs(
                hidden,
                weight,
                targets,
                bias,
                temperature=temperature,
                logit_scale=logit_scale,
                softcap=final_logit_softcapping,
                outputs=wanted,
                ignore_index=None,
                chunk_size=_options["chunk_size"],
                backend=_options["backend"],
            )
        # TRL's fields are float32 whatever the head's dtype (its statistics are float32).
        return tuple(
            None if x is None else x if x.dtype == torch.bool else x.float() for x in fields
        )  # type: ignore[return-value]


class DivergenceHead:
    """Stands in for ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` at the
    ``DistillationTrainer``'s loss. Same arguments, same outputs, same gradients: see
    :meth:`apply`."""

    @staticmethod
    def apply(
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        teacher_bias: Tensor | None,
        beta: float,
        temperature: float = 1.0,
        student_logit_scale: float = 1.0,
        student_final_logit_softcapping: float | None = None,
        teacher_logit_scale: float = 1.0,
        teacher_final_logit_softcapping: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-token generalized JSD between the student's and the teacher's heads, and the
        student's entropy.

        Args:
            student_hidden: ``(N, D_s)``; ``student_weight``: ``(V, D_s)``; ``student_bias``:
                ``(V,)`` or None. Gradients flow to these only.
            teacher_hidden: ``(N, D_t)``; ``teacher_weight``: ``(V, D_t)``; ``teacher_bias``:
                ``(V,)`` or None (treated as constants, as TRL treats them).
            beta: the mixture :math:`m = \\beta p_t + (1 - \\beta) p_s`; 0 forward KL, 1 reverse.
            temperature: both heads' transformed logits are divided by it.
            student_logit_scale, teacher_logit_scale: each head's logits are multiplied by it.
            student_final_logit_softcapping, teacher_final_logit_softcapping: each head's
                :math:`c` of :math:`c \\tanh(z / c)`, or None.
        Returns:
            ``(divergence, entropy)``, each ``(N,)`` float32; the entropy (the student's, at
            the temperature) has no gradient.
        """
        _refuse_partitioned(student_weight, student_bias, teacher_weight, teacher_bias)
        capped = [
            name
            for name, cap in (
                ("student", student_final_logit_softcapping),
                ("teacher", teacher_final_logit_softcapping),
            )
            if cap is not None
        ]
        if capped:
            raise NotImplementedError(
                f"xentkit.linear_distillation_loss has no final-logit softcapping yet (the "
                f"{' and '.join(capped)} config sets final_logit_softcapping): call "
                f"xentkit.integrations.trl.unpatch() to distill such models with TRL's own kernel."
            )
        # a (W h + b) = (a W) h + a b: the scale folds into the head (one scaled copy of it), the
        # gradient of the student's flowing back through the product.
        student_weight, student_bias = _scaled(student_logit_scale, student_weight, student_bias)
        teacher_weight, teacher_bias = _scaled(teacher_logit_scale, teacher_weight, teacher_bias)
        with _float32_outputs(student_hidden):
            # Teacher tensors are detached by xentkit: the gradient flows to the student only.
            divergence = xentkit.linear_distillation_loss(
                student_hidden,
                student_weight,
                teacher_hidden,
                teacher_weight,
                student_bias=student_bias,
                teacher_bias=teacher_bias,
                beta=beta,
                temperature=temperature,
                reduction="none",
                chunk_size=_options["chunk_size"],
                backend=_options["backend"],
            )
            # The student's entropy at the temperature, for TRL's metric: one more pass over the
            # student's head, without gradient (linear_distillation_loss does not return it).
            with torch.no_grad():
                entropy = functional.linear_head_outputs(
                    student_hidden,
                    student_weight,
                    student_hidden.new_zeros(student_hidden.shape[0], dtype=torch.long),
                    student_bias,
                    temperature=temperature,
                    outputs=("entropy",),
                    ignore_index=None,
                    chunk_size=_options["chunk_size"],
                    backend=_options["backend"],
                ).entropy
        return divergence.float(), entropy.float()
