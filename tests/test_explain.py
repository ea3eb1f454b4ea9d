"""xentkit.explain: its value is the library's, its table adds up to it, its warnings fire on the
mistakes they name and stay quiet on clean data, and every output format renders."""

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

import xentkit
from xentkit.explain import LOSSES, Explanation, explain

LOGITS = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]])
TARGET = torch.tensor([2, 1])


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 1e-12 if a.dtype == torch.float64 else 1e-5
    return torch.allclose(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True)


def _check_adds_up(e: Explanation, expected: torch.Tensor) -> None:
    """The value is the library's, the terms reproduce it, the loss column is per position."""
    assert torch.equal(e.value, expected) or (e.value.isnan().all() and expected.isnan().all())
    assert _close(e.computed.to(e.value.dtype), e.value)
    assert not e.warnings, e.warnings
    if e.reduction == "none":
        shown = torch.tensor([r["loss"] for r in e.rows], dtype=torch.float64)
        assert _close(shown, e.value.flatten()[: len(e.rows)].double())
    text = e.to_text()
    assert "value: " in text and "reduction: " in text


# --- the required example ------------------------------------------------------------------


def test_required_example():
    e = explain(LOGITS, TARGET)
    text = str(e)
    assert "[0.2312 0.1402 0.6285]" in text and "[0.0674 0.8214 0.1112]" in text
    assert "-0.4644" in text and "-0.1967" in text
    assert "= 0.3306" in e.reduction_text and "value: 0.3306" in text
    assert [round(r["log p[target]"], 4) for r in e.rows] == [-0.4644, -0.1967]
    assert e.value == xentkit.cross_entropy(LOGITS, TARGET)
    assert [r["position"] for r in e.rows] == ["n=0", "n=1"]


# --- values: random cases of every loss, layout and option ---------------------------------

dtypes = st.sampled_from([torch.float32, torch.float64])
reductions = st.sampled_from(["mean", "sum", "none"])


@st.composite
def class_layouts(draw):
    """(C), (N, C), (N, C, d1) or (N, C, d1, d2), and the class dim."""
    c = draw(st.integers(1, 6))
    if draw(st.booleans()) and draw(st.booleans()):
        return (c,), 0
    n = draw(st.integers(0, 4))
    extra = draw(st.lists(st.integers(1, 3), max_size=2))
    return (n, c, *extra), 1


def _index_target(g, shape, cdim, ignore):
    target = torch.randint(0, shape[cdim], shape[:cdim] + shape[cdim + 1 :], generator=g)
    if ignore:
        target[torch.rand(target.shape, generator=g) < 0.3] = -100
    return target


@given(
    class_layouts(),
    dtypes,
    reductions,
    st.booleans(),
    st.booleans(),
    st.integers(0, 99),
    st.sampled_from([0.0, 0.2]),
    st.sampled_from([0.0, 1e-3]),
    st.sampled_from([None, 4.0]),
)
def test_cross_entropy_index(layout, dtype, reduction, weighted, ignore, seed, eps, z, cap):
    (shape, cdim), g = layout, torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=dtype) * 3
    target = _index_target(g, shape, cdim, ignore)
    kw = {"reduction": reduction, "label_smoothing": eps, "z_loss": z, "softcap": cap}
    kw["weight"] = torch.rand(shape[cdim], generator=g, dtype=dtype) + 0.1 if weighted else None
    e = explain(logits, target, **kw)
    _check_adds_up(e, xentkit.cross_entropy(logits, target, **kw))


@given(class_layouts(), dtypes, reductions, st.booleans(), st.integers(0, 99),
       st.sampled_from([0.0, 0.2]))  # fmt: skip
def test_cross_entropy_probabilities(layout, dtype, reduction, weighted, seed, eps):
    (shape, cdim), g = layout, torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=dtype)
    target = torch.softmax(torch.randn(shape, generator=g, dtype=dtype), dim=cdim)
    kw = {"reduction": reduction, "label_smoothing": eps}
    kw["weight"] = torch.rand(shape[cdim], generator=g, dtype=dtype) + 0.1 if weighted else None
    e = explain(logits, target, "ce", **kw)
    _check_adds_up(e, xentkit.cross_entropy(logits, target, **kw))


