"""Inventory of input contracts: every registered op x every backend x every row of ``kernels.contracts.CASES``.

A row mutates the op's small valid inputs (``contracts.base_inputs``) and states the outcome: a ValueError /
TypeError whose message names the argument, empty outputs (T = 0 or no complete block), NaN propagated to the
poisoned token's outputs (and to no earlier token), or a normal finite run. Rows run for every backend that can
run here (GPU-only backends on a GPU, skipped on a CPU with the registry's reason); references on the CPU.
Separately, every GPU-only backend is called with CPU tensors ON THIS MACHINE and must refuse with a
ValueError/TypeError naming an argument (before any launch), not crash or hang.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re

import pytest
import torch

from dsv4lab.kernels import contracts as C
from dsv4lab.kernels import registry

EXPECTS = {"ValueError", "TypeError", "empty", "nan", "ok"}
GPU_BACKENDS = {(op, be) for op in registry.ops() for be in registry.backends(op)
                if "cuda" in registry._lookup(op, be).requires}


def device_for(op: str, backend: str) -> str:
    if backend == "reference":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def rows():
    for op in registry.ops():
        for backend in registry.backends(op):
            for case in C.CASES.get(op, []):
                yield pytest.param(op, backend, case, id=f"{op}-{backend}-{case.name}")


def outputs(out) -> list[torch.Tensor]:
    return [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor)]


def test_table_covers_every_registered_op():
    assert set(C.CASES) == set(registry.ops())
    for op in registry.ops():
        assert C.has_base_inputs(op), op
        kinds = {c.expect for c in C.CASES[op]}
        assert kinds <= EXPECTS, (op, kinds)
        assert "empty" in kinds, f"{op}: no T = 0 row"
        assert kinds & {"ValueError", "TypeError"}, f"{op}: no bad-input row"
        names = [c.name for c in C.CASES[op]]
        assert len(names) == len(set(names)), f"{op}: duplicate case names"
    for op, backend, name in C.KNOWN_GAPS:       # every known gap names a real row
        assert backend in registry.backends(op) and name in {c.name for c in C.CASES[op]}, (op, backend, name)


@pytest.mark.parametrize("op", registry.ops())
def test_rows_name_real_arguments(op):
    """Every mutation/argument of the table refers to a parameter of the op's (shared) signature."""
    ref = registry._load(registry._lookup(op, registry.backends(op)[0]).target)
    params = set(inspect.signature(ref).parameters)
    for case in C.CASES[op]:
        assert case.arg is None or case.arg in params, (op, case.name, case.arg)


@pytest.mark.parametrize("op, backend, case", list(rows()))
def test_contract_row(op, backend, case, request):
    ok, why = registry.availability(op, backend)
    if not ok:
        pytest.skip(f"{op}/{backend} unavailable here: {why}")
    gap = C.KNOWN_GAPS.get((op, backend, case.name))
    if gap and (not gap.startswith("interpreter:") or os.environ.get("TRITON_INTERPRET") == "1"):
        request.applymarker(pytest.mark.xfail(reason=gap, strict=True))
    fn = registry.get(op, backend)
    args, kwargs = C.base_inputs(op, case.tokens, device=device_for(op, backend), seed=1)
    bound = C.bind(fn, args, kwargs)
    case.mutate(bound)
    expect = case.expected(backend)
    if expect in ("ValueError", "TypeError"):
        exc = ValueError if expect == "ValueError" else TypeError
        with pytest.raises(exc, match=rf"(?<![\w.]){re.escape(case.arg)}(?!\w)"):   # the name as a word
            C.call(fn, bound)
        return
    outs = outputs(C.call(fn, bound))
    assert outs, "no tensor outputs"
    if expect == "empty":
        assert all(o.shape[0] == 0 for o in outs), [tuple(o.shape) for o in outs]
    elif expect == "ok":
        for o in outs:
            if o.is_floating_point():
                assert torch.isfinite(o.float()).all()
    elif expect == "nan":
        poisoned = _poisoned_row(bound, case)
        floats = [o for o in outs if o.is_floating_point() and o.shape[0] > 0]
        assert any(not torch.isfinite(o[poisoned].float()).all() for o in floats), \
            "NaN/inf in the input vanished from the poisoned token's outputs"
        for o in floats:    # causal ops may spread it forward, never backward
            assert torch.isfinite(o[:poisoned].float()).all(), "NaN/inf reached an earlier token's output"


def _poisoned_row(bound: dict, case: C.Case) -> int:
    """The output row of the poisoned token (compressor: the entry of its block)."""
    name = case.name.removeprefix("nan_in_").removeprefix("inf_in_")
    x = bound[name]
    rows = torch.nonzero(~torch.isfinite(x.float().reshape(x.shape[0], -1)).all(1)).flatten()
    t = int(rows[0])
    ratio = bound.get("ratio")
    return t // ratio if isinstance(ratio, int) and "ratio" in bound and "wkv" in bound else t


# ---- GPU-only backends given CPU tensors: refused before any launch, on this machine ----------------------------
@pytest.mark.parametrize("op, backend", sorted(GPU_BACKENDS), ids=lambda v: v)
def test_gpu_backend_refuses_cpu_tensors(op, backend):
    target = registry._lookup(op, backend).target
    mod, name = target.split(":")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except Exception as e:  # the module itself cannot import here (not expected: GPU libs are imported lazily)
        pytest.fail(f"{target} must import without its GPU library: {type(e).__name__}: {e}")
    args, kwargs = C.base_inputs(op, 5, device="cpu", seed=1)
    params = set(inspect.signature(fn).parameters)
    with pytest.raises((ValueError, TypeError)) as err:
        fn(*args, **kwargs)
    named = re.match(r"^([A-Za-z_][\w/]*)[: ]", str(err.value))
    assert named and any(p in params for p in named.group(1).split("/")), \
        f"the message must start with the argument's name: {err.value}"
    assert not isinstance(err.value, registry.BackendUnavailable)


@pytest.mark.parametrize("op", [op for op in registry.ops() if "triton" in registry.backends(op)])
def test_triton_backend_refuses_cpu_tensors_on_a_gpu(op):
    """With a GPU (no interpreter) the Triton launchers refuse CPU tensors instead of handing host pointers over."""
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a GPU without TRITON_INTERPRET (on a CPU the interpreter runs CPU tensors legitimately)")
    fn = registry.get(op, "triton")
    args, kwargs = C.base_inputs(op, 5, device="cpu", seed=1)
    with pytest.raises((ValueError, TypeError)):
        fn(*args, **kwargs)
