"""Every bad input raises the exception type PyTorch raises, with a message that names the
argument and the fix; never a silently wrong number."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xentkit

x = torch.randn(3, 5)
t = torch.tensor([0, 1, 2])
p = torch.rand(3, 5)

# (case id, function name, args, kwargs, a word the message must contain)
SAME_AS_TORCH = [
    ("target out of range", "cross_entropy", (x, torch.tensor([0, 1, 5])), {}, "target"),
    ("negative target", "cross_entropy", (x, torch.tensor([0, -3, 1])), {}, "ignore_index"),
    ("1-based labels", "nll_loss", (x, torch.tensor([1, 5, 3])), {}, "start at 1"),
    ("float index target", "cross_entropy", (x, t.float()), {}, "target.long()"),
    (
        "one-hot, wrong layout",
        "cross_entropy",
        (torch.randn(2, 5, 4), torch.zeros(2, 4, 5)),
        {},
        "argmax",
    ),
    ("int32 target", "cross_entropy", (x, t.int()), {}, "target.long()"),
    ("bool target", "nll_loss", (x, t.bool()), {}, "target"),
    ("batch size mismatch", "cross_entropy", (x, t[:2]), {}, "target"),
    ("multi-target", "nll_loss", (x, torch.zeros(3, 2, dtype=torch.long)), {}, "multi-label"),
    (
        "transposed sequence",
        "cross_entropy",
        (torch.randn(2, 5, 4), torch.zeros(2, 3, dtype=torch.long)),
        {},
        "movedim",
    ),
    ("unbatched target size", "cross_entropy", (x[0], torch.tensor([1, 2])), {}, "(N, C)"),
    ("probs with ignore_index", "cross_entropy", (x, p), {"ignore_index": 1}, "ignore_index"),
    ("weight length", "cross_entropy", (x, t), {"weight": torch.ones(4)}, "length 5"),
    ("weight length probs", "cross_entropy", (x, p), {"weight": torch.ones(4)}, "weight"),
    ("weight 2-D", "nll_loss", (x, t), {"weight": torch.ones(5, 1)}, "1-D"),
    ("weight dtype", "cross_entropy", (x, t), {"weight": torch.ones(5).double()}, "weight.to"),
    ("unknown reduction", "cross_entropy", (x, t), {"reduction": "avg"}, "'mean'"),
    ("unknown reduction nll", "nll_loss", (x, t), {"reduction": "avg"}, "'sum'"),
    ("label smoothing > 1", "cross_entropy", (x, t), {"label_smoothing": 1.5}, "label_smoothing"),
    ("integer logits", "cross_entropy", (x.long(), t), {}, "float"),
    ("0-d input", "cross_entropy", (torch.tensor(1.0), torch.tensor(0)), {}, "class"),
    ("integer softmax", "softmax", (x.long(), 1), {}, "float"),
    ("softmax dim", "softmax", (x, 2), {}, "dim"),
    (
        "bce input > 1",
        "binary_cross_entropy",
        (torch.tensor([0.5, 1.5]), torch.ones(2)),
        {},
        "logits",
    ),
    (
        "bce nan input",
        "binary_cross_entropy",
        (torch.tensor([float("nan")]), torch.ones(1)),
        {},
        "0 and 1",
    ),
    (
        "bce target > 1",
        "binary_cross_entropy",
        (torch.rand(3), torch.tensor([0, 1, 2.0])),
        {},
        "target",
    ),
    ("bce shape", "binary_cross_entropy", (torch.rand(3), torch.rand(2)), {}, "size"),
    ("bce broadcast shape", "binary_cross_entropy", (torch.rand(3, 2), torch.rand(2)), {}, "size"),
    (
        "bce int target",
        "binary_cross_entropy",
        (torch.rand(3), torch.tensor([0, 1, 1])),
        {},
        "target",
    ),
    (
        "bce double target",
        "binary_cross_entropy",
        (torch.rand(3), torch.rand(3).double()),
        {},
        "target",
    ),
    ("bce weight shape", "binary_cross_entropy", (p, p), {"weight": torch.ones(3)}, "weight"),
    ("bce reduction", "binary_cross_entropy", (p, p), {"reduction": "x"}, "reduction"),
    ("bcel shape", "binary_cross_entropy_with_logits", (torch.rand(3), torch.rand(2)), {}, "size"),
    ("bcel int target", "binary_cross_entropy_with_logits", (x, t), {}, "target"),
    (
        "bcel pos_weight",
        "binary_cross_entropy_with_logits",
        (x, p),
        {"pos_weight": torch.ones(3)},
        "pos_weight",
    ),
    (
        "bcel weight",
        "binary_cross_entropy_with_logits",
        (x, p),
        {"weight": torch.ones(3)},
        "weight",
    ),
    ("bcel reduction", "binary_cross_entropy_with_logits", (x, p), {"reduction": "x"}, "reduction"),
]


def _raised(fn, args, kwargs) -> BaseException:
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize(
    ("name", "args", "kwargs", "word"),
    [c[1:] for c in SAME_AS_TORCH],
    ids=[c[0] for c in SAME_AS_TORCH],
)
def test_bad_input_raises_torchs_exception_type(name, args, kwargs, word):
    theirs = _raised(getattr(F, name), args, kwargs)
    ours = _raised(getattr(xentkit, name), args, kwargs)
    assert isinstance(ours, type(theirs)), f"torch raised {type(theirs).__name__}: {theirs}"
    assert word in str(ours), str(ours)


EXTENSIONS = [
    ("negative label smoothing", {"label_smoothing": -0.1}, RuntimeError, "label_smoothing"),
    ("negative z_loss", {"z_loss": -1.0}, ValueError, "z_loss"),
    ("zero softcap", {"softcap": 0.0}, ValueError, "softcap"),
    ("negative softcap", {"softcap": -30.0}, ValueError, "softcap"),
    ("unknown backend", {"backend": "cuda"}, ValueError, "backend"),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "word"), [c[1:] for c in EXTENSIONS], ids=[c[0] for c in EXTENSIONS]
)
def test_bad_extension_arguments(kwargs, error, word):
    """Torch accepts a negative label_smoothing silently; xentkit refuses it like one above 1."""
    with pytest.raises(error, match=word):
        xentkit.cross_entropy(x, t, **kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "word"),
    [
        ((torch.randn(4, 8), torch.randn(8, 8), t[:3]), {}, ValueError, "target"),
        (
            (torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long)),
            {},
            ValueError,
            "nn.Linear",
        ),
        (
            (torch.randn(4, 8), torch.randn(10, 8), torch.full((4,), 10)),
            {},
            IndexError,
            "out of bounds",
        ),
        (
            (torch.randn(4, 8), torch.randn(10, 8).double(), torch.zeros(4, dtype=torch.long)),
            {},
            RuntimeError,
            "dtype",
        ),
        ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4)), {}, RuntimeError, "target.long"),
        (
            (
                torch.randn(4, 8),
                torch.randn(10, 8),
                torch.zeros(4, dtype=torch.long),
                torch.zeros(9),
            ),
            {},
            RuntimeError,
            "bias",
        ),
        (
            (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)),
            {"class_weight": torch.ones(9)},
            RuntimeError,
            "10 classes",
        ),
        (
            (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)),
            {"reduction": "avg"},
            ValueError,
            "reduction",
        ),
        (
            (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)),
            {"softcap": -1.0},
            ValueError,
            "softcap",
        ),
    ],
)
def test_linear_cross_entropy_bad_input(args, kwargs, error, word):
    with pytest.raises(error, match=word):
        xentkit.linear_cross_entropy(*args, **kwargs)


def test_error_never_silently_wrong_for_ignored_out_of_range_target():
    """An out-of-range label equal to ignore_index is ignored, as in torch: not an error."""
    tt = torch.tensor([0, 1, 7])
    got = xentkit.cross_entropy(x, tt, ignore_index=7, reduction="none")
    torch.testing.assert_close(got, F.cross_entropy(x, tt, ignore_index=7, reduction="none"))