@given(class_layouts(), dtypes, reductions, st.booleans(), st.booleans(), st.integers(0, 99))
def test_nll_loss(layout, dtype, reduction, weighted, ignore, seed):
    (shape, cdim), g = layout, torch.Generator().manual_seed(seed)
    log_probs = torch.log_softmax(torch.randn(shape, generator=g, dtype=dtype), dim=cdim)
    target = _index_target(g, shape, cdim, ignore)
    kw = {"reduction": reduction, "ignore_index": -100}
    kw["weight"] = torch.rand(shape[cdim], generator=g, dtype=dtype) + 0.1 if weighted else None
    e = explain(log_probs, target, "nll", **kw)
    _check_adds_up(e, xentkit.nll_loss(log_probs, target, **kw))


@given(
    st.lists(st.integers(1, 4), min_size=0, max_size=3),
    dtypes,
    reductions,
    st.sampled_from(["none", "elements", "classes"]),
    st.booleans(),
    st.integers(0, 99),
)
def test_binary_losses(shape, dtype, reduction, weighting, pos_weighted, seed):
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    target = torch.rand(shape, generator=g, dtype=dtype).round()
    weight = None
    if weighting != "none" and shape:
        weight_shape = shape if weighting == "elements" else shape[-1:]
        weight = torch.rand(weight_shape, generator=g, dtype=dtype) + 0.1
    probs = torch.rand(shape, generator=g, dtype=dtype) * 0.98 + 0.01
    e = explain(probs, target, "bce", weight=weight, reduction=reduction)
    expected = xentkit.binary_cross_entropy(probs, target, weight=weight, reduction=reduction)
    _check_adds_up(e, expected)

    logits = torch.randn(shape, generator=g, dtype=dtype) * 3
    pos_weight = None
    if pos_weighted and shape:
        pos_weight = torch.rand(shape[-1:], generator=g, dtype=dtype) + 0.5
    kw = {"weight": weight, "reduction": reduction, "pos_weight": pos_weight}
    e = explain(logits, target, "binary_cross_entropy_with_logits", **kw)
    _check_adds_up(e, xentkit.binary_cross_entropy_with_logits(logits, target, **kw))


def test_edge_cases_match_the_library():
    minus_inf = torch.tensor([[0.0, float("-inf"), 1.0], [2.0, 0.0, float("-inf")]])
    _check_adds_up(
        explain(minus_inf, TARGET.flip(0) - 1), xentkit.cross_entropy(minus_inf, TARGET.flip(0) - 1)
    )
    ignored = torch.tensor([-100, -100])
    _check_adds_up(explain(LOGITS, ignored), xentkit.cross_entropy(LOGITS, ignored))  # nan
    empty = torch.zeros(0, 3)
    _check_adds_up(explain(empty, torch.zeros(0, dtype=torch.long)), torch.tensor(float("nan")))
    e = explain(LOGITS, torch.tensor([2, -100]))
    assert e.rows[1]["target"] == "-100 (ignored)" and e.rows[1]["log p[target]"] is None


# --- layout, labels, elision ---------------------------------------------------------------


def test_positions_are_labelled_by_index():
    e = explain(torch.randn(2, 3, 4), torch.randint(0, 3, (2, 4)))
    assert [r["position"] for r in e.rows[:5]] == ["n=0, t=0", "n=0, t=1", "n=0, t=2",
                                                   "n=0, t=3", "n=1, t=0"]  # fmt: skip
    e = explain(torch.randn(1, 3, 2, 2), torch.randint(0, 3, (1, 2, 2)))
    assert e.rows[3]["position"] == "n=0, d1=1, d2=1"
    assert explain(torch.randn(3), torch.tensor(1)).rows[0]["position"] == "(unbatched)"
    assert explain(torch.rand(2, 3), torch.rand(2, 3), "bce").rows[4]["position"] == "n=1, c=1"


def test_large_inputs_are_elided():
    logits, target = torch.randn(100, 50), torch.randint(0, 50, (100,))
    e = explain(logits, target, max_rows=5, max_classes=4)
    text = e.to_text()
    assert len(e.rows) == 5 and e.positions == 100
    assert "95 more positions not shown" in text and "first 4 of 50 classes" in text
    assert "… +46]" in text
    assert e.value == xentkit.cross_entropy(logits, target)


