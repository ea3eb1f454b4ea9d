"""xentkit.explain: its value is the library's, its table adds up to it, its warnings fire on the
mistakes they name and stay quiet on clean data, and every output format renders."""

import json
import math
import sys

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
    # random data is healthy, but one class or nothing counted are findings of their own
    expected = {"single-class": e.classes == 1}
    expected["all-ignored"] = e.stats is not None and e.stats.counted == 0
    assert all(expected.get(kind) for kind in e.kinds), e.warnings
    if e.reduction == "none":
        shown = torch.tensor([r["loss"] for r in e.rows], dtype=torch.float64)
        assert _close(shown, e.value.flatten()[e.shown].double())
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


def test_large_inputs_show_the_worst_positions_and_the_top_classes():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(100, 50, generator=g), torch.randint(0, 50, (100,), generator=g)
    e = explain(logits, target, max_rows=5, max_classes=4)
    text = e.to_text()
    assert len(e.rows) == 5 and e.positions == 100 and e.order == "worst"
    assert "the 5 positions with the highest loss of 100" in text
    assert "4 most probable of 50 classes" in text and "… +46 | target" in text
    assert e.value == xentkit.cross_entropy(logits, target)
    losses = F.cross_entropy(logits, target, reduction="none")
    assert e.shown == losses.argsort(descending=True)[:5].tolist()
    assert [r["position"] for r in e.rows] == [f"n={i}" for i in e.shown]
    cell = e.rows[0]["softmax"]  # the 4 most probable classes, then the target and its rank
    probs = logits[e.shown[0]].softmax(0)
    assert cell.classes == probs.topk(4).indices.tolist() and cell.target == target[e.shown[0]]
    assert cell.target_rank == int((probs > probs[cell.target]).sum())
    assert cell.target_value == pytest.approx(float(probs[cell.target]), rel=1e-5)


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
    assert "| --- |" in md and "**Findings**" in md and "weight=[1.0000 2.0000 3.0000]" in md
    d = json.loads(json.dumps(e.to_dict(), allow_nan=False))
    assert d["loss"] == "cross_entropy" and d["value"] == pytest.approx(float(e.value))
    assert d["reduction"]["denominator"] == pytest.approx(3.0 + 2.0)
    assert d["rows"][0]["target"] == 2 and len(d["warnings"]) == 1
    assert d["findings"][0]["kind"] == "probabilities-as-logits"
    assert d["stats"]["accuracy"] == pytest.approx(float(e.stats.accuracy))
    assert repr(e).startswith("<Explanation cross_entropy = ") and "1 finding)" in repr(e)
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


# --- findings: each kind fires on its mistake, names its evidence, and stays quiet otherwise --

G = torch.Generator().manual_seed(7)
SEQ = torch.randn(4, 5, 6, generator=G)  # (N, C, T) sequence logits
SEQ_TARGET = torch.randint(0, 5, (4, 6), generator=G)
PADDED = SEQ_TARGET.clone()
for n, length in enumerate([6, 4, 3, 2]):  # sequences of 6, 4, 3 and 2 tokens, padded with 0
    PADDED[n, length:] = 0
    PADDED[n, :length] = PADDED[n, :length].clamp(min=1)
BIG = torch.randn(64, 10, generator=G)
BIG_TARGET = torch.randint(0, 10, (64,), generator=G)
MULTI_HOT = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


def _kinds(call):
    """The finding kinds of an explain call, whether it returns or raises."""
    try:
        return call().kinds
    except Exception as error:
        assert all(f.message in str(error) for f in error.findings)
        return [f.kind for f in error.findings]


