"""Attention output path references: inverse RoPE + fp8 quant, grouped low-rank wo_a, wo_b (dsv4-layers.md 3.7).

    o[t, h, d-r:]  = RoPE^-1(o[t, h, d-r:], pos_t)          GPT-J pairs (e, o) -> (e c + o s, o c - e s), fp32
    x[t]           = o[t].flatten()                          [H*d] fp32 (no bf16 rounding after the rotation)
    scale[t, j]    = 2^ceil(log2(max(amax(x[t, 128j:128j+128]), 1e-10) / 448))          fp32 power of two
    q[t, 128j + i] = e4m3_rne(x[t, 128j + i] / scale[t, j])                               (vLLM's layout, SM90)
    z[t, g, :]     = x[t, g-th group of (H/G)*d] @ wo_a[g].T        wo_a [G, o_l, (H/G)*d];  z [T, G, o_l] bf16
    out[t]         = z[t].flatten() @ wo_b.T                          wo_b [D, G*o_l];       out [T, D] bf16

``cos_sin_cache`` is vLLM's table: row ``p`` = ``[cos(p*inv_freq) | sin(p*inv_freq)]`` in fp32, so every
backend reads the same cos/sin bits (a kernel computing its own cos would not be bitwise comparable).
The fp8 einsum consumes the quantised activation ``(q, scale)`` viewed per group ``[T, G, (H/G)*d]`` and
``wo_a`` quantised once in 128x128 blocks with fp32 power-of-two scales (recipe (1, 128, 128), DeepGEMM SM90).

Three references for the grouped projection: ``fp8_einsum_wo_a`` (dequantised fp32 einsum of the fp8 operands:
what an fp8 kernel should match up to accumulation order and the bf16 output rounding), ``wo_a_einsum_bf16``
(DS-ref: bf16 activations x bf16 dequantised wo_a) and ``wo_a_einsum_oracle`` (fp64).
"""
from __future__ import annotations

import torch

from ...quant import dequant_fp8, quant_fp8
from ...rope import rope_cos_sin
from . import _checks as chk

QUANT_BLOCK = 128                # activation chunk and weight block edge
ATTN_OUT_AMAX_FLOOR = 1e-10      # vLLM's floor for this op (other fp8 activations use 1e-4)
EINSUM_RECIPE = (1, 128, 128)    # (gran_m, gran_n, gran_k) of the SM90 fp8 einsum
_FP8 = (torch.float8_e4m3fn,)
_F32 = (torch.float32,)


# ---- inverse RoPE + quant -------------------------------------------------------------------------
def rope_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """fp32 [max_positions, 2*len(inv_freq)]: row p = [cos(p*inv_freq) | sin(p*inv_freq)] (dsv4lab.rope math)."""
    chk.tensor("inv_freq", inv_freq, chk.FLOAT_DTYPES, dim=1)
    max_positions = chk.positive_int("max_positions", max_positions)
    cos, sin = rope_cos_sin(torch.arange(max_positions, device=inv_freq.device), inv_freq)
    return torch.cat((cos, sin), dim=-1).contiguous()