def test_class_dim_moves_the_classes_and_says_so():
    logits, target = torch.randn(2, 5, 4), torch.randint(0, 4, (2, 5))
    e = explain(logits, target, class_dim=-1)
    assert e.value == xentkit.cross_entropy(logits.movedim(-1, 1), target)
    assert "Classes moved from dim -1 to dim 1" in e.to_text()


# --- mistakes: each detector fires on its case, with its evidence --------------------------


def _warned(e_or_error, *phrases):
    text = str(e_or_error) if isinstance(e_or_error, Exception) else "\n".join(e_or_error.warnings)
    for phrase in phrases:
        assert phrase in text, text


def test_probabilities_passed_as_logits():
    _warned(explain(LOGITS.softmax(1), TARGET), "looks like probabilities", "softmax a second")
    _warned(explain(LOGITS.log_softmax(1), TARGET), "already log-probabilities")


def test_nll_loss_given_probabilities_or_logits():
    _warned(explain(LOGITS.softmax(1), TARGET, "nll"), "these are probabilities")
    _warned(explain(LOGITS, TARGET, "nll"), "look like logits", "logsumexp 2.4644")


def test_class_dimension_transposed():
    with pytest.raises(RuntimeError) as error:  # (N, T, C) passed where (N, C, T) is meant
        explain(torch.randn(2, 7, 5), torch.randint(0, 5, (2, 7)))
    _warned(error.value, "Expected target size", "classes look like the last dimension")
    with pytest.raises(IndexError) as error:  # dim 1 too small for the targets, last dim not
        explain(torch.randn(2, 3, 6), torch.tensor([[0, 1, 5, 4, 2, 1]] * 2))
    _warned(error.value, "targets go up to 5", "last dimension has 6")
    with pytest.raises(ValueError) as error:  # (C, N) for (N, C)
        explain(torch.randn(5, 4), torch.randint(0, 5, (4,)))
    _warned(error.value, "looks transposed", "input.T")


def test_one_hot_and_float_targets():
    one_hot = F.one_hot(TARGET, 3)
    _warned(explain(LOGITS, one_hot.float()), "one-hot", "target.argmax(dim=1)")
    weighted = explain(LOGITS, one_hot.float(), weight=torch.tensor([1.0, 2.0, 3.0]))
    _warned(weighted, "With weight given the two differ")
    with pytest.raises(RuntimeError) as error:
        explain(LOGITS, one_hot)
    _warned(error.value, "one-hot labels", "target.argmax(dim=1)")
    with pytest.raises(RuntimeError) as error:
        explain(LOGITS.log_softmax(1), one_hot.float(), "nll")
    _warned(error.value, "nll_loss takes class indices")
    with pytest.raises(RuntimeError) as error:
        explain(LOGITS, TARGET.float())
    _warned(error.value, "whole numbers stored as torch.float32", "target.long()")


def test_one_based_labels():
    with pytest.raises(IndexError) as error:  # the real function raises: C is out of range
        explain(torch.randn(4, 5), torch.tensor([1, 2, 5, 3]))
    _warned(error.value, "out of bounds", "labels look 1-based", "run from 1 to 5 = C")
    g = torch.Generator().manual_seed(0)
    e = explain(torch.randn(200, 5, generator=g), torch.randint(1, 5, (200,), generator=g))
    _warned(e, "may be 1-based", "class 0 never does")
    # small batches, or class 0 ignored, are no evidence
    assert not explain(torch.randn(8, 5), torch.randint(1, 5, (8,))).warnings
    targets = torch.randint(1, 5, (200,))
    assert not explain(torch.randn(200, 5), targets, ignore_index=0).warnings


def test_binary_mistakes():
    with pytest.raises(RuntimeError) as error:
        explain(torch.randn(10) * 3, torch.rand(10).round(), "bce")
    _warned(error.value, "look like logits", "bce-logits")
    _warned(explain(torch.rand(10), torch.rand(10), "bce-logits"), "look like probabilities")
    labels = torch.tensor([1.0, -1.0, 1.0, -1.0])
    _warned(explain(torch.randn(4), labels, "bce-logits"), "-1/+1 labels", "(target + 1) / 2")