MISTAKES = {
    "probabilities-as-logits": lambda: explain(LOGITS.softmax(1), TARGET),
    "probabilities-as-logits (bce)": lambda: explain(
        BIG.sigmoid(), BIG.gt(0).float(), "bce-logits"
    ),
    "softmax-wrong-dim": lambda: explain(SEQ.softmax(2), SEQ_TARGET),
    "softmax-wrong-dim (nll)": lambda: explain(SEQ.log_softmax(0), SEQ_TARGET, "nll"),
    "probabilities-as-log-probabilities": lambda: explain(LOGITS.softmax(1), TARGET, "nll"),
    "log-probabilities-as-logits": lambda: explain(LOGITS.log_softmax(1), TARGET),
    "logits-as-log-probabilities": lambda: explain(LOGITS, TARGET, "nll"),
    "logits-as-probabilities": lambda: explain(BIG, BIG.gt(0).float(), "bce"),
    "multi-hot-target": lambda: explain(LOGITS, MULTI_HOT),
    "single-class": lambda: explain(torch.randn(4, 1), torch.zeros(4, dtype=torch.long)),
    "float-index-targets": lambda: explain(LOGITS, TARGET.float()),
    "one-hot-target": lambda: explain(LOGITS, F.one_hot(TARGET, 3).float()),
    "one-based-labels": lambda: explain(torch.randn(4, 5), torch.tensor([1, 2, 5, 3])),
    "transposed-classes": lambda: explain(torch.randn(5, 4), torch.randint(0, 5, (4,))),
    "padding-not-ignored": lambda: explain(SEQ, PADDED),
    "overconfident-logits": lambda: explain(BIG * 30, BIG_TARGET),
    "collapsed-outputs": lambda: explain(BIG[:1].expand(64, 10), BIG_TARGET),
    "non-finite-input": lambda: explain(torch.tensor([[1.0, float("nan"), 0.0]]), TARGET[:1]),
    "all-ignored": lambda: explain(LOGITS, torch.tensor([-100, -100])),
    "binary-target-out-of-range": lambda: explain(BIG, BIG.sign(), "bce-logits"),
}

HEALTHY = {
    "random logits, scale 0.01": lambda: explain(BIG * 0.01, BIG_TARGET),
    "random logits, scale 1": lambda: explain(BIG, BIG_TARGET),
    "random logits, scale 3": lambda: explain(BIG * 3, BIG_TARGET),
    "LM-sized random logits": lambda: explain(torch.randn(64, 2000, generator=G) * 2,
                                              torch.randint(0, 2000, (64,), generator=G)),
    "trained-like logits": lambda: explain(BIG + 6 * F.one_hot(BIG_TARGET, 10), BIG_TARGET),
    "zero-initialised head": lambda: explain(torch.zeros(64, 10), BIG_TARGET),
    "sequence logits": lambda: explain(SEQ, SEQ_TARGET),
    "soft targets": lambda: explain(LOGITS, LOGITS.flip(0).softmax(1)),
    "smoothing with weights": lambda: explain(BIG, BIG_TARGET, label_smoothing=0.1,
                                              weight=torch.rand(10, generator=G) + 0.5),
    "masked padding": lambda: explain(SEQ, PADDED.masked_fill(PADDED == 0, -100)),
    "masked classes (-inf)": lambda: explain(BIG.masked_fill(BIG < -1, float("-inf")),
                                             BIG.argmax(1)),
    "log-probabilities to nll": lambda: explain(BIG.log_softmax(1), BIG_TARGET, "nll"),
    "healthy bce": lambda: explain(BIG.sigmoid(), BIG.gt(0.5).float(), "bce"),
    "healthy bce-logits": lambda: explain(BIG, BIG.gt(0).float(), "bce-logits"),
}  # fmt: skip


@pytest.mark.parametrize("name", MISTAKES)
def test_each_mistake_is_found(name):
    kind = name.split(" (")[0]
    assert kind in _kinds(MISTAKES[name]), name


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_inputs_give_no_finding(name):
    assert _kinds(HEALTHY[name]) == []


def test_every_registered_kind_is_tested_and_documented():
    from xentkit.explain import DETECTORS

    kinds = {d.kind for d in DETECTORS}
    assert kinds == {name.split(" (")[0] for name in MISTAKES}
    for d in DETECTORS:  # the docstring names the mistake and the fix
        assert "Fix:" in d.find.__doc__, d.kind


def test_findings_carry_their_evidence():
    e = explain(SEQ.softmax(2), SEQ_TARGET)
    (f,) = e.findings
    assert f.evidence["dim"] == 2 and f.evidence["max_error"] < 1e-5
    assert "drop the softmax" in f.message and "over dim 2" in f.message
    (f,) = explain(SEQ, PADDED).findings
    assert f.evidence["value"] == 0 and f.evidence["sequences"] == 3
    assert "ignore_index=0" in f.message
    (f,) = explain(BIG * 30, BIG_TARGET).findings
    assert f.evidence["loss"] > 2 * math.log(10) and "initialis" in f.message
    (f,) = explain(LOGITS, MULTI_HOT).findings
    assert f.evidence == {"rows": 1, "of": 2, "max_positives": 2}
    assert "binary_cross_entropy_with_logits" in f.message


def test_errors_carry_the_finding_objects():
    with pytest.raises(RuntimeError) as error:
        explain(LOGITS, TARGET.float())
    assert [f.kind for f in error.value.findings] == ["float-index-targets"]
    assert "[float-index-targets] target holds whole numbers" in str(error.value)


# --- stats, gradients, HTML, plot ----------------------------------------------------------


