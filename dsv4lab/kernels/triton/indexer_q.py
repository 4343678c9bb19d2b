"""Triton: indexer Q RoPE + fp8 e4m3 quant with the per-(token, head) scale folded into the head weights.

Same contract and bits as ``dsv4lab.kernels.reference.indexer_q.indexer_q_rope_quant`` (dsv4-layers.md 3.5):
y = bf16(RoPE(q)), scale = 2^ceil(log2(max(amax_h(y), 1e-4) / 448)), q8 = e4m3(y / scale),
w_out = w * scale * d_I^-0.5 * n_I^-0.5.

Bytes (roofline row 12): read q (2 T n_I d_I) and w (4 T n_I), write q8 (T n_I d_I) and w_out (4 T n_I); the
per-token cos/sin rows (256 B per token for d_r = 64) are ~1 % on top.

Tiling: q is viewed as T*n_I rows of d_I (a head row is 256 contiguous bytes); one program takes BLOCK_ROWS
consecutive rows (several heads of one or more tokens), so loads and stores are full, coalesced rows. The GPT-J
pairs are split/joined in registers (reshape [.., d_I/2, 2]); only the rope pairs are rotated, the nope pairs pass
through. cos/sin are one fp32 row per token from ``rope.rope_cos_sin(positions, inv_freq)`` (the reference's own
function: same bits, no host sync on the positions), gathered per row from L1/L2.
Bitwise agreement rests on: no FMA contraction (torch rounds e*c and o*s before the sum), the exact pow2 scale
from the amax bits, and RNE casts (software-rounded to the bf16 / e4m3 grids under the interpreter, whose casts
truncate or misround).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...quant import FP8_AMAX_FLOOR
from ...rope import rope_cos_sin
from ..reference import _checks as chk
from ..reference._attn_checks import ANY_FLOAT, check_inv_freq, check_positions, check_tensor
from .compressor import _round_bf16
from .inv_rope_fp8_quant import _scale_bits, _to_e4m3

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Launch configurations: ``block_rows`` head rows (of d_I) per program, ``num_warps``. DEFAULT_CONFIG is what the
# launcher uses; CONFIGS is what bench/attention_kernels.py sweeps on the GPU (every config's time is recorded).
# H100 sweep: 8 rows / 1 warp 78 % / 91 % of copy BW at T = 4096 / 16384 (kernel alone), 32 / 4 gave 64 % / 75 %
DEFAULT_CONFIG: dict = dict(block_rows=8, num_warps=1)
CONFIGS: list[dict] = [dict(block_rows=br, num_warps=nw) for br, nw in
                       [(32, 4), (16, 4), (64, 4), (16, 2), (8, 1), (8, 2), (4, 1)]]


@triton.jit
def _indexer_q_kernel(q_ptr, cos_ptr, sin_ptr, w_ptr, q8_ptr, w_out_ptr, n_rows, weight_scale,
                      N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                      AMAX_FLOOR: tl.constexpr, SOFT_ROUND: tl.constexpr):
    NOPE: tl.constexpr = HEAD_DIM - ROPE_DIM
    rows32 = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)      # row = token * n_I + head (< 2^31)
    ok = rows32 < n_rows
    token = rows32 // N_HEADS                                 # constexpr divisor: a shift for n_I = 64
    rows = rows32.to(tl.int64)
    offs = rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    x = tl.load(q_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    pair = tl.arange(0, HEAD_DIM // 2)
    rot = pair >= NOPE // 2
    cs_offs = token[:, None] * (ROPE_DIM // 2) + (pair - NOPE // 2)[None, :]
    cs_mask = ok[:, None] & rot[None, :]
    cos = tl.load(cos_ptr + cs_offs, mask=cs_mask, other=1.0)
    sin = tl.load(sin_ptr + cs_offs, mask=cs_mask, other=0.0)
    even, odd = tl.split(tl.reshape(x, (BLOCK_ROWS, HEAD_DIM // 2, 2)))
    y = tl.reshape(tl.join(tl.where(rot[None, :], even * cos - odd * sin, even),
                           tl.where(rot[None, :], odd * cos + even * sin, odd)), (BLOCK_ROWS, HEAD_DIM))
    y = _round_bf16(y, SOFT_ROUND).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(y), axis=1), AMAX_FLOOR)
    scale, inv_scale = _scale_bits(amax)
    tl.store(q8_ptr + offs, _to_e4m3(y * inv_scale[:, None], SOFT_ROUND), mask=ok[:, None])
    w = tl.load(w_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    tl.store(w_out_ptr + rows, w * scale * weight_scale, mask=ok)


def resolve_config(config: dict | None = None) -> dict:
    """``config`` over ``DEFAULT_CONFIG``, checked."""
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    if set(cfg) != {"block_rows", "num_warps"}:
        raise ValueError(f"config: expected keys block_rows, num_warps, got {sorted(cfg)}")
    br = cfg["block_rows"]
    if isinstance(br, bool) or not isinstance(br, int) or br < 1 or br & (br - 1):
        raise ValueError(f"block_rows: expected a power of two, got {br!r}")
    if cfg["num_warps"] not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps: expected 1, 2, 4, 8 or 16, got {cfg['num_warps']!r}")
    return cfg


def launch(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weights: torch.Tensor,
           config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel alone: contiguous q [T, n_I, d_I] bf16, per-token cos/sin [T, d_r/2] fp32, weights [T, n_I]
    -> (q8, w_out). No input checks (``indexer_q_rope_quant`` does them); for benchmarks and config sweeps."""
    cfg = resolve_config(config)
    T, n_heads, head_dim = q.shape
    q8 = torch.empty(q.shape, dtype=torch.float8_e4m3fn, device=q.device)
    w_out = torch.empty(T, n_heads, dtype=torch.float32, device=q.device)
    n_rows = T * n_heads
    if n_rows >= 2 ** 31 - cfg["block_rows"]:
        raise ValueError(f"q: expected fewer than 2^31 head rows (T * n_I), got {n_rows}")
    if n_rows == 0:
        return q8, w_out
    _indexer_q_kernel[(triton.cdiv(n_rows, cfg["block_rows"]),)](
        q, cos, sin, weights, q8, w_out, n_rows, head_dim ** -0.5 * n_heads ** -0.5,
        N_HEADS=n_heads, HEAD_DIM=head_dim, ROPE_DIM=2 * cos.shape[1], BLOCK_ROWS=cfg["block_rows"], AMAX_FLOOR=FP8_AMAX_FLOOR,
        SOFT_ROUND=_INTERPRETED, num_warps=cfg["num_warps"], enable_fp_fusion=False)
    return q8, w_out