def test_clean_inputs_stay_quiet():
    g = torch.Generator().manual_seed(1)
    for n, c in [(1, 2), (4, 3), (64, 10), (300, 4)]:
        logits, target = torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)
        assert not explain(logits, target).warnings
        assert not explain(logits.log_softmax(1), target, "nll").warnings
        assert not explain(logits, logits.softmax(1).flip(0)).warnings
        assert not explain(logits.sigmoid(), (logits > 1).float(), "bce").warnings
        assert not explain(logits, (logits > 0).float(), "bce-logits").warnings


@given(
    st.lists(st.integers(0, 3), max_size=3),
    st.sampled_from(["same", "no classes", "no last", "other"]),
    st.sampled_from([torch.float32, torch.float16, torch.long]),
    st.sampled_from([torch.long, torch.float32, torch.uint8, torch.int32]),
    st.sampled_from(["ce", "nll", "bce", "bce-logits"]),
    st.booleans(),
    st.integers(0, 99),
)
def test_raises_exactly_when_the_function_does(shape, form, dtype, tdtype, loss, probs, seed):
    """Odd shapes and dtypes: explain returns when the function does, else raises its kind."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    tshape = {"same": shape, "no classes": shape[:1] + shape[2:], "no last": shape[:-1]}
    tshape = tshape.get(form, tuple(reversed(shape)))
    x = torch.randn(shape, generator=g).to(dtype)
    if probs and x.dim() and x.is_floating_point():
        x = x.softmax(-1)
    t = torch.randint(-1, 4, tshape, generator=g).to(tdtype)
    function = getattr(xentkit, LOSSES[loss])
    try:
        expected = function(x, t)
    except Exception as error:
        with pytest.raises(type(error)):
            explain(x, t, loss)
    else:
        assert torch.equal(explain(x, t, loss).value, expected) or expected.isnan().any()


def test_errors_without_findings_are_the_functions_own():
    with pytest.raises(ValueError, match="reduction"):
        explain(LOGITS, TARGET, reduction="avg")


# --- output formats ------------------------------------------------------------------------


def test_markdown_dict_and_repr():
    e = explain(LOGITS.softmax(1), TARGET, weight=torch.tensor([1.0, 2.0, 3.0]))
    md = e.to_markdown()
    assert "| position | logits | max | logsumexp | softmax | target |" in md
    assert "| --- |" in md and "**Warnings**" in md and "weight=[1.0000 2.0000 3.0000]" in md
    d = json.loads(json.dumps(e.to_dict(), allow_nan=False))
    assert d["loss"] == "cross_entropy" and d["value"] == pytest.approx(float(e.value))
    assert d["reduction"]["denominator"] == pytest.approx(3.0 + 2.0)
    assert d["rows"][0]["target"] == 2 and len(d["warnings"]) == 1
    assert repr(e).startswith("<Explanation cross_entropy = ") and "1 warning)" in repr(e)
    nan = explain(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]), reduction="none")
    assert json.loads(json.dumps(nan.to_dict(), allow_nan=False))["value"] == ["nan"]


def test_rich_rendering_fits_the_terminal():
    e = explain(LOGITS, TARGET, max_rows=1)
    wide = Console(width=160, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    wide.print(e)
    text = wide.export_text()
    assert "log p[target]" in text and "-0.4644" in text and "value: 0.3306" in text
    narrow = Console(width=60, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    narrow.print(e)
    lines = narrow.export_text().splitlines()
    assert max(map(len, lines)) <= 60 and any(line.startswith("softmax ") for line in lines)


# --- bad arguments ------------------------------------------------------------------------


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="loss must be one of"):
        explain(LOGITS, TARGET, "mse")
    with pytest.raises(TypeError, match="label_smoothing: nll_loss takes weight"):
        explain(LOGITS, TARGET, "nll", label_smoothing=0.1)
    with pytest.raises(TypeError, match=r"input must be a torch\.Tensor"):
        explain([[1.0, 2.0]], TARGET)
    with pytest.raises(ValueError, match="class_dim=3 is out of range"):
        explain(LOGITS, TARGET, class_dim=3)
    with pytest.raises(ValueError, match="class_dim applies to cross_entropy and nll_loss"):
        explain(LOGITS.sigmoid(), LOGITS.sigmoid(), "bce", class_dim=0)
    with pytest.raises(ValueError, match="max_rows"):
        explain(LOGITS, TARGET, max_classes=0)
