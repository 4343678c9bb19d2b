"""The unfused MoE chain with the arithmetic of DeepGEMM's Hopper MegaMoE (``deep_gemm.fp8_mega_moe``), so a bench
can check the fused kernel bitwise against it (issue #10).

What the SM90 fused kernel computes per routed slot (t, j) with expert e = ids[t, j], w = weights[t, j]
(read from sgl-deep-gemm 0.1.4.post1, ``include/deep_gemm/impls/sm90_fp8_mega_moe.cuh``; lines cited as ``cuh:N``):

1. L1 = x_q[t] @ w13[e].T over e4m3 operands, 1x128 fp32 activation scales x 128x128 fp32 weight scales, kept in
   FP32 (never rounded to bf16 before the activation). Per 128-wide K block the WGMMA partial sum (4 instructions of
   K=32, the first one overwriting) is promoted as ``final += (s_x * s_w) * partial`` (cuh:1420-1457, the
   ``kReuseAccumAsFinal = false`` path; the generic 1D2D / 1D1D GEMMs promote the same way). Gate/up are interleaved
   by 8 columns in the weight (``transform_weights_for_mega_moe_sm90``); that only permutes the N axis.
2. SwiGLU with clamp, fp32 (cuh:29-56, 1765-1816): g = min(gate, L) (gate is clamped from ABOVE only),
   u = min(max(up, -L), L), silu(g) = g * sig with e = exp(-g), sig = 1 / (1 + e); h = silu(g) * u.
   ``fast_math=True`` (the wrapper's default): e = __expf(-g) (ex2.approx of (-g) * log2 e), sig = rcp.approx.ftz;
   ``fast_math=False``: expf and an IEEE division.
3. The ROUTING WEIGHT multiplies h here, before quantisation and before L2: h_w = h * w (cuh:1818-1834; the
   swap-AB variant cuh:1654/1665 forms silu(g) * u * w left to right, the same roundings).
4. Requantisation of h_w to e4m3 with ONE SCALE PER 64 COLUMNS of the intermediate (``kL2ActsSFGranK = 64``,
   cuh:303-304, 1836-1925), not 1x128: amax = max |h_w| over the 64 columns (the kernel forms max|h| * |w|,
   the same fp32 value because rounding is monotone), scaled = amax * fp32(1/448) (a multiplication,
   ``__fmul_rn``), sf = 2^ceil(log2(scaled)) read off the fp32 bits (``fast_log2_ceil``: exponent + (mantissa != 0);
   ``sm90_fp8_mega_moe_get_e4m3_sf_and_sf_inv`` cuh:58-66, ``common/math.cuh`` 78-88), sf_inv = 2^-that exactly.
   No amax floor: an all-zero block gets sf = 0 (fast_pow2(-127) = 0.0) and sf_inv = 2^127, i.e. zero codes.
   q = cvt.rn.satfinite.e4m3(h_w * sf_inv) (``__nv_fp8x2_e4m3``): round-to-nearest-even, saturated to +-448.
5. L2 = q @ w2[e].T with the per-64 activation scales: each 128-wide K block is two 64-wide halves, each its own
   WGMMA group (2 instructions, first overwriting) promoted with its own scale,
   ``final += (s_lo * s_w2) * partial_lo; final += (s_hi * s_w2) * partial_hi`` (cuh:1550-1606), halves in K order.
   The fp32 result is rounded to bf16 (RNE, ``cast_into_bf16_and_pack`` / ``__float2bfloat16_rn``, cuh:2006-2075)
   and written to the token's slot j of the combine buffer.
6. Combine (cuh:2150-2275): y[t] = bf16_rn( sum over slots j = 0..k-1 with ids[t, j] >= 0, ascending, of
   float(bf16 slot output) ), accumulated in fp32 starting from 0 (``ptx::accumulate`` on sm90: convert + add).
   No weight here (it was applied in step 3).

Our grouped chain (grouped_moe.experts_forward) differs in steps 1 (bf16 L1 output), 3 (weight in the combine), 4
(1x128 scales, amax floor) and 6 (fp32 weighted sum of the bf16 slot outputs): hence ulp-level but not bitwise
agreement. ``unfused_like_mega`` below redoes steps 1-6 unfused with DeepGEMM's standalone GEMMs:

- L1 in fp32: the only sm_90 DeepGEMM GEMM with an fp32 D is the 1D1D kernel (``fp8_gemm_nt`` with
  ``recipe=(1, 1, 128)``: per-row B scales, so the 128x128 weight scales are repeated over their 128 rows, which is
  exact); it is not M-grouped, so it runs once per (expert, 128-row chunk) of the contiguous layout with a fixed M
  of 128 (one JIT configuration).
- L2 with per-64 activation scales: the standalone grouped GEMM only takes 1x128 activation scales, so K is doubled
  with zero halves: activation block b of 128 = [64 zeros | q[:, 64 b: 64 b + 64]] with the scale of that 64-block,
  weight block b = [64 zeros | w2[:, 64 b: 64 b + 64]] with the scale of the original 128x128 block. The zeros go
  FIRST so that each 128-block partial sum starts at exactly zero and then accumulates the same two K=32
  instructions as the fused kernel's half. ``m_grouped_fp8_gemm_nt_contiguous`` rounds to bf16 like step 5.
- SwiGLU, weight, per-64 quantisation and combine: torch elementwise ops (fast_math: the two approximate
  instructions through a one-instruction Triton inline-asm kernel on CUDA).

Where bitwise equality is NOT guaranteed (the bench records which intermediate agrees):
- The fused kernel has other compile-time paths chosen by a host heuristic we cannot read in the sources
  (``csrc/jit_kernels/heuristics/sm90_mega_moe.hpp`` is compiled into _C.so): ``kReuseAccumAsFinal`` accumulates
  ALL K blocks in the WGMMA accumulator with exact power-of-two rescaling between blocks (cuh:973-1305) instead of
  promoting per block; the Hopper fp8 WGMMA accumulator keeps limited precision, so that path is not expected to
  match any standalone GEMM bitwise. The bench reads the template arguments of the JIT-generated kernel
  (``sm90_fp8_mega_moe_impl<...>``: argument 21 is kReuseAccumAsFinal, 25 kFP8SwapAB) from the JIT cache.
- The WGMMA tile shape differs (fused: BLOCK_N 128/256 interleaved gate/up, swap-AB at small M; standalone: its own
  heuristic). Per-element sums are expected to be independent of the tile shape, but that is a hardware property,
  not documented; likewise that a 0 + (K=32 products) instruction equals the overwriting first instruction.
- fast_math: ex2.approx / rcp.approx are reproduced with the same PTX instructions (CUDA only); on CPU the
  fast path falls back to exp2 / reciprocal (not bitwise; the CPU tests use fast_math=False).
- ``fast_math=False`` relies on torch.exp (CUDA expf) matching the kernel's expf: both libdevice, no fast-math flags.
What IS checkable independently of the GEMMs: given the fused kernel's own L1 (not exposed), steps 2-4 are exact
elementwise maps; the fused kernel leaves its quantised intermediate in ``buffer.l2_acts`` (fp8 [pool rows, I]),
so the bench checks that every row of our q appears bitwise among those pool rows (``rows_found_in``).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..reference import _checks as chk
from .grouped_moe import (QUANT_BLOCK, HopperExperts, deep_gemm_grouped, gather_rows, mk_alignment,
                          plan_contiguous)

L2_ACT_BLOCK = 64                                            # per-64 activation scales of the intermediate
E4M3_MAX = 448.0
INV_E4M3_MAX = float(torch.tensor(1.0 / 448.0, dtype=torch.float32))   # the kernel's constexpr 1.0f / 448.0f
LOG2E = float(torch.tensor(1.4426950408889634, dtype=torch.float32))    # fp32 log2(e) of __expf
L1_CHUNK_ROWS = 128                                          # fixed M of the 1D1D L1 GEMM (one JIT config)

L1Gemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
L2Gemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _deep_gemm():
    import deep_gemm  # lazy: a CUDA-only extension

    return deep_gemm


# ---- step 4: the scale rule ---------------------------------------------------------------------------------
def ceil_log2_bits(x: torch.Tensor) -> torch.Tensor:
    """int32 ceil(log2 x) for fp32 x >= 0 read off the bits: biased exponent - 127 + (mantissa != 0).
    0 -> -127; subnormals -> -126 (what DeepGEMM's ``fast_log2_ceil`` returns; not the true log2 there)."""
    bits = x.contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    return exp - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)


