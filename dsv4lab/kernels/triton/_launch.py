"""A cheaper host path for launching small Triton kernels many times with the same specialisation.

``kernel[grid](*args)`` costs tens of microseconds of Python per call in Triton 3.x (argument binding,
specialisation key, cache lookup, global-value checks) before the C launcher runs. For a kernel that runs for
~5 us (the MTP norms at decode sizes) that host time *is* the eager-mode cost. ``CachedLauncher`` pays the full
path once per specialisation and afterwards calls the compiled kernel's own launcher
(``CompiledKernel.run``, the same function ``JITFunction.run`` ends in) with the same arguments.

The cache key must cover everything Triton specialises on, or a cached binary would be reused where Triton would
have compiled another one: for each tensor its dtype and whether its address is 16-byte aligned (Triton's
pointer-divisibility specialisation), every int by value (covers ``== 1``, ``% 16`` and the 32/64-bit choice),
floats and the other arguments by type and value, and the device and ``num_warps``. Not covered: Triton's debug
and instrumentation knobs, its used-global-values check and pre-run hooks (dsv4lab sets none of them). Tensors on a
device other than the current one take the normal path under that device (Triton launches on the current device).
Whenever Triton's launch hooks are set (a profiler such as proton is attached) or the interpreter is on, every call
takes the normal path.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import triton
from triton import knobs


def hooks_active() -> bool:
    """Whether Triton's launch hooks would do anything. Triton 3.6 keeps them as a ``HookChain`` that is never
    None (empty ``calls`` when nothing is attached); older versions use None."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and (not hasattr(hook, "calls") or hook.calls):
            return True
    return False


def _arg_key(a: Any) -> Any:
    kind = type(a)
    if kind is int or kind is bool or kind is float:
        # by value: ints for Triton's == 1 / % 16 / i32-i64 choice, floats in case one is a constexpr
        return (kind, a)
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    return (kind, a)


class CachedLauncher:
    """Launch ``jit_fn`` with all arguments positional (constexprs included, in declaration order)."""

    def __init__(self, jit_fn: triton.runtime.JITFunction):
        self.jit_fn = jit_fn
        self.compiled: dict[tuple, Any] = {}
        self.interpret = os.environ.get("TRITON_INTERPRET") == "1"

    def __call__(self, grid: tuple[int, int, int], device: torch.device, args: tuple, num_warps: int) -> None:
        if self.interpret or hooks_active():
            self.jit_fn[grid](*args, num_warps=num_warps)
            return
        if device.index != torch._C._cuda_getDevice():
            # Triton launches on the current device; a cached binary belongs to one device's context
            with torch.cuda.device(device):
                self.jit_fn[grid](*args, num_warps=num_warps)
            return
        key = (device.index, num_warps, *map(_arg_key, args))
        kernel = self.compiled.get(key)
        if kernel is None:
            # first call of this specialisation: Triton's own path (compiles or loads from its cache)
            self.compiled[key] = self.jit_fn[grid](*args, num_warps=num_warps)
            return
        stream = torch._C._cuda_getCurrentRawStream(device.index)
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None,
                   None, None, *args)
