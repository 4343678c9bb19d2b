"""DeepGEMM on Hopper: DSv4 routed + shared experts as two fp8 grouped GEMMs (dsv4-layers.md 4.2-4.3, row 19).

SM90 has no FP8 x FP4 tensor-core path (stack.md 2), so the MXFP4 experts are converted ONCE to what the
sm_90 grouped GEMM takes: e4m3 weights with one fp32 power-of-two scale per 128 x 128 block. Per call:

    1. x -> e4m3 with 1x128 pow2 scales (dsv4lab.quant.quant_fp8), once per token
    2. slots (t, j) -> rows of a contiguous per-group layout: group g owns rows [start_g, start_g + n_g), each
       group padded to DeepGEMM's M alignment, m_indices[row] = g (padding rows: -1, zero activations)
    3. gate_up = m_grouped_fp8_gemm_nt_contiguous(a, [w1; w3])                bf16 [M, 2I]
    4. h = swiglu_quant(gate_up): silu(min(g, L)) * clamp(u, -L, L) -> e4m3 1x128    (Triton, one pass)
    5. out = m_grouped_fp8_gemm_nt_contiguous(h, w2)                           bf16 [M, D]
    6. y = sum_j w[t, j] * out[row(t, j)] + sum_s out[row(t, shared_s)], fp32, slot order; -> x.dtype

The shared expert (width n_shared * I) is split into n_shared width-I groups appended after the routed ones,
each taken by every token with weight 1: a SwiGLU expert of width sI is exactly the sum of s experts of width I
over disjoint slices of its intermediate dimension, so the shared expert rides in the same two GEMMs.

Conversion exactness: an e2m1 value c * 2^s (c in {.5, 1, 1.5, 2, 3, 4, 6}) has at most 2 significant bits, so
c * 2^s / S is an e4m3 value for the block scale S = 2^ceil(log2(amax / 448)) unless it falls below the e4m3
subnormal grid (multiples of 2^-9): i.e. when a 1x32 scale sits more than ~14 binades below the block's
largest. Such elements are rounded (RNE) and counted (``ConversionStats``); realistic weights have none.

Step 2 needs the group sizes on the host (one device sync per call) to size M; everything else is on device.

Masked layout (decode; ``LAYOUT_POLICY`` picks it by T): activations [G, M_max, D] with per-group row counts
``masked_m`` (Triton plan + scatter, ``triton/moe_masked_layout.py``), ``m_grouped_fp8_gemm_nt_masked`` for both
GEMMs, SwiGLU-quant over the valid rows only, the same Triton combine. With M_max = align(T, 128) it needs no host
sync (CUDA-graph capturable with ``validate_ids=False``); above ``static_m_max_tokens`` M_max follows the largest
routed group (one sync) and the shared slices are split into ceil(T / M_max) groups whose B operand repeats the
shared weights (``masked_experts``, cached). Both layouts compute every valid row with the same per-row math and use
the same combine kernel, so they agree bitwise whenever DeepGEMM's two kernels do.
GEMV path (``layout='gemv'``, or ``LAYOUT_POLICY['gemv_max_tokens']``, T <= 8 by default): for tiny decode batches
``triton/moe_gemv.py`` reads only the touched experts' weights (DeepGEMM's masked kernel walks every group), same
x quantisation, SwiGLU-quant and combine; GEMM sums in another order, so ulp-level differences, not bitwise.
DeepGEMM is imported lazily (it cannot be imported on a CPU machine); ``grouped_gemm=`` and ``alignment=``
let the CPU tests drive the same bookkeeping with an emulated GEMM.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ...quant import FP8_AMAX_FLOOR, dequant_fp4, dequant_fp8, quant_fp8
from ..reference import _checks as chk
from ..reference.moe import FP4_BLOCK, Weights3, _check_routing, _check_shared

QUANT_BLOCK = 128
ZERO_ROW_SCALE = 2.0 ** -22        # quant_fp8 of an all-zero 1x128 row (1e-4 / 448 -> 2^-22)
WEIGHT_AMAX_FLOOR = 2.0 ** -126    # an all-zero weight block gets scale 2^-126 (any finite value would do)
_CONVERT_CHUNK_ELEMENTS = 1 << 27  # experts converted per step: <= 512 MiB of fp32 temporaries

GroupedGemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# Layout choice by token count T (the bench sweeps these; one dict so the launcher default is one edit):
#   masked  if T <= masked_max_tokens, or masked_min_tokens is not None and T >= masked_min_tokens; else contiguous
#   static_m_max_tokens: up to this T the masked M_max is align(T, 128) (no host sync), above it the largest group's
#   expected_m: DeepGEMM's block-size hint for the masked kernel; None = ceil(T * k / E) (the mean routed group)
#   gemv_max_tokens: up to this T the Triton weight-streaming GEMV path (triton/moe_gemv.py) instead of any grouped
#   layout (0 = off). 8: on the H100 (commit 42be99d, Flash, graph replay) it beat the masked layout at T = 1 / 4 / 8
#   (90 / 239 / 425 us vs 126 / 262 / 462 us for masked with the Triton x quantisation), bitwise equal to it
#   gemv_config: triton/moe_gemv.GemvConfig of that path (None = its DEFAULT_CONFIG; variants gemv_cfg_* compare them)
#   x_quant: step 1 by 'torch' (quant_fp8) or 'triton' (triton/act_quant_fp8.py: one launch, the same bits; the H100
#   stage timing at T=1: 5.6 us vs 30.0 us for quant_fp8's ~15 launches)
LAYOUT_POLICY: dict = {"masked_max_tokens": 64, "masked_min_tokens": None, "static_m_max_tokens": 256,
                       "expected_m": None, "gemv_max_tokens": 8, "gemv_config": None, "x_quant": "triton"}


def _quant_x(x: torch.Tensor, policy: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1 by ``policy['x_quant']``: 'torch' (quant_fp8, ~15 small launches) or 'triton' (act_quant_fp8, one
    launch, the same bits for finite x and NaN blocks; bench variant masked_tritonq)."""
    if (LAYOUT_POLICY if policy is None else policy).get("x_quant", "torch") == "triton":
        from ..triton.act_quant_fp8 import act_quant_fp8

        return act_quant_fp8(x)
    return quant_fp8(x, QUANT_BLOCK, pow2=True, amax_floor=FP8_AMAX_FLOOR)


