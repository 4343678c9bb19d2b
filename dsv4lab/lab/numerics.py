"""Error metrics for "oracle vs eager vs fused" comparisons (design.md, "Numerics").

All reductions run in float64 over the positions where oracle, eager and fused are all finite:

    max_abs   = max |x - ref|                                  (with the index where it occurs)
    rel_rms   = sqrt( sum (x - ref)^2 / sum ref^2 )
    calc_diff = 1 - 2 sum(x y) / sum(x^2 + y^2)                (0 iff x == y; DeepGEMM's metric)
    err_ratio = err(fused) / err(eager),  err = rel_rms (default) or max_abs, both against the oracle, each
                floored at the unit roundoff of the fused dtype (relative; times max|oracle| for max_abs);
                0/0 counts as 1 (both exact), x/0 as inf; passes when err_ratio <= bar (2 by default)
    ulp_diff  = |ord(a) - ord(b)| where ord maps a float's bits to integers monotonically (+0 and -0 -> 0),
                so adjacent representable values are 1 apart

Non-finite values are handled before anything else: a position where the fused (or eager) output is inf/NaN
and the oracle is not, or the other way round, or with a different inf sign, is a mismatch and fails the check.
Positions where all three agree on the same inf/NaN are left out of the metrics.

Index outputs (top-k) are compared as sets per row (``topk_overlap``): overlap = |A ∩ B| / max(|A|, |B|), with
-1 marking an empty slot, and a row counts as a near tie when the oracle scores at the selection boundary (the
k-th and (k+1)-th largest) differ by at most ``tie_atol + tie_rtol * |s_k|``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# float dtype -> (same-width integer dtype, mask of the magnitude bits)
_BITS = {
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
}


def _check_tensor(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    int_dtype, mag_mask = _BITS[x.dtype]
    i = x.contiguous().view(int_dtype).to(torch.int64)
    mag = i & mag_mask
    return torch.where(i < 0, -mag, mag)


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between same-dtype bf16/fp16/fp32 tensors, as int64.

    ``ulp_diff(x, nextafter(x, inf)) == 1``; +0 and -0 are 0 apart; crossing zero counts the subnormal steps
    on both sides. Positions where either value is NaN get -1 (no distance is defined there).
    """
    _check_tensor("a", a), _check_tensor("b", b)
    if a.dtype != b.dtype or a.dtype not in _BITS:
        raise TypeError(f"a, b: expected the same dtype, one of bf16/fp16/fp32; got {a.dtype} and {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"b: expected shape {tuple(a.shape)} (as a), got {tuple(b.shape)}")
    d = (_ordered_bits(a) - _ordered_bits(b)).abs()
    return torch.where(torch.isnan(a) | torch.isnan(b), torch.full_like(d, -1), d)


def ulp_histogram(d: torch.Tensor) -> dict[str, int]:
    """Counts of ``ulp_diff`` values: exact bins "0".."3", then power-of-two bins "4-7", "8-15", ...,
    and "nan" for the -1 entries. Empty bins are omitted."""
    d = d.reshape(-1).to(torch.int64)
    hist: dict[str, int] = {}
    n_nan = int((d < 0).sum())
    d = d[d >= 0]
    for v in range(4):
        c = int((d == v).sum())
        if c:
            hist[str(v)] = c
    lo = 4
    top = int(d.max()) if d.numel() else 0
    while lo <= top:
        c = int(((d >= lo) & (d < 2 * lo)).sum())
        if c:
            hist[f"{lo}-{2 * lo - 1}"] = c
        lo *= 2
    if n_nan:
        hist["nan"] = n_nan
    return hist


def _masked64(x: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    x, ref = x.detach().to(torch.float64), ref.detach().to(torch.float64)
    if mask is not None:
        x, ref = x[mask], ref[mask]
    return x.reshape(-1), ref.reshape(-1)


def calc_diff(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """``1 - 2 sum(x y) / sum(x^2 + y^2)`` in float64 (0 when both are all zeros). Symmetric in x, y."""
    x, y = _masked64(_check_tensor("x", x), _check_tensor("y", y), mask)
    denom = float((x * x + y * y).sum())
    return 0.0 if denom == 0.0 else 1.0 - 2.0 * float((x * y).sum()) / denom


def rel_rms(x: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """``sqrt(sum (x - ref)^2 / sum ref^2)`` in float64; inf if ``ref`` is all zeros and ``x`` is not."""
    x, ref = _masked64(_check_tensor("x", x), _check_tensor("ref", ref), mask)
    num, den = float(((x - ref) ** 2).sum()), float((ref * ref).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return (num / den) ** 0.5


def max_abs(x: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, tuple[int, ...]]:
    """``max |x - ref|`` (float64) and the index where it occurs, over ``mask`` (all positions if None)."""
    _check_tensor("x", x), _check_tensor("ref", ref)
    diff = (x.detach().to(torch.float64) - ref.detach().to(torch.float64)).abs()
    if mask is not None:
        diff = torch.where(mask, diff, torch.full_like(diff, -1.0))
    if diff.numel() == 0 or float(diff.max()) < 0:
        return 0.0, ()
    flat = int(diff.reshape(-1).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return float(diff.reshape(-1)[flat]), index


def _finite_class(x: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 +inf, 2 -inf, 3 NaN."""
    c = torch.zeros(x.shape, dtype=torch.int8, device=x.device)
    c[torch.isposinf(x)] = 1
    c[torch.isneginf(x)] = 2
    c[torch.isnan(x)] = 3
    return c


def _nonfinite_counts(x: torch.Tensor) -> dict[str, int]:
    return {"nan": int(torch.isnan(x).sum()), "inf": int(torch.isinf(x).sum())}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point and a.element_size() in (1, 2, 4, 8):
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return bool(torch.equal(a.contiguous().view(ints), b.contiguous().view(ints)))
    return bool(torch.equal(a, b))


@dataclass
class Comparison:
    """Result of ``compare``: fused vs oracle, eager vs oracle, fused vs eager (see the module docstring)."""

    shape: tuple[int, ...]
    dtype: str
    max_abs: float
    max_abs_index: tuple[int, ...]
    rel_rms: float
    calc_diff: float
    eager_max_abs: float | None
    eager_max_abs_index: tuple[int, ...] | None
    eager_rel_rms: float | None
    eager_calc_diff: float | None
    err_metric: str
    err_ratio: float | None
    bar: float
    bitwise_equal: bool | None
    nonfinite: dict[str, dict[str, int]]
    nonfinite_mismatch: int          # positions where fused disagrees with the oracle on inf/NaN
    eager_nonfinite_mismatch: int | None
    ulp_hist: dict[str, int] | None  # fused vs eager, when both are bf16/fp16/fp32 of one dtype
    ulp_max: int | None
    ulp_hist_oracle: dict[str, int] | None  # fused vs the oracle rounded to the fused dtype
    passed: bool
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ratio = "n/a" if self.err_ratio is None else f"{self.err_ratio:.3g}"
        return (f"{'PASS' if self.passed else 'FAIL'} max_abs={self.max_abs:.3g} at {self.max_abs_index} "
                f"rel_rms={self.rel_rms:.3g} calc_diff={self.calc_diff:.3g} err_ratio={ratio} (bar {self.bar}) "
                f"bitwise={self.bitwise_equal} ulp_max={self.ulp_max}"
                + (f" [{'; '.join(self.reasons)}]" if self.reasons else ""))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_records(self, **fields: Any) -> list[dict[str, Any]]:
        """Result-store records, one per metric. ``fields`` must hold experiment, op, backend, variant, preset
        and tokens (``dtype`` defaults to the fused output's dtype); anything else is copied onto every record."""
        from . import results

        fields.setdefault("dtype", self.dtype)
        missing = [k for k in ("experiment", "op", "backend", "variant", "preset", "tokens") if k not in fields]
        if missing:
            raise TypeError(f"to_records: missing field(s) {missing}")

        def rec(metric: str, unit: str, value: Any, **extra: Any) -> dict[str, Any]:
            return results.record(metric=metric, unit=unit, value=value, **fields, **extra)

        out = [
            rec("max_abs", "abs", self.max_abs, index=list(self.max_abs_index), eager=self.eager_max_abs,
                eager_index=None if self.eager_max_abs_index is None else list(self.eager_max_abs_index)),
            rec("rel_rms", "1", self.rel_rms, eager=self.eager_rel_rms),
            rec("calc_diff", "1", self.calc_diff, eager=self.eager_calc_diff),
            rec("nonfinite", "count", self.nonfinite_mismatch, counts=self.nonfinite),
            rec("passed", "bool", self.passed, reasons=self.reasons, bar=self.bar, err_metric=self.err_metric),
        ]
        if self.err_ratio is not None:
            out.append(rec("err_ratio", "x", self.err_ratio, bar=self.bar, err_metric=self.err_metric,
                           passed=self.passed))
        if self.bitwise_equal is not None:
            out.append(rec("bitwise_equal", "bool", self.bitwise_equal))
        if self.ulp_hist is not None:
            out.append(rec("ulp_max", "ulp", self.ulp_max, hist=self.ulp_hist, vs="eager",
                           hist_vs_oracle=self.ulp_hist_oracle))
        return out


def compare(oracle: torch.Tensor, eager: torch.Tensor | None, fused: torch.Tensor, bar: float = 2.0,
            err: str = "rel_rms") -> Comparison:
    """Compare a fused output and a same-precision eager output against a high-precision oracle.

    ``passed`` requires: no inf/NaN mismatch between fused and oracle, and ``err_ratio <= bar``
    (``err_ratio`` uses ``err`` = "rel_rms" or "max_abs", both against the oracle). With ``eager=None`` there
    is no ratio and ``passed`` only checks the non-finite pattern. Tensors may live on any device; metrics are
    computed in float64 on that device.
    """
    _check_tensor("oracle", oracle), _check_tensor("fused", fused)
    if eager is not None:
        _check_tensor("eager", eager)
    if err not in ("rel_rms", "max_abs"):
        raise ValueError(f"err: expected 'rel_rms' or 'max_abs', got {err!r}")
    if not bar > 0:
        raise ValueError(f"bar: expected a positive number, got {bar!r}")
    for name, t in (("eager", eager), ("fused", fused)):
        if t is not None and t.shape != oracle.shape:
            raise ValueError(f"{name}: expected shape {tuple(oracle.shape)} (as oracle), got {tuple(t.shape)}")
    for name, t in (("oracle", oracle), ("eager", eager), ("fused", fused)):
        if t is not None and not (t.dtype.is_floating_point or t.dtype.is_complex):
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype} (use topk_overlap for indices)")

    o, f = oracle.detach(), fused.detach().to(oracle.device)
    e = None if eager is None else eager.detach().to(oracle.device)
    cls_o = _finite_class(o)
    fused_bad = _finite_class(f) != cls_o
    mask = (cls_o == 0) & torch.isfinite(f)
    eager_bad = None
    if e is not None:
        eager_bad = _finite_class(e) != cls_o
        mask &= torch.isfinite(e)

    m_f, i_f = max_abs(f, o, mask)
    rr_f, cd_f = rel_rms(f, o, mask), calc_diff(f, o, mask)
    reasons: list[str] = []
    n_bad = int(fused_bad.sum())
    if n_bad:
        reasons.append(f"{n_bad} position(s) where fused is inf/NaN and the oracle is not (or vice versa)")

    m_e = i_e = rr_e = cd_e = ratio = bitwise = hist = ulp_max = None
    if e is not None:
        m_e, i_e = max_abs(e, o, mask)
        rr_e, cd_e = rel_rms(e, o, mask), calc_diff(e, o, mask)
        num, den = (rr_f, rr_e) if err == "rel_rms" else (m_f, m_e)
        # Errors below the output dtype's unit roundoff are rounding, not error: floor both at it, so an eager
        # path that happens to equal the oracle exactly does not make any rounded result an infinite ratio.
        u = torch.finfo(f.dtype).eps / 2 if f.dtype.is_floating_point else 0.0
        floor = u if err == "rel_rms" else u * float(o[mask].abs().max()) if bool(mask.any()) else 0.0
        num, den = max(num, floor), max(den, floor)
        ratio = (1.0 if num == 0.0 else float("inf")) if den == 0.0 else num / den
        bitwise = _bitwise_equal(e, f)
        if not bitwise and not ratio <= bar:
            reasons.append(f"err_ratio {ratio:.3g} > bar {bar}")
        if f.dtype == e.dtype and f.dtype in _BITS:
            d = ulp_diff(f, e)
            hist = ulp_histogram(d)
            ulp_max = int(d.max()) if d.numel() else 0
    hist_o = None
    if f.dtype in _BITS:
        hist_o = ulp_histogram(ulp_diff(f, o.to(f.dtype)))

    return Comparison(
        shape=tuple(o.shape), dtype=str(f.dtype).removeprefix("torch."),
        max_abs=m_f, max_abs_index=i_f, rel_rms=rr_f, calc_diff=cd_f,
        eager_max_abs=m_e, eager_max_abs_index=i_e, eager_rel_rms=rr_e, eager_calc_diff=cd_e,
        err_metric=err, err_ratio=ratio, bar=bar, bitwise_equal=bitwise,
        nonfinite={"oracle": _nonfinite_counts(o), "fused": _nonfinite_counts(f),
                   **({"eager": _nonfinite_counts(e)} if e is not None else {})},
        nonfinite_mismatch=n_bad, eager_nonfinite_mismatch=None if eager_bad is None else int(eager_bad.sum()),
        ulp_hist=hist, ulp_max=ulp_max, ulp_hist_oracle=hist_o,
        passed=not reasons, reasons=reasons,
    )


# ---- index outputs ------------------------------------------------------------------------------------
@dataclass
class TopkOverlap:
    """Row-wise set agreement of two top-k index tensors (see the module docstring)."""

    rows: int
    k: int
    mean_overlap: float
    min_overlap: float
    rows_equal: float                  # fraction of rows whose sets are identical
    mismatched_rows: int
    near_tie_fraction: float | None    # fraction of rows whose boundary is a near tie (needs scores)
    unexplained_rows: int | None       # mismatched rows that are NOT near ties (needs scores)
    passed: bool | None                # unexplained_rows == 0 (None without scores)
    overlap: torch.Tensor = field(repr=False, default=None)  # per-row overlap, shape a.shape[:-1]

    def to_records(self, **fields: Any) -> list[dict[str, Any]]:
        from . import results

        fields.setdefault("dtype", "index")
        base = dict(rows=self.rows, k=self.k)
        out = [results.record(metric="topk_overlap", unit="1", value=self.mean_overlap, min=self.min_overlap,
                              rows_equal=self.rows_equal, mismatched_rows=self.mismatched_rows, **base, **fields)]
        if self.near_tie_fraction is not None:
            out.append(results.record(metric="near_tie_fraction", unit="1", value=self.near_tie_fraction,
                                      **base, **fields))
            out.append(results.record(metric="topk_unexplained_rows", unit="count", value=self.unexplained_rows,
                                      passed=self.passed, **base, **fields))
        return out


def _rows(name: str, x: torch.Tensor) -> torch.Tensor:
    _check_tensor(name, x)
    if x.dtype.is_floating_point or x.dtype == torch.bool or x.dim() < 1:
        raise TypeError(f"{name}: expected an integer index tensor [..., k], got {x.dtype} with {x.dim()} dims")
    x2 = x.detach().reshape(math.prod(x.shape[:-1]), x.shape[-1]).to(torch.int64)
    s = x2.sort(-1).values
    if ((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).any():
        raise ValueError(f"{name}: a row holds the same index twice")
    return x2


def topk_overlap(a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor | None = None, *,
                 tie_rtol: float = 2.0 ** -7, tie_atol: float = 0.0) -> TopkOverlap:
    """Compare index sets row by row; ``a`` is the reference selection, -1 marks an empty slot.

    ``scores`` (optional, shape ``[..., N]`` matching ``a``'s leading dims) are the oracle scores the
    selection was made from. A row is a near tie when, with ``kv`` = number of valid entries of ``a``'s row
    and ``s`` the row's scores sorted descending, ``s[kv-1] - s[kv] <= tie_atol + tie_rtol * |s[kv-1]|``.
    Default ``tie_rtol = 2^-7``: one bf16 rounding moves a score by at most half an ulp, i.e. 2^-8 relative
    (8-bit significand), so two scores closer than 2 x 2^-8 = 2^-7 can swap order in a bf16 pipeline.
    """
    a2, b2 = _rows("a", a), _rows("b", b)
    if a.shape != b.shape:
        raise ValueError(f"b: expected shape {tuple(a.shape)} (as a), got {tuple(b.shape)}")
    rows, k = a2.shape
    b2 = b2.to(a2.device)
    if k:
        bs = b2.sort(-1).values
        pos = torch.searchsorted(bs, a2).clamp(max=k - 1)
        inter = ((bs.gather(-1, pos) == a2) & (a2 >= 0)).sum(-1)
    else:
        inter = torch.zeros(rows, dtype=torch.int64, device=a2.device)
    na, nb = (a2 >= 0).sum(-1), (b2 >= 0).sum(-1)
    denom = torch.maximum(na, nb)
    overlap = torch.where(denom == 0, torch.ones_like(inter, dtype=torch.float64),
                          inter.double() / denom.clamp(min=1).double())
    mismatch = overlap < 1

    tie_frac = unexplained = passed = None
    if scores is not None:
        _check_tensor("scores", scores)
        if scores.shape[:-1] != a.shape[:-1]:
            raise ValueError(f"scores: expected leading shape {tuple(a.shape[:-1])}, got {tuple(scores.shape)}")
        s = scores.detach().reshape(rows, -1).to(a2.device, torch.float64).sort(-1, descending=True).values
        n = s.shape[-1]
        has_boundary = (na > 0) & (na < n)
        kv = na.clamp(1, max(n - 1, 1))
        if n >= 2:
            last_in = s.gather(-1, (kv - 1)[:, None])[:, 0]
            first_out = s.gather(-1, kv[:, None])[:, 0]
            tie = has_boundary & ((last_in - first_out).abs() <= tie_atol + tie_rtol * last_in.abs())
        else:
            tie = torch.zeros(rows, dtype=torch.bool, device=a2.device)
        tie_frac = float(tie.double().mean()) if rows else 0.0
        unexplained = int((mismatch & ~tie).sum())
        passed = unexplained == 0

    return TopkOverlap(
        rows=rows, k=k,
        mean_overlap=float(overlap.mean()) if rows else 1.0,
        min_overlap=float(overlap.min()) if rows else 1.0,
        rows_equal=float((~mismatch).double().mean()) if rows else 1.0,
        mismatched_rows=int(mismatch.sum()),
        near_tie_fraction=tie_frac, unexplained_rows=unexplained, passed=passed,
        overlap=overlap.reshape(a.shape[:-1]),
    )