def pow2_from_exponent(e: torch.Tensor) -> torch.Tensor:
    """fp32 2^e built in the exponent field ((e + 127) << 23): e = -127 gives 0.0, e = 128 gives inf."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def mega_e4m3_scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sf, sf_inv) of a block with fp32 amax: sf = 2^ceil(log2(amax * fp32(1/448))), sf_inv = 2^-that."""
    chk.tensor("amax", amax, (torch.float32,))
    e = ceil_log2_bits(amax * INV_E4M3_MAX)
    return pow2_from_exponent(e), pow2_from_exponent(-e)


def to_e4m3_satfinite(v: torch.Tensor) -> torch.Tensor:
    """cvt.rn.satfinite.e4m3: round to nearest even, finite values beyond +-448 saturate (torch's cast would give
    NaN there, hence the clamp first; the clamp keeps NaN)."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


# ---- step 2: SwiGLU ---------------------------------------------------------------------------------------------
def _approx_ptx(x: torch.Tensor, op: str) -> torch.Tensor:
    """One PTX approximate instruction elementwise (CUDA): 'ex2' -> ex2.approx.f32, 'rcp' -> rcp.approx.ftz.f32."""
    from ..triton.mega_approx import approx_elementwise

    return approx_elementwise(x, op)


def silu_mega(g: torch.Tensor, fast_math: bool) -> torch.Tensor:
    """g * sig with sig = 1 / (1 + exp(-g)) in the kernel's roundings (fp32 in, fp32 out)."""
    if fast_math:
        t = (-g) * LOG2E
        if g.is_cuda:
            sig = _approx_ptx(1.0 + _approx_ptx(t, "ex2"), "rcp")
        else:   # no PTX here: the same formula with correctly rounded steps (ulp-close, not bitwise)
            sig = torch.reciprocal(1.0 + torch.exp2(t))
    else:
        sig = 1.0 / (1.0 + torch.exp(-g))
    return g * sig