def layout_for(tokens: int, policy: dict | None = None) -> str:
    """'gemv', 'masked' or 'contiguous' for a batch of ``tokens`` under ``policy`` (default ``LAYOUT_POLICY``)."""
    p = LAYOUT_POLICY if policy is None else policy
    if 0 < tokens <= p.get("gemv_max_tokens", 0):
        return "gemv"
    if tokens <= p["masked_max_tokens"] or (p["masked_min_tokens"] is not None and tokens >= p["masked_min_tokens"]):
        return "masked"
    return "contiguous"


def _deep_gemm():
    import deep_gemm  # lazy: a CUDA-only extension

    return deep_gemm


# ---- one-time weight conversion -----------------------------------------------------------------------
@dataclass
class ConversionStats:
    """What a 128x128 pow2-scaled e4m3 block format could not hold exactly."""

    tensor: str
    elements: int
    nonzero: int
    inexact: int           # nonzero source values that changed (rounded onto the e4m3 subnormal grid)
    flushed: int           # ... of which became 0
    blocks: int
    lossy_blocks: int      # 128x128 blocks with at least one inexact element
    max_abs_err: float     # max |converted - source|
    max_rel_err: float     # max |converted - source| / |source| over the inexact elements (1.0 for a flush)

    def merged(self, other: "ConversionStats") -> "ConversionStats":
        return ConversionStats(self.tensor, self.elements + other.elements, self.nonzero + other.nonzero,
                               self.inexact + other.inexact, self.flushed + other.flushed,
                               self.blocks + other.blocks, self.lossy_blocks + other.lossy_blocks,
                               max(self.max_abs_err, other.max_abs_err), max(self.max_rel_err, other.max_rel_err))

    def as_dict(self) -> dict:
        return asdict(self)