def indexer_q_rope_quant(q: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, weights: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``indexer_q_rope_quant``: q [T, n_I, d_I] bf16 -> (q8 e4m3, w_out fp32 [T, n_I]).

    Input contract: as the reference, plus d_I and the rope width powers of two; negative positions are rejected by
    ``_checks.index_range`` (one device sync on a GPU; skipped under graph capture / compile or with
    DSV4LAB_GPU_RANGE_CHECKS=0)."""
    check_tensor("q", q, dtypes=(torch.bfloat16,), ndim=3)
    T, n_heads, head_dim = q.shape
    check_positions(positions, T)
    check_inv_freq(inv_freq, head_dim, "index_head_dim")
    check_tensor("weights", weights, dtypes=ANY_FLOAT, shape=(T, n_heads))
    chk.same_device(q=q, weights=weights)
    rope = 2 * inv_freq.numel()
    if head_dim & (head_dim - 1) or rope == 0 or rope & (rope - 1):
        raise ValueError(f"q: the Triton backend needs power-of-two d_I and rope width, got {head_dim}, {rope}")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"q: the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    chk.index_range("positions", positions, 0, 2**62, "non-negative positions")
    if T == 0 or n_heads == 0:
        return (torch.empty(q.shape, dtype=torch.float8_e4m3fn, device=q.device),
                torch.empty(T, n_heads, dtype=torch.float32, device=q.device))
    cos, sin = rope_cos_sin(positions.to(q.device), inv_freq)
    return launch(q.contiguous(), cos.contiguous(), sin.contiguous(), weights.contiguous())
