"""``dsv4lab bench``: time an op through every backend available here and check it against the reference.

For each token count: inputs from ``kernels.inputs`` (same seed for every backend), the reference output,
a float64 oracle (the reference run on float64 copies of the floating-point inputs, where it accepts them),
then per backend ``lab.timing.bench`` and ``lab.numerics.compare(oracle, reference, backend)``.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import get_config
from .kernels import inputs as kin
from .kernels import registry
from .lab import numerics, results, timing

EXPERIMENT = "bench_ops"


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor)]


def _to64(v: Any) -> Any:
    return v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v


def _oracle(ref, args, kwargs) -> list[torch.Tensor] | None:
    try:
        return _outputs(ref(*[_to64(a) for a in args], **{k: _to64(v) for k, v in kwargs.items()}))
    except (TypeError, ValueError):
        return None  # the reference only takes its storage dtypes; the reference output is the oracle then


def _op_shape(op: str, cfg) -> dict[str, int]:
    """Shape arguments of ``roofline.cost`` that the config does not fill by itself."""
    return {"router_gemm": dict(N=cfg.n_routed_experts, K=cfg.hidden_size),
            "rmsnorm": dict(h=cfg.hidden_size)}.get(op, {})


def _cost(op: str, cfg, tokens: int):
    from .lab import roofline

    try:
        return roofline.cost(op, cfg=cfg, T=tokens, **_op_shape(op, cfg))
    except ValueError:  # an op without a roofline row
        return None


def bench(op: str, preset: str = "flash", tokens: list[int] = (1, 64, 4096), device: str = "cpu",
          backends: list[str] | None = None, graph: bool = False, weights: Any = None) -> list[dict[str, Any]]:
    """Records (time + numerics, or 'unavailable' with the reason) for ``op`` (or ``"all"``).

    ``weights``: a ``checkpoint.LayerWeights``; its real tensors replace the synthetic weights of each op
    (activations stay synthetic) and its config replaces ``preset``.
    """
    ops = [o for o in registry.ops() if kin.has_inputs(o)] if op == "all" else [op]
    for o in ops:
        if not kin.has_inputs(o):
            raise ValueError(f"op: no input factory for {o!r}; benchable ops: "
                             f"{[x for x in registry.ops() if kin.has_inputs(x)]}")
    cfg = weights.cfg if weights is not None else get_config(preset)
    extra = {} if weights is None else {"checkpoint": weights.path, "layer": weights.prefix.rstrip(".") or "top"}
    peaks = None
    if device == "cuda":
        try:
            from .lab import roofline
            peaks = roofline.load_peaks(results.gpu_slug())
        except Exception:
            peaks = None
    recs: list[dict[str, Any]] = []
    cases = [(o, t) for o in ops for t in tokens]
    for o, t in tqdm(cases, desc="bench", disable=len(cases) < 3):
        base = dict(experiment=EXPERIMENT, op=o, preset=preset if weights is None else cfg.name, tokens=t, **extra)
        try:
            if weights is None:
                args, kwargs = kin.make_inputs(o, cfg, t, device=device, seed=t)
            else:
                args, kwargs = weights.op_inputs(o, t, seed=t, device=device)
            ref = registry.get(o, "reference")
            ref_out = _outputs(ref(*args, **kwargs))
            oracle = _oracle(ref, args, kwargs) or ref_out
        except Exception as e:  # no inputs/reference for this case: record it, go on with the next case
            recs.append(results.record(backend="reference", variant="bench", dtype=None, metric="error", unit=None,
                                       value=None, message=f"{type(e).__name__}: {e}", **base))
            continue
        for name in backends or registry.backends(o):
            if name not in registry.backends(o):   # a backend list for "all": not every op has every backend
                continue
            ok, why = registry.availability(o, name)
            if not ok:
                recs.append(results.record(backend=name, variant="bench", dtype=None, metric="unavailable",
                                           unit=None, value=None, reason=why, **base))
                continue
            fn = registry.get(o, name)
            call = functools.partial(fn, *args, **kwargs)
            try:
                outs = _outputs(call())
                tm = timing.bench(call, device=device, graph=graph and device == "cuda")
            except Exception as e:  # a failing backend is a record, not a crash
                recs.append(results.record(backend=name, variant="bench", dtype=None, metric="error", unit=None,
                                           value=None, message=f"{type(e).__name__}: {e}", **base))
                continue
            dtype = str(outs[0].dtype).removeprefix("torch.")
            recs.append(tm.to_record(cost=_cost(o, cfg, t), peaks=peaks, backend=name, variant="bench",
                                     dtype=dtype, **base))
            if name != "reference":
                for i, (orc, eag, fus) in enumerate(zip(oracle, ref_out, outs)):
                    if fus.dtype.is_floating_point and fus.shape == orc.shape:
                        c = numerics.compare(orc, eag, fus)
                        recs.extend(c.to_records(backend=name, variant="bench", output=i, **base))
    return recs
