"""The nn.Module wrappers behave like torch.nn's: same values, buffers, state_dict and .to()."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import xentkit

x, t = torch.randn(4, 5), torch.tensor([0, 1, -100, 4])
w = torch.rand(5) + 0.1
p = torch.rand(4, 5)

MODULES = [
    ("CrossEntropyLoss", {"weight": w, "label_smoothing": 0.1}, (x, t)),
    ("NLLLoss", {"weight": w, "reduction": "sum"}, (x.log_softmax(1), t)),
    ("BCELoss", {"weight": w, "reduction": "none"}, (p, p.round())),
    ("BCEWithLogitsLoss", {"weight": w, "pos_weight": w * 2}, (x, p)),
]


@pytest.mark.parametrize(("name", "kwargs", "args"), MODULES, ids=[m[0] for m in MODULES])
def test_module_matches_torch(name, kwargs, args):
    ours = getattr(xentkit.nn, name)(**kwargs)
    theirs = getattr(torch.nn, name)(**kwargs)
    assert_close(ours(*args), theirs(*args))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours64, theirs64 = ours.to(torch.float64), theirs.to(torch.float64)
    assert ours64.weight.dtype == torch.float64
    args64 = [a.double() if a.is_floating_point() else a for a in args]
    assert_close(ours64(*args64), theirs64(*args64))


def test_cross_entropy_loss_extensions_are_keyword_only():
    loss = xentkit.nn.CrossEntropyLoss(
        None, None, -100, None, "mean", 0.0, z_loss=1e-4, softcap=30.0
    )
    expected = xentkit.cross_entropy(x, t, z_loss=1e-4, softcap=30.0)
    assert_close(loss(x, t), expected)
    with pytest.raises(TypeError):
        xentkit.nn.CrossEntropyLoss(None, None, -100, None, "mean", 0.0, 1e-4)


def test_legacy_arguments_map_to_reduction():
    with pytest.warns(UserWarning, match="deprecated"):
        loss = xentkit.nn.CrossEntropyLoss(reduce=False)
    assert loss.reduction == "none"


def test_linear_cross_entropy_loss_module():
    head = torch.nn.Linear(8, 11)
    h, tt = torch.randn(2, 3, 8), torch.randint(0, 11, (2, 3))
    loss = xentkit.nn.LinearCrossEntropyLoss(label_smoothing=0.1)
    expected = torch.nn.functional.cross_entropy(
        head(h).flatten(0, 1), tt.flatten(), label_smoothing=0.1
    )
    assert_close(loss(h, head.weight, tt, head.bias), expected)
