"""Test set-up: Triton kernels run under the interpreter when there is no GPU.

TRITON_INTERPRET must be in the environment before any ``@triton.jit`` decorator runs, so it is set here,
before test modules import kernel modules.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