def check_inv_rope_args(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> int:
    """Input contract shared by every backend; returns rope_dim. The range of positions is checked by
    ``_checks.index_range`` (on a GPU one device sync, skipped during CUDA-graph capture, under torch.compile --
    where it would be data-dependent Python that breaks the graph -- and with DSV4LAB_GPU_RANGE_CHECKS=0)."""
    chk.tensor("o", o, chk.FLOAT_DTYPES, dim=3)
    t, h, d = o.shape
    if d % QUANT_BLOCK:
        raise ValueError(f"o: head_dim {d} must be a multiple of {QUANT_BLOCK} (one scale per 128-chunk of a head)")
    if o.stride(-1) != 1:
        raise ValueError("o: the head_dim axis must be contiguous (stride 1)")
    chk.tensor("positions", positions, chk.INT_DTYPES, dim=1)
    chk.shape("positions", positions, (t,))
    chk.tensor("cos_sin_cache", cos_sin_cache, _F32, dim=2)
    rope_dim = cos_sin_cache.shape[1]
    if rope_dim == 0 or rope_dim % 2 or rope_dim > QUANT_BLOCK:
        raise ValueError(f"cos_sin_cache: expected [max_pos, rope_dim] with rope_dim even and <= {QUANT_BLOCK}, "
                         f"got {tuple(cos_sin_cache.shape)}")
    if not cos_sin_cache.is_contiguous():
        raise ValueError("cos_sin_cache: expected a contiguous tensor")
    chk.same_device(o=o, positions=positions, cos_sin_cache=cos_sin_cache)
    chk.index_range("positions", positions, 0, cos_sin_cache.shape[0], "rows of cos_sin_cache")
    return rope_dim


def inv_rope(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Undo the query rotation on the last rope_dim channels of each head: [T, H, d] in ``dtype`` (fp32 = the
    kernels' math, no rounding after; fp64 = oracle). Pair (e, o) -> (e c + o s, o c - e s), each product
    rounded, then the sum (the order the kernels must follow to be bitwise equal)."""
    rope_dim = check_inv_rope_args(o, positions, cos_sin_cache)
    x = o.to(dtype, copy=True)
    cs = cos_sin_cache[positions.long()].to(dtype)             # [T, rope_dim]
    cos, sin = cs[:, None, : rope_dim // 2], cs[:, None, rope_dim // 2:]
    r = x[..., x.shape[-1] - rope_dim:]
    e, od = r[..., 0::2].clone(), r[..., 1::2].clone()
    r[..., 0::2] = e * cos + od * sin
    r[..., 1::2] = od * cos - e * sin
    return x


def inv_rope_fp8_quant(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse RoPE then per-(token, 128-chunk) fp8 e4m3 quant with pow2 fp32 scales (amax floor 1e-10).

    o [T, H, d] (d % 128 == 0, rope on the last rope_dim <= 128 channels of each head), positions [T] int,
    cos_sin_cache [P, rope_dim] fp32 -> (q e4m3 [T, H*d], scale fp32 [T, H*d/128]). View q as
    [T, G, (H/G)*d] and scale as [T, G, (H/G)*d/128] for the grouped einsum.
    """
    x = inv_rope(o, positions, cos_sin_cache).reshape(o.shape[0], o.shape[1] * o.shape[2])
    return quant_fp8(x, QUANT_BLOCK, pow2=True, amax_floor=ATTN_OUT_AMAX_FLOOR)


# ---- wo_a: weight quantisation and the grouped einsum -----------------------------------------------
def quantize_wo_a(wo_a: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """wo_a [G*o_l, r] (checkpoint layout) or [G, o_l, r] -> (e4m3 [G, o_l, r], fp32 pow2 scales [G, o_l/128, r/128]).

    128x128 blocks, done once at load time (DeepGEMM SM90 wants fp32 scales; the checkpoint's UE8M0 bytes
    are the same powers of two).
    """
    chk.tensor("wo_a", wo_a, chk.FLOAT_DTYPES)
    groups = chk.positive_int("groups", groups)
    if wo_a.dim() == 2:
        if wo_a.shape[0] % groups:
            raise ValueError(f"wo_a: rows {wo_a.shape[0]} not divisible by groups={groups}")
        wo_a = wo_a.reshape(groups, wo_a.shape[0] // groups, wo_a.shape[1])
    if wo_a.dim() != 3 or wo_a.shape[0] != groups:
        raise ValueError(f"wo_a: expected [G*o_l, r] or [G={groups}, o_l, r], got {tuple(wo_a.shape)}")
    if wo_a.shape[1] % QUANT_BLOCK or wo_a.shape[2] % QUANT_BLOCK:
        raise ValueError(f"wo_a: o_l and r must be multiples of {QUANT_BLOCK}, got {tuple(wo_a.shape)}")
    return quant_fp8(wo_a, (QUANT_BLOCK, QUANT_BLOCK), pow2=True)


def check_fp8_einsum_args(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                          out: torch.Tensor | None) -> tuple[int, int, int, int]:
    """Contract of ``fp8_einsum_wo_a`` (all backends); returns (T, G, o_l, r)."""
    chk.tensor("a", a, _FP8, dim=3)
    chk.tensor("w", w, _FP8, dim=3)
    t, g, r = a.shape
    if w.shape[0] != g or w.shape[2] != r:
        raise ValueError(f"w: expected [G={g}, o_l, r={r}] to match a {tuple(a.shape)}, got {tuple(w.shape)}")
    n = w.shape[1]
    if r % QUANT_BLOCK or n % QUANT_BLOCK:
        raise ValueError(f"a/w: r={r} and o_l={n} must be multiples of {QUANT_BLOCK}")
    chk.tensor("a_scale", a_scale, _F32, dim=3)
    chk.shape("a_scale", a_scale, (t, g, r // QUANT_BLOCK))
    chk.tensor("w_scale", w_scale, _F32, dim=3)
    chk.shape("w_scale", w_scale, (g, n // QUANT_BLOCK, r // QUANT_BLOCK))
    if out is not None:
        chk.tensor("out", out, (torch.bfloat16,), dim=3)
        chk.shape("out", out, (t, g, n))
        if not out.is_contiguous():
            raise ValueError("out: expected a contiguous tensor")
    chk.same_device(a=a, a_scale=a_scale, w=w, w_scale=w_scale, out=out)
    return t, g, n, r


def fp8_einsum_wo_a(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """z = einsum('bhr,hdr->bhd', deq(a), deq(w)) in fp32, rounded once to bf16 [T, G, o_l].

    a e4m3 [T, G, r] with a_scale fp32 [T, G, r/128] (1x128); w e4m3 [G, o_l, r] with w_scale fp32
    [G, o_l/128, r/128] (128x128). ``out`` (bf16, contiguous) is written and returned when given.
    """
    t, g, n, _ = check_fp8_einsum_args(a, a_scale, w, w_scale, out)
    a32 = dequant_fp8(a, a_scale, QUANT_BLOCK)
    w32 = dequant_fp8(w, w_scale, (QUANT_BLOCK, QUANT_BLOCK))
    if out is None:   # contiguous like the DeepGEMM backend's (einsum's own result may be permuted)
        out = torch.empty((t, g, n), dtype=torch.bfloat16, device=a.device)
    out.copy_(torch.einsum("bhr,hdr->bhd", a32, w32))
    return out


def wo_a_einsum_bf16(x: torch.Tensor, wo_a: torch.Tensor) -> torch.Tensor:
    """DS-ref eager: bf16 x [T, G, r] and bf16 wo_a [G, o_l, r] -> bf16 [T, G, o_l] (torch's bf16 bmm)."""
    chk.tensor("x", x, (torch.bfloat16,), dim=3)
    chk.tensor("wo_a", wo_a, (torch.bfloat16,), dim=3)
    if wo_a.shape[0] != x.shape[1] or wo_a.shape[2] != x.shape[2]:
        raise ValueError(f"wo_a: expected [G={x.shape[1]}, o_l, r={x.shape[2]}], got {tuple(wo_a.shape)}")
    return torch.einsum("bhr,hdr->bhd", x, wo_a)


def wo_a_einsum_oracle(x: torch.Tensor, wo_a: torch.Tensor) -> torch.Tensor:
    """fp64 einsum 'bhr,hdr->bhd' of x [T, G, r] and wo_a [G, o_l, r] (any float dtypes)."""
    chk.tensor("x", x, chk.FLOAT_DTYPES, dim=3)
    chk.tensor("wo_a", wo_a, chk.FLOAT_DTYPES, dim=3)
    if wo_a.shape[0] != x.shape[1] or wo_a.shape[2] != x.shape[2]:
        raise ValueError(f"wo_a: expected [G={x.shape[1]}, o_l, r={x.shape[2]}], got {tuple(wo_a.shape)}")
    return torch.einsum("bhr,hdr->bhd", x.double(), wo_a.double())


# ---- the whole output projection ---------------------------------------------------------------------
def o_proj_fp8(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, wo_a_q: torch.Tensor,
               wo_a_scale: torch.Tensor, wo_b: torch.Tensor) -> torch.Tensor:
    """vLLM's SM90 o-proj with reference pieces: quant -> fp8 einsum (z bf16) -> z.flatten(1) @ wo_b.T (bf16)."""
    q, s = inv_rope_fp8_quant(o, positions, cos_sin_cache)
    g = wo_a_q.shape[0]
    z = fp8_einsum_wo_a(q.view(o.shape[0], g, -1), s.view(o.shape[0], g, -1), wo_a_q, wo_a_scale)
    return z.flatten(1) @ wo_b.T


def o_proj_oracle(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, wo_a: torch.Tensor,
                  wo_b: torch.Tensor) -> torch.Tensor:
    """fp64 o-proj of the same inputs (no activation quantisation): [T, D] fp64. wo_a [G, o_l, r]."""
    x = inv_rope(o, positions, cos_sin_cache, torch.float64).reshape(o.shape[0], wo_a.shape[0], -1)
    return wo_a_einsum_oracle(x, wo_a).flatten(1) @ wo_b.double().T
