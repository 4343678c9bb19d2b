"""Triton: the masked grouped-GEMM layout for the Hopper MoE (decode path), and the weighted combine of both layouts.

A token's slots are its k routed experts followed by the S width-I slices of the shared expert (weight 1):

    group(t, j) = ids[t, j]                                       j < k
                = n_routed + (j - k) * C + t // M_max             k <= j < k + S

C = ceil(T / M_max) "shared chunks": every token takes the shared expert, so its S slices are split into C groups of
at most M_max tokens each (C = 1 at decode; at a prefill M_max follows the largest routed group instead of T, and
the shared weights are repeated C times in the B operand, see ``grouped_moe.masked_experts``).

Masked layout (DeepGEMM ``m_grouped_fp8_gemm_nt_masked``): activations [G, M_max, D]; group g owns rows
0 .. masked_m[g]-1 of its [M_max, D] slab, in flattened (token-major) slot order:

    slot(t, j)  = #{(t', j') before (t, j) in flattened order : group(t', j') == group(t, j)}
    masked_m[g] = #{(t, j) : group(t, j) == g}
    row(t, j)   = group(t, j) * M_max + slot(t, j)          (row of the [G * M_max, N] view of a GEMM output)

No host sync: with distinct experts per token no routed group holds more than T slots, so M_max = align(T, 128) is
a static bound (DeepGEMM's TMA stores write whole BLOCK_M in {64, 128} row tiles from a group's first row, so M_max
must be a multiple of 128 or a tile would spill into the next group). Slots past M_max (only possible when a token
repeats an expert, or with an explicit smaller M_max) get slot -1 and are dropped; ``plan_masked(validate=True)``
raises ValueError for them instead (one host sync).

Kernels (each one launch):
- ``_plan_kernel``   grid (G + 1,): program g scans all slots in order with a running count (block cumsum) and writes
  slot(t, j) for its own slots and masked_m[g]; program G writes slot -1 for ids outside [0, n_routed).
- ``_scatter_kernel`` grid (T * (k + S),): copies the fp8 row of x (as bytes) and its 1x128 scales to
  (group, slot); scales go to an MN-major [G, D/128, M_max] buffer (what DeepGEMM's sm90 kernel reads, so it
  skips its own transpose); also writes row(t, j).
- ``_combine_kernel`` grid (T, D / BLOCK_D): y[t] = sum_j w_j * out[row(t, j)] in fp32, j in slot order, one
  rounding to the output dtype at the end. Shared slots use w = 1. fp-fusion off: each step is a rounded product
  then a rounded sum, as ``y += w * o`` in torch; used by the contiguous layout too, so the two layouts give the
  same bits whenever their GEMM outputs agree.

Input contract: ids int32/int64 [T, k] contiguous; n_routed, n_shared >= 0 with n_routed > 0; x_q e4m3 [T, D]
and x_sf fp32 [T, D/128] with D a multiple of 128; M_max a positive multiple of ``M_ALIGN``; weights fp32 [T, k];
out [R, N] bf16/fp16/fp32 contiguous; rows int32/int64 [T, k + S] with entries in [0, R).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..reference import _checks as chk

QUANT_BLOCK = 128
M_ALIGN = 128                # DeepGEMM sm90 masked kernel: BLOCK_M in {64, 128}
_PLAN_BLOCK = 1024
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _group_of(ids_ptr, i, k, n_slots, n_routed, m_max, shared_chunks):
    """Group of flattened slot i (vector or scalar)."""
    t = i // n_slots
    j = i % n_slots
    routed = tl.load(ids_ptr + t * k + j, mask=j < k, other=0).to(tl.int32)
    routed = tl.where((routed >= 0) & (routed < n_routed), routed, -1)    # a bad id belongs to no group
    return tl.where(j < k, routed, n_routed + (j - k) * shared_chunks + t // m_max)


@triton.jit
def _plan_kernel(ids_ptr, slot_ptr, masked_m_ptr, total, k, n_slots, n_routed, n_groups, m_max, shared_chunks,
                 BLOCK: tl.constexpr):
    g = tl.program_id(0)
    count = tl.sum(tl.zeros((BLOCK,), tl.int32), 0)
    start = total * 0
    while start < total:     # a while loop: the CPU interpreter cannot range() over a runtime bound
        i = start + tl.arange(0, BLOCK)
        inb = i < total
        grp = _group_of(ids_ptr, i, k, n_slots, n_routed, m_max, shared_chunks)
        if g < n_groups:
            hit = (grp == g) & inb
            pos = count + tl.cumsum(hit.to(tl.int32), 0) - 1
            tl.store(slot_ptr + i, tl.where(pos < m_max, pos, -1), mask=hit)
            count += tl.sum(hit.to(tl.int32), 0)
        else:
            bad = (grp < 0) & inb
            tl.store(slot_ptr + i, tl.full((BLOCK,), -1, tl.int32), mask=bad)
        start += BLOCK
    if g < n_groups:
        tl.store(masked_m_ptr + g, tl.minimum(count, m_max))


@triton.jit
def _scatter_kernel(ids_ptr, slot_ptr, xq_ptr, xsf_ptr, a_ptr, asf_ptr, rows_ptr, k, n_slots, n_routed, m_max,
                    shared_chunks, hidden, n_chunks, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    i = tl.program_id(0)
    t = (i // n_slots).to(tl.int64)
    g = _group_of(ids_ptr, i, k, n_slots, n_routed, m_max, shared_chunks).to(tl.int64)
    slot = tl.load(slot_ptr + i)
    ok = slot >= 0
    tl.store(rows_ptr + i, tl.where(ok, g * m_max + slot, -1).to(tl.int32))
    dst = (g * m_max + slot) * hidden
    col = tl.arange(0, BLOCK_D)                                               # BLOCK_D >= hidden: one pass
    m = (col < hidden) & ok
    tl.store(a_ptr + dst + col, tl.load(xq_ptr + t * hidden + col, mask=m), mask=m)
    c = tl.arange(0, BLOCK_C)
    mc = (c < n_chunks) & ok
    sf = tl.load(xsf_ptr + t * n_chunks + c, mask=mc)
    tl.store(asf_ptr + g * n_chunks * m_max + c * m_max + slot, sf, mask=mc)     # MN-major [G, D/128, M_max]


@triton.jit
def _combine_kernel(out_ptr, rows_ptr, w_ptr, y_ptr, n_out, k, N_SLOTS: tl.constexpr, BLOCK_D: tl.constexpr,
                    SOFT_BF16: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    inb = col < n_out
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for j in tl.static_range(N_SLOTS):
        row = tl.load(rows_ptr + t * N_SLOTS + j).to(tl.int64)
        w = tl.load(w_ptr + t * k + j, mask=j < k, other=1.0)
        o = tl.load(out_ptr + row * n_out + col, mask=inb & (row >= 0), other=0.0).to(tl.float32)
        acc = acc + w * o
    if SOFT_BF16:   # the interpreter's fp32 -> bf16 cast truncates: round to nearest even on the bits first
        bits = acc.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        acc = bits.to(tl.float32, bitcast=True)
    tl.store(y_ptr + t * n_out + col, acc.to(y_ptr.dtype.element_ty), mask=inb)


# ---- host side ---------------------------------------------------------------------------------------------------
@dataclass
class MaskedLayout:
    """``slot[t, j]``: position of slot (t, j) inside its group's slab (-1 = dropped); ``masked_m[g]``: rows of g."""

    slot: torch.Tensor        # int32 [T, k + S]
    masked_m: torch.Tensor    # int32 [G]
    m_max: int
    n_routed: int
    n_shared: int
    shared_chunks: int        # C: groups per shared slice

    @property
    def n_groups(self) -> int:
        return self.n_routed + self.n_shared * self.shared_chunks

    def groups(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [T, k + S] group of every slot (torch; for tests and inspection)."""
        t = ids.shape[0]
        chunk = torch.arange(t, device=ids.device) // self.m_max
        shared = [self.n_routed + s * self.shared_chunks + chunk for s in range(self.n_shared)]
        return torch.cat((ids.long(), *(c[:, None] for c in shared)), dim=1)


def _check_device(name: str, x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"{name}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")


def _check_ids(ids: torch.Tensor, n_routed: int, n_shared: int) -> None:
    chk.tensor("ids", ids, chk.INT_DTYPES, dim=2)
    chk.positive_int("n_routed", n_routed)
    if not isinstance(n_shared, int) or isinstance(n_shared, bool) or n_shared < 0:
        raise ValueError(f"n_shared: expected an int >= 0, got {n_shared!r}")
    if not ids.is_contiguous():
        raise ValueError("ids: expected a contiguous tensor")


def default_m_max(tokens: int) -> int:
    """The static bound: T rounded up to ``M_ALIGN`` (no group can hold more than T slots of distinct experts)."""
    return max(M_ALIGN, -(-tokens // M_ALIGN) * M_ALIGN)


def routed_counts(ids: torch.Tensor, n_routed: int) -> torch.Tensor:
    """int64 [n_routed] slots per routed expert (torch, no sync; ids clamped into range)."""
    counts = torch.zeros(n_routed, dtype=torch.int64, device=ids.device)
    flat = ids.reshape(-1).long()
    counts.scatter_add_(0, flat.clamp(0, n_routed - 1), torch.ones_like(flat))
    return counts


def prefill_m_max(ids: torch.Tensor, n_routed: int) -> int:
    """M_max from the largest routed group, rounded up to ``M_ALIGN`` (one host sync)."""
    return default_m_max(int(routed_counts(ids, n_routed).max()) if ids.numel() else 0)


def plan_masked(ids: torch.Tensor, n_routed: int, n_shared: int = 0, m_max: int | None = None, *,
                validate: bool = True) -> MaskedLayout:
    """Slot positions and per-group row counts of the masked layout (see the module docstring).

    ``m_max`` defaults to ``default_m_max(T)``; the shared slices get ``ceil(T / m_max)`` chunk groups each.
    ``validate=True`` checks on the host (one sync) that every id is in [0, n_routed) and that no routed group
    exceeds ``m_max``, raising ValueError before any launch; ``validate=False`` never syncs (CUDA-graph safe): bad
    ids and overflowing slots are then dropped (slot -1)."""
    _check_ids(ids, n_routed, n_shared)
    t, k = ids.shape
    m_max = default_m_max(t) if m_max is None else m_max
    chk.positive_int("m_max", m_max)
    if m_max % M_ALIGN:
        raise ValueError(f"m_max: expected a multiple of {M_ALIGN} (DeepGEMM writes whole row tiles), got {m_max}")
    if validate and ids.numel():
        lo, hi, most = torch.stack((*torch.aminmax(ids.long()), routed_counts(ids, n_routed).max())).tolist()
        if lo < 0 or hi >= n_routed:
            raise ValueError(f"ids: expected expert ids in [0, {n_routed}), got values in [{lo}, {hi}]")
        if most > m_max:
            raise ValueError(f"m_max: a group receives {most} slots but m_max={m_max} (a token repeating an expert, "
                             f"or m_max below the largest group); pass m_max >= {most}")
    n_slots = k + n_shared
    chunks = max(1, -(-t // m_max))
    layout = MaskedLayout(torch.empty((t, n_slots), dtype=torch.int32, device=ids.device),
                          torch.empty(n_routed + n_shared * chunks, dtype=torch.int32, device=ids.device),
                          m_max, n_routed, n_shared, chunks)
    if t == 0:
        layout.masked_m.zero_()
        return layout
    _check_device("ids", ids)
    _plan_kernel[(layout.n_groups + 1,)](ids, layout.slot, layout.masked_m, t * n_slots, k, n_slots, n_routed,
                                         layout.n_groups, m_max, chunks, BLOCK=_PLAN_BLOCK, num_warps=4)
    return layout


def scatter_masked(x_q: torch.Tensor, x_sf: torch.Tensor, ids: torch.Tensor, layout: MaskedLayout
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a e4m3 [G, M_max, D], a_sf fp32 [G, M_max, D/128] (an MN-major view), rows int32 [T, k + S])``.

    Rows of a group past ``masked_m`` are left unwritten: the masked GEMM never reads them into a valid output row."""
    chk.tensor("x_q", x_q, (torch.float8_e4m3fn,), dim=2)
    t, d = x_q.shape
    if d % QUANT_BLOCK or not x_q.is_contiguous():
        raise ValueError(f"x_q: expected a contiguous [T, D] with D a multiple of {QUANT_BLOCK}, got {tuple(x_q.shape)}")
    chk.tensor("x_sf", x_sf, (torch.float32,), dim=2)
    chk.shape("x_sf", x_sf, (t, d // QUANT_BLOCK))
    if not x_sf.is_contiguous():
        raise ValueError("x_sf: expected a contiguous tensor")
    _check_ids(ids, layout.n_routed, layout.n_shared)
    chk.shape("ids", ids, (t, layout.slot.shape[1] - layout.n_shared))
    chk.same_device(x_q=x_q, x_sf=x_sf, ids=ids, slot=layout.slot)
    g, m_max, n_chunks = layout.n_groups, layout.m_max, d // QUANT_BLOCK
    a = torch.empty((g, m_max, d), dtype=torch.float8_e4m3fn, device=x_q.device)
    sf_store = torch.empty((g, n_chunks, m_max), dtype=torch.float32, device=x_q.device)
    rows = torch.empty_like(layout.slot)
    if t:
        _check_device("x_q", x_q)
        n_slots = layout.slot.shape[1]
        _scatter_kernel[(t * n_slots,)](
            ids, layout.slot, x_q.view(torch.uint8), x_sf, a.view(torch.uint8), sf_store, rows, ids.shape[1],
            n_slots, layout.n_routed, m_max, layout.shared_chunks, d, n_chunks, BLOCK_D=triton.next_power_of_2(d),
            BLOCK_C=triton.next_power_of_2(n_chunks), num_warps=4)
    return a, sf_store.transpose(1, 2), rows


def combine_rows(out: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype, *,
                 check_rows: bool = True) -> torch.Tensor:
    """``y[t] = sum_j w[t, j] * out[rows[t, j]]`` (fp32, slot order; w = 1 for j >= k, the shared slots; rows < 0
    contribute 0), rounded once to ``dtype``. ``out`` is [R, N] (a masked output is passed as its [G*M_max, N] view)."""
    chk.tensor("out", out, (torch.bfloat16, torch.float16, torch.float32), dim=2)
    chk.tensor("rows", rows, chk.INT_DTYPES, dim=2)
    chk.tensor("weights", weights, (torch.float32,), dim=2)
    t, n_slots = rows.shape
    if weights.shape[0] != t or weights.shape[1] > n_slots:
        raise ValueError(f"weights: expected [{t}, k] with k <= {n_slots}, got {tuple(weights.shape)}")
    for name, x in (("out", out), ("rows", rows), ("weights", weights)):
        if not x.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor")
    chk.same_device(out=out, rows=rows, weights=weights)
    if check_rows:   # the MoE paths build rows themselves and pass check_rows=False (no host sync there)
        chk.index_range("rows", rows, -1, out.shape[0], "rows of out (-1 = dropped slot)")
    y = torch.empty((t, out.shape[1]), dtype=dtype, device=out.device)
    if t == 0 or out.shape[1] == 0:
        return y
    _check_device("out", out)
    block = min(1024, triton.next_power_of_2(out.shape[1]))
    _combine_kernel[(t, triton.cdiv(out.shape[1], block))](out, rows, weights, y, out.shape[1], weights.shape[1],
                                                          N_SLOTS=n_slots, BLOCK_D=block, num_warps=4,
                                                          SOFT_BF16=_INTERPRETED and dtype == torch.bfloat16,
                                                          enable_fp_fusion=False)
    return y