def quantize_blocks_fp8(values: torch.Tensor, name: str = "w") -> tuple[torch.Tensor, torch.Tensor, ConversionStats]:
    """fp32 [..., N, K] -> (e4m3 [..., N, K], fp32 pow2 scales [..., N/128, K/128], stats of what changed)."""
    q, sf = quant_fp8(values, (QUANT_BLOCK, QUANT_BLOCK), pow2=True, amax_floor=WEIGHT_AMAX_FLOOR)
    back = dequant_fp8(q, sf, (QUANT_BLOCK, QUANT_BLOCK))
    src = values.float()
    changed = back != src
    err = (back - src).abs()
    n, k = src.shape[-2:]
    per_block = changed.reshape(*src.shape[:-2], n // QUANT_BLOCK, QUANT_BLOCK, k // QUANT_BLOCK, QUANT_BLOCK)
    lossy = per_block.any(dim=-1).any(dim=-2)
    rel = torch.where(changed, err / src.abs().clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(err))
    stats = ConversionStats(
        tensor=name, elements=src.numel(), nonzero=int((src != 0).sum()), inexact=int(changed.sum()),
        flushed=int((changed & (back == 0)).sum()), blocks=lossy.numel(), lossy_blocks=int(lossy.sum()),
        max_abs_err=float(err.max()) if err.numel() else 0.0, max_rel_err=float(rel.max()) if rel.numel() else 0.0)
    return q, sf, stats


def fp4_to_fp8_blocks(packed: torch.Tensor, scale: torch.Tensor, name: str = "w"
                      ) -> tuple[torch.Tensor, torch.Tensor, ConversionStats]:
    """MXFP4 experts [E, N, K/2] + UE8M0 [E, N, K/32] -> e4m3 [E, N, K] + fp32 [E, N/128, K/128] (+ stats),
    a few experts at a time so the fp32 temporaries stay bounded."""
    chk.tensor(f"{name} (packed e2m1)", packed, (torch.uint8, torch.int8), dim=3)
    chk.tensor(f"{name}_scale (UE8M0)", scale, (torch.uint8,), dim=3)
    e, n, half_k = packed.shape
    k = 2 * half_k
    if n % QUANT_BLOCK or k % QUANT_BLOCK:
        raise ValueError(f"{name}: expected [E, N, K/2] with N and K multiples of {QUANT_BLOCK}, got N={n}, K={k}")
    chk.shape(f"{name}_scale (UE8M0)", scale, (e, n, k // FP4_BLOCK))
    q = torch.empty((e, n, k), dtype=torch.float8_e4m3fn, device=packed.device)
    sf = torch.empty((e, n // QUANT_BLOCK, k // QUANT_BLOCK), dtype=torch.float32, device=packed.device)
    stats = ConversionStats(name, 0, 0, 0, 0, 0, 0, 0.0, 0.0)
    step = max(1, _CONVERT_CHUNK_ELEMENTS // max(n * k, 1))
    for lo in range(0, e, step):
        vals = dequant_fp4(packed[lo:lo + step], scale[lo:lo + step], FP4_BLOCK)   # exact in fp32
        q[lo:lo + step], sf[lo:lo + step], s = quantize_blocks_fp8(vals, name)
        stats = stats.merged(s)
    return q, sf, stats


@dataclass
class HopperExperts:
    """Routed (+ shared) experts in the sm_90 grouped-GEMM format. Groups 0..E-1 are the routed experts,
    E..E+S-1 the width-I slices of the shared expert."""

    w13: torch.Tensor          # e4m3 [G, 2I, D], rows [w1; w3]
    w13_sf: torch.Tensor       # fp32 [G, 2I/128, D/128]
    w2: torch.Tensor           # e4m3 [G, D, I]
    w2_sf: torch.Tensor        # fp32 [G, D/128, I/128]
    n_routed: int
    n_shared_groups: int
    stats: dict[str, ConversionStats] = field(default_factory=dict)

    @property
    def hidden(self) -> int:
        return self.w13.shape[2]

    @property
    def inter(self) -> int:
        return self.w2.shape[2]

    @property
    def n_groups(self) -> int:
        return self.n_routed + self.n_shared_groups

    def bytes_per_group(self) -> int:
        """HBM bytes of one expert's weights in this format: 3 D I e4m3 + the fp32 block scales."""
        return (self.w13[0].numel() + self.w2[0].numel()) + 4 * (self.w13_sf[0].numel() + self.w2_sf[0].numel())


def prepare_experts(w1: torch.Tensor, w1_scale: torch.Tensor, w3: torch.Tensor, w3_scale: torch.Tensor,
                    w2: torch.Tensor, w2_scale: torch.Tensor, shared: Weights3 | None = None) -> HopperExperts:
    """Convert the MXFP4 checkpoint layout (``moe_fp4``'s arguments) once; ``shared`` float (w1, w3, w2) is
    quantised to 128x128 e4m3 blocks (exact when it holds dequantised fp8 checkpoint values)."""
    chk.tensor("w1", w1, (torch.uint8, torch.int8), dim=3)
    n_exp, inter, half_d = w1.shape
    d = 2 * half_d
    if d % QUANT_BLOCK or inter % QUANT_BLOCK:
        raise ValueError(f"w1: D={d} and I={inter} must be multiples of {QUANT_BLOCK} for 128x128 fp8 blocks")
    for name, t, shp in (("w3", w3, (n_exp, inter, half_d)), ("w2", w2, (n_exp, d, inter // 2))):
        chk.tensor(name, t, (torch.uint8, torch.int8), dim=3)
        chk.shape(name, t, shp)
    for name, t, shp in (("w1_scale", w1_scale, (n_exp, inter, d // FP4_BLOCK)),
                         ("w3_scale", w3_scale, (n_exp, inter, d // FP4_BLOCK)),
                         ("w2_scale", w2_scale, (n_exp, d, inter // FP4_BLOCK))):
        chk.tensor(name, t, (torch.uint8,), dim=3)
        chk.shape(name, t, shp)
    _check_shared(shared, d)
    if shared is not None and shared[0].shape[0] % inter:
        raise ValueError(f"shared: expected a width that is a multiple of I={inter}, got {shared[0].shape[0]}")
    w13, w13_sf, st13 = fp4_to_fp8_blocks(torch.cat((w1, w3), dim=1), torch.cat((w1_scale, w3_scale), dim=1), "w13")
    w2q, w2_sf, st2 = fp4_to_fp8_blocks(w2, w2_scale, "w2")
    stats = {"w13": st13, "w2": st2}
    n_shared = 0
    if shared is not None:
        s1, s3, s2 = (t.float() for t in shared)
        n_shared = s1.shape[0] // inter
        sl = [slice(i * inter, (i + 1) * inter) for i in range(n_shared)]
        sh13 = torch.stack([torch.cat((s1[r], s3[r]), dim=0) for r in sl])      # [S, 2I, D]
        sh2 = torch.stack([s2[:, r] for r in sl])                                 # [S, D, I]
        q13, sf13, stats["shared_w13"] = quantize_blocks_fp8(sh13, "shared_w13")
        q2, sf2, stats["shared_w2"] = quantize_blocks_fp8(sh2, "shared_w2")
        w13, w13_sf = torch.cat((w13, q13)), torch.cat((w13_sf, sf13))
        w2q, w2_sf = torch.cat((w2q, q2)), torch.cat((w2_sf, sf2))
    return HopperExperts(w13, w13_sf, w2q, w2_sf, n_exp, n_shared, stats)


# ---- per-call bookkeeping ------------------------------------------------------------------------------
@dataclass
class ContiguousLayout:
    """Rows of the grouped GEMMs: ``m_indices[r]`` = group of row r (-1 = padding); ``row[t, j]`` = row of slot j
    of token t; group g occupies rows ``starts[g] .. starts[g] + counts[g]`` (padded up to ``alignment``)."""

    m_indices: torch.Tensor    # int32 [M]
    row: torch.Tensor          # int64 [T, n_slots]
    counts: torch.Tensor       # int64 [G]
    starts: torch.Tensor       # int64 [G]
    alignment: int

    @property
    def num_rows(self) -> int:
        return self.m_indices.numel()


def plan_contiguous(groups: torch.Tensor, n_groups: int, alignment: int) -> ContiguousLayout:
    """Stable per-group placement of the slots ``groups [T, n_slots]`` (ints in [0, n_groups)): within a group,
    slots keep their flattened (token-major) order. One host sync (the padded total M)."""
    chk.tensor("groups", groups, chk.INT_DTYPES, dim=2)
    chk.positive_int("n_groups", n_groups)
    chk.positive_int("alignment", alignment)
    flat = groups.reshape(-1).long()
    counts = torch.bincount(flat, minlength=n_groups)
    padded = (counts + alignment - 1) // alignment * alignment
    starts = torch.cumsum(padded, 0) - padded
    order = torch.argsort(flat, stable=True)
    sorted_groups = flat[order]
    first_slot = torch.cumsum(counts, 0) - counts
    rows_sorted = starts[sorted_groups] + torch.arange(flat.numel(), device=flat.device) - first_slot[sorted_groups]
    row = torch.empty_like(flat)
    row[order] = rows_sorted
    m_indices = torch.full((int(padded.sum()),), -1, dtype=torch.int32, device=flat.device)
    m_indices[rows_sorted] = sorted_groups.to(torch.int32)
    return ContiguousLayout(m_indices, row.reshape(groups.shape), counts, starts, alignment)


def slot_table(weights: torch.Tensor, ids: torch.Tensor, n_routed: int, n_shared_groups: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(groups int64 [T, k + S], slot weights fp32 [T, k + S]): routed slots, then the shared groups at weight 1."""
    t = ids.shape[0]
    shared = torch.arange(n_routed, n_routed + n_shared_groups, device=ids.device).expand(t, n_shared_groups)
    groups = torch.cat((ids.long(), shared), dim=1)
    w = torch.cat((weights.float(), torch.ones(t, n_shared_groups, dtype=torch.float32, device=ids.device)), dim=1)
    return groups, w


def gather_rows(x_q: torch.Tensor, x_sf: torch.Tensor, layout: ContiguousLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Permuted fp8 activations [M, D] (+ fp32 scales [M, D/128]); padding rows are quantised zero rows."""
    t, n_slots = layout.row.shape
    m = layout.num_rows
    tokens = torch.arange(t, device=x_q.device).repeat_interleave(n_slots)
    rows = layout.row.reshape(-1)
    a = torch.zeros((m, x_q.shape[1]), dtype=torch.uint8, device=x_q.device)
    a[rows] = x_q.view(torch.uint8)[tokens]               # fp8 moved as bytes: no float8 index_put needed
    a_sf = torch.full((m, x_sf.shape[1]), ZERO_ROW_SCALE, dtype=torch.float32, device=x_q.device)
    a_sf[rows] = x_sf[tokens]
    return a.view(torch.float8_e4m3fn), a_sf


def combine(out: torch.Tensor, layout: ContiguousLayout, slot_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``y[t] = sum_j slot_weights[t, j] * out[row[t, j]]`` in fp32, j in slot order (deterministic), -> dtype.
    The torch form; the pipeline uses the one-launch Triton ``combine_rows`` (same order, shared by both layouts)."""
    t, n_slots = layout.row.shape
    y = torch.zeros((t, out.shape[1]), dtype=torch.float32, device=out.device)
    for j in range(n_slots):
        y.addcmul_(out[layout.row[:, j]].float(), slot_weights[:, j:j + 1])
    return y.to(dtype)


def deep_gemm_grouped(a: torch.Tensor, a_sf: torch.Tensor, b: torch.Tensor, b_sf: torch.Tensor,
                      m_indices: torch.Tensor) -> torch.Tensor:
    """``out[r] = deq(a[r]) @ deq(b[m_indices[r]]).T`` in bf16 (DeepGEMM sm_90 1D2D: fp32 scales, 1x128 / 128x128)."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16, device=a.device)
    _deep_gemm().m_grouped_fp8_gemm_nt_contiguous((a, a_sf), (b, b_sf), out, m_indices)
    return out


MaskedGemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def deep_gemm_masked(a: torch.Tensor, a_sf: torch.Tensor, b: torch.Tensor, b_sf: torch.Tensor,
                     masked_m: torch.Tensor, expected_m: int) -> torch.Tensor:
    """``out[g, r] = deq(a[g, r]) @ deq(b[g]).T`` for r < masked_m[g], bf16 [G, M_max, N] (rows past masked_m[g]
    unspecified). sgl-deep-gemm 0.1.4.post1 names it ``m_grouped_fp8_fp4_gemm_nt_masked`` (alias
    ``fp8_m_grouped_gemm_nt_masked``); upstream DeepGEMM also has ``m_grouped_fp8_gemm_nt_masked``."""
    dg = _deep_gemm()
    fn = (getattr(dg, "m_grouped_fp8_gemm_nt_masked", None) or getattr(dg, "m_grouped_fp8_fp4_gemm_nt_masked", None)
          or dg.fp8_m_grouped_gemm_nt_masked)
    out = torch.empty((a.shape[0], a.shape[1], b.shape[1]), dtype=torch.bfloat16, device=a.device)
    fn((a, a_sf), (b, b_sf), out, masked_m, expected_m)
    return out


_MASKED_EXPERTS: dict[tuple, "HopperExperts"] = {}


def masked_experts(experts: "HopperExperts", shared_chunks: int) -> "HopperExperts":
    """The B operands of a masked layout with ``shared_chunks`` groups per shared slice: routed experts, then each
    shared slice repeated ``shared_chunks`` times (cached; identity for 1 chunk or no shared expert)."""
    if shared_chunks == 1 or experts.n_shared_groups == 0:
        return experts
    # data pointers and version counters of all four operands: an in-place weight update must not return stale copies
    key = (id(experts), shared_chunks, *((w.data_ptr(), w._version) for w in
                                         (experts.w13, experts.w13_sf, experts.w2, experts.w2_sf)))
    if key not in _MASKED_EXPERTS:
        _MASKED_EXPERTS.clear()
        e = experts.n_routed
        rep = [torch.cat((w[:e], w[e:].repeat_interleave(shared_chunks, dim=0)))
               for w in (experts.w13, experts.w13_sf, experts.w2, experts.w2_sf)]
        _MASKED_EXPERTS[key] = HopperExperts(*rep, e, experts.n_shared_groups * shared_chunks, experts.stats)
    return _MASKED_EXPERTS[key]


def mk_alignment() -> int:
    """DeepGEMM's M alignment of each group in the contiguous layout (128 on sm_90 in the versions checked)."""
    return int(_deep_gemm().get_mk_alignment_for_contiguous_layout())


def experts_forward(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: HopperExperts, *,
                    swiglu_limit: float, alignment: int | None = None, grouped_gemm: GroupedGemm | None = None,
                    x_quant: tuple[torch.Tensor, torch.Tensor] | None = None, layout: str | None = None,
                    masked_gemm: MaskedGemm | None = None, m_max: int | None = None, expected_m: int | None = None,
                    validate_ids: bool = True, policy: dict | None = None) -> torch.Tensor:
    """Steps 1-6 of the module docstring -> [T, D] in x's dtype. ``x_quant`` = (e4m3 [T, D], fp32 [T, D/128])
    skips step 1 (MegaMoE stages x in its symmetric buffer already quantised). ``layout``: 'contiguous', 'masked',
    'gemv' (triton/moe_gemv.py: no grouped GEMM) or None (``layout_for(T, policy)``; contiguous when only ``grouped_gemm`` is overridden). ``validate_ids=False``
    skips the host-side id checks (no device sync: the masked path is then CUDA-graph capturable; bad ids are
    dropped instead of raising)."""
    chk.tensor("x", x, chk.FLOAT_DTYPES, dim=2)
    if x.shape[1] != experts.hidden:
        raise ValueError(f"x: expected [T, {experts.hidden}], got {tuple(x.shape)}")
    if validate_ids:
        _check_routing(x, weights, ids, experts.n_routed)
    else:
        _check_routing(x[:0], weights[:0], ids[:0], experts.n_routed)     # dtypes and ranks only, no sync
        chk.shape("ids", ids, tuple(weights.shape))
        if weights.shape[0] != x.shape[0]:
            raise ValueError(f"weights: expected [{x.shape[0]}, k] (one row per token of x), got {tuple(weights.shape)}")
    limit = chk.positive_float("swiglu_limit", swiglu_limit)
    t = x.shape[0]
    if layout is None:
        layout = "contiguous" if (grouped_gemm is not None and masked_gemm is None) else layout_for(t, policy)
    if layout not in ("contiguous", "masked", "gemv"):
        raise ValueError(f"layout: expected 'contiguous', 'masked', 'gemv' or None, got {layout!r}")
    if t == 0:
        return torch.empty_like(x)
    if layout == "gemv":   # ids already checked above when validate_ids
        from ..triton.moe_gemv import DEFAULT_CONFIG, moe_gemv, moe_gemv_x

        cfg = (LAYOUT_POLICY if policy is None else policy).get("gemv_config") or DEFAULT_CONFIG
        args = (weights.float().contiguous(), ids.contiguous(), experts.w13, experts.w13_sf, experts.w2, experts.w2_sf)
        kw = dict(n_routed=experts.n_routed, swiglu_limit=limit, out_dtype=x.dtype, validate_ids=False, config=cfg)
        if x_quant is None and cfg.fuse_x_quant:
            return moe_gemv_x(x.contiguous(), *args, **kw)
        x_q, x_sf = x_quant if x_quant is not None else _quant_x(x, policy)
        return moe_gemv(x_q.contiguous(), x_sf.contiguous(), *args, **kw)
    x_q, x_sf = x_quant if x_quant is not None else _quant_x(x, policy)
    if layout == "masked":
        return _masked_forward(x, x_q, x_sf, weights, ids, experts, limit, masked_gemm or deep_gemm_masked, m_max,
                               expected_m, validate_ids, LAYOUT_POLICY if policy is None else policy)
    from ..triton.moe_masked_layout import combine_rows
    from ..triton.swiglu_quant import swiglu_quant

    gemm = grouped_gemm or deep_gemm_grouped
    align = alignment or mk_alignment()
    groups, _ = slot_table(weights, ids, experts.n_routed, experts.n_shared_groups)
    lay = plan_contiguous(groups, experts.n_groups, align)
    a, a_sf = gather_rows(x_q, x_sf, lay)
    gate_up = gemm(a, a_sf, experts.w13, experts.w13_sf, lay.m_indices)
    h, h_sf = swiglu_quant(gate_up, limit, lay.m_indices)
    out = gemm(h, h_sf, experts.w2, experts.w2_sf, lay.m_indices)
    return combine_rows(out, lay.row, weights.float().contiguous(), x.dtype, check_rows=False)


def _masked_forward(x, x_q, x_sf, weights, ids, experts: HopperExperts, limit: float, gemm: MaskedGemm,
                    m_max: int | None, expected_m: int | None, validate: bool, policy: dict) -> torch.Tensor:
    """The masked layout: plan (slot per (t, j), masked_m) -> scatter -> masked GEMM -> SwiGLU-quant on the valid
    rows (scales MN-major) -> masked GEMM -> combine. No host sync unless ``validate`` or M_max must be measured."""
    from ..triton import moe_masked_layout as ml
    from ..triton.swiglu_quant import swiglu_quant

    t, k = ids.shape
    ids = ids.contiguous()
    if m_max is None:
        m_max = ml.default_m_max(t) if t <= policy["static_m_max_tokens"] else ml.prefill_m_max(ids, experts.n_routed)
    lay = ml.plan_masked(ids, experts.n_routed, experts.n_shared_groups, m_max, validate=validate)
    ex = masked_experts(experts, lay.shared_chunks)
    if expected_m is None:
        expected_m = policy.get("expected_m") or max(1, -(-t * k // experts.n_routed))
    a, a_sf, rows = ml.scatter_masked(x_q.contiguous(), x_sf.contiguous(), ids, lay)
    gate_up = gemm(a, a_sf, ex.w13, ex.w13_sf, lay.masked_m, expected_m)              # [G, M_max, 2I]
    g_all, inter2 = gate_up.shape[0], gate_up.shape[2]
    h, h_sf = swiglu_quant(gate_up.view(g_all * m_max, inter2), limit, rows=rows, group_rows=m_max)
    out = gemm(h.view(g_all, m_max, inter2 // 2), h_sf, ex.w2, ex.w2_sf, lay.masked_m, expected_m)
    return ml.combine_rows(out.view(g_all * m_max, out.shape[2]), rows, weights.float().contiguous(), x.dtype,
                           check_rows=False)


# ---- the registry backend (moe_fp4's signature) ---------------------------------------------------------
_PREPARED: dict[tuple, HopperExperts] = {}


def _cache_key(*tensors: torch.Tensor | None) -> tuple:
    return tuple(None if t is None else (t.data_ptr(), t._version, tuple(t.shape), str(t.device)) for t in tensors)


def prepared_for(w1, w1_scale, w3, w3_scale, w2, w2_scale, shared=None) -> HopperExperts:
    """``prepare_experts`` cached on the identity/version of the weight tensors (one entry: weights are large)."""
    key = _cache_key(w1, w1_scale, w3, w3_scale, w2, w2_scale, *(shared or (None,) * 3))
    if key not in _PREPARED:
        _PREPARED.clear()
        _PREPARED[key] = prepare_experts(w1, w1_scale, w3, w3_scale, w2, w2_scale, shared)
    return _PREPARED[key]


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                w1: torch.Tensor, w1_scale: torch.Tensor, w3: torch.Tensor, w3_scale: torch.Tensor,
                w2: torch.Tensor, w2_scale: torch.Tensor, *, swiglu_limit: float,
                shared: Weights3 | None = None) -> torch.Tensor:
    """DeepGEMM backend of ``moe_experts`` (same arguments as ``moe_fp4``): converts the experts on first use
    (cached), then ``experts_forward``. Needs CUDA tensors on an sm_90 GPU; D and I multiples of 128."""
    chk.tensor("x", x, chk.FLOAT_DTYPES, dim=2)
    chk.tensor("w1", w1, (torch.uint8, torch.int8), dim=3)
    if x.shape[1] % QUANT_BLOCK or w1.shape[1] % QUANT_BLOCK:
        raise ValueError(f"x/w1: D={x.shape[1]} and I={w1.shape[1]} must be multiples of {QUANT_BLOCK}")
    if x.shape[1] != 2 * w1.shape[2]:
        raise ValueError(f"w1: expected [E, I, {x.shape[1] // 2}] (packed e2m1), got {tuple(w1.shape)}")
    _check_routing(x, weights, ids, w1.shape[0])
    if x.device.type != "cuda":
        raise ValueError(f"x: the deep_gemm backend needs CUDA tensors, got device {x.device}")
    experts = prepared_for(w1, w1_scale, w3, w3_scale, w2, w2_scale, shared)
    return experts_forward(x, weights, ids, experts, swiglu_limit=swiglu_limit)
