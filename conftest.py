"""Shared test settings, for the tests and the doctests of the package.

TRITON_INTERPRET must be set before Triton is first imported, so the Triton kernels run on
CPU tensors through the interpreter in every test process.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "xentkit",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("xentkit")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