def swiglu_weighted_quant(l1: torch.Tensor, row_weight: torch.Tensor, swiglu_limit: float, fast_math: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-4. ``l1`` fp32 [M, 2I] = [gate | up] (not interleaved), ``row_weight`` fp32 [M] (0 for padding rows)
    -> (q e4m3 [M, I], sf fp32 [M, I/64]) with q * sf ~= clampSwiGLU(gate, up) * w per 64-column block."""
    chk.tensor("l1", l1, (torch.float32,), dim=2)
    m, two_i = l1.shape
    if two_i % (2 * L2_ACT_BLOCK):
        raise ValueError(f"l1: expected [M, 2I] with I a multiple of {L2_ACT_BLOCK}, got {tuple(l1.shape)}")
    chk.tensor("row_weight", row_weight, (torch.float32,), dim=1)
    chk.shape("row_weight", row_weight, (m,))
    limit = chk.positive_float("swiglu_limit", swiglu_limit)
    inter = two_i // 2
    g = l1[:, :inter].clamp(max=limit)
    u = l1[:, inter:].clamp(-limit, limit)
    h = (silu_mega(g, fast_math) * u) * row_weight[:, None]
    blocks = h.view(m, inter // L2_ACT_BLOCK, L2_ACT_BLOCK)
    sf, sf_inv = mega_e4m3_scales(blocks.abs().amax(dim=-1) if m else blocks.new_zeros(0, inter // L2_ACT_BLOCK))
    q = to_e4m3_satfinite(blocks * sf_inv[..., None]).view(m, inter)
    return q, sf


# ---- step 5 operands: per-64 scales through a per-128 GEMM ---------------------------------------------------
def zero_interleave_rows(q: torch.Tensor) -> torch.Tensor:
    """[..., K] e4m3 -> [..., 2K]: every 64-column block b becomes the 128-block [64 zeros | block b]."""
    lead = q.shape[:-1]
    k = q.shape[-1]
    out = torch.zeros(*lead, k // L2_ACT_BLOCK, 2, L2_ACT_BLOCK, dtype=torch.uint8, device=q.device)
    out[..., 1, :] = q.contiguous().view(torch.uint8).view(*lead, k // L2_ACT_BLOCK, L2_ACT_BLOCK)
    return out.view(*lead, 2 * k).view(torch.float8_e4m3fn)


_L2_OPERANDS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def interleaved_l2_weights(w2: torch.Tensor, w2_sf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w2 e4m3 [G, D, I] + [G, D/128, I/128] -> [G, D, 2I] zero-interleaved + [G, D/128, 2I/128] (each scale twice).
    Cached (one entry, keyed on the tensors' storage and version): 2x the w2 bytes."""
    key = (w2.data_ptr(), w2._version, tuple(w2.shape), w2_sf.data_ptr(), w2_sf._version)
    if key not in _L2_OPERANDS:
        _L2_OPERANDS.clear()
        wide = torch.empty(w2.shape[0], w2.shape[1], 2 * w2.shape[2], dtype=torch.uint8, device=w2.device)
        for lo in range(0, w2.shape[0], 16):                     # bounded temporaries; fp8 moved as bytes
            wide[lo:lo + 16] = zero_interleave_rows(w2[lo:lo + 16]).view(torch.uint8)
        _L2_OPERANDS[key] = (wide.view(torch.float8_e4m3fn), w2_sf.repeat_interleave(2, dim=2).contiguous())
    return _L2_OPERANDS[key]


# ---- step 1: fp32 L1 ----------------------------------------------------------------------------------------------
def deep_gemm_l1_fp32(a: torch.Tensor, a_sf: torch.Tensor, b: torch.Tensor, b_sf_rows: torch.Tensor) -> torch.Tensor:
    """fp32 [M, N] = deq(a) @ deq(b).T through DeepGEMM's sm_90 1D1D kernel (``fp8_gemm_nt``, recipe (1, 1, 128),
    D fp32 accumulated onto zeros); ``b_sf_rows`` fp32 [N, K/128] per-row scales."""
    # the sm_90 1D1D kernel requires C (D = C + A B^T, fp32): C = D = 0, DeepGEMM's in-place accumulation form
    d = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    _deep_gemm().fp8_gemm_nt((a, a_sf), (b, b_sf_rows), d, c=d, recipe=(1, 1, 128))
    return d


def _l1_fp32(a, a_sf, experts: HopperExperts, counts: list[int], starts: list[int], align: int,
             gemm: L1Gemm) -> torch.Tensor:
    """Step 1 over the contiguous layout: per group, its padded row range in chunks of ``L1_CHUNK_ROWS``."""
    inter2 = experts.w13.shape[1]
    out = torch.zeros(a.shape[0], inter2, dtype=torch.float32, device=a.device)
    for g, (n, s) in enumerate(zip(counts, starts)):
        if n == 0:
            continue
        sf_rows = experts.w13_sf[g].repeat_interleave(QUANT_BLOCK, dim=0)     # [2I, D/128], exact
        padded = -(-n // align) * align
        for lo in range(s, s + padded, L1_CHUNK_ROWS):
            hi = min(lo + L1_CHUNK_ROWS, s + padded)
            out[lo:hi] = gemm(a[lo:hi], a_sf[lo:hi], experts.w13[g], sf_rows)
    return out


def combine_slots(out: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Step 6: y[t] = bf16(sum_j float(out[row[t, j]])) in fp32, j ascending from 0 (no weights)."""
    t, k = row.shape
    acc = torch.zeros(t, out.shape[1], dtype=torch.float32, device=out.device)
    for j in range(k):
        acc += out[row[:, j]].float()
    return acc.to(torch.bfloat16)


# ---- the chain ------------------------------------------------------------------------------------------------------
def unfused_like_mega(x_q: torch.Tensor, x_sf: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                      experts: HopperExperts, *, swiglu_limit: float, fast_math: bool = True,
                      l1_gemm: L1Gemm | None = None, l2_gemm: L2Gemm | None = None, alignment: int | None = None,
                      return_intermediates: bool = False):
    """``MegaMoESM90.__call__``'s inputs (x_q e4m3 [T, D], x_sf fp32 [T, D/128], weights fp32 [T, k], ids [T, k]
    GLOBAL expert ids in [0, experts.n_routed)) -> bf16 [T, D], steps 1-6 of the module docstring.

    ``experts``: all experts the ids refer to (for EP: every rank's, i.e. what rank r's fused kernel reaches over
    NVLink; per-row math does not depend on the rank that computes it). Only the routed groups are used.
    ``l1_gemm(a, a_sf, b, b_sf_rows) -> fp32`` and ``l2_gemm`` (grouped_moe's GroupedGemm) default to DeepGEMM;
    tests pass emulations. ``return_intermediates``: also a dict with l1 (fp32 [M, 2I]), q, q_sf (per-64), out
    (bf16 [M, D] per slot row) and the layout (rows of the contiguous layout, padding rows included)."""
    chk.tensor("x_q", x_q, (torch.float8_e4m3fn,), dim=2)
    t, d = x_q.shape
    if d != experts.hidden or d % QUANT_BLOCK:
        raise ValueError(f"x_q: expected [T, {experts.hidden}] (D a multiple of {QUANT_BLOCK}), got {tuple(x_q.shape)}")
    if experts.inter % QUANT_BLOCK:
        raise ValueError(f"experts: I={experts.inter} must be a multiple of {QUANT_BLOCK}")
    chk.tensor("x_sf", x_sf, (torch.float32,), dim=2)
    chk.shape("x_sf", x_sf, (t, d // QUANT_BLOCK))
    chk.tensor("weights", weights, (torch.float32,), dim=2)
    if weights.shape[0] != t:
        raise ValueError(f"weights: expected [{t}, k] (one row per token of x_q), got {tuple(weights.shape)}")
    chk.tensor("ids", ids, chk.INT_DTYPES, dim=2)
    chk.shape("ids", ids, tuple(weights.shape))
    e = experts.n_routed
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= e):
        raise ValueError(f"ids: expected expert ids in [0, {e}) (the routed experts of `experts`)")
    limit = chk.positive_float("swiglu_limit", swiglu_limit)
    if t == 0:
        y = torch.empty(0, d, dtype=torch.bfloat16, device=x_q.device)
        return (y, {}) if return_intermediates else y
    align = alignment or mk_alignment()
    lay = plan_contiguous(ids, e, align)
    a, a_sf = gather_rows(x_q, x_sf, lay)
    row_w = torch.zeros(lay.num_rows, dtype=torch.float32, device=x_q.device)
    row_w[lay.row.reshape(-1)] = weights.reshape(-1)
    routed = HopperExperts(experts.w13[:e], experts.w13_sf[:e], experts.w2[:e], experts.w2_sf[:e], e, 0)
    l1 = _l1_fp32(a, a_sf, routed, lay.counts.tolist(), lay.starts.tolist(), align, l1_gemm or deep_gemm_l1_fp32)
    q, q_sf = swiglu_weighted_quant(l1, row_w, limit, fast_math)
    w2_wide, w2_wide_sf = interleaved_l2_weights(routed.w2, routed.w2_sf)
    out = (l2_gemm or deep_gemm_grouped)(zero_interleave_rows(q), q_sf.contiguous(), w2_wide, w2_wide_sf,
                                         lay.m_indices)
    y = combine_slots(out, lay.row)
    if return_intermediates:
        return y, dict(l1=l1, q=q, q_sf=q_sf, out=out, layout=lay)
    return y


# ---- bench helper: find our intermediate rows in the fused kernel's buffer -----------------------------------------
def rows_found_in(rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """bool [R]: row r of ``rows`` (any 1-byte dtype [R, W]) occurs bitwise among the rows of ``pool`` [P, W].
    Rows are compared through a 64-bit multiplicative hash (collisions ~ R P / 2^64: negligible)."""
    if rows.dim() != 2 or pool.dim() != 2 or rows.shape[1] != pool.shape[1] or rows.element_size() != 1:
        raise ValueError(f"rows/pool: expected 1-byte [R, W] and [P, W], got {tuple(rows.shape)} {rows.dtype} and "
                         f"{tuple(pool.shape)} {pool.dtype}")
    w = rows.shape[1]
    gen = torch.Generator().manual_seed(12345)
    mult = (torch.randint(0, 2**62, (w,), generator=gen, dtype=torch.int64) * 2 + 1).to(rows.device)

    def digest(x: torch.Tensor) -> torch.Tensor:     # 4096 rows at a time: bounded int64 temporaries
        x = x.contiguous().view(torch.uint8)
        return torch.cat([(x[i:i + 4096].to(torch.int64) * mult).sum(dim=1)          # wraps mod 2^64
                          for i in range(0, x.shape[0], 4096)] or [x.new_zeros(0, dtype=torch.int64)])

    return torch.isin(digest(rows), digest(pool.to(rows.device)))


# template parameters of sm90_fp8_mega_moe_impl in declaration order (sm90_fp8_mega_moe.cuh:127-158)
FUSED_TEMPLATE_ARGS = (
    "kNumMaxTokensPerRank", "kHidden", "kIntermediateHidden", "kNumExperts", "kNumTopk", "kNumExpertsPerWave",
    "BLOCK_M", "BLOCK_N", "BLOCK_K", "kNumMaxPoolTokens", "kNumPaddedSFPoolTokens", "kNumStages",
    "kNumDispatchThreads", "kNumNonEpilogueThreads", "kNumEpilogueThreads", "kNumSMs", "kNumRanks",
    "kActivationClamp", "kFastMath", "kEpilogueRegisterBudget", "kReuseAccumAsFinal", "kL2ArrivalCounter",
    "kL2EpilogueRequiresFullSync", "kSplitPhaseHotPath", "kFP8SwapAB")


def fused_kernel_configs(cache_dirs) -> list[dict]:
    """Template arguments of every JIT-generated ``sm90_fp8_mega_moe_impl<...>`` instantiation found in DeepGEMM's
    JIT cache folders (generated ``*.cu`` sources), newest first: which GEMM path the fused kernel took
    (kReuseAccumAsFinal, kFP8SwapAB, BLOCK_M/N). Unreadable files are skipped."""
    import os
    import re
    from pathlib import Path

    found = []
    for root in cache_dirs:
        if not root or not Path(root).is_dir():
            continue
        for path in Path(root).rglob("*.cu"):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            m = re.search(r"sm90_fp8_mega_moe_impl<(.*?)>\s*\)", text, re.S)
            if not m:
                continue
            args = [a.strip() for a in m.group(1).split(",")]
            cfg = dict(zip(FUSED_TEMPLATE_ARGS, args)) if len(args) == len(FUSED_TEMPLATE_ARGS) else {"raw": args}
            found.append(dict(cfg, path=str(path), mtime=os.path.getmtime(path)))
    return sorted(found, key=lambda c: -c["mtime"])