def test_stats_of_a_batch():
    target = BIG_TARGET.clone()
    target[:16] = -100
    e = explain(BIG, target)
    s, counted = e.stats, target != -100
    log_probs = BIG.log_softmax(1)[counted]
    kept = target[counted]
    nll = -log_probs.gather(1, kept[:, None]).squeeze(1)
    assert s.positions == 64 and s.counted == 48 and s.ignored_fraction == 0.25
    assert s.loss == pytest.approx(float(nll.mean()), rel=1e-5)
    assert s.perplexity == pytest.approx(math.exp(s.loss))
    assert s.uniform_loss == pytest.approx(math.log(10))
    assert s.accuracy == pytest.approx(float((log_probs.argmax(1) == kept).double().mean()))
    entropy = -(log_probs.exp() * log_probs).sum(1).mean()
    assert s.mean_entropy == pytest.approx(float(entropy), rel=1e-5)
    ranks = (log_probs > log_probs.gather(1, kept[:, None])).sum(1).double()
    assert s.target_rank["p50"] == pytest.approx(float(ranks.quantile(0.5)))
    assert s.target_rank["max"] == float(ranks.max())
    assert "Stats:" in e.to_text() and "perplexity" in e.to_markdown()
    assert explain(LOGITS.sigmoid(), LOGITS.sigmoid(), "bce").stats is None
    nll = explain(BIG.log_softmax(1), target, "nll").stats
    assert nll.loss == pytest.approx(s.loss, rel=1e-5) and nll.accuracy == s.accuracy


@pytest.mark.parametrize(
    "loss, kwargs",
    [("ce", {}), ("ce", {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0,
                         "weight": torch.tensor([1.0, 2.0, 0.5])}),
     ("ce", {"reduction": "sum"}), ("ce-soft", {}), ("nll", {}), ("bce-logits", {}),
     ("bce", {"reduction": "none"})],
)  # fmt: skip
def test_gradients_are_autograds(loss, kwargs):
    x = torch.randn(12, 3, generator=G, dtype=torch.float64)
    target, name = torch.randint(0, 3, (12,), generator=G), loss
    if loss == "ce-soft":
        target, name = torch.rand(12, 3, generator=G, dtype=torch.float64).softmax(1), "ce"
    elif loss == "nll":
        x = x.log_softmax(1)
    elif loss.startswith("bce"):
        target = torch.rand(12, 3, generator=G, dtype=torch.float64).round()
        x = x.sigmoid() if loss == "bce" else x
    if "weight" in kwargs:
        kwargs["weight"] = kwargs["weight"].double()
    e = explain(x, target, name, grad=True, max_rows=4, max_classes=3, **kwargs)
    leaf = x.clone().requires_grad_(True)
    getattr(xentkit, LOSSES[name])(leaf, target, **kwargs).sum().backward()
    expected = leaf.grad.flatten(0, -2) if e.classes else leaf.grad.flatten()
    got = torch.tensor([r["grad"] for r in e.rows], dtype=torch.float64)
    torch.testing.assert_close(got, expected[e.shown])
    assert e.gradient_note and "grad: " in e.to_text()


def test_html_is_a_styled_table_without_script():
    from html.parser import HTMLParser

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.text = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

        def handle_data(self, data):
            self.text.append(data)

    e = explain(LOGITS.softmax(1), TARGET)
    parser = Tags()
    parser.feed(e._repr_html_())
    text = "".join(parser.text)
    assert "script" not in parser.tags and parser.tags.count("tr") == 3
    assert parser.tags.count("th") == len(e.columns) and "style" in parser.tags
    assert "probabilities-as-logits" in text and f"value: {e.value_text()}" in text
    assert "rgba(" in e.to_html() and "color: inherit" in e.to_html()  # light and dark
    assert e._repr_markdown_() == e.to_markdown()
    big = explain(BIG, BIG_TARGET, max_rows=2, max_classes=3).to_html()
    assert "(rank " in big and "class='target'" not in big.split("<tbody>")[0]


def test_plot(monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    small = explain(LOGITS, TARGET).plot()
    assert len(small.axes) == 2 and "loss 0.4644" in small.axes[0].get_title()
    colors = [tuple(p.get_facecolor()) for p in small.axes[0].patches]
    assert colors[2] != colors[0]  # the target's bar stands out
    large = explain(BIG, BIG_TARGET, max_rows=4).plot()
    assert len(large.axes) == 2 and "ln C" in large.axes[0].get_legend().get_texts()[0].get_text()
    assert len(explain(BIG, BIG.gt(0).float(), "bce-logits", max_rows=4).plot().axes) == 1
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'xentkit\[plot\]'"):
        explain(LOGITS, TARGET).plot()
