"""Triton kernels. Without a GPU they run under Triton's interpreter.

The interpreter must be chosen before any ``@triton.jit`` decorator runs, so the choice is made here, when
the first kernel module of this package is imported: no CUDA GPU and no explicit TRITON_INTERPRET -> 1.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
